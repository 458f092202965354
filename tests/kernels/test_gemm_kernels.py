"""CUDA tests of the INT8 GEMM kernels behind ``sq_kernels::scaled_mm`` / ``sq_kernels::int8_mm``.

Oracles, all computed on the GPU from the same integers:
- the accumulator: ``a.double() @ w.double().T`` (every int8 product and every partial sum below
  2**53 is exact in float64, whatever order cuBLAS adds them in), compared **bitwise** with int32;
- fp16/bf16 output: the exact float64 epilogue, within one spacing of the output dtype plus the
  float32 evaluation error of the terms (see ``assert_within_rounding``), and agreeing with the
  PyTorch reference of sq_kernels/ops/gemm.py (the CPU backend) to within one spacing, bitwise
  on >= 99% of elements (the kernel uses one fma where the reference multiplies and adds);
- int8 output: saturate(rint(y / out_scale)) from the exact y, off by at most one.

Every output is allocated from a caching-allocator block that was filled with NaN (floats) or a
sentinel (integers) just before the call, so an element the kernel skips fails the comparison.
The kernels themselves are opaque here; ``_sq_kernels_C::scaled_mm_path`` (a test hook of the
extension) forces each kernel path so every path sees the same sweeps as the automatic dispatch.
"""
from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import sq_kernels
from sq_kernels import ops
from sq_kernels.ops import gemm

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and sq_kernels.has_cuda_kernels()),
    reason="needs a CUDA GPU and the built sq_kernels._C extension: " + str(sq_kernels.extension_error()))

DEV = "cuda"
SCALED_MM = torch.ops.sq_kernels.scaled_mm.default
INT8_MM = torch.ops.sq_kernels.int8_mm.default
FP_OUT = [torch.float16, torch.bfloat16]
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}
SMALL_M_MAX = 32  # csrc/kernels/gemm.h kSmallMMax: the decode kernel's range

# Kernel paths of the extension's test hook (csrc/kernels/gemm.h GemmPath).
PATH_AUTO, PATH_SMALL_M, PATH_SM90_64, PATH_SM90_128, PATH_SM90_256, PATH_SM80 = range(6)
PATH_NAMES = {PATH_SMALL_M: "small_m", PATH_SM90_64: "sm90_tile64", PATH_SM90_128: "sm90_tile128",
              PATH_SM90_256: "sm90_tile256", PATH_SM80: "sm80"}

# Real layer shapes (N, K): the fused / separate projections of OPT, Llama and BLOOM.
LAYER_SHAPES = {
    "OPT-125M": [(768, 768), (3072, 768), (768, 3072)],
    "OPT-6.7B": [(4096, 4096), (16384, 4096), (4096, 16384)],
    "OPT-13B": [(15360, 5120), (5120, 5120), (20480, 5120), (5120, 20480)],
    "OPT-30B": [(21504, 7168), (7168, 7168), (28672, 7168), (7168, 28672)],
    "OPT-66B": [(27648, 9216), (9216, 9216), (36864, 9216), (9216, 36864)],
    "Llama-2-7B": [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)],
    "Llama-2-13B": [(15360, 5120), (5120, 5120), (27648, 5120), (5120, 13824)],
    "Llama-2-70B": [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)],
    "Llama-3-8B": [(6144, 4096), (28672, 4096), (4096, 14336)],
    "BLOOM-560M": [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)],
    "BLOOM-176B": [(43008, 14336), (14336, 14336), (57344, 14336), (14336, 57344)],
}
UNIQUE_LAYER_SHAPES = sorted({nk for shapes in LAYER_SHAPES.values() for nk in shapes})


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def randint8(*shape, g, extremes=False):
    """int8 in [-128, 127] with both ends included; ``extremes``: only -128, -127 and 127."""
    if extremes:
        pool = torch.tensor([-128, -127, 127], dtype=torch.int8, device=DEV)
        return pool[torch.randint(0, 3, shape, generator=g, device=DEV)]
    return torch.randint(-128, 128, shape, generator=g, device=DEV, dtype=torch.int8)


def scales(m, n, k, a_gran, w_gran, g):
    """Positive float32 scales keeping the outputs O(1): [1] per-tensor, [M] per-token, [N] per-channel."""
    a_scale = (torch.rand(m if a_gran == "token" else 1, generator=g, device=DEV) + 0.5) / 127.0
    w_scale = (torch.rand(n if w_gran == "channel" else 1, generator=g, device=DEV) + 0.5) / (127.0 * k ** 0.5 / 4)
    return a_scale, w_scale


