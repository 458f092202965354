"""Quantization helpers shared by the W8A8 modules: weight quantization (offline, once) and the
activation-quantize + INT8-GEMM + dequantize step of a forward (through ``sq_kernels.ops``).

Math (symmetric INT8, matching ``sq_kernels.ops``)::

    weight:     w_scale = max(amax(|w|), EPS) / 127     per output channel [N] or per tensor [1]
                w_q     = clamp(rint(w / w_scale), -127, 127)
    activation: per-token / per-tensor dynamic (scales computed from x in the op) or static
                (x_scale = max(calibrated amax, EPS) / 127, a buffer)
    output:     y = x_scale * (w_scale * (x_q @ w_q^T)) + bias
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import torch
from torch import nn

from .. import ops
from ..ops.quant import EPS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALIGN = 16
CHUNK = 1 << 24  # elements of a weight quantized at once (64 MiB of float32 temporaries)


def _div127(amax: torch.Tensor) -> torch.Tensor:
    # A tensor divisor keeps this one IEEE division on every device (CUDA turns a division by a Python
    # scalar into a multiplication by its reciprocal), so CPU- and GPU-quantized models get equal scales.
    return amax / torch.full_like(amax, 127.0)


def check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse a weight or bias holding NaN or Inf (its int8 image and scales would be garbage)."""
    if not torch.isfinite(t.detach()).all():
        raise ValueError(f"{what} contains NaN or Inf; refusing to quantize it")


