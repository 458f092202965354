"""Family tables: lazy imports, every table resolving against its model, the variants of Falcon and
Llama 3, and user-registered tables."""
import copy
import subprocess
import sys

import pytest
import torch

import sq_kernels as sq
from sq_kernels.calibration import collect_act_stats
from sq_kernels.families import (FamilySpec, SmoothGroup, UnsupportedModelError, decoder_layers, family_for_model_type,
                                 family_of, register_family, supported_model_types)
from sq_kernels.smooth import plan_smoothing

from conftest import FAMILIES, NEWER_FAMILIES, calib_tokens, make_model, naive_logits, sqnr

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return sq.SmoothQuantConfig(progress=False, **kw)


def test_imports_are_lazy():
    code = ("import sys, sq_kernels; "
            "assert 'transformers' not in sys.modules, 'transformers imported eagerly'; "
            "assert not [m for m in sys.modules if m.startswith('sq_kernels.families.')], 'tables imported eagerly'; "
            "sq_kernels.families.family_for_model_type('bloom'); "
            "loaded = sorted(m for m in sys.modules if m.startswith('sq_kernels.families.')); "
            "assert loaded == ['sq_kernels.families.bloom'], loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_registry_lists_every_family():
    assert set(FAMILIES) <= set(supported_model_types())
    names = {family_for_model_type(t).name for t in FAMILIES}
    assert names == {"OPT", "Llama", "Mistral", "Mixtral", "BLOOM", "Falcon", "Qwen2"}
    assert set(NEWER_FAMILIES) <= set(supported_model_types())
    for model_type in NEWER_FAMILIES:  # every table the registry names is also in the error's list
        assert f"({model_type})" in str(pytest.raises(UnsupportedModelError, family_for_model_type, "gpt2").value)
    with pytest.raises(UnsupportedModelError, match="gpt2.*Supported: OPT"):
        family_for_model_type("gpt2")


@pytest.mark.parametrize("family", FAMILIES)
def test_table_resolves_against_the_model(family):
    model = make_model(family)
    spec = family_of(model)
    stats = collect_act_stats(model, calib_tokens(2, 16), progress=False)
    plans, _ = plan_smoothing(model, stats, _cfg(fold_linear_pairs=True), spec)
    layers = decoder_layers(model, spec)
    assert len(layers) == 2
    per_layer = len(plans) // len(layers)
    assert per_layer >= 1 and len(plans) == per_layer * len(layers)  # Falcon-7B: one norm feeds everything
    assert 0.0 < spec.default_alpha <= 1.0
    for p in plans:  # norm groups see the hidden size; linear pairs the width between the two linears
        assert p.act.shape == p.w.shape and (p.kind == "linear" or p.act.shape == (64,))


FALCON_LAYOUTS = {
    "7b-parallel": dict(),
    "40b-two-norms": dict(new_decoder_architecture=True, num_kv_heads=2),
    "new-one-norm": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    "rw-sequential": dict(parallel_attn=False),
}


@pytest.mark.parametrize("layout", list(FALCON_LAYOUTS))
def test_falcon_layouts(layout):
    fp = make_model("falcon", **FALCON_LAYOUTS[layout])
    x = calib_tokens(3, 20, seed=5)
    with torch.no_grad():
        ref = fp(x).logits
    smoothed = copy.deepcopy(fp)
    stats = collect_act_stats(smoothed, calib_tokens(), progress=False)
    report = sq.smooth_(smoothed, stats, _cfg())
    with torch.no_grad():
        assert float((smoothed(x).logits - ref).abs().max() / ref.abs().max()) < 1e-5
    sources = sorted({g["source"] for g in report.groups})
    expected = {"7b-parallel": ["input_layernorm"], "40b-two-norms": ["ln_attn", "ln_mlp"],
                "new-one-norm": ["input_layernorm"], "rw-sequential": ["input_layernorm", "post_attention_layernorm"]}
    assert sources == expected[layout]
    quantized = copy.deepcopy(fp)
    sq.smoothquant(quantized, calib_tokens(), _cfg())
    with torch.no_grad():
        sq_db, naive_db = sqnr(ref, quantized(x).logits), sqnr(ref, naive_logits(fp, x))
    assert sq_db >= 20.0 and sq_db >= naive_db + 5.0, (layout, sq_db, naive_db)


def test_llama3_style_config():
    """Llama 3: grouped-query attention, llama3 rope scaling, tied embeddings in the small variants."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    fp = make_model("llama", num_key_value_heads=2, rope_parameters=rope, tie_word_embeddings=True)
    assert family_of(fp).name == "Llama"
    x = calib_tokens(3, 20, seed=5)
    with torch.no_grad():
        ref = fp(x).logits
    q = copy.deepcopy(fp)
    sq.smoothquant(q, calib_tokens(), _cfg())
    with torch.no_grad():
        assert sqnr(ref, q(x).logits) >= 20.0


def test_registered_user_family():
    model = make_model("llama")
    model.config.model_type = "my-llama-variant"
    with pytest.raises(UnsupportedModelError, match="my-llama-variant"):
        sq.smoothquant(copy.deepcopy(model), calib_tokens(), _cfg())
    spec = FamilySpec(name="MyLlama", model_types=("my-llama-variant",), layers="model.layers", default_alpha=0.7,
                      groups=(SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj",
                                                              "self_attn.v_proj")),
                              SmoothGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))))
    register_family(spec)
    assert "my-llama-variant" in supported_model_types()
    report = sq.smoothquant(model, calib_tokens(), _cfg())
    assert report.smoothing.family == "MyLlama" and set(report.smoothing.alphas.values()) == {0.7}
    with pytest.raises(ValueError, match="FamilySpec"):
        register_family({"name": "not a spec"})


def test_table_that_does_not_match_the_model():
    wrong = FamilySpec(name="Wrong", model_types=("x",), layers="model.layers", default_alpha=0.5,
                       groups=(SmoothGroup("ln_1", ("attn.c_attn",)),))
    model = make_model("llama")
    stats = collect_act_stats(model, calib_tokens(2, 16), progress=False)
    with pytest.raises(ValueError, match="no submodule 'attn.c_attn'"):
        sq.smooth_(model, stats, _cfg(family=wrong))


@pytest.mark.parametrize("family", NEWER_FAMILIES)
def test_newer_family_tables(family, tmp_path, capsys):
    # the whole recipe on the newer tables: neutral smoothing (Gemma's 1 + w norms included), SmoothQuant
    # well above naive W8A8, the save -> load round trip and generate()
    fp = make_model(family)
    x = calib_tokens(4, 32, seed=7)
    with torch.no_grad():
        ref = fp(x).logits
    smoothed = copy.deepcopy(fp)
    stats = collect_act_stats(smoothed, calib_tokens(), progress=False)
    report = sq.smooth_(smoothed, stats, _cfg())
    mlp_norm = "pre_feedforward_layernorm" if family in ("gemma2", "gemma3_text") else "post_attention_layernorm"
    assert {g["source"] for g in report.groups} == {"input_layernorm", mlp_norm}
    with torch.no_grad():
        assert torch.allclose(smoothed(x).logits, ref, rtol=1e-4, atol=1e-4)  # smoothing is neutral
    sq.quantize_(smoothed, _cfg(), stats=report.stats)
    with torch.no_grad():
        sq_db, naive_db = sqnr(ref, smoothed(x).logits), sqnr(ref, naive_logits(fp, x))
    with capsys.disabled():
        print(f"\n{family}: SmoothQuant W8A8 {sq_db:.1f} dB, naive W8A8 {naive_db:.1f} dB")
    assert sq_db >= 20.0 and sq_db >= naive_db + 10.0
    sq.save_quantized(smoothed, tmp_path)
    loaded = sq.load_quantized(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, smoothed(x).logits)
    prompt = calib_tokens(1, 6, seed=4)
    out = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                          pad_token_id=0)
    assert out.shape == (1, 10)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_moe_models_mixing_dense_and_sparse_layers(family):
    # layer 0 is dense (mlp_only_layers=[0]), layer 1 sparse: each gets the groups of the MLP it has, the
    # router (and Qwen2-MoE's one-output shared-expert gate) absorb s but stay in floating point
    from sq_kernels.nn import W8A8Experts, W8A8Linear
    model = make_model(family)
    stats = collect_act_stats(model, calib_tokens(2, 16), progress=False)
    plans, _ = plan_smoothing(model, stats, _cfg(fold_linear_pairs=True), family_of(model))
    by_layer = {}
    for p in plans:
        by_layer.setdefault(p.layer, set()).update(p.targets)
    assert {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= by_layer["model.layers.0"]
    assert not any("expert" in t for t in by_layer["model.layers.0"])
    sparse = by_layer["model.layers.1"]
    assert {"mlp.gate", "mlp.experts"} <= sparse and not {"mlp.gate_proj", "mlp.up_proj"} & sparse
    if family == "qwen2_moe":
        assert {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate",
                "mlp.shared_expert.down_proj"} <= sparse
    report = sq.smoothquant(model, calib_tokens(), _cfg())
    assert isinstance(model.get_submodule("model.layers.1.mlp.experts"), W8A8Experts)
    assert isinstance(model.get_submodule("model.layers.0.mlp.down_proj"), W8A8Linear)
    kept = {"model.layers.1.mlp.gate"} | ({"model.layers.1.mlp.shared_expert_gate"} if family == "qwen2_moe" else set())
    assert kept <= set(report.kept) and all(type(model.get_submodule(n)).__name__ != "W8A8Linear" for n in kept)


def test_gemma_norm_fold_divides_one_plus_weight():
    # Gemma's RMSNorm scales by (1 + w): after smoothing, 1 + w' must equal (1 + w) / s channel by channel
    model = make_model("gemma")
    norm = model.model.layers[0].input_layernorm
    before = norm.weight.detach().clone()
    stats = collect_act_stats(model, calib_tokens(2, 16), progress=False)
    report = sq.smooth_(model, stats, _cfg(alpha=0.5))
    group = next(g for g in report.groups if g["layer"] == "model.layers.0" and g["source"] == "input_layernorm")
    ratio = (1 + before) / (1 + norm.weight.detach())  # = s
    assert float(ratio.min()) == pytest.approx(group["s_min"], rel=1e-5)
    assert float(ratio.max()) == pytest.approx(group["s_max"], rel=1e-5)
    assert group["s_max"] > 2.0  # the planted outlier channels were scaled down
