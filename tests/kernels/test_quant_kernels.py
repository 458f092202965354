"""CUDA tests of the activation-quantization kernels behind ``sq_kernels::quantize_per_token``,
``quantize_per_tensor_dynamic``, ``quantize_static``, ``act_quant`` and ``silu_mul_quant``
(csrc/kernels/common/quant_*.cu).

Oracle: the PyTorch reference of sq_kernels/ops/{quant,activation}.py run on the same GPU tensors
(the references are checked against float64 in tests/test_ops_quant.py and
tests/test_ops_activation.py). The quantizers without a transcendental function (identity, ReLU)
must match it bitwise; GELU and SiLU go through erf/tanh/exp, whose last bit may differ between
implementations, so there: scales within rtol 1e-6 and int8 values off by at most 1 on at most
0.1% of the elements. Hidden sizes cover every launch shape of the row kernel: 16-byte vectors and
the scalar path, 1/2/4/8 vectors per thread, and the streaming variant for long rows.

Outputs are allocated from caching-allocator blocks filled with a sentinel just before the call
(see ``Poison``), so an element the kernel skips fails the comparison.
"""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest
import torch

import sq_kernels
from sq_kernels import ops
from sq_kernels.ops import activation, quant

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and sq_kernels.has_cuda_kernels()),
    reason="needs a CUDA GPU and the built sq_kernels._C extension: " + str(sq_kernels.extension_error()))

DEV = "cuda"
PER_TOKEN = torch.ops.sq_kernels.quantize_per_token.default
PER_TENSOR = torch.ops.sq_kernels.quantize_per_tensor_dynamic.default
STATIC = torch.ops.sq_kernels.quantize_static.default
ACT_QUANT = torch.ops.sq_kernels.act_quant.default
SILU_MUL = torch.ops.sq_kernels.silu_mul_quant.default
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]
ACTS = ["relu", "gelu", "gelu_tanh"]

# Hidden sizes and the row-kernel shape they take for fp16/bf16 (16-byte vectors of 8) unless odd:
# 1, 17, 1025: scalar path in registers; 5137: scalar streaming; 8: one vector; 1024: NV=1;
# 4096: NV=2; 8192: NV=4; 14336: NV=8 (224 threads); 32768: NV=8 (512 threads); 40960: streaming.
HIDDEN = [1, 8, 17, 1024, 1025, 4096, 5137, 8192, 14336, 32768, 40960]
# fp32 (vectors of 4): 8192: NV=8 (256 threads); 16384: NV=8 (512); 16388: streaming.
HIDDEN_FP32 = [1, 17, 1025, 4096, 8192, 16384, 16388]

