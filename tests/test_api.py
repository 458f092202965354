"""The user API on tiny models of every family: SmoothQuant W8A8 accuracy against FP and against naive
W8A8, generate(), schemes, include/exclude/set_local rules, reports, and failures that change nothing."""
import copy

import pytest
import torch
from torch import nn

import sq_kernels as sq
from sq_kernels.families import UnsupportedModelError
from sq_kernels.nn import W8A8Experts, W8A8Linear

from conftest import FAMILIES, calib_tokens, make_model, smoothquant_vs_naive, sqnr
from conftest import logits as _logits

pytestmark = pytest.mark.usefixtures("one_thread")

SQ_MIN_DB = 20.0        # the bar for SmoothQuant W8A8 logits against FP
MARGIN_DB = 10.0        # "beats naive W8A8 by a wide margin"


def _cfg(**kw):
    return sq.SmoothQuantConfig(progress=False, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_beats_naive_w8a8(family, capsys):
    fp = make_model(family)
    smoothed, report, sq_db, naive_db = smoothquant_vs_naive(fp, family, capsys)
    assert sq_db >= SQ_MIN_DB, f"{family}: SmoothQuant {sq_db:.2f} dB < {SQ_MIN_DB}"
    assert sq_db >= naive_db + MARGIN_DB, f"{family}: SmoothQuant {sq_db:.2f} dB vs naive {naive_db:.2f} dB"
    assert report.smoothing is not None and report.converted
    assert all(isinstance(smoothed.get_submodule(n), (W8A8Linear, W8A8Experts)) for n in report.converted)
    assert "lm_head" in report.kept


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_follows_the_float_model(family):
    fp = make_model(family)
    q = copy.deepcopy(fp)
    sq.smoothquant(q, calib_tokens(), _cfg())
    free, forced = [], []
    for seed in range(11, 16):
        prompt = calib_tokens(1, 8, seed=seed)
        kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                  pad_token_id=0)
        g_fp, g_q = fp.generate(prompt, **kw), q.generate(prompt, **kw)
        assert g_q.shape == (1, 24)
        free.append(float((g_fp[0, 8:] == g_q[0, 8:]).float().mean()))
        # teacher-forced: the quantized model's next-token choice along the FP continuation (no compounding)
        forced.append(float((_logits(q, g_fp)[0, 7:-1].argmax(-1) == g_fp[0, 8:]).float().mean()))
    free_mean, forced_mean = sum(free) / len(free), sum(forced) / len(forced)
    assert forced_mean >= 0.85, (family, forced)
    assert free_mean >= 0.5, (family, free)


@pytest.mark.parametrize("scheme", ["O1", "O2", "O3"])
def test_paper_schemes(scheme):
    fp = make_model("opt")
    x = calib_tokens(4, 32, seed=7)
    ref = _logits(fp, x)
    q = copy.deepcopy(fp)
    report = sq.smoothquant(q, calib_tokens(), _cfg(scheme=scheme))
    weight, activation = sq.config.SCHEMES[scheme]
    layer = q.model.decoder.layers[0].self_attn.q_proj
    assert (layer.weight_granularity, layer.activation) == (weight, activation)
    assert layer.weight_scale.shape == (1,)
    assert (layer.input_scale is not None) == (scheme == "O3")
    assert sqnr(ref, _logits(q, x)) >= SQ_MIN_DB
    assert len(set(report.converted.values())) == 1


def test_explicit_granularities_override_the_preset():
    cfg = _cfg(scheme="O3", weight="per_channel", activation="per_token")
    assert cfg.default_scheme() == sq.Scheme("per_channel", "per_token")
    with pytest.raises(ValueError, match="scheme must be one of"):
        _cfg(scheme="O4")
    with pytest.raises(ValueError, match="activation scheme"):
        _cfg(activation="per_row")


