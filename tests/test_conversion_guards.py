"""quantize_ / smoothquant on models whose modules W8A8 cannot simply replace, and the checks around it:
linears read through ``.weight`` (MultiheadAttention, BLOOM's slow_but_exact), nn.Linear subclasses with
their own forward, a linear under two names, hooks, training mode, a tied lm_head, float64 models, a
partial conversion's record, and field validation of configs and family tables."""
import copy
import functools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import sq_kernels as sq
import sq_kernels.nn.convert as convert_mod
from sq_kernels.families import FamilySpec, SmoothGroup
from sq_kernels.nn import W8A8Experts, W8A8Linear

from conftest import calib_tokens, make_model
from conftest import logits as _logits

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return sq.SmoothQuantConfig(progress=False, **kw)


def _rel(ref, out) -> float:
    return float((out - ref).norm() / ref.norm())


def _w8a8(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (W8A8Linear, W8A8Experts))]


# ------------------------------------------------------------- #1 linears whose parent reads .weight


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc = nn.Linear(32, 32)

    def forward(self, x):
        return self.fc(self.mha(x, x, x, need_weights=False)[0])


def test_multihead_attention_out_proj_stays_float_with_the_reason():
    torch.manual_seed(0)
    model = _Attention().eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match="cannot serve"):
        report = sq.quantize_(model, _cfg(smooth=False))
    assert list(report.converted) == ["fc"]
    assert "MultiheadAttention passes out_proj.weight" in report.kept["mha.out_proj"]
    assert type(model.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        assert _rel(ref, model(x)) < 0.05  # runs (it used to fail: Float and Char)


def test_transformer_encoder_layer_is_refused_before_anything_changes():
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0).eval()
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match="no module would be converted(.|\n)*linear1.weight to "
                                         "torch._transformer_encoder_layer_fwd"):
        sq.quantize_(layer, _cfg(smooth=False))
    assert not _w8a8(layer)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_bloom_slow_but_exact_is_refused_on_the_quantize_path():
    model = make_model("bloom", pretraining_tp=2, slow_but_exact=True)
    for call in (lambda: sq.quantize_(model, _cfg(smooth=False)),
                 lambda: sq.quantize_(model, _cfg(smooth=False), atomic=True),
                 # data=None: the refusal comes before smoothquant asks for calibration data
                 lambda: sq.smoothquant(model, None, _cfg(smooth=False)),
                 lambda: sq.smoothquant(model, calib_tokens(), _cfg())):
        with pytest.raises(ValueError, match="BLOOM: cannot (quantize|smooth) this model: pretraining_tp > 1 with "
                                             "slow_but_exact=True"):
            call()
    assert not _w8a8(model)
    x = calib_tokens(2, 16, seed=5)
    assert torch.isfinite(_logits(model, x)).all()
    fast = make_model("bloom", pretraining_tp=2, slow_but_exact=False)  # calls the linears: fine
    assert sq.quantize_(fast, _cfg(smooth=False)).converted


def test_bloom_post_layernorm_still_quantizes_without_smoothing():
    model = make_model("bloom", apply_residual_connection_post_layernorm=True)
    with pytest.raises(ValueError, match="apply_residual_connection_post_layernorm"):
        sq.smooth_(model, sq.collect_act_stats(model, calib_tokens(2, 16), progress=False), _cfg())
    assert sq.quantize_(model, _cfg(smooth=False)).converted  # only smoothing is refused there


# ------------------------------------------------------------- #2 nn.Linear subclasses


class _Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5 + 1.0


class _Plain(nn.Linear):
    """A subclass that keeps nn.Linear.forward."""


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _Scaled(32, 32), _Plain(32, 32), nn.Linear(32, 16)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_linear_subclass_with_its_own_forward_stays_float():
    torch.manual_seed(0)
    model = _Net().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match="_Scaled is an nn.Linear subclass with its own forward"):
        report = sq.quantize_(model, _cfg(smooth=False))
    assert type(model.a) is _Scaled and "own forward" in report.kept["a"]
    assert isinstance(model.b, W8A8Linear) and isinstance(model.c, W8A8Linear)
    with torch.no_grad():
        assert _rel(ref, model(x)) < 0.05  # a plain W8A8Linear in place of _Scaled was off by ~100 %


