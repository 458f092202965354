"""CPU tests of the INT8 attention ops (sq_kernels/ops/attention.py): ``sq_kernels::int8_bmm``,
``sq_kernels::scaled_bmm``, the wrappers ``bmm_qk`` / ``bmm_pv`` and the composite ``int8_attention``.

The PyTorch reference is the CPU backend and the oracle of the CUDA tests
(tests/kernels/test_bmm_kernels.py), so it is checked here against independent computations: int64
integer products for the accumulator; float64 for the epilogue (a float64 product or quotient of two
float32 values, rounded once to float32, is exactly the float32 operation); and, for the composite,
a float64 attention over the dequantized inputs with a bound derived from the 1/127 step of P.
The bad-input table ``bad_inputs`` covers every check in attention.py; the CUDA tests run it on CUDA
tensors against the C++ checks.
"""
from __future__ import annotations

import math

import pytest
import torch

from sq_kernels import ops
from sq_kernels.ops import attention

INT8_BMM = torch.ops.sq_kernels.int8_bmm.default
SCALED_BMM = torch.ops.sq_kernels.scaled_bmm.default


# ----------------------------------------------------------------------------------------------
# Independent oracles
# ----------------------------------------------------------------------------------------------
def randint8(*shape, generator=None, extremes=False):
    """Random int8 in [-128, 127]; ``extremes`` draws only from {-128, -127, 127}."""
    if extremes:
        pool = torch.tensor([-128, -127, 127], dtype=torch.int8)
        return pool[torch.randint(0, 3, shape, generator=generator)]
    return torch.randint(-128, 128, shape, generator=generator, dtype=torch.int8)


