"""The ``sq-kernels`` command line, run in-process on a tiny local model directory."""
import json
import subprocess
import sys

import pytest
import torch

import sq_kernels as sq
from sq_kernels.cli import main

from conftest import TEXT, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data_files(tmp_path):
    txt = tmp_path / "calib.txt"
    txt.write_text(TEXT, encoding="utf-8")
    jsonl = tmp_path / "lambada.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": s.strip() + "."}) for s in TEXT.split(".")[:5] if s.strip()))
    return txt, jsonl


def test_quantize_info_eval(model_dir, data_files, tmp_path, capsys):
    txt, jsonl = data_files
    out = tmp_path / "tiny-llama-w8a8"
    rc = main(["quantize", str(model_dir), str(out), "--data", str(txt), "--num-samples", "4", "--seq-len", "64",
               "--alpha", "0.8", "--fp", "*.down_proj", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "converted" in printed and "kept model.layers.0.mlp.down_proj" in printed
    assert (out / "sq_quantization.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "sq_smoothing_report.json").read_text())["alphas"]["model.layers.0"] == 0.8
    model = sq.load_quantized(out)
    assert isinstance(model.model.layers[0].self_attn.q_proj, sq.W8A8Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)

    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "LlamaForCausalLM" in info and "linear: w8 per_channel / a8 per_token" in info and "layers.0=0.8" in info
    assert "kept in floating point: 3 (" in info and "lm_head" in info and "stored as float32" in info

    results = tmp_path / "eval.json"
    rc = main(["eval", str(out), "--reference", str(model_dir), "--ppl", str(txt), "--lambada", str(jsonl),
               "--sqnr-data", str(txt), "--seq-len", "64", "--json", str(results), "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    r = json.loads(results.read_text())
    assert abs(r["model_perplexity"] - r["reference_perplexity"]) / r["reference_perplexity"] < 0.02
    assert 0.0 <= r["model_last_word_accuracy"] <= 1.0
    assert r["layer_sqnr_db"]["logits"] > 20.0
    assert "model.layers.0.self_attn.q_proj" in printed


def test_calibrate_then_quantize_from_statistics(model_dir, data_files, tmp_path, capsys):
    txt, _ = data_files
    stats = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(model_dir), "--data", str(txt), "--out", str(stats), "--num-samples", "3",
                 "--seq-len", "64", "--no-progress"]) == 0
    assert "saved statistics" in capsys.readouterr().out
    loaded = sq.ActStats.load(stats)
    assert loaded.meta["num_samples"] == 3
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(out), "--data", str(txt), "--stats", str(stats), "--scheme", "O3",
                 "--no-progress"]) == 0
    model = sq.load_quantized(out)
    assert model.model.layers[1].mlp.up_proj.activation == "static"


def test_errors_exit_2_with_a_message(model_dir, data_files, tmp_path, capsys):
    txt, _ = data_files
    assert main(["quantize", str(model_dir), str(tmp_path / "o"), "--data", str(txt), "--alpha", "1.5",
                 "--no-progress"]) == 2
    assert "alpha must lie in [0, 1]" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "o"), "--data", str(txt)]) == 2
    assert "not a local Hugging Face model directory" in capsys.readouterr().err
    assert main(["info", str(model_dir)]) == 2
    assert "not an sq_kernels quantized model" in capsys.readouterr().err
    assert main(["eval", str(model_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--arch", "tiny-llama", "--layers", "1", "--prompt", "8", "--warmup", "0", "--iters", "1",
                 "--device", "cpu", "--dtype", "float32", "--json", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert [r["phase"] for r in result["rows"]] == ["prefill", "one token"] and result["converted"] == 7
    assert result["w8a8_bytes"] < result["fp_bytes"]
    assert "speedup" in capsys.readouterr().out


def test_console_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "sq_kernels.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    for command in ("calibrate", "quantize", "eval", "info", "bench"):
        assert command in proc.stdout


def _digest(path):
    import hashlib
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def test_quantize_never_writes_into_the_input_model_or_a_non_empty_directory(model_dir, data_files, tmp_path, capsys):
    txt, _ = data_files
    before = _digest(model_dir)
    args = ["--data", str(txt), "--num-samples", "2", "--seq-len", "32", "--no-progress"]
    assert main(["quantize", str(model_dir), str(model_dir), *args]) == 2
    assert "must go to a directory of its own" in capsys.readouterr().err
    assert main(["quantize", str(model_dir), str(model_dir / "sub"), *args]) == 2
    assert "(inside) the input model" in capsys.readouterr().err
    assert _digest(model_dir) == before and not (model_dir / "sub").exists()

    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["quantize", str(model_dir), str(out), *args]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "config.json").write_text('{"mine": true}')  # the user's own files, not a quantized checkpoint
    assert main(["quantize", str(model_dir), str(out), *args, "--overwrite"]) == 2
    assert "is not an earlier quantized checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "notes.txt"]
    assert (out / "config.json").read_text() == '{"mine": true}'


def test_bad_arguments_are_refused_before_any_model_is_loaded(model_dir, data_files, tmp_path, capsys, monkeypatch):
    import sq_kernels.cli as cli
    txt, jsonl = data_files

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(cli, "_load_model", no_load)
    out = str(tmp_path / "o")
    cases = [
        (["quantize", str(model_dir), out, "--data", str(txt), "--device", "tpu9"], "--device must be 'cpu', 'cuda'"),
        (["quantize", str(model_dir), out], "--data is required"),
        (["quantize", str(model_dir), out, "--stats", str(tmp_path / "s.safetensors"), "--save-stats",
          str(tmp_path / "t.safetensors")], "--save-stats writes the statistics of this run"),
        (["quantize", str(model_dir), out, "--stats", str(tmp_path / "none.safetensors")], "no such file"),
        (["quantize", str(model_dir), out, "--data", str(txt), "--save-stats", str(tmp_path / "no" / "s.st")],
         "does not exist"),
        (["eval", str(model_dir), "--ppl", str(txt), "--sqnr-data", str(txt)], "pass it as --reference"),
        (["eval", str(model_dir), "--ppl", str(txt), "--max-windows", "0"], "max_windows (--max-windows) must be an integer >= 1"),
        (["eval", str(model_dir), "--ppl", str(txt), "--json", str(tmp_path / "no" / "r.json")], "does not exist"),
        (["calibrate", str(model_dir), "--data", str(txt), "--out", str(tmp_path / "no" / "s.st")], "does not exist"),
        (["bench", "--arch", "tiny-llama", "--layers", "0"], "layers (--layers) must be an integer >= 1"),
    ]
    if not torch.cuda.is_available():
        cases.append((["eval", str(model_dir), "--ppl", str(txt), "--device", "cuda"], "--device 'cuda' is not available"))
        cases.append((["quantize", str(model_dir), out, "--data", str(txt), "--calib-device", "cuda"],
                      "--calib-device 'cuda' is not available"))
    cases.append((["calibrate", str(model_dir), "--data", str(txt), "--out", str(tmp_path / "c.st"),
                   "--calib-device", "gpu"], "--calib-device must be"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)


def test_quantize_from_statistics_needs_no_data_and_patterns_are_checked_before_calibrating(
        model_dir, data_files, tmp_path, capsys, monkeypatch):
    txt, _ = data_files
    stats = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(model_dir), "--data", str(txt), "--out", str(stats), "--num-samples", "2",
                 "--seq-len", "32", "--no-progress"]) == 0
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(out), "--stats", str(stats), "--alpha", "0.7", "--no-progress"]) == 0
    assert isinstance(sq.load_quantized(out).model.layers[0].self_attn.q_proj, sq.W8A8Linear)
    capsys.readouterr()

    import sq_kernels.api as api

    def no_calibration(*a, **k):
        raise AssertionError("calibrated although no module would be converted")
    monkeypatch.setattr(api, "collect_act_stats", no_calibration)
    with pytest.warns(UserWarning, match="include pattern 'nomatch\\*' matches no module"):
        assert main(["quantize", str(model_dir), str(tmp_path / "q2"), "--data", str(txt), "--include", "nomatch*",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no module would be converted" in err and "include / exclude" in err


def test_info_json_is_only_json_and_bench_on_cpu_says_what_it_measures(model_dir, data_files, tmp_path, capsys):
    txt, _ = data_files
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(out), "--data", str(txt), "--num-samples", "2", "--seq-len", "32",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["architecture"] == "LlamaForCausalLM" and meta["modules"]
    assert main(["bench", "--arch", "tiny-llama", "--layers", "1", "--prompt", "8", "--warmup", "0", "--iters", "1",
                 "--device", "cpu", "--dtype", "float32", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "say nothing about the CUDA kernels" in printed and "KiB" in printed


def test_output_files_are_never_replaced_without_overwrite(model_dir, data_files, tmp_path, capsys):
    txt, _ = data_files
    original = txt.read_text()
    args = ["--data", str(txt), "--num-samples", "2", "--seq-len", "32", "--no-progress"]
    for overwrite in ([], ["--overwrite"]):  # a mistyped --out: the data file, replaced by nothing
        assert main(["calibrate", str(model_dir), *args, "--out", str(txt), *overwrite]) == 2
        assert "is the --data file: it would be overwritten" in capsys.readouterr().err and txt.read_text() == original
    stats = tmp_path / "s.safetensors"
    assert main(["calibrate", str(model_dir), *args, "--out", str(stats)]) == 0
    assert main(["calibrate", str(model_dir), *args, "--out", str(stats), "--overwrite"]) == 0

    # --overwrite replaces an earlier quantized checkpoint, never a directory holding a model's weights
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(out), *args, "--alpha", "0.5"]) == 0
    assert (out / "sq_smoothing_report.json").is_file()
    assert main(["quantize", str(model_dir), str(out), *args, "--no-smooth", "--overwrite"]) == 0
    assert not (out / "sq_smoothing_report.json").exists(), "a stale smoothing report was left beside the new model"
    capsys.readouterr()
    fp_copy = tmp_path / "fp-copy"
    make_model("llama").save_pretrained(fp_copy)
    assert main(["quantize", str(model_dir), str(fp_copy), *args, "--overwrite"]) == 2
    assert "holds a model's weights" in capsys.readouterr().err


def test_warnings_are_one_line_messages(model_dir, data_files, tmp_path):
    # a real process: pytest records warnings itself, and the point is what a user's terminal shows
    from pathlib import Path
    txt, _ = data_files
    proc = subprocess.run([sys.executable, "-m", "sq_kernels.cli", "quantize", str(model_dir), str(tmp_path / "q"),
                           "--data", str(txt), "--num-samples", "2", "--seq-len", "32", "--exclude", "model.layer.0.*",
                           "--no-progress"], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stderr.splitlines() if "matches no module" in x)
    assert line.startswith("sq-kernels quantize: warning: exclude pattern 'model.layer.0.*'")
    assert ".py:" not in proc.stderr, proc.stderr


def test_info_verify_catches_a_damaged_checkpoint(model_dir, data_files, tmp_path, capsys):
    txt, _ = data_files
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(out), "--data", str(txt), "--num-samples", "2", "--seq-len", "32",
                 "--no-progress"]) == 0
    assert main(["info", str(out), "--verify"]) == 0 and "verified" in capsys.readouterr().out
    meta = json.loads((out / "sq_quantization.json").read_text())
    meta["quantization"] = "edited by hand"  # descriptive field only: info must still describe the checkpoint
    (out / "sq_quantization.json").write_text(json.dumps(meta))
    assert main(["info", str(out)]) == 0
    weights = out / "sq_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(["info", str(out)]) == 0  # without --verify only the table is read
    assert main(["info", str(out), "--verify"]) == 2
    assert "sq_model.safetensors" in capsys.readouterr().err


