"""INT8 GEMM with fused dequantization (``sq_kernels.ops.scaled_mm``) against cuBLAS FP16/BF16 and the
INT8 peers, on the real layer shapes of Llama-2, OPT and BLOOM.

    python benchmarks/bench_gemm.py                   # the full sweep (< 6 min on an H100)
    python benchmarks/bench_gemm.py --quick           # 3 shapes x M {1,16,256,4096} + 8192^3 (< 1 min)
    python benchmarks/bench_gemm.py --models Llama-2-7B --shapes qkv,4096x11008 --m 1,16 --graph
    python benchmarks/bench_gemm.py --quick --m 1,16 --back-to-back   # decode sizes, graph-launch latency excluded
    python benchmarks/bench_gemm.py --list            # print the planned points (works without a GPU)

Methods (each timed on its own operands; the int8 ones get pre-quantized int8 operands and float32
scales, as a W8A8 linear layer would after its activation quantizer):
    fp16, bf16      cuBLAS: torch.nn.functional.linear(a, w), i.e. a @ w.T with w stored [N, K]
    ours_fp16/bf16  torch.ops.sq_kernels.scaled_mm: a_scale per token [M], w_scale per channel [N]
    int_mm_dq       torch._int_mm(a_q, w_q.T) -> int32, then (acc * a_scale[:, None]) * w_scale -> fp16,
                    unfused (only where _int_mm takes the shape: M > 16, K and N multiples of 8)
    bnb_int8        bitsandbytes LLM.int8() without outlier decomposition (threshold 0): its
                    int8_scaled_mm op = cuBLASLt int8 GEMM + its own dequantization kernel (when installed)
    torchao         --torchao: torchao Int8DynamicActivationInt8WeightConfig on an nn.Linear, compiled;
                    this one also quantizes the fp16 activations inside the timed call

Timing (benchmarks/_timing.py): CUDA events, warm-up, median; inputs rotated over enough copies
(weights included) that one call's operands are not left in L2 by the previous call. The number of
timed calls adapts to the call's cost (more for short calls, at least 5 for the longest). Eager by
default; --graph times replays of a CUDA graph holding one call (the gap between two graph launches
is in every sample); --back-to-back replays one graph holding all the rotated calls and divides by their
number, as a serving engine's captured decode step runs them: the fairest view of decode-size GEMMs.
Results: <out>/<name>.{json,csv,png,md} with device, date and commit; the .md checks the targets of
issue 3 (speedups are over cuBLAS FP16 in the same run).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import copies_for, environment, format_table, time_cuda, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# Real layer shapes (N x K) of the linears, in the fused form a serving engine runs (qkv, gate_up).
MODELS: dict[str, list[tuple[str, int, int]]] = {
    "Llama-2-7B": [("qkv", 12288, 4096), ("o", 4096, 4096), ("gate_up", 22016, 4096), ("down", 4096, 11008)],
    "Llama-2-13B": [("qkv", 15360, 5120), ("o", 5120, 5120), ("gate_up", 27648, 5120), ("down", 5120, 13824)],
    "Llama-2-70B": [("qkv", 10240, 8192), ("o", 8192, 8192), ("gate_up", 57344, 8192), ("down", 8192, 28672)],
    "OPT-13B": [("qkv", 15360, 5120), ("out", 5120, 5120), ("fc1", 20480, 5120), ("fc2", 5120, 20480)],
    "OPT-30B": [("qkv", 21504, 7168), ("out", 7168, 7168), ("fc1", 28672, 7168), ("fc2", 7168, 28672)],
    "OPT-66B": [("qkv", 27648, 9216), ("out", 9216, 9216), ("fc1", 36864, 9216), ("fc2", 9216, 36864)],
    "BLOOM-176B": [("qkv", 43008, 14336), ("dense", 14336, 14336), ("h_to_4h", 57344, 14336),
                   ("4h_to_h", 14336, 57344)],
    "square": [("8192^3", 8192, 8192)],
}
M_ALL = [1, 16, 64, 256, 1024, 4096, 8192]
SQUARE_M = [8192]  # the square shape is the 8192^3 TOPS target, one point
QUICK_SHAPES = [("Llama-2-7B", "qkv"), ("Llama-2-7B", "down"), ("Llama-2-13B", "gate_up"), ("square", "8192^3")]
QUICK_M = [1, 16, 256, 4096]
METHODS = ["fp16", "bf16", "ours_fp16", "ours_bf16", "int_mm_dq", "bnb_int8", "torchao"]
PEERS = ("int_mm_dq", "bnb_int8", "torchao")

TARGET_CALL_S = 0.05  # timed seconds per measurement: iterations = this / one call's time, clamped
MIN_ITERS, MAX_ITERS = 5, 200


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 shapes x M {1,16,256,4096} + 8192^3 (< 1 min)")
    ap.add_argument("--models", default="", help="comma-separated model names to keep (default: all); "
                    f"known: {', '.join(MODELS)}")
    ap.add_argument("--shapes", default="", help="comma-separated layer names (qkv, o, fc1, ...) or NxK shapes to keep")
    ap.add_argument("--m", default="", help="comma-separated M values (default: 1,16,64,256,1024,4096,8192)")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays (no Python/launch overhead)")
    ap.add_argument("--back-to-back", action="store_true",
                    help="capture the rotated calls one after another in one CUDA graph and report a replay's time "
                         "per call: no graph-launch latency in the sample, as in a serving engine's captured decode "
                         "step (implies --graph)")
    ap.add_argument("--torchao", action="store_true", help="also time torchao int8 dynamic W8A8 (compiles per shape)")
    ap.add_argument("--no-peers", action="store_true", help="only cuBLAS FP16/BF16 and ours")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="after this many seconds the peers (int_mm_dq, bnb_int8, torchao) are skipped for the "
                         "remaining points, and the summary says where (default 330)")
    ap.add_argument("--out", default=str(RESULTS), help="output directory (default benchmarks/results)")
    ap.add_argument("--name", default="", help="file stem (default gemm, gemm_quick with --quick, +_graph with --graph, "
                    "+_b2b with --back-to-back)")
    ap.add_argument("--list", action="store_true", help="print the planned points and exit (no GPU needed)")
    args = ap.parse_args(argv)
    args.graph = args.graph or args.back_to_back
    return args


def timing_mode(args) -> str:
    return "b2b" if args.back_to_back else "graph" if args.graph else "eager"


TIMING_TITLE = {"eager": "eager", "graph": "CUDA graphs", "b2b": "CUDA graphs, calls back to back"}
TIMING_NOTE = {
    "eager": "Timing: eager calls (Python and launch overhead included), median over rotated input sets.",
    "graph": "Timing: each sample is one replay of a CUDA graph holding one call (replays queued behind a spinning "
             "kernel, so host latency is not in the samples; the GPU-side gap between graphs is).",
    "b2b": "Timing: each sample is one replay of a CUDA graph holding all the rotated calls back to back, divided "
           "by their number (a serving engine's captured decode step): no graph-launch latency per call, inputs "
           "still evicted from L2 by the other sets.",
}


def plan(args) -> list[tuple[str, str, int, int, list[int]]]:
    """[(model, layer, N, K, [M...])] selected by the flags."""
    models = [s.strip() for s in args.models.split(",") if s.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    shape_filter = [s.strip().lower() for s in args.shapes.split(",") if s.strip()]
    ms = [int(v) for v in args.m.split(",") if v.strip()] if args.m else None
    if ms is not None and any(m < 1 for m in ms):
        raise SystemExit("--m values must be positive")
    points = []
    for model, layers in MODELS.items():
        for layer, n, k in layers:
            if args.quick and (model, layer) not in QUICK_SHAPES:
                continue
            if models and model not in models:
                continue
            if shape_filter and not any(f in (layer.lower(), f"{n}x{k}", f"{n}x{k}".lower()) for f in shape_filter):
                continue
            m_list = ms or (SQUARE_M if model == "square" else (QUICK_M if args.quick else M_ALL))
            points.append((model, layer, n, k, list(m_list)))
    if not points:
        raise SystemExit("no shapes selected")
    return points


# ----------------------------------------------------------------------------------------------
# Peers
# ----------------------------------------------------------------------------------------------
def load_bnb():
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes.*)
        return torch.ops.bitsandbytes.int8_scaled_mm.default, f"bitsandbytes {bitsandbytes.__version__}"
    except Exception as exc:  # noqa: BLE001  (absent, or present without a usable CUDA library)
        return None, f"bitsandbytes unavailable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def torchao_linear(n: int, k: int):
    """A compiled nn.Linear(k, n) in fp16 quantized by torchao's int8 dynamic W8A8 config."""
    from torchao.quantization import quantize_
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Config
        config = Config()
    except ImportError:  # older torchao
        from torchao.quantization import int8_dynamic_activation_int8_weight
        config = int8_dynamic_activation_int8_weight()
    lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
    quantize_(lin, config)
    return torch.compile(lin)


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def measure(fn, sets, mode: str) -> float:
    """Median microseconds of fn over the rotated argument sets; iterations scaled to the call's cost."""
    fn(*sets[0])  # first call: lazy initialisation, autotuning, allocator growth
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for args in sets[:2]:
        fn(*args)
    end.record()
    torch.cuda.synchronize()
    per_call = start.elapsed_time(end) / 1e3 / min(2, len(sets))
    iters = int(min(MAX_ITERS, max(MIN_ITERS, TARGET_CALL_S / max(per_call, 1e-6))))
    warmup = min(10, max(2, iters // 5))
    return time_cuda(fn, sets, warmup=warmup, iters=iters, graph=mode != "eager", back_to_back=mode == "b2b")


def sanity_check(out: torch.Tensor, a_q, w_f32, a_scale, w_scale) -> str:
    """ours vs a float32 product of the same integers on a few rows: catches timing a broken kernel."""
    m = a_q.shape[0]
    rows = sorted(set(list(range(min(m, 8))) + list(range(max(0, m - 8), m))))
    idx = torch.tensor(rows, device=a_q.device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = (a_q[idx].float() @ w_f32.t()) * a_scale[idx, None] * w_scale[None, :]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    err = (out[idx].float() - ref).abs().max().item()
    scale = ref.abs().max().item()
    return "ok" if math.isfinite(err) and err <= 1e-2 * scale + 1e-3 else f"FAIL(err {err:.3g} of {scale:.3g})"


def bench_shape(model, layer, n, k, ms, args, ours, bnb_op, deadline, notes) -> list[dict]:
    dev = "cuda"
    mode = timing_mode(args)
    rows = []
    w_bytes16 = n * k * 2
    n_w16 = copies_for(w_bytes16)  # weight copies: at small M the weight is the working set
    n_w8 = copies_for(w_bytes16 // 2)
    w16 = [torch.randn(n, k, device=dev, dtype=torch.float16) * 0.02 for _ in range(n_w16)]
    wbf = [w.to(torch.bfloat16) for w in w16]
    w8 = [torch.randint(-128, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(n_w8)]
    w_scale = [torch.rand(n, device=dev) * 1e-3 + 1e-4 for _ in range(n_w8)]
    w8_f32 = w8[0].float() if ours else None
    ao = None
    if args.torchao and not args.no_peers:
        try:
            ao = torchao_linear(n, k)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"torchao unavailable for {n}x{k}: {type(exc).__name__}: {exc}")
    for m in ms:
        row = {"model": model, "layer": layer, "N": n, "K": k, "M": m}
        sets16 = copies_for(m * k * 2 + w_bytes16 + m * n * 2)
        sets8 = copies_for(m * k + w_bytes16 // 2 + m * n * 2)
        a16 = [torch.randn(m, k, device=dev, dtype=torch.float16) for _ in range(sets16)]
        abf = [a.to(torch.bfloat16) for a in a16]
        a8 = [torch.randint(-128, 128, (m, k), device=dev, dtype=torch.int8) for _ in range(sets8)]
        a_scale = [torch.rand(m, device=dev) * 1e-2 + 1e-3 for _ in range(sets8)]
        fp16_sets = [(a16[i], w16[i % n_w16]) for i in range(sets16)]
        bf16_sets = [(abf[i], wbf[i % n_w16]) for i in range(sets16)]
        int8_sets = [(a8[i], w8[i % n_w8], a_scale[i], w_scale[i % n_w8]) for i in range(sets8)]

        row["fp16_us"] = measure(F.linear, fp16_sets, mode)
        row["bf16_us"] = measure(F.linear, bf16_sets, mode)
        if ours:
            for dtype, key in ((torch.float16, "ours_fp16_us"), (torch.bfloat16, "ours_bf16_us")):
                row[key] = measure(lambda a, w, sa, sw, dt=dtype: ours(a, w, sa, sw, None, dt, None, False),
                                   int8_sets, mode)
            out = ours(a8[0], w8[0], a_scale[0], w_scale[0], None, torch.float16, None, False)
            row["check"] = sanity_check(out, a8[0], w8_f32, a_scale[0], w_scale[0])
            if row["check"] != "ok":
                print(f"WARNING: sq_kernels scaled_mm is wrong at {model} {layer} M={m}: {row['check']}", flush=True)
            del out
        over_budget = time.monotonic() > deadline
        if not args.no_peers and over_budget:
            row["skipped"] = "peers: time budget"
        elif not args.no_peers:
            if m > 16 and k % 8 == 0 and n % 8 == 0:
                def int_mm_dq(a, w, sa, sw):
                    return (torch._int_mm(a, w.t()) * sa[:, None]).mul_(sw).to(torch.float16)
                row["int_mm_dq_us"] = try_measure(int_mm_dq, int8_sets, mode, "int_mm_dq", notes, model, layer, m)
            if bnb_op is not None:
                bnb_sets = [(a, w, sa * 127.0, sw * 127.0) for a, w, sa, sw in int8_sets]  # bnb takes absmax stats
                row["bnb_int8_us"] = try_measure(lambda a, w, ra, ca: bnb_op(a, w, ra, ca, None, torch.float16),
                                                 bnb_sets, mode, "bnb_int8", notes, model, layer, m)
            if ao is not None:
                row["torchao_us"] = try_measure(lambda a, w: ao(a), fp16_sets, mode, "torchao", notes,
                                                model, layer, m)
        rows.append(finish_row(row, m, n, k))
        del a16, abf, a8, a_scale, fp16_sets, bf16_sets, int8_sets
    return rows


def try_measure(fn, sets, mode, name, notes, model, layer, m):
    try:
        return measure(fn, sets, mode)
    except Exception as exc:  # noqa: BLE001  (a peer that rejects a shape or cannot be captured)
        torch.cuda.synchronize()
        notes.append(f"{name} failed at {model} {layer} M={m}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return None


def finish_row(row: dict, m: int, n: int, k: int) -> dict:
    """Fill TOPS and speedups; every row gets every key (CSV columns)."""
    ops = 2.0 * m * n * k
    out = {key: row[key] for key in ("model", "layer", "N", "K", "M")}
    for meth in METHODS:
        t = row.get(f"{meth}_us")
        out[f"{meth}_us"] = round(t, 2) if t else ""
        out[f"{meth}_tops"] = round(ops / t / 1e6, 1) if t else ""
        out[f"{meth}_x_fp16"] = round(row["fp16_us"] / t, 3) if t and row.get("fp16_us") else ""
    t_bf = row.get("ours_bf16_us")
    out["ours_bf16_x_bf16"] = round(row["bf16_us"] / t_bf, 3) if t_bf and row.get("bf16_us") else ""
    out["check"] = row.get("check", "")
    out["skipped"] = row.get("skipped", "")
    return out


# ----------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------
def geomean(xs):
    xs = [x for x in xs if isinstance(x, float) and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def print_table(rows):
    cols = ["model", "layer", "N", "K", "M", "fp16_us", "bf16_us", "ours_fp16_us", "ours_bf16_us", "int_mm_dq_us",
            "bnb_int8_us", "ours_fp16_tops", "ours_fp16_x_fp16", "ours_bf16_x_bf16", "int_mm_dq_x_fp16",
            "bnb_int8_x_fp16", "check"]
    if any(r.get("torchao_us") for r in rows):
        cols[11:11] = ["torchao_us"]
        cols.append("torchao_x_fp16")
    short = {c: c.replace("_us", " us").replace("_x_fp16", " x16").replace("_x_bf16", " xbf16")
             .replace("_tops", " TOPS") for c in cols}
    print(format_table([{short[c]: r.get(c, "") for c in cols} for r in rows], [short[c] for c in cols]), flush=True)


def targets(rows) -> list[str]:
    """The issue's targets, each with its measured value and MET / MISSED."""
    ours = [r for r in rows if r.get("ours_fp16_x_fp16") != ""]
    lines = []
    if not ours:
        return ["- ours was not measured (no sq_kernels CUDA extension): no target can be checked."]
    big = [r["ours_fp16_x_fp16"] for r in ours if r["M"] >= 2048 and r["model"] != "square"]
    if big:
        g = geomean(big)
        lines.append(f"- M >= 2048, geometric mean over {len(big)} (shape, M) points: **{g:.2f}x** over cuBLAS FP16 "
                     f"(target >= 1.9x): {'MET' if g >= 1.9 else 'MISSED'}"
                     f" (bf16: {geomean([r['ours_bf16_x_bf16'] for r in ours if r['M'] >= 2048 and r['ours_bf16_x_bf16'] != '' and r['model'] != 'square']):.2f}x over cuBLAS BF16)")
    sq = [r for r in ours if (r["M"], r["N"], r["K"]) == (8192, 8192, 8192)]
    if sq:
        r = sq[0]
        lines.append(f"- 8192x8192x8192: **{r['ours_fp16_tops']:.0f} TOPS** (target >= 1300): "
                     f"{'MET' if r['ours_fp16_tops'] >= 1300 else 'MISSED'}; {r['ours_fp16_x_fp16']:.2f}x over FP16 "
                     f"({r['fp16_tops']:.0f} TFLOP/s)")
    small = [r for r in ours if r["M"] <= 16]
    if small:
        xs = [r["ours_fp16_x_fp16"] for r in small]
        worst = min(small, key=lambda r: r["ours_fp16_x_fp16"])
        lines.append(f"- M <= 16: geometric mean **{geomean(xs):.2f}x**, minimum {worst['ours_fp16_x_fp16']:.2f}x "
                     f"({worst['model']} {worst['layer']} M={worst['M']}) over cuBLAS FP16 (target >= 2.0x): "
                     f"{'MET' if min(xs) >= 2.0 else ('MET on the mean, not at every point' if geomean(xs) >= 2.0 else 'MISSED')}")
    slower = [r for r in ours if r["ours_fp16_x_fp16"] < 1.0]
    if slower:
        pts = ", ".join(f"{r['model']} {r['layer']} M={r['M']} ({r['ours_fp16_x_fp16']:.2f}x)" for r in slower)
        lines.append(f"- Never slower than FP16: MISSED at {len(slower)} point(s): {pts}")
    else:
        lines.append(f"- Never slower than FP16: MET (minimum {min(r['ours_fp16_x_fp16'] for r in ours):.2f}x "
                     f"over {len(ours)} points)")
    bad = [r for r in ours if r.get("check") != "ok"]
    if bad:
        lines.append(f"- CORRECTNESS: the sanity check failed at {len(bad)} point(s): the times above are not valid")
    return lines


def write_markdown(path: Path, rows, meta, notes):
    ms = sorted({r["M"] for r in rows})
    mode = meta.get("timing", "graph" if meta["graph"] else "eager")
    lines = [f"# INT8 GEMM benchmark ({TIMING_TITLE[mode]})", "",
             f"Device: {meta.get('device', '?')} ({meta.get('sms', '?')} SMs, compute capability "
             f"{meta.get('capability', '?')}); "
             f"date: {meta['date']}; commit: {meta['commit']}; torch {meta['torch']} (CUDA {meta['cuda']}).",
             f"Command: `{meta['command']}`; wall time {meta['wall_s']:.0f} s.", "",
             "Ours = `sq_kernels::scaled_mm` (int8 x int8, per-token a_scale x per-channel w_scale, fused "
             "dequantization, fp16 or bf16 out). Speedups are cuBLAS FP16 time / method time, same run; "
             "ours bf16 is compared with cuBLAS BF16. Full data: the .csv/.json beside this file.", "",
             TIMING_NOTE[mode], "",
             "## Targets (issue 3)", ""] + targets(rows) + ["", "## Geometric-mean speedup over cuBLAS FP16, by M", ""]
    methods = [("ours_fp16_x_fp16", "ours fp16"), ("ours_bf16_x_bf16", "ours bf16 (vs BF16)"),
               ("int_mm_dq_x_fp16", "_int_mm + dequant"), ("bnb_int8_x_fp16", "bitsandbytes int8"),
               ("torchao_x_fp16", "torchao W8A8")]
    methods = [(k, name) for k, name in methods if any(r.get(k) != "" for r in rows)]
    lines += ["| M | " + " | ".join(name for _, name in methods) + " |",
              "|---|" + "---|" * len(methods)]
    for m in ms:
        cells = []
        for key, _ in methods:
            xs = [r[key] for r in rows if r["M"] == m and r.get(key) != ""]
            cells.append(f"{geomean(xs):.2f}" if xs else "n/a")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if any(r.get("ours_fp16_x_fp16") != "" for r in rows):
        lines += ["", "## Ours (fp16 out) over cuBLAS FP16, per shape", "",
                  "| model | layer | N x K | " + " | ".join(f"M={m}" for m in ms) + " |",
                  "|---|---|---|" + "---|" * len(ms)]
        seen = []
        for r in rows:
            key = (r["model"], r["layer"], r["N"], r["K"])
            if key not in seen:
                seen.append(key)
        for model, layer, n, k in seen:
            cells = []
            for m in ms:
                hit = [r for r in rows if (r["model"], r["layer"], r["M"]) == (model, layer, m)]
                cells.append(f"{hit[0]['ours_fp16_x_fp16']:.2f} ({hit[0]['ours_fp16_us']:.0f} us)"
                             if hit and hit[0]["ours_fp16_x_fp16"] != "" else "")
            lines.append(f"| {model} | {layer} | {n}x{k} | " + " | ".join(cells) + " |")
    lines += ["", "## Notes", "",
              "- `_int_mm + dequant`: cuBLAS int32 GEMM then `(acc * a_scale[:, None]) * w_scale -> fp16` (three "
              "kernels); `torch._int_mm` rejects M <= 16, so those cells are empty.",
              "- bitsandbytes: `int8_scaled_mm` (LLM.int8() with threshold 0, i.e. no outlier columns): cuBLASLt "
              "int8 GEMM + its dequantization kernel, on the same pre-quantized operands."]
    lines += [f"- {n}" for n in notes]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no plot ({exc})"
    groups = list(dict.fromkeys(r["model"] for r in rows))
    cols = min(4, len(groups))
    nrows = -(-len(groups) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    for ax, model in zip(axes.flat, groups):
        rs = [r for r in rows if r["model"] == model]
        for layer in dict.fromkeys(r["layer"] for r in rs):
            pts = [(r["M"], r["ours_fp16_x_fp16"]) for r in rs if r["layer"] == layer and r["ours_fp16_x_fp16"] != ""]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"ours {layer}")
        for key, style, name in (("ours_bf16_x_bf16", "-", "ours bf16 vs BF16"), ("int_mm_dq_x_fp16", "--", "int_mm+dq"),
                                 ("bnb_int8_x_fp16", ":", "bnb int8"), ("torchao_x_fp16", "-.", "torchao")):
            by_m = {}
            for r in rs:
                if r.get(key) != "":
                    by_m.setdefault(r["M"], []).append(r[key])
            if by_m:
                ms = sorted(by_m)
                ax.plot(ms, [geomean(by_m[m]) for m in ms], style, color="gray", lw=1.0 if key.startswith("ours")
                        else 1.5, label=f"{name} (geomean)")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(2.0, color="green", lw=0.6, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_title(model)
        ax.set_xlabel("M (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel("speedup over cuBLAS FP16")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    points = plan(args)
    if args.list:
        for model, layer, n, k, ms in points:
            print(f"{model:12s} {layer:8s} N={n:6d} K={k:6d} M={ms}")
        return 0
    if not torch.cuda.is_available():
        print("bench_gemm needs a CUDA GPU (use --list to see the plan without one)", file=sys.stderr)
        return 2
    import sq_kernels
    ours = None
    notes = []
    if sq_kernels.has_cuda_kernels() and torch._C._dispatch_has_kernel_for_dispatch_key("sq_kernels::scaled_mm", "CUDA"):
        ours = torch.ops.sq_kernels.scaled_mm.default
    else:
        notes.append(f"ours NOT measured: the sq_kernels CUDA extension is missing ({sq_kernels.extension_error()})")
        print("WARNING: " + notes[-1], flush=True)
    bnb_op, bnb_note = (None, "peers disabled") if args.no_peers else load_bnb()
    if bnb_op is None and not args.no_peers:
        notes.append(bnb_note)
    name = args.name or ("gemm_quick" if args.quick else "gemm") + {"eager": "", "graph": "_graph", "b2b": "_b2b"}[timing_mode(args)]
    out_dir = Path(args.out)
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    rows = []
    for model, layer, n, k, ms in points:
        shape_rows = bench_shape(model, layer, n, k, ms, args, ours, bnb_op, deadline, notes)
        rows += shape_rows
        print_table(shape_rows)
        torch.cuda.empty_cache()
    skipped = [f"{r['model']} {r['layer']} M={r['M']}" for r in rows if r["skipped"]]
    if skipped:
        notes.append(f"time budget ({args.budget_s:.0f} s) reached: peers skipped at {', '.join(skipped)}")
    meta = environment()
    meta.update(graph=args.graph, timing=timing_mode(args), command="python benchmarks/bench_gemm.py " + " ".join(argv or sys.argv[1:]),
                wall_s=time.monotonic() - t0, peers={"bitsandbytes": bnb_note}, methods=METHODS)
    print("\nall points:")
    print_table(rows)
    write_results(out_dir / name, rows, meta)
    write_markdown((out_dir / name).with_suffix(".md"), rows, meta, notes)
    png = plot((out_dir / name).with_suffix(".png"), rows)
    print("\n" + "\n".join(targets(rows)))
    for n in notes:
        print("note:", n)
    print(f"\nwrote {out_dir / name}.{{json,csv,md}} and {png}; {meta['wall_s']:.0f} s")
    return 1 if any(r["check"] not in ("ok", "") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
