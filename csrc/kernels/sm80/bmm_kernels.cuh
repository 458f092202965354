// INT8 attention BMM kernels (sm_80 family: also built for plain sm_90, so they run on Hopper).
//
// Math (bmm.h has the contract):  acc = sum_k a[b,m,k] * b_op[b,n,k]  (int32, exact)
//                                  out = finish(acc): half(alpha*acc) | alpha*acc |
//                                        sat_int8(rint(alpha*acc / out_scale)) | acc
// Layouts: a [batch, M, K] and b_op [batch, N, K], K-contiguous (A row-major, B column-major: the TN
// layout int8 mma.sync needs); out [batch, M, N] row-major.
// Alignment: K, N, lda, ldb, ldc and the batch strides multiples of 16; 16-byte aligned pointers.
//
// Two kernels:
//  * a CUTLASS 2.x GemmUniversal in batched mode (grid z = batch) with mma.sync m16n8k32 and a custom
//    epilogue functor that reads alpha / out_scale from device memory (CUDA-graph safe: no host
//    scalars), in a 64x64x64 and a 128x128x64 threadblock tile;
//  * a small-M kernel for decode (Sq <= 8): a group of G lanes owns one output column n, walks K in
//    16-byte chunks with dp4a for every row m, and reduces with warp shuffles. One pass over b_op,
//    which is what a KV-cache read costs; a 64-row tensor-core tile would waste 63/64 of its math and
//    leave P·V (N = head_dim) with one tile per head.
// Each translation unit (bmm_f16.cu, ...) instantiates these for one output type.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "bmm.h"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/device/gemm_universal.h"
#include "cutlass/numeric_conversion.h"
#include "cutlass/numeric_types.h"

namespace sqk {
namespace bmm {

// The epilogue math, shared by both kernels so that every path gives bitwise the same output.
template <typename T>
struct Finish;

template <>
struct Finish<cutlass::half_t> {
  CUTLASS_HOST_DEVICE static cutlass::half_t apply(int32_t acc, float alpha, float) {
    return cutlass::NumericConverter<cutlass::half_t, float, cutlass::FloatRoundStyle::round_to_nearest>::convert(
        alpha * static_cast<float>(acc));
  }
};

template <>
struct Finish<float> {
  CUTLASS_HOST_DEVICE static float apply(int32_t acc, float alpha, float) { return alpha * static_cast<float>(acc); }
};

template <>
struct Finish<int8_t> {
  // cvt.rni.sat.s8.f32: round half to even, saturate to [-128, 127] (NaN -> 0).
  CUTLASS_HOST_DEVICE static int8_t apply(int32_t acc, float alpha, float out_scale) {
    return cutlass::NumericConverter<int8_t, float, cutlass::FloatRoundStyle::round_to_nearest>::convert(
        (alpha * static_cast<float>(acc)) / out_scale);
  }
};

template <>
struct Finish<int32_t> {
  CUTLASS_HOST_DEVICE static int32_t apply(int32_t acc, float, float) { return acc; }
};

template <typename T>
constexpr bool kUsesAlpha = !std::is_same<T, int32_t>::value;
template <typename T>
constexpr bool kUsesOutScale = std::is_same<T, int8_t>::value;

// CUTLASS 2.x epilogue output operator: out = Finish<T>(acc) with alpha and out_scale loaded once per
// thread from device pointers. There is no source (C) operand.
template <typename ElementOutput_, int Count>
class BmmOutputOp {
 public:
  using ElementOutput = ElementOutput_;
  using ElementAccumulator = int32_t;
  using ElementCompute = float;
  using ElementSource = ElementOutput_;
  using ElementC = ElementOutput_;
  using ElementD = ElementOutput_;
  static int const kCount = Count;
  using FragmentOutput = cutlass::Array<ElementOutput, kCount>;
  using FragmentSource = cutlass::Array<ElementOutput, kCount>;
  using FragmentAccumulator = cutlass::Array<int32_t, kCount>;

