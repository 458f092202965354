// Argument checks shared by the torch-facing entry points. Every failure raises a Python
// ValueError (TORCH_CHECK_VALUE) whose message starts with the op name and names the argument.
#pragma once
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

namespace sqk {

inline void check_cuda(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", arg, " must be a CUDA tensor, got device ", t.device());
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", arg, " is on ", t.device(),
                    " but the operands are on ", ref.device());
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType want) {
  TORCH_CHECK_VALUE(t.scalar_type() == want, op, ": ", arg, " must be ", want, ", got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", arg, " must be ", dim, "-D ", shape, ", got shape ", t.sizes());
}

inline bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline void check_aligned(const char* op, const char* arg, const at::Tensor& t, int64_t bytes) {
  TORCH_CHECK_VALUE(t.numel() == 0 || aligned(t.data_ptr(), bytes), op, ": ", arg, "'s data pointer must be ",
                    bytes, "-byte aligned (a view with this storage offset is not; call .contiguous())");
}

// (major, minor) of the tensor's device, e.g. 90 for an H100.
inline int sm_version(const at::Tensor& t) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(t.get_device());
  return prop->major * 10 + prop->minor;
}

}  // namespace sqk
