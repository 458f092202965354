// Torch entry points of the INT8 GEMM: argument checks, then a kernel chosen by architecture and M.
//   sq_kernels::scaled_mm  (schema in sq_kernels/ops/gemm.py)   -> fp16 / bf16 / int8 output
//   sq_kernels::int8_mm                                          -> int32 output
//   _sq_kernels_C::scaled_mm_path(..., int path)                 -> the same with a forced kernel
//                                                                   (tests and benchmarks; see GemmPath)
// Dispatch under GemmPath::kAuto:
//   sm_90, M <= 8     small-M kernel (common/): decode is a stream over the weight
//   sm_90, M > 8      CUTLASS 3.x wgmma kernels (sm90/dispatch.cu picks the tile by M and size)
//   sm_8x, M <= 32    small-M kernel
//   sm_8x, M > 32     CUTLASS 2.x kernels (sm80/dispatch.cu)
#include <torch/library.h>

#include "checks.h"
#include "gemm.h"

namespace sqk {
namespace {

void check_operand(const char* op, const char* arg, const at::Tensor& t, const char* shape) {
  check_cuda(op, arg, t);
  check_dtype(op, arg, t, at::kChar);
  check_dim(op, arg, t, 2, shape);
  TORCH_CHECK_VALUE(t.numel() == 0 || t.stride(1) == 1, op, ": ", arg,
                    " must be row-major with contiguous K (stride(1) == 1), got strides ", t.strides());
  TORCH_CHECK_VALUE(t.numel() == 0 || t.size(0) <= 1 || (t.stride(0) % 16 == 0 && t.stride(0) >= t.size(1)), op,
                    ": ", arg, "'s row stride ", t.stride(0), " must be a multiple of 16 and at least K = ", t.size(1),
                    " (rows may not overlap)");
  check_aligned(op, arg, t, 16);
}

void check_vector(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref, int64_t len,
                  bool allow_scalar) {
  check_same_device(op, arg, t, ref);
  check_dtype(op, arg, t, at::kFloat);
  const bool scalar = allow_scalar && t.numel() == 1;
  TORCH_CHECK_VALUE(scalar || (t.dim() == 1 && t.numel() == len), op, ": ", arg, " must have ",
                    allow_scalar ? "1 element or " : "", "shape [", len, "], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.numel() <= 1 || t.stride(0) == 1, op, ": ", arg, " must be contiguous");
}

OutType out_type_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return OutType::kFloat16;
    case at::kBFloat16: return OutType::kBFloat16;
    case at::kChar: return OutType::kInt8;
    case at::kInt: return OutType::kInt32;
    default: TORCH_CHECK_VALUE(false, "scaled_mm: out_dtype must be float16, bfloat16 or int8, got ", t);
  }
  return OutType::kFloat16;
}

std::string built_families() {
  std::string s;
#ifdef SQK_HAS_SM80
  s += " sm80-family";
#endif
#ifdef SQK_HAS_SM90
  s += " sm90a";
#endif
  return s.empty() ? " (none)" : s;
}

at::Tensor run_gemm(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& a_scale,
                    const c10::optional<at::Tensor>& w_scale, const c10::optional<at::Tensor>& bias,
                    at::ScalarType out_dtype, const c10::optional<at::Tensor>& out_scale, bool relu, GemmPath path,
                    const char* op) {
  check_operand(op, "a", a, "[M, K]");
  check_operand(op, "w", w, "[N, K] (the nn.Linear layout)");
  check_same_device(op, "w", w, a);
  const int64_t m = a.size(0), k = a.size(1), n = w.size(0);
  TORCH_CHECK_VALUE(w.size(1) == k, op, ": a is [M, K] = ", a.sizes(), " and w is [N, K] = ", w.sizes(),
                    ": K differs");
  TORCH_CHECK_VALUE(k > 0, op, ": K must be positive, got K = 0");
  TORCH_CHECK_VALUE(k % 16 == 0, op, ": K = ", k, " must be a multiple of 16 (16-byte rows); pad the input features");
  TORCH_CHECK_VALUE(k <= 131071, op, ": K = ", k,
                    " is too large: the int32 accumulator can overflow beyond K = 131071");
  TORCH_CHECK_VALUE(n % 16 == 0, op, ": N = ", n, " must be a multiple of 16; pad the output features");
  TORCH_CHECK_VALUE(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, op, ": sizes must fit in int32");
  const OutType out_type = out_type_of(out_dtype);
  const bool scaled = out_type != OutType::kInt32;
  if (scaled) {
    TORCH_CHECK_VALUE(a_scale.has_value() && w_scale.has_value(), op, ": a_scale and w_scale are required");
    check_vector(op, "a_scale", *a_scale, a, m, true);
    check_vector(op, "w_scale", *w_scale, a, n, true);
    if (bias.has_value()) check_vector(op, "bias", *bias, a, n, false);
    if (out_type == OutType::kInt8) {
      TORCH_CHECK_VALUE(out_scale.has_value(), op, ": out_dtype=int8 needs out_scale (a 1-element float32 tensor)");
      check_vector(op, "out_scale", *out_scale, a, 1, true);
    } else {
      TORCH_CHECK_VALUE(!out_scale.has_value(), op,
                        ": out_scale is only meaningful with out_dtype=torch.int8, got out_dtype=", out_dtype);
    }
  }

  at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;

  const c10::cuda::CUDAGuard guard(a.device());
  const int sm = sm_version(a);
  TORCH_CHECK(sm >= 80, op, ": this GPU is sm_", sm, "; sq_kernels needs an sm_80 or newer GPU (A100, L40, H100)");

  ScaledMMParams p;
  p.a = a.data_ptr<int8_t>();
  p.w = w.data_ptr<int8_t>();
  p.out = out.data_ptr();
  p.m = m;
  p.n = n;
  p.k = k;
  p.lda = a.size(0) > 1 ? a.stride(0) : k;
  p.ldw = w.size(0) > 1 ? w.stride(0) : k;
  p.ldo = n;
  p.relu = relu;
  p.out_type = out_type;
  p.sm_count = sm_count(a);
  p.stream = current_stream(a);
  at::Tensor a_scale_v, w_scale_v;  // keep expanded scales alive for the sm80 path
  if (scaled) {
    a_scale_v = *a_scale;
    w_scale_v = *w_scale;
    p.a_per_token = a_scale_v.numel() != 1;
    p.w_per_channel = w_scale_v.numel() != 1;
    p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    p.out_scale = out_type == OutType::kInt8 ? out_scale->data_ptr<float>() : nullptr;
  }

  if (path == GemmPath::kAuto) {
    if (m <= (sm == 90 ? kSmallMAutoSm90 : kSmallMAutoSm80)) {
      path = GemmPath::kSmallM;
    } else if (sm == 90) {
#ifdef SQK_HAS_SM90
      path = GemmPath::kAuto;  // sm90_gemm picks the tile
#else
      path = GemmPath::kSm80;
#endif
    } else {
      path = GemmPath::kSm80;
    }
  }

  const char* err = nullptr;
  if (path == GemmPath::kSmallM || path == GemmPath::kSmallMUnroll2) {
    TORCH_CHECK_VALUE(m <= kSmallMMax, op, ": the small-M kernel takes M <= ", kSmallMMax, ", got M = ", m);
    if (scaled) {
      p.a_scale = a_scale_v.data_ptr<float>();
      p.w_scale = w_scale_v.data_ptr<float>();
    }
    err = small_m_gemm(p, path == GemmPath::kSmallMUnroll2 ? 2 : 4);
  } else if (path == GemmPath::kSm80) {
#ifdef SQK_HAS_SM80
    TORCH_CHECK(sm >= 80 && sm <= 90, op, ": the CUTLASS 2.x path runs on sm_80..sm_90, this GPU is sm_", sm);
    if (scaled) {  // the Sm80 broadcast visitors read vectors: expand per-tensor scales
      if (a_scale_v.numel() == 1) a_scale_v = a_scale_v.reshape({1}).expand({m}).contiguous();
      if (w_scale_v.numel() == 1) w_scale_v = w_scale_v.reshape({1}).expand({n}).contiguous();
      p.a_scale = a_scale_v.data_ptr<float>();
      p.w_scale = w_scale_v.data_ptr<float>();
      p.a_per_token = p.w_per_channel = true;
    }
    err = sm80_gemm(p);
#else
    TORCH_CHECK(false, op, ": the CUTLASS 2.x (sm80) kernels were not built; built:", built_families(),
                ". Rebuild with SQ_KERNELS_CUDA_ARCHS including 8.0");
#endif
  } else {
#ifdef SQK_HAS_SM90
    TORCH_CHECK(sm == 90, op, ": the sm90 kernels need an sm_90 GPU (H100/H200), this GPU is sm_", sm);
    if (scaled) {
      p.a_scale = a_scale_v.data_ptr<float>();
      p.w_scale = w_scale_v.data_ptr<float>();
    }
    err = sm90_gemm(p, path);
#else
    TORCH_CHECK(false, op, ": the sm90a kernels were not built; built:", built_families(),
                ". Rebuild with SQ_KERNELS_CUDA_ARCHS including 9.0a");
#endif
  }
  TORCH_CHECK(err == nullptr, op, ": ", err);
  return out;
}

at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& w, const at::Tensor& a_scale, const at::Tensor& w_scale,
                     const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                     const c10::optional<at::Tensor>& out_scale, bool relu) {
  TORCH_CHECK_VALUE(out_dtype != at::kInt, "scaled_mm: out_dtype must be float16, bfloat16 or int8 (int32: int8_mm)");
  return run_gemm(a, w, a_scale, w_scale, bias, out_dtype, out_scale, relu, GemmPath::kAuto, "scaled_mm");
}

