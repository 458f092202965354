"""CPU tests of the GEMM ops ``sq_kernels::scaled_mm`` and ``sq_kernels::int8_mm`` (sq_kernels/ops/gemm.py).

The PyTorch reference is the CPU backend and the oracle of the CUDA tests, so it is checked here
against an independent computation: int64 integer products for the accumulator, float64 (and exact
rational arithmetic for ties) for the epilogue. The bad-input table ``scaled_mm_bad_inputs`` /
``int8_mm_bad_inputs`` covers every check in gemm.py; tests/kernels/test_gemm_kernels.py runs the same
table on CUDA tensors against the C++ checks.
"""
from __future__ import annotations

import itertools
import re

import pytest
import torch

from sq_kernels import ops
from sq_kernels.ops import gemm
from _checks import error_names

SCALED_MM = torch.ops.sq_kernels.scaled_mm.default
INT8_MM = torch.ops.sq_kernels.int8_mm.default
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


# ----------------------------------------------------------------------------------------------
# Independent oracles
# ----------------------------------------------------------------------------------------------
def randint8(*shape, generator=None, device="cpu", extremes=False):
    """Random int8 in [-128, 127] (both ends included); ``extremes`` draws only from {-128, -127, 127}."""
    if extremes:
        pool = torch.tensor([-128, -127, 127], dtype=torch.int8)
        idx = torch.randint(0, 3, shape, generator=generator)
        return pool[idx].to(device)
    return torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8).to(device)


def int64_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a [M,K] @ w [N,K]^T`` in int64 on the CPU: integer arithmetic, independent of the float64 reference."""
    return a.cpu().to(torch.int64) @ w.cpu().to(torch.int64).t()


def epilogue_float64(acc, a_scale, w_scale, bias=None, relu=False) -> torch.Tensor:
    """The dequantization in float64 (no intermediate rounding), from the float32 scale values."""
    y = acc.to(torch.float64) * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double().reshape(1, -1)
    return torch.clamp_min(y, 0.0) if relu else y


def ulp(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` (fp16/bf16) values around |y| (float64), subnormals included."""
    finfo = torch.finfo(dtype)
    mag = y.abs().clamp_min(finfo.tiny)
    _, exp = torch.frexp(mag)  # mag = m * 2**exp, m in [0.5, 1)
    return torch.ldexp(torch.ones_like(mag), (exp - 1 - MANTISSA_BITS[dtype]).to(torch.int32))


def assert_within_rounding(out: torch.Tensor, y64: torch.Tensor, mag64: torch.Tensor | None = None,
                           what: str = "") -> None:
    """``out`` (fp16/bf16) is the exact value ``y64`` rounded to its dtype, give or take the float32 epilogue.

    Bound per element: one spacing of the output dtype at ``y64`` (correct rounding needs half; the
    other half lets a float32 value next to a tie go either way), plus 4 float32 rounding errors of
    the terms' magnitude ``mag64`` = |a_scale * w_scale * acc| + |bias| (float(acc), the two products
    and the add, whose cancellation can leave |y| far below its terms).
    """
    assert out.dtype in MANTISSA_BITS, out.dtype
    o = out.double()
    y64 = y64.to(o.device)
    both_finite = torch.isfinite(o) & torch.isfinite(y64)
    assert torch.equal(o.isnan(), y64.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(o.isinf(), y64.isinf()) and torch.equal(o[o.isinf()], y64[o.isinf()]), \
        f"{what}: infinities differ"
    bound = ulp(y64, out.dtype)
    if mag64 is not None:
        bound = bound + 4 * 2.0 ** -24 * mag64.to(o.device)
    bad = both_finite & ~((o - y64).abs() <= bound)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off by more than their bound "
                             f"for {out.dtype}; first at {i}: got {o[i].item()!r}, exact {y64[i].item()!r}, "
                             f"bound {bound[i].item():.3g}")


def magnitude64(acc, a_scale, w_scale, bias=None) -> torch.Tensor:
    """|a_scale * w_scale * acc| + |bias| in float64: the size of the terms the float32 epilogue adds."""
    mag = (acc.to(torch.float64) * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)).abs()
    return mag + bias.double().abs().reshape(1, -1) if bias is not None else mag


def expected_int8(y64: torch.Tensor, out_scale: float) -> torch.Tensor:
    """saturate_int8(round_half_even(y / out_scale)), from the exact value."""
    return torch.clamp(torch.round(y64 / out_scale), -128, 127).to(torch.int8)


def make_scales(m, n, k, a_gran, w_gran, generator, device="cpu"):
    """Positive float32 scales that keep outputs O(1): per-tensor -> [1], per-token -> [M], per-channel -> [N]."""
    a_len = m if a_gran == "token" else 1
    w_len = n if w_gran == "channel" else 1
    a_scale = (torch.rand(a_len, generator=generator) + 0.5) / 127.0
    w_scale = (torch.rand(w_len, generator=generator) + 0.5) / (127.0 * max(k, 1) ** 0.5 / 4)
    return a_scale.to(device), w_scale.to(device)


