"""quantize_ converts module by module (the default): each floating-point original is freed before the next
W8A8 module is built, bad weights are refused before anything changes, and a failure half-way says exactly
what was converted, leaves a model that runs, and is finished by calling quantize_ again. ``atomic=True``
keeps the build-everything-first behaviour."""
import copy
import gc
import weakref

import pytest
import torch

import sq_kernels as sq
from sq_kernels.nn import W8A8Experts, W8A8Linear
from sq_kernels.nn import convert as convert_mod
from sq_kernels.nn._quant import quantize_weight

from conftest import calib_tokens, make_model
from conftest import logits as _logits

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw):
    return sq.SmoothQuantConfig(progress=False, smooth=False, **kw)


def _count_w8a8(model) -> int:
    return sum(isinstance(m, (W8A8Linear, W8A8Experts)) for m in model.modules())


def _fail_at(monkeypatch, n: int, exc: BaseException):
    original = convert_mod.build_module
    calls = {"n": 0}

    def flaky(entry, stats=None):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return original(entry, stats)

    monkeypatch.setattr(convert_mod, "build_module", flaky)


@pytest.mark.parametrize("atomic", [False, True])
def test_originals_are_freed_one_by_one(monkeypatch, atomic):
    model = make_model("llama")
    refs = [weakref.ref(m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    original = convert_mod.build_module
    alive_at_build = []

    def counting(entry, stats=None):
        gc.collect()
        alive_at_build.append(sum(r() is not None for r in refs))
        return original(entry, stats)

    monkeypatch.setattr(convert_mod, "build_module", counting)
    sq.quantize_(model, _cfg(), atomic=atomic)
    n = len(refs)
    assert len(alive_at_build) == n
    if atomic:  # everything is built while every original is still in the model
        assert alive_at_build == [n] * n
    else:  # module i is built when the i before it are gone
        assert alive_at_build == [n - i for i in range(n)]
    gc.collect()
    assert all(r() is None for r in refs)


def test_streamed_equals_atomic():
    a, b = make_model("mixtral"), make_model("mixtral")
    ra, rb = sq.quantize_(a, _cfg()), sq.quantize_(b, _cfg(), atomic=True)
    assert ra.converted == rb.converted and ra.kept == rb.kept
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = calib_tokens(2, 16, seed=3)
    assert torch.equal(_logits(a, x), _logits(b, x))


@pytest.mark.parametrize("atomic", [False, True])
@pytest.mark.parametrize("family,target,what", [
    ("llama", "model.layers.1.mlp.up_proj", "weight"),
    ("opt", "model.decoder.layers.1.fc1", "bias"),
    ("mixtral", "model.layers.1.mlp.experts", "down_proj"),
])
def test_non_finite_weights_change_nothing(family, target, what, atomic):
    model = make_model(family)
    t = getattr(model.get_submodule(target), what)
    with torch.no_grad():
        t.view(-1)[-1] = float("nan")  # the last expert's last element for fused experts
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = f"{target}.{what}" + (f"\\[{t.shape[0] - 1}\\]" if t.dim() == 3 else "")
    with pytest.raises(ValueError, match=f"{expected} contains NaN or Inf(.|\\n)*nothing was converted"):
        sq.quantize_(model, _cfg(), atomic=atomic)
    assert _count_w8a8(model) == 0
    after = model.state_dict()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)


def test_failure_half_way_says_what_was_converted_and_resumes(monkeypatch, tmp_path):
    model = make_model("llama")
    reference = copy.deepcopy(model)
    sq.quantize_(reference, _cfg())
    _fail_at(monkeypatch, 5, RuntimeError("CUDA out of memory (simulated)"))
    with pytest.raises(sq.PartialConversionError, match="out of memory(.|\\n)*converted 4 of 14") as info:
        sq.quantize_(model, _cfg())
    err = info.value
    assert len(err.converted) == 4 and len(err.remaining) == 10
    assert err.remaining[0] == "model.layers.0.mlp.gate_proj"
    for name in err.converted:
        assert isinstance(model.get_submodule(name), W8A8Linear)
    for name in err.remaining:
        assert type(model.get_submodule(name)) is torch.nn.Linear
    x = calib_tokens(2, 16, seed=3)
    assert torch.isfinite(_logits(model, x)).all()  # a mixed model runs
    with pytest.raises(RuntimeError, match="save_quantized"):  # it holds int8 weights: HF saving is guarded
        model.save_pretrained("unused")
    with pytest.raises(ValueError, match=r"only partly converted .*10 module\(s\) left.*quantize_ again"):
        sq.save_quantized(model, tmp_path / "partial", progress=False)  # nor can it be saved as if it were whole
    assert not (tmp_path / "partial" / "sq_quantization.json").exists()
    monkeypatch.undo()
    report = sq.quantize_(model, _cfg())  # finishes the job
    assert len(report.converted) == 14  # the 10 left and the 4 the first call converted, with their scheme
    sq.save_quantized(model, tmp_path / "whole", progress=False)
    assert all(n in report.converted and n not in report.kept for n in err.converted)
    assert torch.equal(_logits(model, x), _logits(reference, x))


def test_interrupt_half_way_keeps_its_type_with_an_account(monkeypatch):
    model = make_model("llama")
    _fail_at(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt) as info:
        sq.quantize_(model, _cfg())
    assert _count_w8a8(model) == 2
    notes = getattr(info.value, "__notes__", [])
    assert any("converted 2 of 14" in n for n in notes)


def test_smoothquant_failure_half_way(monkeypatch):
    model = make_model("llama")
    _fail_at(monkeypatch, 2, RuntimeError("simulated"))
    with pytest.raises(sq.PartialConversionError, match="converted 1 of 14(.|\\n)*smoothed first") as info:
        sq.smoothquant(model, calib_tokens(), sq.SmoothQuantConfig(progress=False))
    assert len(info.value.converted) == 1


def test_atomic_must_be_a_bool():
    with pytest.raises(ValueError, match="atomic must be True or False"):
        sq.quantize_(make_model("llama"), _cfg(), atomic="yes")


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_stacked_weights_quantized_matrix_by_matrix(granularity):
    w = torch.randn(3, 32, 48) * torch.tensor([0.01, 1.0, 30.0]).view(3, 1, 1)
    w_q, scale = quantize_weight(w, granularity)
    amax = w.abs().amax(dim=-1) if granularity == "per_channel" else w.abs().flatten(-2).amax(-1, keepdim=True)
    expected_scale = amax / torch.full_like(amax, 127.0)
    assert w_q.shape == w.shape and w_q.dtype == torch.int8
    assert scale.shape == expected_scale.shape and torch.equal(scale, expected_scale)
    assert torch.equal(w_q, torch.clamp(torch.round(w / expected_scale.unsqueeze(-1)), -127, 127).to(torch.int8))


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_blocking_does_not_change_the_result(monkeypatch, granularity, dtype):
    from sq_kernels.nn import _quant
    w = (torch.randn(2, 96, 80) * torch.logspace(-3, 2, 80)).to(dtype)  # outlier columns, as after smoothing
    whole_q, whole_s = quantize_weight(w, granularity)
    monkeypatch.setattr(_quant, "CHUNK", 7 * 80 + 3)  # 7 rows per block, the last block short
    blocked_q, blocked_s = quantize_weight(w, granularity)
    assert torch.equal(whole_q, blocked_q) and torch.equal(whole_s, blocked_s)
    w[1, 50, 3] = float("inf")
    with pytest.raises(ValueError, match=r"weight\[1\] contains NaN or Inf"):
        quantize_weight(w, granularity)


def test_quantize_weight_needs_a_matrix():
    with pytest.raises(ValueError, match=r"must be a matrix \[N, K\].*got shape \(16,\)"):
        quantize_weight(torch.ones(16), "per_channel")


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_quantize_weight_leaves_its_input_alone(granularity, dtype):
    w = torch.randn(48, 32).to(dtype)  # negative values: an in-place abs on a float32 input would show
    before = w.clone()
    quantize_weight(w, granularity)
    assert torch.equal(w, before)


def test_first_module_failing_converts_nothing(monkeypatch):
    model = make_model("llama")
    _fail_at(monkeypatch, 1, RuntimeError("CUDA out of memory (simulated)"))
    with pytest.raises(RuntimeError, match="nothing was converted: CUDA out of memory") as info:
        sq.quantize_(model, _cfg())
    assert not isinstance(info.value, sq.PartialConversionError)
    assert _count_w8a8(model) == 0
    assert "save_pretrained" not in vars(model)  # no int8 module went in: HF saving is not guarded
