"""Calibration: the running abs-max observer, every data form, statistics files, and the guards."""
import json
import warnings

import pytest
import torch
from torch import nn

from sq_kernels.calibration import (ActStats, RunningAbsMax, calibration_batches, calibration_samples,
                                    collect_act_stats)

from conftest import TEXT, VOCAB, calib_tokens, char_tokenizer, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_running_absmax_is_exact_and_o_features():
    obs = RunningAbsMax()
    chunks = [torch.randn(3, 5, 16) * (i + 1) for i in range(4)]
    for c in chunks:
        obs.update(c)
    everything = torch.cat([c.reshape(-1, 16) for c in chunks])
    assert torch.equal(obs.amax, everything.abs().amax(0))
    assert obs.amax.shape == (16,) and obs.tokens == 60
    obs.update(torch.empty(0, 16))
    assert obs.tokens == 60
    with pytest.raises(ValueError, match="width changed"):
        obs.update(torch.randn(2, 8))


def _brute_force_inputs(model, batches, names):
    """Record every input row of the named modules (O(tokens) memory: the thing the observer avoids)."""
    seen = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for n in names]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).abs().amax(0) for n, v in seen.items()}


def test_stats_equal_brute_force_maxima():
    model = make_model("llama")
    batches = calibration_batches(calib_tokens(6, 24), batch_size=2)
    stats = collect_act_stats(model, batches, progress=False)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert set(linears) <= set(stats.names())
    brute = _brute_force_inputs(model, batches, linears)
    for n in linears:
        assert torch.equal(stats[n], brute[n]), n
        assert stats.tokens[n] == 6 * 24
    assert stats.meta["num_tokens"] == 6 * 24 and stats.meta["model_type"] == "llama"
    # the planted outlier channels of the input norm show up in q_proj's input statistics
    q_in = stats["model.layers.0.self_attn.q_proj"]
    assert q_in[[3, 17, 42]].min() > 5 * q_in.median()


def test_mixtral_router_and_per_expert_statistics():
    model = make_model("mixtral")
    stats = collect_act_stats(model, calib_tokens(), progress=False)
    router, experts = "model.layers.0.mlp.gate", "model.layers.0.mlp.experts"
    assert torch.equal(stats[router], stats[experts])  # both see the post-attention norm's output
    down = stats[experts + "::down_proj"]
    assert down.shape == (4, 64)
    assert (down.amax(-1) > 0).all()  # 8 x 32 tokens with top-2 of 4 experts: every expert is hit
    assert stats.expert_down_absmax(experts).shape == (4,)
    assert "forward" not in vars(model.model.layers[0].mlp.experts)  # the calibration patch was removed


def test_data_forms(tokenizer, text_file, tmp_path):
    ids = torch.arange(100) % VOCAB
    with pytest.warns(UserWarning, match="gave 3 samples x 30 tokens"):
        assert [s.numel() for s in calibration_samples(ids, seq_len=30, num_samples=10)] == [30, 30, 30]
    assert len(calibration_samples(calib_tokens(5, 12), num_samples=3)) == 3
    assert calibration_samples([[1, 2, 3], torch.tensor([4, 5])])[1].tolist() == [4, 5]
    texts = calibration_samples(["hello world", "abc"], tokenizer)
    assert texts[1].tolist() == tokenizer("abc")["input_ids"]
    assert calibration_samples(["hello"], lambda s: [ord(c) % VOCAB for c in s])[0].numel() == 5  # any callable
    chunks = calibration_samples(text_file, tokenizer, num_samples=4, seq_len=64)
    assert len(chunks) == 4 and all(c.numel() == 64 for c in chunks)
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["one two", "three four five"]) + "\n")
    assert len(calibration_samples(jsonl, tokenizer, num_samples=2)) == 2
    five, seven = torch.ones(5, dtype=torch.long), torch.ones(7, dtype=torch.long)
    batches = calibration_batches([five] * 3 + [seven], batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 5), (1, 5), (1, 7)]  # equal lengths batched, no padding