def test_a_linear_with_a_forward_set_on_the_instance_stays_float():
    model = make_model("llama")
    q_proj = model.model.layers[0].self_attn.q_proj
    calls = []

    def wrapped(x, _orig=q_proj.forward):  # as accelerate's add_hook_to_module installs its hooks
        calls.append(1)
        return _orig(x)
    q_proj.forward = wrapped
    with pytest.warns(UserWarning, match="forward is replaced on the instance"):
        report = sq.quantize_(model, _cfg())
    assert model.model.layers[0].self_attn.q_proj is q_proj and "model.layers.0.self_attn.q_proj" in report.kept
    model(calib_tokens(1, 8))
    assert calls  # the hook still runs


def test_from_linear_refuses_a_subclass_with_its_own_forward():
    with pytest.raises(ValueError, match="layer.a: _Scaled is an nn.Linear subclass with its own forward.*"
                                         "FalconLinear"):
        W8A8Linear.from_linear(_Scaled(32, 16), name="layer.a")
    assert isinstance(W8A8Linear.from_linear(_Plain(32, 16)), W8A8Linear)
    nd = nn.modules.linear.NonDynamicallyQuantizableLinear(32, 16)  # outside MHA: nn.Linear's forward
    assert isinstance(W8A8Linear.from_linear(nd), W8A8Linear)


def test_falcon_linear_is_on_the_allow_list_and_converts():
    from transformers.models.falcon.modeling_falcon import FalconLinear
    model = make_model("falcon")
    assert type(model.transformer.h[0].self_attention.query_key_value) is FalconLinear
    assert "forward" in FalconLinear.__dict__  # its own forward (x @ W.T + b): allowed by name
    report = sq.quantize_(model, _cfg(smooth=False))
    assert "transformer.h.0.self_attention.query_key_value" in report.converted
    assert not any("own forward" in why for why in report.kept.values())


# ------------------------------------------------------------- #3 one linear under two names


