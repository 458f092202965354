// Torch entry points of the INT8 attention BMM: sq_kernels::int8_bmm and sq_kernels::scaled_bmm
// (schemas, references and fakes in sq_kernels/ops/attention.py).
//
//   a int8 [batch, M, K] x b int8 [batch, N, K] -> out [batch, M, N]   (both operands K-contiguous)
//   int8_bmm:   out = acc (int32)
//   scaled_bmm: out = alpha * acc as fp16 / fp32, or sat_int8(rint(alpha * acc / out_scale))
// Q·Kᵀ passes Q [B·H, Sq, D] and K [B·H, Sk, D]; P·V passes P [B·H, Sq, Sk] and Vᵀ [B·H, D, Sk].
// Alignment: K and N multiples of 16, row and batch strides multiples of 16, 16-byte aligned data.
// alpha and out_scale are 1-element float32 device tensors read by the kernel (no host sync).
// Test hooks (namespace _sq_kernels_C): scaled_bmm_path(..., int path) runs a forced kernel path
// (0 auto, 1 small-M, 2 tile64, 3 tile128; out_dtype int32 is int8_bmm), bmm_path(batch, M, N, K)
// returns the path auto picks on the current device.
#include <torch/library.h>

#include <optional>

#include "bmm.h"
#include "checks.h"

namespace {

using sqk::bmm::OutType;
using sqk::bmm::Path;

// The messages match the Python checks of sq_kernels/ops/attention.py word for word, so that one
// table of bad inputs tests both (tests/test_ops_attention.py, tests/kernels/test_bmm_kernels.py).
void check_operand(const char* op, const char* arg, const at::Tensor& t, const char* shape) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kChar, op, ": ", arg, " must be an int8 tensor ", shape, ", got ",
                    t.scalar_type(), " ", t.sizes());
  sqk::check_dim(op, arg, t, 3, shape);
}

void check_layout(const char* op, const char* arg, const at::Tensor& t) {
  if (t.numel() == 0) return;
  TORCH_CHECK_VALUE(t.stride(2) == 1, op, ": ", arg, " must have a contiguous last dimension (stride(-1) == 1), got strides ",
                    t.strides(), " (call .contiguous())");
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) % sqk::bmm::kAlign == 0, op, ": ", arg, "'s row stride ", t.stride(1),
                    " must be a multiple of 16 (call .contiguous())");
  TORCH_CHECK_VALUE(t.size(0) <= 1 || t.stride(0) % sqk::bmm::kAlign == 0, op, ": ", arg, "'s batch stride ",
                    t.stride(0), " must be a multiple of 16 (call .contiguous())");
  TORCH_CHECK_VALUE(sqk::aligned(t.data_ptr(), 16), op, ": ", arg, " starts ", t.storage_offset(),
                    " bytes into its storage; the kernels need 16-byte aligned data (call .contiguous())");
}

void check_scalar(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat && t.numel() == 1, op, ": ", arg,
                    " must be a 1-element float32 tensor, got ", t.scalar_type(), " ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(), " but the operands are on ",
                    ref.device());
}

void check_problem(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_operand(op, "a", a, "[batch, M, K]");
  check_operand(op, "b", b, "[batch, N, K]");
  TORCH_CHECK_VALUE(a.device() == b.device(), op, ": a is on ", a.device(), " and b on ", b.device(),
                    "; they must be on the same device");
  sqk::check_cuda(op, "a", a);
  TORCH_CHECK_VALUE(a.size(0) == b.size(0), op, ": a is ", a.sizes(), " and b is ", b.sizes(),
                    ": the batch sizes differ");
  TORCH_CHECK_VALUE(a.size(2) == b.size(2), op, ": a is [batch, M, K] = ", a.sizes(), " and b is [batch, N, K] = ",
                    b.sizes(), ": the reduction dimension differs");
  const int64_t k = a.size(2), n = b.size(1);
  TORCH_CHECK_VALUE(k % sqk::bmm::kAlign == 0, op, ": the reduction dimension (a.shape[-1] = ", k,
                    ") must be a multiple of 16");
  TORCH_CHECK_VALUE(n % sqk::bmm::kAlign == 0, op, ": b.shape[1] = ", n,
                    " (the output's last dimension) must be a multiple of 16");
  TORCH_CHECK_VALUE(k <= sqk::bmm::kMaxK, op, ": the reduction dimension ", k, " exceeds ", sqk::bmm::kMaxK,
                    ": the int32 accumulator could overflow");
  TORCH_CHECK_VALUE(n <= (int64_t(1) << 20), op, ": b.shape[1] = ", n, " exceeds ", int64_t(1) << 20);
  TORCH_CHECK_VALUE(a.size(1) < (int64_t(1) << 31), op, ": M = ", a.size(1), " must be below 2^31");
  check_layout(op, "a", a);
  check_layout(op, "b", b);
  const int sm = sqk::sm_version(a);
  TORCH_CHECK(sm >= 80 && sm < 100, op, ": the INT8 BMM kernels need an sm_80..sm_90 GPU (built for sm_80, sm_89, sm_90), "
              "this one is sm_", sm);
#ifndef SQK_HAS_SM80
  TORCH_CHECK(false, op, ": this build of sq_kernels._C has no sm80-family kernels; set SQ_KERNELS_CUDA_ARCHS to "
              "include 8.0 or 9.0a and rebuild");
#endif
}