def test_read_texts_chooses_the_field(tmp_path):
    from sq_kernels.calibration import read_texts
    jsonl, js = tmp_path / "pile.jsonl", tmp_path / "pile.json"
    records = [{"content": "alpha beta", "meta": {"src": "x"}}, {"content": "gamma", "id": 7}, "delta epsilon"]
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    js.write_text(json.dumps(records))
    for path in (jsonl, js):
        assert read_texts(path, field="content") == ["alpha beta", "gamma", "delta epsilon"]
        with pytest.raises(ValueError, match=r"string field 'text'; its string fields are \['content'\]: choose the "
                                             r"field with read_texts\(path, field=...\) or the CLI's --text-field"):
            read_texts(path)
    (tmp_path / "nums.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match=r"it has no string field \(keys: \['a'\]\)"):
        read_texts(tmp_path / "nums.jsonl")
    with pytest.raises(ValueError, match="field must be a non-empty string"):
        read_texts(jsonl, field="")
    with pytest.raises(ValueError, match="reads .jsonl / .json files"):
        read_texts(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="is not a file"):
        read_texts(tmp_path / "missing.jsonl")


def test_data_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        calibration_samples(["some text"])
    with pytest.raises(ValueError, match="is not a file"):
        calibration_samples(str(tmp_path / "missing.txt"), tokenizer)
    with pytest.raises(ValueError, match="integer tensor"):
        calibration_samples(torch.randn(4, 8))
    with pytest.raises(ValueError, match="no calibration samples"):
        calibration_samples([])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        calibration_samples(bad, tokenizer)
    with pytest.raises(ValueError, match="unsupported type"):
        calibration_samples(3.5)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 128\)"):
        collect_act_stats(make_model("llama"), torch.full((1, 8), 500), progress=False)


def test_text_calibration_with_progress_bar(tokenizer, text_file, capsys):
    stats = collect_act_stats(make_model("opt"), text_file, tokenizer, num_samples=3, seq_len=64, progress=True)
    assert stats.meta["num_samples"] == 3
    assert "calibrating" in capsys.readouterr().err


def test_save_and_load_round_trip(tmp_path):
    stats = collect_act_stats(make_model("mixtral"), calib_tokens(), progress=False)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = ActStats.load(path)
    assert loaded.names() == stats.names()
    for n in stats.names():
        assert torch.equal(loaded[n], stats[n])
    assert loaded.tokens == stats.tokens and loaded.meta == stats.meta


def test_load_rejects_foreign_or_damaged_files(tmp_path):
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.ones(3)}, str(foreign), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not an sq_kernels statistics file"):
        ActStats.load(foreign)
    newer = tmp_path / "newer.safetensors"
    save_file({"x": torch.ones(3)}, str(newer), metadata={"format": "sq_kernels.act_stats", "version": "99"})
    with pytest.raises(ValueError, match="version 99"):
        ActStats.load(newer)
    damaged = tmp_path / "damaged.safetensors"
    ActStats({"x": torch.ones(3)}).save(damaged)
    damaged.write_bytes(damaged.read_bytes()[:20])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ActStats.load(damaged)
    with pytest.raises(ValueError, match="does not exist"):
        ActStats.load(tmp_path / "nope.safetensors")
    nan_file = tmp_path / "nan.safetensors"
    save_file({"x": torch.tensor([1.0, float("nan")])}, str(nan_file),
              metadata={"format": "sq_kernels.act_stats", "version": "1"})
    with pytest.raises(ValueError, match="non-finite"):
        ActStats.load(nan_file)


def test_non_finite_statistics_rejected():
    with pytest.raises(ValueError, match=r"non-finite activation statistics .* \['a'\]"):
        ActStats({"a": torch.tensor([1.0, float("inf")]), "b": torch.ones(2)})
    with pytest.raises(ValueError, match="negative"):
        ActStats({"a": torch.tensor([-1.0])})
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = float("inf")  # an overflowing model
    with pytest.raises(ValueError, match="non-finite activation statistics"):
        collect_act_stats(model, calib_tokens(), progress=False)


def test_missing_module_statistics_name_the_module():
    stats = ActStats({"a": torch.ones(4)})
    with pytest.raises(ValueError, match="no calibration statistics for module 'b'"):
        stats["b"]


def test_scaled_statistics():
    stats = ActStats({"a": torch.tensor([2.0, 4.0]), "b": torch.ones(2)})
    out = stats.scaled({"a": torch.tensor([2.0, 0.5])})
    assert out["a"].tolist() == [1.0, 8.0] and torch.equal(out["b"], stats["b"])
    assert out.per_tensor_absmax("a") == 8.0


# --------------------------------------------------------------------- audit fixes: limits, data forms

def _count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def test_seq_len_beyond_learned_positions_is_a_clear_error(tokenizer, text_file):
    # OPT's learned position table has max_position_embeddings + 2 rows (offset 2): exactly 128 positions fit
    model = make_model("opt")
    calls = _count_forwards(model)
    with pytest.raises(ValueError, match=r"seq_len.* 129 tokens exceed the model's max_position_embeddings \(128\)"
                                         r".*--seq-len 128"):
        collect_act_stats(model, text_file, tokenizer, num_samples=2, seq_len=129, progress=False)
    with pytest.raises(ValueError, match=r"200 tokens exceed the model's max_position_embeddings \(128\)"):
        collect_act_stats(model, calib_tokens(2, 200), progress=False)  # default seq_len 512 keeps 200-token rows
    assert not calls  # refused before any forward
    stats = collect_act_stats(model, text_file, tokenizer, num_samples=2, seq_len=128, progress=False)
    assert stats.meta["num_tokens"] == 256


