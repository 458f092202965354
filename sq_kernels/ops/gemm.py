"""INT8 GEMM with fused dequantization: ``sq_kernels::scaled_mm`` and ``sq_kernels::int8_mm``.

Math (the kernel's order of operations, mirrored exactly by the reference below)::

    acc[m, n] = sum_k a[m, k] * w[n, k]                       int32, exact
    t         = w_scale[n] * float(acc[m, n])                  fp32
    y         = a_scale[m] * t + bias[n]                       fp32 (the kernel uses one fma)
    y         = max(y, 0)                                      if relu
    out       = y.to(out_dtype)                                fp16 / bf16 (round to nearest even)
    out       = saturate_int8(rint(y / out_scale))             int8 (static output scale)

Each scale is either one element (per-tensor) or a vector: ``a_scale [M]`` per token,
``w_scale [N]`` per output channel. Layouts: ``a int8 [M, K]`` and ``w int8 [N, K]`` row-major
(``w`` is stored like ``nn.Linear.weight``), both K-contiguous. Alignment: K and N multiples of 16
(16-byte rows for the tensor-memory accelerator and vector loads), on every device, so a model that
runs on the CPU reference also runs on the GPU.
"""
from __future__ import annotations

import torch

from ._library import define, op

ALIGN = 16
MAX_K = 131071  # the int32 accumulator holds K * 128 * 128 only up to this K
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.int8)


def _fail(msg: str):
    raise ValueError(msg)