  struct Params {
    const float* alpha = nullptr;
    const float* out_scale = nullptr;
  };

  CUTLASS_HOST_DEVICE explicit BmmOutputOp(Params const& params) {
    alpha_ = (kUsesAlpha<ElementOutput> && params.alpha) ? *params.alpha : 1.0f;
    out_scale_ = (kUsesOutScale<ElementOutput> && params.out_scale) ? *params.out_scale : 1.0f;
  }

  CUTLASS_HOST_DEVICE bool is_source_needed() const { return false; }
  CUTLASS_HOST_DEVICE void set_k_partition(int, int) {}

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& acc) const {
    FragmentOutput out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kCount; ++i) out[i] = Finish<ElementOutput>::apply(acc[i], alpha_, out_scale_);
    return out;
  }

  CUTLASS_HOST_DEVICE FragmentOutput operator()(FragmentAccumulator const& acc, FragmentSource const&) const {
    return (*this)(acc);
  }

 private:
  float alpha_;
  float out_scale_;
};

// Threadblock tiles. 64x64x64 (2x2 warps of 32x32x64, 4 stages, 32 KiB smem): decode-sized and
// few-tile problems (P·V has N = head_dim). 128x128x64 (2x2 warps of 64x64x64, 4 stages, 64 KiB smem):
// prefill Q·Kᵀ and long P·V. K-tile 64 because Q·Kᵀ has K = head_dim = 64..128 (one or two k-tiles).
struct Tile64 {
  using Threadblock = cutlass::gemm::GemmShape<64, 64, 64>;
  using Warp = cutlass::gemm::GemmShape<32, 32, 64>;
  static constexpr int kStages = 4;
};
struct Tile128 {
  using Threadblock = cutlass::gemm::GemmShape<128, 128, 64>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 64>;
  static constexpr int kStages = 4;
};

// Output elements per store: 16 bytes, except int8 out of a 32-column warp tile, whose epilogue thread
// map has too few rows for 16-byte stores (8-byte stores; N % 16 == 0 covers both).
template <typename ElementOutput, typename Tile>
constexpr int kOutAccess =
    (cutlass::sizeof_bits<ElementOutput>::value == 8 && Tile::Warp::kN < 64) ? 8
                                                                             : 128 / cutlass::sizeof_bits<ElementOutput>::value;

template <typename ElementOutput, typename Tile>
using CutlassBmm = cutlass::gemm::device::GemmUniversal<
    int8_t, cutlass::layout::RowMajor,     // a [M, K]
    int8_t, cutlass::layout::ColumnMajor,  // b_op [N, K] read as a K x N column-major matrix
    ElementOutput, cutlass::layout::RowMajor, int32_t, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    typename Tile::Threadblock, typename Tile::Warp, cutlass::gemm::GemmShape<16, 8, 32>,
    BmmOutputOp<ElementOutput, kOutAccess<ElementOutput, Tile>>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>, Tile::kStages, 16, 16,
    cutlass::arch::OpMultiplyAddSaturate>;

// gridDim.y and gridDim.z are limited to 65535: larger batches are launched in chunks.
constexpr int64_t kMaxGridBatch = 65535;

inline const char* cutlass_status_message(cutlass::Status s) {
  switch (s) {
    case cutlass::Status::kErrorMisalignedOperand: return "CUTLASS: misaligned operand (K and N must be multiples of 16)";
    case cutlass::Status::kErrorInvalidProblem: return "CUTLASS: invalid problem (grid too large: N is too large)";
    case cutlass::Status::kErrorNotSupported: return "CUTLASS: problem not supported";
    case cutlass::Status::kErrorInternal: return "CUTLASS: internal error (device query or kernel launch failed)";
    default: return "CUTLASS: the kernel cannot run this problem";
  }
}

