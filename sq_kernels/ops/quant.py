"""Activation quantization: ``sq_kernels::quantize_per_token``, ``quantize_per_tensor_dynamic`` and
``quantize_static``; the quantization step shared with the fused ops of activation.py and norm.py.

Math (symmetric int8; the CUDA kernels, csrc/kernels/common/quant_*.cu, follow the same order of
operations and this reference reproduces them bitwise)::

    amax    = max_j |y[j]|                       over a row (per-token) or the whole tensor, in fp32;
                                                 a NaN anywhere in the row makes amax NaN
    a       = max(amax, EPS)                     fp32, NaN stays NaN
    scale   = a / 127                            fp32 (IEEE division), so an all-zero row gets EPS / 127
    inv     = 127 / a                            fp32 (IEEE division: not ``reciprocal(a) * 127``)
    y_q     = sat_int8(rint(y * inv))            dynamic schemes
    y_q     = sat_int8(rint(y / scale))          static scheme (scale from calibration)

``rint`` rounds half to even; ``sat_int8`` clamps to [-128, 127] and maps NaN to 0, so a row with a
NaN gets a NaN scale and zero outputs, and no other row is affected (per-token). ``y ~= y_q * scale``.
Inputs are fp16, bf16 or fp32 ``[M, H]`` with a contiguous last dimension (any row stride).
"""
from __future__ import annotations

import math

import torch

from ._library import define, op

EPS = 1e-10  # smallest amax used to form a scale: all-zero rows quantize to 0 with a finite scale
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(msg: str):
    raise ValueError(msg)