at::Tensor launch(const char* op, const at::Tensor& a, const at::Tensor& b, at::ScalarType out_dtype, OutType type,
                  const at::Tensor* alpha, const at::Tensor* out_scale, Path path) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0), m = a.size(1), n = b.size(1), k = a.size(2);
  at::Tensor out = at::empty({batch, m, n}, a.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  sqk::bmm::BmmParams p;
  p.a = a.const_data_ptr<int8_t>();
  p.b = b.const_data_ptr<int8_t>();
  p.out = out.data_ptr();
  p.batch = batch;
  p.m = m;
  p.n = n;
  p.k = k;
  // A stride that is never stepped (one row, one batch) may be anything in torch; give the kernel a
  // valid one.
  p.lda = m > 1 ? a.stride(1) : k;
  p.ldb = n > 1 ? b.stride(1) : k;
  p.ldc = n;
  p.batch_stride_a = batch > 1 ? a.stride(0) : 0;
  p.batch_stride_b = batch > 1 ? b.stride(0) : 0;
  p.batch_stride_c = m * n;
  p.alpha = alpha ? alpha->const_data_ptr<float>() : nullptr;
  p.out_scale = out_scale ? out_scale->const_data_ptr<float>() : nullptr;
  const char* err = sqk::bmm::run(p, type, sqk::current_stream(a), path);
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
  return out;
}

at::Tensor int8_bmm_impl(const at::Tensor& a, const at::Tensor& b, Path path, const char* op) {
  check_problem(op, a, b);
  return launch(op, a, b, at::kInt, OutType::kS32, nullptr, nullptr, path);
}

at::Tensor scaled_bmm_impl(const at::Tensor& a, const at::Tensor& b, const at::Tensor& alpha, at::ScalarType out_dtype,
                           const std::optional<at::Tensor>& out_scale, Path path, const char* op) {
  check_problem(op, a, b);
  check_scalar(op, "alpha", alpha, a);
  OutType type;
  switch (out_dtype) {
    case at::kHalf: type = OutType::kF16; break;
    case at::kFloat: type = OutType::kF32; break;
    case at::kChar: type = OutType::kS8; break;
    default:
      TORCH_CHECK_VALUE(false, op, ": out_dtype must be one of torch.float16, torch.float32, torch.int8",
                        out_dtype == at::kInt ? " (int32: use int8_bmm)" : "", ", got ", out_dtype);
  }
  if (type == OutType::kS8) {
    TORCH_CHECK_VALUE(out_scale.has_value(), op, ": out_dtype=torch.int8 needs out_scale (a 1-element float32 tensor)");
    check_scalar(op, "out_scale", *out_scale, a);
  } else {
    TORCH_CHECK_VALUE(!out_scale.has_value(), op, ": out_scale is only meaningful with out_dtype=torch.int8, got out_dtype=",
                      out_dtype);
  }
  return launch(op, a, b, out_dtype, type, &alpha, out_scale.has_value() ? &*out_scale : nullptr, path);
}

at::Tensor int8_bmm(const at::Tensor& a, const at::Tensor& b) { return int8_bmm_impl(a, b, Path::kAuto, "int8_bmm"); }

at::Tensor scaled_bmm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& alpha, at::ScalarType out_dtype,
                      const std::optional<at::Tensor>& out_scale) {
  return scaled_bmm_impl(a, b, alpha, out_dtype, out_scale, Path::kAuto, "scaled_bmm");
}

at::Tensor scaled_bmm_path(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& alpha,
                           at::ScalarType out_dtype, const std::optional<at::Tensor>& out_scale, int64_t path) {
  constexpr const char* op = "scaled_bmm_path";
  TORCH_CHECK_VALUE(path >= 0 && path <= static_cast<int64_t>(Path::kTile128), op, ": path must be 0..3, got ", path);
  const Path p = static_cast<Path>(path);
  if (out_dtype == at::kInt) {
    TORCH_CHECK_VALUE(!alpha.has_value() && !out_scale.has_value(), op, ": int32 output takes no alpha / out_scale");
    return int8_bmm_impl(a, b, p, op);
  }
  TORCH_CHECK_VALUE(alpha.has_value(), op, ": alpha is required for out_dtype ", out_dtype);
  return scaled_bmm_impl(a, b, *alpha, out_dtype, out_scale, p, op);
}

int64_t bmm_path(int64_t batch, int64_t m, int64_t n, int64_t k) {
  return static_cast<int64_t>(sqk::bmm::select_path(batch, m, n, k, sqk::bmm::current_sm_count()));
}

}  // namespace

TORCH_LIBRARY_IMPL(sq_kernels, CUDA, m) {
  m.impl("int8_bmm", &int8_bmm);
  m.impl("scaled_bmm", &scaled_bmm);
}

TORCH_LIBRARY_FRAGMENT(_sq_kernels_C, m) {
  m.def("scaled_bmm_path(Tensor a, Tensor b, Tensor? alpha, ScalarType out_dtype, Tensor? out_scale, int path) -> Tensor");
  m.impl("scaled_bmm_path", c10::DispatchKey::CUDA, TORCH_FN(scaled_bmm_path));
  m.def("bmm_path(int batch, int m, int n, int k) -> int", &bmm_path);
}