def test_seq_len_beyond_rotary_context_only_warns():
    model = make_model("llama")  # rotary positions, max_position_embeddings=128: longer inputs still run
    with pytest.warns(UserWarning, match=r"160 tokens are longer than the model's max_position_embeddings \(128\)"):
        stats = collect_act_stats(model, calib_tokens(1, 160), progress=False)
    assert stats.meta["num_tokens"] == 160
    bloom = make_model("bloom")  # ALiBi, no position limit in its config: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collect_act_stats(bloom, calib_tokens(1, 160), progress=False)


@pytest.mark.parametrize("kwargs,name", [(dict(seq_len=0), "seq_len"), (dict(seq_len=-4), "seq_len"),
                                         (dict(num_samples=0), "num_samples"), (dict(num_samples=-1), "num_samples"),
                                         (dict(num_samples=2.5), "num_samples"), (dict(seq_len=True), "seq_len"),
                                         (dict(batch_size=0), "batch_size"), (dict(batch_size=-2), "batch_size")])
def test_numeric_parameters_are_checked(kwargs, name):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ValueError, match=rf"{name} \({flag}\) must be an integer >= 1"):
        calibration_batches(torch.arange(100) % VOCAB, **kwargs)
    with pytest.raises(ValueError, match=rf"{name} \({flag}\)"):
        collect_act_stats(make_model("llama"), calib_tokens(2, 8), progress=False, **kwargs)


def test_too_little_calibration_data_warns(tokenizer, tmp_path, text_file):
    short = tmp_path / "short.txt"
    short.write_text("hello world", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"gave 1 sample x 11 tokens \(11 tokens in all\); asked for "
                                         r"num_samples=128 x seq_len=512"):
        stats = collect_act_stats(make_model("llama"), short, tokenizer, progress=False)
    assert stats.meta["num_samples"] == 1 and stats.meta["num_tokens"] == 11  # the count, programmatically
    full = len(TEXT) // 64  # one token per character
    with pytest.warns(UserWarning, match=rf"gave {full} samples x 64 tokens \({full * 64} tokens in all\); asked "
                                         rf"for num_samples=50 x seq_len=64"):
        assert len(calibration_samples(text_file, tokenizer, num_samples=50, seq_len=64)) == full
    jsonl = tmp_path / "two.jsonl"
    jsonl.write_text('{"text": "one two"}\n{"text": "three"}\n')
    with pytest.warns(UserWarning, match=r"gave 2 samples .*asked for num_samples=5"):
        calibration_samples(jsonl, tokenizer, num_samples=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough data, or samples the caller chose: no warning
        assert len(calibration_samples(text_file, tokenizer, num_samples=4, seq_len=64)) == 4
        calibration_samples(calib_tokens(3, 8), num_samples=128, seq_len=512)
        calibration_samples(jsonl, tokenizer, num_samples=2)


def test_tokenizer_output_is_accepted(tokenizer):
    text = "the quick brown fox jumps over the lazy dog"
    ids = tokenizer(text)["input_ids"]
    enc = tokenizer(text, return_tensors="pt")  # a BatchEncoding (a UserDict, not a dict)
    with pytest.warns(UserWarning, match=r"one tokenized text\) gave 2 samples x 16 tokens"):  # 4 x 16 asked for
        chunks = calibration_samples(enc, num_samples=4, seq_len=16)  # one text: cut like a token stream
    assert [s.tolist() for s in chunks] == [ids[:16], ids[16:32]]
    samples = calibration_samples([tokenizer("abc", return_tensors="pt"), tokenizer("de")])
    assert [s.tolist() for s in samples] == [tokenizer("abc")["input_ids"], tokenizer("de")["input_ids"]]
    tokenizer_pad = char_tokenizer()
    tokenizer_pad.pad_token = "<unk>"
    padded = tokenizer_pad(["abcd", "ef"], padding=True, return_tensors="pt")
    assert padded["input_ids"].shape == (2, 4)
    samples = calibration_samples(padded)  # padding removed using the attention mask
    assert [s.tolist() for s in samples] == [tokenizer("abcd")["input_ids"], tokenizer("ef")["input_ids"]]
    stats = collect_act_stats(make_model("llama"), [enc], progress=False)
    assert stats.meta["num_tokens"] == len(ids)
    with pytest.raises(ValueError, match="must hold 'input_ids'"):
        calibration_samples({"attention_mask": [1, 1]})


def test_json_array_file(tokenizer, tmp_path):
    texts = ["one two", "three four five"]
    for payload in (texts, [{"text": t} for t in texts]):
        path = tmp_path / "calib.json"
        path.write_text(json.dumps(payload))
        samples = calibration_samples(path, tokenizer, num_samples=2)
        assert [s.tolist() for s in samples] == [tokenizer(t)["input_ids"] for t in texts]
    lines = tmp_path / "lines.json"  # JSON Lines saved as .json
    lines.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    assert len(calibration_samples(lines, tokenizer, num_samples=2)) == 2
    for bad, message in (([1, 2, 3], "JSON array of strings or of objects with a string field 'text'"),
                         ({"data": texts}, "JSON array of strings or of objects with a string field 'text'"),
                         ([{"content": "x"}], r"its string fields are \['content'\]: choose the field")):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            calibration_samples(path, tokenizer)
    broken = tmp_path / "broken.json"
    broken.write_text('["unterminated')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        calibration_samples(broken, tokenizer)


def test_long_text_file_tokenizes_without_transformers_length_warning(text_file):
    import logging
    tok = char_tokenizer()
    tok.model_max_length = 16  # the file is far longer: transformers would warn about "indexing errors"
    expected = tok(text_file.read_text(encoding="utf-8"), verbose=False)["input_ids"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")  # transformers' loggers propagate up to this one
    logger.addHandler(handler)
    try:
        samples = calibration_samples(text_file, tok, num_samples=4, seq_len=64)
    finally:
        logger.removeHandler(handler)
    assert torch.cat(samples).tolist() == expected[:256]  # the same token ids
    assert not [r for r in records if "longer than the specified maximum" in r.getMessage()]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, suffix):
    from sq_kernels.calibration import calibration_samples
    bad = tmp_path / f"latin1{suffix}"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=f"latin1\\{suffix} is not UTF-8 text"):
        calibration_samples(str(bad), lambda s: list(s.encode()), 2, 8)