def int64_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [batch,M,K] @ b [batch,N,K]^T`` in int64 integer arithmetic on the CPU."""
    return torch.bmm(a.cpu().to(torch.int64), b.cpu().to(torch.int64).transpose(1, 2))


def epilogue_oracle(acc64: torch.Tensor, alpha: float, out_dtype, out_scale: float | None = None):
    """The kernel epilogue from the exact accumulator, in float64 with one rounding per float32 op."""
    y = (torch.tensor(alpha, dtype=torch.float32).double() * acc64.to(torch.float32).double()).to(torch.float32)
    if out_dtype == torch.int8:
        q = (y.double() / torch.tensor(out_scale, dtype=torch.float32).double()).to(torch.float32)
        q = torch.round(q.double())  # half to even
        return torch.where(q.isnan(), torch.zeros_like(q), q).clamp(-128, 127).to(torch.int8)
    return y.to(out_dtype)


def scalar(v: float, device="cpu") -> torch.Tensor:
    return torch.tensor([v], dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# The integer product
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,m,n,k", [(1, 1, 16, 16), (3, 7, 32, 64), (4, 33, 48, 80), (2, 17, 16, 128),
                                          (5, 1, 4096 // 64, 128), (2, 64, 80, 1024)])
@pytest.mark.parametrize("extremes", [False, True])
def test_int8_bmm_bitwise_equals_int64_product(batch, m, n, k, extremes):
    g = torch.Generator().manual_seed(batch * 1000 + m * 10 + k)
    a, b = randint8(batch, m, k, generator=g, extremes=extremes), randint8(batch, n, k, generator=g, extremes=extremes)
    out = ops.int8_bmm(a, b)
    assert out.dtype == torch.int32 and out.shape == (batch, m, n)
    assert torch.equal(out.to(torch.int64), int64_bmm(a, b))


def test_long_k_worst_case_is_exact_and_one_more_chunk_is_rejected():
    k = attention.MAX_K
    a = torch.full((1, 2, k), -128, dtype=torch.int8)
    b = torch.full((1, 16, k), -128, dtype=torch.int8)
    out = ops.int8_bmm(a, b)
    assert int(out[0, 0, 0]) == k * 16384 and k * 16384 < 2 ** 31
    assert torch.equal(out.to(torch.int64), int64_bmm(a, b))
    with pytest.raises(ValueError, match="int8_bmm: .*131072 exceeds 131056"):
        ops.int8_bmm(torch.zeros(1, 1, k + 16, dtype=torch.int8), torch.zeros(1, 16, k + 16, dtype=torch.int8))


# ----------------------------------------------------------------------------------------------
# The epilogue
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32, torch.int8])
def test_scaled_bmm_equals_the_float64_epilogue_oracle(out_dtype):
    g = torch.Generator().manual_seed(7)
    a, b = randint8(3, 9, 96, generator=g), randint8(3, 32, 96, generator=g)
    alpha, out_scale = 1.7e-4, (0.1 if out_dtype == torch.int8 else None)
    out = SCALED_BMM(a, b, scalar(alpha), out_dtype, None if out_scale is None else scalar(out_scale))
    expect = epilogue_oracle(int64_bmm(a, b), alpha, out_dtype, out_scale)
    assert out.dtype == out_dtype and torch.equal(out, expect)
    if out_dtype == torch.int8:  # the data span the whole int8 range, so saturation was exercised
        assert int(out.max()) == 127 and int(out.min()) == -128


def test_int8_output_rounds_ties_to_even_and_saturates():
    # a = [acc, 0, ...] against b = e_0, so acc[m, 0] = a[m, 0]; alpha = 0.5 puts y on .5 ties
    vals = torch.tensor([1, 3, 5, -1, -3, -5, 127, -128], dtype=torch.int8)
    a = torch.zeros(1, len(vals), 16, dtype=torch.int8)
    a[0, :, 0] = vals
    b = torch.zeros(1, 16, 16, dtype=torch.int8)
    b[0, 0, 0] = 1
    out = SCALED_BMM(a, b, scalar(0.5), torch.int8, scalar(1.0))[0, :, 0]
    assert out.tolist() == [0, 2, 2, 0, -2, -2, 64, -64]
    out = SCALED_BMM(a, b, scalar(8.0), torch.int8, scalar(1.0))[0, :, 0]
    assert out.tolist() == [8, 24, 40, -8, -24, -40, 127, -128]


def test_nan_alpha_gives_nan_floats_and_zero_int8():
    a, b = torch.ones(1, 2, 16, dtype=torch.int8), torch.ones(1, 16, 16, dtype=torch.int8)
    assert SCALED_BMM(a, b, scalar(float("nan")), torch.float16, None).isnan().all()
    assert (SCALED_BMM(a, b, scalar(float("nan")), torch.int8, scalar(1.0)) == 0).all()


def test_fp16_output_overflows_to_inf_like_a_float_conversion():
    a, b = torch.full((1, 1, 16), 127, dtype=torch.int8), torch.full((1, 16, 16), 127, dtype=torch.int8)
    out = SCALED_BMM(a, b, scalar(1000.0), torch.float16, None)
    assert torch.isinf(out).all() and (out > 0).all()


# ----------------------------------------------------------------------------------------------
# Shapes, empties, views
# ----------------------------------------------------------------------------------------------
def test_wrappers_take_batch_and_head_dimensions():
    g = torch.Generator().manual_seed(3)
    B, H, Sq, Sk, D = 2, 3, 5, 32, 64
    q, k = randint8(B, H, Sq, D, generator=g), randint8(B, H, Sk, D, generator=g)
    p, v_t = randint8(B, H, Sq, Sk, generator=g), randint8(B, H, D, Sk, generator=g)
    s = ops.bmm_qk(q, k, scalar(0.01))
    o = ops.bmm_pv(p, v_t, scalar(0.02))
    assert s.shape == (B, H, Sq, Sk) and s.dtype == torch.float32
    assert o.shape == (B, H, Sq, D) and o.dtype == torch.float16
    for bi in range(B):
        for h in range(H):
            acc = int64_bmm(q[bi, h][None], k[bi, h][None])[0]
            assert torch.equal(s[bi, h], epilogue_oracle(acc, 0.01, torch.float32))
            acc = int64_bmm(p[bi, h][None], v_t[bi, h][None])[0]
            assert torch.equal(o[bi, h], epilogue_oracle(acc, 0.02, torch.float16))
    assert ops.int8_bmm(q, k).shape == (B, H, Sq, Sk)


@pytest.mark.parametrize("batch,m,n,k", [(0, 4, 16, 32), (3, 0, 16, 32), (3, 4, 0, 32)])
def test_empty_problems_return_empty_tensors(batch, m, n, k):
    a, b = torch.zeros(batch, m, k, dtype=torch.int8), torch.zeros(batch, n, k, dtype=torch.int8)
    assert ops.int8_bmm(a, b).shape == (batch, m, n)
    out = SCALED_BMM(a, b, scalar(1.0), torch.float16, None)
    assert out.shape == (batch, m, n) and out.dtype == torch.float16


def test_k_zero_gives_zeros():
    a, b = torch.zeros(2, 3, 0, dtype=torch.int8), torch.zeros(2, 16, 0, dtype=torch.int8)
    assert torch.equal(ops.int8_bmm(a, b), torch.zeros(2, 3, 16, dtype=torch.int32))
    assert torch.equal(SCALED_BMM(a, b, scalar(3.0), torch.float16, None), torch.zeros(2, 3, 16, dtype=torch.float16))


def test_strided_and_offset_views_equal_the_contiguous_result():
    g = torch.Generator().manual_seed(11)
    big_a = randint8(4, 6, 96, generator=g)
    big_b = randint8(4, 32, 80, generator=g)
    a = big_a[1:, :, 16:80]       # row stride 96, batch stride 576, storage offset 592: all multiples of 16
    b = big_b[1:, :16, :64]       # row stride 80, batch stride 2560
    assert not a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(ops.int8_bmm(a, b), ops.int8_bmm(a.contiguous(), b.contiguous()))


# ----------------------------------------------------------------------------------------------
# Bad input: every check of attention.py, with the argument it must name
# ----------------------------------------------------------------------------------------------
def _i8(*shape, device="cpu"):
    return torch.zeros(*shape, dtype=torch.int8, device=device)


def bad_inputs(device: str, other_device: str):
    """(id, callable, pattern the ValueError must match). Every call is wrong in exactly one way."""
    a, b, al = _i8(2, 4, 32, device=device), _i8(2, 16, 32, device=device), scalar(1.0, device)
    qk = lambda **kw: ops.bmm_qk(kw.get("q", a), kw.get("k", b), kw.get("alpha", al), kw.get("out_dtype", torch.float32))
    pv = lambda **kw: ops.bmm_pv(kw.get("p", a), kw.get("v_t", b), kw.get("alpha", al),
                                 kw.get("out_dtype", torch.float16), kw.get("out_scale"))
    sb = lambda **kw: SCALED_BMM(kw.get("a", a), kw.get("b", b), kw.get("alpha", al), kw.get("out_dtype", torch.float16),
                                 kw.get("out_scale"))
    ib = lambda **kw: INT8_BMM(kw.get("a", a), kw.get("b", b))
    misaligned = _i8(2 * 4 * 32 + 8, device=device)[8:].view(2, 4, 32)
    return [
        ("a float", lambda: ib(a=a.float()), r"int8_bmm: a must be an int8 tensor"),
        ("b int32", lambda: ib(b=b.int()), r"int8_bmm: b must be an int8 tensor"),
        ("a 2-D", lambda: ib(a=a[0]), r"int8_bmm: a must be 3-D"),
        ("b 4-D", lambda: ib(b=b[None]), r"int8_bmm: b must be 3-D"),
        ("devices differ", lambda: ib(b=b.to(other_device)), r"int8_bmm: a is on .* and b on"),
        ("batch differs", lambda: ib(b=b[:1]), r"int8_bmm: .*batch sizes differ"),
        ("K differs", lambda: ib(b=_i8(2, 16, 48, device=device)), r"int8_bmm: .*reduction dimension differs"),
        ("K not multiple of 16", lambda: ib(a=_i8(2, 4, 24, device=device), b=_i8(2, 16, 24, device=device)),
         r"int8_bmm: the reduction dimension \(a.shape\[-1\] = 24\) must be a multiple of 16"),
        ("N not multiple of 16", lambda: ib(b=_i8(2, 24, 32, device=device)),
         r"int8_bmm: b.shape\[1\] = 24 .* multiple of 16"),
        ("N too large", lambda: ib(b=_i8(2, attention.MAX_N + 16, 32, device=device)),
         r"int8_bmm: b.shape\[1\] = 1048592 exceeds"),
        ("last dim strided", lambda: ib(a=_i8(2, 4, 64, device=device)[:, :, ::2]),
         r"int8_bmm: a must have a contiguous last dimension"),
        ("row stride", lambda: ib(a=_i8(2, 4, 40, device=device)[:, :, :32]), r"int8_bmm: a's row stride 40"),
        ("batch stride", lambda: ib(b=_i8(2 * 520, device=device).as_strided((2, 16, 32), (520, 32, 1))),
         r"int8_bmm: b's batch stride 520"),
        ("storage offset", lambda: ib(a=misaligned), r"int8_bmm: a starts 8 bytes into its storage"),
        ("rows overlap", lambda: ib(b=_i8(2 * 16 * 32, device=device).as_strided((2, 16, 32), (256, 16, 1))),
         r"int8_bmm: b's row stride 16 is less than its row length 32: rows may not overlap"),
        ("rows broadcast", lambda: ib(a=_i8(2, 1, 32, device=device).expand(2, 4, 32)),
         r"int8_bmm: a's row stride 0 is less than its row length 32"),
        ("alpha float64", lambda: sb(alpha=al.double()), r"scaled_bmm: alpha must be a 1-element float32"),
        ("alpha 2 elements", lambda: sb(alpha=scalar(1.0, device).repeat(2)), r"scaled_bmm: alpha must be a 1-element"),
        ("alpha device", lambda: sb(alpha=al.to(other_device)), r"scaled_bmm: alpha is on"),
        ("out int32", lambda: sb(out_dtype=torch.int32), r"scaled_bmm: out_dtype .*int32: use int8_bmm"),
        ("out bf16", lambda: sb(out_dtype=torch.bfloat16), r"scaled_bmm: out_dtype must be one of"),
        ("int8 without out_scale", lambda: sb(out_dtype=torch.int8), r"scaled_bmm: out_dtype=torch.int8 needs out_scale"),
        ("out_scale with fp16", lambda: sb(out_scale=al), r"scaled_bmm: out_scale is only meaningful"),
        ("out_scale shape", lambda: sb(out_dtype=torch.int8, out_scale=scalar(1.0, device).repeat(3)),
         r"scaled_bmm: out_scale must be a 1-element"),
        ("out_scale device", lambda: sb(out_dtype=torch.int8, out_scale=al.to(other_device)),
         r"scaled_bmm: out_scale is on"),
        ("qk q dtype", lambda: qk(q=a.half()), r"bmm_qk: q must be an int8 tensor"),
        ("qk k head dim", lambda: qk(k=_i8(2, 16, 48, device=device)), r"bmm_qk: q is .* and k is .*differs"),
        ("qk leading dims", lambda: qk(q=_i8(2, 3, 4, 32, device=device), k=_i8(3, 2, 16, 32, device=device)),
         r"bmm_qk: q .* and k .* same leading"),
        ("qk Sk", lambda: qk(k=_i8(2, 20, 32, device=device)), r"bmm_qk: k.shape\[1\] = 20"),
        ("qk int8 out", lambda: qk(out_dtype=torch.int8), r"bmm_qk: out_dtype must be one of"),
        ("qk alpha", lambda: qk(alpha=0.125), r"bmm_qk: alpha must be a 1-element float32 tensor"),
        ("qk q 1-D", lambda: qk(q=a[0, 0]), r"bmm_qk: q must be a tensor of shape"),
        ("pv v_t dtype", lambda: pv(v_t=b.float()), r"bmm_pv: v_t must be an int8 tensor"),
        ("pv Sk", lambda: pv(p=_i8(2, 4, 48, device=device)), r"bmm_pv: p is .* and v_t is .*differs"),
        ("pv D", lambda: pv(v_t=_i8(2, 8, 32, device=device)), r"bmm_pv: v_t.shape\[1\] = 8"),
        ("pv int8 without scale", lambda: pv(out_dtype=torch.int8), r"bmm_pv: out_dtype=torch.int8 needs out_scale"),
        ("pv out_scale python", lambda: pv(out_dtype=torch.int8, out_scale=0.5), r"bmm_pv: out_scale must be a 1-element"),
    ]


# Cases the reference rejects but csrc/torch/bmm_ops.cpp does not check yet (it raises a RuntimeError from the
# dispatcher instead): the CUDA suite skips them with this reason until wip/entry-checks.patch lands.
CUDA_GAPS = {
    "rows overlap": "bmm_ops.cpp's check_layout lacks the row-overlap check (wip/entry-checks.patch)",
    "rows broadcast": "bmm_ops.cpp's check_layout lacks the row-overlap check (wip/entry-checks.patch)",
}


ATTENTION_BAD = [
    ("q int8 without scale", dict(q_scale=None), r"int8_attention: q is int8, so q_scale"),
    ("q float with scale", dict(q="float", q_scale="ok"), r"int8_attention: q is torch.float32: leave q_scale=None"),
    ("q int32", dict(q="int32"), r"int8_attention: q must be int8 .*or float16"),
    ("k scale float64", dict(k_scale="double"), r"int8_attention: k_scale must be a 1-element float32"),
    ("k head dim", dict(k=(2, 3, 32, 48)), r"int8_attention: k must be \[..., Sk, D\]"),
    ("k heads", dict(k=(2, 4, 32, 32)), r"int8_attention: k must be \[..., Sk, D\]"),
    ("v length", dict(v=(2, 3, 16, 32)), r"int8_attention: v must have shape \(2, 3, 32, 32\)"),
    ("v transposed float", dict(v="float", v_scale=None, v_transposed=True), r"int8_attention: v_transposed=True needs an int8 v"),
    ("v transposed shape", dict(v_transposed=True, v=(2, 3, 16, 32)),
     r"int8_attention: v must have shape \(2, 3, 32, 32\) \(transposed\)"),
    ("no keys", dict(k=(2, 3, 0, 32), v=(2, 3, 0, 32)), r"int8_attention: k has no keys"),
    ("causal Sq > Sk", dict(q=(2, 3, 40, 32), causal=True), r"int8_attention: causal=True needs Sq <= Sk"),
    ("head dim 24", dict(q=(2, 3, 8, 24), k=(2, 3, 32, 24), v=(2, 3, 32, 24)),
     r"int8_attention: the head dimension D = 24 must be a multiple of 16"),
    ("int8 out without scale", dict(out_dtype=torch.int8), r"int8_attention: out_dtype=torch.int8 needs out_scale"),
    ("bf16 out", dict(out_dtype=torch.bfloat16), r"int8_attention: out_dtype must be one of"),
    ("q 1-D", dict(q=(32,)), r"int8_attention: q must be at least 2-D"),
    ("p_quant", dict(p_quant="dynamic"), r"int8_attention: p_quant must be one of \('static', 'rowmax'\)"),
    ("k on another device", dict(k="meta"), r"int8_attention: k is on meta and q on cpu; q, k and v must be"),
    ("v on another device", dict(v="meta"), r"int8_attention: v is on meta and q on cpu"),
    ("sm_scale nan", dict(sm_scale=float("nan")), r"int8_attention: sm_scale must be None .* or a finite"),
    ("sm_scale zero", dict(sm_scale=0.0), r"int8_attention: sm_scale must be None"),
    ("sm_scale tensor", dict(sm_scale=torch.ones(2)), r"int8_attention: sm_scale must be None"),
]


def call_attention(case: dict, device="cpu"):
    shapes = {"q": (2, 3, 8, 32), "k": (2, 3, 32, 32), "v": (2, 3, 32, 32)}
    args = {}
    for name in ("q", "k", "v"):
        spec = case.get(name, shapes[name])
        if spec == "float":
            args[name] = torch.zeros(shapes[name], device=device)
        elif spec == "int32":
            args[name] = torch.zeros(shapes[name], dtype=torch.int32, device=device)
        elif spec == "meta":  # another device than the others; its scale goes with it
            args[name] = _i8(*shapes[name], device="meta")
        else:
            args[name] = _i8(*spec, device=device)
        scale_key = f"{name}_scale"
        s = case.get(scale_key, "ok")
        float_input = spec == "float"
        args[scale_key] = (None if float_input and scale_key not in case else
                           scalar(1.0, device) if s == "ok" else scalar(1.0, device).double() if s == "double" else s)
        if spec == "meta":
            args[scale_key] = scalar(1.0, "meta")
    kw = {k: case[k] for k in ("causal", "out_dtype", "out_scale", "v_transposed", "p_quant", "sm_scale")
          if k in case}
    return ops.int8_attention(args["q"], args["k"], args["v"], args["q_scale"], args["k_scale"], args["v_scale"], **kw)


@pytest.mark.parametrize("case", bad_inputs("cpu", "meta"), ids=lambda c: c[0] if isinstance(c, tuple) else None)
def test_bad_input_raises_value_error_naming_the_argument(case):
    _, call, pattern = case
    with pytest.raises(ValueError, match=pattern):
        call()


@pytest.mark.parametrize("case", ATTENTION_BAD, ids=[c[0] for c in ATTENTION_BAD])
def test_int8_attention_rejects_bad_input(case):
    _, kw, pattern = case
    with pytest.raises(ValueError, match=pattern):
        call_attention(kw)


def test_int8_attention_copies_views_whose_rows_overlap():
    # A key repeated along the sequence (stride 0) or rows overlapping in memory are legal inputs of
    # int8_attention: it hands the BMM a contiguous copy rather than a layout the kernels refuse.
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-127, 128, (2, 3, 8, 32), generator=g, dtype=torch.int8)
    k_row = torch.randint(-127, 128, (2, 3, 1, 32), generator=g, dtype=torch.int8)
    v = torch.randint(-127, 128, (2, 3, 20, 32), generator=g, dtype=torch.int8)
    k = k_row.expand(2, 3, 20, 32)
    flat = torch.randint(-127, 128, (2 * 3 * 20 * 16 + 16,), generator=g, dtype=torch.int8)
    v_overlap = flat.as_strided((2, 3, 20, 32), (960, 320, 16, 1))
    one = scalar(0.01)
    for kk, vv in ((k, v), (k.contiguous(), v_overlap)):
        got = ops.int8_attention(q, kk, vv, one, one, one, out_dtype=torch.float32)
        want = ops.int8_attention(q, kk.contiguous(), vv.contiguous(), one, one, one, out_dtype=torch.float32)
        assert torch.equal(got, want)


def test_valid_baseline_of_the_bad_input_tables_runs():
    """The tables' defaults are valid, so each bad case fails for its one stated reason."""
    a, b, al = _i8(2, 4, 32), _i8(2, 16, 32), scalar(1.0)
    assert ops.bmm_qk(a, b, al).shape == (2, 4, 16)
    assert ops.bmm_pv(a, b, al).shape == (2, 4, 16)
    assert INT8_BMM(a, b).shape == (2, 4, 16)
    assert call_attention({}).shape == (2, 3, 8, 32)
    assert call_attention({"q": "float", "k": "float", "v": "float"}).shape == (2, 3, 8, 32)


