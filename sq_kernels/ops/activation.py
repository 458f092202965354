"""Activation fused with int8 quantization, for the linears that no norm precedes:
``sq_kernels::act_quant`` (ReLU: OPT fc1 -> fc2; GELU: BLOOM / Falcon dense_h_to_4h -> dense_4h_to_h)
and ``sq_kernels::silu_mul_quant`` (Llama / Mistral: ``silu(gate) * up`` -> down_proj).

Math (fp32, every operation a separate IEEE rounding, as in the kernels of
csrc/kernels/common/quant_act*.cu; the constants are float32)::

    relu       y = 0 if x < 0 else x                          (NaN stays NaN)
    gelu       y = (x * 0.5) * (1 + erf(x * 0.70710678))
    gelu_tanh  y = (x * 0.5) * (1 + tanh((0.7978845608 * x) * (1 + (0.044715 * x) * x)))
    silu_mul   y = (g / (1 + exp(-g))) * u

then the quantization of quant.py: per-token dynamic (``scale=None``: ``x_scale [M]``) or static
(``scale`` given: ``x_scale`` is a copy of it, ``[1]``). The transcendental functions (erf, tanh,
exp) of the CUDA math library and of PyTorch's CPU kernels may differ in the last bit, so on the GPU
an int8 value can differ from this reference by 1 where ``y * inv`` lies on a rounding boundary.
The activation is computed in fp32 and quantized directly; the unfused model would round it to
fp16/bf16 first, which moves it by at most half an fp16 ulp, far below the int8 step.
"""
from __future__ import annotations

import torch

from ._library import define, op
from .quant import as_rows, check_input, check_optional_scale, quantize_reference, require_tensors

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


def _fail(msg: str):
    raise ValueError(msg)


def activation_reference(act: str, x: torch.Tensor) -> torch.Tensor:
    """``act(x)`` in float32 with the kernel's order of operations."""
    y = x.to(torch.float32)
    if act == "relu":
        return torch.where(y < 0, torch.zeros_like(y), y)
    if act == "gelu":
        return (y * 0.5) * (1.0 + torch.erf(y * 0.70710678118654752))
    if act == "gelu_tanh":
        inner = (0.7978845608028654 * y) * (1.0 + (0.044715 * y) * y)
        return (y * 0.5) * (1.0 + torch.tanh(inner))
    _fail(f"act_quant: act must be one of {ACTIVATIONS}, got {act!r}")


