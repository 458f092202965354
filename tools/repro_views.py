"""Run the exotic-view cases of the GEMM ops (tests/kernels/test_gemm_kernels.py) one by one,
printing each before the call, so that a crash names its case (run with python -X faulthandler).
    python tools/repro_views.py"""
import torch

import sq_kernels  # noqa: F401

k, n = 512, 272
for m in (5, 64, 300, 1500):
    big_a = torch.randint(-128, 128, (m + 1, k + 64), dtype=torch.int8, device="cuda")
    big_w = torch.randint(-128, 128, (n + 1, k + 32), dtype=torch.int8, device="cuda")
    sa, sw = torch.rand(m, device="cuda"), torch.rand(n, device="cuda")
    a_view, w_view = big_a[1:, 16:16 + k], big_w[1:, :k]
    cases = {"a misaligned": (big_a[1:, 1:1 + k], w_view), "w misaligned": (a_view, big_w[1:, 8:8 + k]),
             "a stride 0": (a_view[:1].expand(m, k), w_view),
             "a overlapping": (big_a.reshape(-1).as_strided((m, k), (16, 1)), w_view),
             "plain views": (a_view, w_view)}
    for name, (a, w) in cases.items():
        for which in ("scaled_mm", "int8_mm"):
            print(f"M={m} {name} {which} {tuple(a.shape)} {a.stride()} ...", end=" ", flush=True)
            try:
                if which == "scaled_mm":
                    torch.ops.sq_kernels.scaled_mm(a, w, sa, sw, None, torch.float16, None, False)
                else:
                    torch.ops.sq_kernels.int8_mm(a, w)
                torch.cuda.synchronize()
                print("ran", flush=True)
            except ValueError as exc:
                print("ValueError:", str(exc)[:90], flush=True)
