"""Build sq-kernels: the Python package, plus the CUDA extension ``sq_kernels._C`` where it can be built.

    pip install --no-build-isolation .

builds the extension against the torch you have installed when that torch is a CUDA build and nvcc
is found; otherwise it installs the pure-Python package (reference ops) and says so.

Environment:
    SQ_KERNELS_CUDA_ARCHS    archs to compile for (default "8.0;8.9;9.0a"); see csrc/build_config.py
    SQ_KERNELS_REQUIRE_CUDA  =1: fail instead of falling back to the pure-Python package
    SQ_KERNELS_NO_CUDA       =1: never build the extension (pure-Python package)
    CUTLASS_DIR              CUTLASS checkout to use instead of third_party/cutlass or the nvidia-cutlass wheel
    MAX_JOBS                 parallel compile jobs
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _load_build_config():
    """csrc/build_config.py (the one source list and flag set), loaded by path: putting csrc/ on
    sys.path would let csrc/torch/ pass for a `torch` namespace package in an isolated build."""
    spec = importlib.util.spec_from_file_location("sq_kernels_build_config", ROOT / "csrc" / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = _load_build_config()


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    # pip hides a build backend's stdout unless -v; stderr lines still show up in its log
    print(f"sq-kernels: {msg}", file=sys.stderr, flush=True)


def _no_kernels(reason: str):
    if _flag("SQ_KERNELS_REQUIRE_CUDA"):
        raise RuntimeError(f"sq-kernels: SQ_KERNELS_REQUIRE_CUDA=1 but the CUDA extension cannot be built: {reason}")
    _say(f"building the pure-Python package WITHOUT CUDA kernels ({reason}). "
         "The ops run on their PyTorch reference implementations.")
    return [], {}


def _torch_libstdcxx() -> list[str]:
    """The shared libstdc++ that torch itself runs on, as a link argument.

    Some toolchains (the H100 machine's /opt/gcc wrapper, for one) find only a static libstdc++;
    an extension linked against it carries a second C++ runtime, and the first C++ exception it
    throws (every argument check) kills the process with a segmentation fault (seen 2026-11-23).
    Linking the very libstdc++.so.6 that `import torch` loaded keeps one runtime."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path and os.path.exists(path):
                    return [path]
    except OSError:
        pass
    return []


def _cuda_extension():
    """Return (ext_modules, cmdclass) for the CUDA build, or empty ones for the pure-Python package."""
    if _flag("SQ_KERNELS_NO_CUDA"):
        return _no_kernels("SQ_KERNELS_NO_CUDA=1")
    nvcc = build_config.find_nvcc()
    try:
        import torch
    except ImportError:
        if nvcc and not _flag("SQ_KERNELS_ALLOW_ISOLATED"):
            raise RuntimeError(
                "sq-kernels: torch is not importable inside this build, but nvcc is on this machine, so the "
                "CUDA kernels could be built. This is pip's build isolation hiding your torch.\n"
                "Build against your installed torch with:\n\n"
                "    pip install --no-build-isolation .\n\n"
                "(or set SQ_KERNELS_NO_CUDA=1 to install the pure-Python package on purpose).")
        return _no_kernels("torch is not importable in the build environment")
    if torch.version.cuda is None:
        return _no_kernels(f"the installed torch {torch.__version__} is a CPU build")
    if nvcc is None:
        return _no_kernels("nvcc not found (set CUDA_HOME or put nvcc on the PATH)")

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = build_config.requested_archs()
    cutlass_inc = build_config.find_cutlass()
    kernel_build = ROOT / "build" / "kernels"
    objects = build_config.write_ninja(kernel_build, archs, nvcc, cutlass_inc)
    from torch.utils.cpp_extension import CUDA_HOME

    cuda_home = Path(CUDA_HOME) if CUDA_HOME else Path(nvcc).resolve().parent.parent
    _say(f"building CUDA kernels for {', '.join(archs)} with {nvcc}; CUTLASS from {cutlass_inc}")

    class BuildKernelsThenExtension(BuildExtension):
        """Compile the torch-free kernel TUs with our own ninja file (per-family arch flags), then
        let torch's BuildExtension compile and link the torch-facing entry points against them."""

        def run(self):
            jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
            subprocess.check_call(["ninja", "-C", str(kernel_build), "-j", jobs])
            super().run()

    torch_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "torch").glob("*.cpp"))
    ext = CUDAExtension(
        name="sq_kernels._C",
        sources=torch_sources,
        include_dirs=[str(ROOT / "csrc" / "kernels"), str(ROOT / "csrc" / "torch")],
        # no -std here: torch's BuildExtension picks the standard its headers were built with
        extra_compile_args={"cxx": ["-O3"] + build_config.family_defines(archs)},
        extra_objects=[str(o) for o in objects],
        library_dirs=[str(cuda_home / "lib64"), str(cuda_home / "lib64" / "stubs")],
        libraries=["cudart", "cuda"],
        extra_link_args=_torch_libstdcxx(),
    )
    return [ext], {"build_ext": BuildKernelsThenExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
