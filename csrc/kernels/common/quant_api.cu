// Entry points of quant.h: validate the plain parameters, pick the row mode, launch.
//
// Math, layouts and alignment: quant.h. Per-tensor dynamic quantization runs three launches on the
// caller's stream and needs no workspace: out_scale[0] is zeroed and collects the tensor's amax bits
// (atomicMax over the rows' maxima; for non-negative floats the bit order is the value order), the
// second pass quantizes with 127 / max(amax, EPS), and a one-thread kernel turns the amax into the
// scale. Everything is stream-ordered, so the sequence can be captured in a CUDA graph.
#include <cstdint>
#include <limits>

#include "norm_quant.cuh"
#include "quant.h"
#include "quant_act.cuh"

namespace sqk {

namespace {

__global__ void finalize_tensor_scale(float* scale) {
  scale[0] = __fdiv_rn(qrow::clamp_amax(scale[0]), 127.f);
}

const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

bool valid_dtype(FloatType t) {
  return t == FloatType::kFloat16 || t == FloatType::kBFloat16 || t == FloatType::kFloat32;
}

constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();  // grid.x
constexpr int64_t kMaxCols = std::numeric_limits<int32_t>::max();  // int vector indices

void launch_rows(const ActQuantParams& p, qrow::RowMode mode) {
  switch (p.act) {
    case Activation::kIdentity: qact::launch_act_rows<Activation::kIdentity>(p, mode); break;
    case Activation::kRelu: qact::launch_act_rows<Activation::kRelu>(p, mode); break;
    case Activation::kGelu: qact::launch_act_rows<Activation::kGelu>(p, mode); break;
    case Activation::kGeluTanh: qact::launch_act_rows<Activation::kGeluTanh>(p, mode); break;
    case Activation::kSiluMul: qact::launch_act_rows<Activation::kSiluMul>(p, mode); break;
  }
}

}  // namespace

const char* act_quant(const ActQuantParams& p) {
  if (!valid_dtype(p.dtype)) return "act_quant: unsupported input dtype";
  if (p.m < 0 || p.h < 0) return "act_quant: negative size";
  if (p.m > kMaxRows) return "act_quant: more than 2^31 - 1 rows";
  if (p.h > kMaxCols) return "act_quant: more than 2^31 - 1 columns";
  if (p.act < Activation::kIdentity || p.act > Activation::kSiluMul) return "act_quant: unknown activation";
  if (p.mode == QuantMode::kPerTensorDynamic && p.act != Activation::kIdentity)
    return "act_quant: per-tensor dynamic quantization is implemented for the identity transform only";
  if (p.m == 0) return nullptr;
  if (p.out_scale == nullptr && p.mode != QuantMode::kStatic) return "act_quant: out_scale is null";
  if (p.h > 0 && (p.x == nullptr || p.out == nullptr)) return "act_quant: x or out is null";
  if (p.act == Activation::kSiluMul && p.h > 0 && p.up == nullptr) return "act_quant: silu_mul needs `up`";
  if (p.x_stride < 0 || p.up_stride < 0) return "act_quant: negative row stride";
  switch (p.mode) {
    case QuantMode::kPerToken:
      launch_rows(p, qrow::RowMode::kPerToken);
      break;
    case QuantMode::kStatic:
      if (p.static_scale == nullptr) return "act_quant: static quantization needs static_scale";
      launch_rows(p, qrow::RowMode::kStatic);
      break;
    case QuantMode::kPerTensorDynamic: {
      const cudaError_t err = cudaMemsetAsync(p.out_scale, 0, sizeof(float), p.stream);
      if (err != cudaSuccess) return cudaGetErrorString(err);
      launch_rows(p, qrow::RowMode::kTensorAmax);
      launch_rows(p, qrow::RowMode::kTensorQuant);
      finalize_tensor_scale<<<1, 1, 0, p.stream>>>(p.out_scale);
      break;
    }
    default:
      return "act_quant: unknown quantization mode";
  }
  return launch_error();
}

const char* norm_quant(const NormQuantParams& p) {
  if (!valid_dtype(p.dtype)) return "norm_quant: unsupported input dtype";
  if (p.norm != NormType::kRms && p.norm != NormType::kLayer) return "norm_quant: unknown norm";
  if (p.m < 0 || p.h < 1) return "norm_quant: needs m >= 0 and h >= 1";
  if (p.m > kMaxRows) return "norm_quant: more than 2^31 - 1 rows";
  if (p.h > kMaxCols) return "norm_quant: more than 2^31 - 1 columns";
  if (p.mode != QuantMode::kPerToken && p.mode != QuantMode::kStatic)
    return "norm_quant: the mode must be per-token dynamic or static";
  if (p.m == 0) return nullptr;
  if (p.x == nullptr || p.weight == nullptr || p.out == nullptr) return "norm_quant: x, weight or out is null";
  if (p.out_scale == nullptr && p.mode != QuantMode::kStatic) return "norm_quant: out_scale is null";
  if (p.residual != nullptr && p.residual_out == nullptr) return "norm_quant: residual needs residual_out";
  if (p.x_stride < 0 || p.residual_stride < 0) return "norm_quant: negative row stride";
  if (p.mode == QuantMode::kStatic && p.static_scale == nullptr)
    return "norm_quant: static quantization needs static_scale";
  const qrow::RowMode mode = p.mode == QuantMode::kStatic ? qrow::RowMode::kStatic : qrow::RowMode::kPerToken;
  if (p.norm == NormType::kRms) {
    qnorm::launch_norm_rows<NormType::kRms>(p, mode);
  } else {
    qnorm::launch_norm_rows<NormType::kLayer>(p, mode);
  }
  return launch_error();
}

}  // namespace sqk
