"""Run every INT8 GEMM kernel path on a few shapes: correctness against the reference and speed
against cuBLAS FP16, side by side. A tuning aid for the dispatch tables (csrc/kernels/*/dispatch.cu);
the benchmark of record is benchmarks/bench_gemm.py.

    python tools/gemm_paths.py [--m 1,16,32,64,128,256,1024,4096] [--shapes 12288x4096,4096x4096]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _timing import copies_for, time_cuda  # noqa: E402

import sq_kernels  # noqa: E402
from sq_kernels.ops.gemm import _scaled_mm_reference  # noqa: E402

PATHS = {"auto": 0, "small_m": 1, "small_u2": 6, "sm90_64": 2, "sm90_128": 3, "sm90_256": 4, "sm80": 5}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="1,16,32,64,128,256,1024,4096")
    ap.add_argument("--shapes", default="12288x4096,4096x4096,4096x11008")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays (no launch overhead)")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not sq_kernels.has_cuda_kernels():
        sys.exit(f"needs a GPU and the extension ({sq_kernels.extension_error()})")
    cap = torch.cuda.get_device_capability()
    paths = {k: v for k, v in PATHS.items() if not (k.startswith("sm90") and cap != (9, 0))}
    dev = "cuda"
    print(f"{'N x K':>12} {'M':>5} {'path':>9} {'us':>8} {'x fp16':>7} {'TOPS':>7} {'max err':>9}")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.m.split(",")):
            sets = copies_for(m * k + n * k + 2 * m * n)
            ins = []
            for _ in range(sets):
                a = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev)
                w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev)
                ins.append((a, w, torch.rand(m, device=dev) * 1e-3, torch.rand(n, device=dev) * 1e-3))
            fp = [(torch.randn(m, k, device=dev, dtype=torch.half), torch.randn(n, k, device=dev, dtype=torch.half))
                  for _ in range(sets)]
            t16 = time_cuda(lambda x, y: x @ y.t(), fp, iters=args.iters, graph=args.graph)
            a, w, sa, sw = ins[0]
            bias = torch.randn(n, device=dev)
            ref = _scaled_mm_reference(a.cpu(), w.cpu(), sa.cpu(), sw.cpu(), bias.cpu(), torch.float16, None, False)
            for name, path in paths.items():
                if name.startswith("small") and m > 32:
                    continue
                op = torch.ops._sq_kernels_C.scaled_mm_path
                try:
                    out = op(a, w, sa, sw, bias, torch.float16, None, False, path)
                    err = (out.float().cpu() - ref.float()).abs().max().item()
                    t = time_cuda(lambda a_, w_, sa_, sw_: op(a_, w_, sa_, sw_, None, torch.float16, None, False, path),
                                  ins, iters=args.iters, graph=args.graph)
                except RuntimeError as exc:
                    print(f"{shape:>12} {m:>5} {name:>9} failed: {str(exc).splitlines()[0]}")
                    continue
                print(f"{shape:>12} {m:>5} {name:>9} {t:8.1f} {t16 / t:7.2f} {2 * m * n * k / t / 1e6:7.0f} {err:9.2e}")


if __name__ == "__main__":
    main()
