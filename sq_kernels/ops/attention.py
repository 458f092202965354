"""INT8 attention BMMs: ``sq_kernels::int8_bmm``, ``sq_kernels::scaled_bmm``, and the composite
``int8_attention`` (SmoothQuant's Figure 6: both attention matmuls on INT8 tensor cores).

Math (the kernels' order of operations, mirrored exactly by the references below)::

    acc[b, m, n] = sum_k a[b, m, k] * b_op[b, n, k]        int32, exact
    y            = alpha * float32(acc)                     fp32, alpha a 1-element device tensor
    out          = y.to(float16) | y                        fp16 (round to nearest even) / fp32
    out          = saturate_int8(rint(y / out_scale))       int8 (NaN -> 0)
    int8_bmm:      out = acc                                int32

Both operands are K-contiguous (the TN layout INT8 tensor cores need):

    Q·Kᵀ   a = Q  [B·H, Sq, D],  b_op = K  [B·H, Sk, D]   -> scores [B·H, Sq, Sk]   (bmm_qk)
    P·V    a = P  [B·H, Sq, Sk], b_op = Vᵀ [B·H, D, Sk]   -> out    [B·H, Sq, D]    (bmm_pv)

so V is passed transposed (a KV cache can store it that way). Alignment: K and N multiples of 16
(head dims 64, 80, 128 qualify; a key length Sk that does not is padded by ``int8_attention``),
row and batch strides multiples of 16, 16-byte aligned data; K <= 131056 so the int32 sum cannot
overflow. The same rules hold on every device, so what runs on the CPU reference runs on the GPU.
Scales are device tensors read by the kernel: nothing here synchronises the host.
"""
from __future__ import annotations

import math

import torch

from ._library import define, op
from .gemm import int_matmul_reference

ALIGN = 16
MAX_K = 131056  # K * 128 * 128 < 2**31
MAX_N = 1 << 20
P_SCALE = 1.0 / 127.0  # softmax probabilities in [0, 1] are stored as rint(p * 127)
P_QUANT_MODES = ("static", "rowmax")
QK_OUT_DTYPES = (torch.float16, torch.float32)
PV_OUT_DTYPES = (torch.float16, torch.float32, torch.int8)
SCALED_OUT_DTYPES = PV_OUT_DTYPES


def _fail(msg: str):
    raise ValueError(msg)


def _desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_bmm_operands(name: str, a, b, a_name: str = "a", b_name: str = "b",
                       a_shape: str = "[batch, M, K]", b_shape: str = "[batch, N, K]") -> None:
    """Validate the two int8 operands of a BMM; error messages use the caller's argument names."""
    for arg, t, shape in ((a_name, a, a_shape), (b_name, b, b_shape)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int8:
            _fail(f"{name}: {arg} must be an int8 tensor {shape}, got {_desc(t)}")
        if t.dim() != 3:
            _fail(f"{name}: {arg} must be 3-D {shape}, got shape {tuple(t.shape)}")
    if a.device != b.device:
        _fail(f"{name}: {a_name} is on {a.device} and {b_name} on {b.device}; they must be on the same device")
    if a.shape[0] != b.shape[0]:
        _fail(f"{name}: {a_name} is {tuple(a.shape)} and {b_name} is {tuple(b.shape)}: the batch sizes differ")
    if a.shape[2] != b.shape[2]:
        _fail(f"{name}: {a_name} is {a_shape} = {tuple(a.shape)} and {b_name} is {b_shape} = {tuple(b.shape)}: "
              f"the reduction dimension differs")
    k, n = a.shape[2], b.shape[1]
    if k % ALIGN:
        _fail(f"{name}: the reduction dimension ({a_name}.shape[-1] = {k}) must be a multiple of {ALIGN}")
    if n % ALIGN:
        _fail(f"{name}: {b_name}.shape[1] = {n} (the output's last dimension) must be a multiple of {ALIGN}")
    if k > MAX_K:
        _fail(f"{name}: the reduction dimension {k} exceeds {MAX_K}: the int32 accumulator could overflow")
    if n > MAX_N:
        _fail(f"{name}: {b_name}.shape[1] = {n} exceeds {MAX_N}")
    for arg, t in ((a_name, a), (b_name, b)):
        if t.numel() == 0:
            continue
        if t.stride(2) != 1:
            _fail(f"{name}: {arg} must have a contiguous last dimension (stride(-1) == 1), got strides {t.stride()}"
                  " (call .contiguous())")
        if t.shape[1] > 1 and t.stride(1) % ALIGN:
            _fail(f"{name}: {arg}'s row stride {t.stride(1)} must be a multiple of {ALIGN} (call .contiguous())")
        if t.shape[1] > 1 and t.stride(1) < t.shape[2]:
            _fail(f"{name}: {arg}'s row stride {t.stride(1)} is less than its row length {t.shape[2]}: rows may not "
                  "overlap (call .contiguous())")
        if t.shape[0] > 1 and t.stride(0) % ALIGN:
            _fail(f"{name}: {arg}'s batch stride {t.stride(0)} must be a multiple of {ALIGN} (call .contiguous())")
        # Dynamo cannot trace storage_offset(); the fake implementation and the C++ entry point check it.
        if not torch.compiler.is_compiling() and t.storage_offset() % ALIGN:
            _fail(f"{name}: {arg} starts {t.storage_offset()} bytes into its storage; the kernels need 16-byte "
                  "aligned data (pass a copy: .clone())")


def check_scalar(name: str, arg: str, t, device) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name}: {arg} must be a 1-element float32 tensor on {device}, got {type(t).__name__} "
              "(a Python float would cost a host-to-device copy per call)")
    if t.dtype != torch.float32 or t.numel() != 1:
        _fail(f"{name}: {arg} must be a 1-element float32 tensor, got {_desc(t)}")
    if t.device != device:
        _fail(f"{name}: {arg} is on {t.device} but the operands are on {device}")


