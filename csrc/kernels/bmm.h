// INT8 batched matrix multiply for attention (Q·Kᵀ and P·V), the torch-free API.
//
// Math, for every batch b < batch (batch = B·heads), m < M, n < N:
//     acc[b, m, n] = sum_k a[b, m, k] * b_op[b, n, k]            int32, exact
//     y            = alpha * float(acc)                          fp32, alpha read from device memory
//     out          = half(y)                 (kF16, round to nearest even)
//                  = y                       (kF32)
//                  = sat_int8(rint(y / out_scale))               (kS8, out_scale read from device memory)
//                  = acc                     (kS32, no scaling)
// Q·Kᵀ: a = Q [Sq, D], b_op = K [Sk, D]    (M = Sq, N = Sk, K = D).
// P·V:  a = P [Sq, Sk], b_op = Vᵀ [D, Sk]  (M = Sq, N = D, K = Sk).
//
// Layouts: a [M, K] and b_op [N, K] are both K-contiguous (the TN layout INT8 tensor cores need),
// with a row stride (lda, ldb) and a batch stride; out [M, N] has row stride ldc and batch stride
// batch_stride_c. All strides are in elements.
//
// Alignment (checked by validate(); the torch entry point reports it per argument first):
//   K % 16 == 0 and N % 16 == 0 (16-byte vector loads of a and b_op, 16-byte stores of int8 out);
//   lda, ldb, batch strides of a and b_op multiples of 16; a, b_op and out 16-byte aligned;
//   ldc and batch_stride_c multiples of 16 elements; K <= kMaxK so the int32 sum cannot overflow.
// M, N and batch may be 0 (nothing is launched); K == 0 gives out = alpha * 0.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sqk {
namespace bmm {

enum class OutType { kF16, kF32, kS8, kS32 };

// |acc| <= K * 128 * 128 must stay below 2^31.
constexpr int64_t kMaxK = 131056;
constexpr int64_t kAlign = 16;

struct BmmParams {
  const int8_t* a = nullptr;  // [batch, M, K]
  const int8_t* b = nullptr;  // [batch, N, K]
  void* out = nullptr;        // [batch, M, N] of the output type
  int64_t batch = 0, m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;
  int64_t batch_stride_a = 0, batch_stride_b = 0, batch_stride_c = 0;
  const float* alpha = nullptr;      // 1 element on the device; unused for kS32
  const float* out_scale = nullptr;  // 1 element on the device; kS8 only
};

// Kernel choice. kAuto picks by shape (select_path); the others exist so that tests and benchmarks can
// run every path on one GPU. kSmallM: a dp4a kernel for decode (auto: M <= kSmallMMax, and K == 0;
// forced, any M, 8 rows per launch);
// kTile64 / kTile128: CUTLASS 2.x mma.sync GEMMs with 64x64x64 and 128x128x64 threadblock tiles.
enum class Path : int { kAuto = 0, kSmallM = 1, kTile64 = 2, kTile128 = 3 };

constexpr int64_t kSmallMMax = 8;

// Which kernel kAuto runs (batch, m, n, k) with on a device with sm_count SMs (never kAuto).
Path select_path(int64_t batch, int64_t m, int64_t n, int64_t k, int sm_count);
// SM count of the current device (cached per device; no synchronisation).
int current_sm_count();
const char* path_name(Path p);

// nullptr when params meet the layout and alignment contract above and `path` can run them, else what
// is wrong.
const char* validate(const BmmParams& p, OutType type, Path path);

// Launch on `stream`; never synchronises, never allocates. Returns nullptr on success, else a static
// message (an unmet contract, a CUTLASS status, or a launch error).
const char* run(const BmmParams& p, OutType type, cudaStream_t stream, Path path = Path::kAuto);

// The per-output-type launchers run() dispatches to (one translation unit each).
const char* run_f16(const BmmParams& p, cudaStream_t stream, Path path);
const char* run_f32(const BmmParams& p, cudaStream_t stream, Path path);
const char* run_s8(const BmmParams& p, cudaStream_t stream, Path path);
const char* run_s32(const BmmParams& p, cudaStream_t stream, Path path);

}  // namespace bmm
}  // namespace sqk
