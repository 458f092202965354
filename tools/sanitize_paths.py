"""One small call per kernel path, each compared with the CPU reference: the script compute-sanitizer runs.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python tools/sanitize_paths.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --error-exitcode 1 \
        python tools/sanitize_paths.py [--only gemm,bmm]

Without the caching allocator every output is a fresh cudaMalloc, so the sanitizer sees each buffer's
real bounds, and a kernel that did not run (or left elements unwritten) fails the comparison with the
reference: a clean sanitizer report comes with proof that the kernel ran. Each case's inputs are built
on the CPU from a fixed seed; the CUDA call and the CPU call (the PyTorch reference of the same op) get
the same values. Prints one line per case; exits 1 if any case differs from its reference.

The cases: every forced GEMM path (small-M, small-M unroll 2, sm90 64/128/256 tiles, sm80) with fp16,
bf16, int8 and int32 outputs plus the automatic choice; the quantizers (per-token, per-tensor dynamic,
static, ReLU/GELU, silu*up) and the norms (RMS/Layer, with and without a residual, static and per-token)
at hidden sizes that reach each row-kernel variant (scalar, 1/2/4/8 vectors per thread, streaming); the
attention BMM paths (small-M, 64 and 128 tiles) with fp16, fp32, int8 and int32 outputs.
"""
from __future__ import annotations

import argparse
import sys

import torch

import sq_kernels
from sq_kernels import ops

