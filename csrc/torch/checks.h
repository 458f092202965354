// Argument checks shared by the torch-facing entry points. Every failure raises a Python
// ValueError (TORCH_CHECK_VALUE) whose message starts with the op name and names the argument.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <atomic>
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

// Compute capability of the tensor's device as major * 10 + minor (90 for an H100), cached per device.
inline int sm_version(const at::Tensor& t) {
  static std::array<std::atomic<int>, 64> cache{};
  const int dev = t.get_device();
  if (dev < 0 || dev >= 64) return 0;
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    v = major * 10 + minor;
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

// Multiprocessor count of the tensor's device, cached per device.
inline int sm_count(const at::Tensor& t) {
  static std::array<std::atomic<int>, 64> cache{};
  const int dev = t.get_device();
  if (dev < 0 || dev >= 64) return 0;
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
}

}  // namespace sqk
