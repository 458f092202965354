"""Smoothing: the scale formula and its guards, neutrality on every family, statistics after smoothing,
refusals, atomicity, and the per-layer alpha search."""
import copy
import json

import pytest
import torch

import sq_kernels as sq
from sq_kernels.calibration import ActStats, collect_act_stats
from sq_kernels.families import UnsupportedModelError
from sq_kernels.smooth import smoothing_scale

from conftest import FAMILIES, calib_tokens, make_model
from conftest import logits as _logits

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return sq.SmoothQuantConfig(progress=False, **kw)


def _max_rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_scale_formula():
    act = torch.tensor([4.0, 1.0, 9.0])
    w = torch.tensor([1.0, 4.0, 0.25])
    s = smoothing_scale(act, w, 0.5)
    assert torch.allclose(s, act.sqrt() / w.sqrt())
    assert torch.allclose(smoothing_scale(act, w, 1.0), act)
    assert torch.allclose(smoothing_scale(act, w, 0.0), 1.0 / w)
    assert s.dtype == torch.float32


def test_scale_guards():
    w = torch.ones(3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        smoothing_scale(torch.ones(3), w, 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        smoothing_scale(torch.ones(3), w, -0.1)
    with pytest.raises(ValueError, match="NaN or Inf"):
        smoothing_scale(torch.tensor([1.0, float("nan"), 1.0]), w, 0.5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        smoothing_scale(torch.ones(3), torch.tensor([1.0, float("inf"), 1.0]), 0.5)
    # a channel that is zero everywhere gets s = 1 (not 0, not 1e5), at every alpha
    for alpha in (0.0, 0.5, 1.0):
        assert smoothing_scale(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), alpha)[0] == 1.0
    # a zero weight column is floored, so s stays finite
    s = smoothing_scale(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.isfinite(s).all() and (s > 0).all() and s[0] <= 1e5


def test_alpha_outside_range_rejected_by_config():
    for bad in (1.01, -0.5, "strong", True):
        with pytest.raises(ValueError, match="alpha"):
            sq.SmoothQuantConfig(alpha=bad)
    with pytest.raises(ValueError, match="alpha_grid"):
        sq.SmoothQuantConfig(alpha="auto", alpha_grid=(0.5, 1.2))


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_is_neutral(family):
    model = make_model(family)
    x = calib_tokens(3, 20, seed=5)
    ref = _logits(model, x)
    stats = collect_act_stats(model, calib_tokens(), progress=False)
    norms_before = {n: p.clone() for n, p in model.named_parameters() if "norm" in n or "ln" in n}
    report = sq.smooth_(model, stats, _cfg())
    assert _max_rel_diff(_logits(model, x), ref) < 1e-5, family
    changed = [n for n, p in model.named_parameters() if n in norms_before and not torch.equal(p, norms_before[n])]
    assert changed, "smoothing changed no norm"
    assert len(report.alphas) == 2 and len(set(report.alphas.values())) == 1


@pytest.mark.parametrize("family", ["opt", "llama", "mistral"])
def test_linear_pairs_are_neutral_too(family):
    model = make_model(family)
    x = calib_tokens(3, 20, seed=5)
    ref = _logits(model, x)
    stats = collect_act_stats(model, calib_tokens(), progress=False)
    report = sq.smooth_(model, stats, _cfg(fold_linear_pairs=True))
    assert _max_rel_diff(_logits(model, x), ref) < 1e-5
    sources = {g["source"] for g in report.groups}
    assert "mlp.up_proj" in sources or "fc1" in sources
    if family == "mistral":  # grouped-query attention: v -> o cannot be folded, and the report says so
        assert "self_attn.v_proj" not in sources
        assert any("grouped-query" in note for note in report.skipped)
    else:
        assert "self_attn.v_proj" in sources


def test_statistics_after_smoothing_match_a_new_calibration():
    model = make_model("llama")
    data = calib_tokens()
    stats = collect_act_stats(model, data, progress=False)
    report = sq.smooth_(model, stats, _cfg())
    observed = collect_act_stats(model, data, progress=False)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj"):
        assert torch.allclose(report.stats[name], observed[name], rtol=1e-4, atol=1e-6), name
    # the outliers moved into the weights: the smoothed input's largest channel is far closer to its median
    q = "model.layers.0.self_attn.q_proj"
    assert report.stats[q].max() / report.stats[q].median() < 0.3 * (stats[q].max() / stats[q].median())


def test_family_default_alpha_and_explicit_alpha():
    model = make_model("opt")
    stats = collect_act_stats(model, calib_tokens(), progress=False)
    assert set(sq.smooth_(copy.deepcopy(model), stats, _cfg()).alphas.values()) == {0.5}
    assert set(sq.smooth_(model, stats, _cfg(alpha=0.7)).alphas.values()) == {0.7}


def test_post_ln_models_are_refused():
    opt_post_ln = make_model("opt", outliers=False, do_layer_norm_before=False)
    stats = collect_act_stats(opt_post_ln, calib_tokens(), progress=False)
    with pytest.raises(ValueError, match="post-LN"):
        sq.smooth_(opt_post_ln, stats, _cfg())
    bloom = make_model("bloom", outliers=False, apply_residual_connection_post_layernorm=True)
    stats = collect_act_stats(bloom, calib_tokens(), progress=False)
    with pytest.raises(ValueError, match="residual"):
        sq.smooth_(bloom, stats, _cfg())


def test_unsupported_architecture_lists_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128))
    with pytest.raises(UnsupportedModelError) as info:
        sq.smooth_(gpt2, ActStats({"x": torch.ones(2)}), _cfg())
    for family in ("OPT", "Llama", "Mistral", "Mixtral", "BLOOM", "Falcon", "Qwen2"):
        assert family in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(UnsupportedModelError, match="Supported"):
        sq.smooth_(torch.nn.Linear(4, 4), ActStats({"x": torch.ones(2)}), _cfg())


def test_statistics_of_another_model_rejected():
    model = make_model("llama")
    other = collect_act_stats(make_model("opt"), calib_tokens(), progress=False)
    with pytest.raises(ValueError, match="no calibration statistics for module"):
        sq.smooth_(model, other, _cfg())
    wide = make_model("llama", outliers=False, hidden_size=96, intermediate_size=128)
    wrong_width = collect_act_stats(wide, calib_tokens(), progress=False)
    with pytest.raises(ValueError, match="different model"):
        sq.smooth_(model, wrong_width, _cfg())


def test_failed_checks_leave_the_model_unchanged():
    model = make_model("llama")
    stats = collect_act_stats(model, calib_tokens(), progress=False)
    broken = dict(stats.absmax)
    del broken["model.layers.1.mlp.up_proj"]  # the last layer's statistics are missing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj"):
        sq.smooth_(model, ActStats(broken), _cfg())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_smoothing_a_quantized_model_is_refused():
    model = make_model("llama")
    stats = collect_act_stats(model, calib_tokens(), progress=False)
    sq.quantize_(model, _cfg(smooth=False))
    with pytest.raises(ValueError, match="already quantized"):
        sq.smooth_(model, stats, _cfg())


def test_auto_alpha_search(tmp_path):
    model = make_model("llama")
    data = calib_tokens(4, 24)
    x = calib_tokens(3, 20, seed=5)
    ref = _logits(model, x)
    stats = collect_act_stats(model, data, progress=False)
    grid = (0.3, 0.5, 0.7, 0.9)
    with pytest.raises(ValueError, match="needs calibration data"):
        sq.smooth_(copy.deepcopy(model), stats, _cfg(alpha="auto", alpha_grid=grid))
    report = sq.smooth_(model, stats, _cfg(alpha="auto", alpha_grid=grid, alpha_search_batches=2), data=data)
    assert list(report.alphas) == ["model.layers.0", "model.layers.1"]
    for layer, alpha in report.alphas.items():
        losses = report.search[layer]
        assert set(losses) == {"0.3", "0.5", "0.7", "0.9"}
        assert alpha in grid and losses[f"{alpha:g}"] == min(losses.values())
    assert _max_rel_diff(_logits(model, x), ref) < 1e-5  # still neutral
    report.save(tmp_path / "alphas.json")
    saved = json.loads((tmp_path / "alphas.json").read_text())
    assert saved["alphas"] == report.alphas and saved["search"]["model.layers.0"]["0.5"] > 0
    print("\nauto alpha per layer:", report.alphas)


def test_auto_alpha_with_static_scheme_and_experts():
    model = make_model("mixtral")
    data = calib_tokens(4, 24)
    stats = collect_act_stats(model, data, progress=False)
    report = sq.smooth_(model, stats, _cfg(alpha="auto", alpha_grid=(0.4, 0.8), scheme="O3", alpha_search_batches=2),
                        data=data)
    assert set(report.alphas.values()) <= {0.4, 0.8}


def test_user_family_table():
    from sq_kernels.families import FamilySpec, SmoothGroup
    attention_only = FamilySpec(
        name="Llama (attention only)", model_types=("llama",), layers="model.layers", default_alpha=0.6,
        groups=(SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),))
    model = make_model("llama")
    post_norm = model.model.layers[0].post_attention_layernorm.weight.clone()
    stats = collect_act_stats(model, calib_tokens(), progress=False)
    report = sq.smooth_(model, stats, _cfg(family=attention_only))
    assert report.family == "Llama (attention only)" and set(report.alphas.values()) == {0.6}
    assert torch.equal(model.model.layers[0].post_attention_layernorm.weight, post_norm)
    with pytest.raises(ValueError, match="FamilySpec"):
        sq.smooth_(model, stats, _cfg(family="llama"))