# Inputs of the linears with no norm in front (out_proj / o_proj use the hidden size; fc2 /
# down_proj the intermediate size), per model.
MODEL_WIDTHS = {
    "OPT-125M": [768, 3072], "OPT-6.7B": [4096, 16384], "OPT-13B": [5120, 20480], "OPT-30B": [7168, 28672],
    "OPT-66B": [9216, 36864], "Llama-2-7B": [4096, 11008], "Llama-2-13B": [5120, 13824],
    "Llama-2-70B": [8192, 28672], "Llama-3-8B": [4096, 14336], "BLOOM-560M": [1024, 4096],
    "BLOOM-176B": [14336, 57344],
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def activations(m, h, dtype, seed=0, scale=3.0):
    g = gen(seed)
    x = torch.randn(m, h, generator=g, device=DEV) * scale
    if h > 8:
        x[:, torch.randint(0, h, (max(1, h // 64),), generator=g, device=DEV)] *= 10.0
    return x.to(dtype)


class Poison:
    """Leave freed blocks of exactly the outputs' sizes in the caching allocator, filled with a
    sentinel (0x55 for int8, NaN for float32), so that the op's outputs start out poisoned."""

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
            got = {t.data_ptr() for t in (out if isinstance(out, tuple) else (out,)) if t.numel()}
            if ptrs <= got:
                self.hits += 1
                break
        self.calls += 1
        return out


poison = Poison()


def run(fn, x_like, per_token=True, scale_out=True):
    m, h = x_like.shape
    sizes = [(m * h, torch.int8)] + ([(m if per_token else 1, torch.float32)] if scale_out else [])
    return poison(fn, sizes)


def assert_int8_close(x_q, want, what, frac=1e-3):
    diff = (x_q.int() - want.int()).abs()
    assert diff.numel() == 0 or diff.max().item() <= 1, f"{what}: int8 off by {diff.max().item()}"
    n_off = int((diff != 0).sum())
    assert n_off <= max(1, frac * diff.numel()), f"{what}: {n_off} of {diff.numel()} int8 values off by one"


def assert_same(got, want, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, f"{what}[{i}]: {g.shape} {g.dtype} vs {w.shape} {w.dtype}"
        assert torch.equal(g, w) or (g.is_floating_point() and torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0))), \
            f"{what}[{i}]: {int((g != w).sum())} of {g.numel()} elements differ"


def assert_close_to_reference(got, want, what):
    q, s = got
    q_ref, s_ref = want
    assert s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0, equal_nan=True, msg=lambda m: f"{what}: scales {m}")
    assert_int8_close(q, q_ref, what)


# ----------------------------------------------------------------------------------------------
# Identity: per-token, per-tensor, static; bitwise
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,h", [(d, h) for d in (torch.float16, torch.bfloat16) for h in HIDDEN]
                         + [(torch.float32, h) for h in HIDDEN_FP32])
def test_identity_quantizers_are_bitwise_the_reference(dtype, h):
    m = 3 if h >= 14336 else 13
    x = activations(m, h, dtype, seed=h)
    what = f"{dtype}/H={h}"
    assert_same(run(lambda: PER_TOKEN(x), x), quant._per_token_reference(x), "per_token " + what)
    assert_same(run(lambda: PER_TENSOR(x), x, per_token=False), quant._per_tensor_dynamic_reference(x),
                "per_tensor " + what)
    s = (x.float().abs().max() / 100).reshape(1)  # saturates the top of the range
    assert_same((run(lambda: STATIC(x, s), x, scale_out=False),), (quant._static_reference(x, s),), "static " + what)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_relu_is_bitwise_the_reference(dtype):
    for h in (17, 4096, 14336, 40960):
        x = activations(5, h, dtype, seed=h)
        for scale in (None, torch.tensor([0.02], device=DEV)):
            assert_same(run(lambda: ACT_QUANT(x, "relu", scale), x, per_token=scale is None),
                        activation._act_quant_reference(x, "relu", scale), f"relu/{dtype}/H={h}")


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu_mul"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gelu_and_silu_mul_against_the_reference(act, dtype):
    for h in (HIDDEN_FP32 if dtype == torch.float32 else HIDDEN):
        m = 3 if h >= 14336 else 9
        x = activations(m, h, dtype, seed=h)
        u = activations(m, h, dtype, seed=h + 1, scale=1.0)
        for scale in (None, torch.tensor([0.03], device=DEV)):
            if act == "silu_mul":
                got = run(lambda: SILU_MUL(x, u, scale), x, per_token=scale is None)
                want = activation._silu_mul_reference(x, u, scale)
            else:
                got = run(lambda: ACT_QUANT(x, act, scale), x, per_token=scale is None)
                want = activation._act_quant_reference(x, act, scale)
            assert_close_to_reference(got, want, f"{act}/{dtype}/H={h}/{'static' if scale is not None else 'token'}")


@pytest.mark.parametrize("model", list(MODEL_WIDTHS))
def test_real_model_widths(model):
    for h in MODEL_WIDTHS[model]:
        x = activations(5, h, torch.float16, seed=h)
        assert_same(run(lambda: PER_TOKEN(x), x), quant._per_token_reference(x), f"{model}/H={h}")
        act = "relu" if model.startswith("OPT") else "gelu_tanh"
        if model.startswith("Llama"):
            u = activations(5, h, torch.float16, seed=h + 1)
            assert_close_to_reference(run(lambda: SILU_MUL(x, u, None), x),
                                      activation._silu_mul_reference(x, u, None), f"{model}/silu_mul/H={h}")
        else:
            assert_close_to_reference(run(lambda: ACT_QUANT(x, act, None), x),
                                      activation._act_quant_reference(x, act, None), f"{model}/{act}/H={h}")


def test_large_m_and_more_rows_than_a_grid_dimension_of_65535():
    x = activations(16384, 4096, torch.bfloat16, seed=1)
    assert_same(PER_TOKEN(x), quant._per_token_reference(x), "16384x4096")
    x = activations(70000, 40, torch.float16, seed=2)
    assert_same(PER_TOKEN(x), quant._per_token_reference(x), "70000x40")
    assert_same(PER_TENSOR(x), quant._per_tensor_dynamic_reference(x), "70000x40 per tensor")


# ----------------------------------------------------------------------------------------------
# Edge rows and shapes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h", [40, 4096, 40960])
def test_zero_nan_and_inf_rows_stay_in_their_row(h):
    x = activations(6, h, torch.float16, seed=3)
    x[0] = 0
    bad = x.clone()
    bad[2, 3] = float("nan")
    bad[4, h - 1] = float("inf")
    good = [0, 1, 3, 5]
    for fn in (PER_TOKEN, lambda t: ACT_QUANT(t, "gelu", None), lambda t: SILU_MUL(t, t, None)):
        q, s = fn(bad)
        gq, gs = fn(x[good])
        assert torch.equal(q[good], gq) and torch.equal(s[good], gs)
        assert s[0].item() == float(torch.tensor(quant.EPS, dtype=torch.float32) / 127) and not q[0].any()
        assert torch.isnan(s[2]) and not q[2].any()
        assert not q[4].any()
    q, s = PER_TENSOR(bad)
    assert torch.isnan(s).all() and not q.any()  # per-tensor: a NaN anywhere is a NaN scale
    q, s = PER_TENSOR(x)
    assert torch.isfinite(s).all()
    s = torch.tensor([0.01], device=DEV)
    assert torch.equal(STATIC(bad, s), quant._static_reference(bad, s))  # NaN -> 0, inf -> 127


def test_m_zero_and_h_zero():
    for shape in [(0, 64), (0, 0)]:
        x = torch.empty(shape, dtype=torch.float16, device=DEV)
        q, s = PER_TOKEN(x)
        assert q.shape == shape and s.shape == (0,)
        q, s = PER_TENSOR(x)
        assert q.shape == shape and torch.equal(s, quant._per_tensor_dynamic_reference(x)[1])
        q, s = SILU_MUL(x, x, torch.tensor([0.5], device=DEV))
        assert q.shape == shape and s.tolist() == [0.5]
    x = torch.empty(5, 0, dtype=torch.bfloat16, device=DEV)
    assert_same(PER_TOKEN(x), quant._per_token_reference(x), "h=0")
    assert_same(PER_TENSOR(x), quant._per_tensor_dynamic_reference(x), "h=0 per tensor")


def test_strided_views_take_the_right_path_and_agree():
    h = 4096
    wide = activations(9, h + 64, torch.float16, seed=4)    # row stride a multiple of 8: vector path
    odd = activations(9, h + 3, torch.float16, seed=5)      # row stride not a multiple of 8: scalar path
    views = {
        "aligned_row_stride": wide[:, :h],
        "unaligned_row_stride": odd[:, :h],
        "misaligned_offset": wide[:, 1:h + 1],
        "every_other_row": wide[::2, 8:h + 8],
        "expanded_row": wide[0:1, :h].expand(6, h),
    }
    for name, v in views.items():
        for fn, ref in ((PER_TOKEN, quant._per_token_reference),
                        (lambda t: ACT_QUANT(t, "relu", None),
                         lambda t: activation._act_quant_reference(t, "relu", None))):
            got = fn(v)
            assert_same(got, ref(v), name)
            assert_same(got, fn(v.contiguous()), name + " vs contiguous")
        gate, up = wide[:, :h], wide[:, 64:h + 64]  # a fused gate/up output's halves
        assert_close_to_reference(SILU_MUL(gate, up, None), activation._silu_mul_reference(gate, up, None), name)


def test_fused_gate_up_halves():
    gu = activations(12, 2 * 11008, torch.bfloat16, seed=6)
    got = ops.silu_mul_quant(gu)
    assert_same(got, ops.silu_mul_quant(gu[:, :11008].contiguous(), gu[:, 11008:].contiguous()), "halves")


# ----------------------------------------------------------------------------------------------
# Streams, graphs, determinism
# ----------------------------------------------------------------------------------------------
def test_runs_on_the_current_stream():
    x = torch.empty(4096, 8192, dtype=torch.float16, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.normal_()  # slow enough that a kernel on another stream would read stale data
        x.mul_(3.0)
        q, s = PER_TOKEN(x)
        qt, st = PER_TENSOR(x)
    side.synchronize()
    assert_same((q, s), quant._per_token_reference(x), "side stream per-token")
    assert_same((qt, st), quant._per_tensor_dynamic_reference(x), "side stream per-tensor")


def test_cuda_graph_capture_and_replay():
    x = activations(33, 5120, torch.float16, seed=7)
    u = activations(33, 5120, torch.float16, seed=8)
    s = torch.tensor([0.05], device=DEV)
    fns = {
        "per_token": lambda: PER_TOKEN(x),
        "per_tensor": lambda: PER_TENSOR(x),
        "static": lambda: (STATIC(x, s),),
        "gelu": lambda: ACT_QUANT(x, "gelu", None),
        "silu_mul": lambda: SILU_MUL(x, u, s),
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
        x.copy_(activations(33, 5120, torch.float16, seed=20 + round_))
        for name, fn in fns.items():
            graphs[name].replay()
            torch.cuda.synchronize()
            assert_same(outs[name], fn(), f"{name} replay {round_}")


def test_repeated_runs_are_bitwise_identical():
    x = activations(257, 14336, torch.bfloat16, seed=9)
    first = [PER_TOKEN(x), PER_TENSOR(x), ACT_QUANT(x, "gelu_tanh", None), SILU_MUL(x, x, None)]
    for _ in range(3):
        again = [PER_TOKEN(x), PER_TENSOR(x), ACT_QUANT(x, "gelu_tanh", None), SILU_MUL(x, x, None)]
        for a, b in zip(first, again):
            assert_same(a, b, "repeat")


def test_poisoning_took_effect():
    # runs after the tests above (file order); the poisoned blocks must actually have been reused
    if poison.calls < 20:
        pytest.skip("only meaningful after the rest of this module has run")
    assert poison.hits >= 0.5 * poison.calls, (poison.calls, poison.hits)


# ----------------------------------------------------------------------------------------------
# torch.library integration and bad input
# ----------------------------------------------------------------------------------------------
def test_opcheck_on_cuda():
    x = activations(5, 64, torch.float16, seed=10)
    s = torch.tensor([0.05], device=DEV)
    for op_, args in [(PER_TOKEN, (x,)), (PER_TENSOR, (x.bfloat16(),)), (STATIC, (x.float(), s)),
                      (ACT_QUANT, (x, "gelu", None)), (ACT_QUANT, (x, "relu", s)),
                      (SILU_MUL, (x, x, None)), (SILU_MUL, (x[:0], x[:0], s))]:
        torch.library.opcheck(op_, args)


def test_torch_compile_fullgraph_on_cuda():
    torch._dynamo.reset()

    def f(x):
        q, s = ops.quantize_per_token(x)
        a, b = ops.silu_mul_quant(x, x)
        return q, s, a, b

    x = activations(7, 256, torch.float16, seed=11)
    compiled = torch.compile(f, fullgraph=True)
    assert_same(compiled(x), f(x), "compiled")
    torch._dynamo.reset()


@functools.lru_cache(maxsize=None)
def _cpu_suite(name):
    """tests/<name>.py, for its bad-input table (loaded by path: tests/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_sq_kernels_cpu_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SUITES = ["test_ops_quant", "test_ops_activation"]


def _cases():
    params = []
    for suite in SUITES:
        for i, case in enumerate(_cpu_suite(suite)._CPU_BAD):
            params.append(pytest.param(suite, i, id=f"{suite[9:]}-{case[0]}"))
    return params


@functools.lru_cache(maxsize=None)
def _cuda_table(suite):
    return _cpu_suite(suite).bad_inputs(DEV, "cpu")


@pytest.mark.parametrize("suite,index", _cases())
def test_rejects_bad_input_on_cuda(suite, index):
    mod = _cpu_suite(suite)
    case_id, fn, names, op_name = _cuda_table(suite)[index]
    with pytest.raises(ValueError) as info:
        fn()
    assert mod.error_names(info.value, op_name, names), f"{case_id}: the error should name {names}: {info.value}"
    torch.cuda.synchronize()  # no asynchronous fault behind the clean error