# ----------------------------------------------------------------------------------------------
# opcheck, fake tensors, torch.compile
# ----------------------------------------------------------------------------------------------
def test_opcheck_int8_bmm():
    g = torch.Generator().manual_seed(1)
    torch.library.opcheck(INT8_BMM, (randint8(3, 5, 32, generator=g), randint8(3, 16, 32, generator=g)))


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32, torch.int8])
def test_opcheck_scaled_bmm(out_dtype):
    g = torch.Generator().manual_seed(2)
    out_scale = scalar(0.5) if out_dtype == torch.int8 else None
    torch.library.opcheck(SCALED_BMM, (randint8(2, 3, 64, generator=g), randint8(2, 32, 64, generator=g),
                                       scalar(0.01), out_dtype, out_scale))


def test_fake_tensors_give_shapes_and_run_the_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        a, b = _i8(6, 7, 80), _i8(6, 32, 80)
        out = SCALED_BMM(a, b, scalar(1.0), torch.int8, scalar(1.0))
        assert out.shape == (6, 7, 32) and out.dtype == torch.int8
        assert INT8_BMM(a, b).dtype == torch.int32
        with pytest.raises(ValueError, match="int8_bmm: b.shape\\[1\\] = 24"):
            INT8_BMM(a, _i8(6, 24, 80))