# ----------------------------------------------------------------------------------------------
# The integer accumulator
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,k", [(1, 16, 16), (7, 48, 64), (33, 80, 272), (128, 16, 1040)])
@pytest.mark.parametrize("extremes", [False, True], ids=["random", "pm127_m128"])
def test_int8_mm_bitwise_equals_int64_product(m, n, k, extremes):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    a = randint8(m, k, generator=g, extremes=extremes)
    w = randint8(n, k, generator=g, extremes=extremes)
    out = ops.int8_mm(a, w)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out.to(torch.int64), int64_matmul(a, w))
    assert torch.equal(INT8_MM(a, w), out)
    assert torch.equal(gemm.int_matmul_reference(a, w), out)


def test_random_operands_reach_both_ends_of_int8():
    # torch.randint's upper bound is exclusive: the helper must still produce 127 (and -128).
    x = randint8(64, 64, generator=torch.Generator().manual_seed(0))
    assert int(x.max()) == 127 and int(x.min()) == -128


@pytest.mark.parametrize("k", [16400, 131056], ids=["K16400", "K131056_int32_edge"])
def test_int8_mm_long_k_worst_case_is_exact(k):
    # all -128 x -128: acc = 16384 * K. K = 131056 is the largest multiple of 16 whose worst case
    # still fits int32 (16384 * 131072 = 2**31 would not).
    a = torch.full((3, k), -128, dtype=torch.int8)
    w = torch.full((16, k), -128, dtype=torch.int8)
    w[1] = 127
    w[2, ::2] = -128
    w[2, 1::2] = 127
    out = ops.int8_mm(a, w)
    assert int(out[0, 0]) == 16384 * k
    assert int(out[0, 1]) == -128 * 127 * k
    assert int(out[0, 2]) == (16384 - 128 * 127) * (k // 2)
    assert torch.equal(out.to(torch.int64), int64_matmul(a, w))


@pytest.mark.parametrize("m", [1, 16, 17], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("extremes", [False, True], ids=["random", "pm127_m128"])
def test_cpu_reference_decode_blocks_and_k_slices_are_exact(m, extremes):
    # M <= 16 takes the weight in blocks of DECODE_BLOCK_N rows (1040 = 2 full blocks and a partial one),
    # and K = 2064 is two full float32 slices and a partial one: every block and slice boundary is crossed.
    assert gemm.DECODE_MAX_M == 16 and gemm.DECODE_BLOCK_N == 512 and gemm.EXACT_FLOAT32_K == 1024
    g = torch.Generator().manual_seed(m)
    a = randint8(m, 2064, generator=g, extremes=extremes)
    w = randint8(1040, 2064, generator=g, extremes=extremes)
    a[0] = -128
    w[-1] = -128  # the worst-case row and column: 16384 * 2064 > 2**24, beyond one float32 GEMM
    out = gemm.int_matmul_reference(a, w)
    assert out.dtype == torch.int32 and out.shape == (m, 1040)
    assert int(out[0, -1]) == 16384 * 2064
    assert torch.equal(out.to(torch.int64), int64_matmul(a, w))


def test_cpu_reference_batched_long_k_is_exact():
    # int8_bmm's reference (P @ V has K = the key length, well beyond one float32 slice).
    g = torch.Generator().manual_seed(3)
    a = randint8(2, 5, 2080, generator=g, extremes=True)
    b = randint8(2, 48, 2080, generator=g, extremes=True)
    a[1, 2] = -128
    b[1, 7] = -128
    out = gemm.int_matmul_reference(a, b)
    want = torch.stack([int64_matmul(a[i], b[i]) for i in range(2)])
    assert int(out[1, 2, 7]) == 16384 * 2080
    assert torch.equal(out.to(torch.int64), want)
    assert torch.equal(ops.int8_bmm(a, b).to(torch.int64), want)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_cpu_reference_falls_back_to_float64_when_float32_matmuls_may_be_inexact(precision):
    # TF32 / bf16 float32 GEMMs would round the sums: the reference must then not use float32 at all.
    a = torch.full((4, 2048), -128, dtype=torch.int8)
    w = torch.full((1040, 2048), -127, dtype=torch.int8)
    w[:, ::3] = 127
    before = torch.get_float32_matmul_precision()
    assert gemm._float32_matmul_is_strict(torch.device("cpu")) == (before == "highest")
    try:
        torch.set_float32_matmul_precision(precision)
        assert not gemm._float32_matmul_is_strict(torch.device("cpu"))
        out = gemm.int_matmul_reference(a, w)
    finally:
        torch.set_float32_matmul_precision(before)
    assert torch.equal(out.to(torch.int64), int64_matmul(a, w))


# ----------------------------------------------------------------------------------------------
# The dequantizing epilogue
# ----------------------------------------------------------------------------------------------
GRANULARITIES = list(itertools.product(["tensor", "token"], ["tensor", "channel"]))


@pytest.mark.parametrize("a_gran,w_gran", GRANULARITIES, ids=[f"a_{a}-w_{w}" for a, w in GRANULARITIES])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
def test_scaled_mm_within_output_rounding(a_gran, w_gran, out_dtype, bias, relu):
    m, n, k = 37, 96, 528
    g = torch.Generator().manual_seed(GRANULARITIES.index((a_gran, w_gran)) * 4 + 2 * bias + relu)
    a, w = randint8(m, k, generator=g), randint8(n, k, generator=g)
    a_scale, w_scale = make_scales(m, n, k, a_gran, w_gran, g)
    b = torch.randn(n, generator=g) if bias else None
    out = ops.scaled_mm(a, w, a_scale, w_scale, bias=b, out_dtype=out_dtype, relu=relu)
    assert out.dtype == out_dtype and out.shape == (m, n)
    y64 = epilogue_float64(int64_matmul(a, w), a_scale, w_scale, b, relu)
    assert y64.abs().max() > 0.5, "the test data should produce outputs of order 1"
    acc = int64_matmul(a, w)
    assert_within_rounding(out, y64, magnitude64(acc, a_scale, w_scale, b),
                           f"scaled_mm {a_gran}/{w_gran} {out_dtype} bias={bias} relu={relu}")
    if relu:
        pre = epilogue_float64(int64_matmul(a, w), a_scale, w_scale, b)
        assert (pre < 0).any() and (out >= 0).all(), "relu must clip the negative outputs"
    assert torch.equal(SCALED_MM(a, w, a_scale, w_scale, b, out_dtype, None, relu), out)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_scaled_mm_rounds_ties_to_even(out_dtype):
    # With w = 1 everywhere, acc[m, :] is the row sum of a; w_scale = 2**-(mantissa + 1) then puts
    # acc = 2**(mantissa + 1) + odd exactly halfway between two neighbours of the output dtype near 1.0:
    # round-to-nearest-even must pick the even one. float64 holds every y exactly, and torch's
    # float64 -> fp16/bf16 cast rounds once, so it is the exact answer.
    mant = MANTISSA_BITS[out_dtype]
    half = 2 ** (mant + 1)
    accs = [half + 1, half + 3, half + 5, half - 1, -(half + 1), -(half + 3), 0, 1]
    cols = 16 * (-(-(half + 5) // (127 * 16)) + 1)
    a_q = torch.zeros(len(accs), cols, dtype=torch.int8)
    for i, v in enumerate(accs):  # spread |v| over columns of at most 127
        full, rest = divmod(abs(v), 127)
        a_q[i, :full] = 127
        a_q[i, full] = rest
        if v < 0:
            a_q[i] = -a_q[i]
    w_q = torch.ones(16, cols, dtype=torch.int8)
    assert torch.equal(int64_matmul(a_q, w_q)[:, 0], torch.tensor(accs))
    w_scale = torch.tensor([2.0 ** -(mant + 1)])
    out = ops.scaled_mm(a_q, w_q, torch.ones(1), w_scale, out_dtype=out_dtype)
    want = (torch.tensor(accs, dtype=torch.float64) * 2.0 ** -(mant + 1)).to(out_dtype)
    assert float(want[0]) == 1.0 and float(want[1]) == 1.0 + 2.0 ** (1 - mant), "ties go to the even neighbour"
    assert torch.equal(out, want.reshape(-1, 1).expand(-1, 16))


def test_int8_output_rounding_and_saturation():
    # acc[m, n] = v[m] (a[:, 0] = v, w[:, 0] = 1), per-channel w_scale in powers of two so that every
    # y / out_scale is exact in float32 and the halves are real ties.
    v = torch.arange(-128, 128, dtype=torch.int64)
    a = torch.zeros(256, 32, dtype=torch.int8)
    a[:, 0] = v.to(torch.int8)
    w_scale = torch.tensor([0.25, 0.5, 1.0, 2.0] * 4)
    w = torch.zeros(16, 32, dtype=torch.int8)
    w[:, 0] = 1
    for relu in (False, True):
        out = ops.scaled_mm(a, w, torch.ones(1), w_scale, out_dtype=torch.int8, out_scale=torch.tensor([1.0]),
                            relu=relu)
        assert out.dtype == torch.int8 and out.shape == (256, 16)
        for n, ws in enumerate(w_scale.tolist()):
            for m, vm in enumerate(v.tolist()):
                y = max(vm * ws, 0.0) if relu else vm * ws
                want = max(-128, min(127, round(y)))  # Python's round() is half-to-even
                assert int(out[m, n]) == want, (m, n, vm, ws, relu)
    assert int(out[0, 3]) == 0 and int(out[255, 3]) == 127  # relu; saturation at +127


def test_int8_output_matches_float64_with_general_scales():
    m, n, k = 40, 64, 256
    g = torch.Generator().manual_seed(3)
    a, w = randint8(m, k, generator=g), randint8(n, k, generator=g)
    a_scale, w_scale = make_scales(m, n, k, "token", "channel", g)
    bias = torch.randn(n, generator=g)
    out_scale = torch.tensor([0.037])
    out = ops.scaled_mm(a, w, a_scale, w_scale, bias, out_dtype=torch.int8, out_scale=out_scale)
    y64 = epilogue_float64(int64_matmul(a, w), a_scale, w_scale, bias)
    want = expected_int8(y64, out_scale.double().item())
    diff = (out.to(torch.int32) - want.to(torch.int32)).abs()
    assert int(diff.max()) <= 1 and float((diff == 0).double().mean()) > 0.99
    assert (want == 127).any() and (want == -128).any(), "the data should exercise saturation"
    assert torch.equal(out[want == 127], want[want == 127]) and torch.equal(out[want == -128], want[want == -128])


def test_scalar_scales_of_any_one_element_shape_agree():
    g = torch.Generator().manual_seed(5)
    a, w = randint8(4, 32, generator=g), randint8(16, 32, generator=g)
    ref = ops.scaled_mm(a, w, torch.tensor([0.01]), torch.tensor([0.02]))
    for sa, sw in [(torch.tensor(0.01), torch.tensor(0.02)), (torch.full((4,), 0.01), torch.full((16,), 0.02))]:
        assert torch.equal(ops.scaled_mm(a, w, sa, sw), ref)


def test_zero_rows_give_zero_output_and_a_nan_scale_poisons_only_its_row():
    g = torch.Generator().manual_seed(6)
    a, w = randint8(8, 64, generator=g), randint8(32, 64, generator=g)
    a[3] = 0
    a_scale, w_scale = make_scales(8, 32, 64, "token", "channel", g)
    out = ops.scaled_mm(a, w, a_scale, w_scale)
    assert torch.equal(out[3], torch.zeros(32, dtype=torch.float16))
    a_scale[5] = float("nan")
    w_scale[7] = float("inf")
    out2 = ops.scaled_mm(a, w, a_scale, w_scale)
    assert out2[5].isnan().all()
    rows = [i for i in range(8) if i != 5]
    cols = [j for j in range(32) if j != 7]
    assert torch.equal(out2[rows][:, cols], out[rows][:, cols])
    acc_col = int64_matmul(a, w)[rows][:, 7]
    assert not out2[rows][:, 7][acc_col != 0].isfinite().any()


def test_bias_is_added_once_per_output_channel_and_fp16_bias_is_accepted_by_the_wrapper():
    g = torch.Generator().manual_seed(7)
    a, w = randint8(5, 48, generator=g), randint8(32, 48, generator=g)
    sa, sw = torch.tensor([0.01]), torch.tensor([0.02])
    b32 = torch.randn(32, generator=g).half().float()
    no_bias = ops.scaled_mm(a, w, sa, sw, out_dtype=torch.bfloat16)
    with_bias = ops.scaled_mm(a, w, sa, sw, bias=b32, out_dtype=torch.bfloat16)
    acc = int64_matmul(a, w)
    assert_within_rounding(with_bias, epilogue_float64(acc, sa, sw, b32), magnitude64(acc, sa, sw, b32), "bias")
    assert not torch.equal(no_bias, with_bias)
    assert torch.equal(ops.scaled_mm(a, w, sa, sw, bias=b32.half(), out_dtype=torch.bfloat16), with_bias)
    assert torch.equal(ops.scaled_mm(a, w, sa, sw, bias=b32.bfloat16().float(), out_dtype=torch.bfloat16),
                       ops.scaled_mm(a, w, sa, sw, bias=b32.bfloat16(), out_dtype=torch.bfloat16))


# ----------------------------------------------------------------------------------------------
# Shapes: empty dimensions, leading dimensions, strided views
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_token", [False, True])
def test_m_zero_returns_an_empty_tensor(per_token):
    a = torch.zeros(0, 64, dtype=torch.int8)
    w = torch.ones(32, 64, dtype=torch.int8)
    a_scale = torch.ones(0) if per_token else torch.ones(1)
    for out_dtype, out_scale in [(torch.float16, None), (torch.bfloat16, None), (torch.int8, torch.ones(1))]:
        out = ops.scaled_mm(a, w, a_scale, torch.ones(32), torch.zeros(32), out_dtype, out_scale)
        assert out.shape == (0, 32) and out.dtype == out_dtype
    assert ops.int8_mm(a, w).shape == (0, 32)
    out3 = ops.scaled_mm(torch.zeros(2, 0, 64, dtype=torch.int8), w, torch.ones(2, 0) if per_token else torch.ones(1),
                         torch.ones(1))
    assert out3.shape == (2, 0, 32)


def test_n_zero_gives_an_empty_tensor():
    out = ops.scaled_mm(torch.ones(3, 32, dtype=torch.int8), torch.ones(0, 32, dtype=torch.int8),
                        torch.ones(3), torch.ones(1))
    assert out.shape == (3, 0) and out.dtype == torch.float16
    assert ops.int8_mm(torch.ones(3, 32, dtype=torch.int8), torch.ones(0, 32, dtype=torch.int8)).shape == (3, 0)


def test_wrapper_takes_leading_dimensions():
    g = torch.Generator().manual_seed(8)
    a = randint8(2, 3, 64, generator=g)
    w = randint8(48, 64, generator=g)
    a_scale = torch.rand(2, 3, generator=g) + 0.5
    w_scale = torch.rand(48, generator=g)
    out = ops.scaled_mm(a, w, a_scale, w_scale, out_dtype=torch.bfloat16)
    assert out.shape == (2, 3, 48)
    flat = SCALED_MM(a.reshape(6, 64), w, a_scale.reshape(6), w_scale, None, torch.bfloat16, None, False)
    assert torch.equal(out.reshape(6, 48), flat)
    assert torch.equal(ops.int8_mm(a, w).reshape(6, 48), ops.int8_mm(a.reshape(6, 64), w))
    one = ops.scaled_mm(a[0, 0], w, torch.tensor(0.5), w_scale)  # a single token [K] -> [N]
    assert one.shape == (48,)
    assert torch.equal(one, ops.scaled_mm(a[0, :1], w, torch.tensor([0.5]), w_scale)[0])
    assert ops.int8_mm(a[0, 0], w).shape == (48,)


def test_row_strided_and_offset_views_equal_the_contiguous_result():
    g = torch.Generator().manual_seed(9)
    big_a = randint8(9, 96 + 32, generator=g)
    big_w = randint8(49, 96 + 16, generator=g)
    a = big_a[1:, 16:16 + 96]  # row stride 128, storage offset 16 + 128
    w = big_w[1:, :96]  # row stride 112
    assert not a.is_contiguous() and not w.is_contiguous() and a.storage_offset() > 0
    sa, sw = torch.rand(8, generator=g), torch.rand(48, generator=g)
    assert torch.equal(ops.int8_mm(a, w), ops.int8_mm(a.contiguous(), w.contiguous()))
    assert torch.equal(ops.scaled_mm(a, w, sa, sw), ops.scaled_mm(a.contiguous(), w.contiguous(), sa, sw))


# ----------------------------------------------------------------------------------------------
# Bad input: every check in sq_kernels/ops/gemm.py, through the op and through the wrapper.
# Each case names the argument the error must mention; the CUDA suite reuses these tables.
# ----------------------------------------------------------------------------------------------
def _scaled_mm_base(device, m=4, n=32, k=64):
    g = torch.Generator().manual_seed(11)
    return dict(a=randint8(m, k, generator=g, device=device), w=randint8(n, k, generator=g, device=device),
                a_scale=torch.rand(m, generator=g).to(device), w_scale=torch.rand(n, generator=g).to(device),
                bias=None, out_dtype=torch.float16, out_scale=None, relu=False)


def _strided(rows, cols, row_stride, device, dtype=torch.int8):
    return torch.ones(rows, row_stride, dtype=dtype, device=device)[:, :cols]


def scaled_mm_bad_inputs(device, other_device):
    """[(case id, scaled_mm arguments, argument names one of which the error must mention, paths)].

    ``paths``: "op" calls torch.ops.sq_kernels.scaled_mm with 2-D operands, "wrapper" calls ops.scaled_mm.
    ``other_device``: a device the operands are not on (meta for the CPU suite, cpu for the CUDA one).
    """
    d, od = device, other_device
    both, op_only, wrapper_only = ("op", "wrapper"), ("op",), ("wrapper",)
    cases = [
        ("a_float", dict(a=lambda b: b["a"].float()), ["a"], both),
        ("a_uint8", dict(a=lambda b: b["a"].to(torch.uint8)), ["a"], both),
        ("w_int32", dict(w=lambda b: b["w"].to(torch.int32)), ["w"], both),
        ("w_fp16", dict(w=lambda b: b["w"].half()), ["w"], both),
        ("a_3d", dict(a=lambda b: b["a"].unsqueeze(0)), ["a"], op_only),
        ("a_1d", dict(a=lambda b: b["a"][0]), ["a"], op_only),
        ("w_3d", dict(w=lambda b: b["w"].unsqueeze(0)), ["w"], both),
        ("w_1d", dict(w=lambda b: b["w"][0]), ["w"], both),
        ("k_mismatch", dict(w=lambda b: b["w"][:, :48].contiguous()), ["K", "w"], both),
        ("k_unaligned", dict(a=lambda b: b["a"][:, :40].contiguous(), w=lambda b: b["w"][:, :40].contiguous()),
         ["K"], both),
        ("k_zero", dict(a=lambda b: b["a"][:, :0].contiguous(), w=lambda b: b["w"][:, :0].contiguous()), ["K"], both),
        ("k_overflows_int32", dict(a=lambda b: torch.ones(4, 131072, dtype=torch.int8, device=d),
                                   w=lambda b: torch.ones(32, 131072, dtype=torch.int8, device=d)), ["K"], both),
        ("a_scale_python_float", dict(a_scale=lambda b: 0.5), ["a_scale"], wrapper_only),
        ("a_storage_offset", dict(a=lambda b: torch.ones(4 * 64 + 1, dtype=torch.int8, device=d)[1:].view(4, 64)),
         ["a"], both),
        ("w_storage_offset", dict(w=lambda b: torch.ones(32 * 64 + 8, dtype=torch.int8, device=d)[8:].view(32, 64)),
         ["w"], both),
        # the wrapper copies these to an aligned buffer (test_wrapper_aligns_per_channel_vectors)
        ("w_scale_misaligned", dict(w_scale=lambda b: torch.rand(33, device=d)[1:]), ["w_scale"], op_only),
        ("bias_misaligned", dict(bias=lambda b: torch.rand(36, device=d)[2:34]), ["bias"], op_only),
        ("w_rows_overlap", dict(w=lambda b: torch.ones(560, dtype=torch.int8, device=d).as_strided((32, 64), (16, 1))),
         ["w"], both),
        ("n_unaligned", dict(w=lambda b: b["w"][:24].contiguous(), w_scale=lambda b: b["w_scale"][:24].contiguous()),
         ["N"], both),
        ("a_transposed", dict(a=lambda b: b["a"].t().contiguous().t()), ["a"], both),
        ("w_transposed", dict(w=lambda b: b["w"].t().contiguous().t()), ["w"], both),
        ("a_row_stride_unaligned", dict(a=lambda b: _strided(4, 64, 72, d)), ["a"], both),
        ("w_row_stride_unaligned", dict(w=lambda b: _strided(32, 64, 72, d)), ["w"], both),
        ("w_on_other_device", dict(w=lambda b: b["w"].to(od)), ["w", "a"], both),
        ("a_scale_fp16", dict(a_scale=lambda b: b["a_scale"].half()), ["a_scale"], both),
        ("a_scale_fp64", dict(a_scale=lambda b: b["a_scale"].double()), ["a_scale"], both),
        ("a_scale_too_long", dict(a_scale=lambda b: torch.rand(5, device=d)), ["a_scale"], both),
        ("a_scale_too_short", dict(a_scale=lambda b: torch.rand(3, device=d)), ["a_scale"], both),
        ("a_scale_2d", dict(a_scale=lambda b: b["a_scale"].reshape(4, 1)), ["a_scale"], both),
        ("a_scale_noncontiguous", dict(a_scale=lambda b: torch.rand(8, device=d)[::2]), ["a_scale"], both),
        ("a_scale_on_other_device", dict(a_scale=lambda b: b["a_scale"].to(od)), ["a_scale"], both),
        ("w_scale_fp16", dict(w_scale=lambda b: b["w_scale"].half()), ["w_scale"], both),
        ("w_scale_int32", dict(w_scale=lambda b: torch.ones(32, dtype=torch.int32, device=d)), ["w_scale"], both),
        ("w_scale_wrong_length", dict(w_scale=lambda b: torch.rand(16, device=d)), ["w_scale"], both),
        ("w_scale_2d", dict(w_scale=lambda b: b["w_scale"].reshape(1, 32)), ["w_scale"], both),
        ("w_scale_noncontiguous", dict(w_scale=lambda b: torch.rand(64, device=d)[::2]), ["w_scale"], both),
        ("w_scale_on_other_device", dict(w_scale=lambda b: b["w_scale"].to(od)), ["w_scale"], both),
        ("bias_fp16", dict(bias=lambda b: torch.rand(32, device=d).half()), ["bias"], op_only),
        ("bias_fp64", dict(bias=lambda b: torch.rand(32, device=d).double()), ["bias"], both),
        ("bias_int32", dict(bias=lambda b: torch.ones(32, dtype=torch.int32, device=d)), ["bias"], both),
        ("bias_wrong_length", dict(bias=lambda b: torch.rand(48, device=d)), ["bias"], both),
        ("bias_one_element", dict(bias=lambda b: torch.rand(1, device=d)), ["bias"], both),
        ("bias_2d", dict(bias=lambda b: torch.rand(1, 32, device=d)), ["bias"], both),
        ("bias_noncontiguous", dict(bias=lambda b: torch.rand(64, device=d)[::2]), ["bias"], both),
        ("bias_on_other_device", dict(bias=lambda b: torch.rand(32, device=od)), ["bias"], both),
        ("out_dtype_fp32", dict(out_dtype=torch.float32), ["out_dtype"], both),
        ("out_dtype_int32", dict(out_dtype=torch.int32), ["out_dtype"], both),
        ("int8_out_without_out_scale", dict(out_dtype=torch.int8), ["out_scale"], both),
        ("out_scale_with_fp16_out", dict(out_scale=lambda b: torch.ones(1, device=d)), ["out_scale"], both),
        ("out_scale_two_elements", dict(out_dtype=torch.int8, out_scale=lambda b: torch.ones(2, device=d)),
         ["out_scale"], both),
        ("out_scale_fp16", dict(out_dtype=torch.int8, out_scale=lambda b: torch.ones(1, device=d).half()),
         ["out_scale"], both),
        ("out_scale_on_other_device", dict(out_dtype=torch.int8, out_scale=lambda b: torch.ones(1, device=od)),
         ["out_scale"], both),
        ("a_q_zero_dim", dict(a=lambda b: torch.tensor(1, dtype=torch.int8, device=d)), ["a_q"], wrapper_only),
        ("a_scale_flat_for_3d_input", dict(a=lambda b: b["a"].reshape(2, 2, 64)), ["a_scale"], wrapper_only),
    ]
    out = []
    for case_id, changes, names, paths in cases:
        kw = _scaled_mm_base(d)
        kw.update({key: (v(kw) if callable(v) else v) for key, v in changes.items()})
        out.append((case_id, kw, names, paths))
    return out


def int8_mm_bad_inputs(device, other_device):
    """[(case id, (a, w), argument names one of which the error must mention, paths)] for int8_mm."""
    d, od = device, other_device
    g = torch.Generator().manual_seed(12)
    a, w = randint8(4, 64, generator=g, device=d), randint8(32, 64, generator=g, device=d)
    both = ("op", "wrapper")
    return [
        ("a_float", (a.float(), w), ["a"], both),
        ("w_int32", (a, w.to(torch.int32)), ["w"], both),
        ("a_3d", (a.unsqueeze(0), w), ["a"], ("op",)),
        ("w_3d", (a, w.unsqueeze(0)), ["w"], both),
        ("k_mismatch", (a, w[:, :48].contiguous()), ["K", "w"], both),
        ("k_unaligned", (a[:, :40].contiguous(), w[:, :40].contiguous()), ["K"], both),
        ("k_zero", (a[:, :0].contiguous(), w[:, :0].contiguous()), ["K"], both),
        ("n_unaligned", (a, w[:24].contiguous()), ["N"], both),
        ("a_transposed", (a.t().contiguous().t(), w), ["a"], both),
        ("w_transposed", (a, w.t().contiguous().t()), ["w"], both),
        ("a_row_stride_unaligned", (_strided(4, 64, 72, d), w), ["a"], both),
        ("w_row_stride_unaligned", (a, _strided(32, 64, 72, d)), ["w"], both),
        ("w_on_other_device", (a, w.to(od)), ["w", "a"], both),
        ("a_storage_offset", (torch.ones(4 * 64 + 1, dtype=torch.int8, device=d)[1:].view(4, 64), w), ["a"], both),
        ("w_storage_offset", (a, torch.ones(32 * 64 + 4, dtype=torch.int8, device=d)[4:].view(32, 64)), ["w"],
         both),
        ("a_q_zero_dim", (torch.tensor(1, dtype=torch.int8, device=d), w), ["a_q"], ("wrapper",)),
    ]




def call_scaled_mm(kw, path):
    args = (kw["a"], kw["w"], kw["a_scale"], kw["w_scale"], kw["bias"], kw["out_dtype"], kw["out_scale"], kw["relu"])
    return SCALED_MM(*args) if path == "op" else ops.scaled_mm(*args)


def call_int8_mm(args, path):
    return INT8_MM(*args) if path == "op" else ops.int8_mm(*args)


_CPU_SCALED = scaled_mm_bad_inputs("cpu", "meta")
_CPU_INT8 = int8_mm_bad_inputs("cpu", "meta")


# Known gaps in sq_kernels/ops/gemm.py, strict so that the fix turns them into failures to remove from here.
KNOWN_GAPS: dict = {}
# Cases the reference rejects but csrc/torch/gemm_ops.cpp does not check yet: the CUDA suite skips them with
# this reason (on the sm80 path they would fault). The C++ checks wait in wip/entry-checks.patch.
CUDA_GAPS: dict = {
    ("w_scale_misaligned", "op"): "gemm_ops.cpp does not yet check w_scale's alignment (wip/entry-checks.patch)",
    ("bias_misaligned", "op"): "gemm_ops.cpp does not yet check bias's alignment (wip/entry-checks.patch)",
}


def with_paths(table):
    """pytest params (case, path) for every path a case is reachable through."""
    params = []
    for case in table:
        for path in case[3]:
            gap = KNOWN_GAPS.get((case[0], path))
            marks = [pytest.mark.xfail(strict=True, raises=RuntimeError, reason=gap)] if gap else []
            params.append(pytest.param(case, path, id=f"{case[0]}-{path}", marks=marks))
    return params


@pytest.mark.parametrize("case,path", with_paths(_CPU_SCALED))
def test_scaled_mm_rejects_bad_input(case, path):
    case_id, kw, names, _ = case
    with pytest.raises(ValueError) as info:
        call_scaled_mm(kw, path)
    assert error_names(info.value, "scaled_mm", names), f"{case_id}: the error should name {names}: {info.value}"


@pytest.mark.parametrize("case,path", with_paths(_CPU_INT8))
def test_int8_mm_rejects_bad_input(case, path):
    case_id, args, names, _ = case
    with pytest.raises(ValueError) as info:
        call_int8_mm(args, path)
    assert error_names(info.value, "int8_mm", names), f"{case_id}: the error should name {names}: {info.value}"


def test_bad_input_tables_cover_every_check_in_gemm_py():
    # Each distinct _fail(...) message template in gemm.py must be triggered by at least one case.
    import inspect
    src = inspect.getsource(gemm)
    templates = re.findall(r'_fail\(f?"([^"]*)"', src)
    assert len(templates) >= 15
    seen = set()
    for table, call, op_name in ((_CPU_SCALED, call_scaled_mm, "scaled_mm"), (_CPU_INT8, call_int8_mm, "int8_mm")):
        for _, args, _, paths in table:
            for path in paths:
                try:
                    call(args, path)
                except Exception as exc:  # noqa: BLE001  (the KNOWN_GAPS raise other types)
                    if not isinstance(exc, ValueError):
                        continue
                    msg = str(exc)
                    for t in templates:
                        fixed = [p for p in re.split(r"\{[^}]*\}", t.replace("{name}", op_name)) if p.strip()]
                        if all(p in msg for p in fixed):
                            seen.add(t)
    missed = [t for t in templates if t not in seen and "must be a tensor, got" not in t]
    assert not missed, f"checks in gemm.py no bad-input case triggers: {missed}"


def test_wrapper_aligns_per_channel_vectors():
    # w_scale[1:] or a bias sliced from a packed buffer start mid-way through 16 bytes; the wrapper copies
    # them (N floats) rather than failing, and never changes the caller's tensors.
    g = torch.Generator().manual_seed(13)
    a, w = randint8(5, 64, generator=g), randint8(32, 64, generator=g)
    sa = torch.rand(5, generator=g)
    packed_scale, packed_bias = torch.rand(33, generator=g), torch.randn(40, generator=g)
    sw, b = packed_scale[1:], packed_bias[3:35]
    assert sw.storage_offset() % 4 and b.storage_offset() % 4
    want = ops.scaled_mm(a, w, sa, sw.clone(), b.clone())
    assert torch.equal(ops.scaled_mm(a, w, sa, sw, b), want)
    assert sw.data_ptr() == packed_scale.data_ptr() + 4 and b.data_ptr() == packed_bias.data_ptr() + 12


def test_non_tensor_scale_is_rejected_naming_the_argument():
    # The schema types the scales as Tensor, so the dispatcher rejects a Python float before the checks run.
    a, w = torch.ones(2, 16, dtype=torch.int8), torch.ones(16, 16, dtype=torch.int8)
    for path in ("op", "wrapper"):
        with pytest.raises((TypeError, RuntimeError, ValueError), match="a_scale"):
            call_scaled_mm(dict(a=a, w=w, a_scale=0.5, w_scale=torch.ones(1), bias=None,
                                out_dtype=torch.float16, out_scale=None, relu=False), path)
    with pytest.raises(ValueError, match="a_scale must be a tensor"):
        gemm.check_scaled_mm(a, w, 0.5, torch.ones(1), None, torch.float16, None, False)
    with pytest.raises(ValueError, match="a must be an int8 tensor"):
        gemm.check_operands("scaled_mm", [[1]], w)


# ----------------------------------------------------------------------------------------------
# torch.library integration
# ----------------------------------------------------------------------------------------------
def _opcheck_args():
    g = torch.Generator().manual_seed(13)
    a, w = randint8(6, 64, generator=g), randint8(32, 64, generator=g)
    sa, sw, b = torch.rand(6, generator=g), torch.rand(32, generator=g), torch.randn(32, generator=g)
    one = torch.tensor([0.02])
    return [
        ("per_tensor_fp16", (a, w, one, one, None, torch.float16, None, False)),
        ("per_token_channel_bf16_bias", (a, w, sa, sw, b, torch.bfloat16, None, False)),
        ("relu_fp16_bias", (a, w, sa, one, b, torch.float16, None, True)),
        ("int8_out", (a, w, sa, sw, b, torch.int8, torch.tensor([0.05]), False)),
        ("m_zero", (a[:0], w, torch.ones(0), sw, None, torch.float16, None, False)),
    ]


@pytest.mark.parametrize("case", _opcheck_args(), ids=[c[0] for c in _opcheck_args()])
def test_scaled_mm_opcheck(case):
    torch.library.opcheck(SCALED_MM, case[1])


def test_int8_mm_opcheck():
    g = torch.Generator().manual_seed(14)
    torch.library.opcheck(INT8_MM, (randint8(5, 32, generator=g), randint8(16, 32, generator=g)))


def test_fake_tensor_shapes_and_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        a = torch.empty(7, 64, dtype=torch.int8)
        w = torch.empty(48, 64, dtype=torch.int8)
        out = ops.scaled_mm(a, w, torch.empty(7), torch.empty(48), out_dtype=torch.bfloat16)
        assert out.shape == (7, 48) and out.dtype == torch.bfloat16
        assert ops.int8_mm(a, w).dtype == torch.int32
        with pytest.raises(ValueError, match="w_scale"):
            ops.scaled_mm(a, w, torch.empty(7), torch.empty(47))


def test_torch_compile_fullgraph_quantize_then_gemm():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(15)
    w_q = randint8(48, 64, generator=g)
    w_scale = torch.rand(48, generator=g) / 127
    bias = torch.randn(48, generator=g)

    def linear_w8a8(x):
        x_q, x_scale = ops.quantize_per_token(x)
        h = ops.scaled_mm(x_q, w_q, x_scale, w_scale, bias, out_dtype=torch.float16, relu=True)
        return h.float().sum(-1)

    compiled = torch.compile(linear_w8a8, fullgraph=True)
    for shape in [(2, 5, 64), (3, 7, 64)]:
        x = torch.randn(*shape, generator=g)
        assert torch.equal(compiled(x), linear_w8a8(x))
    torch._dynamo.reset()