def acc64(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The exact accumulator as float64 on the GPU."""
    return a.double() @ w.double().t()


def epilogue64(acc, a_scale, w_scale, bias=None, relu=False):
    """(exact y, magnitude of its terms), float64."""
    prod = acc * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    mag = prod.abs()
    y = prod
    if bias is not None:
        y = y + bias.double().reshape(1, -1)
        mag = mag + bias.double().abs().reshape(1, -1)
    return (torch.clamp_min(y, 0.0) if relu else y), mag


def ulp(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` values around |y| (float64 in, float64 out), subnormals included."""
    mag = y.abs().clamp_min(torch.finfo(dtype).tiny)
    _, exp = torch.frexp(mag)
    return torch.ldexp(torch.ones_like(mag), (exp - 1 - MANTISSA_BITS[dtype]).to(torch.int32))


def assert_within_rounding(out, y64, mag64, what):
    """One spacing of out's dtype at the exact value, plus 4 float32 roundings of the terms' size."""
    o = out.double()
    assert not o.isnan().any(), f"{what}: {int(o.isnan().sum())} NaN outputs (unwritten or poisoned elements)"
    bound = ulp(y64, out.dtype) + 4 * 2.0 ** -24 * mag64
    bad = ~((o - y64).abs() <= bound)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements out of bound; first at {i}: "
                             f"got {o[i].item()!r}, exact {y64[i].item()!r}, bound {bound[i].item():.3g}")


def assert_agrees_with_reference(out, ref, mag64, what):
    """Kernel vs the PyTorch reference (same float32 epilogue but for the fma): mostly bitwise equal, and
    within one spacing plus two float32 roundings of the terms' size. The kernel computes
    fma(a_scale, t, bias) (gemm.h) where the reference rounds a_scale * t before adding the bias; under
    cancellation (|y| << |bias|) that one extra rounding is worth several output ulps."""
    o, r = out.double(), ref.double()
    bad = ~((o - r).abs() <= ulp(r, out.dtype) + 2 * 2.0 ** -24 * mag64)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements differ from the reference beyond the fma rounding"
    same = (out == ref).double().mean().item() if out.numel() else 1.0
    assert same >= 0.99, f"{what}: only {same:.4f} of the elements equal the reference bitwise"


def assert_int8_close(out, y64, out_scale, what):
    ratio = y64 / out_scale.double().item()
    want = torch.clamp(torch.round(ratio), -128, 127)
    diff = (out.double() - want).abs()
    assert diff.max().item() <= 1, f"{what}: int8 output off by {diff.max().item()} at {diff.argmax().item()}"
    # Saturated wherever any float32 rounding of the epilogue saturates: half a step past the
    # rounding boundary (an exact 126.5000001 may come out of float32 as 126.4999 and round to 126).
    sat = (ratio >= 127) | (ratio <= -128)
    assert torch.equal(out.double()[sat], want[sat]), f"{what}: saturated elements differ"


SENTINEL = {torch.float16: float("nan"), torch.bfloat16: float("nan"), torch.float32: float("nan"),
            torch.int8: 0x55, torch.int32: -2 ** 31}


class Poison:
    """Leave a freed block of exactly the output's size in the caching allocator, filled with a
    sentinel, so that an output allocated next (the op's at::empty) starts out poisoned."""

    def __init__(self):
        self.calls = 0
        self.hits = 0

    def __call__(self, fn, shape, dtype, sentinel=None):
        numel = math.prod(shape)
        value = SENTINEL[dtype] if sentinel is None else sentinel
        out = None
        for _ in range(3):  # the block the previous try got is the one to poison next
            del out
            block = torch.full((numel,), value, dtype=dtype, device=DEV)
            ptr = block.data_ptr()
            del block
            out = fn()
            if numel == 0 or out.data_ptr() == ptr:
                self.hits += 1
                break
        self.calls += 1
        return out


poison = Poison()


def has_path_hook() -> bool:
    return hasattr(torch.ops, "_sq_kernels_C") and hasattr(torch.ops._sq_kernels_C, "scaled_mm_path")


def available_paths() -> dict[int, str]:
    """Forced kernel paths this extension and GPU can run (empty without the test hook)."""
    if not has_path_hook():
        return {}
    cap = torch.cuda.get_device_capability()
    sm = cap[0] * 10 + cap[1]
    built = " ".join(sq_kernels.built_archs())
    paths = {PATH_SMALL_M: PATH_NAMES[PATH_SMALL_M]}
    if "sm90" in built and sm == 90:
        paths.update({p: PATH_NAMES[p] for p in (PATH_SM90_64, PATH_SM90_128, PATH_SM90_256)})
    if "sm80" in built and 80 <= sm <= 90:
        paths[PATH_SM80] = PATH_NAMES[PATH_SM80]
    return paths


def run(path, a, w, a_scale, w_scale, bias, out_dtype, out_scale=None, relu=False):
    """scaled_mm (or int8_mm for int32) through the automatic dispatch or a forced path, into a poisoned block."""
    shape = (a.shape[0], w.shape[0])
    if path == PATH_AUTO:
        if out_dtype == torch.int32:
            return poison(lambda: INT8_MM(a, w), shape, out_dtype)
        return poison(lambda: SCALED_MM(a, w, a_scale, w_scale, bias, out_dtype, out_scale, relu), shape, out_dtype)
    hook = torch.ops._sq_kernels_C.scaled_mm_path
    return poison(lambda: hook(a, w, a_scale, w_scale, bias, out_dtype, out_scale, relu, path), shape, out_dtype)