class _Block(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        shared = nn.Linear(32, 32)
        self.a, self.b = _Block(shared), _Block(shared)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("atomic", [False, True])
def test_shared_linear_is_installed_at_every_name(atomic):
    torch.manual_seed(0)
    model = _Shared().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        ref = model(x)
    report = sq.quantize_(model, _cfg(smooth=False), atomic=atomic)
    assert isinstance(model.a.proj, W8A8Linear) and model.a.proj is model.b.proj
    assert list(report.converted) == ["a.proj"] and report.shared == {"b.proj": "a.proj"}
    assert "b.proj: the same module as a.proj" in str(report)
    with torch.no_grad():
        assert _rel(ref, model(x)) < 0.05


def test_shared_linear_with_disagreeing_rules_is_refused():
    model = _Shared()
    with pytest.raises(ValueError, match="a.proj and b.proj are the same module"):
        sq.quantize_(model, _cfg(smooth=False, exclude=["b.proj"]))
    assert not _w8a8(model)


def test_pattern_naming_only_the_second_path_is_not_reported_unmatched():
    model = _Shared()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = sq.quantize_(model, _cfg(smooth=False, include=["a.proj", "b.proj"]))
    assert list(report.converted) == ["a.proj"]


# ------------------------------------------------------------- #4 experts' instance forward


def test_calibration_restores_an_instance_forward_on_experts():
    model = make_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    calls = []
    original = type(experts).forward

    def wrapper(module, *args, **kwargs):  # what accelerate's add_hook_to_module installs
        calls.append(1)
        return original(module, *args, **kwargs)

    experts.forward = functools.partial(wrapper, experts)
    mine = experts.__dict__["forward"]
    stats = sq.collect_act_stats(model, calib_tokens(2, 16), progress=False)
    assert "model.layers.0.mlp.experts::down_proj" in stats
    assert experts.__dict__.get("forward") is mine
    calls.clear()
    _logits(model, calib_tokens(1, 8))
    assert calls  # the wrapper runs again
    plain = model.model.layers[1].mlp.experts
    assert "forward" not in plain.__dict__  # the calibration patch itself is gone


# ------------------------------------------------------------- #5 set_local against the keep-FP list


def test_set_local_in_suffix_form_overrides_the_keep_fp_list():
    model = make_model("llava")
    name = "model.multi_modal_projector.linear_1"
    for pattern in ("multi_modal_projector.*", "model.multi_modal_projector.*"):
        config = _cfg(smooth=False).set_local(pattern, weight="per_channel", activation="per_token")
        report = sq.quantize_(copy.deepcopy(model), config)
        assert name in report.converted, pattern
    # a class-name rule does not reach into the family's keep-FP list (the whole vision tower would follow)
    config = _cfg(smooth=False).set_local("Linear", weight="per_channel", activation="per_token")
    report = sq.quantize_(copy.deepcopy(model), config)
    assert "outside the language model" in report.kept[name]


# ------------------------------------------------------------- #6 float64 and empty linears


def test_float64_model_is_refused_before_converting():
    model = make_model("llama", dtype=torch.float64)
    for call in (lambda: sq.quantize_(model, _cfg(smooth=False)), lambda: sq.smoothquant(model, None, _cfg())):
        with pytest.raises(ValueError, match="torch.float64 .*cast the model first"):
            call()
    assert not _w8a8(model) and "sq_smoothing" not in model.__dict__
    sq.quantize_(model.float(), _cfg(smooth=False))  # cast, it converts


def test_zero_features_are_refused_at_construction():
    with pytest.raises(ValueError, match="in_features=0: an INT8 GEMM needs at least one input"):
        W8A8Linear(0, 16)
    with pytest.raises(ValueError, match="in_features=0"):
        W8A8Linear.from_linear(nn.Linear(0, 16))
    with pytest.raises(ValueError, match="in_features must be an integer, got float"):
        W8A8Linear(16.0, 16)


# ------------------------------------------------------------- #7 / #14 config fields


@pytest.mark.parametrize("field,value", [("smooth", "false"), ("smooth", None), ("smooth", 0),
                                         ("fold_linear_pairs", "no"), ("progress", "off"), ("progress", 1)])
def test_bool_fields_must_be_bools(field, value):
    with pytest.raises(ValueError, match=f"{field} must be True or False, got"):
        sq.SmoothQuantConfig(**{field: value})
    with pytest.raises(ValueError, match=f"{field} must be True or False"):
        sq.SmoothQuantConfig.from_dict({field: value})
    config = _cfg()
    setattr(config, field, value)  # assigned later: quantize_ validates it
    with pytest.raises(ValueError, match=f"{field} must be True or False"):
        sq.quantize_(nn.Sequential(nn.Linear(16, 16)), config)


@pytest.mark.parametrize("field", ["weight", "activation"])
def test_empty_scheme_override_is_refused(field):
    with pytest.raises(ValueError, match=f"{field}: the .* must be None \\(the scheme's default\\) or one of"):
        sq.SmoothQuantConfig(**{field: ""})


def test_numpy_integers_and_reals_are_accepted():
    config = sq.SmoothQuantConfig(num_samples=np.int64(4), seq_len=np.int32(16), alpha=np.float32(0.5))
    assert type(config.num_samples) is int and config.num_samples == 4 and type(config.seq_len) is int
    assert config.alpha == 0.5 and type(config.alpha) is float
    assert W8A8Linear(np.int64(32), np.int64(16)).in_features == 32
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        sq.SmoothQuantConfig(num_samples=True)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\].*pass float\(t\)"):
        sq.SmoothQuantConfig(alpha=torch.tensor(0.5))


# ------------------------------------------------------------- #8 family tables


def test_smooth_group_fields_are_checked():
    with pytest.raises(ValueError, match="targets must be a tuple of str, got the str 'self_attn.q_proj'"):
        SmoothGroup("input_layernorm", ("self_attn.q_proj"))
    with pytest.raises(ValueError, match="kind must be one of \\('norm', 'linear'\\).*got 'Linear'"):
        SmoothGroup("self_attn.v_proj", ("self_attn.o_proj",), kind="Linear")
    with pytest.raises(ValueError, match="targets must be a non-empty tuple"):
        SmoothGroup("input_layernorm", ())
    with pytest.raises(ValueError, match="when must be None or a callable"):
        SmoothGroup("input_layernorm", ("q",), when=True)
    assert SmoothGroup("input_layernorm", ["q", "k"]).targets == ("q", "k")  # a list becomes a tuple


