// Fused (residual add +) RMSNorm / LayerNorm + int8 quantization, one thread block per row.
//
// Math (quant.h has the full statement):
//   h    = x                or  s = to_T(x + r) (written to residual_out), h = float(s)
//   rms:   rstd = 1 / sqrt(sum(h^2) / H + eps)                   y = (h * rstd) * w
//   layer: mean = sum(h) / H, d = h - mean, rstd = 1 / sqrt(sum(d^2) / H + eps)
//                                                                y = (d * rstd) * w + b
//   then per-token dynamic (scale [M]) or static (scale [1]) quantization of y.
// The row sums are fp32 (per thread, then a fixed-order block reduction), so two runs agree
// bitwise; the layer-norm variance is the two-pass sum of squared deviations (no E[x^2] - mean^2
// cancellation).
// Layouts: x, residual [M, H] with unit column stride and row strides; residual_out, out [M, H]
// contiguous; weight, bias [H] contiguous, same dtype as x.
// Alignment: none required; 16-byte vectors when H, row strides and all pointers allow it.
//
// Rows of up to 4096 vectors stay in registers: one read of x (and r) from memory, one write of
// the int8 row (and the residual sum). Longer rows are streamed in 3-4 passes through L2.
#pragma once

#include "quant_row.cuh"

namespace sqk {
namespace qnorm {

using qrow::Raw;
using qrow::RowMode;

template <typename T, int VEC, int NV, NormType N>
__global__ void __launch_bounds__(qrow::max_threads<NV>()) norm_row_kernel(NormQuantParams p, RowMode mode) {
  __shared__ float redf[32];
  __shared__ unsigned redu[32];
  const int64_t row = blockIdx.x;
  const bool has_res = p.residual != nullptr;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  const T* r = has_res ? static_cast<const T*>(p.residual) + row * p.residual_stride : nullptr;
  T* rout = has_res ? static_cast<T*>(p.residual_out) + row * p.h : nullptr;
  const T* w = static_cast<const T*>(p.weight);
  const T* b = static_cast<const T*>(p.bias);
  int8_t* out = p.out + row * p.h;
  const int nvec = static_cast<int>(p.h / VEC);
  const float hf = static_cast<float>(p.h);

  // h for one vector: x, or the residual sum rounded to T (stored when `store` is set).
  auto input = [&](int idx, const Raw<T, VEC>& rx, const Raw<T, VEC>& rr, float (&hv)[VEC], bool store) {
    if (has_res) {
      T se[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        se[j] = qrow::from_float<T>(__fadd_rn(qrow::elem<T, VEC>(rx, j), qrow::elem<T, VEC>(rr, j)));
        hv[j] = qrow::to_float(se[j]);
      }
      if (store) qrow::store_raw<T, VEC>(rout + static_cast<int64_t>(idx) * VEC, qrow::pack<T, VEC>(se));
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) hv[j] = qrow::elem<T, VEC>(rx, j);
    }
  };
  // y from the centred (layer) or raw (rms) value d, in place.
  auto affine = [&](int idx, float (&dv)[VEC], float rstd) {
    const int64_t off = static_cast<int64_t>(idx) * VEC;
    const Raw<T, VEC> wr = qrow::load_raw<T, VEC>(w + off);
    Raw<T, VEC> br{};
    if (N == NormType::kLayer && b != nullptr) br = qrow::load_raw<T, VEC>(b + off);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float y = __fmul_rn(__fmul_rn(dv[j], rstd), qrow::elem<T, VEC>(wr, j));
      if (N == NormType::kLayer && b != nullptr) y = __fadd_rn(y, qrow::elem<T, VEC>(br, j));
      dv[j] = y;
    }
  };
  auto rstd_of = [&](float sum_sq) { return __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(sum_sq, hf), p.eps))); };

  if constexpr (NV > 0) {
    Raw<T, VEC> rx[NV] = {}, rr[NV] = {};
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int idx = threadIdx.x + i * blockDim.x;
      if (idx < nvec) {
        rx[i] = qrow::load_raw<T, VEC>(x + static_cast<int64_t>(idx) * VEC);
        if (has_res) rr[i] = qrow::load_raw<T, VEC>(r + static_cast<int64_t>(idx) * VEC);
      }
    }
    float v[NV][VEC];
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int idx = threadIdx.x + i * blockDim.x;
      if (idx < nvec) {
        input(idx, rx[i], rr[i], v[i], true);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = 0.f;
      }
    }
    if constexpr (N == NormType::kLayer) {
      float s = 0.f;
#pragma unroll
      for (int i = 0; i < NV; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) s = __fadd_rn(s, v[i][j]);
      const float mean = __fdiv_rn(qrow::block_sum(s, redf), hf);
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const bool valid = static_cast<int>(threadIdx.x + i * blockDim.x) < nvec;
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[i][j] = valid ? __fsub_rn(v[i][j], mean) : 0.f;
      }
    }
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < NV; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j) ss = __fmaf_rn(v[i][j], v[i][j], ss);
    const float rstd = rstd_of(qrow::block_sum(ss, redf));
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int idx = threadIdx.x + i * blockDim.x;
      if (idx < nvec) affine(idx, v[i], rstd);
    }
    qrow::finish_row_regs<VEC, NV>(v, nvec, out, mode, row, p.out_scale, p.static_scale, redu);
  } else {
    const Raw<T, VEC> zero{};
    auto load = [&](int idx, float (&hv)[VEC], bool store) {
      const int64_t off = static_cast<int64_t>(idx) * VEC;
      input(idx, qrow::load_raw<T, VEC>(x + off), has_res ? qrow::load_raw<T, VEC>(r + off) : zero, hv, store);
    };
    float mean = 0.f, acc = 0.f;
    for (int idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
      float hv[VEC];
      load(idx, hv, true);
#pragma unroll
      for (int j = 0; j < VEC; ++j) acc = N == NormType::kLayer ? __fadd_rn(acc, hv[j]) : __fmaf_rn(hv[j], hv[j], acc);
    }
    if constexpr (N == NormType::kLayer) {
      mean = __fdiv_rn(qrow::block_sum(acc, redf), hf);
      acc = 0.f;
      for (int idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
        float hv[VEC];
        load(idx, hv, false);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float d = __fsub_rn(hv[j], mean);
          acc = __fmaf_rn(d, d, acc);
        }
      }
    }
    const float rstd = rstd_of(qrow::block_sum(acc, redf));
    auto value = [&](int idx, float (&yv)[VEC]) {
      load(idx, yv, false);
      if (N == NormType::kLayer) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) yv[j] = __fsub_rn(yv[j], mean);
      }
      affine(idx, yv, rstd);
    };
    unsigned bits = 0;
    if (mode == RowMode::kPerToken) {
      for (int idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
        float yv[VEC];
        value(idx, yv);
#pragma unroll
        for (int j = 0; j < VEC; ++j) bits = max(bits, qrow::abs_bits(yv[j]));
      }
      bits = qrow::block_max(bits, redu);
    }
    const qrow::RowFactor rf = qrow::row_factor(mode, bits, row, p.out_scale, p.static_scale);
    for (int idx = threadIdx.x; idx < nvec; idx += blockDim.x) {
      float yv[VEC];
      value(idx, yv);
      qrow::quantize_store<VEC>(out + static_cast<int64_t>(idx) * VEC, yv, rf);
    }
  }
}