def check_operands(name: str, a: torch.Tensor, w: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or a.dtype != torch.int8:
        _fail(f"{name}: a must be an int8 tensor, got {getattr(a, 'dtype', type(a).__name__)}")
    if not isinstance(w, torch.Tensor) or w.dtype != torch.int8:
        _fail(f"{name}: w must be an int8 tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if a.dim() != 2:
        _fail(f"{name}: a must be 2-D [M, K], got shape {tuple(a.shape)}")
    if w.dim() != 2:
        _fail(f"{name}: w must be 2-D [N, K] (the nn.Linear layout), got shape {tuple(w.shape)}")
    if a.shape[1] != w.shape[1]:
        _fail(f"{name}: a is [M, K] = {tuple(a.shape)} and w is [N, K] = {tuple(w.shape)}: K differs")
    if a.device != w.device:
        _fail(f"{name}: a is on {a.device} and w on {w.device}; they must be on the same device")
    k, n = a.shape[1], w.shape[0]
    if k == 0:
        _fail(f"{name}: K must be positive, got K = 0")
    if k % ALIGN != 0:
        _fail(f"{name}: K = {k} must be a multiple of {ALIGN} (16-byte rows); pad the input features")
    if k > MAX_K:
        _fail(f"{name}: K = {k} is too large: the int32 accumulator can overflow beyond K = {MAX_K}")
    if n % ALIGN != 0:
        _fail(f"{name}: N = {n} must be a multiple of {ALIGN}; pad the output features")
    for arg, t in (("a", a), ("w", w)):
        if t.numel() and t.stride(1) != 1:
            _fail(f"{name}: {arg} must be row-major with contiguous K (stride(1) == 1), got strides {t.stride()}")
        if t.numel() and t.shape[0] > 1 and (t.stride(0) % ALIGN != 0 or t.stride(0) < t.shape[1]):
            _fail(f"{name}: {arg}'s row stride {t.stride(0)} must be a multiple of {ALIGN} and at least K = "
                  f"{t.shape[1]} (rows may not overlap)")
        # Dynamo cannot trace storage_offset(); the fake implementation and the C++ entry point check it.
        if t.numel() and not torch.compiler.is_compiling() and t.storage_offset() % ALIGN:
            _fail(f"{name}: {arg} starts {t.storage_offset()} bytes into its storage; the kernels need 16-byte "
                  "aligned data (call .contiguous() on a copy, e.g. .clone())")


def misaligned_vector(t) -> bool:
    """A vector whose data does not start on a 16-byte boundary: the sm80 epilogue loads ``w_scale`` and
    ``bias`` 16 bytes at a time (a view such as ``v[1:]`` would fault there). Eager only (Dynamo cannot
    trace storage_offset); a tensor of its own (offset 0, the usual case) is decided by the first test."""
    return (isinstance(t, torch.Tensor) and not torch.compiler.is_compiling() and t.storage_offset() != 0
            and t.numel() > 1 and (t.storage_offset() * t.element_size()) % ALIGN != 0)


def _check_vector(name: str, arg: str, t, length: int, what: str, device, dtypes=(torch.float32,),
                  aligned: bool = False) -> None:
    """``aligned``: read 16 bytes at a time by a kernel (``w_scale``, ``bias``), so it must start aligned."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        _fail(f"{name}: {arg} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if t.device != device:
        _fail(f"{name}: {arg} is on {t.device} but the operands are on {device}")
    if t.numel() not in (1, length) or (t.numel() == length and length != 1 and t.dim() != 1):
        _fail(f"{name}: {arg} must have 1 element or shape [{length}] ({what}), got shape {tuple(t.shape)}")
    if t.numel() > 1 and t.stride(0) != 1:
        _fail(f"{name}: {arg} must be contiguous")
    if aligned and misaligned_vector(t):
        _fail(f"{name}: {arg} starts {t.storage_offset()} elements into its storage; per-channel vectors must "
              f"start on a 16-byte boundary (pass {arg}.clone(); ops.scaled_mm does that for you)")


def check_scaled_mm(a, w, a_scale, w_scale, bias, out_dtype, out_scale, relu) -> None:
    name = "scaled_mm"
    check_operands(name, a, w)
    m, n = a.shape[0], w.shape[0]
    _check_vector(name, "a_scale", a_scale, m, "per-tensor or per-token [M]", a.device)
    _check_vector(name, "w_scale", w_scale, n, "per-tensor or per-channel [N]", a.device, aligned=True)
    if bias is not None:
        _check_vector(name, "bias", bias, n, "one per output channel", a.device, aligned=True)
        if bias.numel() != n or bias.dim() != 1:
            _fail(f"{name}: bias must have shape [{n}], got {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        _fail(f"{name}: out_dtype must be one of {OUT_DTYPES} (int32: use int8_mm), got {out_dtype}")
    if out_dtype == torch.int8:
        if out_scale is None:
            _fail(f"{name}: out_dtype=int8 needs out_scale (a 1-element float32 tensor)")
        _check_vector(name, "out_scale", out_scale, 1, "per-tensor", a.device)
    elif out_scale is not None:
        _fail(f"{name}: out_scale is only meaningful with out_dtype=torch.int8, got out_dtype={out_dtype}")


# float32 holds every integer up to 2**24 exactly, and a sum of 1024 products of int8 values reaches at
# most 1024 * 128 * 128 = 2**24: a float32 GEMM over K <= 1024 is exact in any summation order.
EXACT_FLOAT32_K = 1024


def _float32_matmul_is_strict(device: torch.device) -> bool:
    """True where a float32 matmul is computed in float32 (not TF32 or bf16, which are not exact).
    Only the CPU is trusted: on a GPU the float64 path is fast and needs no knowledge of TF32 flags."""
    if device.type != "cpu" or torch.get_float32_matmul_precision() != "highest":
        return False
    settings = [getattr(torch.backends, "fp32_precision", "none")]
    mkldnn_matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    settings.append(getattr(mkldnn_matmul, "fp32_precision", "none"))
    return all(s in ("none", "ieee") for s in settings)


def int_matmul_reference(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact ``a [..., M, K] @ w[..., N, K]^T`` in int32 on any device (2-D or batched).

    On the CPU: float32 GEMMs over slices of at most ``EXACT_FLOAT32_K`` of K (each exact, see above),
    summed in float64. With few rows (a decode step) the weight is converted ``DECODE_BLOCK_N`` rows at a
    time, so its float32 copy stays in cache instead of costing a trip through memory (6-8x faster than
    one float64 GEMM there, 2x at M = 128). Elsewhere, or when float32 matmuls may run in TF32/bf16:
    one float64 GEMM (exact while K * 128 * 128 < 2**53)."""
    if not _float32_matmul_is_strict(a.device):
        return torch.matmul(a.to(torch.float64), w.to(torch.float64).transpose(-1, -2)).to(torch.int32)
    if a.dim() == 2 and a.shape[0] <= DECODE_MAX_M and w.shape[0] > DECODE_BLOCK_N:
        a32 = a.to(torch.float32)
        return torch.cat([_exact_float32_matmul(a32, w[n0:n0 + DECODE_BLOCK_N])
                          for n0 in range(0, w.shape[0], DECODE_BLOCK_N)], dim=-1)
    return _exact_float32_matmul(a, w)


DECODE_MAX_M = 16
DECODE_BLOCK_N = 512


def _exact_float32_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    k = a.shape[-1]
    if k <= EXACT_FLOAT32_K:  # K = 0 included (int8_bmm allows it: zeros)
        return torch.matmul(a.to(torch.float32), w.to(torch.float32).transpose(-1, -2)).to(torch.int32)
    acc = None
    for k0 in range(0, k, EXACT_FLOAT32_K):
        part = torch.matmul(a[..., k0:k0 + EXACT_FLOAT32_K].to(torch.float32),
                            w[..., k0:k0 + EXACT_FLOAT32_K].to(torch.float32).transpose(-1, -2))
        acc = part.to(torch.float64) if acc is None else acc.add_(part)
    return acc.to(torch.int32)


def _scaled_mm_reference(a, w, a_scale, w_scale, bias, out_dtype, out_scale, relu):
    check_scaled_mm(a, w, a_scale, w_scale, bias, out_dtype, out_scale, relu)
    acc = int_matmul_reference(a, w).to(torch.float32)
    t = w_scale.reshape(1, -1).to(torch.float32) * acc
    y = a_scale.reshape(-1, 1).to(torch.float32) * t
    if bias is not None:
        y = y + bias.to(torch.float32).reshape(1, -1)
    if relu:
        y = torch.clamp_min(y, 0.0)
    if out_dtype == torch.int8:
        return torch.clamp(torch.round(y / out_scale.reshape(1, 1)), -128, 127).to(torch.int8)
    return y.to(out_dtype)


def _scaled_mm_fake(a, w, a_scale, w_scale, bias, out_dtype, out_scale, relu):
    check_scaled_mm(a, w, a_scale, w_scale, bias, out_dtype, out_scale, relu)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)


def _int8_mm_reference(a, w):
    check_operands("int8_mm", a, w)
    return int_matmul_reference(a, w)


def _int8_mm_fake(a, w):
    check_operands("int8_mm", a, w)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=torch.int32)