at::Tensor int8_mm(const at::Tensor& a, const at::Tensor& w) {
  return run_gemm(a, w, c10::nullopt, c10::nullopt, c10::nullopt, at::kInt, c10::nullopt, false, GemmPath::kAuto,
                  "int8_mm");
}

at::Tensor scaled_mm_path(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& a_scale,
                          const c10::optional<at::Tensor>& w_scale, const c10::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype, const c10::optional<at::Tensor>& out_scale, bool relu,
                          int64_t path) {
  TORCH_CHECK_VALUE(path >= 0 && path <= static_cast<int64_t>(GemmPath::kSmallMUnroll2),
                    "scaled_mm_path: path must be 0..6");
  return run_gemm(a, w, a_scale, w_scale, bias, out_dtype, out_scale, relu, static_cast<GemmPath>(path),
                  "scaled_mm_path");
}

}  // namespace
}  // namespace sqk

TORCH_LIBRARY_IMPL(sq_kernels, CUDA, m) {
  m.impl("scaled_mm", &sqk::scaled_mm);
  m.impl("int8_mm", &sqk::int8_mm);
}

// Kernel-selection hook for tests and benchmarks: path = 0 auto, 1 small-M, 2/3/4 sm90 tiles 64/128/256, 5 sm80.
TORCH_LIBRARY(_sq_kernels_C, m) {
  m.def("scaled_mm_path(Tensor a, Tensor w, Tensor? a_scale, Tensor? w_scale, Tensor? bias, ScalarType out_dtype, "
        "Tensor? out_scale, bool relu, int path) -> Tensor");
  m.impl("scaled_mm_path", c10::DispatchKey::CUDA, TORCH_FN(sqk::scaled_mm_path));
}