template <typename ElementOutput, typename Tile>
const char* run_cutlass(const BmmParams& p, cudaStream_t stream) {
  using Gemm = CutlassBmm<ElementOutput, Tile>;
  typename Gemm::EpilogueOutputOp::Params epilogue;
  epilogue.alpha = p.alpha;
  epilogue.out_scale = p.out_scale;
  auto* out = static_cast<ElementOutput*>(p.out);
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridBatch) {
    const int chunk = static_cast<int>(p.batch - b0 < kMaxGridBatch ? p.batch - b0 : kMaxGridBatch);
    ElementOutput* d = out + b0 * p.batch_stride_c;
    typename Gemm::Arguments args(cutlass::gemm::GemmUniversalMode::kBatched,
                                  {static_cast<int>(p.m), static_cast<int>(p.n), static_cast<int>(p.k)}, chunk,
                                  epilogue, p.a + b0 * p.batch_stride_a, p.b + b0 * p.batch_stride_b, d, d,
                                  p.batch_stride_a, p.batch_stride_b, p.batch_stride_c, p.batch_stride_c, p.lda,
                                  p.ldb, p.ldc, p.ldc);
    cutlass::Status s = Gemm::can_implement(args);
    if (s != cutlass::Status::kSuccess) return cutlass_status_message(s);
    Gemm gemm;
    s = gemm.initialize(args, nullptr, stream);  // batched mode needs no workspace
    if (s != cutlass::Status::kSuccess) return cutlass_status_message(s);
    s = gemm.run(stream);
    if (s != cutlass::Status::kSuccess) {
      cudaError_t e = cudaGetLastError();
      return e != cudaSuccess ? cudaGetErrorString(e) : cutlass_status_message(s);
    }
  }
  return nullptr;
}

// ---- small-M (decode) kernel ----

constexpr int kSmallMThreads = 128;

__device__ __forceinline__ int32_t dot16(int4 x, int4 y, int32_t acc) {
  acc = __dp4a(x.x, y.x, acc);
  acc = __dp4a(x.y, y.y, acc);
  acc = __dp4a(x.z, y.z, acc);
  return __dp4a(x.w, y.w, acc);
}

// One block: 4 warps x (32 / G) columns. Every lane takes part in the shuffles, so out-of-range
// columns are computed as zero-length dot products and not stored.
template <typename ElementOutput, int G, int kMaxM>
__global__ void __launch_bounds__(kSmallMThreads, 8) bmm_small_m_kernel(BmmParams p) {
  constexpr int kColsPerWarp = 32 / G;
  constexpr int kColsPerBlock = (kSmallMThreads / 32) * kColsPerWarp;
  const int lane = threadIdx.x & 31;
  const int group = lane / G;
  const int r = lane % G;
  const int64_t batch = blockIdx.y;
  const int64_t n = int64_t(blockIdx.x) * kColsPerBlock + (threadIdx.x >> 5) * kColsPerWarp + group;
  const bool valid = n < p.n;
  const int8_t* a = p.a + batch * p.batch_stride_a;
  const int8_t* b = p.b + batch * p.batch_stride_b + (valid ? n : 0) * p.ldb;
  const int m = static_cast<int>(p.m);
  const int64_t chunks = valid ? p.k / 16 : 0;

  int32_t acc[kMaxM];
#pragma unroll
  for (int i = 0; i < kMaxM; ++i) acc[i] = 0;

  for (int64_t c = r; c < chunks; c += G) {
    const int4 bv = __ldg(reinterpret_cast<const int4*>(b + c * 16));
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) {
      if (i < m) acc[i] = dot16(__ldg(reinterpret_cast<const int4*>(a + i * p.lda + c * 16)), bv, acc[i]);
    }
  }
#pragma unroll
  for (int off = G / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int i = 0; i < kMaxM; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], off);
  }
  if (!valid || r != 0) return;
  const float alpha = kUsesAlpha<ElementOutput> ? *p.alpha : 1.0f;
  const float out_scale = kUsesOutScale<ElementOutput> ? *p.out_scale : 1.0f;
  ElementOutput* out = static_cast<ElementOutput*>(p.out) + batch * p.batch_stride_c + n;