def check_scaled(name: str, alpha, out_dtype, out_scale, device, allowed=SCALED_OUT_DTYPES) -> None:
    check_scalar(name, "alpha", alpha, device)
    check_out(name, out_dtype, out_scale, device, allowed)


def check_out(name: str, out_dtype, out_scale, device, allowed=SCALED_OUT_DTYPES) -> None:
    if out_dtype not in allowed:
        extra = " (int32: use int8_bmm)" if out_dtype == torch.int32 else ""
        _fail(f"{name}: out_dtype must be one of {', '.join(str(d) for d in allowed)}{extra}, got {out_dtype}")
    if out_dtype == torch.int8:
        if out_scale is None:
            _fail(f"{name}: out_dtype=torch.int8 needs out_scale (a 1-element float32 tensor)")
        check_scalar(name, "out_scale", out_scale, device)
    elif out_scale is not None:
        _fail(f"{name}: out_scale is only meaningful with out_dtype=torch.int8, got out_dtype={out_dtype}")


def finish_reference(acc: torch.Tensor, alpha: torch.Tensor, out_dtype: torch.dtype,
                     out_scale: torch.Tensor | None) -> torch.Tensor:
    """The kernels' epilogue on int32 ``acc``: ``alpha * float(acc)`` then the output conversion."""
    y = alpha.reshape(()).to(torch.float32) * acc.to(torch.float32)
    if out_dtype == torch.int8:
        q = torch.round(y / out_scale.reshape(()))
        q = torch.where(torch.isnan(q), torch.zeros_like(q), q)  # cvt.rni.sat.s8.f32 maps NaN to 0
        return torch.clamp(q, -128, 127).to(torch.int8)
    return y.to(out_dtype)


def _int8_bmm_reference(a, b):
    check_bmm_operands("int8_bmm", a, b)
    return int_matmul_reference(a, b)


def _int8_bmm_fake(a, b):
    check_bmm_operands("int8_bmm", a, b)
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=torch.int32)


def _scaled_bmm_reference(a, b, alpha, out_dtype, out_scale):
    check_bmm_operands("scaled_bmm", a, b)
    check_scaled("scaled_bmm", alpha, out_dtype, out_scale, a.device)
    return finish_reference(int_matmul_reference(a, b), alpha, out_dtype, out_scale)


def _scaled_bmm_fake(a, b, alpha, out_dtype, out_scale):
    check_bmm_operands("scaled_bmm", a, b)
    check_scaled("scaled_bmm", alpha, out_dtype, out_scale, a.device)
    return a.new_empty((a.shape[0], a.shape[1], b.shape[1]), dtype=out_dtype)


define("int8_bmm(Tensor a, Tensor b) -> Tensor", _int8_bmm_reference, _int8_bmm_fake)
define("scaled_bmm(Tensor a, Tensor b, Tensor alpha, ScalarType out_dtype, Tensor? out_scale) -> Tensor",
       _scaled_bmm_reference, _scaled_bmm_fake)