def test_include_exclude_and_set_local():
    model = make_model("llama")
    cfg = _cfg(smooth=False, exclude=("lm_head", "*.mlp.down_proj"))
    cfg.set_local("model.layers.0.*", "fp")
    cfg.set_local("*.self_attn.o_proj", weight="per_tensor", activation="per_tensor")
    report = sq.quantize_(model, cfg)
    layers = model.model.layers
    assert isinstance(layers[0].self_attn.q_proj, nn.Linear)
    assert "set_local('model.layers.0.*', 'fp')" in report.kept["model.layers.0.self_attn.q_proj"]
    assert isinstance(layers[1].mlp.down_proj, nn.Linear) and "excluded" in report.kept["model.layers.1.mlp.down_proj"]
    assert isinstance(layers[1].self_attn.q_proj, W8A8Linear) and layers[1].self_attn.q_proj.activation == "per_token"
    o_proj = layers[1].self_attn.o_proj
    assert (o_proj.weight_granularity, o_proj.activation) == ("per_tensor", "per_tensor")
    # rules apply in order and the later one wins: layer 0's o_proj is quantized despite the earlier 'fp'
    assert set(report.converted) == {f"model.layers.1.{n}" for n in
                                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                      "mlp.gate_proj", "mlp.up_proj")} | {"model.layers.0.self_attn.o_proj"}
    only = make_model("llama")
    report = sq.quantize_(only, _cfg(smooth=False, include=("*.q_proj",)))
    assert len(report.converted) == 2 and "not matched by include" in report.kept["model.layers.0.mlp.up_proj"]


def test_set_local_by_type_and_bad_rules():
    model = make_model("falcon")  # its linears are FalconLinear, a subclass of nn.Linear
    report = sq.quantize_(model, _cfg(smooth=False).set_local("Linear", "fp").set_local("*.dense_h_to_4h",
                                                                                       weight="per_tensor"))
    assert set(report.converted) == {"transformer.h.0.mlp.dense_h_to_4h", "transformer.h.1.mlp.dense_h_to_4h"}
    with pytest.raises(ValueError, match="set_local"):
        _cfg().set_local("*.q_proj", {"bits": 4})
    with pytest.raises(ValueError, match="set_local"):
        _cfg().set_local("*.q_proj", "int4")


def test_mixtral_router_stays_float_and_is_reported():
    model = make_model("mixtral")
    report = sq.smoothquant(model, calib_tokens(), _cfg())
    assert isinstance(model.model.layers[0].mlp.experts, W8A8Experts)
    assert type(model.model.layers[0].mlp.gate).__name__ == "MixtralTopKRouter"
    assert "model.layers.0.mlp.experts" in report.converted
    assert "router" in report.kept["model.layers.0.mlp.gate"]
    # the router is smoothed together with the experts (one s for both), though it is not quantized
    mlp_groups = [g for g in report.smoothing.groups if g["source"] == "post_attention_layernorm"]
    assert [g["targets"] for g in mlp_groups] == [["mlp.gate", "mlp.experts"]] * 2


def test_unaligned_linears_stay_float_with_a_warning():
    model = make_model("opt", outliers=False, ffn_dim=200)  # fc1 / fc2 have a 200-wide side
    with pytest.warns(UserWarning, match="stay in floating point"):
        report = sq.smoothquant(model, calib_tokens(), _cfg())
    assert isinstance(model.model.decoder.layers[0].fc1, nn.Linear)
    assert "out_features=200 not a multiple of 16" in report.kept["model.decoder.layers.0.fc1"]
    assert "in_features=200" in report.kept["model.decoder.layers.0.fc2"]
    assert isinstance(model.model.decoder.layers[0].self_attn.q_proj, W8A8Linear)
    assert "kept model.decoder.layers.0.fc1" in str(report)


def test_failure_while_building_changes_nothing(monkeypatch):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}
    original = W8A8Linear.from_linear.__func__

    def flaky(cls, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise ValueError("simulated failure")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(W8A8Linear, "from_linear", classmethod(flaky))
    with pytest.raises(ValueError, match="nothing was converted"):
        sq.quantize_(model, _cfg(smooth=False), atomic=True)
    assert not any(isinstance(m, W8A8Linear) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failure_after_smoothing_says_so(monkeypatch):
    model = make_model("llama")

    def broken(*args, **kwargs):
        raise ValueError("simulated failure")

    monkeypatch.setattr(W8A8Linear, "from_linear", classmethod(broken))
    with pytest.raises(ValueError, match="smoothed, which leaves its outputs unchanged, but not quantized"):
        sq.smoothquant(model, calib_tokens(), _cfg())


def test_static_scheme_needs_statistics():
    with pytest.raises(ValueError, match="needs calibration statistics"):
        sq.quantize_(make_model("llama"), _cfg(scheme="O3", smooth=False))


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128))
    with pytest.raises(UnsupportedModelError, match="OPT .*Llama .*Mistral .*Mixtral .*BLOOM .*Falcon .*Qwen2"):
        sq.smoothquant(gpt2, calib_tokens(), _cfg())