define("scaled_mm(Tensor a, Tensor w, Tensor a_scale, Tensor w_scale, Tensor? bias, ScalarType out_dtype, "
       "Tensor? out_scale, bool relu) -> Tensor", _scaled_mm_reference, _scaled_mm_fake)
define("int8_mm(Tensor a, Tensor w) -> Tensor", _int8_mm_reference, _int8_mm_fake)


def _check_wrapper_input(name: str, a_q) -> None:
    if not isinstance(a_q, torch.Tensor) or a_q.dim() < 1:
        _fail(f"{name}: a_q must be a tensor of shape [..., K], got {getattr(a_q, 'shape', type(a_q).__name__)}")
    if a_q.shape[-1] == 0:
        _fail(f"{name}: K must be positive, got a_q of shape {tuple(a_q.shape)}")


def scaled_mm(a_q: torch.Tensor, w_q: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
              out_scale: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """INT8 GEMM with the dequantization fused into its epilogue.

    Args:
        a_q: int8 ``[..., K]`` activations (K-contiguous).
        w_q: int8 ``[N, K]`` weight, the ``nn.Linear`` layout.
        a_scale: float32, 1 element (per-tensor) or ``[...]`` matching ``a_q.shape[:-1]`` (per-token).
        w_scale: float32, 1 element (per-tensor) or ``[N]`` (per-channel).
        bias: optional ``[N]``; fp16/bf16 biases are converted to float32 (store it as float32 to skip that).
        out_dtype: torch.float16, torch.bfloat16, or torch.int8 (then ``out_scale`` is required).
        out_scale: float32 1-element static output scale for int8 output: ``out = rint(y / out_scale)``.
        relu: fuse ``max(y, 0)`` (OPT's fc1).

    Returns:
        ``[..., N]`` in ``out_dtype``: ``a_scale * w_scale * (a_q @ w_q.T) (+ bias)``.
    """
    _check_wrapper_input("scaled_mm", a_q)
    for arg, t in (("a_scale", a_scale), ("w_scale", w_scale)):
        if not isinstance(t, torch.Tensor):
            _fail(f"scaled_mm: {arg} must be a float32 tensor, got {type(t).__name__}")
    lead = a_q.shape[:-1]
    a2 = a_q.reshape(-1, a_q.shape[-1])
    if isinstance(a_scale, torch.Tensor) and a_scale.numel() != 1:
        if tuple(a_scale.shape) != tuple(lead) and a_scale.numel() == a2.shape[0]:
            _fail(f"scaled_mm: per-token a_scale must have shape {tuple(lead)} (a_q.shape[:-1]), "
                  f"got {tuple(a_scale.shape)}")
        a_scale = a_scale.reshape(-1)
    if bias is not None and isinstance(bias, torch.Tensor) and bias.dtype in (torch.float16, torch.bfloat16):
        bias = bias.float()
    # views that start mid-vector (w_scale[1:], a slice of a packed buffer) get an aligned copy of N floats
    w_scale = w_scale.clone() if misaligned_vector(w_scale) else w_scale
    bias = bias.clone() if misaligned_vector(bias) else bias
    out = op("scaled_mm")(a2, w_q, a_scale, w_scale, bias, out_dtype, out_scale, bool(relu))
    return out.reshape(*lead, w_q.shape[0])


def int8_mm(a_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Raw INT8 GEMM: int8 ``[..., K]`` x int8 ``[N, K]`` -> int32 ``[..., N]`` (exact, no scales)."""
    _check_wrapper_input("int8_mm", a_q)
    lead = a_q.shape[:-1]
    out = op("int8_mm")(a_q.reshape(-1, a_q.shape[-1]), w_q)
    return out.reshape(*lead, w_q.shape[0])