def test_torch_compile_fullgraph_int8_attention():
    g = torch.Generator().manual_seed(5)
    q, k, v = randint8(1, 2, 8, 64, generator=g), randint8(1, 2, 24, 64, generator=g), randint8(1, 2, 24, 64, generator=g)
    sc = scalar(0.02)

    def attn(q, k, v):
        return ops.int8_attention(q, k, v, sc, sc, sc, causal=True)

    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), attn(q, k, v))


# ----------------------------------------------------------------------------------------------
# The composite attention
# ----------------------------------------------------------------------------------------------
def attention64(q, k, v, causal=False, sm_scale=None):
    """float64 softmax attention (bottom-right aligned causal mask); returns (out, p)."""
    q, k, v = q.double(), k.double(), v.double()
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = (q @ k.transpose(-1, -2)) * sm_scale
    if causal:
        sq, sk = q.shape[-2], k.shape[-2]
        i = torch.arange(sq).unsqueeze(1)
        j = torch.arange(sk)
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return p @ v, p


def p_quantization_bound(p64: torch.Tensor, v64: torch.Tensor) -> torch.Tensor:
    """|out - exact| per output element from storing P as multiples of 1/127 (round to nearest: an
    error of at most half a step, and at most p itself where p rounds to 0), with 1e-6 per key for
    the float32 softmax: sum_j (min(0.5/127, p_j) + 1e-6) * |v[j, d]|."""
    return (torch.clamp(p64, max=0.5 / 127) + 1e-6) @ v64.abs()


