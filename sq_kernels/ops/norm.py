"""Fused (residual add +) RMSNorm / LayerNorm + int8 quantization: ``sq_kernels::rms_norm_quant``,
``add_rms_norm_quant``, ``layer_norm_quant`` and ``add_layer_norm_quant``.

These produce the int8 input of the linears that a norm feeds (q/k/v, fc1, gate/up) in one pass
over memory. Math (fp32, each operation a separate IEEE rounding, as in the kernels of
csrc/kernels/common/norm_quant*.cu)::

    h     = float(x)                                   or, with a residual:
    s     = to_dtype(float(x) + float(residual))       the new residual, returned as a fresh tensor
    h     = float(s)                                   (normalised as rounded, like the unfused model)
    rms:    rstd = 1 / sqrt(sum_j(h * h) / H + eps)    y = (h * rstd) * float(weight)
    layer:  mean = sum_j(h) / H;  d = h - mean
            rstd = 1 / sqrt(sum_j(d * d) / H + eps)    y = (d * rstd) * float(weight) + float(bias)

then the quantization of quant.py: per-token dynamic (``scale=None``: ``x_scale [M]``) or static
(``x_scale`` is a copy of ``scale``, ``[1]``). The kernels sum the row in a different order than
this reference (per-thread partial sums, then a block reduction), so ``rstd`` may differ in the
last bit or two; everything after it is reproduced exactly.

Unlike HF's ``LlamaRMSNorm`` the normalised value is not rounded to fp16/bf16 before the weight is
applied, and ``y`` is quantized without being rounded to the input dtype: the fused op is slightly
more accurate than the unfused sequence, by much less than one int8 step.

The residual sum is returned (``residual_out``), never written into an input: the schemas are
functional, so ``torch.compile`` and ``opcheck`` need no mutation handling.
"""
from __future__ import annotations

import math

import torch

from ._library import define, op
from .quant import as_rows, check_input, check_optional_scale, quantize_reference, require_tensors, true_div


def _fail(msg: str):
    raise ValueError(msg)