def test_family_spec_fields_are_checked_naming_the_table():
    group = SmoothGroup("input_layernorm", ("self_attn.q_proj",))
    with pytest.raises(ValueError, match="FamilySpec 'Mine': default_alpha must be a number in \\[0, 1\\].*1.5"):
        FamilySpec("Mine", ("llama",), "model.layers", (group,), default_alpha=1.5)
    with pytest.raises(ValueError, match="FamilySpec 'Mine': model_types must be a tuple of str, got the str"):
        FamilySpec("Mine", "llama", "model.layers", (group,), default_alpha=0.5)
    with pytest.raises(ValueError, match="FamilySpec 'Mine': groups must be a tuple of SmoothGroup"):
        FamilySpec("Mine", ("llama",), "model.layers", group, default_alpha=0.5)
    with pytest.raises(ValueError, match="FamilySpec 'Mine': keep_fp must be a tuple of \\(pattern, reason\\)"):
        FamilySpec("Mine", ("llama",), "model.layers", (group,), default_alpha=0.5, keep_fp=("mlp.gate",))
    with pytest.raises(ValueError, match="FamilySpec 'Mine': refuse must be None or a callable"):
        FamilySpec("Mine", ("llama",), "model.layers", (group,), default_alpha=0.5, refuse="no")


def test_a_table_with_no_group_for_the_model_warns():
    model = make_model("llama")
    stats = sq.collect_act_stats(model, calib_tokens(2, 16), progress=False)
    empty = FamilySpec("Mine", ("llama",), "model.layers", (), default_alpha=0.5)
    with pytest.warns(UserWarning, match="Mine: no smoothing group applies.*the table has no groups"):
        sq.smooth_(copy.deepcopy(model), stats, _cfg(family=empty))
    absent = FamilySpec("Mine", ("llama",), "model.layers",
                        (SmoothGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     in_layer=lambda layer: False),), default_alpha=0.5)
    with pytest.warns(UserWarning, match="excluded by their when= / in_layer= conditions"):
        sq.smooth_(copy.deepcopy(model), stats, _cfg(family=absent))


def test_a_user_table_that_would_change_the_model_is_refused_before_folding():
    from sq_kernels.families import family_for_model_type as get_family, register_family
    from sq_kernels.families import _USER
    model = make_model("llama")
    stats = sq.collect_act_stats(model, calib_tokens(2, 16), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = FamilySpec("Partial", ("llama",), "model.layers",
                         (SmoothGroup("input_layernorm", ("self_attn.q_proj",)),), default_alpha=0.5)
    with pytest.raises(ValueError, match="family table 'Partial': smoothing is not neutral for 1 group.*"
                                         "model.layers.0.input_layernorm -> self_attn.q_proj changed the layer's "
                                         "output by .*must list every module that reads"):
        sq.smooth_(model, stats, _cfg(family=partial))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was folded
    whole = FamilySpec("Whole", ("llama",), "model.layers", get_family("llama").groups, default_alpha=0.5,
                       linear_pairs=get_family("llama").linear_pairs)
    x = calib_tokens(2, 16, seed=5)
    want = _logits(model, x)
    sq.smooth_(model, stats, _cfg(family=whole, fold_linear_pairs=True))  # a complete table, pairs too, passes
    torch.testing.assert_close(_logits(model, x), want, rtol=1e-4, atol=1e-4)
    try:  # a registered table is a user's table too
        register_family(partial)
        with pytest.raises(ValueError, match="smoothing is not neutral"):
            sq.smooth_(make_model("llama"), stats, _cfg())
    finally:
        _USER.pop("llama", None)


def test_smoothquant_proves_a_user_table_before_calibrating(monkeypatch):
    import sq_kernels.api as api_mod
    model = make_model("llama")
    partial = FamilySpec("Partial", ("llama",), "model.layers",
                         (SmoothGroup("input_layernorm", ("self_attn.q_proj",)),), default_alpha=0.5)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before the table was proven")
    monkeypatch.setattr(api_mod, "collect_act_stats", no_calibration, raising=False)
    monkeypatch.setattr(sq.calibration, "collect_act_stats", no_calibration)
    with pytest.raises(ValueError, match="family table 'Partial': smoothing is not neutral"):
        sq.smoothquant(model, calib_tokens(), _cfg(family=partial))


# ------------------------------------------------------------- #9 tied lm_head


def test_quantized_tied_lm_head_cannot_be_tied_back(tmp_path):
    model = make_model("qwen2", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    report = sq.smoothquant(model, calib_tokens(), _cfg(exclude=[]))
    assert isinstance(model.lm_head, W8A8Linear)
    assert model.config.tie_word_embeddings is False
    assert any("lm_head: its weight was tied to model.embed_tokens.weight" in n for n in report.notes)
    assert any("tie_word_embeddings to False" in n for n in report.notes) and "note: set config" in str(report)
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # smoothing does not touch the embedding
    x = calib_tokens(2, 16, seed=5)
    y = _logits(model, x)
    model.tie_weights()  # transformers calls it in resize_token_embeddings, PEFT, loading
    assert model.lm_head.weight.dtype == torch.int8
    assert torch.equal(_logits(model, x), y)
    sq.save_quantized(model, tmp_path)
    loaded = sq.load_quantized(tmp_path)
    assert isinstance(loaded.lm_head, W8A8Linear) and loaded.config.tie_word_embeddings is False
    assert torch.equal(_logits(loaded, x), y)


def test_tied_lm_head_kept_in_float_stays_tied():
    model = make_model("qwen2", tie_word_embeddings=True)
    report = sq.quantize_(model, _cfg(smooth=False))
    assert "lm_head" in report.kept and not report.notes
    assert model.config.tie_word_embeddings is True and model.lm_head.weight is model.model.embed_tokens.weight


# ------------------------------------------------------------- #10 hooks, #12 training mode


@pytest.mark.parametrize("atomic", [False, True])
def test_hooks_move_to_the_w8a8_module(atomic):
    model = make_model("llama")
    q_proj = model.model.layers[0].self_attn.q_proj
    seen = {"fwd": 0, "pre": 0, "kw": 0}
    h1 = q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("fwd", seen["fwd"] + 1))
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, i: (i[0] * 0,))  # ablation
    q_proj.register_forward_pre_hook(lambda m, a, k: seen.__setitem__("kw", seen["kw"] + 1), with_kwargs=True)
    sq.quantize_(model, _cfg(smooth=False), atomic=atomic)
    new = model.model.layers[0].self_attn.q_proj
    assert isinstance(new, W8A8Linear)
    out = {}
    model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: out.__setitem__("mlp", o))
    _logits(model, calib_tokens(1, 8))
    assert seen["fwd"] == 1 and seen["kw"] == 1
    assert torch.count_nonzero(out["mlp"]) == 0  # the pre-hook zeroed down_proj's input: it still runs
    h1.remove()  # the handle the user holds still works
    _logits(model, calib_tokens(1, 8))
    assert seen["fwd"] == 1 and seen["kw"] == 2


