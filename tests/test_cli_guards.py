"""The command line under a reviewer's mistakes: outputs that would land on inputs, weights that do not match
their config, options that would be ignored, and inputs that used to fail only after the model had loaded."""
import json

import pytest

import sq_kernels.cli as cli
from sq_kernels.cli import main

from conftest import TEXT

pytestmark = pytest.mark.usefixtures("one_thread")
Q = ["--num-samples", "2", "--seq-len", "32", "--no-progress"]


@pytest.fixture
def quantized_dir(model_dir, text_file, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(out), "--data", str(text_file), *Q]) == 0
    return out


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the error must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")
    monkeypatch.setattr(cli, "_load_model", refuse)


def _err(capsys):
    return capsys.readouterr().err


def test_outputs_never_land_on_inputs(model_dir, text_file, tmp_path, capsys, no_model_load):
    weights = (model_dir / "model.safetensors").read_bytes()
    runs = [
        (["quantize", str(model_dir), str(tmp_path / "o1"), "--data", str(text_file), "--save-stats",
          str(model_dir / "model.safetensors"), "--overwrite"], "--save-stats .* is inside MODEL"),
        (["quantize", str(model_dir), str(tmp_path / "o2"), "--data", str(text_file), "--plot",
          str(model_dir / "smooth.png")], "--plot .* is inside MODEL"),
        (["quantize", str(model_dir), str(tmp_path / "o3"), "--data", str(text_file), "--save-stats", str(text_file),
          "--overwrite"], "--save-stats .* is the --data file"),
        (["quantize", str(model_dir), str(tmp_path / "o4"), "--data", str(text_file), "--save-stats",
          str(tmp_path / "o4" / "s.safetensors")], "--save-stats .* is inside OUT"),
        (["calibrate", str(model_dir), "--data", str(text_file), "--out", str(model_dir / "s.safetensors")],
         "--out .* is inside MODEL"),
        (["eval", str(model_dir), "--ppl", str(text_file), "--json", str(text_file), "--overwrite"], "--json .* is the --ppl file"),
        (["eval", str(model_dir), "--ppl", str(text_file), "--json", str(model_dir / "r.json")], "--json .* inside MODEL"),
    ]
    for argv, message in runs:
        assert main(argv + (Q if argv[0] != "eval" else ["--no-progress"])) == 2, argv
        err = _err(capsys)
        assert __import__("re").search(message, err), (argv, err)
    assert (model_dir / "model.safetensors").read_bytes() == weights and text_file.read_text(encoding="utf-8") == TEXT
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
        + [p.name for p in model_dir.iterdir() if p.name.startswith("special_tokens")])


def test_two_outputs_with_one_path_are_refused(quantized_dir, model_dir, text_file, tmp_path, capsys):
    same = tmp_path / "r.svg"
    rc = main(["eval", str(quantized_dir), "--reference", str(model_dir), "--sqnr-data", str(text_file), "--json", str(same),
               "--plot", str(same), *Q[2:]])
    assert rc == 2 and "--json and --plot name the same file" in _err(capsys) and not same.exists()


