// Torch-free API of the activation-quantization and fused norm+quantize kernels (raw pointers,
// sizes, a stream). The torch entry points are in csrc/torch/quant_ops.cpp; the Python references
// that mirror the order of operations are sq_kernels/ops/{quant,activation,norm}.py.
//
// Math (every kernel; y is the fp32 value that gets quantized, see the transforms below):
//   per-token (dynamic):  amax = max_j |y[m,j]|  (NaN-propagating), a = max(amax, EPS)
//                         scale[m] = a / 127;  q = sat_int8(rint(y * (127 / a)))
//   per-tensor (dynamic): the same with amax over the whole tensor, scale [1]
//   static:               q = sat_int8(rint(y / scale[0]))
// where rint rounds half to even, sat_int8 clamps to [-128, 127] and maps NaN to 0.
//
// Transforms (fp32; `float(.)` converts fp16/bf16/fp32 exactly):
//   identity  y = float(x)            relu  y = (x < 0 ? 0 : x)   (NaN stays NaN)
//   gelu      y = (x * 0.5) * (1 + erf(x * 0.70710678))
//   gelu_tanh y = (x * 0.5) * (1 + tanh((0.7978845608 * x) * (1 + (0.044715 * x) * x)))
//   silu_mul  y = (g / (1 + exp(-g))) * u        (x is g = gate, `up` is u)
//   rms norm  h = float(x) or float(to_T(float(x) + float(r)))  (the residual sum is rounded to
//             the input dtype T first, written to residual_out, and normalised as rounded)
//             rstd = 1 / sqrt(sum_j h^2 / H + eps);  y = (h * rstd) * float(w)
//   layer norm mean = sum_j h / H;  d = h - mean;  rstd = 1 / sqrt(sum_j d^2 / H + eps)
//             y = (d * rstd) * float(w) + float(b)
// Every multiply/add above is a separate IEEE fp32 operation (no contraction), so the reference
// reproduces y bitwise for a given mean/rstd; only the order of the row sums differs.
//
// Layouts: x (and up, residual) [M, H] with unit column stride and a row stride in elements;
// out int8 [M, H] and residual_out [M, H] contiguous; weight/bias [H] contiguous.
// Alignment: none required. 16-byte vector loads are used when H, every row stride and every base
// pointer allow it (H * sizeof(T) and row strides multiples of 16 bytes, pointers 16-byte aligned);
// otherwise a scalar path runs. Rows of up to 4096 vectors (32768 fp16/bf16 elements, 16384 fp32,
// 4096 on the scalar path) are held in registers and read once; longer rows are streamed (re-read
// through L2).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace sqk {

constexpr float kQuantEps = 1e-10f;  // smallest amax used to form a scale (all-zero rows)

enum class FloatType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

enum class Activation : int { kIdentity = 0, kRelu = 1, kGelu = 2, kGeluTanh = 3, kSiluMul = 4 };

enum class QuantMode : int {
  kPerToken = 0,          // out_scale [M] written
  kPerTensorDynamic = 1,  // out_scale [1] written (identity only): three launches, no workspace
  kStatic = 2,            // static_scale [1] read; out_scale [1] receives a copy of it
};

struct ActQuantParams {
  FloatType dtype = FloatType::kFloat16;
  Activation act = Activation::kIdentity;
  QuantMode mode = QuantMode::kPerToken;
  const void* x = nullptr;   // [M, H], row stride x_stride (elements); the gate for kSiluMul
  int64_t x_stride = 0;
  const void* up = nullptr;  // [M, H], row stride up_stride: kSiluMul only
  int64_t up_stride = 0;
  int64_t m = 0, h = 0;
  int8_t* out = nullptr;             // [M, H] contiguous
  float* out_scale = nullptr;        // [M] (per-token) or [1]; may be null for kStatic
  const float* static_scale = nullptr;  // [1], kStatic only
  cudaStream_t stream = nullptr;
};

enum class NormType : int { kRms = 0, kLayer = 1 };

struct NormQuantParams {
  FloatType dtype = FloatType::kFloat16;  // x, residual, residual_out, weight, bias
  NormType norm = NormType::kRms;
  QuantMode mode = QuantMode::kPerToken;  // kPerToken or kStatic
  const void* x = nullptr;  // [M, H], row stride x_stride
  int64_t x_stride = 0;
  const void* residual = nullptr;  // optional [M, H], row stride residual_stride
  int64_t residual_stride = 0;
  void* residual_out = nullptr;  // [M, H] contiguous, required with residual
  const void* weight = nullptr;  // [H]
  const void* bias = nullptr;    // [H] or nullptr (layer norm only)
  float eps = 1e-6f;
  int64_t m = 0, h = 0;
  int8_t* out = nullptr;
  float* out_scale = nullptr;
  const float* static_scale = nullptr;
  cudaStream_t stream = nullptr;
};

// Both return nullptr on success or a static, human-readable error message. m == 0 launches nothing.
const char* act_quant(const ActQuantParams& p);
const char* norm_quant(const NormQuantParams& p);

}  // namespace sqk