def paths_for_m(m: int, include_auto=True):
    paths = [p for p in available_paths() if p != PATH_SMALL_M or m <= SMALL_M_MAX]
    return ([PATH_AUTO] if include_auto else []) + paths


# ----------------------------------------------------------------------------------------------
# The extension is really serving CUDA tensors
# ----------------------------------------------------------------------------------------------
def test_cuda_kernels_are_registered_over_the_reference():
    # Without these registrations every test below would pass by running the PyTorch reference on CUDA.
    for name in ("sq_kernels::scaled_mm", "sq_kernels::int8_mm"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name} has no CUDA kernel"
    assert sq_kernels.built_archs(), "the extension reports no kernel family"
    cap = torch.cuda.get_device_capability()
    assert cap >= (8, 0), f"sq_kernels needs sm_80+, this GPU is sm_{cap[0]}{cap[1]}"
    if cap == (9, 0):
        assert any("sm90" in s for s in sq_kernels.built_archs()), \
            f"an H100 without the sm90a kernels: built {sq_kernels.built_archs()}"


# ----------------------------------------------------------------------------------------------
# INT32: bitwise
# ----------------------------------------------------------------------------------------------
M_SWEEP = list(range(1, 129))
LARGE_ODD_M = [129, 255, 256, 257, 1000, 1024, 1025, 2049, 4097, 8192]


@pytest.mark.parametrize("n,k", [(368, 1040), (4096, 4096)], ids=["N368_K1040", "N4096_K4096"])
def test_int8_mm_bitwise_every_m_1_to_128(n, k):
    g = gen(n + k)
    a_all, w = randint8(M_SWEEP[-1], k, g=g), randint8(n, k, g=g)
    ref = acc64(a_all, w)
    for m in M_SWEEP:
        out = run(PATH_AUTO, a_all[:m], w, None, None, None, torch.int32)
        assert out.dtype == torch.int32 and out.shape == (m, n)
        assert torch.equal(out.double(), ref[:m]), f"int8_mm M={m} N={n} K={k} differs from the exact product"


@pytest.mark.parametrize("m", LARGE_ODD_M)
def test_int8_mm_bitwise_large_and_odd_m(m):
    n, k = (4096, 4096) if m == 8192 else (1040, 2064)
    g = gen(m)
    a, w = randint8(m, k, g=g), randint8(n, k, g=g)
    assert torch.equal(run(PATH_AUTO, a, w, None, None, None, torch.int32).double(), acc64(a, w)), f"M={m}"


@pytest.mark.parametrize("k", [16400, 131056], ids=["K16400", "K131056_int32_edge"])
def test_int8_mm_extreme_operands_long_k(k):
    # -128 x -128 summed over K = 131056 is 2147221504, just below 2**31: the accumulator's limit.
    g = gen(k)
    for m in (1, 17, 64, 200):
        a = randint8(m, k, g=g, extremes=True)
        w = randint8(256, k, g=g, extremes=True)
        a[0] = -128
        w[0] = -128
        w[1] = 127
        ref = acc64(a, w)
        assert ref[0, 0].item() == 16384 * k and ref[0, 1].item() == -128 * 127 * k
        out = run(PATH_AUTO, a, w, None, None, None, torch.int32)
        assert torch.equal(out.double(), ref), f"int8_mm M={m} K={k} extremes"
        one, w_scale = torch.ones(1, device=DEV), torch.tensor([2.0 ** -20], device=DEV)
        y64, mag = epilogue64(ref, one, w_scale)
        for path in paths_for_m(m):
            y = run(path, a, w, one, w_scale, None, torch.bfloat16)
            assert_within_rounding(y, y64, mag, f"path {PATH_NAMES.get(path, 'auto')} M={m} K={k} extremes, bf16")


# ----------------------------------------------------------------------------------------------
# Dequantized output: every M from 1 to 128, every granularity, bias, fp16 / bf16
# ----------------------------------------------------------------------------------------------
GRANS = [("tensor", "tensor"), ("tensor", "channel"), ("token", "tensor"), ("token", "channel")]


def check_scaled(out, a, w, a_scale, w_scale, bias, out_dtype, relu, acc, what, out_scale=None):
    y64, mag = epilogue64(acc, a_scale, w_scale, bias, relu)
    if out_dtype == torch.int8:
        assert_int8_close(out, y64, out_scale, what)
        return
    assert out.dtype == out_dtype and out.shape == (a.shape[0], w.shape[0])
    assert_within_rounding(out, y64, mag, what)
    ref = gemm._scaled_mm_reference(a, w, a_scale, w_scale, bias, out_dtype, None, relu)
    assert_agrees_with_reference(out, ref, mag, what)


