"""Timing and reporting helpers shared by every benchmark in this folder.

Rules (../README.md, "Benchmarks"): CUDA events, warm-up first, medians, and inputs rotated among
enough copies that the working set does not sit in the 50 MB L2 of an H100.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

L2_FLUSH_BYTES = 2 * 64 * 1024 * 1024  # rotate at least this many bytes of inputs (2x a 50-60 MB L2)
SLEEP_CYCLES_PER_S = 2.0e9  # torch.cuda._sleep counts clock cycles; 2 GHz is above any H100/A100 SM clock,
HEAD_START_MAX_S = 0.5      # so the head start lasts at least as long as asked (capped at half a second)


def copies_for(bytes_per_set: int, minimum: int = 2, maximum: int = 64) -> int:
    """How many input sets to rotate so that together they exceed the L2 twice over."""
    return max(minimum, min(maximum, -(-L2_FLUSH_BYTES // max(1, bytes_per_set))))


def time_cuda(fn, args_list, warmup: int = 10, iters: int = 50, graph: bool = False,
              back_to_back: bool = False) -> float:
    """Median time in microseconds of ``fn(*args)``, rotating over ``args_list`` (a list of arg tuples).

    With ``graph=True`` each call is captured once per argument set in a CUDA graph and the replays
    are timed, which removes Python and launch overhead. Each replay is still a graph launch of its
    own, so the GPU-side gap between two graphs stays in every sample (it weighs at decode sizes).
    With ``back_to_back=True`` (implies graph) all the argument sets are captured one after another in
    one graph, as a serving engine captures a whole decode step, and a replay's time divided by the
    number of calls is the sample: kernels then start as soon as the previous one ends. The rotation
    still keeps each call's inputs out of L2 (the other sets have evicted them).
    In both graph modes a spinning kernel is queued before the timed replays, so that the host has
    submitted them all before the GPU reaches them: the samples are GPU time, not host latency.
    """
    n = len(args_list)
    if graph or back_to_back:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for args in args_list:  # warm the allocator and any lazy init outside capture
                fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        if back_to_back:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for args in args_list:
                    fn(*args)
            call, per_sample = [g.replay], n
        else:
            graphs = []
            for args in args_list:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn(*args)
                graphs.append(g)
            call, per_sample = [g.replay for g in graphs], 1
    else:
        call, per_sample = [(lambda a=args: fn(*a)) for args in args_list], 1
    if per_sample > 1:  # each sample is n calls already
        warmup, iters = max(2, -(-warmup // n)), max(5, -(-iters // n))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(warmup):
        call[i % len(call)]()
    enqueue_s = (time.perf_counter() - t0) / max(1, warmup)  # host time to submit one call (upper bound)
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    if graph or back_to_back:
        # Keep the GPU busy while the host submits every timed replay: otherwise a short kernel finishes
        # before the next replay is submitted, and the start event (already executed) puts the host's
        # submission latency into the sample. Eager timing keeps that latency on purpose.
        head_start = min(HEAD_START_MAX_S, iters * (3.0 * enqueue_s + 20e-6) + 2e-4)  # + 2 event records per sample
        torch.cuda._sleep(int(head_start * SLEEP_CYCLES_PER_S))
    for i in range(iters):
        starts[i].record()
        call[i % len(call)]()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 / per_sample for s, e in zip(starts, ends))
    return times[len(times) // 2]


def copy_bandwidth_gbs(graph: bool = True) -> float:
    """Device copy bandwidth in GB/s (bytes read + written) of a 1 GiB fp16 ``copy_``: the practical
    ceiling that memory-bound kernels are measured against."""
    n = 1 << 29
    src = torch.randn(n, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    us = time_cuda(lambda s, d: d.copy_(s), [(src, dst)], warmup=5, iters=20, graph=graph)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / (us * 1e-6) / 1e9


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    """Device, date, commit and versions, recorded with every result file."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": os.environ.get("SQ_KERNELS_COMMIT") or git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        env.update(device=prop.name, sms=prop.multi_processor_count,
                   capability=f"{prop.major}.{prop.minor}")
    return env


def write_results(path_stem: Path, rows: list[dict], meta: dict) -> None:
    """Write ``<stem>.json`` (meta + rows) and ``<stem>.csv``."""
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    path_stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if rows:
        keys = list(rows[0].keys())
        lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
        path_stem.with_suffix(".csv").write_text("\n".join(lines) + "\n")


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``columns`` (floats shown with 3 significant digits)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    out = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)
