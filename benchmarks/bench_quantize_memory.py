"""Peak memory of ``quantize_`` on a real-size model (random weights): converting module by module (the
default) against ``atomic=True`` (every W8A8 module built before any is swapped in).

    python benchmarks/bench_quantize_memory.py --arch llama-2-7b --layers 8              # CPU, both modes
    python benchmarks/bench_quantize_memory.py --arch llama-2-7b --device cuda           # GPU, all 32 layers
    python benchmarks/bench_quantize_memory.py --list                                    # the plan, nothing run

Each mode runs in a fresh subprocess, so one mode's freed memory cannot hide the other's peak. The model
is built in fp16 on the device, then ``quantize_`` runs (no smoothing: memory does not depend on it).
Measured around the ``quantize_`` call only:
    CPU   the process's resident set: VmRSS before, VmHWM after (its peak counter reset by writing 5 to
          /proc/self/clear_refs just before the call).
    CUDA  torch.cuda.memory_allocated before, max_memory_allocated after (reset_peak_memory_stats).
"extra peak" is the peak minus the memory before: what quantizing needs on top of the FP model. The
FP and W8A8 sizes are the bytes of the parameters and buffers. Results:
<out>/quantize_memory_<device>_<arch>_<layers>L.{json,csv,md} with device, date and commit.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"
MODES = {"stream": False, "atomic": True}  # mode -> quantize_'s atomic=
GIB = 2 ** 30


def parse_args(argv=None):
    from sq_kernels.cli import BENCH_ARCHS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama-2-7b", choices=sorted(BENCH_ARCHS))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the architecture's own)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default="stream,atomic", help="comma-separated: stream, atomic")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one mode, print one JSON line
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes: expected a comma-separated subset of {sorted(MODES)}, got {args.modes!r}")
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers must be a positive integer, got {args.layers}")
    args.modes = modes
    return args


def model_config(arch: str, layers: int | None):
    from transformers import AutoConfig

    from sq_kernels.cli import BENCH_ARCHS
    family, shape = BENCH_ARCHS[arch]
    config = AutoConfig.for_model(family, **shape)
    if layers is not None:
        config.num_hidden_layers = layers
    return config


def _proc_status(key: str) -> int:
    """A ``/proc/self/status`` memory line (kB) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key} line (not Linux?)")


def _tensor_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run_child(arch: str, layers: int | None, device: str, mode: str) -> dict:
    """Build the model, quantize it in ``mode``, return the measurements (runs in its own process)."""
    import torch
    from transformers import AutoModelForCausalLM

    import sq_kernels as sq
    torch.manual_seed(0)
    config = model_config(arch, layers)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    fp_bytes = _tensor_bytes(model)
    cfg = sq.SmoothQuantConfig(smooth=False, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        before = _proc_status("VmRSS")
    report = sq.quantize_(model, cfg, atomic=MODES[mode])
    if device == "cuda":
        torch.cuda.synchronize()
        peak, after = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    else:
        peak, after = _proc_status("VmHWM"), _proc_status("VmRSS")
    return {"mode": mode, "layers": config.num_hidden_layers, "converted": len(report.converted),
            "fp_gib": fp_bytes / GIB, "w8a8_gib": _tensor_bytes(model) / GIB, "before_gib": before / GIB,
            "peak_gib": peak / GIB, "after_gib": after / GIB, "extra_peak_gib": (peak - before) / GIB}


def markdown(rows: list[dict], meta: dict) -> str:
    title = f"{meta['arch']}, {rows[0]['layers']} decoder layers, fp16, {meta['device_name']}"
    lines = [f"# quantize_ peak memory: {title}",
             "", f"{meta['date']}, commit {meta['commit']}, torch {meta['torch']}. Measured around the "
             f"`quantize_` call: {meta['measure']}.", "",
             "| mode | FP model GiB | W8A8 model GiB | before GiB | peak GiB | extra peak GiB | extra / W8A8 size |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['fp_gib']:.2f} | {r['w8a8_gib']:.2f} | {r['before_gib']:.2f} | "
                     f"{r['peak_gib']:.2f} | {r['extra_peak_gib']:.2f} | {r['extra_peak_gib'] / r['w8a8_gib']:.2f} |")
    by = {r["mode"]: r for r in rows}
    if "stream" in by and "atomic" in by:
        lines += ["", f"Converting module by module needs {by['stream']['extra_peak_gib']:.2f} GiB on top of the "
                  f"model, against {by['atomic']['extra_peak_gib']:.2f} GiB when every W8A8 module is built first."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.arch, args.layers, args.device, args.child)))
        return 0
    config = model_config(args.arch, args.layers)
    plan = f"{args.arch}: {config.num_hidden_layers} layers, fp16, on {args.device}; modes {', '.join(args.modes)}"
    if args.list:
        print(plan)
        return 0
    import torch

    from _timing import environment, format_table, write_results
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        print("error: the CPU measurement reads /proc/self (Linux only)", file=sys.stderr)
        return 2
    print(plan, flush=True)
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--arch", args.arch, "--device", args.device, "--child", mode]
        if args.layers is not None:
            cmd += ["--layers", str(args.layers)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"error: mode {mode} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(format_table(rows[-1:], list(rows[-1])), flush=True)
    meta = environment()
    meta.update(arch=args.arch, device_name=meta.get("device", "CPU") if args.device == "cuda" else "CPU",
                measure=("torch.cuda allocated bytes" if args.device == "cuda" else
                         "the process's resident set (VmRSS / VmHWM)"))
    stem = args.out / f"quantize_memory_{args.device}_{args.arch}_{rows[0]['layers']}L"
    write_results(stem, rows, meta)
    stem.with_suffix(".md").write_text(markdown(rows, meta), encoding="utf-8")
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