def test_text_field_selects_the_json_key(model_dir, tmp_path, capsys):
    data = tmp_path / "pile.jsonl"
    data.write_text("\n".join(json.dumps({"content": s.strip() + ".", "id": i})
                              for i, s in enumerate(TEXT.split(".")[:6]) if s.strip()))
    out, stats = tmp_path / "q", tmp_path / "stats.safetensors"
    args = ["--num-samples", "2", "--seq-len", "32", "--no-progress"]
    import sq_kernels.cli as cli
    loaded = []
    real_load = cli._load_model
    cli._load_model = lambda *a: loaded.append(a) or real_load(*a)
    try:
        assert main(["quantize", str(model_dir), str(out), "--data", str(data)] + args) == 2
    finally:
        cli._load_model = real_load
    assert "--text-field" in capsys.readouterr().err  # the error says how to choose the key
    assert not loaded  # ... before any model was loaded
    assert main(["calibrate", str(model_dir), "--data", str(data), "--text-field", "content", "--out", str(stats)]
                + args) == 0
    assert main(["quantize", str(model_dir), str(out), "--data", str(data), "--text-field", "content"] + args) == 0
    assert main(["eval", str(out), "--lambada", str(data), "--ppl", str(data), "--text-field", "content",
                 "--seq-len", "64", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "model_last_word_accuracy" in printed and "model_perplexity" in printed
    txt = tmp_path / "plain.txt"
    txt.write_text(TEXT)
    assert main(["calibrate", str(model_dir), "--data", str(txt), "--text-field", "content", "--out",
                 str(tmp_path / "s2.safetensors")] + args) == 2
    assert "--text-field content applies to .jsonl / .json files" in capsys.readouterr().err
    assert main(["eval", str(out), "--ppl", str(txt), "--text-field", "content", "--no-progress"]) == 2
    assert "none of --ppl, --lambada, --sqnr-data is one" in capsys.readouterr().err


def test_cli_speaks_in_flags_and_handles_interrupts_and_damaged_files(model_dir, data_files, tmp_path, capsys,
                                                                     monkeypatch):
    txt, jsonl = data_files
    q = tmp_path / "q"
    args = ["--num-samples", "2", "--seq-len", "32", "--no-progress"]
    assert main(["quantize", str(model_dir), str(q), "--data", str(txt)] + args) == 0
    capsys.readouterr()
    assert main(["eval", str(q), "--lambada", str(txt), "--no-progress"]) == 2  # a .txt given as --lambada
    assert "is not a .jsonl / .json file: last-word accuracy scores one text per record" in capsys.readouterr().err

    bare = tmp_path / "bare"  # a model directory without a tokenizer, data with an unusual suffix
    make_model("llama").save_pretrained(bare)
    csv = tmp_path / "calib.csv"
    csv.write_text(TEXT)
    assert main(["calibrate", str(bare), "--data", str(csv), "--out", str(tmp_path / "s.safetensors")] + args) == 2
    err = capsys.readouterr().err
    assert "pass --tokenizer DIR" in err and "tokenizer=" not in err

    opt = tmp_path / "opt350"  # post-LN OPT cannot be smoothed: the CLI names its own flag
    make_model("opt", do_layer_norm_before=False).save_pretrained(opt)
    assert main(["quantize", str(opt), str(tmp_path / "o"), "--data", str(txt), "--tokenizer", str(model_dir)]
                + args) == 2
    err = capsys.readouterr().err
    assert "--no-smooth" in err and "smooth=False" not in err

    import sq_kernels.api as api

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(api, "collect_act_stats", interrupted)
    assert main(["quantize", str(model_dir), str(tmp_path / "i"), "--data", str(txt)] + args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("sq-kernels quantize: interrupted before it "
                                                                "finished; its outputs are absent or incomplete")
    assert not (tmp_path / "i" / "sq_quantization.json").exists()

    broken = tmp_path / "broken"
    make_model("llama").save_pretrained(broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert main(["calibrate", str(broken), "--data", str(txt), "--tokenizer", str(model_dir), "--out",
                 str(tmp_path / "b.safetensors")] + args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("sq-kernels calibrate: error: a weights file is corrupt")


def test_python_dash_m_runs_the_cli():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "sq_kernels", "--version"], capture_output=True, text=True,
                         cwd=root, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("sq-kernels ")


def test_export_then_eval_the_compressed_tensors_directory(model_dir, data_files, tmp_path, capsys):
    txt, _ = data_files
    q, ct = tmp_path / "q", tmp_path / "ct"
    assert main(["quantize", str(model_dir), str(q), "--data", str(txt), "--num-samples", "2", "--seq-len", "32",
                 "--no-progress"]) == 0
    assert main(["export", str(q), str(ct)]) == 0
    assert "vllm serve" in capsys.readouterr().out
    assert (ct / "tokenizer.json").is_file() and (ct / "model.safetensors").is_file()
    assert json.loads((ct / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    results = {}
    for d in (q, ct):  # the export runs on the same W8A8 modules: the same perplexity
        out = tmp_path / f"{d.name}.json"
        assert main(["eval", str(d), "--ppl", str(txt), "--seq-len", "64", "--no-progress", "--json", str(out)]) == 0
        results[d.name] = json.loads(out.read_text())["model_perplexity"]
    assert results["q"] == results["ct"]
    assert main(["export", str(q), str(ct)]) == 2  # never into a directory that is not empty
    assert "not empty" in capsys.readouterr().err


def test_quantize_and_export_in_shards(model_dir, data_files, tmp_path, capsys):
    txt, _ = data_files
    out = tmp_path / "sharded"
    common = ["--data", str(txt), "--num-samples", "2", "--seq-len", "32", "--no-progress"]
    assert main(["quantize", str(model_dir), str(tmp_path / "bad"), *common, "--max-shard-size", "5 parsecs"]) == 2
    assert "--max-shard-size must be" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["quantize", str(model_dir), str(out), *common, "--max-shard-size", "40KB"]) == 0
    shards = sorted(p.name for p in out.glob("sq_model-*-of-*.safetensors"))
    assert len(shards) > 1
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert f"weights: {shards[0]} and {len(shards) - 1} more shard(s)" in capsys.readouterr().out
    assert main(["export", str(out), str(tmp_path / "ct"), "--max-shard-size", "40KB"]) == 0
    assert (tmp_path / "ct" / "model.safetensors.index.json").is_file()
    x = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        a = sq.load_quantized(out)(x).logits
        from sq_kernels.export import load_compressed_tensors
        b = load_compressed_tensors(tmp_path / "ct")(x).logits
    assert torch.equal(a, b)


def test_quantize_lm_head_on_request(model_dir, data_files, tmp_path, capsys):
    txt, _ = data_files
    common = ["--data", str(txt), "--num-samples", "2", "--seq-len", "32", "--no-progress"]
    assert main(["quantize", str(model_dir), str(tmp_path / "a"), *common]) == 0
    assert "kept lm_head" in capsys.readouterr().out
    assert main(["quantize", str(model_dir), str(tmp_path / "b"), *common, "--quantize-lm-head",
                 "--exclude", "*.down_proj"]) == 0
    printed = capsys.readouterr().out
    assert "kept lm_head" not in printed and "kept model.layers.0.mlp.down_proj" in printed
    model = sq.load_quantized(tmp_path / "b")
    assert isinstance(model.lm_head, sq.W8A8Linear) and isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert main(["export", str(tmp_path / "b"), str(tmp_path / "ct")]) == 2
    assert "lm_head" in capsys.readouterr().err