def quantize_weight(w: torch.Tensor, granularity: str, what: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` float -> ``w_q`` int8 ``[..., N, K]`` and float32 ``w_scale`` ``[..., N]``
    (per_channel) or ``[..., 1]`` (per_tensor: one scale per ``[N, K]`` matrix).

    A stack of matrices (fused MoE experts ``[E, N, K]``) is quantized one matrix at a time, and a matrix
    in blocks of rows (``CHUNK`` elements), so the float32 temporaries stay small whatever the weight's size;
    every step is elementwise or an exact maximum, so the result does not depend on the blocking."""
    if granularity not in ("per_channel", "per_tensor"):
        raise ValueError(f"weight granularity must be 'per_channel' or 'per_tensor', got {granularity!r}")
    if w.dim() > 2:
        w_q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(*w.shape[:-1 if granularity == "per_channel" else -2],
                            *(() if granularity == "per_channel" else (1,)), dtype=torch.float32, device=w.device)
        for i in range(w.shape[0]):
            w_q[i], scale[i] = quantize_weight(w[i], granularity, f"{what}[{i}]")
        return w_q, scale
    if w.dim() != 2:
        raise ValueError(f"{what} must be a matrix [N, K] (or a stack of them), got shape {tuple(w.shape)}")
    w = w.detach()
    rows = max(1, CHUNK // max(1, w.shape[-1]))
    blocks = [slice(i, i + rows) for i in range(0, w.shape[0], rows)]
    amax = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for b in blocks:  # in-place steps: one float32 copy of a block at a time
        w32 = w[b].to(torch.float32, copy=True)  # a copy even when w is float32: changed in place below
        check_finite(w32, what)
        amax[b] = w32.abs_().amax(dim=-1) if w.shape[-1] else 0.0
    if granularity == "per_tensor":
        amax = amax.amax(dim=0, keepdim=True) if amax.numel() else torch.zeros(1, device=w.device)
    scale = _div127(torch.clamp_min(amax, EPS))
    w_q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    for b in blocks:
        row_scale = scale[b] if granularity == "per_channel" else scale
        w_q[b] = w[b].to(torch.float32, copy=True).div_(row_scale.unsqueeze(-1)).round_().clamp_(-127, 127)
    return w_q, scale.contiguous()


def static_scale(amax, what: str = "input_amax") -> torch.Tensor:
    """A calibrated absolute maximum -> the float32 static activation scale ``max(amax, EPS) / 127``."""
    amax = torch.as_tensor(amax, dtype=torch.float32).detach()
    if not torch.isfinite(amax).all():
        raise ValueError(f"{what} is not finite ({amax.flatten()[:4].tolist()}...): the calibration statistics "
                         "are corrupt or the model overflowed during calibration")
    if (amax < 0).any():
        raise ValueError(f"{what} must be >= 0")
    return _div127(torch.clamp_min(amax, EPS)).reshape(-1).contiguous()


def quantize_activation(x: torch.Tensor, activation: str, input_scale: torch.Tensor | None):
    """``x [..., K]`` float -> ``x_q`` int8 ``[..., K]`` and ``x_scale`` float32 (``[...]`` per token,
    ``[1]`` otherwise)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if activation == "per_token":
        return ops.quantize_per_token(x)
    if activation == "per_tensor":
        return ops.quantize_per_tensor(x)
    return ops.quantize_per_tensor(x, input_scale)


class _Last:
    """The last dynamic activation quantization of this thread: the input (weakly held), its version
    counter, the scheme and stream it was quantized for, the scope it was made in, and the result."""
    __slots__ = ("ref", "version", "key", "scope", "value", "__weakref__")

    def __init__(self):
        self.clear()

    def clear(self):
        self.ref = self.version = self.key = self.scope = self.value = None


class _State(threading.local):
    """Per thread: whether sharing is on, the open scopes (``(id, owner)``, innermost last; the owner is the
    module whose call it is) and the last quantization."""

    def __init__(self):
        self.enabled = True
        self.scopes: list[tuple[int, object]] = []
        self.next_scope = 0
        self.slot = _Last()


_state = _State()


def _forget(slot_ref, dead):
    slot = slot_ref()
    if slot is not None and slot.ref is dead:  # the input died: drop its int8 copy with it
        slot.clear()


def _close_scopes(depth: int) -> None:
    """Close the open scopes from ``depth`` up; what they quantized is not reused by anyone after them."""
    closed = {scope for scope, _ in _state.scopes[depth:]}
    del _state.scopes[depth:]
    if _state.slot.scope in closed:
        _state.slot.clear()


def _enter_scope(module, args):
    """Forward pre-hook of a module whose children include W8A8 linears (self_attn, mlp, ...): a call of
    it is one scope; quantizations are shared only within the scope they were made in. A module already
    open cannot be inside its own call: its scope and those above it were left open by an interrupted
    call (KeyboardInterrupt skips forward hooks) and are closed first."""
    if torch.compiler.is_compiling():
        return
    for depth, (_, owner) in enumerate(_state.scopes):
        if owner is module:
            _close_scopes(depth)
            break
    _state.next_scope += 1
    _state.scopes.append((_state.next_scope, module))


def _exit_scope(module, args, output):
    """Forward hook (always called, on exceptions too): close this call's scope and any left open above it."""
    if torch.compiler.is_compiling():
        return
    for depth in range(len(_state.scopes) - 1, -1, -1):
        if _state.scopes[depth][1] is module:
            _close_scopes(depth)
            return


def install_sharing_scopes(parents) -> None:
    """Make each module of ``parents`` (the modules that call W8A8 linears) a sharing scope, once."""
    for parent in parents:
        if not getattr(parent, "_sq_sharing_scope", False):
            parent.register_forward_pre_hook(_enter_scope)
            parent.register_forward_hook(_exit_scope, always_call=True)
            parent._sq_sharing_scope = True


@contextmanager
def sharing_scope():
    """A sharing scope around a block (what a call of a module given to ``install_sharing_scopes`` is): for
    W8A8 linears called directly, outside a model."""
    owner = object()  # this block's own scope
    _enter_scope(owner, ())
    try:
        yield
    finally:
        _exit_scope(owner, (), None)


@contextmanager
def shared_activation_quantization(enabled: bool):
    """Turn the reuse of one input's quantization by the linears that read it (q/k/v, gate/up) on or off
    within a block, in this thread; on by default. Off, every linear quantizes its input itself (the
    results are the same bitwise either way; this is for measuring and debugging)."""
    if not isinstance(enabled, bool):
        raise ValueError(f"shared_activation_quantization: enabled must be True or False, got {enabled!r}")
    before = _state.enabled
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = before


def quantize_activation_shared(x: torch.Tensor, activation: str, input_scale: torch.Tensor | None,
                               module: nn.Module | None = None):
    """``quantize_activation``, reusing the result when this very tensor (the same object, not modified
    since: same version counter) was just quantized the same way on the same stream within the same call
    of the module that runs both linears (a sharing scope: ``install_sharing_scopes``). q/k/v read one norm
    output inside one attention call, gate/up another inside one MLP call: each is then quantized once
    instead of three and two times, bitwise the same.

    Only dynamic schemes are shared (a static scale belongs to one linear). Not shared: outside a scope
    (a W8A8Linear called on its own), under ``torch.compile`` (the trace stays a plain graph), for
    inference-mode tensors (no version counter), when turned off. The scope is what makes writes the
    version counter cannot see harmless (``x.data.mul_``, a kernel writing into a reused buffer): none
    happens between two linears of one attention or MLP call. The int8 copy is dropped when the scope
    ends or the input dies. ``module``: the calling linear; it shares only inside a call of its own parent
    (or a ``sharing_scope()`` block), never in a scope an interrupted call left open elsewhere."""
    if activation == "static" or torch.compiler.is_compiling():
        return quantize_activation(x, activation, input_scale)
    state = _state
    if not state.enabled or not state.scopes or x.is_inference():
        return quantize_activation(x, activation, input_scale)
    scope, owner = state.scopes[-1]
    if module is not None and isinstance(owner, nn.Module) and not any(
            child is module for child in owner._modules.values()):
        return quantize_activation(x, activation, input_scale)
    slot = state.slot
    stream = torch.cuda.current_stream(x.device).cuda_stream if x.is_cuda else None
    key = (activation, stream)
    version = x._version
    if (slot.ref is not None and slot.scope == scope and slot.ref() is x and slot.version == version
            and slot.key == key):
        return slot.value
    value = quantize_activation(x, activation, input_scale)
    slot.ref = weakref.ref(x, lambda dead, s=weakref.ref(slot): _forget(s, dead))
    slot.version, slot.key, slot.scope, slot.value = version, key, scope, value
    return value


def int8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``x_scale * (w_scale * (x_q @ w_q^T)) + bias`` in ``out_dtype``.

    fp16 / bf16: one fused ``ops.scaled_mm`` (the CUDA kernel's epilogue). float32 (CPU runs): the
    exact ``ops.int8_mm`` then the same order of operations in torch.
    """
    if out_dtype in (torch.float16, torch.bfloat16):
        return ops.scaled_mm(x_q, w_q, x_scale, w_scale, bias, out_dtype=out_dtype)
    acc = ops.int8_mm(x_q, w_q).to(torch.float32)
    t = w_scale * acc
    # per-token scales have shape x_q.shape[:-1] and need a trailing axis; a per-tensor [1] broadcasts as is
    y = (x_scale.unsqueeze(-1) if x_scale.shape == x_q.shape[:-1] else x_scale) * t
    if bias is not None:
        y = y + bias
    return y


def check_input(name: str, x, in_features: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: input must be a float16, bfloat16 or float32 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{name}: input must have shape [..., {in_features}], got {tuple(x.shape)}")


class KeepBufferDtypes:
    """Mixin of the W8A8 modules, which keep their dtypes whatever is done to the model:

    - ``model.half()`` / ``.to(dtype)`` / ``.type(dtype)`` move the buffers to the new device but keep the
      int8 weights int8 and the scale and bias buffers float32 (the ops take float32 scales; a round trip
      through fp16 would also change them);
    - ``load_state_dict`` refuses a floating-point tensor for an int8 weight (copying it would round a float
      weight to all-zero int8, silently), and an integer one for a scale; with ``assign=True`` the scales
      and bias are converted to float32."""
    FLOAT32_BUFFERS: tuple[str, ...] = ()
    INT8_BUFFERS: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {n: (self._buffers[n], dtype) for names, dtype in ((self.FLOAT32_BUFFERS, torch.float32),
                                                                   (self.INT8_BUFFERS, torch.int8))
                for n in names if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, (original, dtype) in kept.items():
            moved = self._buffers[name]
            if moved.dtype != dtype:
                self._buffers[name] = original.to(device=moved.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        kind, refused = type(self).__name__, False
        for names, wanted, ok in ((self.INT8_BUFFERS, "an int8", lambda t: t.dtype == torch.int8),
                                  (self.FLOAT32_BUFFERS, "a floating-point", lambda t: t.is_floating_point())):
            for name in names:
                t = state_dict.get(prefix + name)
                if isinstance(t, torch.Tensor) and self._buffers.get(name) is not None and not ok(t):
                    refused = True
                    error_msgs.append(f"{prefix + name}: {kind} needs {wanted} tensor here, the state dict has "
                                      f"{t.dtype}" + (" (a floating-point model's weights are quantized with "
                                                      "sq_kernels.quantize_ or W8A8Linear.from_linear, not loaded "
                                                      "into W8A8 modules)" if wanted == "an int8" else ""))
        if refused:
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in self.FLOAT32_BUFFERS:  # assign=True puts the state dict's own tensors in place
            t = self._buffers.get(name)
            if t is not None and t.dtype != torch.float32:
                self._buffers[name] = t.to(torch.float32)
