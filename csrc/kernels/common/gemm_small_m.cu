// Small-M INT8 GEMM (decode: M <= 32 tokens) with the dequantization fused, for every sm_80+ GPU.
//
// At decode sizes the GEMM is a stream over the weight: N*K bytes read once, almost no arithmetic.
// A 64-row wgmma/TMA tile would waste >= 50% of its work and launch too few CTAs for small N, so
// this kernel instead gives each CTA 16 weight rows and splits K over its 8 warps:
//
//   warp w, lane (g = lane/4, t = lane%4), K chunk c (128 wide, c = w, w+8, ...):
//     loads 2 x 16 B of weight rows n0+g and n0+g+8 and 2 x 16 B of token rows (all coalesced);
//     feeds them to mma.sync.m16n8k32 (weights = the 16-row A operand, tokens = the 8-column B
//     operand, i.e. D^T = W A^T, the "swap-AB" trick). A dot product does not care in which order
//     it visits k, so each thread's 32 contiguous bytes are mapped onto the mma's k positions
//     (logical k t*4+i -> byte 8j+i, 16+t*4+i -> byte 8j+4+i, j = mma step) identically for both
//     operands; this keeps every load a full 16-byte vector instead of 4-byte fragments.
//   The 8 warps' int32 partial sums are added in shared memory (exact), then one thread per output
//   applies the epilogue of gemm.h and stores.
//
// Math: gemm.h. Alignment: K % 16 == 0, N % 16 == 0, lda/ldw % 16 == 0, a/w 16-byte aligned.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "gemm.h"

namespace sqk {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;     // weight rows (output channels) per CTA
constexpr int kChunk = 128;   // K bytes one warp consumes per step (4 lanes x 32 bytes)

__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 load16(const int8_t* p, bool valid) {
  uint4 v = make_uint4(0, 0, 0, 0);
  if (valid) v = __ldg(reinterpret_cast<const uint4*>(p));
  return v;
}

__device__ __forceinline__ int8_t saturate_int8(float x) {
  int r;
  asm("cvt.rni.sat.s8.f32 %0, %1;" : "=r"(r) : "f"(x));
  return static_cast<int8_t>(r);
}

// MT: number of 8-token column tiles (M <= 8 * MT). kUnroll: K chunks whose loads are in flight
// together (more bytes in flight per warp hide more DRAM latency, at the cost of registers).
template <int MT, int kUnroll, OutType OT>
__global__ void __launch_bounds__(kThreads) small_m_gemm_kernel(const ScaledMMParams p) {
  __shared__ int partial[kWarps][kRows][MT * 8];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t b = blockIdx.y;
  const int8_t* w_lo = p.w + b * p.batch_stride_w + (n0 + g) * p.ldw;
  const int8_t* w_hi = w_lo + 8 * p.ldw;
  const int8_t* a = p.a + b * p.batch_stride_a;

  int acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
    for (int i = 0; i < 4; ++i) acc[mt][i] = 0;

  for (int64_t k_base = int64_t(warp) * kChunk; k_base < p.k; k_base += int64_t(kWarps) * kChunk * kUnroll) {
    uint4 wl[kUnroll][2], wh[kUnroll][2], x[kUnroll][MT][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t kk = k_base + int64_t(u) * kWarps * kChunk + t * 32 + h * 16;
        const bool valid = kk < p.k;  // K % 16 == 0: a 16-byte piece is all in or all out
        wl[u][h] = load16(w_lo + kk, valid);
        wh[u][h] = load16(w_hi + kk, valid);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const int token = mt * 8 + g;
          x[u][mt][h] = load16(a + token * p.lda + kk, valid && token < p.m);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_s8(acc[mt], wl[u][h].x, wh[u][h].x, wl[u][h].y, wh[u][h].y, x[u][mt][h].x, x[u][mt][h].y);
          mma_s8(acc[mt], wl[u][h].z, wh[u][h].z, wl[u][h].w, wh[u][h].w, x[u][mt][h].z, x[u][mt][h].w);
        }
      }
    }
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    partial[warp][g][mt * 8 + t * 2] = acc[mt][0];
    partial[warp][g][mt * 8 + t * 2 + 1] = acc[mt][1];
    partial[warp][g + 8][mt * 8 + t * 2] = acc[mt][2];
    partial[warp][g + 8][mt * 8 + t * 2 + 1] = acc[mt][3];
  }
  __syncthreads();

  // One thread per (row, token): consecutive threads take consecutive output channels.
  for (int idx = threadIdx.x; idx < kRows * MT * 8; idx += kThreads) {
    const int row = idx % kRows, token = idx / kRows;
    if (token >= p.m) continue;
    int sum = 0;
#pragma unroll
    for (int wi = 0; wi < kWarps; ++wi) sum += partial[wi][row][token];
    const int64_t n = n0 + row;
    const int64_t o = b * p.batch_stride_out + token * p.ldo + n;
    if constexpr (OT == OutType::kInt32) {
      static_cast<int32_t*>(p.out)[o] = sum;
    } else {
      const float ws = p.w_per_channel ? p.w_scale[n] : p.w_scale[0];
      const float as = p.a_per_token ? p.a_scale[token] : p.a_scale[0];
      const float tw = ws * static_cast<float>(sum);
      float y = fmaf(as, tw, p.bias != nullptr ? p.bias[n] : 0.0f);
      if (p.relu && y < 0.0f) y = 0.0f;  // NaN stays NaN, like torch.clamp_min
      if constexpr (OT == OutType::kFloat16) {
        static_cast<__half*>(p.out)[o] = __float2half_rn(y);
      } else if constexpr (OT == OutType::kBFloat16) {
        static_cast<__nv_bfloat16*>(p.out)[o] = __float2bfloat16_rn(y);
      } else {
        static_cast<int8_t*>(p.out)[o] = saturate_int8(__fdiv_rn(y, p.out_scale[0]));
      }
    }
  }
}

template <int MT, int U>
const char* launch(const ScaledMMParams& p) {
  const dim3 grid(static_cast<unsigned>(p.n / kRows), static_cast<unsigned>(p.batch));
  switch (p.out_type) {
    case OutType::kFloat16: small_m_gemm_kernel<MT, U, OutType::kFloat16><<<grid, kThreads, 0, p.stream>>>(p); break;
    case OutType::kBFloat16: small_m_gemm_kernel<MT, U, OutType::kBFloat16><<<grid, kThreads, 0, p.stream>>>(p); break;
    case OutType::kInt8: small_m_gemm_kernel<MT, U, OutType::kInt8><<<grid, kThreads, 0, p.stream>>>(p); break;
    case OutType::kInt32: small_m_gemm_kernel<MT, U, OutType::kInt32><<<grid, kThreads, 0, p.stream>>>(p); break;
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* small_m_gemm(const ScaledMMParams& p, int unroll) {
  if (p.m < 1 || p.m > kSmallMMax) return "small-M GEMM: M must be in [1, 32]";
  if (p.n % kRows != 0 || p.k % 16 != 0) return "small-M GEMM: N and K must be multiples of 16";
  if (p.n / kRows > 0x7fffffff || p.batch > 65535) return "small-M GEMM: grid too large";
  if (unroll == 2) {
    if (p.m <= 8) return launch<1, 2>(p);
    if (p.m <= 16) return launch<2, 2>(p);
    return launch<4, 2>(p);
  }
  if (p.m <= 8) return launch<1, 4>(p);
  if (p.m <= 16) return launch<2, 4>(p);
  return launch<4, 2>(p);  // 4 token tiles x 4 chunks would not fit in registers
}

}  // namespace sqk