def _flatten(name: str, arg: str, t, shape: str):
    """``[..., R, C]`` -> ``[batch, R, C]`` (a view when the strides allow it, else a copy)."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        _fail(f"{name}: {arg} must be a tensor of shape {shape}, got {_desc(t)}")
    return t.reshape(math.prod(t.shape[:-2]), t.shape[-2], t.shape[-1]) if t.dim() != 3 else t


def _check_lead(name: str, a_name: str, a, b_name: str, b) -> None:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape[:-2] != b.shape[:-2]:
        _fail(f"{name}: {a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} must have the same leading "
              "(batch, head) dimensions")


def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Raw INT8 batched GEMM with both operands K-major.

    Args:
        a: int8 ``[..., M, K]``.
        b: int8 ``[..., N, K]`` (same leading dimensions).
    Returns:
        int32 ``[..., M, N]`` = ``a @ b.transpose(-1, -2)``, exact.
    """
    a3 = _flatten("int8_bmm", "a", a, "[..., M, K]")
    b3 = _flatten("int8_bmm", "b", b, "[..., N, K]")
    _check_lead("int8_bmm", "a", a, "b", b)
    check_bmm_operands("int8_bmm", a3, b3, "a", "b", "[..., M, K]", "[..., N, K]")
    out = op("int8_bmm")(a3, b3)
    return out.reshape(*a.shape[:-1], b.shape[-2])


