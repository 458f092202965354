"""The one build truth: which CUDA sources exist, which archs each is compiled for, and the nvcc flags.

setup.py imports this module; CMakeLists.txt runs it (``python3 csrc/build_config.py cmake``) so the
compile check in CI and ``compile_commands.json`` see exactly the files and flags the wheel build uses.

Kernel sources live in ``csrc/kernels/<family>/*.cu`` and never include torch:

    common/  portable kernels (quantizers, norms, the small-M GEMM): every requested arch
    sm80/    CUTLASS 2.x (mma.sync) kernels: the 8.x archs requested, plus sm_90 when 9.0a is
             requested, so that this path can also run (and be tested) on a Hopper GPU
    sm90/    CUTLASS 3.x (wgmma + TMA) kernels: sm_90a only

Environment:
    SQ_KERNELS_CUDA_ARCHS  ';'- or ','-separated archs, default "8.0;8.9;9.0a"
    MAX_JOBS               parallel compile jobs (default: CPU count)
    NVCC_THREADS           nvcc --threads per job (default 1)
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = CSRC / "kernels"
DEFAULT_ARCHS = "8.0;8.9;9.0a"
FAMILIES = ("common", "sm80", "sm90")
SUPPORTED_ARCHS = ("8.0", "8.6", "8.7", "8.9", "9.0", "9.0a")


def requested_archs(value: str | None = None) -> list[str]:
    """Parse SQ_KERNELS_CUDA_ARCHS (or ``value``) into a sorted list like ['8.0', '8.9', '9.0a']."""
    raw = value if value is not None else os.environ.get("SQ_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS)
    archs = []
    for item in re.split(r"[;,\s]+", raw.strip()):
        if not item:
            continue
        item = item.lower().removeprefix("sm_").removeprefix("sm")
        m = re.fullmatch(r"(\d)\.?(\d)(a?)", item)
        if m:
            item = f"{m.group(1)}.{m.group(2)}{m.group(3)}"
        if item not in SUPPORTED_ARCHS:
            raise ValueError(
                f"SQ_KERNELS_CUDA_ARCHS: unsupported arch {item!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        if item not in archs:
            archs.append(item)
    if not archs:
        raise ValueError("SQ_KERNELS_CUDA_ARCHS is empty; name at least one of " + ", ".join(SUPPORTED_ARCHS))
    return sorted(archs)


def family_archs(family: str, archs: list[str]) -> list[str]:
    """The archs a source family is compiled for, given the requested archs."""
    if family == "common":
        return [("9.0a" if a == "9.0a" else a) for a in archs]
    if family == "sm80":
        out = [a for a in archs if a.startswith("8.")]
        if any(a.startswith("9.0") for a in archs):
            out.append("9.0")  # plain sm_90: the CUTLASS 2.x path runs on Hopper too (tests, fallback)
        return out
    if family == "sm90":
        return ["9.0a"] if "9.0a" in archs else []
    raise ValueError(family)


def gencode(arch: str) -> str:
    num = arch.replace(".", "")
    return f"-gencode=arch=compute_{num},code=sm_{num}"


def sources(family: str) -> list[Path]:
    return sorted((KERNELS / family).glob("*.cu"))


def built_families(archs: list[str]) -> list[str]:
    return [f for f in FAMILIES if family_archs(f, archs) and sources(f)]


def family_defines(archs: list[str]) -> list[str]:
    """Macros the torch-facing entry points see: which kernel families are linked in."""
    return [f"-DSQK_HAS_{f.upper()}=1" for f in built_families(archs)]


def find_cutlass() -> Path:
    """CUTLASS include dir: $CUTLASS_DIR, else third_party/cutlass (submodule), else the nvidia-cutlass wheel."""
    tried = []
    env = os.environ.get("CUTLASS_DIR")
    if env:
        inc = Path(env) / "include"
        if (inc / "cutlass" / "cutlass.h").is_file():
            return inc
        tried.append(f"CUTLASS_DIR={env} (no include/cutlass/cutlass.h there)")
    else:
        tried.append("CUTLASS_DIR (not set)")
    sub = ROOT / "third_party" / "cutlass" / "include"
    if (sub / "cutlass" / "cutlass.h").is_file():
        return sub
    tried.append("third_party/cutlass submodule (not populated: `git submodule update --init`)")
    try:
        import cutlass_library  # the nvidia-cutlass wheel

        inc = Path(cutlass_library.__file__).parent / "source" / "include"
        if (inc / "cutlass" / "cutlass.h").is_file():
            return inc
        tried.append(f"nvidia-cutlass wheel at {inc} (headers missing)")
    except ImportError:
        tried.append("the nvidia-cutlass Python package (not installed: `pip install nvidia-cutlass==4.2.0.0`)")
    raise RuntimeError("CUTLASS headers not found. Tried, in order:\n  - " + "\n  - ".join(tried))


def nvcc_flags(cutlass_include: Path) -> list[str]:
    return [
        "-O3", "-std=c++17", "-DNDEBUG", "--expt-relaxed-constexpr", "--expt-extended-lambda",
        "-Xcompiler=-fPIC", "-Xcompiler=-Wno-psabi", "-lineinfo",
        f"--threads={os.environ.get('NVCC_THREADS', '1')}",
        f"-I{KERNELS}", f"-I{cutlass_include}", f"-I{cutlass_include.parent / 'tools' / 'util' / 'include'}",
        # the wheel has no tools/util; CUTLASS finds cuTensorMapEncodeTiled through the driver at run time
        "-DCUTLASS_ENABLE_DIRECT_CUDA_DRIVER_CALL=1",
        "-DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED",
        "-DCUTLASS_DEBUG_TRACE_LEVEL=0",
    ]


def compile_units(archs: list[str]) -> list[tuple[Path, list[str]]]:
    """(source, arch flags) for every kernel translation unit the given archs need."""
    units = []
    for fam in FAMILIES:
        fa = family_archs(fam, archs)
        if not fa:
            continue
        for src in sources(fam):
            units.append((src, [gencode(a) for a in fa]))
    return units


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def write_ninja(build_dir: Path, archs: list[str], nvcc: str, cutlass_include: Path) -> list[Path]:
    """Write build_dir/build.ninja that compiles every kernel TU to an object; return the objects."""
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = " ".join(shlex.quote(f) for f in nvcc_flags(cutlass_include))
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {nvcc}",
        f"flags = {flags}",
        "rule nvcc",
        "  command = $nvcc $flags $arch -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $in",
    ]
    objects = []
    for src, arch_flags in compile_units(archs):
        rel = src.relative_to(KERNELS)
        obj = build_dir / (str(rel).replace("/", "__") + ".o")
        objects.append(obj)
        lines.append(f"build {obj}: nvcc {src}")
        lines.append(f"  arch = {' '.join(arch_flags)}")
    (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
    return objects


def _cmake_listing() -> str:
    """Lines CMakeLists.txt parses, fields separated by |: FLAGS|<nvcc flags> and UNIT|<source>|<arch flags>."""
    archs = requested_archs()
    out = ["FLAGS|" + "|".join(nvcc_flags(find_cutlass()))]
    for src, arch_flags in compile_units(archs):
        out.append("UNIT|" + str(src) + "|" + "|".join(arch_flags))
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "show"
    if cmd == "cmake":
        sys.stdout.write(_cmake_listing())
    elif cmd == "show":
        archs = requested_archs()
        print("archs:", archs)
        print("cutlass:", find_cutlass())
        for src, flags in compile_units(archs):
            print(src.relative_to(ROOT), " ".join(flags))
    else:
        sys.exit(f"usage: {sys.argv[0]} [show|cmake]")
