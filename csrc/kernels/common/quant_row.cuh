// Building blocks shared by the row-wise quantization kernels (quant_act.cuh, norm_quant.cuh).
//
// A row of H elements is handled by one thread block. Each thread owns the vectors
// idx = threadIdx.x + i * blockDim.x (i < NV) of VEC elements, so loads are coalesced 16-byte
// transactions (VEC = 16 / sizeof(T)) or scalars (VEC = 1) when the row is not 16-byte aligned.
// NV > 0 keeps the row's fp32 values in registers (the row is read from memory once); NV == 0 is the
// streaming variant for rows too long for registers (more than 4096 vectors), which re-reads the
// row (from L2) per pass.
//
// Quantization (see quant.h): dynamic  q = sat_int8(rint(y * (127 / a))), a = max(amax, EPS)
//                             static   q = sat_int8(rint(y / scale))
// amax is a max over the IEEE bit patterns of |y| (as unsigned integers they order like the values
// and a NaN, whose pattern is above +inf, wins), so a NaN in a row gives that row a NaN scale and
// zero outputs instead of being silently skipped by fmaxf; other rows are untouched.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant.h"

namespace sqk {
namespace qrow {

// Register-resident rows use up to kRegThreads threads of up to kMaxNV vectors (64 fp32 values per
// thread at VEC = 8: a 32768-element fp16 row); the streaming variant uses kStreamThreads.
constexpr int kMaxNV = 8;
constexpr int kRegThreads = 512;
constexpr int kStreamThreads = 1024;

// Launch bound of a row kernel with NV register vectors per thread (0 = streaming): 512 threads
// leave 128 registers per thread, enough for NV = 8 without spilling.
template <int NV>
constexpr int max_threads() { return NV == 0 ? kStreamThreads : kRegThreads; }

// How a row kernel finishes. kTensorAmax / kTensorQuant are the two passes of per-tensor dynamic
// quantization: the first folds each row's amax into out_scale[0] (as bits, atomicMax), the
// second reads it back; a third one-thread kernel turns the amax into the scale.
enum class RowMode : int { kPerToken = 0, kStatic = 1, kTensorAmax = 2, kTensorQuant = 3 };

template <int BYTES>
struct Bits;
template <>
struct Bits<16> { using type = uint4; };
template <>
struct Bits<8> { using type = uint2; };
template <>
struct Bits<4> { using type = unsigned int; };
template <>
struct Bits<2> { using type = unsigned short; };
template <>
struct Bits<1> { using type = unsigned char; };

// VEC elements of T as one register-sized word (or group of words).
template <typename T, int VEC>
using Raw = typename Bits<sizeof(T) * VEC>::type;

template <typename T, int VEC>
__device__ __forceinline__ Raw<T, VEC> load_raw(const T* p) {
  return __ldg(reinterpret_cast<const Raw<T, VEC>*>(p));
}

template <typename T, int VEC>
__device__ __forceinline__ void store_raw(T* p, const Raw<T, VEC>& v) {
  *reinterpret_cast<Raw<T, VEC>*>(p) = v;
}

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }

// Element j of a raw vector, as fp32 (j is a compile-time constant after unrolling; memcpy keeps the
// value in registers where a pointer cast of a 2-byte word would go through the stack).
template <typename T, int VEC>
__device__ __forceinline__ float elem(const Raw<T, VEC>& r, int j) {
  T e[VEC];
  memcpy(e, &r, sizeof(e));
  return to_float(e[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ Raw<T, VEC> pack(const T (&e)[VEC]) {
  Raw<T, VEC> r;
  memcpy(&r, e, sizeof(r));
  return r;
}

// rint (half to even), saturate to [-128, 127], NaN -> 0 (spelled out rather than relying on the
// NaN rule of a saturating cvt, so that the PyTorch reference can state the same thing).
__device__ __forceinline__ int8_t sat_int8(float v) {
  int q = __float2int_rn(v);
  q = min(max(q, -128), 127);
  return static_cast<int8_t>(v != v ? 0 : q);
}

template <int VEC>
__device__ __forceinline__ void store_int8(int8_t* p, const int8_t (&q)[VEC]) {
  *reinterpret_cast<Raw<int8_t, VEC>*>(p) = pack<int8_t, VEC>(q);
}

__device__ __forceinline__ unsigned abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Sum over the block, identical in every thread: a butterfly within each warp (commutative pairs,
// so every lane holds the same bits), then every thread adds the per-warp partials in warp order.
// `red` is a __shared__ float[32]; blockDim.x is a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = red[0];
  for (int w = 1; w < warps; ++w) t = __fadd_rn(t, red[w]);
  __syncthreads();  // red is reused by the next reduction
  return t;
}

__device__ __forceinline__ unsigned block_max(unsigned v, unsigned* red) {
  v = __reduce_max_sync(0xffffffffu, v);
  const int warps = blockDim.x >> 5;
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  unsigned t = red[0];
  for (int w = 1; w < warps; ++w) t = max(t, red[w]);
  __syncthreads();
  return t;
}

// amax -> the clamped value a (NaN stays NaN: `<` is false for it).
__device__ __forceinline__ float clamp_amax(float amax) { return amax < kQuantEps ? kQuantEps : amax; }

// What to multiply (dynamic) or divide (static) every y of the row by.
struct RowFactor {
  float f;
  bool divide;
};

template <int VEC>
__device__ __forceinline__ void quantize_store(int8_t* out, const float (&y)[VEC], RowFactor rf) {
  int8_t q[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) q[j] = sat_int8(rf.divide ? __fdiv_rn(y[j], rf.f) : __fmul_rn(y[j], rf.f));
  store_int8<VEC>(out, q);
}

// After the row's |y| maximum (as bits, already reduced over the block) is known: write the scale
// (per-token), fold it into the tensor amax (kTensorAmax), and return the factor for quantize_store.
// Returns divide = true with f = 0 for kTensorAmax, whose caller stores nothing.
__device__ __forceinline__ RowFactor row_factor(RowMode mode, unsigned amax_bits, int64_t row, float* out_scale,
                                                const float* static_scale) {
  if (mode == RowMode::kStatic) {
    const float s = __ldg(static_scale);
    if (out_scale != nullptr && row == 0 && threadIdx.x == 0) out_scale[0] = s;  // the op's copy of the scale
    return {s, true};
  }
  if (mode == RowMode::kTensorAmax) {
    if (threadIdx.x == 0) atomicMax(reinterpret_cast<unsigned*>(out_scale), amax_bits);
    return {0.f, true};
  }
  if (mode == RowMode::kTensorQuant) amax_bits = __ldg(reinterpret_cast<const unsigned*>(out_scale));
  const float a = clamp_amax(__uint_as_float(amax_bits));
  if (mode == RowMode::kPerToken && threadIdx.x == 0) out_scale[row] = __fdiv_rn(a, 127.f);
  return {__fdiv_rn(127.f, a), false};
}

// Register-resident rows: reduce (unless static), then quantize and store every valid vector.
template <int VEC, int NV>
__device__ __forceinline__ void finish_row_regs(const float (&y)[NV][VEC], int nvec, int8_t* out_row, RowMode mode,
                                                int64_t row, float* out_scale, const float* static_scale,
                                                unsigned* red) {
  unsigned bits = 0;
  if (mode != RowMode::kStatic && mode != RowMode::kTensorQuant) {
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j) bits = max(bits, abs_bits(y[i][j]));  // invalid slots hold 0
    bits = block_max(bits, red);
  }
  const RowFactor rf = row_factor(mode, bits, row, out_scale, static_scale);
  if (mode == RowMode::kTensorAmax) return;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < nvec) quantize_store<VEC>(out_row + static_cast<int64_t>(idx) * VEC, y[i], rf);
  }
}

// Launch shape for a row of h elements: vector width, vectors per thread (0 = streaming), threads.
struct RowShape {
  int vec;
  int nv;
  int threads;
};

inline int round_up_warp(int64_t n) { return static_cast<int>(((n + 31) / 32) * 32); }

// Fewest vectors per thread (1, 2, 4, 8) that keeps blocks at <= 256 threads, so that several
// rows per SM keep enough loads in flight; then up to 512 threads of 8; beyond that, stream.
inline RowShape row_shape(int64_t h, int vec) {
  const int64_t nvec = h / vec;
  for (int nv = 1; nv <= kMaxNV; nv *= 2)
    if (nvec <= 256LL * nv) return {vec, nv, std::max(32, round_up_warp((nvec + nv - 1) / nv))};
  if (nvec <= static_cast<int64_t>(kRegThreads) * kMaxNV)
    return {vec, kMaxNV, round_up_warp((nvec + kMaxNV - 1) / kMaxNV)};
  return {vec, 0, kStreamThreads};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace qrow
}  // namespace sqk
