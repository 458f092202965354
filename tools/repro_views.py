"""Run one exotic-view case of the GEMM ops (tests/kernels/test_gemm_kernels.py) in isolation:
    python tools/repro_views.py <case 0-3> <m> <op: mm|i32>
Prints the outcome; a crash shows up as the process's exit status."""
import sys

import torch

import sq_kernels  # noqa: F401

case, m, which = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
k, n = 512, 272
big_a = torch.randint(-128, 128, (m + 1, k + 64), dtype=torch.int8, device="cuda")
big_w = torch.randint(-128, 128, (n + 1, k + 32), dtype=torch.int8, device="cuda")
sa, sw = torch.rand(m, device="cuda"), torch.rand(n, device="cuda")
a_view, w_view = big_a[1:, 16:16 + k], big_w[1:, :k]
a, w = [(big_a[1:, 1:1 + k], w_view), (a_view, big_w[1:, 8:8 + k]), (a_view[:1].expand(m, k), w_view),
        (big_a.reshape(-1).as_strided((m, k), (16, 1)), w_view)][case]
try:
    if which == "mm":
        torch.ops.sq_kernels.scaled_mm(a, w, sa, sw, None, torch.float16, None, False)
    else:
        torch.ops.sq_kernels.int8_mm(a, w)
    torch.cuda.synchronize()
    print(case, m, which, "ran")
except ValueError as exc:
    print(case, m, which, "ValueError:", str(exc)[:100])