def bmm_qk(q: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Attention scores ``alpha * (q @ k^T)`` from INT8 queries and keys.

    Args:
        q: int8 ``[..., Sq, D]`` (e.g. ``[B, H, Sq, D]``), D a multiple of 16.
        k: int8 ``[..., Sk, D]``, same leading dimensions; Sk a multiple of 16.
        alpha: float32 1-element device tensor, typically ``q_scale * k_scale / sqrt(D)``.
        out_dtype: torch.float32 (for an fp32 softmax) or torch.float16.
    Returns:
        ``[..., Sq, Sk]`` scores in ``out_dtype``.
    """
    name = "bmm_qk"
    q3 = _flatten(name, "q", q, "[..., Sq, D]")
    k3 = _flatten(name, "k", k, "[..., Sk, D]")
    _check_lead(name, "q", q, "k", k)
    check_bmm_operands(name, q3, k3, "q", "k", "[..., Sq, D]", "[..., Sk, D]")
    check_scaled(name, alpha, out_dtype, None, q3.device, QK_OUT_DTYPES)
    out = op("scaled_bmm")(q3, k3, alpha, out_dtype, None)
    return out.reshape(*q.shape[:-1], k.shape[-2])


def bmm_pv(p: torch.Tensor, v_t: torch.Tensor, alpha: torch.Tensor, out_dtype: torch.dtype = torch.float16,
           out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention output ``alpha * (p @ v)`` from INT8 probabilities and a transposed INT8 V.

    Args:
        p: int8 ``[..., Sq, Sk]`` (softmax probabilities stored as ``rint(p * 127)``), Sk a multiple of 16.
        v_t: int8 ``[..., D, Sk]``: V transposed so that both operands are Sk-contiguous.
        alpha: float32 1-element device tensor, typically ``v_scale / 127``.
        out_dtype: torch.float16, torch.float32, or torch.int8 (then ``out_scale`` is required).
        out_scale: float32 1-element static output scale for int8 output: ``out = rint(y / out_scale)``.
    Returns:
        ``[..., Sq, D]`` in ``out_dtype``.
    """
    name = "bmm_pv"
    p3 = _flatten(name, "p", p, "[..., Sq, Sk]")
    v3 = _flatten(name, "v_t", v_t, "[..., D, Sk]")
    _check_lead(name, "p", p, "v_t", v_t)
    check_bmm_operands(name, p3, v3, "p", "v_t", "[..., Sq, Sk]", "[..., D, Sk]")
    check_scaled(name, alpha, out_dtype, out_scale, p3.device, PV_OUT_DTYPES)
    out = op("scaled_bmm")(p3, v3, alpha, out_dtype, out_scale)
    return out.reshape(*p.shape[:-1], v_t.shape[-2])


def _as_int8(name: str, arg: str, x, scale):
    """int8 input with its per-tensor scale, or a float input quantized per tensor (dynamic)."""
    if not isinstance(x, torch.Tensor):
        _fail(f"{name}: {arg} must be a tensor, got {type(x).__name__}")
    if x.dtype == torch.int8:
        if scale is None:
            _fail(f"{name}: {arg} is int8, so {arg}_scale (a 1-element float32 tensor) is required")
        check_scalar(name, f"{arg}_scale", scale, x.device)
        return x, scale.reshape(1)
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _fail(f"{name}: {arg} must be int8 (with {arg}_scale) or float16/bfloat16/float32, got {x.dtype}")
    if scale is not None:
        _fail(f"{name}: {arg} is {x.dtype}: leave {arg}_scale=None (it is quantized per tensor on the fly)")
    from .quant import quantize_per_tensor
    return quantize_per_tensor(x)


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its strides and alignment meet the kernel's contract, else a contiguous copy."""
    if torch.compiler.is_compiling():
        return t.contiguous()
    rows_ok = t.shape[-2] <= 1 or (t.stride(-2) % ALIGN == 0 and t.stride(-2) >= t.shape[-1])  # no overlap
    ok = t.numel() == 0 or (t.stride(-1) == 1 and rows_ok and (t.shape[0] <= 1 or t.stride(0) % ALIGN == 0)
                            and t.storage_offset() % ALIGN == 0)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor | None = None,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None, *,
                   causal: bool = False, sm_scale: float | None = None, out_dtype: torch.dtype = torch.float16,
                   out_scale: torch.Tensor | None = None, v_transposed: bool = False,
                   p_quant: str = "rowmax") -> torch.Tensor:
    """Attention with both matmuls in INT8 (SmoothQuant's Figure 6)::

        s     = bmm_qk(q, k, q_scale * k_scale * sm_scale)       fp32 scores
        s     = -inf where masked (causal, and key padding)
      p_quant="static" (the paper's and torch-int's scheme; opt-in):
        p     = softmax(s, dim=-1)                                 fp32
        p_q   = rint(p * 127)                                      int8, static scale 1/127
        out   = bmm_pv(p_q, v^T, v_scale / 127, out_dtype, out_scale)
      p_quant="rowmax" (the default: the robust one):
        e     = exp(s - max_j s)                                   fp32, the row's largest entry is 1
        p_q   = rint(e * 127)                                      int8, the largest is exactly 127
        out   = bmm_pv(p_q, v^T, v_scale, float32) / sum_j p_q     normalised by the integer row sum

    The static scale rounds every probability below 1/254 to zero, so when attention is spread over
    many keys (p ~ 1/Sk) most of the mass is lost: on random Gaussian inputs the error against FP32
    attention grows from 5% at Sk = 32 to 74% at Sk = 1000. "rowmax" gives each row the full int8
    range relative to its largest weight and normalises by the weights actually used, which stays at
    the error of quantizing q, k and v (~2%), for one more reduction over P and a division of the output.

    Args:
        q: int8 ``[..., Sq, D]`` with ``q_scale``, or fp16/bf16/fp32 (then quantized per tensor, dynamically).
        k: like ``q``, ``[..., Sk, D]`` with the same leading dimensions (expand K/V for grouped-query attention).
        v: like ``q``, ``[..., Sk, D]``; or int8 ``[..., D, Sk]`` with ``v_transposed=True`` (a transposed cache).
        q_scale, k_scale, v_scale: float32 1-element per-tensor scales of int8 inputs (``x ~= x_q * scale``).
        causal: mask key j for query i when ``j > i + Sk - Sq`` (aligned to the end: decode with Sq = 1 sees
            every key; equals PyTorch's ``is_causal`` when Sq == Sk). Needs Sq <= Sk.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        out_dtype: torch.float16, torch.float32, or torch.int8 with ``out_scale``.
        out_scale: float32 1-element static scale of an int8 output.
        p_quant: "rowmax" (default) or "static" (the paper's 1/127 scale), see above.
    Returns:
        ``[..., Sq, D]`` in ``out_dtype``.

    D must be a multiple of 16; any Sk >= 1 works (keys are zero-padded to a multiple of 16 and masked).
    """
    name = "int8_attention"
    q_q, q_s = _as_int8(name, "q", q, q_scale)
    k_q, k_s = _as_int8(name, "k", k, k_scale)
    if v_transposed and (not isinstance(v, torch.Tensor) or v.dtype != torch.int8):
        _fail(f"{name}: v_transposed=True needs an int8 v [..., D, Sk], got {_desc(v)}")
    v_q, v_s = _as_int8(name, "v", v, v_scale)
    for arg, t in (("k", k_q), ("v", v_q)):
        if t.device != q_q.device:
            _fail(f"{name}: {arg} is on {t.device} and q on {q_q.device}; q, k and v must be on the same device")
    if sm_scale is not None and (isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float))
                                 or not math.isfinite(sm_scale) or sm_scale <= 0):
        _fail(f"{name}: sm_scale must be None (1 / sqrt(D)) or a finite Python number > 0, got {sm_scale!r}")
    for arg, t in (("q", q_q), ("k", k_q), ("v", v_q)):
        if t.dim() < 2:
            _fail(f"{name}: {arg} must be at least 2-D [..., S, D], got shape {tuple(t.shape)}")
    sq, d = q_q.shape[-2], q_q.shape[-1]
    sk = k_q.shape[-2]
    v_shape = (*q_q.shape[:-2], d, sk) if v_transposed else (*q_q.shape[:-2], sk, d)
    if k_q.shape[:-2] != q_q.shape[:-2] or k_q.shape[-1] != d:
        _fail(f"{name}: k must be [..., Sk, D] = [{', '.join(map(str, q_q.shape[:-2]))}, Sk, {d}] to match q "
              f"{tuple(q_q.shape)}, got {tuple(k_q.shape)}")
    if tuple(v_q.shape) != v_shape:
        _fail(f"{name}: v must have shape {v_shape}{' (transposed)' if v_transposed else ''} to match q and k, "
              f"got {tuple(v_q.shape)}")
    if sk == 0:
        _fail(f"{name}: k has no keys (Sk = 0)")
    if causal and sq > sk:
        _fail(f"{name}: causal=True needs Sq <= Sk (got Sq = {sq}, Sk = {sk}): some queries would see no key")
    if d % ALIGN:
        _fail(f"{name}: the head dimension D = {d} must be a multiple of {ALIGN}")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(d)
    check_out(name, out_dtype, out_scale, q_q.device, PV_OUT_DTYPES)
    if p_quant not in P_QUANT_MODES:
        _fail(f"{name}: p_quant must be one of {P_QUANT_MODES}, got {p_quant!r}")

    lead = q_q.shape[:-2]
    nb = math.prod(lead)
    q3 = q_q.reshape(nb, sq, d)
    k3 = k_q.reshape(nb, sk, d)
    v_t = v_q.reshape(nb, d, sk) if v_transposed else v_q.reshape(nb, sk, d).transpose(1, 2)
    pad = -sk % ALIGN
    if pad:
        k3 = torch.nn.functional.pad(k3, (0, 0, 0, pad))
    v_t = torch.nn.functional.pad(v_t, (0, pad)) if pad else v_t

    alpha_qk = (q_s * k_s * sm_scale).to(torch.float32)
    s = op("scaled_bmm")(_kernel_ready(q3), _kernel_ready(k3), alpha_qk, torch.float32, None)
    if causal or pad:
        keys = torch.arange(sk + pad, device=s.device)
        masked = keys >= sk
        if causal:
            queries = torch.arange(sq, device=s.device).unsqueeze(1)
            masked = masked | (keys > queries + (sk - sq))
        s.masked_fill_(masked, float("-inf"))
    if p_quant == "static":
        p = torch.softmax(s, dim=-1)
        del s
        p_q = torch.round(p.mul_(127.0)).to(torch.int8)
        alpha_pv = (v_s * P_SCALE).to(torch.float32)
        out = op("scaled_bmm")(p_q, _kernel_ready(v_t), alpha_pv, out_dtype, out_scale)
        return out.reshape(*lead, sq, d)
    e = s.sub_(s.amax(dim=-1, keepdim=True)).exp_()
    p_q = torch.round(e.mul_(127.0)).to(torch.int8)
    del s, e
    row_sum = p_q.sum(dim=-1, keepdim=True, dtype=torch.int32).to(torch.float32)  # >= 127: exact in float32
    y = op("scaled_bmm")(p_q, _kernel_ready(v_t), v_s.to(torch.float32), torch.float32, None) / row_sum
    if out_dtype == torch.int8:
        out = torch.clamp(torch.round(y / out_scale.reshape(())), -128, 127).to(torch.int8)
    else:
        out = y.to(out_dtype)
    return out.reshape(*lead, sq, d)