def silu_mul_reference_fp32(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g = gate.to(torch.float32)
    return (g / (1.0 + torch.exp(-g))) * up.to(torch.float32)


def _check_act_quant(x, act, scale) -> None:
    name = "act_quant"
    check_input(name, x)
    if act not in ACTIVATIONS:
        _fail(f"{name}: act must be one of {ACTIVATIONS}, got {act!r}")
    check_optional_scale(name, scale, x.device)


def _check_silu_mul(gate, up, scale) -> None:
    name = "silu_mul_quant"
    check_input(name, gate, "gate")
    check_input(name, up, "up")
    if up.dtype != gate.dtype:
        _fail(f"{name}: up is {up.dtype} but gate is {gate.dtype}; they must match")
    if up.shape != gate.shape:
        _fail(f"{name}: up has shape {tuple(up.shape)} but gate has {tuple(gate.shape)}; they must match")
    if up.device != gate.device:
        _fail(f"{name}: up is on {up.device} but gate is on {gate.device}")
    check_optional_scale(name, scale, gate.device)


def _fake_outputs(x, scale):
    scale_shape = (x.shape[0],) if scale is None else (1,)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(scale_shape, dtype=torch.float32)


def _act_quant_reference(x, act, scale):
    _check_act_quant(x, act, scale)
    return quantize_reference(activation_reference(act, x), scale)


def _act_quant_fake(x, act, scale):
    _check_act_quant(x, act, scale)
    return _fake_outputs(x, scale)


def _silu_mul_reference(gate, up, scale):
    _check_silu_mul(gate, up, scale)
    return quantize_reference(silu_mul_reference_fp32(gate, up), scale)


def _silu_mul_fake(gate, up, scale):
    _check_silu_mul(gate, up, scale)
    return _fake_outputs(gate, scale)


define("act_quant(Tensor x, str act, Tensor? scale) -> (Tensor, Tensor)", _act_quant_reference, _act_quant_fake)
define("silu_mul_quant(Tensor gate, Tensor up, Tensor? scale) -> (Tensor, Tensor)",
       _silu_mul_reference, _silu_mul_fake)


def _reshape_out(x_q, x_scale, shape, scale):
    return x_q.reshape(shape), (x_scale.reshape(shape[:-1]) if scale is None else x_scale)


def relu_quant(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``relu(x)`` quantized to int8 in one pass.

    Args:
        x: fp16/bf16/fp32 ``[..., H]``.
        scale: None for dynamic per-token scales, or a float32 1-element static scale.
    Returns:
        ``x_q`` int8 ``[..., H]`` and ``x_scale`` float32: ``[...]`` per token, or ``[1]`` (static).
    """
    require_tensors("relu_quant", scale=scale)
    x2 = as_rows("relu_quant", x)
    return _reshape_out(*op("act_quant")(x2, "relu", scale), x.shape, scale)


def gelu_quant(x: torch.Tensor, approximate: str = "none",
               scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``gelu(x)`` quantized to int8 in one pass.

    Args:
        x: fp16/bf16/fp32 ``[..., H]``.
        approximate: ``"none"`` (erf, ``nn.GELU()``) or ``"tanh"`` (``nn.GELU("tanh")``, BLOOM's gelu).
        scale: None for dynamic per-token scales, or a float32 1-element static scale.
    Returns:
        ``x_q`` int8 ``[..., H]`` and ``x_scale`` float32: ``[...]`` per token, or ``[1]`` (static).
    """
    if approximate not in ("none", "tanh"):
        _fail(f"gelu_quant: approximate must be 'none' or 'tanh', got {approximate!r}")
    require_tensors("gelu_quant", scale=scale)
    x2 = as_rows("gelu_quant", x)
    act = "gelu" if approximate == "none" else "gelu_tanh"
    return _reshape_out(*op("act_quant")(x2, act, scale), x.shape, scale)


def silu_mul_quant(gate: torch.Tensor, up: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(gate) * up`` (Llama's MLP activation) quantized to int8 in one pass.

    Args:
        gate: fp16/bf16/fp32 ``[..., I]``; or, with ``up=None``, the fused gate/up projection output
            ``[..., 2 * I]`` whose first half is the gate and second half is up (no copy is made).
        up: fp16/bf16/fp32 ``[..., I]`` (same dtype as ``gate``), or None.
        scale: None for dynamic per-token scales, or a float32 1-element static scale.
    Returns:
        ``x_q`` int8 ``[..., I]`` and ``x_scale`` float32: ``[...]`` per token, or ``[1]`` (static).
    """
    require_tensors("silu_mul_quant", up=up, scale=scale)
    if up is None:
        if not isinstance(gate, torch.Tensor) or gate.dim() < 1 or gate.shape[-1] % 2:
            _fail("silu_mul_quant: with up=None, gate must be [..., 2 * I] (gate and up concatenated), got "
                  f"{tuple(getattr(gate, 'shape', ()))}")
        gate, up = gate.chunk(2, dim=-1)
    g2 = as_rows("silu_mul_quant", gate, "gate")
    u2 = as_rows("silu_mul_quant", up, "up")
    if isinstance(up, torch.Tensor) and up.shape != gate.shape:
        _fail(f"silu_mul_quant: up has shape {tuple(up.shape)} but gate has {tuple(gate.shape)}; they must match")
    return _reshape_out(*op("silu_mul_quant")(g2, u2, scale), gate.shape, scale)
