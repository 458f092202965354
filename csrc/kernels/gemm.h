// Torch-free API of the INT8 GEMM kernels (no torch, no ATen: raw pointers, sizes, a stream).
//
// Math (every path, same order of operations):
//   acc[m,n] = sum_k a[m,k] * w[n,k]                 int32
//   t        = w_scale[n] * float(acc)               fp32
//   y        = fma(a_scale[m], t, bias[n])           fp32 (bias 0 when absent)
//   y        = max(y, 0)                             when relu (NaN propagates)
//   out      = convert(y)                            fp16 / bf16, round to nearest even
//   out      = sat_int8(rint(y / out_scale))         int8
//   out      = acc                                   int32 (no scales, no bias)
// NaN y with int8 output has no defined code: the small-M kernel (cvt.rni.sat) writes 0, the
// CUTLASS epilogues (float->int then saturating pack) write -128. Inputs here are finite int8 and
// finite scales, so only a NaN/inf scale or bias can produce it.
// Layouts: a [M,K] row-major (row stride lda), w [N,K] row-major (the nn.Linear layout, row stride
// ldw), out [M,N] row-major (row stride ldo); K-contiguous operands are what INT8 tensor cores take.
// Alignment every path relies on: K % 16 == 0, N % 16 == 0, lda/ldw/ldo % 16 == 0, a/w/out base
// pointers 16-byte aligned. The torch entry point (csrc/torch/gemm_ops.cpp) checks all of it.
// Batched use (attention BMM): `batch` problems, operand i at base + i * batch_stride_*; scales and
// bias are shared by the batch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sqk {

enum class OutType : int { kFloat16 = 0, kBFloat16 = 1, kInt8 = 2, kInt32 = 3 };

struct ScaledMMParams {
  const int8_t* a = nullptr;  // [M, K]
  const int8_t* w = nullptr;  // [N, K]
  void* out = nullptr;        // [M, N]
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldw = 0, ldo = 0;
  int64_t batch = 1, batch_stride_a = 0, batch_stride_w = 0, batch_stride_out = 0;
  const float* a_scale = nullptr;  // [M] when a_per_token, else [1]
  const float* w_scale = nullptr;  // [N] when w_per_channel, else [1]
  bool a_per_token = false;
  bool w_per_channel = false;
  const float* bias = nullptr;       // [N] or nullptr
  const float* out_scale = nullptr;  // [1], int8 output only
  bool relu = false;
  OutType out_type = OutType::kFloat16;
  int sm_count = 0;  // multiprocessors of the device (persistent schedules); 0: query
  cudaStream_t stream = nullptr;
};

// Kernel choice. kAuto picks by architecture and M (see the dispatch tables); the others exist so
// that tests and benchmarks can exercise and compare every path on one GPU.
enum class GemmPath : int {
  kAuto = 0,
  kSmallM = 1,     // common/: mma.sync m16n8k32, split-K inside a block; M <= 32, any sm_80+
  kSm90Tile64 = 2,   // sm90/: 64x128x128 ping-pong
  kSm90Tile128 = 3,  // sm90/: 128x128x128 cooperative, cluster 1x2
  kSm90Tile256 = 4,  // sm90/: 128x256x128 cooperative, cluster 2x1
  kSm80 = 5,       // sm80/: CUTLASS 2.x, tile chosen by M
  kSmallMUnroll2 = 6,  // small-M kernel with 2 K chunks in flight instead of 4 (tuning comparison)
};

// Every function returns nullptr on success or a static, human-readable error message.
// unroll: K chunks in flight per warp (4 default, 2 for comparison).
const char* small_m_gemm(const ScaledMMParams& p, int unroll = 4);
constexpr int64_t kSmallMMax = 32;
// Under GemmPath::kAuto the small-M kernel serves M <= this (sm_90: from M = 9 the 64-row wgmma
// tile is as fast; sm_8x: the CUTLASS 2.x tiles are slower than it up to M = 32).
constexpr int64_t kSmallMAutoSm90 = 8;
constexpr int64_t kSmallMAutoSm80 = 32;

// Defined only when their family is compiled (SQK_HAS_SM90 / SQK_HAS_SM80 in the entry points).
const char* sm90_gemm(const ScaledMMParams& p, GemmPath path);
const char* sm80_gemm(const ScaledMMParams& p);

}  // namespace sqk