def quantized_inputs(shape_q, shape_kv, seed):
    """Random int8 q, k, v with scales that give scores of std ~2 (a peaked softmax, as in real models)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (randint8(*s, generator=g) for s in (shape_q, shape_kv, shape_kv))
    return (q, k, v), (0.02, 0.02, 0.017)


@pytest.mark.parametrize("sq,sk,causal", [(16, 16, False), (16, 16, True), (1, 48, True), (1, 37, False),
                                           (5, 37, True), (24, 24, True), (7, 64, False)])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_int8_attention_is_within_the_p_quantization_bound_of_exact_attention(sq, sk, causal, d):
    (q, k, v), (sq_, sk_, sv_) = quantized_inputs((2, 3, sq, d), (2, 3, sk, d), seed=sq * 100 + sk + d)
    out = ops.int8_attention(q, k, v, scalar(sq_), scalar(sk_), scalar(sv_), causal=causal, out_dtype=torch.float32,
                             p_quant="static")
    vf = v.double() * sv_
    exact, p = attention64(q.double() * sq_, k.double() * sk_, vf, causal=causal)
    err = (out.double() - exact).abs()
    bound = p_quantization_bound(p, vf) + 1e-5 * exact.abs() + 1e-6
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    assert bound.mean() < 0.5 * exact.abs().mean()  # the bound is well below the outputs it checks


def test_keys_padded_to_16_get_no_probability():
    # Sk = 17 pads 15 zero keys. Their scores would be 0 while every real score is very negative, so an
    # unmasked pad key would take nearly all the probability mass (and pad values are 0: output ~0).
    q = torch.full((1, 1, 1, 16), 127, dtype=torch.int8)
    k = torch.full((1, 1, 17, 16), -127, dtype=torch.int8)
    v = torch.full((1, 1, 17, 16), 100, dtype=torch.int8)
    out = ops.int8_attention(q, k, v, scalar(0.1), scalar(0.1), scalar(0.01), out_dtype=torch.float32,
                             p_quant="static")
    # exact: 1.0; P = rint(127 / 17) / 127 per key = 7 / 127, so the INT8 result is 17 * 7 / 127
    assert torch.allclose(out, torch.full_like(out, 17 * 7 / 127), rtol=1e-6)


def test_causal_decode_sees_every_key_and_prefill_matches_sdpa_is_causal():
    (q, k, v), (a, b, c) = quantized_inputs((1, 2, 1, 64), (1, 2, 40, 64), seed=9)
    args = (scalar(a), scalar(b), scalar(c))
    assert torch.equal(ops.int8_attention(q, k, v, *args, causal=True), ops.int8_attention(q, k, v, *args))
    g = torch.Generator().manual_seed(10)
    x = [torch.randn(2, 4, 32, 64, generator=g) for _ in range(3)]
    ref = torch.nn.functional.scaled_dot_product_attention(*x, is_causal=True)
    out = ops.int8_attention(*x, causal=True, out_dtype=torch.float32)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.03, rel
    noncausal = torch.nn.functional.scaled_dot_product_attention(*x)
    assert (out - noncausal).norm() / noncausal.norm() > 0.1  # the mask mattered


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_inputs_are_quantized_per_tensor_and_match_sdpa(dtype):
    g = torch.Generator().manual_seed(12)
    x = [torch.randn(2, 4, 9, 64, generator=g).to(dtype) for _ in range(3)]
    ref = torch.nn.functional.scaled_dot_product_attention(*[t.float() for t in x])
    out = ops.int8_attention(*x, out_dtype=torch.float32)
    assert (out - ref).norm() / ref.norm() < 0.03


def test_v_transposed_and_int8_output_agree_with_the_default_path():
    (q, k, v), (a, b, c) = quantized_inputs((2, 2, 6, 80), (2, 2, 33, 80), seed=13)
    args = (scalar(a), scalar(b), scalar(c))
    base = ops.int8_attention(q, k, v, *args, out_dtype=torch.float32)
    v_t = v.transpose(-1, -2).contiguous()
    assert torch.equal(ops.int8_attention(q, k, v_t, *args, out_dtype=torch.float32, v_transposed=True), base)
    assert torch.equal(ops.int8_attention(q, k, v, *args), base.half())
    out_scale = 0.004
    q8 = ops.int8_attention(q, k, v, *args, out_dtype=torch.int8, out_scale=scalar(out_scale))
    expect = torch.round(base / torch.tensor(out_scale)).clamp(-128, 127).to(torch.int8)
    assert torch.equal(q8, expect)


def test_sm_scale_is_folded_into_the_qk_scale():
    (q, k, v), (a, b, c) = quantized_inputs((1, 1, 4, 64), (1, 1, 16, 64), seed=14)
    out = ops.int8_attention(q, k, v, scalar(a), scalar(b), scalar(c), sm_scale=0.5, out_dtype=torch.float32,
                             p_quant="static")
    exact, p = attention64(q.double() * a, k.double() * b, v.double() * c, sm_scale=0.5)
    assert ((out.double() - exact).abs() <= p_quantization_bound(p, v.double() * c) + 1e-6).all()


# ----------------------------------------------------------------------------------------------
# p_quant="rowmax"
# ----------------------------------------------------------------------------------------------
def test_rowmax_weights_are_normalised_by_their_integer_sum():
    # Constant V: any convex combination returns it, so the result is exact whatever the weights.
    (q, k, _), (a, b, _) = quantized_inputs((2, 2, 5, 64), (2, 2, 300, 64), seed=15)
    v = torch.full((2, 2, 300, 64), -77, dtype=torch.int8)
    for causal in (False, True):
        out = ops.int8_attention(q, k, v, scalar(a), scalar(b), scalar(0.01), causal=causal, p_quant="rowmax",
                                 out_dtype=torch.float32)
        assert torch.allclose(out, torch.full_like(out, -0.77), rtol=1e-6, atol=0)


@pytest.mark.parametrize("sk,causal", [(37, False), (1000, False), (1000, True), (4096, False)])
def test_rowmax_keeps_long_flat_attention_accurate_where_static_loses_the_mass(sk, causal):
    g = torch.Generator().manual_seed(sk)
    sq = 16
    q, k, v = (torch.randn(1, 2, s, 64, generator=g) for s in (sq, sk, sk))
    exact, _ = attention64(q, k, v, causal=causal)

    def rel(mode):
        out = ops.int8_attention(q, k, v, causal=causal, out_dtype=torch.float32, p_quant=mode)
        return ((out.double() - exact).norm() / exact.norm()).item()

    assert rel("rowmax") < 0.05
    if sk >= 1000:  # the documented failure of the static 1/127 scale (p ~ 1/Sk rounds to 0)
        assert rel("static") > 0.5


def test_rowmax_int8_and_fp16_outputs_round_the_float32_result():
    (q, k, v), (a, b, c) = quantized_inputs((1, 2, 6, 80), (1, 2, 70, 80), seed=16)
    args = (scalar(a), scalar(b), scalar(c))
    base = ops.int8_attention(q, k, v, *args, out_dtype=torch.float32, p_quant="rowmax")
    assert torch.equal(ops.int8_attention(q, k, v, *args, p_quant="rowmax"), base.half())
    q8 = ops.int8_attention(q, k, v, *args, out_dtype=torch.int8, out_scale=scalar(0.004), p_quant="rowmax")
    assert torch.equal(q8, torch.round(base / torch.tensor(0.004)).clamp(-128, 127).to(torch.int8))

