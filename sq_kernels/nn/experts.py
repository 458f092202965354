"""``W8A8Experts``: INT8 version of transformers' fused MoE experts (v5 layout, e.g. ``MixtralExperts``).

Layout: ``gate_up_proj`` int8 ``[E, 2I, H]`` (gate rows then up rows, per expert ``[N, K]`` like
``nn.Linear``), ``down_proj`` int8 ``[E, H, I]``, float32 scales ``gate_up_proj_scale [E, 2I]`` /
``down_proj_scale [E, H]`` (per-channel) or ``[E, 1]`` (per-tensor: one per expert matrix); for the
static scheme ``gate_up_input_scale [1]`` (the shared MoE input) and ``down_input_scale [E]``.

Forward mirrors transformers' eager experts: the MoE input is quantized once (per-token scales
gather with the rows), each hit expert runs ``act(gate) * up`` and ``down`` as INT8 GEMMs with fused
dequantization, and the outputs are weighted by the router and summed. As in transformers' eager
code, choosing which experts to run reads the routing on the host (MoE dispatch is data-dependent).
H and I must be multiples of 16.
"""
from __future__ import annotations

import numbers
import warnings

import torch
from torch import nn

from ..config import ACTIVATION_SCHEMES, WEIGHT_GRANULARITIES
from ..ops._library import no_backward_through
from ._quant import (ALIGN, KeepBufferDtypes, check_input, int8_linear, quantize_activation, quantize_weight,
                     static_scale)


def fused_experts_problem(module) -> str | None:
    """Why ``module`` is not a fused experts module W8A8Experts can replace (None when it is)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3
            and down.dim() == 3):
        return "not a fused experts module (needs 3-D gate_up_proj and down_proj tensors)"
    if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True):
        return "transposed or interleaved expert weights are not supported"
    if getattr(module, "has_bias", False) or getattr(module, "gate_up_proj_bias", None) is not None:
        return "expert biases are not supported"
    e, two_i, h = gate_up.shape
    if down.shape != (e, h, two_i // 2) or two_i % 2:
        return f"unexpected expert shapes gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)}"
    bad = [f"{n}={v}" for n, v in (("hidden", h), ("intermediate", two_i // 2)) if v % ALIGN]
    if bad:
        return f"{' and '.join(bad)} not a multiple of {ALIGN} (the INT8 kernels' alignment)"
    return None


def route(top_k_index: torch.Tensor, num_experts: int):
    """Yield ``(expert, top_k_pos, token_idx)`` for each expert that receives tokens (host-side, as eager)."""
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit.flatten().tolist():
        if e == num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[e])
        yield e, top_k_pos, token_idx


def experts_forward_float(module, hidden_states, top_k_index, top_k_weights, observe=None):
    """transformers' eager fused-experts forward, in floating point, calling ``observe(e, h)`` with each
    expert's ``down_proj`` input (calibration)."""
    final = torch.zeros_like(hidden_states)
    for e, top_k_pos, token_idx in route(top_k_index, module.gate_up_proj.shape[0]):
        gate, up = nn.functional.linear(hidden_states[token_idx], module.gate_up_proj[e]).chunk(2, dim=-1)
        h = module.act_fn(gate) * up
        if observe is not None:
            observe(e, h)
        out = nn.functional.linear(h, module.down_proj[e]) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def _static_amaxes(input_amax, down_input_amax, num_experts: int, name: str):
    """The static scheme's calibrated maxima, checked: ``input_amax`` one number (the MoE input), and
    ``down_input_amax`` one per expert. An expert no calibration token was routed to has a maximum of 0; its
    scale would crush every token routed to it later to ~0 output: it takes the largest other expert's, with
    a warning."""
    amax = torch.as_tensor(input_amax, dtype=torch.float32).detach()
    if amax.numel() != 1:
        raise ValueError(f"{name}: input_amax must be a number or a 1-element tensor (the MoE input's |x| maximum, "
                         f"shared by all experts), got {amax.numel()} elements")
    down = torch.as_tensor(down_input_amax, dtype=torch.float32).detach().reshape(-1)
    if down.numel() != num_experts:
        raise ValueError(f"{name}: down_input_amax must have {num_experts} elements (one per expert), got "
                         f"{down.numel()}")
    unseen = (down == 0).nonzero().flatten().tolist()
    if unseen and torch.isfinite(down).all():
        if len(unseen) == num_experts:
            raise ValueError(f"{name}: down_input_amax is 0 for every expert: no calibration token reached any "
                             f"expert (the calibration did not run through this MoE block)")
        fallback = down.max()
        warnings.warn(f"{name}: expert{'s' if len(unseen) > 1 else ''} {unseen} got no calibration tokens "
                      f"(down_input_amax 0); a static scale from 0 would crush every token later routed there to "
                      f"~0 output, so {'they take' if len(unseen) > 1 else 'it takes'} the largest other expert's "
                      f"maximum ({float(fallback):.4g}). "
                      f"Calibrate on more text to measure them, or use a dynamic activation scheme",
                      UserWarning, stacklevel=3)
        down = torch.where(down == 0, fallback, down)
    return amax, down


