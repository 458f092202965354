"""Activation quantization: ``sq_kernels::quantize_per_token``, ``quantize_per_tensor_dynamic`` and
``quantize_static``.

Math (symmetric int8; the kernels follow the same order of operations)::

    amax    = max_j |x[j]|                       over a row (per-token) or the whole tensor, in fp32
    scale   = max(amax, EPS) / 127               fp32, so an all-zero row gets a finite scale
    inv     = 127 / max(amax, EPS)               fp32 (one IEEE division)
    x_q     = saturate_int8(rint(x * inv))       dynamic schemes
    x_q     = saturate_int8(rint(x / scale))     static scheme (scale from calibration)

``x ~= x_q * scale``. Inputs are fp16, bf16 or fp32 with a contiguous last dimension.
"""
from __future__ import annotations

import torch

from ._library import define, op

EPS = 1e-10  # smallest amax used to form a scale: all-zero rows quantize to 0 with a finite scale
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(msg: str):
    raise ValueError(msg)


def check_input(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        _fail(f"{name}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        _fail(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 2:
        _fail(f"{name}: x must be 2-D [M, H], got shape {tuple(x.shape)}")
    if x.numel() and x.stride(1) != 1:
        _fail(f"{name}: x must have a contiguous last dimension (stride(1) == 1), got strides {x.stride()}")


def check_static_scale(name: str, scale, device) -> None:
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() != 1:
        _fail(f"{name}: scale must be a 1-element float32 tensor, got "
              f"{getattr(scale, 'dtype', type(scale).__name__)} {tuple(getattr(scale, 'shape', ()))}")
    if scale.device != device:
        _fail(f"{name}: scale is on {scale.device} but x is on {device}")


def _quantize_rows(x: torch.Tensor, amax: torch.Tensor):
    amax = torch.clamp_min(amax.to(torch.float32), EPS)
    scale = amax / 127.0
    inv = 127.0 / amax
    x_q = torch.clamp(torch.round(x.to(torch.float32) * inv), -128, 127).to(torch.int8)
    return x_q, scale


def _per_token_reference(x):
    check_input("quantize_per_token", x)
    amax = x.abs().amax(dim=1, keepdim=True).to(torch.float32) if x.shape[1] else \
        x.new_zeros((x.shape[0], 1), dtype=torch.float32)
    x_q, scale = _quantize_rows(x, amax)
    return x_q, scale.reshape(-1)


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
    return torch.clamp(torch.round(x.to(torch.float32) / scale.reshape(1, 1)), -128, 127).to(torch.int8)


def _static_fake(x, scale):
    check_input("quantize_static", x)
    check_static_scale("quantize_static", scale, x.device)
    return x.new_empty(x.shape, dtype=torch.int8)


define("quantize_per_token(Tensor x) -> (Tensor, Tensor)", _per_token_reference, _per_token_fake)
define("quantize_per_tensor_dynamic(Tensor x) -> (Tensor, Tensor)",
       _per_tensor_dynamic_reference, _per_tensor_dynamic_fake)
define("quantize_static(Tensor x, Tensor scale) -> Tensor", _static_reference, _static_fake)


def _as_2d(name: str, x):
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        _fail(f"{name}: x must be a tensor of shape [..., H], got {getattr(x, 'shape', type(x).__name__)}")
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization.

    Args:
        x: fp16/bf16/fp32 ``[..., H]``.
    Returns:
        ``x_q`` int8 ``[..., H]`` and ``x_scale`` float32 ``[...]`` with ``x ~= x_q * x_scale[..., None]``.
    """
    x_q, scale = op("quantize_per_token")(_as_2d("quantize_per_token", x))
    return x_q.reshape(x.shape), scale.reshape(x.shape[:-1])


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor quantization: dynamic (``scale=None``: the scale is computed from ``x``) or static.

    Args:
        x: fp16/bf16/fp32 ``[..., H]``.
        scale: optional float32 1-element static scale (from calibration).
    Returns:
        ``x_q`` int8 ``[..., H]`` and the float32 ``[1]`` scale used.
    """
    x2 = _as_2d("quantize_per_tensor", x)
    if scale is None:
        x_q, scale = op("quantize_per_tensor_dynamic")(x2)
    else:
        x_q = op("quantize_static")(x2, scale)
        scale = scale.reshape(1)
    return x_q.reshape(x.shape), scale
