"""The ``sq_kernels`` op namespace. Each op family module defines its schemas here, registers its
pure-PyTorch reference for every device (``CompositeExplicitAutograd``) and a fake (meta)
implementation; the CUDA extension registers its kernels for the ``CUDA`` key over the reference."""
import torch

NAMESPACE = "sq_kernels"
lib = torch.library.Library(NAMESPACE, "DEF")


def define(schema: str, reference, fake) -> None:
    """Define ``sq_kernels::<name>`` from ``schema``, with ``reference`` for every device and ``fake``."""
    name = schema.split("(", 1)[0]
    lib.define(schema)
    lib.impl(name, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=lib)


def _no_backward_message(name: str) -> str:
    return (f"{NAMESPACE}::{name} has no backward: the W8A8 ops are for inference (int8 rounding has no useful "
            f"gradient). Run the quantized model under torch.no_grad() or torch.inference_mode(), and train or "
            f"fine-tune the floating-point model instead")


def _raise_no_backward(grad, size, dtype, name):
    raise RuntimeError(_no_backward_message(name))


# The gradient of every input of an sq_kernels op is this op, which raises when it runs. Raising only when
# it runs (not when a backward graph is traced: its fake returns an empty gradient) keeps torch.compile of a
# model called outside no_grad working, as HF models are; a real backward pass fails loudly.
lib.define("_no_backward(Tensor grad, SymInt[] size, ScalarType dtype, str op) -> Tensor")
lib.impl("_no_backward", _raise_no_backward, "CompositeExplicitAutograd")
torch.library.register_fake(f"{NAMESPACE}::_no_backward",
                            lambda grad, size, dtype, name: grad.new_empty(size, dtype=dtype), lib=lib)


class _NoBackward(torch.autograd.Function):
    """An op called on inputs that require grad: the same forward; every floating-point input's gradient is
    ``_no_backward``, which raises when a backward pass runs it."""

    @staticmethod
    def forward(ctx, name, overload, *args):
        ctx.name = name
        ctx.float_inputs = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                            else None for t in args]
        outs = overload(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)  # a tuple always: Dynamo needs one here
        ctx.mark_non_differentiable(*[t for t in outs if not t.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        grad = next((g for g in grads if g is not None), None)
        if grad is None:
            return (None, None) + tuple(None for _ in ctx.float_inputs)
        return (None, None) + tuple(None if meta is None else
                                    torch.ops.sq_kernels._no_backward.default(grad, list(meta[0]), meta[1], ctx.name)
                                    for meta in ctx.float_inputs)


class _DependsOn(torch.autograd.Function):
    """``out`` unchanged, made to depend on ``x`` for autograd, with ``x``'s gradient ``_no_backward``."""

    @staticmethod
    def forward(ctx, out, x, name):
        ctx.shape, ctx.dtype, ctx.name = tuple(x.shape), x.dtype, name
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return None, torch.ops.sq_kernels._no_backward.default(grad, list(ctx.shape), ctx.dtype, ctx.name), None


def no_backward_through(out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """A W8A8 module's output, tied to its input for autograd when the input requires grad but the output
    does not (static activation scales: the int8 input and the buffers carry no gradient), so that a backward
    pass through the module raises instead of silently skipping it."""
    if torch.is_grad_enabled() and x.requires_grad and not out.requires_grad and out.is_floating_point():
        return _DependsOn.apply(out, x, name)
    return out


class _InferenceOp:
    """What the wrappers call: the op itself, or, when an input requires grad (an HF model called outside
    ``no_grad``), the op through ``_NoBackward``. The W8A8 ops are inference ops (int8 rounding has no useful
    gradient); without this, autograd would differentiate only what it can see (the scales) and give a
    silently wrong gradient. Checked here in Python rather than by an Autograd kernel in the dispatcher, which
    would cost every call (also under no_grad) a trip through Python."""
    __slots__ = ("name", "overload")

    def __init__(self, name: str):
        self.name = name
        self.overload = getattr(getattr(torch.ops, NAMESPACE), name).default

    def __call__(self, *args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            outs = _NoBackward.apply(self.name, self.overload, *args)
            return outs[0] if len(outs) == 1 else outs
        return self.overload(*args)


_OPS: dict[str, _InferenceOp] = {}


def op(name: str) -> _InferenceOp:
    """The callable the wrappers use for ``sq_kernels::<name>`` (see ``_InferenceOp``)."""
    found = _OPS.get(name)
    if found is None:
        found = _OPS[name] = _InferenceOp(name)
    return found
