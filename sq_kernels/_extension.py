"""Loading the compiled extension ``sq_kernels._C`` (CUDA kernels), and saying clearly when it is absent.

Importing ``_C`` registers CUDA implementations for the ``sq_kernels::*`` ops defined in
``sq_kernels/ops``; without it every op runs on its PyTorch reference (any device).
"""
from __future__ import annotations

import importlib
import os

BUILD_HINT = (
    "Build it on a machine with a CUDA build of torch and nvcc:\n"
    "    pip install nvidia-cutlass==4.2.0.0 && pip install --no-build-isolation .\n"
    "(set SQ_KERNELS_REQUIRE_CUDA=1 to make the build fail loudly instead of falling back).")

_module = None
_error: str | None = None


def _load():
    global _module, _error
    if _module is not None or _error is not None:
        return _module
    if os.environ.get("SQ_KERNELS_DISABLE_EXTENSION", "") == "1":
        _error = "disabled by SQ_KERNELS_DISABLE_EXTENSION=1"
        return None
    try:
        _module = importlib.import_module("sq_kernels._C")
    except ImportError as exc:  # not built (pure-Python install) or built against another torch
        _error = f"{type(exc).__name__}: {exc}"
    return _module


def extension():
    """The loaded ``sq_kernels._C`` module, or None."""
    return _load()


def has_cuda_kernels() -> bool:
    """True when the CUDA extension is built and importable."""
    return _load() is not None


def extension_error() -> str | None:
    """Why the extension is not available (None when it is)."""
    _load()
    return _error


def require_cuda_kernels(what: str = "this operation") -> None:
    """Raise a RuntimeError that says how to build the extension, if it is missing."""
    if not has_cuda_kernels():
        raise RuntimeError(f"{what} needs the sq_kernels CUDA extension, which is not available "
                           f"({extension_error()}).\n{BUILD_HINT}")


def built_archs() -> list[str]:
    """Archs the extension was compiled for, e.g. ['8.0', '8.9', '9.0a'] ([] without the extension)."""
    mod = _load()
    return list(mod.built_archs()) if mod is not None else []