def test_nothing_to_convert_is_an_error():
    with pytest.raises(ValueError, match="quantize_: no module would be converted"):
        sq.quantize_(make_model("llama"), _cfg(smooth=False, include=("nothing.*",)))


def test_quantize_plain_module():
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    x = torch.randn(5, 32)
    ref = net(x)
    report = sq.quantize_(net, _cfg(smooth=False))
    assert set(report.converted) == {"0", "2"}
    assert sqnr(ref, net(x)) > 30.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(dtype):
    fp = make_model("llama")
    x = calib_tokens(2, 16, seed=7)
    ref = _logits(fp, x)
    q = copy.deepcopy(fp).to(dtype)
    sq.smoothquant(q, calib_tokens(), _cfg())
    out = _logits(q, x)
    assert out.dtype == dtype
    layer = q.model.layers[0].self_attn.q_proj
    assert layer.weight_scale.dtype == torch.float32
    assert sqnr(ref, out.float()) >= SQ_MIN_DB


def test_report_text_and_dict():
    model = make_model("bloom")
    report = sq.smoothquant(model, calib_tokens(), _cfg(alpha=0.6))
    text = str(report)
    assert "8 module(s) converted" in text and "alpha=0.6" in text
    d = report.to_dict()
    assert d["smoothing"]["alphas"] == {"transformer.h.0": 0.6, "transformer.h.1": 0.6}
    assert model.sq_quantization["config"]["alpha"] == 0.6


def test_smoothquant_from_statistics_reads_no_data_and_checks_patterns_before_calibrating(monkeypatch):
    import sq_kernels.api as api
    from conftest import make_model
    model = make_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    stats = sq.collect_act_stats(model, ids, progress=False)
    report = sq.smoothquant(model, None, sq.SmoothQuantConfig(alpha=0.6, progress=False), stats=stats)
    assert report.converted and report.smoothing is not None
    with pytest.raises(ValueError, match="data is required"):
        sq.smoothquant(make_model("llama"), None, sq.SmoothQuantConfig(progress=False))

    def no_calibration(*a, **k):
        raise AssertionError("calibrated although no module would be converted")
    monkeypatch.setattr(api, "collect_act_stats", no_calibration)
    fresh = make_model("llama")
    with pytest.raises(ValueError, match="no module would be converted.*include / exclude"):
        sq.smoothquant(fresh, ids, sq.SmoothQuantConfig(include=("nomatch*",), progress=False))


def test_save_pretrained_of_a_quantized_model_is_refused(tmp_path):
    """transformers would write the int8 weights without their scales and from_pretrained would load them as
    floats: a model that runs and is silently wrong. save_quantized is the way."""
    model = make_model("llama")
    sq.smoothquant(model, calib_tokens(), _cfg())
    for method in (model.save_pretrained, model.push_to_hub):
        with pytest.raises(RuntimeError, match="cannot save a model with W8A8 modules.*save_quantized"):
            method(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    copy.deepcopy(model)  # the guard does not get in the way of copies
    sq.save_quantized(model, tmp_path / "q")
    loaded = sq.load_quantized(tmp_path / "q", device="cpu:0")
    with pytest.raises(RuntimeError, match="save_quantized"):
        loaded.save_pretrained(tmp_path / "hf2")
    make_model("llama").save_pretrained(tmp_path / "fp")  # floating-point models are untouched


def test_a_pattern_that_matches_nothing_is_reported():
    model = make_model("llama")
    with pytest.warns(UserWarning, match="exclude pattern 'model.layer.0.\\*' matches no module"):
        sq.smoothquant(model, calib_tokens(), _cfg(exclude=("lm_head", "model.layer.0.*")))
    cfg = _cfg(smooth=False)
    cfg.set_local("Conv1D", "fp")
    with pytest.warns(UserWarning, match="set_local pattern 'Conv1D' matches no module"):
        sq.quantize_(make_model("llama"), cfg)


def test_gpt2_conv1d_layers_are_named_as_the_reason_nothing_converts():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128))
    with pytest.raises(ValueError, match="Conv1D modules .*not nn.Linear"):
        sq.smoothquant(gpt2, calib_tokens(), _cfg(smooth=False))


