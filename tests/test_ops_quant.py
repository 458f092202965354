"""CPU tests of the activation quantizers ``sq_kernels::quantize_per_token``,
``quantize_per_tensor_dynamic`` and ``quantize_static`` (sq_kernels/ops/quant.py).

The PyTorch reference is the CPU backend and the oracle of the CUDA tests
(tests/kernels/test_quant_kernels.py), so it is checked here against independent computations:
- the float32 semantics of quant.py evaluated through float64 (every float32 operation is the
  correctly rounded float64 result), bitwise;
- the real-valued quantizer ``x / scale`` in float64: off by at most half a step plus rounding;
- hand-made rows for ties, saturation, NaN, Inf, all-zero rows.
The bad-input table ``bad_inputs(device, other_device)`` is reused by the CUDA tests.
"""
from __future__ import annotations


import pytest
import torch

from sq_kernels import ops
from sq_kernels.ops import quant
from _checks import error_names

PER_TOKEN = torch.ops.sq_kernels.quantize_per_token.default
PER_TENSOR = torch.ops.sq_kernels.quantize_per_tensor_dynamic.default
STATIC = torch.ops.sq_kernels.quantize_static.default
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]
EPS32 = float(torch.tensor(quant.EPS, dtype=torch.float32))


def activations(m: int, h: int, dtype=torch.float32, seed: int = 0, device="cpu") -> torch.Tensor:
    """LLM-like activations: unit normal with a few outlier channels (x30)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, h, generator=g)
    if h > 8:
        x[:, torch.randint(0, h, (max(1, h // 64),), generator=g)] *= 30.0
    return x.to(dtype).to(device)


# ----------------------------------------------------------------------------------------------
# Independent oracles
# ----------------------------------------------------------------------------------------------
def round_half_even64(t: torch.Tensor) -> torch.Tensor:
    """Round half to even in float64, written out (floor and a parity test) rather than torch.round."""
    f = torch.floor(t)
    frac = t - f
    up = (frac > 0.5) | ((frac == 0.5) & (torch.remainder(f, 2) == 1))
    return f + up.to(t.dtype)


def sat64(t: torch.Tensor) -> torch.Tensor:
    r = torch.clamp(round_half_even64(t), -128, 127)
    return torch.where(torch.isnan(r), torch.zeros_like(r), r).to(torch.int8)


def fp32_quant_oracle(y32: torch.Tensor, amax32: torch.Tensor):
    """quant.py's float32 recipe through float64: each float32 op is a float64 op rounded once."""
    a = torch.where(amax32 < EPS32, torch.full_like(amax32, EPS32), amax32).double()
    scale = (a / 127.0).float()
    inv = (127.0 / a).float()
    prod = (y32.double() * inv.double()).float()
    return sat64(prod.double()), scale


def assert_close_to_real_quantizer(x_q, x, scale):
    """|x_q - x / scale| <= 1/2 (+ float32 evaluation), and |x_q| <= 127 for dynamic scales."""
    ideal = x.double() / scale.double().reshape(-1, 1)
    err = (x_q.double() - ideal).abs()
    assert err.max().item() <= 0.5 + 1e-4, f"int8 off the real quantizer by {err.max().item()}"


# ----------------------------------------------------------------------------------------------
# Per-token
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("h", [1, 17, 64, 1025, 5137])
def test_per_token_reference_is_the_float32_recipe_bitwise(dtype, h):
    x = activations(9, h, dtype, seed=h)
    x_q, scale = PER_TOKEN(x)
    amax = x.float().abs().amax(dim=1, keepdim=True)
    q_want, s_want = fp32_quant_oracle(x.float(), amax)
    assert torch.equal(scale, s_want.reshape(-1))
    assert torch.equal(x_q, q_want)
    assert_close_to_real_quantizer(x_q, x, scale)
    assert x_q.abs().max().item() == 127  # the row's largest element maps to +-127


def test_inverse_scale_is_a_true_division_not_a_reciprocal_times_127():
    # `127.0 / t` in PyTorch is reciprocal(t) * 127 (two roundings); the kernels divide once.
    amax = torch.tensor([[0.1], [3.0], [7.0], [10.0], [50.0]], dtype=torch.float32)
    a = torch.rand(200000, generator=torch.Generator().manual_seed(3)) * 100 + 1e-3
    assert not torch.equal(torch.full_like(a, 127.0) / a, 127.0 / a)  # the trap exists
    x = amax * torch.linspace(-1, 1, 101).reshape(1, -1)
    x_q, scale = PER_TOKEN(x)
    q_want, s_want = fp32_quant_oracle(x, amax)
    assert torch.equal(x_q, q_want) and torch.equal(scale, s_want.reshape(-1))


def test_ties_round_half_to_even():
    # amax 127 gives inv = 1 exactly, so x_q = rint(x)
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.5]])
    x_q, scale = PER_TOKEN(x)
    assert scale.item() == 1.0
    assert x_q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126, -126, 4]]