class W8A8Experts(KeepBufferDtypes, nn.Module):
    """INT8 fused MoE experts (see the module docstring for the layout)."""
    FLOAT32_BUFFERS = ("gate_up_proj_scale", "down_proj_scale", "gate_up_input_scale", "down_input_scale")
    INT8_BUFFERS = ("gate_up_proj", "down_proj")

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module,
                 weight: str = "per_channel", activation: str = "per_token", device=None):
        super().__init__()
        if weight not in WEIGHT_GRANULARITIES:
            raise ValueError(f"W8A8Experts: weight must be one of {WEIGHT_GRANULARITIES}, got {weight!r}")
        if activation not in ACTIVATION_SCHEMES:
            raise ValueError(f"W8A8Experts: activation must be one of {ACTIVATION_SCHEMES}, got {activation!r}")
        for n, v in (("num_experts", num_experts), ("hidden_dim", hidden_dim), ("intermediate_dim", intermediate_dim)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"W8A8Experts: {n} must be a positive integer, got {v!r}")
        for n, v in (("hidden_dim", hidden_dim), ("intermediate_dim", intermediate_dim)):
            if v % ALIGN:
                raise ValueError(f"W8A8Experts: {n}={v} is not a multiple of {ALIGN}")
        e, h, i = int(num_experts), int(hidden_dim), int(intermediate_dim)
        self.num_experts, self.hidden_dim, self.intermediate_dim = e, h, i
        self.weight_granularity, self.activation = weight, activation
        self.act_fn = act_fn
        per_channel = weight == "per_channel"
        self.register_buffer("gate_up_proj", torch.zeros(e, 2 * i, h, dtype=torch.int8, device=device))
        self.register_buffer("gate_up_proj_scale", torch.ones(e, 2 * i if per_channel else 1, device=device))
        self.register_buffer("down_proj", torch.zeros(e, h, i, dtype=torch.int8, device=device))
        self.register_buffer("down_proj_scale", torch.ones(e, h if per_channel else 1, device=device))
        static = activation == "static"
        self.register_buffer("gate_up_input_scale", torch.ones(1, device=device) if static else None)
        self.register_buffer("down_input_scale", torch.ones(e, device=device) if static else None)

    @classmethod
    def from_experts(cls, experts: nn.Module, weight: str = "per_channel", activation: str = "per_token",
                     input_amax=None, down_input_amax=None, name: str = "experts") -> "W8A8Experts":
        """Quantize a fused experts module (left unchanged; the new module takes its training mode). Static
        activations need ``input_amax`` (scalar, the MoE input) and ``down_input_amax [E]`` (each expert's
        ``down_proj`` input)."""
        problem = fused_experts_problem(experts)
        if problem:
            raise ValueError(f"{name}: {problem}")
        e, two_i, h = experts.gate_up_proj.shape
        if activation == "static" and (input_amax is None or down_input_amax is None):
            raise ValueError(f"{name}: activation='static' needs input_amax and down_input_amax from calibration")
        if activation != "static" and (input_amax is not None or down_input_amax is not None):
            raise ValueError(f"{name}: input_amax / down_input_amax set static scales, and activation={activation!r} "
                             f"computes its scales from each input: pass them only with activation='static'")
        if activation == "static":
            input_amax, down_input_amax = _static_amaxes(input_amax, down_input_amax, e, name)
        module = cls(e, h, two_i // 2, experts.act_fn, weight, activation, device=experts.gate_up_proj.device)
        module.train(experts.training)
        for attr in ("gate_up_proj", "down_proj"):
            w_q, w_scale = quantize_weight(getattr(experts, attr), weight, f"{name}.{attr}")
            getattr(module, attr).copy_(w_q)
            getattr(module, attr + "_scale").copy_(w_scale)
        if activation == "static":
            scale = static_scale(input_amax, f"{name} input_amax")
            module.gate_up_input_scale.copy_(scale.to(module.gate_up_input_scale.device))
            down = static_scale(down_input_amax, f"{name} down_input_amax")
            module.down_input_scale.copy_(down.to(module.down_input_scale.device))
        return module

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        check_input("W8A8Experts", hidden_states, self.hidden_dim)
        dtype = hidden_states.dtype
        final = torch.zeros_like(hidden_states)
        x_q, x_scale = quantize_activation(hidden_states, self.activation, self.gate_up_input_scale)
        per_token = self.activation == "per_token"
        for e, top_k_pos, token_idx in route(top_k_index, self.num_experts):
            a_scale = x_scale[token_idx] if per_token else x_scale
            gate_up = int8_linear(x_q[token_idx], a_scale, self.gate_up_proj[e], self.gate_up_proj_scale[e], None,
                                  dtype)
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
            down_scale = self.down_input_scale[e:e + 1] if self.down_input_scale is not None else None
            h_q, h_scale = quantize_activation(h, self.activation, down_scale)
            out = int8_linear(h_q, h_scale, self.down_proj[e], self.down_proj_scale[e], None, dtype)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return no_backward_through(final, hidden_states, "W8A8Experts")

    def scheme(self) -> str:
        act = "static per-tensor" if self.activation == "static" else f"dynamic {self.activation}"
        return f"w8 {self.weight_granularity} / a8 {act}".replace("_", "-")

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, {self.scheme()}")