def test_one_pattern_rule_for_include_exclude_and_set_local():
    # a pattern matches the full name, its end after a dot, or a class name: the same for all three
    def converted(**kw):
        with _no_warning():  # none of these patterns is called unmatched
            return set(sq.quantize_(make_model("llama"), _cfg(smooth=False, **kw)).converted)
    q_projs = {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}
    assert converted(include="q_proj") == q_projs
    assert not converted(exclude=["q_proj", "lm_head"]) & q_projs
    assert not {n for n in converted(exclude=["self_attn.*", "lm_head"]) if ".self_attn." in n}
    assert not {n for n in converted(exclude=["layers.0.*", "lm_head"]) if ".layers.0." in n}
    with pytest.raises(ValueError, match="no module would be converted"):
        converted(exclude="Linear")  # a class name excludes every nn.Linear
    with pytest.warns(UserWarning, match="exclude pattern 'q_porj' matches no module") as record:
        sq.quantize_(make_model("llama"), _cfg(smooth=False, exclude=["q_porj", "lm_head"]))
    assert record[0].filename == __file__  # the warning points at the caller's line


class _no_warning:
    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def test_config_of_the_wrong_type_is_named():
    model = make_model("llama")
    with pytest.raises(ValueError, match=r"smoothquant: config must be a SmoothQuantConfig, got function "
                                         r"\(a tokenizer\? pass it by keyword: tokenizer=...\)"):
        sq.smoothquant(model, ["some text"], lambda s: [1, 2, 3])
    with pytest.raises(ValueError, match=r"quantize_: config must be a SmoothQuantConfig, got a dict; build one"):
        sq.quantize_(model, {"scheme": "O1"})
    with pytest.raises(ValueError, match=r"smooth_: config must be a SmoothQuantConfig, got str"):
        sq.smooth_(model, sq.collect_act_stats(model, calib_tokens(), progress=False), "O3")


def test_offloaded_weights_are_refused_before_any_work():
    model = make_model("llama")
    with torch.device("meta"):
        model.model.layers[1].mlp.down_proj = nn.Linear(256, 64, bias=False)  # as device_map offloading leaves it
    for call in (lambda: sq.smoothquant(model, calib_tokens(), _cfg()), lambda: sq.quantize_(model, _cfg())):
        with pytest.raises(ValueError, match=r"1 weights of the model are on the meta device \(e.g. "
                                             r"'model.layers.1.mlp.down_proj.weight'\): it was loaded with offloading"):
            call()
    assert not any(isinstance(m, W8A8Linear) for m in model.modules())


def test_statistics_of_another_model_type_are_warned_about():
    stats = sq.collect_act_stats(make_model("llama"), calib_tokens(), progress=False)
    mistral = make_model("mistral")  # same module names and shapes as the tiny Llama
    with pytest.warns(UserWarning, match="collected on a 'llama' model and this is a 'mistral' model"):
        sq.smoothquant(mistral, None, _cfg(), stats=stats)


def test_statistics_from_before_smoothing_are_refused_where_they_would_be_wrong(tmp_path):
    model = make_model("llama")
    stats = sq.collect_act_stats(model, calib_tokens(), progress=False)
    report = sq.smooth_(model, stats, _cfg())
    assert stats.meta["smoothed"] is False and report.stats.meta["smoothed"] is True
    with pytest.raises(ValueError, match="smooth_: the model was smoothed, and these statistics were collected "
                                         "before that"):
        sq.smooth_(model, stats, _cfg())
    with pytest.raises(ValueError, match="quantize_: the model was smoothed.*static scales would miss the smoothing"):
        sq.quantize_(model, _cfg(scheme="O3"), stats=stats)
    fresh = make_model("llama")  # smoothed statistics on a model that has not been smoothed
    for call in (lambda: sq.smooth_(fresh, report.stats, _cfg()),
                 lambda: sq.quantize_(fresh, _cfg(scheme="O3"), stats=report.stats)):
        with pytest.raises(ValueError, match="describe a smoothed model .* and this model has not been smoothed"):
            call()
    assert not any(isinstance(m, W8A8Linear) for m in list(model.modules()) + list(fresh.modules()))
    # the smoothing survives save_pretrained / from_pretrained (recorded in the config)
    from transformers import AutoModelForCausalLM
    model.save_pretrained(tmp_path / "smoothed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smoothed")
    assert reloaded.config.sq_smoothed["family"] == "Llama"
    with pytest.raises(ValueError, match="the model was smoothed"):
        sq.quantize_(reloaded, _cfg(scheme="O3"), stats=stats)
    assert sq.collect_act_stats(reloaded, calib_tokens(), progress=False).meta["smoothed"] is True
    sq.quantize_(model, _cfg(scheme="O3"), stats=report.stats)
    restats = sq.collect_act_stats(make_model("llama"), calib_tokens(), progress=False)
    assert restats.meta["smoothed"] is False