def test_all_zero_rows_get_a_finite_scale_and_zero_output():
    x = activations(4, 33)
    x[1] = 0
    x[3] = -0.0
    x_q, scale = PER_TOKEN(x)
    assert torch.isfinite(scale).all()
    assert scale[1].item() == scale[3].item() == float(torch.tensor(EPS32) / 127)
    assert not x_q[1].any() and not x_q[3].any()


def test_rows_below_eps_use_eps():
    x = torch.tensor([[1e-12, -2e-12, 5e-13], [1e-9, 0.0, -1e-9]])
    x_q, scale = PER_TOKEN(x)
    assert scale[0].item() == float(torch.tensor(EPS32) / 127)
    assert x_q[0].tolist() == [1, -3, 1]  # rint(x * 127 / EPS): 1.27, -2.54, 0.635
    assert x_q[1].tolist() == [127, 0, -127]


def test_nan_and_inf_rows_do_not_poison_other_rows():
    x = activations(6, 40, seed=5)
    bad = x.clone()
    bad[1, 7] = float("nan")
    bad[4, 0] = float("inf")
    x_q, scale = PER_TOKEN(bad)
    good = [0, 2, 3, 5]
    q_good, s_good = PER_TOKEN(x[good])
    assert torch.equal(x_q[good], q_good) and torch.equal(scale[good], s_good)
    assert torch.isnan(scale[1]) and not x_q[1].any()  # NaN row: NaN scale, zeros
    assert torch.isinf(scale[4]) and not x_q[4].any()  # Inf row: 127 / inf = 0 times everything


@pytest.mark.parametrize("h", [0, 16])
def test_m_zero_returns_empty_outputs(h):
    x_q, scale = PER_TOKEN(torch.empty(0, h, dtype=torch.float16))
    assert x_q.shape == (0, h) and x_q.dtype == torch.int8 and scale.shape == (0,)


def test_h_zero_gives_eps_scales():
    x_q, scale = PER_TOKEN(torch.empty(3, 0))
    assert x_q.shape == (3, 0) and scale.shape == (3,)
    assert torch.equal(scale, torch.full((3,), EPS32) / 127)


# ----------------------------------------------------------------------------------------------
# Per-tensor (dynamic and static)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_per_tensor_dynamic_reference_bitwise(dtype):
    x = activations(7, 100, dtype, seed=7)
    x_q, scale = PER_TENSOR(x)
    amax = x.float().abs().amax().reshape(1, 1)
    q_want, s_want = fp32_quant_oracle(x.float(), amax)
    assert scale.shape == (1,) and torch.equal(scale, s_want.reshape(1))
    assert torch.equal(x_q, q_want)
    assert x_q.abs().max().item() == 127


def test_per_tensor_dynamic_of_an_empty_tensor():
    for shape in [(0, 8), (4, 0)]:
        x_q, scale = PER_TENSOR(torch.empty(shape))
        assert x_q.shape == shape and torch.equal(scale, torch.tensor([EPS32]) / 127)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_static_divides_by_the_scale_and_saturates(dtype):
    scale = torch.tensor([0.05])
    x = torch.tensor([[0.0, 0.025, 0.075, -0.125, 6.35, 6.4, -6.4, -6.5, 100.0, -100.0]]).to(dtype)
    x_q = STATIC(x, scale)
    # one float32 division (correctly rounded, so float64 division rounded to float32), then rint
    quotient = (x.double() / scale.double()).float()
    assert torch.equal(x_q, sat64(quotient.double()))
    assert (x_q.int() - sat64(x.double() / scale.double()).int()).abs().max().item() <= 1
    assert x_q[0, 5].item() == 127 and x_q[0, -2].item() == 127
    assert x_q[0, 7].item() == -128 and x_q[0, -1].item() == -128


def test_static_maps_nan_to_zero_and_inf_to_the_ends():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0]])
    x_q = STATIC(x, torch.tensor([0.1]))
    assert x_q.tolist() == [[0, 127, -128, 10]]


def test_static_with_m_zero():
    assert STATIC(torch.empty(0, 32), torch.tensor([0.5])).shape == (0, 32)


# ----------------------------------------------------------------------------------------------
# Wrappers and views
# ----------------------------------------------------------------------------------------------
def test_wrappers_take_leading_dimensions():
    x = activations(6, 48).reshape(2, 3, 48)
    x_q, scale = ops.quantize_per_token(x)
    assert x_q.shape == (2, 3, 48) and scale.shape == (2, 3)
    q2, s2 = PER_TOKEN(x.reshape(6, 48))
    assert torch.equal(x_q.reshape(6, 48), q2) and torch.equal(scale.reshape(6), s2)
    x_q1, s1 = ops.quantize_per_token(x[0, 0])
    assert x_q1.shape == (48,) and s1.shape == ()
    qt, st = ops.quantize_per_tensor(x)
    assert qt.shape == x.shape and st.shape == (1,)
    static = torch.tensor([0.1])
    qs, ss = ops.quantize_per_tensor(x, static)
    assert torch.equal(qs.reshape(6, 48), STATIC(x.reshape(6, 48), static)) and ss.item() == static.item()


