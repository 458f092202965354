"""CUDA tests of the fused (residual add +) RMSNorm / LayerNorm + quantize kernels behind
``sq_kernels::rms_norm_quant``, ``add_rms_norm_quant``, ``layer_norm_quant`` and
``add_layer_norm_quant`` (csrc/kernels/common/norm_quant*.cu).

Oracle: the PyTorch reference of sq_kernels/ops/norm.py run on the same GPU tensors (checked
against float64 norms in tests/test_ops_norm.py). The residual sum must match bitwise; the row sums
are added in another order by the kernel, so: scales within rtol 1e-6, int8 values off by at most 1
on at most 0.1% of the elements. Hidden sizes cover every launch shape of the row kernel (16-byte
vectors and scalars, 1/2/4/8 vectors per thread in registers, and the streaming variant) and the
real OPT / Llama / BLOOM hidden sizes.

Outputs are allocated from caching-allocator blocks filled with a sentinel just before the call.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

import sq_kernels
from sq_kernels import ops
from sq_kernels.ops import norm as norm_mod
from sq_kernels.ops import quant

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and sq_kernels.has_cuda_kernels()),
    reason="needs a CUDA GPU and the built sq_kernels._C extension: " + str(sq_kernels.extension_error()))

DEV = "cuda"
RMS = torch.ops.sq_kernels.rms_norm_quant.default
ADD_RMS = torch.ops.sq_kernels.add_rms_norm_quant.default
LN = torch.ops.sq_kernels.layer_norm_quant.default
ADD_LN = torch.ops.sq_kernels.add_layer_norm_quant.default
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]
NORMS = ["rms", "layer", "layer_nobias"]
EPS_SCALE = float(torch.tensor(quant.EPS, dtype=torch.float32) / 127)

# See tests/kernels/test_quant_kernels.py for the launch shape each size takes.
HIDDEN = [1, 17, 64, 1025, 4096, 5137, 8192, 14336, 32768, 40960]
HIDDEN_FP32 = [1, 17, 1025, 4096, 8192, 16384, 16388]
MODEL_HIDDEN = {"OPT-125M": 768, "OPT-6.7B": 4096, "OPT-13B": 5120, "OPT-30B": 7168, "OPT-66B": 9216,
                "OPT-175B": 12288, "Llama-2-7B": 4096, "Llama-2-13B": 5120, "Llama-2-70B": 8192,
                "BLOOM-560M": 1024, "BLOOM-7B1": 4096, "BLOOM-176B": 14336}


def gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def activations(m, h, dtype, seed=0, scale=1.0):
    g = gen(seed)
    x = torch.randn(m, h, generator=g, device=DEV) * scale
    if h > 8:
        x[:, torch.randint(0, h, (max(1, h // 64),), generator=g, device=DEV)] *= 20.0
    return x.to(dtype)


def norm_params(norm, h, dtype, seed=1):
    g = gen(seed)
    w = torch.rand(h, generator=g, device=DEV) + 0.5
    w[torch.randint(0, h, (max(1, h // 100),), generator=g, device=DEV)] *= 8.0
    b = torch.randn(h, generator=g, device=DEV) * 0.1 if norm == "layer" else None
    return w.to(dtype), (None if b is None else b.to(dtype))


def call(norm, x, w, b, eps, residual=None, scale=None):
    if norm == "rms":
        return RMS(x, w, eps, scale) if residual is None else ADD_RMS(x, residual, w, eps, scale)
    return LN(x, w, b, eps, scale) if residual is None else ADD_LN(x, residual, w, b, eps, scale)


def reference(norm, x, w, b, eps, residual=None, scale=None):
    if norm == "rms":
        if residual is None:
            return norm_mod._rms_reference(x, w, eps, scale)
        return norm_mod._add_rms_reference(x, residual, w, eps, scale)
    if residual is None:
        return norm_mod._layer_reference(x, w, b, eps, scale)
    return norm_mod._add_layer_reference(x, residual, w, b, eps, scale)


class Poison:
    """Freed, sentinel-filled blocks of exactly the outputs' sizes, reused by the op's outputs."""

    def __init__(self):
        self.calls = 0
        self.hits = 0

    def __call__(self, fn, sizes):
        out = None
        for _ in range(3):
            del out
            blocks = [torch.full((n,), 0x55 if dt == torch.int8 else float("nan"), dtype=dt, device=DEV)
                      for n, dt in sizes if n]
            ptrs = {b.data_ptr() for b in blocks}
            del blocks
            out = fn()
            if ptrs <= {t.data_ptr() for t in out if t.numel()}:
                self.hits += 1
                break
        self.calls += 1
        return out


poison = Poison()


def run(norm, x, w, b, eps, residual=None, scale=None):
    m, h = x.shape
    sizes = [(m * h, torch.int8), (m if scale is None else 1, torch.float32)]
    if residual is not None:
        sizes.append((m * h, x.dtype))
    return poison(lambda: call(norm, x, w, b, eps, residual, scale), sizes)


def assert_int8_close(x_q, want, what, frac=1e-3):
    diff = (x_q.int() - want.int()).abs()
    assert diff.numel() == 0 or diff.max().item() <= 1, f"{what}: int8 off by {diff.max().item()}"
    n_off = int((diff != 0).sum())
    assert n_off <= max(1, frac * diff.numel()), f"{what}: {n_off} of {diff.numel()} int8 values off by one"


def assert_matches(got, want, what):
    assert len(got) == len(want)
    q, s = got[0], got[1]
    assert q.shape == want[0].shape and q.dtype == torch.int8 and s.shape == want[1].shape
    torch.testing.assert_close(s, want[1], rtol=1e-6, atol=0, equal_nan=True, msg=lambda m: f"{what}: scales {m}")
    assert_int8_close(q, want[0], what)
    if len(got) == 3:
        assert got[2].dtype == want[2].dtype and torch.equal(got[2].nan_to_num(7.0), want[2].nan_to_num(7.0)), \
            f"{what}: residual sums differ"


def check(norm, x, w, b, eps, residual, what):
    assert_matches(run(norm, x, w, b, eps, residual), reference(norm, x, w, b, eps, residual), what)
    s = (x.float().abs().max() / 20).reshape(1)
    assert_matches(run(norm, x, w, b, eps, residual, s), reference(norm, x, w, b, eps, residual, s),
                   what + " static")


# ----------------------------------------------------------------------------------------------
# Accuracy over the launch shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm", NORMS)
def test_matches_the_reference_over_hidden_sizes(norm, dtype, residual):
    for h in (HIDDEN_FP32 if dtype == torch.float32 else HIDDEN):
        m = 3 if h >= 14336 else 11
        x = activations(m, h, dtype, seed=h)
        r = activations(m, h, dtype, seed=h + 1, scale=2.0) if residual else None
        w, b = norm_params(norm, h, dtype, seed=h + 2)
        check(norm, x, w, b, 1e-5, r, f"{norm}/{dtype}/H={h}/{'res' if residual else 'plain'}")


@pytest.mark.parametrize("model", list(MODEL_HIDDEN))
def test_real_model_hidden_sizes(model):
    h = MODEL_HIDDEN[model]
    kind = "rms" if model.startswith("Llama") else "layer"
    dtype = torch.bfloat16 if model.startswith("Llama") else torch.float16
    x = activations(24, h, dtype, seed=h)
    r = activations(24, h, dtype, seed=h + 1, scale=3.0)
    w, b = norm_params(kind, h, dtype)
    check(kind, x, w, b, 1e-6 if kind == "rms" else 1e-5, r, model)


def test_large_m_and_more_rows_than_a_grid_dimension_of_65535():
    x = activations(16384, 4096, torch.float16, seed=1)
    w, _ = norm_params("rms", 4096, torch.float16)
    assert_matches(ADD_RMS(x, x, w, 1e-6, None), reference("rms", x, w, None, 1e-6, x), "16384x4096")
    x = activations(70000, 48, torch.bfloat16, seed=2)
    w, b = norm_params("layer", 48, torch.bfloat16)
    assert_matches(LN(x, w, b, 1e-5, None), reference("layer", x, w, b, 1e-5), "70000x48")


# ----------------------------------------------------------------------------------------------
# Edge rows, views, empty
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [80, 4096, 40960])
@pytest.mark.parametrize("norm", NORMS)
def test_zero_nan_and_inf_rows_stay_in_their_row(norm, h):
    x = activations(6, h, torch.float16, seed=3)
    r = activations(6, h, torch.float16, seed=4)
    w, b = norm_params(norm, h, torch.float16)
    x[0] = 0
    bad = x.clone()
    bad[2, 5] = float("nan")
    bad[4, h - 1] = float("inf")
    good = [0, 1, 3, 5]
    for res in (None, r):
        out = call(norm, bad, w, b, 1e-5, res)
        ref = call(norm, x[good], w, b, 1e-5, None if res is None else res[good])
        for o, g in zip(out, ref):
            assert torch.equal(o[good], g)
        for row in (2, 4):
            assert torch.isnan(out[1][row]) and not out[0][row].any()
    zero = call(norm, x[:1], w, None if norm != "layer" else torch.zeros_like(w), 1e-5)
    assert zero[1].item() == EPS_SCALE and not zero[0].any()


def test_m_zero_returns_empty_outputs_without_launching():
    w, b = norm_params("layer", 64, torch.float16)
    x = torch.empty(0, 64, dtype=torch.float16, device=DEV)
    for norm in NORMS:
        q, s, r = call(norm, x, w, b, 1e-5, x)
        assert q.shape == (0, 64) and s.shape == (0,) and r.shape == (0, 64)
        q, s = call(norm, x, w, b, 1e-5, None, torch.tensor([0.5], device=DEV))
        assert q.shape == (0, 64) and s.tolist() == [0.5]


VECTOR_VIEWS = ("aligned_row_stride", "every_other_row", "expanded_row")  # row stride % 8 == 0, 16-byte aligned


def test_strided_views_take_the_right_path_and_agree():
    h = 4096
    wide = activations(10, h + 64, torch.bfloat16, seed=5)
    odd = activations(10, h + 3, torch.bfloat16, seed=6)
    res = activations(10, h + 64, torch.bfloat16, seed=7)
    w, b = norm_params("layer", h, torch.bfloat16)
    w_odd = torch.cat([w[:1], w])[1:]  # a weight view whose data pointer is not 16-byte aligned
    views = {
        "aligned_row_stride": (wide[:, :h], res[:, 64:]),
        "unaligned_row_stride": (odd[:, :h], res[:, :h]),
        "misaligned_offset": (wide[:, 1:h + 1], res[:, 3:h + 3]),
        "every_other_row": (wide[::2, :h], res[1::2, :h]),
        "expanded_row": (wide[:1, :h].expand(5, h), res[:5, :h]),
    }
    for name, (x, r) in views.items():
        for norm in ("rms", "layer"):
            for ww in (w, w_odd):
                got = call(norm, x, ww, b, 1e-5, r)
                assert_matches(got, reference(norm, x, ww, b, 1e-5, r), f"{name}/{norm}")
                contiguous = call(norm, x.contiguous(), ww, b, 1e-5, r.contiguous())
                # Bitwise only where both calls run the same launch: the view and its copy take the
                # 16-byte path (VECTOR_VIEWS, aligned weight) or both the scalar one (unaligned weight).
                # Otherwise the row sums are formed in another order (quant.h: "up to the order of the
                # row sums") and scales may differ in the last bit.
                if name in VECTOR_VIEWS or ww is w_odd:
                    assert all(torch.equal(a, c) for a, c in zip(got, contiguous)), f"{name}/{norm} vs contiguous"
                else:
                    assert_matches(got, contiguous, f"{name}/{norm} vs contiguous")


# ----------------------------------------------------------------------------------------------
# Streams, graphs, determinism
# ----------------------------------------------------------------------------------------------
def test_runs_on_the_current_stream():
    x = torch.empty(4096, 8192, dtype=torch.float16, device=DEV)
    w, b = norm_params("layer", 8192, torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.normal_()
        out = ADD_LN(x, x, w, b, 1e-5, None)
    side.synchronize()
    assert_matches(out, reference("layer", x, w, b, 1e-5, x), "side stream")


def test_cuda_graph_capture_and_replay():
    x = activations(40, 5120, torch.float16, seed=8)
    r = activations(40, 5120, torch.float16, seed=9)
    w, b = norm_params("layer", 5120, torch.float16)
    s = torch.tensor([0.05], device=DEV)
    fns = {
        "add_rms": lambda: ADD_RMS(x, r, w, 1e-6, None),
        "rms_static": lambda: RMS(x, w, 1e-6, s),
        "add_layer_static": lambda: ADD_LN(x, r, w, b, 1e-5, s),
        "layer": lambda: LN(x, w, None, 1e-5, None),
    }
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns.values():
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs, outs = {}, {}
    for name, fn in fns.items():
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs[name] = fn()
        graphs[name] = g
    for round_ in range(2):
        x.copy_(activations(40, 5120, torch.float16, seed=30 + round_))
        for name, fn in fns.items():
            graphs[name].replay()
            torch.cuda.synchronize()
            assert all(torch.equal(a, c) for a, c in zip(outs[name], fn())), f"{name} replay {round_}"


def test_repeated_runs_are_bitwise_identical():
    x = activations(301, 14336, torch.bfloat16, seed=10)
    w, b = norm_params("layer", 14336, torch.bfloat16)
    first = [ADD_LN(x, x, w, b, 1e-5, None), RMS(x, w, 1e-6, None)]
    for _ in range(3):
        again = [ADD_LN(x, x, w, b, 1e-5, None), RMS(x, w, 1e-6, None)]
        for a, c in zip(first, again):
            assert all(torch.equal(u, v) for u, v in zip(a, c))


def test_poisoning_took_effect():
    if poison.calls < 20:
        pytest.skip("only meaningful after the rest of this module has run")
    assert poison.hits >= 0.5 * poison.calls, (poison.calls, poison.hits)


# ----------------------------------------------------------------------------------------------
# torch.library integration and bad input
# ----------------------------------------------------------------------------------------------
def test_opcheck_on_cuda():
    x = activations(5, 64, torch.float16, seed=11)
    w, b = norm_params("layer", 64, torch.float16)
    s = torch.tensor([0.05], device=DEV)
    for op_, args in [(RMS, (x, w, 1e-6, None)), (RMS, (x, w, 1e-6, s)), (ADD_RMS, (x, x, w, 1e-6, None)),
                      (LN, (x, w, b, 1e-5, None)), (LN, (x, w, None, 1e-5, s)), (ADD_LN, (x, x, w, b, 1e-5, s)),
                      (ADD_LN, (x[:0], x[:0], w, b, 1e-5, None))]:
        torch.library.opcheck(op_, args)


def test_torch_compile_fullgraph_on_cuda():
    torch._dynamo.reset()
    w, b = norm_params("layer", 256, torch.float16)

    def f(x, r):
        q, s, r2 = ops.layer_norm_quant(x, w, b, residual=r)
        q2, s2 = ops.rms_norm_quant(r2, w)
        return q, s, r2, q2, s2

    x, r = activations(7, 256, torch.float16, seed=12), activations(7, 256, torch.float16, seed=13)
    compiled = torch.compile(f, fullgraph=True)
    assert all(torch.equal(a, c) for a, c in zip(compiled(x, r), f(x, r)))
    torch._dynamo.reset()


@functools.lru_cache(maxsize=None)
def _cpu_suite():
    """tests/test_ops_norm.py, for its bad-input table (loaded by path: tests/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "test_ops_norm.py"
    spec = importlib.util.spec_from_file_location("_sq_kernels_cpu_norm_suite", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=None)
def _cuda_table():
    return _cpu_suite().bad_inputs(DEV, "cpu")


@pytest.mark.parametrize("index", [pytest.param(i, id=c[0], marks=[pytest.mark.skip(reason=_cpu_suite().CUDA_GAPS[c[0]])]
                                                if c[0] in _cpu_suite().CUDA_GAPS else [])
                                   for i, c in enumerate(_cpu_suite()._CPU_BAD)])
def test_rejects_bad_input_on_cuda(index):
    case_id, fn, names, op_name = _cuda_table()[index]
    with pytest.raises(ValueError) as info:
        fn()
    assert _cpu_suite().error_names(info.value, op_name, names), \
        f"{case_id}: the error should name {names}: {info.value}"
    torch.cuda.synchronize()