@pytest.mark.parametrize("mode", [False, True])
def test_w8a8_modules_take_the_training_mode_of_what_they_replace(mode):
    model = make_model("mixtral").train(mode)
    sq.quantize_(model, _cfg(smooth=False))
    assert {m.training for m in model.modules()} == {mode}
    assert W8A8Linear.from_linear(nn.Linear(32, 16).eval()).training is False


# ------------------------------------------------------------- #11 from_linear's input_amax


def test_from_linear_input_amax_must_be_one_number_and_only_for_static():
    lin = nn.Linear(32, 16)
    with pytest.raises(ValueError, match="input_amax must be a number or a 1-element tensor.*got 32 elements"):
        W8A8Linear.from_linear(lin, activation="static", input_amax=torch.ones(32))
    with pytest.raises(ValueError, match="input_amax is used by activation='static' only"):
        W8A8Linear.from_linear(lin, activation="per_token", input_amax=5.0)
    with pytest.raises(ValueError, match="meta device"):
        W8A8Linear.from_linear(nn.Linear(32, 16, device="meta"))
    q = W8A8Linear.from_linear(lin, activation="static", input_amax=torch.tensor([127.0]))
    assert torch.equal(q.input_scale, torch.ones(1))


# ------------------------------------------------------------- a partial conversion is recorded on the model


def test_partial_conversion_is_recorded_and_cleared(monkeypatch):
    model = make_model("llama")
    original, calls = convert_mod.build_module, {"n": 0}

    def flaky(entry, stats=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(entry, stats)

    monkeypatch.setattr(convert_mod, "build_module", flaky)
    with pytest.raises(sq.PartialConversionError) as info:
        sq.quantize_(model, _cfg(smooth=False))
    record = model.sq_partial_conversion
    assert record == {"converted": info.value.converted, "remaining": info.value.remaining}
    assert len(record["converted"]) == 2 and len(record["remaining"]) == 12
    calls["n"] = 0  # fails again, at the third of the remaining modules
    with pytest.raises(sq.PartialConversionError) as again:
        sq.quantize_(model, _cfg(smooth=False))
    assert model.sq_partial_conversion["converted"] == record["converted"] + again.value.converted
    assert model.sq_partial_conversion["remaining"] == again.value.remaining
    monkeypatch.undo()
    sq.quantize_(model, _cfg(smooth=False))
    assert not hasattr(model, "sq_partial_conversion")
    assert len(_w8a8(model)) == 14
