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


def op(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name).default