GEMM_PATHS = {"small_m": 1, "small_m_u2": 6, "sm90_64": 2, "sm90_128": 3, "sm90_256": 4, "sm80": 5}
BMM_PATHS = {"small_m": 1, "tile64": 2, "tile128": 3}
NORM_H = [17, 1024, 4096, 8192, 14336, 40000]   # scalar path; then 1, 2, 4, 8 vectors per thread; streaming


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _i8(*shape, g):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def _f(*shape, g, dtype=torch.float16, scale=1.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _to(args, dev):
    return [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]


def _close(name: str, got: torch.Tensor, ref: torch.Tensor) -> str | None:
    """None when ``got`` (from CUDA) equals ``ref`` (the CPU reference) within the op's contract."""
    got = got.cpu()
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return f"{name}: got {got.dtype}{tuple(got.shape)}, reference {ref.dtype}{tuple(ref.shape)}"
    if ref.dtype == torch.int32:
        bad = int((got != ref).sum())
        return f"{name}: {bad} int32 elements differ" if bad else None
    if ref.dtype == torch.int8:
        diff = (got.to(torch.int32) - ref.to(torch.int32)).abs()
        # quantizers: a value on a rounding boundary may land one step away (fp32 order of operations)
        n_off, worst = int((diff > 0).sum()), int(diff.max()) if diff.numel() else 0
        if worst > 1 or n_off > max(1, ref.numel() // 1000):
            return f"{name}: int8 max diff {worst}, {n_off} of {ref.numel()} off"
        return None
    if not torch.isfinite(got).all() and torch.isfinite(ref).all():
        return f"{name}: non-finite values where the reference has none (unwritten elements?)"
    eps = torch.finfo(ref.dtype).eps
    g, r = got.float(), ref.float()
    tol = 4 * eps * (r.abs() + r.abs().max())
    bad = int(((g - r).abs() > tol).sum())
    return f"{name}: {bad} elements beyond 4 eps of the reference" if bad else None


def gemm_cases(sm: int, built: str):
    m_small, m_big, n, k = 5, 200, 272, 528   # M not a tile multiple; N, K multiples of 16, not of the tiles
    paths = {"small_m": 1, "small_m_u2": 6}
    if "sm90" in built and sm == 90:
        paths.update({"sm90_64": 2, "sm90_128": 3, "sm90_256": 4})
    if "sm80" in built and 80 <= sm <= 90:
        paths["sm80"] = 5
    for pname, path in [("auto", 0)] + list(paths.items()):
        for m in ([m_small, m_big] if path == 0 else [m_small if path in (1, 6) else m_big]):
            for out_dtype in (torch.float16, torch.bfloat16, torch.int8, torch.int32):
                g = _gen(m * 7 + path)
                a, w = _i8(m, k, g=g), _i8(n, k, g=g)
                if out_dtype == torch.int32:
                    ref_args = (a, w)
                    scales = (None, None, None, None)
                else:
                    per_token = out_dtype != torch.bfloat16   # bf16: the per-tensor x per-tensor broadcast
                    a_s = torch.rand(m if per_token else 1, generator=g) * 1e-3 + 1e-4
                    w_s = torch.rand(n if per_token else 1, generator=g) * 1e-3 + 1e-4
                    bias = None if out_dtype == torch.int8 else torch.randn(n, generator=g)
                    out_s = torch.tensor([0.05]) if out_dtype == torch.int8 else None
                    scales = (a_s, w_s, bias, out_s)
                    ref_args = (a, w, a_s, w_s, bias, out_dtype, out_s, out_dtype == torch.float16)  # relu on fp16
                relu = out_dtype == torch.float16

                def cuda_call(a=a, w=w, scales=scales, out_dtype=out_dtype, relu=relu, path=path):
                    a_s, w_s, bias, out_s = _to(scales, "cuda")
                    if path == 0:
                        if out_dtype == torch.int32:
                            return torch.ops.sq_kernels.int8_mm(a.cuda(), w.cuda())
                        return torch.ops.sq_kernels.scaled_mm(a.cuda(), w.cuda(), a_s, w_s, bias, out_dtype, out_s,
                                                              relu)
                    return torch.ops._sq_kernels_C.scaled_mm_path(a.cuda(), w.cuda(), a_s, w_s, bias, out_dtype,
                                                                  out_s, relu, path)

                def ref_call(ref_args=ref_args, out_dtype=out_dtype):
                    if out_dtype == torch.int32:
                        return torch.ops.sq_kernels.int8_mm(*ref_args)
                    return torch.ops.sq_kernels.scaled_mm(*ref_args)

                yield f"gemm {pname:10s} M={m:<4d} {str(out_dtype).replace('torch.', ''):8s}", cuda_call, ref_call


def quant_cases():
    for h in (17, 4096):
        g = _gen(h)
        x = _f(9, h, g=g, scale=3.0)
        gate, up = _f(9, h, g=g), _f(9, h, g=g)
        static = torch.tensor([0.03])
        calls = {
            "quantize_per_token": lambda d, x=x: ops.quantize_per_token(x.to(d)),
            "quantize_per_tensor dyn": lambda d, x=x: ops.quantize_per_tensor(x.to(d)),
            "quantize_per_tensor static": lambda d, x=x: ops.quantize_per_tensor(x.to(d), static.to(d)),
            "relu_quant": lambda d, x=x: ops.relu_quant(x.to(d)),
            "gelu_quant": lambda d, x=x: ops.gelu_quant(x.to(d)),
            "silu_mul_quant": lambda d, gate=gate, up=up: ops.silu_mul_quant(gate.to(d), up.to(d)),
            "silu_mul_quant static": lambda d, gate=gate, up=up: ops.silu_mul_quant(gate.to(d), up.to(d),
                                                                                    scale=static.to(d)),
        }
        for name, fn in calls.items():
            yield f"{name:26s} H={h}", (lambda fn=fn: fn("cuda")), (lambda fn=fn: fn("cpu"))


def norm_cases():
    for h in NORM_H:
        g = _gen(h + 1)
        x, res = _f(5, h, g=g), _f(5, h, g=g)
        w, b = _f(h, g=g), _f(h, g=g)
        static = torch.tensor([0.02])
        for kind in ("rms", "layer"):
            for residual in (None, res):
                for scale in (None, static):
                    def fn(d, kind=kind, residual=residual, scale=scale, x=x, w=w, b=b):
                        r = None if residual is None else residual.to(d)
                        s = None if scale is None else scale.to(d)
                        if kind == "rms":
                            return ops.rms_norm_quant(x.to(d), w.to(d), 1e-6, residual=r, scale=s)
                        return ops.layer_norm_quant(x.to(d), w.to(d), b.to(d), 1e-5, residual=r, scale=s)
                    name = (f"{kind}_norm_quant{'+res' if residual is not None else '':4s} "
                            f"{'static' if scale is not None else 'per-token':9s} H={h}")
                    yield name, (lambda fn=fn: fn("cuda")), (lambda fn=fn: fn("cpu"))


def bmm_cases():
    batch = 3
    for pname, path in BMM_PATHS.items():
        m, n, k = (7, 80, 128) if path == 1 else (100, 208, 80)
        for out_dtype in (torch.float16, torch.float32, torch.int8, torch.int32):
            g = _gen(path * 31 + m)
            a, b = _i8(batch, m, k, g=g), _i8(batch, n, k, g=g)
            alpha = torch.tensor([1e-3])
            out_s = torch.tensor([2.0]) if out_dtype == torch.int8 else None

            def cuda_call(a=a, b=b, out_dtype=out_dtype, out_s=out_s, path=path):
                al = None if out_dtype == torch.int32 else alpha.cuda()
                os_ = None if out_s is None else out_s.cuda()
                return torch.ops._sq_kernels_C.scaled_bmm_path(a.cuda(), b.cuda(), al, out_dtype, os_, path)

            def ref_call(a=a, b=b, out_dtype=out_dtype, out_s=out_s):
                if out_dtype == torch.int32:
                    return torch.ops.sq_kernels.int8_bmm(a, b)
                return torch.ops.sq_kernels.scaled_bmm(a, b, alpha, out_dtype, out_s)

            yield f"bmm {pname:8s} {str(out_dtype).replace('torch.', ''):8s}", cuda_call, ref_call


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="gemm,quant,norm,bmm", help="comma-separated families of cases")
    args = ap.parse_args()
    if not torch.cuda.is_available() or not sq_kernels.has_cuda_kernels():
        print(f"needs a CUDA GPU and the built extension: {sq_kernels.extension_error()}", file=sys.stderr)
        return 2
    cap = torch.cuda.get_device_capability()
    sm, built = cap[0] * 10 + cap[1], " ".join(sq_kernels.built_archs())
    families = {"gemm": lambda: gemm_cases(sm, built), "quant": quant_cases, "norm": norm_cases, "bmm": bmm_cases}
    failed = total = 0
    for fam in args.only.split(","):
        for name, cuda_call, ref_call in families[fam]():
            total += 1
            try:
                got, ref = cuda_call(), ref_call()
                torch.cuda.synchronize()
                got = got if isinstance(got, tuple) else (got,)
                ref = ref if isinstance(ref, tuple) else (ref,)
                errors = [e for i, (x, y) in enumerate(zip(got, ref)) if (e := _close(f"output {i}", x, y))]
            except Exception as exc:  # noqa: BLE001 - report every case, then fail
                errors = [f"{type(exc).__name__}: {exc}".splitlines()[0]]
            failed += bool(errors)
            print(f"{'FAIL' if errors else 'ok  '} {name}" + (f"  <- {'; '.join(errors)}" if errors else ""),
                  flush=True)
    print(f"{total - failed} of {total} cases match the reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
