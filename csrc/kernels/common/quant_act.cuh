// Activation (+ fused elementwise transform) -> int8, one thread block per row.
//
// Math: y = act(x) (or silu(gate) * up) in fp32, exactly as written in quant.h; then per-token
// dynamic, static, or one pass of per-tensor dynamic quantization (quant_row.cuh).
// Layouts: x / up [M, H], unit column stride, row strides x_stride / up_stride (elements);
// out int8 [M, H] contiguous; out_scale [M] or [1].
// Alignment: none required; 16-byte vectors when H, the row strides and the pointers allow it.
//
// Each activation is instantiated in its own translation unit (quant_act_*.cu) so the build
// parallelises; quant_api.cu picks the mode and calls launch_act_rows<A>.
#pragma once

#include "quant_row.cuh"

namespace sqk {
namespace qact {

using qrow::Raw;
using qrow::RowMode;

template <Activation A>
__device__ __forceinline__ float activate(float x, float u) {
  if constexpr (A == Activation::kIdentity) {
    return x;
  } else if constexpr (A == Activation::kRelu) {
    return x < 0.f ? 0.f : x;
  } else if constexpr (A == Activation::kGelu) {
    return __fmul_rn(__fmul_rn(x, 0.5f), __fadd_rn(1.f, erff(__fmul_rn(x, 0.70710678118654752f))));
  } else if constexpr (A == Activation::kGeluTanh) {
    const float poly = __fadd_rn(1.f, __fmul_rn(__fmul_rn(0.044715f, x), x));
    const float inner = __fmul_rn(__fmul_rn(0.7978845608028654f, x), poly);
    return __fmul_rn(__fmul_rn(x, 0.5f), __fadd_rn(1.f, tanhf(inner)));
  } else {
    static_assert(A == Activation::kSiluMul);
    return __fmul_rn(__fdiv_rn(x, __fadd_rn(1.f, expf(-x))), u);
  }
}

template <typename T, int VEC, Activation A>
__device__ __forceinline__ void transform(const Raw<T, VEC>& rx, const Raw<T, VEC>& ru, float (&y)[VEC]) {
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    y[j] = activate<A>(qrow::elem<T, VEC>(rx, j), A == Activation::kSiluMul ? qrow::elem<T, VEC>(ru, j) : 0.f);
}

template <typename T, int VEC, int NV, Activation A>
__global__ void __launch_bounds__(qrow::max_threads<NV>()) act_row_kernel(ActQuantParams p, RowMode mode) {
  __shared__ unsigned red[32];
  constexpr bool kTwoInputs = A == Activation::kSiluMul;
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* u = kTwoInputs ? static_cast<const T*>(p.up) + row * p.up_stride : nullptr;
  int8_t* out = p.out + row * p.h;
  const int nvec = static_cast<int>(p.h / VEC);

  if constexpr (NV > 0) {
    // Issue every load of the row before using any, so each thread has NV (x2) loads in flight.
    Raw<T, VEC> rx[NV] = {}, ru[NV] = {};
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int idx = threadIdx.x + i * blockDim.x;
      if (idx < nvec) {
        rx[i] = qrow::load_raw<T, VEC>(x + static_cast<int64_t>(idx) * VEC);
        if constexpr (kTwoInputs) ru[i] = qrow::load_raw<T, VEC>(u + static_cast<int64_t>(idx) * VEC);
      }
    }
    float y[NV][VEC];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      if (static_cast<int>(threadIdx.x + i * blockDim.x) < nvec) {
        transform<T, VEC, A>(rx[i], ru[i], y[i]);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) y[i][j] = 0.f;
      }
    }
    qrow::finish_row_regs<VEC, NV>(y, nvec, out, mode, row, p.out_scale, p.static_scale, red);
  } else {
    // Streaming: pass 1 finds the amax, pass 2 recomputes y (bitwise the same) and stores.
    const Raw<T, VEC> zero{};
    unsigned bits = 0;
    if (mode == RowMode::kPerToken || mode == RowMode::kTensorAmax) {
#pragma unroll 4
      for (int idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
        float y[VEC];
        const int64_t off = static_cast<int64_t>(idx) * VEC;
        transform<T, VEC, A>(qrow::load_raw<T, VEC>(x + off), kTwoInputs ? qrow::load_raw<T, VEC>(u + off) : zero, y);
#pragma unroll
        for (int j = 0; j < VEC; ++j) bits = max(bits, qrow::abs_bits(y[j]));
      }
      bits = qrow::block_max(bits, red);
    }
    const qrow::RowFactor rf = qrow::row_factor(mode, bits, row, p.out_scale, p.static_scale);
    if (mode == RowMode::kTensorAmax) return;
#pragma unroll 4
    for (int idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
      float y[VEC];
      const int64_t off = static_cast<int64_t>(idx) * VEC;
      transform<T, VEC, A>(qrow::load_raw<T, VEC>(x + off), kTwoInputs ? qrow::load_raw<T, VEC>(u + off) : zero, y);
      qrow::quantize_store<VEC>(out + off, y, rf);
    }
  }
}

template <typename T, int VEC, Activation A>
void launch_nv(const ActQuantParams& p, RowMode mode, const qrow::RowShape& s) {
  const dim3 grid(static_cast<unsigned>(p.m)), block(s.threads);
  switch (s.nv) {
    case 1: act_row_kernel<T, VEC, 1, A><<<grid, block, 0, p.stream>>>(p, mode); break;
    case 2: act_row_kernel<T, VEC, 2, A><<<grid, block, 0, p.stream>>>(p, mode); break;
    case 4: act_row_kernel<T, VEC, 4, A><<<grid, block, 0, p.stream>>>(p, mode); break;
    case 8: act_row_kernel<T, VEC, 8, A><<<grid, block, 0, p.stream>>>(p, mode); break;
    default: act_row_kernel<T, VEC, 0, A><<<grid, block, 0, p.stream>>>(p, mode); break;
  }
}

template <typename T, Activation A>
void launch_typed(const ActQuantParams& p, RowMode mode) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  bool vec_ok = p.h % kVec == 0 && p.x_stride % kVec == 0 && qrow::aligned16(p.x) && qrow::aligned16(p.out);
  if (A == Activation::kSiluMul) vec_ok = vec_ok && p.up_stride % kVec == 0 && qrow::aligned16(p.up);
  if (vec_ok) {
    launch_nv<T, kVec, A>(p, mode, qrow::row_shape(p.h, kVec));
  } else {
    launch_nv<T, 1, A>(p, mode, qrow::row_shape(p.h, 1));
  }
}

// Launch one row kernel over all p.m rows (p.m > 0) in the given mode; errors are collected by the caller.
template <Activation A>
void launch_act_rows(const ActQuantParams& p, RowMode mode) {
  switch (p.dtype) {
    case FloatType::kFloat16: launch_typed<__half, A>(p, mode); break;
    case FloatType::kBFloat16: launch_typed<__nv_bfloat16, A>(p, mode); break;
    case FloatType::kFloat32: launch_typed<float, A>(p, mode); break;
  }
}

extern template void launch_act_rows<Activation::kIdentity>(const ActQuantParams&, RowMode);
extern template void launch_act_rows<Activation::kRelu>(const ActQuantParams&, RowMode);
extern template void launch_act_rows<Activation::kGelu>(const ActQuantParams&, RowMode);
extern template void launch_act_rows<Activation::kGeluTanh>(const ActQuantParams&, RowMode);
extern template void launch_act_rows<Activation::kSiluMul>(const ActQuantParams&, RowMode);

}  // namespace qact
}  // namespace sqk