#pragma unroll
  for (int i = 0; i < kMaxM; ++i) {
    if (i < m) out[i * p.ldc] = Finish<ElementOutput>::apply(acc[i], alpha, out_scale);
  }
}

template <typename ElementOutput, int G, int kMaxM>
const char* launch_small_m(const BmmParams& p, cudaStream_t stream) {
  constexpr int kColsPerBlock = (kSmallMThreads / 32) * (32 / G);
  const int64_t col_blocks = (p.n + kColsPerBlock - 1) / kColsPerBlock;
  if (col_blocks > 0x7fffffff) return "BMM: N is too large for the small-M kernel";
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridBatch) {
    BmmParams q = p;
    q.batch = p.batch - b0 < kMaxGridBatch ? p.batch - b0 : kMaxGridBatch;
    q.a = p.a + b0 * p.batch_stride_a;
    q.b = p.b + b0 * p.batch_stride_b;
    q.out = static_cast<ElementOutput*>(p.out) + b0 * p.batch_stride_c;
    dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(q.batch));
    bmm_small_m_kernel<ElementOutput, G, kMaxM><<<grid, kSmallMThreads, 0, stream>>>(q);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return cudaGetErrorString(e);
  }
  return nullptr;
}

// Lanes per column: enough to cover K in one sweep of 16-byte chunks for head-dim K (64..128), a
// full warp for the long K of decode P·V. M == 1 (plain decode) gets its own instantiation: one
// accumulator instead of eight.
template <typename ElementOutput, int kMaxM>
const char* run_small_m_rows(const BmmParams& p, cudaStream_t stream) {
  const int64_t chunks = p.k / 16;
  if (chunks <= 4) return launch_small_m<ElementOutput, 4, kMaxM>(p, stream);
  if (chunks <= 8) return launch_small_m<ElementOutput, 8, kMaxM>(p, stream);
  if (chunks <= 16) return launch_small_m<ElementOutput, 16, kMaxM>(p, stream);
  return launch_small_m<ElementOutput, 32, kMaxM>(p, stream);
}

// Rows are processed 8 at a time (the kernel's accumulator count), so a forced small-M path, or K == 0
// (which never goes to CUTLASS), is correct for any M.
template <typename ElementOutput>
const char* run_small_m(const BmmParams& p, cudaStream_t stream) {
  static_assert(kSmallMMax == 8, "bmm_small_m_kernel is instantiated for M == 1 and M <= 8");
  if (p.m == 1) return run_small_m_rows<ElementOutput, 1>(p, stream);
  for (int64_t r0 = 0; r0 < p.m; r0 += kSmallMMax) {
    BmmParams q = p;
    q.m = p.m - r0 < kSmallMMax ? p.m - r0 : kSmallMMax;
    q.a = p.a + r0 * p.lda;
    q.out = static_cast<ElementOutput*>(p.out) + r0 * p.ldc;
    if (const char* err = run_small_m_rows<ElementOutput, kSmallMMax>(q, stream)) return err;
  }
  return nullptr;
}

template <typename ElementOutput>
const char* run_typed(const BmmParams& p, OutType type, cudaStream_t stream, Path path) {
  if (const char* err = validate(p, type, path)) return err;
  if (p.batch == 0 || p.m == 0 || p.n == 0) return nullptr;
  if (path == Path::kAuto) path = select_path(p.batch, p.m, p.n, p.k, current_sm_count());
  switch (path) {
    case Path::kSmallM: return run_small_m<ElementOutput>(p, stream);
    case Path::kTile64: return run_cutlass<ElementOutput, Tile64>(p, stream);
    case Path::kTile128: return run_cutlass<ElementOutput, Tile128>(p, stream);
    case Path::kAuto: break;
  }
  return "BMM: no kernel path";
}

}  // namespace bmm
}  // namespace sqk