def check_input(name: str, x, arg: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        _fail(f"{name}: {arg} must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        _fail(f"{name}: {arg} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2:
        _fail(f"{name}: {arg} must be 2-D [M, H], got shape {tuple(x.shape)}")
    if x.numel() and x.stride(1) != 1:
        _fail(f"{name}: {arg} must have a contiguous last dimension (stride(1) == 1), got strides {x.stride()}")


def require_tensors(name: str, required: tuple[str, ...] = (), **args) -> None:
    """A ValueError naming the argument, before dispatch, for a wrapper argument that is not a tensor
    (``scale=0.1``, a list as a bias; None only where optional, i.e. not in ``required``): the
    dispatcher's own error would be a RuntimeError."""
    for arg, value in args.items():
        if (value is not None or arg in required) and not isinstance(value, torch.Tensor):
            optional = "" if arg in required else " (or None)"
            hint = " (a static scale is a 1-element float32 tensor on x's device)" if arg == "scale" else ""
            _fail(f"{name}: {arg} must be a tensor{optional}, got {type(value).__name__} {value!r:.60}{hint}")


def check_optional_scale(name: str, scale, device) -> None:
    """``scale`` is None (dynamic per-token) or a 1-element float32 tensor on ``device`` (static)."""
    if scale is not None:
        check_static_scale(name, scale, device)


def check_static_scale(name: str, scale, device) -> None:
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != 1:
        _fail(f"{name}: scale must be a 1-element float32 tensor, got "
              f"{getattr(scale, 'dtype', type(scale).__name__)} {tuple(getattr(scale, 'shape', ()))}")
    if scale.device != device:
        _fail(f"{name}: scale is on {scale.device} but x is on {device}")


def sat_int8(y: torch.Tensor) -> torch.Tensor:
    """``rint`` (half to even), clamp to [-128, 127], NaN -> 0; float32 in, int8 out."""
    r = torch.clamp(torch.round(y), -128, 127)
    return torch.where(torch.isnan(r), torch.zeros_like(r), r).to(torch.int8)


def true_div(num, den) -> torch.Tensor:
    """IEEE float32 division ``num / den`` where either side may be a Python number. PyTorch turns a
    division by a Python scalar on CUDA into a multiplication by its reciprocal (two roundings), and
    ``number / tensor`` into ``reciprocal(tensor) * number`` on every device; the kernels divide once."""
    ref = num if isinstance(num, torch.Tensor) else den
    num = num if isinstance(num, torch.Tensor) else torch.full_like(ref, num)
    den = den if isinstance(den, torch.Tensor) else torch.full_like(ref, den)
    return num / den


def _quantize_rows(y: torch.Tensor, amax: torch.Tensor):
    """Dynamic quantization of fp32 ``y`` with ``amax`` ([M, 1] per-token or [1, 1] per-tensor)."""
    a = torch.clamp_min(amax.to(torch.float32), EPS)
    scale = true_div(a, 127.0)
    inv = true_div(127.0, a)
    return sat_int8(y.to(torch.float32) * inv), scale


def row_amax(y: torch.Tensor) -> torch.Tensor:
    """``max_j |y[m, j]|`` as float32 ``[M, 1]`` (0 for an empty row; NaN propagates)."""
    if y.shape[1] == 0:
        return y.new_zeros((y.shape[0], 1), dtype=torch.float32)
    return y.abs().amax(dim=1, keepdim=True).to(torch.float32)


def quantize_reference(y: torch.Tensor, scale: torch.Tensor | None):
    """The quantization step of every op: fp32 ``y [M, H]`` -> (``y_q`` int8, scale) where the scale
    is the per-token ``[M]`` (``scale=None``) or a fresh copy of the static ``[1]`` scale."""
    if scale is None:
        y_q, s = _quantize_rows(y, row_amax(y))
        return y_q, s.reshape(-1)
    return sat_int8(y.to(torch.float32) / scale.reshape(1, 1)), scale.reshape(1).clone()


def _per_token_reference(x):
    check_input("quantize_per_token", x)
    return quantize_reference(x.to(torch.float32), None)


def _per_token_fake(x):
    check_input("quantize_per_token", x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


def _per_tensor_dynamic_reference(x):
    check_input("quantize_per_tensor_dynamic", x)
    amax = x.abs().amax().to(torch.float32).reshape(1, 1) if x.numel() else \
        x.new_zeros((1, 1), dtype=torch.float32)
    x_q, scale = _quantize_rows(x, amax)
    return x_q, scale.reshape(1)


def _per_tensor_dynamic_fake(x):
    check_input("quantize_per_tensor_dynamic", x)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((1,), dtype=torch.float32)


def _static_reference(x, scale):
    check_input("quantize_static", x)
    check_static_scale("quantize_static", scale, x.device)
    return sat_int8(x.to(torch.float32) / scale.reshape(1, 1))


def _static_fake(x, scale):
    check_input("quantize_static", x)
    check_static_scale("quantize_static", scale, x.device)
    return x.new_empty(x.shape, dtype=torch.int8)


define("quantize_per_token(Tensor x) -> (Tensor, Tensor)", _per_token_reference, _per_token_fake)
define("quantize_per_tensor_dynamic(Tensor x) -> (Tensor, Tensor)",
       _per_tensor_dynamic_reference, _per_tensor_dynamic_fake)
define("quantize_static(Tensor x, Tensor scale) -> Tensor", _static_reference, _static_fake)


def as_rows(name: str, x, arg: str = "x"):
    """``x [..., H]`` as ``[M, H]`` with a unit column stride (a view when possible; a transposed
    last dimension is copied, which the ops themselves would reject)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        _fail(f"{name}: {arg} must be a tensor of shape [..., H], got {getattr(x, 'shape', type(x).__name__)}")
    if x.numel() and x.stride(-1) != 1:
        # contiguous() keeps a size-1 last dim's stride (PyTorch ignores it); clone() here does not
        x = x.clone(memory_format=torch.contiguous_format)
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() != 2 else x


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization.

    Args:
        x: fp16/bf16/fp32 ``[..., H]``.
    Returns:
        ``x_q`` int8 ``[..., H]`` and ``x_scale`` float32 ``[...]`` with ``x ~= x_q * x_scale[..., None]``.
    """
    x_q, scale = op("quantize_per_token")(as_rows("quantize_per_token", x))
    return x_q.reshape(x.shape), scale.reshape(x.shape[:-1])


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor quantization: dynamic (``scale=None``: the scale is computed from ``x``) or static.

    Args:
        x: fp16/bf16/fp32 ``[..., H]``.
        scale: optional float32 1-element static scale (from calibration).
    Returns:
        ``x_q`` int8 ``[..., H]`` and the float32 ``[1]`` scale used (a static ``scale`` is returned as a
        ``[1]`` view of the given tensor, not a copy).
    """
    require_tensors("quantize_per_tensor", scale=scale)
    x2 = as_rows("quantize_per_tensor", x)
    if scale is None:
        x_q, scale = op("quantize_per_tensor_dynamic")(x2)
    else:
        x_q = op("quantize_static")(x2, scale)
        scale = scale.reshape(1)  # a view of the caller's tensor: no copy (a kernel launch) per call
    return x_q.reshape(x.shape), scale