def _check_vector(name: str, arg: str, t, x) -> None:
    h = x.shape[1]
    if not isinstance(t, torch.Tensor):
        _fail(f"{name}: {arg} must be a tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        _fail(f"{name}: {arg} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != h:
        _fail(f"{name}: {arg} must have shape [{h}] (H), got {tuple(t.shape)}")
    if t.device != x.device:
        _fail(f"{name}: {arg} is on {t.device} but x is on {x.device}")
    if h > 1 and t.stride(0) != 1:
        _fail(f"{name}: {arg} must be contiguous, got stride {t.stride(0)}")


def check_norm(name: str, x, residual, weight, bias, eps, scale) -> None:
    check_input(name, x)
    if x.shape[1] < 1:
        _fail(f"{name}: x must have at least one column (H >= 1), got shape {tuple(x.shape)}")
    if residual is not None:
        check_input(name, residual, "residual")
        if residual.shape != x.shape:
            _fail(f"{name}: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            _fail(f"{name}: residual must have the dtype of x ({x.dtype}), got {residual.dtype}")
        if residual.device != x.device:
            _fail(f"{name}: residual is on {residual.device} but x is on {x.device}")
    _check_vector(name, "weight", weight, x)
    if bias is not None:
        _check_vector(name, "bias", bias, x)
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        _fail(f"{name}: eps must be a finite number > 0, got {eps!r}")
    _check_eps_float32(name, eps)
    check_optional_scale(name, scale, x.device)


FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38


def _check_eps_float32(name: str, eps: float) -> None:
    """The kernels add eps in float32: a value that would round to 0 (NaN scales on an all-zero row) or
    overflow to inf (an all-zero output) is refused."""
    if math.isfinite(eps) and eps > 0 and not FLOAT32_TINY <= eps <= FLOAT32_MAX:
        _fail(f"{name}: eps = {eps!r} is not a normal float32 number (the kernels compute in float32): it must "
              f"lie in [{FLOAT32_TINY:.3g}, {FLOAT32_MAX:.3g}]")


def norm_reference_fp32(x, residual, weight, bias, eps, layer: bool):
    """(``y`` float32 ``[M, H]``, the residual sum in x's dtype or None) with the kernels' order of operations."""
    if residual is not None:
        s = (x.to(torch.float32) + residual.to(torch.float32)).to(x.dtype)
        h = s.to(torch.float32)
    else:
        s, h = None, x.to(torch.float32)
    n = h.shape[1]
    d = h - true_div(h.sum(dim=1, keepdim=True), n) if layer else h
    var_eps = true_div((d * d).sum(dim=1, keepdim=True), n) + eps
    # sqrt through float64 is the correctly rounded float32 sqrt (the kernel's __fsqrt_rn); PyTorch's
    # vectorised float32 sqrt on the CPU is not always
    rstd = torch.reciprocal(torch.sqrt(var_eps.double()).to(torch.float32))
    y = (d * rstd) * weight.to(torch.float32)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y, s


def _outputs_fake(x, scale, with_residual: bool):
    outs = (x.new_empty(x.shape, dtype=torch.int8),
            x.new_empty((x.shape[0],) if scale is None else (1,), dtype=torch.float32))
    return outs + (x.new_empty(x.shape),) if with_residual else outs


def _rms_reference(x, weight, eps, scale):
    check_norm("rms_norm_quant", x, None, weight, None, eps, scale)
    y, _ = norm_reference_fp32(x, None, weight, None, eps, layer=False)
    return quantize_reference(y, scale)


def _rms_fake(x, weight, eps, scale):
    check_norm("rms_norm_quant", x, None, weight, None, eps, scale)
    return _outputs_fake(x, scale, False)


def _add_rms_reference(x, residual, weight, eps, scale):
    check_norm("add_rms_norm_quant", x, residual, weight, None, eps, scale)
    y, s = norm_reference_fp32(x, residual, weight, None, eps, layer=False)
    return quantize_reference(y, scale) + (s,)


def _add_rms_fake(x, residual, weight, eps, scale):
    check_norm("add_rms_norm_quant", x, residual, weight, None, eps, scale)
    return _outputs_fake(x, scale, True)


def _layer_reference(x, weight, bias, eps, scale):
    check_norm("layer_norm_quant", x, None, weight, bias, eps, scale)
    y, _ = norm_reference_fp32(x, None, weight, bias, eps, layer=True)
    return quantize_reference(y, scale)


def _layer_fake(x, weight, bias, eps, scale):
    check_norm("layer_norm_quant", x, None, weight, bias, eps, scale)
    return _outputs_fake(x, scale, False)


def _add_layer_reference(x, residual, weight, bias, eps, scale):
    check_norm("add_layer_norm_quant", x, residual, weight, bias, eps, scale)
    y, s = norm_reference_fp32(x, residual, weight, bias, eps, layer=True)
    return quantize_reference(y, scale) + (s,)


def _add_layer_fake(x, residual, weight, bias, eps, scale):
    check_norm("add_layer_norm_quant", x, residual, weight, bias, eps, scale)
    return _outputs_fake(x, scale, True)


define("rms_norm_quant(Tensor x, Tensor weight, float eps, Tensor? scale) -> (Tensor, Tensor)",
       _rms_reference, _rms_fake)
define("add_rms_norm_quant(Tensor x, Tensor residual, Tensor weight, float eps, Tensor? scale) "
       "-> (Tensor, Tensor, Tensor)", _add_rms_reference, _add_rms_fake)
define("layer_norm_quant(Tensor x, Tensor weight, Tensor? bias, float eps, Tensor? scale) -> (Tensor, Tensor)",
       _layer_reference, _layer_fake)
define("add_layer_norm_quant(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps, Tensor? scale) "
       "-> (Tensor, Tensor, Tensor)", _add_layer_reference, _add_layer_fake)


def _eps(name: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        _fail(f"{name}: eps must be a number, got {type(eps).__name__}")
    _check_eps_float32(name, float(eps))  # before dispatch, so the CUDA path refuses it too
    return float(eps)


def _run(name: str, x, residual, args_after_residual, scale):
    x2 = as_rows(name, x)
    if residual is None:
        outs = op(name)(x2, *args_after_residual, scale)
    else:
        if not isinstance(residual, torch.Tensor) or residual.shape != x.shape:
            _fail(f"{name}: residual must be a tensor of x's shape {tuple(x.shape)}, got "
                  f"{tuple(getattr(residual, 'shape', ())) or type(residual).__name__}")
        outs = op("add_" + name)(x2, as_rows(name, residual, "residual"), *args_after_residual, scale)
    x_q = outs[0].reshape(x.shape)
    x_scale = outs[1].reshape(x.shape[:-1]) if scale is None else outs[1]
    return (x_q, x_scale) if residual is None else (x_q, x_scale, outs[2].reshape(x.shape))


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None):
    """RMSNorm (Llama's) fused with int8 quantization, optionally after a residual add.

    Args:
        x: fp16/bf16/fp32 ``[..., H]``.
        weight: ``[H]``, x's dtype.
        eps: the norm's epsilon (> 0).
        residual: optional ``[..., H]`` (x's dtype): the input is ``x + residual``, returned as the new residual.
        scale: None for dynamic per-token scales, or a float32 1-element static scale.
    Returns:
        ``(x_q, x_scale)`` or, with a residual, ``(x_q, x_scale, residual_out)``: ``x_q`` int8 ``[..., H]``,
        ``x_scale`` float32 ``[...]`` per token or ``[1]`` (static), ``residual_out`` ``[..., H]`` = x + residual.
    """
    require_tensors("rms_norm_quant", ("weight",), weight=weight, residual=residual, scale=scale)
    return _run("rms_norm_quant", x, residual, (weight, _eps("rms_norm_quant", eps)), scale)


def layer_norm_quant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5,
                     residual: torch.Tensor | None = None, scale: torch.Tensor | None = None):
    """LayerNorm (OPT's, BLOOM's) fused with int8 quantization, optionally after a residual add.

    Args:
        x: fp16/bf16/fp32 ``[..., H]``.
        weight: ``[H]``, x's dtype.
        bias: optional ``[H]``, x's dtype.
        eps: the norm's epsilon (> 0).
        residual: optional ``[..., H]`` (x's dtype): the input is ``x + residual``, returned as the new residual.
        scale: None for dynamic per-token scales, or a float32 1-element static scale.
    Returns:
        ``(x_q, x_scale)`` or, with a residual, ``(x_q, x_scale, residual_out)``, as for :func:`rms_norm_quant`.
    """
    require_tensors("layer_norm_quant", ("weight",), weight=weight, bias=bias, residual=residual, scale=scale)
    return _run("layer_norm_quant", x, residual, (weight, bias, _eps("layer_norm_quant", eps)), scale)