template <typename T, int VEC, NormType N>
void launch_nv(const NormQuantParams& p, RowMode mode, const qrow::RowShape& s) {
  const dim3 grid(static_cast<unsigned>(p.m)), block(s.threads);
  switch (s.nv) {
    case 1: norm_row_kernel<T, VEC, 1, N><<<grid, block, 0, p.stream>>>(p, mode); break;
    case 2: norm_row_kernel<T, VEC, 2, N><<<grid, block, 0, p.stream>>>(p, mode); break;
    case 4: norm_row_kernel<T, VEC, 4, N><<<grid, block, 0, p.stream>>>(p, mode); break;
    case 8: norm_row_kernel<T, VEC, 8, N><<<grid, block, 0, p.stream>>>(p, mode); break;
    default: norm_row_kernel<T, VEC, 0, N><<<grid, block, 0, p.stream>>>(p, mode); break;
  }
}

template <typename T, NormType N>
void launch_typed(const NormQuantParams& p, RowMode mode) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  bool vec_ok = p.h % kVec == 0 && p.x_stride % kVec == 0 && qrow::aligned16(p.x) && qrow::aligned16(p.out) &&
                qrow::aligned16(p.weight) && (p.bias == nullptr || qrow::aligned16(p.bias));
  if (p.residual != nullptr)
    vec_ok = vec_ok && p.residual_stride % kVec == 0 && qrow::aligned16(p.residual) && qrow::aligned16(p.residual_out);
  if (vec_ok) {
    launch_nv<T, kVec, N>(p, mode, qrow::row_shape(p.h, kVec));
  } else {
    launch_nv<T, 1, N>(p, mode, qrow::row_shape(p.h, 1));
  }
}

// One row kernel over all p.m rows (p.m > 0); mode is kPerToken or kStatic.
template <NormType N>
void launch_norm_rows(const NormQuantParams& p, RowMode mode) {
  switch (p.dtype) {
    case FloatType::kFloat16: launch_typed<__half, N>(p, mode); break;
    case FloatType::kBFloat16: launch_typed<__nv_bfloat16, N>(p, mode); break;
    case FloatType::kFloat32: launch_typed<float, N>(p, mode); break;
  }
}

extern template void launch_norm_rows<NormType::kRms>(const NormQuantParams&, RowMode);
extern template void launch_norm_rows<NormType::kLayer>(const NormQuantParams&, RowMode);

}  // namespace qnorm
}  // namespace sqk
