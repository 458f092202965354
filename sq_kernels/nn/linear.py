"""``W8A8Linear``: a drop-in for ``nn.Linear`` with INT8 weights and INT8 activations.

Buffers (the checkpoint layout): ``weight`` int8 ``[N, K]`` (the ``nn.Linear`` layout), ``weight_scale``
float32 ``[N]`` (per-channel) or ``[1]`` (per-tensor), ``bias`` float32 ``[N]`` or None, and for the
static scheme ``input_scale`` float32 ``[1]``. ``forward(x [..., K])`` quantizes ``x`` (per-token dynamic
by default, per-tensor dynamic, or static), runs the INT8 GEMM with the dequantization fused
(``ops.scaled_mm`` for fp16/bf16, ``ops.int8_mm`` + the same epilogue in torch for float32) and returns
``[..., N]`` in ``x.dtype``. Nothing in ``forward`` reads a value back to the host, so it can be captured
in a CUDA graph. K and N must be multiples of 16 (the kernels' alignment), and not 0.

Only a linear that computes ``x W^T + b`` can be converted: ``nn.Linear`` itself, a subclass that keeps
``nn.Linear.forward``, or one of ``EQUIVALENT_LINEARS`` (subclasses whose own forward computes the same).
"""
from __future__ import annotations

import numbers

import torch
from torch import nn

from ..config import ACTIVATION_SCHEMES, WEIGHT_GRANULARITIES
from ..ops._library import no_backward_through
from ._quant import (ALIGN, KeepBufferDtypes, check_finite, check_input, int8_linear, quantize_activation_shared,
                     quantize_weight, static_scale)


# "module.qualname" of nn.Linear subclasses whose own forward computes exactly ``x W^T + b``
EQUIVALENT_LINEARS = (
    "transformers.models.falcon.modeling_falcon.FalconLinear",  # input @ weight.T (+ bias)
    "torch.nn.modules.linear.NonDynamicallyQuantizableLinear",  # nn.Linear's forward (MHA's out_proj: see convert)
)


def check_linear_shape(in_features: int, out_features: int, what: str = "linear") -> str | None:
    """Why a linear of this shape cannot run on the INT8 kernels (None when it can)."""
    sizes = (("in_features", in_features), ("out_features", out_features))
    empty = [f"{n}={v}" for n, v in sizes if v < 1]
    bad = [f"{n}={v}" for n, v in sizes if v % ALIGN]
    why = None
    if empty:
        why = f"{' and '.join(empty)}: an INT8 GEMM needs at least one input and one output feature"
    elif bad:
        why = f"{' and '.join(bad)} not a multiple of {ALIGN} (the INT8 kernels' alignment)"
    if why:
        return f"{what}: {why}" if what else why
    return None


def linear_forward_problem(linear: nn.Linear) -> str | None:
    """Why W8A8Linear (``x W^T + b``) would not compute what ``linear``'s forward computes: a subclass of
    ``nn.Linear`` that overrides ``forward`` and is not in ``EQUIVALENT_LINEARS`` (None when it would)."""
    cls = type(linear)
    if "forward" in vars(linear):  # set on the instance: accelerate's hooks, a user's wrapper
        return ("its forward is replaced on the instance (an accelerate hook or a wrapper), which a W8A8Linear in "
                "its place would drop")
    if cls.forward is nn.Linear.forward or f"{cls.__module__}.{cls.__qualname__}" in EQUIVALENT_LINEARS:
        return None
    return (f"{cls.__name__} is an nn.Linear subclass with its own forward, which W8A8Linear (x W^T + b) "
            f"would not reproduce")


