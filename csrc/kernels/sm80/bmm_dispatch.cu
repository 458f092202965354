// INT8 attention BMM: contract check, kernel choice and the per-output-type dispatch (host code only;
// the kernels are in bmm_kernels.cuh, instantiated by bmm_{f16,f32,s8,s32}.cu).
//
// Math and layouts: see bmm.h. Alignment: K, N, lda, ldb, ldc and batch strides multiples of 16,
// 16-byte aligned pointers, K <= kMaxK.
#include <atomic>
#include <climits>
#include <cstdint>

#include "bmm.h"

namespace sqk {
namespace bmm {

namespace {
bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
}  // namespace

int current_sm_count() {
  static std::atomic<int> cache[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1;
  int sms = cache[dev].load(std::memory_order_relaxed);
  if (sms == 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) return 1;
    cache[dev].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

// Decode (M <= 8) and K == 0 go to the small-M kernel: it reads b_op once and has one block per 4..16
// columns, where a tensor-core tile would compute 64+ rows for one. Problems with M <= 64, or too
// few 128x128 tiles to fill the GPU twice over, use the 64x64 tile; the rest the 128x128 tile.
Path select_path(int64_t batch, int64_t m, int64_t n, int64_t k, int sm_count) {
  if (k == 0 || m <= kSmallMMax) return Path::kSmallM;
  if (m <= 64) return Path::kTile64;
  const int64_t tiles128 = batch * ((m + 127) / 128) * ((n + 127) / 128);
  return tiles128 < 2 * static_cast<int64_t>(sm_count) ? Path::kTile64 : Path::kTile128;
}

const char* path_name(Path p) {
  switch (p) {
    case Path::kAuto: return "auto";
    case Path::kSmallM: return "small_m";
    case Path::kTile64: return "tile64";
    case Path::kTile128: return "tile128";
  }
  return "unknown";
}

const char* validate(const BmmParams& p, OutType type, Path path) {
  if ((path == Path::kTile64 || path == Path::kTile128) && p.k == 0)
    return "BMM: the CUTLASS tiles need K > 0 (K == 0 runs on the small-M kernel)";
  if (p.batch < 0 || p.m < 0 || p.n < 0 || p.k < 0) return "BMM: negative size";
  if (p.k % kAlign != 0) return "BMM: K must be a multiple of 16";
  if (p.n % kAlign != 0) return "BMM: N must be a multiple of 16";
  if (p.k > kMaxK) return "BMM: K is larger than 131056 (the int32 accumulator could overflow)";
  if (p.m > INT_MAX || p.n > INT_MAX) return "BMM: M and N must be below 2^31";
  if (p.batch == 0 || p.m == 0 || p.n == 0) return nullptr;
  if (!p.out || !aligned16(p.out)) return "BMM: out must be a 16-byte aligned pointer";
  if (p.ldc < p.n || p.ldc % kAlign != 0) return "BMM: ldc must be >= N and a multiple of 16";
  if (p.batch > 1 && (p.batch_stride_c < p.m * p.ldc || p.batch_stride_c % kAlign != 0))
    return "BMM: the output batch stride must be >= M * ldc and a multiple of 16";
  if (type != OutType::kS32 && !p.alpha) return "BMM: alpha is required";
  if (type == OutType::kS8 && !p.out_scale) return "BMM: out_scale is required for int8 output";
  if (p.k == 0) return nullptr;
  if (!p.a || !p.b || !aligned16(p.a) || !aligned16(p.b)) return "BMM: a and b must be 16-byte aligned pointers";
  if (p.lda < p.k || p.lda % kAlign != 0) return "BMM: lda must be >= K and a multiple of 16";
  if (p.ldb < p.k || p.ldb % kAlign != 0) return "BMM: ldb must be >= K and a multiple of 16";
  if (p.batch_stride_a < 0 || p.batch_stride_b < 0 || p.batch_stride_a % kAlign != 0 ||
      p.batch_stride_b % kAlign != 0)
    return "BMM: the batch strides of a and b must be non-negative multiples of 16";
  return nullptr;
}

const char* run(const BmmParams& p, OutType type, cudaStream_t stream, Path path) {
  switch (type) {
    case OutType::kF16: return run_f16(p, stream, path);
    case OutType::kF32: return run_f32(p, stream, path);
    case OutType::kS8: return run_s8(p, stream, path);
    case OutType::kS32: return run_s32(p, stream, path);
  }
  return "BMM: unknown output type";
}

}  // namespace bmm
}  // namespace sqk