def test_row_strided_offset_and_transposed_views_equal_the_contiguous_result():
    base = activations(8, 100, torch.float16, seed=9)
    views = {
        "row_strided": base[:, 3:67],        # stride (100, 1), storage offset 3
        "every_other_row": base[::2, :64],   # stride (200, 1)
        "transposed": activations(64, 8, torch.float16, seed=10).t(),  # last-dim stride 8
    }
    for name, v in views.items():
        ref_q, ref_s = ops.quantize_per_token(v.contiguous())
        q, s = ops.quantize_per_token(v)
        assert torch.equal(q, ref_q) and torch.equal(s, ref_s), name
        tq, ts = ops.quantize_per_tensor(v)
        rq, rs = ops.quantize_per_tensor(v.contiguous())
        assert torch.equal(tq, rq) and torch.equal(ts, rs), name


def test_expanded_rows_with_zero_stride():
    row = activations(1, 32, seed=11)
    q, s = PER_TOKEN(row.expand(5, 32))
    q1, s1 = PER_TOKEN(row)
    assert torch.equal(q, q1.expand(5, 32)) and torch.equal(s, s1.expand(5))


# ----------------------------------------------------------------------------------------------
# Bad input (shared with the CUDA tests)
# ----------------------------------------------------------------------------------------------
def bad_inputs(device, other_device):
    """[(case id, zero-argument call, names one of which the ValueError must mention, op name)]."""
    d, od = device, other_device
    x = activations(4, 32, torch.float16, device=d)
    s = torch.tensor([0.1], device=d)
    cases = []
    for via, tok, tens, stat in (
        ("op", PER_TOKEN, PER_TENSOR, STATIC),
        ("wrapper", ops.quantize_per_token, ops.quantize_per_tensor,
         lambda x_, s_: ops.quantize_per_tensor(x_, s_)),
    ):
        cases += [
            (f"x_int8-{via}", lambda f=tok: f(x.to(torch.int8)), ["x"], "quantize_per_token"),
            (f"x_float64-{via}", lambda f=tok: f(x.double()), ["x"], "quantize_per_token"),
            (f"per_tensor_x_int32-{via}", lambda f=tens: f(x.to(torch.int32)), ["x"], "quantize_per_tensor"),
            (f"static_scale_fp16-{via}", lambda f=stat: f(x, s.half()), ["scale"], "quantize"),
            (f"static_scale_two_elements-{via}", lambda f=stat: f(x, torch.ones(2, device=d)), ["scale"], "quantize"),
            (f"static_scale_other_device-{via}", lambda f=stat: f(x, s.to(od)), ["scale"], "quantize"),
            (f"static_x_bool-{via}", lambda f=stat: f(x.bool(), s), ["x"], "quantize"),
        ]
    cases += [
        ("x_3d-op", lambda: PER_TOKEN(x.reshape(2, 2, 32)), ["x"], "quantize_per_token"),
        ("x_1d-op", lambda: PER_TENSOR(x[0]), ["x"], "quantize_per_tensor_dynamic"),
        ("x_transposed-op", lambda: PER_TOKEN(x.t()), ["x"], "quantize_per_token"),
        ("static_x_transposed-op", lambda: STATIC(x.t(), s), ["x"], "quantize_static"),
        ("x_zero_dim-wrapper", lambda: ops.quantize_per_token(x[0, 0]), ["x"], "quantize_per_token"),
        ("x_not_a_tensor-wrapper", lambda: ops.quantize_per_token([[1.0]]), ["x"], "quantize_per_token"),
    ]
    return cases




_CPU_BAD = bad_inputs("cpu", "meta")


@pytest.mark.parametrize("case", _CPU_BAD, ids=[c[0] for c in _CPU_BAD])
def test_rejects_bad_input_naming_the_argument(case):
    case_id, call, names, op_name = case
    with pytest.raises(ValueError) as info:
        call()
    assert error_names(info.value, op_name, names), f"{case_id}: the error should name {names}: {info.value}"


# ----------------------------------------------------------------------------------------------
# torch.library integration
# ----------------------------------------------------------------------------------------------
def opcheck_cases():
    x = activations(5, 48, torch.float16, seed=12)
    return [
        ("per_token_fp16", PER_TOKEN, (x,)),
        ("per_token_bf16_m0", PER_TOKEN, (x[:0].bfloat16(),)),
        ("per_tensor_fp32", PER_TENSOR, (x.float(),)),
        ("static_fp16", STATIC, (x, torch.tensor([0.05]))),
    ]


@pytest.mark.parametrize("case", opcheck_cases(), ids=[c[0] for c in opcheck_cases()])
def test_opcheck(case):
    torch.library.opcheck(case[1], case[2])


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(7, 64, dtype=torch.bfloat16)
        q, s = PER_TOKEN(x)
        assert q.shape == (7, 64) and q.dtype == torch.int8 and s.shape == (7,) and s.dtype == torch.float32
        assert PER_TENSOR(x)[1].shape == (1,)
        assert STATIC(x, torch.empty(1)).dtype == torch.int8
        with pytest.raises(ValueError, match="scale"):
            STATIC(x, torch.empty(2))