class W8A8Linear(KeepBufferDtypes, nn.Module):
    """INT8-weight, INT8-activation linear layer: ``y = x W^T + b`` on INT8 tensor cores.

    Args:
        in_features: K (multiple of 16).
        out_features: N (multiple of 16).
        bias: whether a float32 ``bias [N]`` buffer exists.
        weight: ``"per_channel"`` (``weight_scale [N]``) or ``"per_tensor"`` (``[1]``).
        activation: ``"per_token"`` (dynamic, default), ``"per_tensor"`` (dynamic) or ``"static"``
            (``input_scale [1]`` from calibration).
        device: where the (zero-initialised) buffers live; ``"meta"`` for loading.
    """
    FLOAT32_BUFFERS = ("weight_scale", "bias", "input_scale")
    INT8_BUFFERS = ("weight",)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weight: str = "per_channel",
                 activation: str = "per_token", device=None):
        super().__init__()
        if weight not in WEIGHT_GRANULARITIES:
            raise ValueError(f"W8A8Linear: weight must be one of {WEIGHT_GRANULARITIES}, got {weight!r}")
        if activation not in ACTIVATION_SCHEMES:
            raise ValueError(f"W8A8Linear: activation must be one of {ACTIVATION_SCHEMES}, got {activation!r}")
        for n, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"W8A8Linear: {n} must be an integer, got {type(v).__name__} {v!r}")
        reason = check_linear_shape(int(in_features), int(out_features), "W8A8Linear")
        if reason:
            raise ValueError(reason)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_granularity, self.activation = weight, activation
        in_features, out_features = self.in_features, self.out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        n_scales = out_features if weight == "per_channel" else 1
        self.register_buffer("weight_scale", torch.ones(n_scales, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device)
                             if activation == "static" else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: str = "per_channel", activation: str = "per_token",
                    input_amax=None, name: str = "linear") -> "W8A8Linear":
        """Quantize ``linear`` (left unchanged) into a new ``W8A8Linear`` on the same device, in the same
        training mode.

        ``input_amax``: the calibrated absolute maximum of this layer's input (after smoothing), a
        float or 1-element tensor; required for ``activation="static"``, refused otherwise.
        """
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{name}: from_linear expects an nn.Linear, got {type(linear).__name__}")
        problem = linear_forward_problem(linear)
        if problem:
            raise ValueError(f"{name}: {problem}; only nn.Linear, subclasses that keep nn.Linear.forward and "
                             f"{[n.rsplit('.', 1)[-1] for n in EQUIVALENT_LINEARS]} can be converted")
        if activation == "static" and input_amax is None:
            raise ValueError(f"{name}: activation='static' needs input_amax (the calibrated |x| maximum)")
        if activation != "static" and input_amax is not None:
            raise ValueError(f"{name}: input_amax is used by activation='static' only, got activation={activation!r} "
                             f"(dynamic schemes compute the scale from each input); pass input_amax=None")
        if input_amax is not None:
            numel = input_amax.numel() if isinstance(input_amax, torch.Tensor) else torch.as_tensor(input_amax).numel()
            if numel != 1:
                raise ValueError(f"{name}: input_amax must be a number or a 1-element tensor (the per-tensor |x| "
                                 f"maximum of the static scheme), got {numel} elements; for per-channel statistics "
                                 f"pass their maximum")
        if linear.weight.is_meta:
            raise ValueError(f"{name}: the linear's weight is on the meta device (not loaded); load its weights "
                             f"before quantizing it")
        try:
            module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, weight=weight,
                         activation=activation, device=linear.weight.device)
        except ValueError as exc:  # the constructor's reason, with the module it is about
            raise ValueError(f"{name}: {exc}") from None
        module.train(linear.training)
        w_q, w_scale = quantize_weight(linear.weight, weight, f"{name}.weight")
        module.weight.copy_(w_q)
        module.weight_scale.copy_(w_scale)
        if linear.bias is not None:
            b = linear.bias.detach().to(torch.float32)
            check_finite(b, f"{name}.bias")
            module.bias.copy_(b)
        if activation == "static":
            module.input_scale.copy_(static_scale(input_amax, f"{name} input_amax").to(module.input_scale.device))
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input("W8A8Linear", x, self.in_features)
        x_q, x_scale = quantize_activation_shared(x, self.activation, self.input_scale, self)
        out = int8_linear(x_q, x_scale, self.weight, self.weight_scale, self.bias, x.dtype)
        return no_backward_through(out, x, "W8A8Linear")

    def dequantized_weight(self) -> torch.Tensor:
        """float32 ``[N, K]``: ``weight * weight_scale`` (for inspection and error reports)."""
        return self.weight.to(torch.float32) * self.weight_scale.reshape(-1, 1)

    def scheme(self) -> str:
        act = "static per-tensor" if self.activation == "static" else f"dynamic {self.activation}"
        return f"w8 {self.weight_granularity} / a8 {act}".replace("_", "-")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.scheme()}")