@pytest.mark.parametrize("a_gran,w_gran", GRANS, ids=[f"a_{a}-w_{w}" for a, w in GRANS])
@pytest.mark.parametrize("out_dtype", FP_OUT, ids=["fp16", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_scaled_mm_every_m_1_to_128(a_gran, w_gran, out_dtype, bias):
    n, k = 368, 1040  # multiples of 16 but of no tile size: partial tiles in N and K
    g = gen(GRANS.index((a_gran, w_gran)) * 2 + bias)
    a_all, w = randint8(128, k, g=g), randint8(n, k, g=g)
    sa_all, sw = scales(128, n, k, a_gran, w_gran, g)
    b = torch.randn(n, generator=g, device=DEV) if bias else None
    acc = acc64(a_all, w)
    for m in M_SWEEP:
        a, sa = a_all[:m], (sa_all[:m] if a_gran == "token" else sa_all)
        out = run(PATH_AUTO, a, w, sa, sw, b, out_dtype)
        check_scaled(out, a, w, sa, sw, b, out_dtype, False, acc[:m],
                     f"M={m} {a_gran}/{w_gran} {out_dtype} bias={bias}")


@pytest.mark.parametrize("out_dtype", FP_OUT + [torch.int8], ids=["fp16", "bf16", "int8"])
@pytest.mark.parametrize("m", LARGE_ODD_M)
def test_scaled_mm_large_and_odd_m(m, out_dtype):
    n, k = (4096, 4096) if m == 8192 else (1040, 2064)
    g = gen(m + 7)
    a, w = randint8(m, k, g=g), randint8(n, k, g=g)
    sa, sw = scales(m, n, k, "token", "channel", g)
    b = torch.randn(n, generator=g, device=DEV)
    out_scale = torch.tensor([0.02], device=DEV) if out_dtype == torch.int8 else None
    out = run(PATH_AUTO, a, w, sa, sw, b, out_dtype, out_scale)
    check_scaled(out, a, w, sa, sw, b, out_dtype, False, acc64(a, w), f"M={m} {out_dtype}", out_scale)


@pytest.mark.parametrize("out_dtype", FP_OUT + [torch.int8], ids=["fp16", "bf16", "int8"])
def test_relu_and_int8_output_every_m_1_to_128(out_dtype):
    n, k = 272, 528
    g = gen(99)
    a_all, w = randint8(128, k, g=g), randint8(n, k, g=g)
    sa_all, sw = scales(128, n, k, "token", "channel", g)
    b = torch.randn(n, generator=g, device=DEV)
    out_scale = torch.tensor([0.013], device=DEV) if out_dtype == torch.int8 else None
    acc = acc64(a_all, w)
    for m in M_SWEEP:
        for relu in (False, True):
            out = run(PATH_AUTO, a_all[:m], w, sa_all[:m], sw, b, out_dtype, out_scale, relu)
            if relu:
                assert (out >= 0).all(), f"relu output negative at M={m}"
            check_scaled(out, a_all[:m], w, sa_all[:m], sw, b, out_dtype, relu, acc[:m],
                         f"M={m} relu={relu} {out_dtype}", out_scale)
            if out_dtype == torch.int8:  # a second, differently poisoned call: unwritten bytes would differ
                again = poison(lambda: SCALED_MM(a_all[:m], w, sa_all[:m], sw, b, out_dtype, out_scale, relu),
                               (m, n), torch.int8, sentinel=-0x56)
                assert torch.equal(again, out), f"int8 output depends on the buffer's old contents at M={m}"


@pytest.mark.parametrize("out_dtype", FP_OUT, ids=["fp16", "bf16"])
def test_ties_round_to_nearest_even(out_dtype):
    # acc = 2**(mant+1) + odd, w_scale = 2**-(mant+1): y lies exactly halfway between two outputs.
    mant = MANTISSA_BITS[out_dtype]
    half = 2 ** (mant + 1)
    accs = [half + 1, half + 3, half + 5, half - 1, -(half + 1), -(half + 3), 0, 1]
    cols = 16 * (-(-(half + 5) // (127 * 16)) + 1)
    a = torch.zeros(len(accs), cols, dtype=torch.int8)
    for i, v in enumerate(accs):
        full, rest = divmod(abs(v), 127)
        a[i, :full] = 127
        a[i, full] = rest
        if v < 0:
            a[i] = -a[i]
    a, w = a.to(DEV), torch.ones(32, cols, dtype=torch.int8, device=DEV)
    want = (torch.tensor(accs, dtype=torch.float64, device=DEV) * 2.0 ** -(mant + 1)).to(out_dtype)
    one, ws = torch.ones(1, device=DEV), torch.tensor([2.0 ** -(mant + 1)], device=DEV)
    for path in paths_for_m(len(accs)):
        out = run(path, a, w, one, ws, None, out_dtype)
        assert torch.equal(out, want.reshape(-1, 1).expand(-1, 32)), f"path {path}: ties not rounded to even"


def test_int8_output_ties_and_saturation_exact():
    v = torch.arange(-128, 128, dtype=torch.int64)
    a = torch.zeros(256, 32, dtype=torch.int8)
    a[:, 0] = v.to(torch.int8)
    w = torch.zeros(16, 32, dtype=torch.int8)
    w[:, 0] = 1
    w_scale = torch.tensor([0.25, 0.5, 1.0, 2.0] * 4)
    want = torch.clamp(torch.round(v.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)), -128, 127)
    a, w, w_scale = a.to(DEV), w.to(DEV), w_scale.to(DEV)
    for m in (16, 256):
        rows = slice(0, m) if m == 256 else slice(120, 136)  # around zero: the +-0.5 ties
        for path in paths_for_m(m):
            out = run(path, a[rows], w, torch.ones(1, device=DEV), w_scale, None, torch.int8,
                      torch.ones(1, device=DEV))
            assert torch.equal(out.cpu().double(), want[rows]), f"path {path} M={m}: int8 rounding/saturation"


# ----------------------------------------------------------------------------------------------
# Every kernel path, the dispatch boundaries, and the real layer shapes
# ----------------------------------------------------------------------------------------------
DISPATCH_M = [1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 1024,
              1025, 2048]


def test_every_kernel_path_across_the_dispatch_boundaries():
    if not has_path_hook():
        pytest.fail("the extension has no _sq_kernels_C::scaled_mm_path hook to force each kernel path")
    assert PATH_SMALL_M in available_paths()
    n, k = 1040, 1552
    g = gen(5)
    a_all, w = randint8(DISPATCH_M[-1], k, g=g), randint8(n, k, g=g)
    sa_all, sw = scales(DISPATCH_M[-1], n, k, "token", "channel", g)
    b = torch.randn(n, generator=g, device=DEV)
    acc = acc64(a_all, w)
    covered = set()
    for m in DISPATCH_M:
        for path in paths_for_m(m):
            covered.add(path)
            for out_dtype in (torch.float16, torch.bfloat16):
                out = run(path, a_all[:m], w, sa_all[:m], sw, b, out_dtype)
                check_scaled(out, a_all[:m], w, sa_all[:m], sw, b, out_dtype, False, acc[:m],
                             f"path {PATH_NAMES.get(path, 'auto')} M={m} {out_dtype}")
            i32 = run(path, a_all[:m], w, None, None, None, torch.int32)
            assert torch.equal(i32.double(), acc[:m]), f"path {PATH_NAMES.get(path, 'auto')} M={m} int32"
    assert covered == {PATH_AUTO, *available_paths()}, covered


@pytest.mark.parametrize("n,k", UNIQUE_LAYER_SHAPES, ids=[f"{n}x{k}" for n, k in UNIQUE_LAYER_SHAPES])
def test_real_layer_shapes(n, k):
    g = gen(n ^ k)
    ms = [1, 16, 33, 128, 512]
    a_all, w = randint8(ms[-1], k, g=g), randint8(n, k, g=g)
    sa_all, sw = scales(ms[-1], n, k, "token", "channel", g)
    b = torch.randn(n, generator=g, device=DEV)
    acc = acc64(a_all, w)
    for m in ms:
        for out_dtype in FP_OUT:
            out = run(PATH_AUTO, a_all[:m], w, sa_all[:m], sw, b if out_dtype == torch.float16 else None, out_dtype)
            y64, mag = epilogue64(acc[:m], sa_all[:m], sw, b if out_dtype == torch.float16 else None)
            assert_within_rounding(out, y64, mag, f"{n}x{k} M={m} {out_dtype}")
    out = run(PATH_AUTO, a_all[:16], w, None, None, None, torch.int32)
    assert torch.equal(out.double(), acc[:16]), f"{n}x{k} int32"
    del a_all, w, acc, out
    torch.cuda.empty_cache()  # the largest weights take GBs as float64; do not let them pile up


# ----------------------------------------------------------------------------------------------
# Poisoned outputs, special values, empty shapes
# ----------------------------------------------------------------------------------------------
def test_outputs_are_allocated_from_poisoned_blocks():
    # The sweeps above trust Poison to hand the op a NaN-filled block; check that it does.
    g = gen(3)
    w = randint8(368, 1040, g=g)
    sw = torch.rand(368, generator=g, device=DEV)
    start_calls, start_hits = poison.calls, poison.hits
    for m in (1, 5, 33, 100, 300, 2000):
        a = randint8(m, 1040, g=g)
        for out_dtype in FP_OUT:
            out = run(PATH_AUTO, a, w, torch.ones(m, device=DEV), sw, None, out_dtype)
            assert not out.isnan().any()
    hits, calls = poison.hits - start_hits, poison.calls - start_calls
    assert hits >= 0.8 * calls, f"only {hits} of {calls} outputs landed in a poisoned block"


def test_nan_scale_poisons_only_its_row_and_zero_rows_give_zero():
    g = gen(4)
    for m in (8, 64, 300):
        a, w = randint8(m, 256, g=g), randint8(64, 256, g=g)
        a[3] = 0
        sa, sw = scales(m, 64, 256, "token", "channel", g)
        clean = run(PATH_AUTO, a, w, sa, sw, None, torch.float16)
        assert torch.equal(clean[3], torch.zeros(64, dtype=torch.float16, device=DEV)), f"M={m}: zero row"
        sa2 = sa.clone()
        sa2[5] = float("nan")
        dirty = run(PATH_AUTO, a, w, sa2, sw, None, torch.float16)
        assert dirty[5].isnan().all(), f"M={m}: a NaN scale must give a NaN row"
        keep = torch.ones(m, dtype=torch.bool, device=DEV)
        keep[5] = False
        assert torch.equal(dirty[keep], clean[keep]), f"M={m}: a NaN scale leaked into other rows"


def test_empty_m_and_n():
    w = torch.ones(64, 128, dtype=torch.int8, device=DEV)
    one = torch.ones(1, device=DEV)
    for out_dtype, out_scale in [(torch.float16, None), (torch.bfloat16, None), (torch.int8, one)]:
        out = SCALED_MM(torch.ones(0, 128, dtype=torch.int8, device=DEV), w, torch.ones(0, device=DEV),
                        torch.ones(64, device=DEV), None, out_dtype, out_scale, False)
        assert out.shape == (0, 64) and out.dtype == out_dtype and out.is_cuda
    assert INT8_MM(torch.ones(0, 128, dtype=torch.int8, device=DEV), w).shape == (0, 64)
    out = SCALED_MM(torch.ones(4, 128, dtype=torch.int8, device=DEV), w[:0], one, one, None, torch.float16, None,
                    False)
    assert out.shape == (4, 0)
    torch.cuda.synchronize()


def test_wrapper_leading_dims_and_fp16_bias_on_cuda():
    g = gen(8)
    a, w = randint8(2, 5, 256, g=g), randint8(96, 256, g=g)
    sa = torch.rand(2, 5, generator=g, device=DEV) / 127
    sw = torch.rand(96, generator=g, device=DEV) / 127
    b = torch.randn(96, generator=g, device=DEV).half()
    out = ops.scaled_mm(a, w, sa, sw, b)
    assert out.shape == (2, 5, 96) and out.is_cuda
    flat = SCALED_MM(a.reshape(10, 256), w, sa.reshape(10), sw, b.float(), torch.float16, None, False)
    assert torch.equal(out.reshape(10, 96), flat)
    assert torch.equal(ops.int8_mm(a, w).reshape(10, 96).double(), acc64(a.reshape(10, 256), w))


@pytest.mark.parametrize("m", [5, 64, 300, 1500])
def test_wrapper_aligns_misaligned_w_scale_and_bias(m):
    # The sm80 epilogue loads w_scale and bias 16 bytes at a time: the wrapper hands it aligned copies.
    g = gen(m + 5)
    a, w = randint8(m, 256, g=g), randint8(96, 256, g=g)
    sa = torch.rand(m, generator=g, device=DEV) / 127
    packed_scale = torch.rand(97, generator=g, device=DEV) / 127
    packed_bias = torch.randn(100, generator=g, device=DEV)
    sw, b = packed_scale[1:], packed_bias[3:99]
    for out_dtype in (torch.float16, torch.bfloat16):
        want = SCALED_MM(a, w, sa, sw.clone(), b.clone(), out_dtype, None, False)
        assert torch.equal(ops.scaled_mm(a, w, sa, sw, b, out_dtype=out_dtype), want), f"M={m} {out_dtype}"
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Layouts: strided views are correct, transposed ones are rejected clearly
# ----------------------------------------------------------------------------------------------
def correct_or_clear_error(fn, expected, op_name, arg_names, what):
    """The call returns ``expected`` bitwise, or raises a ValueError that names one of ``arg_names``."""
    try:
        out = fn()
    except ValueError as exc:
        assert _cpu_suite().error_names(exc, op_name, arg_names), f"{what}: the error should name {arg_names}: {exc}"
        return "rejected"
    torch.cuda.synchronize()
    assert torch.equal(out, expected), f"{what}: a silently wrong result"
    return "correct"


@pytest.mark.parametrize("m", [5, 64, 300, 1500])
def test_strided_offset_and_exotic_views(m):
    k, n = 512, 272
    g = gen(m + 11)
    big_a = randint8(m + 1, k + 64, g=g)
    big_w = randint8(n + 1, k + 32, g=g)
    sa, sw = torch.rand(m, generator=g, device=DEV), torch.rand(n, generator=g, device=DEV)

    def both(a, w):
        return (SCALED_MM(a, w, sa, sw, None, torch.float16, None, False), INT8_MM(a, w))

    a_view = big_a[1:, 16:16 + k]  # row stride k + 64, storage offset: still 16-byte aligned
    w_view = big_w[1:, :k]  # row stride k + 32
    assert not a_view.is_contiguous() and a_view.storage_offset() > 0 and not w_view.is_contiguous()
    want = both(a_view.contiguous(), w_view.contiguous())
    got = both(a_view, w_view)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), "row-strided views"
    assert torch.equal(want[1].double(), acc64(a_view, w_view))

    for what, a, w, arg in [
        ("a misaligned by 1 byte", big_a[1:, 1:1 + k], w_view, "a"),
        ("w misaligned by 8 bytes", a_view, big_w[1:, 8:8 + k], "w"),
        ("a broadcast rows (stride 0)", a_view[:1].expand(m, k), w_view, "a"),
        ("a overlapping rows (stride 16)", big_a.reshape(-1).as_strided((m, k), (16, 1)), w_view, "a"),
    ]:
        expected = SCALED_MM(a.contiguous(), w.contiguous(), sa, sw, None, torch.float16, None, False)
        correct_or_clear_error(lambda: SCALED_MM(a, w, sa, sw, None, torch.float16, None, False), expected,
                               "scaled_mm", [arg], f"M={m}: {what}")
        correct_or_clear_error(lambda: INT8_MM(a, w), INT8_MM(a.contiguous(), w.contiguous()), "int8_mm", [arg],
                               f"M={m} int8_mm: {what}")

    for what, a, w, arg in [("a transposed", big_a[:m, :k].t().contiguous().t(), w_view, "a"),
                            ("w transposed", a_view, big_w[:n, :k].t().contiguous().t(), "w")]:
        with pytest.raises(ValueError, match=rf"\b{arg}\b"):
            SCALED_MM(a, w, sa, sw, None, torch.float16, None, False)
        with pytest.raises(ValueError, match=rf"\b{arg}\b"):
            INT8_MM(a, w)
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------
# Streams, CUDA graphs, determinism
# ----------------------------------------------------------------------------------------------
GRAPH_M = [1, 16, 64, 512, 2048]


@pytest.mark.parametrize("m", GRAPH_M)
def test_cuda_graph_replay_is_bitwise_equal_to_eager(m):
    n, k = 1024, 2048
    g = gen(m + 21)
    a, w = randint8(m, k, g=g), randint8(n, k, g=g)
    sa, sw = scales(m, n, k, "token", "channel", g)
    b = torch.randn(n, generator=g, device=DEV)

    def step():
        return (SCALED_MM(a, w, sa, sw, b, torch.float16, None, False),
                SCALED_MM(a, w, sa, sw, None, torch.bfloat16, None, True),
                INT8_MM(a, w))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    eager = step()
    for t in static_out:
        t.fill_(SENTINEL[t.dtype])
    graph.replay()
    torch.cuda.synchronize()
    for s, e in zip(static_out, eager):
        assert torch.equal(s, e), f"M={m}: replay differs from eager ({s.dtype})"
    # the graph must read the live inputs: new values in the same tensors, replay, compare
    a.copy_(randint8(m, k, g=g))
    sa.copy_(sa.flip(0))
    b.mul_(-1)
    graph.replay()
    eager2 = step()
    torch.cuda.synchronize()
    for s, e in zip(static_out, eager2):
        assert torch.equal(s, e), f"M={m}: replay after new inputs differs from eager ({s.dtype})"
    assert not torch.equal(eager2[2], eager[2])


@pytest.mark.parametrize("m", GRAPH_M)
def test_runs_on_the_callers_current_stream(m):
    # The side stream first sleeps, then writes a; a kernel launched on any other stream (PyTorch's
    # side streams do not synchronise with the legacy default stream) would read the old zeros.
    n, k = 512, 1024
    g = gen(m + 31)
    src, w = randint8(m, k, g=g), randint8(n, k, g=g)
    sa, sw = scales(m, n, k, "token", "channel", g)
    a = torch.zeros_like(src)
    want = SCALED_MM(src, w, sa, sw, None, torch.float16, None, False)
    want32 = INT8_MM(src, w)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        a.copy_(src)
        out = SCALED_MM(a, w, sa, sw, None, torch.float16, None, False)
        out32 = INT8_MM(a, w)
    torch.cuda.synchronize()
    assert torch.equal(out, want) and torch.equal(out32, want32), f"M={m}: not run on the current stream"


def test_repeated_runs_are_bitwise_identical():
    n, k = 2064, 4096
    g = gen(41)
    for m in (1, 32, 100, 700, 3000):
        a, w = randint8(m, k, g=g), randint8(n, k, g=g)
        sa, sw = scales(m, n, k, "token", "channel", g)
        for path in paths_for_m(m):
            first = run(path, a, w, sa, sw, None, torch.bfloat16)
            for _ in range(100):
                assert torch.equal(run(path, a, w, sa, sw, None, torch.bfloat16), first), f"path {path} M={m}"


# ----------------------------------------------------------------------------------------------
# torch.library integration and bad input on CUDA
# ----------------------------------------------------------------------------------------------
def _opcheck_cases():
    g = gen(51)
    cases = []
    for m in (3, 300):
        a, w = randint8(m, 256, g=g), randint8(128, 256, g=g)
        sa, sw = torch.rand(m, generator=g, device=DEV), torch.rand(128, generator=g, device=DEV)
        b = torch.randn(128, generator=g, device=DEV)
        one = torch.tensor([0.01], device=DEV)
        cases += [(a, w, sa, sw, b, torch.float16, None, False), (a, w, one, one, None, torch.bfloat16, None, True),
                  (a, w, sa, sw, b, torch.int8, torch.tensor([0.05], device=DEV), False)]
    return cases


def test_opcheck_on_cuda():
    for args in _opcheck_cases():
        torch.library.opcheck(SCALED_MM, args)
    g = gen(52)
    for m in (3, 300):
        torch.library.opcheck(INT8_MM, (randint8(m, 128, g=g), randint8(64, 128, g=g)))


@functools.lru_cache(maxsize=None)
def _cpu_suite():
    """tests/test_ops_gemm.py, for its bad-input tables (loaded by path: tests/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "test_ops_gemm.py"
    spec = importlib.util.spec_from_file_location("_sq_kernels_cpu_gemm_suite", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=None)
def _cuda_tables():
    suite = _cpu_suite()
    return suite.scaled_mm_bad_inputs(DEV, "cpu"), suite.int8_mm_bad_inputs(DEV, "cpu")


def _case_ids(table_name):
    suite = _cpu_suite()
    table = getattr(suite, table_name)
    params = []
    for i, case in enumerate(table):
        for path in case[3]:
            if (case[0], path) in suite.KNOWN_GAPS:
                continue
            gap = suite.CUDA_GAPS.get((case[0], path))
            params.append(pytest.param(i, path, id=f"{case[0]}-{path}",
                                       marks=[pytest.mark.skip(reason=gap)] if gap else []))
    return params


@pytest.mark.parametrize("index,path", _case_ids("_CPU_SCALED"))
def test_scaled_mm_rejects_bad_input_on_cuda(index, path):
    suite = _cpu_suite()
    case_id, kw, names, _ = _cuda_tables()[0][index]
    with pytest.raises(ValueError) as info:
        suite.call_scaled_mm(kw, path)
    assert suite.error_names(info.value, "scaled_mm", names), f"{case_id}: the error should name {names}: {info.value}"
    torch.cuda.synchronize()  # no asynchronous fault behind the clean error


@pytest.mark.parametrize("index,path", _case_ids("_CPU_INT8"))
def test_int8_mm_rejects_bad_input_on_cuda(index, path):
    suite = _cpu_suite()
    case_id, args, names, _ = _cuda_tables()[1][index]
    with pytest.raises(ValueError) as info:
        suite.call_int8_mm(args, path)
    assert suite.error_names(info.value, "int8_mm", names), f"{case_id}: the error should name {names}: {info.value}"
    torch.cuda.synchronize()


def test_mixed_devices_are_rejected_clearly():
    g = gen(61)
    a, w = randint8(4, 64, g=g), randint8(32, 64, g=g)
    sa, sw = torch.rand(4, device=DEV), torch.rand(32, device=DEV)
    cases = [
        ("a on cpu", (a.cpu(), w, sa, sw, None), ["a", "w"]),
        ("w on cpu", (a, w.cpu(), sa, sw, None), ["w"]),
        ("a_scale on cpu", (a, w, sa.cpu(), sw, None), ["a_scale"]),
        ("w_scale on cpu", (a, w, sa, sw.cpu(), None), ["w_scale"]),
        ("scalar a_scale on cpu", (a, w, torch.ones(1), sw, None), ["a_scale"]),
        ("bias on cpu", (a, w, sa, sw, torch.ones(32)), ["bias"]),
    ]
    for what, (a_, w_, sa_, sw_, b_), names in cases:
        for call in (lambda: SCALED_MM(a_, w_, sa_, sw_, b_, torch.float16, None, False),
                     lambda: ops.scaled_mm(a_, w_, sa_, sw_, b_)):
            with pytest.raises(ValueError) as info:
                call()
            assert _cpu_suite().error_names(info.value, "scaled_mm", names), f"{what}: {info.value}"
    with pytest.raises(ValueError, match="out_scale"):
        SCALED_MM(a, w, sa, sw, None, torch.int8, torch.ones(1), False)
    with pytest.raises(ValueError):
        INT8_MM(a, w.cpu())
    torch.cuda.synchronize()
