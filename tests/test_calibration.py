"""Calibration: the running abs-max observer, every data form, statistics files, and the guards."""
import json

import pytest
import torch
from torch import nn

from sq_kernels.calibration import (ActStats, RunningAbsMax, calibration_batches, calibration_samples,
                                    collect_act_stats)

from conftest import VOCAB, calib_tokens, make_model

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
    assert len(calibration_samples(jsonl, tokenizer)) == 2
    five, seven = torch.ones(5, dtype=torch.long), torch.ones(7, dtype=torch.long)
    batches = calibration_batches([five] * 3 + [seven], batch_size=2)
    assert [tuple(b.shape) for b in batches] == [(2, 5), (1, 5), (1, 7)]  # equal lengths batched, no padding


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