def test_batch_size_that_cannot_be_filled_is_warned_about(tokenizer):
    texts = [" ".join(["word"] * (3 + i)) for i in range(12)]  # every text a different length
    with pytest.warns(UserWarning, match=r"batch_size=4: only consecutive samples of equal length are batched"):
        batches = calibration_batches(texts, tokenizer, num_samples=12, seq_len=512, batch_size=4)
    assert len(batches) == 12
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = calibration_batches(texts, tokenizer, num_samples=12, seq_len=3, batch_size=4)  # all cut to 3
    assert [b.shape[0] for b in batches] == [4, 4, 4]


def test_alpha_may_be_a_numpy_number():
    import numpy as np
    from sq_kernels import SmoothQuantConfig
    config = SmoothQuantConfig(alpha=np.float32(0.5)).validate()
    assert config.alpha == 0.5 and type(config.alpha) is float
    json.dumps(config.to_dict())


def test_records_generators_and_dataset_like_iterables(tokenizer):
    texts = ["one two three", "four five", "six seven eight nine"]
    want = [tokenizer(t)["input_ids"] for t in texts]
    records = [{"text": t, "id": i} for i, t in enumerate(texts)]
    assert [s.tolist() for s in calibration_samples(records, tokenizer, num_samples=3)] == want

    consumed = []

    def stream():  # an endless generator: only num_samples items are read
        i = 0
        while True:
            consumed.append(i)
            yield texts[i % 3]
            i += 1
    assert [s.tolist() for s in calibration_samples(stream(), tokenizer, num_samples=2)] == want[:2]
    assert len(consumed) <= 3

    class Rows:  # what a datasets.Dataset looks like to us: iterable, rows are dicts
        def __iter__(self):
            return iter(records)
    assert [s.tolist() for s in calibration_samples(Rows(), tokenizer, num_samples=3)] == want
    with pytest.raises(ValueError, match=r"data\[0\]: a dict must hold 'input_ids' .* or a string 'text'"):
        calibration_samples([{"content": "x"}], tokenizer)


def test_collect_act_stats_names_a_config_passed_as_tokenizer_and_records_the_real_length():
    from sq_kernels import SmoothQuantConfig
    model = make_model("llama")
    with pytest.raises(ValueError, match="the third argument is the tokenizer, got a SmoothQuantConfig"):
        collect_act_stats(model, calib_tokens(), SmoothQuantConfig())
    assert collect_act_stats(model, calib_tokens(4, 16), progress=False).meta["seq_len"] == 16


def test_a_list_of_texts_shorter_than_num_samples_is_warned_about(tokenizer):
    with pytest.warns(UserWarning, match=r"calibration data \(the given texts\) gave 2 samples"):
        calibration_samples(["one two", {"text": "three"}], tokenizer, num_samples=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration_samples(["one two", "three"], tokenizer, num_samples=2)
