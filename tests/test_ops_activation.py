"""CPU tests of the activation + quantize ops ``sq_kernels::act_quant`` (ReLU, GELU, GELU-tanh) and
``sq_kernels::silu_mul_quant`` (sq_kernels/ops/activation.py).

The PyTorch reference is the CPU backend and the oracle of the CUDA tests
(tests/kernels/test_quant_kernels.py). Here it is checked against the float64
``torch.nn.functional`` activations (``relu``, ``gelu``, ``gelu(approximate="tanh")``, ``silu``)
followed by the real-valued quantizer: scales within rtol 1e-6, int8 values off by at most 1 on at
most 0.1% of the elements. The bad-input table ``bad_inputs(device, other_device)`` is reused by
the CUDA tests.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from sq_kernels import ops
from sq_kernels.ops import quant
from _checks import error_names

ACT_QUANT = torch.ops.sq_kernels.act_quant.default
SILU_MUL = torch.ops.sq_kernels.silu_mul_quant.default
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]
EPS32 = float(torch.tensor(quant.EPS, dtype=torch.float32))
ACTS = ["relu", "gelu", "gelu_tanh"]


def activations(m, h, dtype=torch.float32, seed=0, device="cpu", scale=3.0):
    """Pre-activation values: normal (x3, so GELU's curved part and tails both matter), a few outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, h, generator=g) * scale
    if h > 8:
        x[:, torch.randint(0, h, (max(1, h // 64),), generator=g)] *= 10.0
    return x.to(dtype).to(device)


def act64(act, x64):
    if act == "relu":
        return F.relu(x64)
    if act == "gelu":
        return F.gelu(x64)
    return F.gelu(x64, approximate="tanh")


def quantize_oracle(y64, scale=None):
    """The quantization recipe of quant.py applied to the exact ``y64`` rounded once to float32,
    evaluated in float64 (each float32 operation is the float64 result rounded once): an oracle
    independent of the reference's own evaluation of ``y``. Returns (int8, float64 scale)."""
    y32 = y64.float().double()
    if scale is None:
        amax = y32.abs().amax(dim=1, keepdim=True) if y32.shape[1] else torch.zeros(y32.shape[0], 1).double()
        a = torch.clamp_min(amax, EPS32)
        inv = (127.0 / a).float().double()
        t = (y32 * inv).float().double()
        s64 = (y64.abs().amax(dim=1) if y64.shape[1] else torch.zeros(y64.shape[0]).double())
        s64 = torch.clamp_min(s64, EPS32) / 127.0
    else:
        s64 = scale.double().reshape(1)
        t = (y32 / s64).float().double()
    r = torch.clamp(torch.round(t), -128, 127)
    return torch.where(torch.isnan(r), torch.zeros_like(r), r).to(torch.int8), s64


def assert_int8_close(x_q, want, what, frac=1e-3):
    diff = (x_q.int() - want.int()).abs()
    assert diff.numel() == 0 or diff.max().item() <= 1, f"{what}: int8 off by {diff.max().item()}"
    n_off = int((diff != 0).sum())
    assert n_off <= max(1, frac * diff.numel()), f"{what}: {n_off} of {diff.numel()} int8 values off by one"


def check(x_q, x_scale, y64, what, static=None):
    q64, s64 = quantize_oracle(y64, static)
    if static is None:
        torch.testing.assert_close(x_scale.double(), s64, rtol=1e-6, atol=0, msg=lambda m: f"{what}: scales {m}")
    else:
        assert torch.equal(x_scale, static) and x_scale.data_ptr() != static.data_ptr()
    assert_int8_close(x_q, q64, what)


@pytest.mark.parametrize("h", [1, 17, 1025, 5137])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTS)
def test_act_quant_matches_float64_activation_then_quantize(act, dtype, h):
    x = activations(6, h, dtype, seed=h)
    y64 = act64(act, x.double())
    x_q, x_scale = ACT_QUANT(x, act, None)
    check(x_q, x_scale, y64, f"{act}/{dtype}/H={h}")
    static = (y64.abs().max().float() / 110.0).reshape(1)
    check(*ACT_QUANT(x, act, static), y64, f"{act}/{dtype}/H={h} static", static)


@pytest.mark.parametrize("h", [1, 17, 1025, 5137])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_silu_mul_matches_float64_then_quantize(dtype, h):
    g = activations(6, h, dtype, seed=h)
    u = activations(6, h, dtype, seed=h + 1, scale=1.0)
    y64 = F.silu(g.double()) * u.double()
    check(*SILU_MUL(g, u, None), y64, f"silu_mul/{dtype}/H={h}")
    static = (y64.abs().max().float() / 110.0).reshape(1)
    check(*SILU_MUL(g, u, static), y64, f"silu_mul/{dtype}/H={h} static", static)


def test_wrappers_pick_the_activation():
    x = activations(4, 64).reshape(2, 2, 64)
    for fn, act in ((lambda t: ops.relu_quant(t), "relu"), (lambda t: ops.gelu_quant(t), "gelu"),
                    (lambda t: ops.gelu_quant(t, approximate="tanh"), "gelu_tanh")):
        q, s = fn(x)
        assert q.shape == (2, 2, 64) and s.shape == (2, 2)
        q2, s2 = ACT_QUANT(x.reshape(4, 64), act, None)
        assert torch.equal(q.reshape(4, 64), q2) and torch.equal(s.reshape(4), s2)
    static = torch.tensor([0.05])
    q, s = ops.relu_quant(x, scale=static)
    assert torch.equal(s, static) and torch.equal(q.reshape(4, 64), ACT_QUANT(x.reshape(4, 64), "relu", static)[0])


def test_relu_output_is_non_negative_and_gelu_variants_differ():
    x = activations(8, 256)
    q, _ = ops.relu_quant(x)
    assert q.min().item() == 0 and q.max().item() == 127
    q_erf, _ = ops.gelu_quant(x)
    q_tanh, _ = ops.gelu_quant(x, approximate="tanh")
    assert q_erf.min().item() < 0  # GELU dips below zero
    # the tanh form differs from erf by up to ~1e-3 absolute: visible at int8 resolution on a few values
    assert not torch.equal(ACT_QUANT(x, "gelu", torch.tensor([1e-4]))[0],
                           ACT_QUANT(x, "gelu_tanh", torch.tensor([1e-4]))[0])


def test_silu_mul_with_fused_gate_up_halves_equals_separate_tensors():
    gu = activations(6, 128, torch.float16, seed=3).reshape(2, 3, 128)
    q, s = ops.silu_mul_quant(gu)
    q2, s2 = ops.silu_mul_quant(gu[..., :64].contiguous(), gu[..., 64:].contiguous())
    assert q.shape == (2, 3, 64) and s.shape == (2, 3)
    assert torch.equal(q, q2) and torch.equal(s, s2)


def test_strided_and_transposed_views_equal_the_contiguous_result():
    wide = activations(8, 200, torch.bfloat16, seed=4)
    for name, x in {"row_strided": wide[:, 7:103], "every_other_row": wide[::2, :96],
                    "transposed": activations(96, 8, torch.bfloat16, seed=5).t()}.items():
        for fn in (ops.relu_quant, ops.gelu_quant):
            got, want = fn(x), fn(x.contiguous())
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name
        got = ops.silu_mul_quant(x, x * 0.5)
        want = ops.silu_mul_quant(x.contiguous(), (x * 0.5).contiguous())
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), name


@pytest.mark.parametrize("act", ACTS + ["silu_mul"])
def test_zero_nan_and_inf_rows(act):
    x = activations(6, 50, torch.float16, seed=6)
    x[0] = 0
    bad = x.clone()
    bad[2, 3] = float("nan")
    bad[4, 9] = float("inf") if act != "relu" else float("nan")

    def run(t):
        return SILU_MUL(t, t, None) if act == "silu_mul" else ACT_QUANT(t, act, None)

    q, s = run(bad)
    good = [0, 1, 3, 5]
    gq, gs = run(x[good])
    assert torch.equal(q[good], gq) and torch.equal(s[good], gs)
    assert torch.isfinite(s[0]) and not q[0].any()
    assert torch.isnan(s[2]) and not q[2].any()
    assert not q[4].any()  # inf in y gives an inf scale and zeros; silu(inf) * inf, gelu(inf) = inf


def test_m_zero_returns_empty_outputs():
    x = torch.empty(0, 32, dtype=torch.float16)
    q, s = ACT_QUANT(x, "gelu", None)
    assert q.shape == (0, 32) and s.shape == (0,)
    q, s = SILU_MUL(x, x, torch.tensor([0.25]))
    assert q.shape == (0, 32) and s.tolist() == [0.25]


# ----------------------------------------------------------------------------------------------
# Bad input (shared with the CUDA tests)
# ----------------------------------------------------------------------------------------------
def bad_inputs(device, other_device):
    """[(case id, zero-argument call, names one of which the ValueError must mention, op name)]."""
    d, od = device, other_device
    x = activations(4, 64, torch.float16, device=d)
    s = torch.tensor([0.1], device=d)
    return [
        ("act_unknown-op", lambda: ACT_QUANT(x, "swish", None), ["act"], "act_quant"),
        ("x_int8-op", lambda: ACT_QUANT(x.to(torch.int8), "relu", None), ["x"], "act_quant"),
        ("x_3d-op", lambda: ACT_QUANT(x.reshape(2, 2, 64), "gelu", None), ["x"], "act_quant"),
        ("x_transposed-op", lambda: ACT_QUANT(x.t(), "gelu", None), ["x"], "act_quant"),
        ("scale_fp16-op", lambda: ACT_QUANT(x, "relu", s.half()), ["scale"], "act_quant"),
        ("scale_two_elements-op", lambda: ACT_QUANT(x, "relu", torch.ones(2, device=d)), ["scale"], "act_quant"),
        ("scale_other_device-op", lambda: ACT_QUANT(x, "relu", s.to(od)), ["scale"], "act_quant"),
        ("x_float64-wrapper", lambda: ops.relu_quant(x.double()), ["x"], "act_quant"),
        ("approximate_unknown-wrapper", lambda: ops.gelu_quant(x, approximate="fast"), ["approximate"], "gelu_quant"),
        ("x_not_a_tensor-wrapper", lambda: ops.gelu_quant(3.0), ["x"], "gelu_quant"),
        ("gate_int8-op", lambda: SILU_MUL(x.to(torch.int8), x, None), ["gate"], "silu_mul_quant"),
        ("up_int8-op", lambda: SILU_MUL(x, x.to(torch.int8), None), ["up"], "silu_mul_quant"),
        ("up_bf16-op", lambda: SILU_MUL(x, x.bfloat16(), None), ["up"], "silu_mul_quant"),
        ("up_wrong_shape-op", lambda: SILU_MUL(x, x[:2], None), ["up"], "silu_mul_quant"),
        ("up_other_device-op", lambda: SILU_MUL(x, x.to(od), None), ["up"], "silu_mul_quant"),
        ("up_transposed-op", lambda: SILU_MUL(x[:, :4], x.t()[:4], None), ["up"], "silu_mul_quant"),
        ("gate_3d-op", lambda: SILU_MUL(x.reshape(2, 2, 64), x.reshape(2, 2, 64), None), ["gate"],
         "silu_mul_quant"),
        ("scale_int-op", lambda: SILU_MUL(x, x, torch.ones(1, dtype=torch.int32, device=d)), ["scale"],
         "silu_mul_quant"),
        ("up_wrong_shape-wrapper", lambda: ops.silu_mul_quant(x, x[:, :32]), ["up"], "silu_mul_quant"),
        ("odd_fused_width-wrapper", lambda: ops.silu_mul_quant(x[:, :63]), ["gate"], "silu_mul_quant"),
        ("up_bf16-wrapper", lambda: ops.silu_mul_quant(x, x.bfloat16()), ["up"], "silu_mul_quant"),
    ]




_CPU_BAD = bad_inputs("cpu", "meta")


@pytest.mark.parametrize("case", _CPU_BAD, ids=[c[0] for c in _CPU_BAD])
def test_rejects_bad_input_naming_the_argument(case):
    case_id, fn, names, op_name = case
    with pytest.raises(ValueError) as info:
        fn()
    assert error_names(info.value, op_name, names), f"{case_id}: the error should name {names}: {info.value}"


# ----------------------------------------------------------------------------------------------
# torch.library integration
# ----------------------------------------------------------------------------------------------
def opcheck_cases():
    x = activations(5, 48, torch.float16, seed=12)
    u = activations(5, 48, torch.float16, seed=13)
    s = torch.tensor([0.05])
    return [
        ("relu_dynamic", ACT_QUANT, (x, "relu", None)),
        ("gelu_static_bf16", ACT_QUANT, (x.bfloat16(), "gelu", s)),
        ("gelu_tanh_fp32_m0", ACT_QUANT, (x.float()[:0], "gelu_tanh", None)),
        ("silu_mul_dynamic", SILU_MUL, (x, u, None)),
        ("silu_mul_static", SILU_MUL, (x, u, s)),
    ]


@pytest.mark.parametrize("case", opcheck_cases(), ids=[c[0] for c in opcheck_cases()])
def test_opcheck(case):
    torch.library.opcheck(case[1], case[2])