def test_weights_that_do_not_match_the_config_are_refused(model_dir, text_file, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "renamed"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(broken / "model.safetensors"))
    save_file({"base." + k: v for k, v in state.items()}, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for argv in (["quantize", str(broken), str(tmp_path / "out"), "--data", str(text_file), *Q],
                 ["eval", str(broken), "--ppl", str(text_file), "--seq-len", "32", "--no-progress"]):
        assert main(argv) == 2
        assert "weight(s) of LlamaForCausalLM are missing from the checkpoint" in _err(capsys)
    assert not (tmp_path / "out").exists()


def test_info_json_verify_verifies(quantized_dir, capsys):
    weights = quantized_dir / "sq_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["info", str(quantized_dir), "--json", "--verify"]) == 2
    captured = capsys.readouterr()
    assert "SHA-256 differs" in captured.err and captured.out == ""
    assert main(["info", str(quantized_dir), "--json"]) == 0  # without --verify: the JSON, unchecked
    assert json.loads(capsys.readouterr().out)["format"] == "sq_kernels.w8a8"


@pytest.mark.parametrize("make,message", [
    (lambda p: None, "(--data|--ppl) .*missing.txt: no such file"),
    (lambda p: p.mkdir(), "is not a file"),
    (lambda p: p.write_text(""), "holds no text \\(it is empty\\)"),
    (lambda p: p.write_text("  \n\n \t\n"), "holds no text"),
    (lambda p: p.write_bytes("caf\xe9 au lait, ".encode("latin-1") * 20), "is not UTF-8 text"),
])
def test_bad_data_files_fail_before_the_model_loads(model_dir, tmp_path, capsys, no_model_load, make, message):
    data = tmp_path / "missing.txt"
    make(data)
    for argv in (["quantize", str(model_dir), str(tmp_path / "out"), "--data", str(data)],
                 ["calibrate", str(model_dir), "--data", str(data), "--out", str(tmp_path / "s.safetensors")],
                 ["eval", str(model_dir), "--ppl", str(data)]):
        assert main(argv + ["--no-progress"]) == 2
        err = _err(capsys)
        assert __import__("re").search(message, err), (argv, err)


@pytest.mark.parametrize("extra,message", [
    (["--num-samples", "0"], "(--num-samples) must be"),
    (["--seq-len", "-5"], "(--seq-len) must be"),
    (["--batch-size", "0"], "(--batch-size) must be"),
    (["--tokenizer", "nope"], "--tokenizer nope: no such directory"),
])
def test_calibrate_checks_its_numbers_and_tokenizer_first(model_dir, text_file, tmp_path, capsys, no_model_load, extra,
                                                          message):
    assert main(["calibrate", str(model_dir), "--data", str(text_file), "--out", str(tmp_path / "s.safetensors"),
                 "--no-progress", *extra]) == 2
    assert message in _err(capsys)


@pytest.mark.parametrize("extra,message", [
    (["--no-smooth", "--alpha", "0.5"], "--alpha sets how to smooth, and --no-smooth smooths nothing"),
    (["--no-smooth", "--fold-linear-pairs"], "--fold-linear-pairs sets how to smooth"),
    (["--quantize-lm-head", "--exclude", "lm_head"], "--quantize-lm-head and --exclude lm_head contradict"),
    (["--text-field", ""], "--text-field must name a JSON key"),
    (["--num-samples", "0"], "--num-samples must be"),
    (["--alpha", "1.5"], "--alpha must lie in \\[0, 1\\]"),
])
def test_quantize_refuses_options_that_would_do_nothing(model_dir, text_file, tmp_path, capsys, no_model_load, extra,
                                                        message):
    assert main(["quantize", str(model_dir), str(tmp_path / "out"), "--data", str(text_file), "--no-progress", *extra]) == 2
    err = _err(capsys)
    assert __import__("re").search(message, err), err


def test_quantized_models_where_a_floating_point_one_is_needed(quantized_dir, model_dir, text_file, tmp_path, capsys,
                                                               no_model_load):
    cases = [
        (["quantize", str(quantized_dir), str(tmp_path / "qq"), "--data", str(text_file)], "MODEL .* is an sq_kernels "
                                                                                      "quantized checkpoint"),
        (["calibrate", str(quantized_dir), "--data", str(text_file), "--out", str(tmp_path / "s.safetensors")],
         "calibration needs the floating-point model"),
        (["eval", str(quantized_dir), "--reference", str(quantized_dir), "--ppl", str(text_file)],
         "--reference .* is an sq_kernels quantized checkpoint"),
        (["eval", str(model_dir), "--reference", str(model_dir), "--sqnr-data", str(text_file)],
         "MODEL .* is not a quantized checkpoint"),
        (["export", str(quantized_dir), str(quantized_dir / "ct")], "is \\(inside\\) the checkpoint"),
        (["info", str(tmp_path / "nope")], "nope: no such directory"),
        (["info", str(model_dir)], "Quantize it with sq-kernels quantize"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = _err(capsys)
        assert __import__("re").search(message, err), (argv, err)
    assert not (quantized_dir / "ct").exists()


def test_stats_with_data_warns_that_data_is_unused_and_an_explicit_tokenizer_is_required(model_dir, text_file, tmp_path,
                                                                                         capsys):
    stats = tmp_path / "s.safetensors"
    assert main(["calibrate", str(model_dir), "--data", str(text_file), "--out", str(stats), *Q]) == 0
    with pytest.warns(UserWarning, match="--data not used: with --stats"):
        assert main(["quantize", str(model_dir), str(tmp_path / "a"), "--stats", str(stats), "--data", str(text_file),
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(model_dir), str(tmp_path / "b"), "--stats", str(stats), "--tokenizer",
                 str(tmp_path / "nope"), "--no-progress"]) == 2
    assert "--tokenizer" in _err(capsys) and not (tmp_path / "b").exists()
    assert main(["quantize", str(model_dir), str(tmp_path / "c"), "--stats", str(stats), "--no-progress"]) == 0
    assert (tmp_path / "c" / "tokenizer.json").is_file()  # the model's own tokenizer travels with the checkpoint


@pytest.mark.parametrize("extra,message", [(["--alpha", "2"], "--alpha must lie in"),
                                           (["--prompt", "5000"], "--prompt 5000 exceeds the 4096 positions")])
def test_bench_checks_before_building_the_model(capsys, monkeypatch, extra, message):
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("built before the checks")))
    assert main(["bench", "--arch", "tiny-llama", "--device", "cpu", *extra]) == 2
    assert message in _err(capsys)
