// CUDA implementations of the quantization ops defined in sq_kernels/ops/{quant,activation,norm}.py:
//   quantize_per_token, quantize_per_tensor_dynamic, quantize_static,
//   act_quant (relu / gelu / gelu_tanh), silu_mul_quant,
//   rms_norm_quant, add_rms_norm_quant, layer_norm_quant, add_layer_norm_quant.
// Each checks its arguments with the messages of the Python references (ValueError naming the op and
// the argument), allocates the outputs, and calls the torch-free kernels of csrc/kernels/quant.h on
// the current stream. M = 0 launches nothing. Nothing here synchronises the host.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "checks.h"
#include "quant.h"

namespace sqk {
namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

FloatType float_type(const char* op, const char* arg, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kFloat: return FloatType::kFloat32;
    default: break;
  }
  TORCH_CHECK_VALUE(false, op, ": ", arg, " must be float16, bfloat16 or float32, got ", t.scalar_type());
}

// A 2-D [M, H] float input with a unit column stride (the rows may be strided).
void check_rows(const char* op, const char* arg, const at::Tensor& t) {
  check_cuda(op, arg, t);
  float_type(op, arg, t);
  check_dim(op, arg, t, 2, "[M, H]");
  TORCH_CHECK_VALUE(t.numel() == 0 || t.stride(1) == 1, op, ": ", arg,
                    " must have a contiguous last dimension (stride(1) == 1), got strides ", t.strides());
}

// Row stride in elements; a single row may carry any stride, so report the dense one.
int64_t row_stride(const at::Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

void check_like(const char* op, const char* arg, const at::Tensor& t, const char* ref_arg, const at::Tensor& ref) {
  check_cuda(op, arg, t);
  check_same_device(op, arg, t, ref);
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " must have the dtype of ", ref_arg, " (",
                    ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", arg, " has shape ", t.sizes(), " but ", ref_arg, " has ",
                    ref.sizes());
}

void check_static_scale(const char* op, const at::Tensor& scale, const at::Tensor& x) {
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.numel() == 1, op,
                    ": scale must be a 1-element float32 tensor, got ", scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK_VALUE(scale.device() == x.device(), op, ": scale is on ", scale.device(), " but x is on ", x.device());
}

// A [H] weight or bias of x's dtype, contiguous.
void check_vector(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& x) {
  const int64_t h = x.size(1);
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), op, ": ", arg, " must have the dtype of x (",
                    x.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == h, op, ": ", arg, " must have shape [", h, "] (H), got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", arg, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(h <= 1 || t.stride(0) == 1, op, ": ", arg, " must be contiguous, got stride ", t.stride(0));
}

void run(const char* op, const char* err) {
  TORCH_CHECK(err == nullptr, op, ": kernel launch failed: ", err);
}

at::Tensor int8_like(const at::Tensor& x) { return at::empty(x.sizes(), x.options().dtype(at::kChar)); }

at::Tensor scale_out(const at::Tensor& x, const std::optional<at::Tensor>& scale) {
  return at::empty({scale.has_value() ? 1 : x.size(0)}, x.options().dtype(at::kFloat));
}

// The shared body of the single-input quantizers.
Pair quantize_rows(const char* op, const at::Tensor& x, Activation act, QuantMode mode,
                   const std::optional<at::Tensor>& scale) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_q = int8_like(x);
  at::Tensor x_scale = at::empty({mode == QuantMode::kPerToken ? x.size(0) : 1}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0) {
    if (mode == QuantMode::kStatic) x_scale.copy_(scale->reshape({1}));
    if (mode == QuantMode::kPerTensorDynamic) x_scale.fill_(kQuantEps / 127.f);
    return {x_q, x_scale};
  }
  ActQuantParams p;
  p.dtype = float_type(op, "x", x);
  p.act = act;
  p.mode = mode;
  p.x = x.data_ptr();
  p.x_stride = row_stride(x);
  p.m = x.size(0);
  p.h = x.size(1);
  p.out = x_q.data_ptr<int8_t>();
  p.out_scale = x_scale.data_ptr<float>();
  p.static_scale = mode == QuantMode::kStatic ? scale->data_ptr<float>() : nullptr;
  p.stream = current_stream(x);
  run(op, act_quant(p));
  return {x_q, x_scale};
}

Pair quantize_per_token(const at::Tensor& x) {
  const char* op = "quantize_per_token";
  check_rows(op, "x", x);
  return quantize_rows(op, x, Activation::kIdentity, QuantMode::kPerToken, std::nullopt);
}

Pair quantize_per_tensor_dynamic(const at::Tensor& x) {
  const char* op = "quantize_per_tensor_dynamic";
  check_rows(op, "x", x);
  return quantize_rows(op, x, Activation::kIdentity, QuantMode::kPerTensorDynamic, std::nullopt);
}

at::Tensor quantize_static(const at::Tensor& x, const at::Tensor& scale) {
  const char* op = "quantize_static";
  check_rows(op, "x", x);
  check_static_scale(op, scale, x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_q = int8_like(x);
  if (x.size(0) == 0) return x_q;
  ActQuantParams p;
  p.dtype = float_type(op, "x", x);
  p.mode = QuantMode::kStatic;
  p.x = x.data_ptr();
  p.x_stride = row_stride(x);
  p.m = x.size(0);
  p.h = x.size(1);
  p.out = x_q.data_ptr<int8_t>();
  p.out_scale = nullptr;  // this op returns no scale
  p.static_scale = scale.data_ptr<float>();
  p.stream = current_stream(x);
  run(op, act_quant(p));
  return x_q;
}

Pair act_quant_op(const at::Tensor& x, c10::string_view act, const std::optional<at::Tensor>& scale) {
  const char* op = "act_quant";
  check_rows(op, "x", x);
  Activation a;
  if (act == "relu") {
    a = Activation::kRelu;
  } else if (act == "gelu") {
    a = Activation::kGelu;
  } else if (act == "gelu_tanh") {
    a = Activation::kGeluTanh;
  } else {
    TORCH_CHECK_VALUE(false, op, ": act must be one of ('relu', 'gelu', 'gelu_tanh'), got '", std::string(act), "'");
  }
  if (scale.has_value()) check_static_scale(op, *scale, x);
  return quantize_rows(op, x, a, scale.has_value() ? QuantMode::kStatic : QuantMode::kPerToken, scale);
}

Pair silu_mul_quant(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& scale) {
  const char* op = "silu_mul_quant";
  check_rows(op, "gate", gate);
  check_rows(op, "up", up);
  TORCH_CHECK_VALUE(up.scalar_type() == gate.scalar_type(), op, ": up is ", up.scalar_type(), " but gate is ",
                    gate.scalar_type(), "; they must match");
  TORCH_CHECK_VALUE(up.sizes() == gate.sizes(), op, ": up has shape ", up.sizes(), " but gate has ", gate.sizes(),
                    "; they must match");
  TORCH_CHECK_VALUE(up.device() == gate.device(), op, ": up is on ", up.device(), " but gate is on ", gate.device());
  if (scale.has_value()) check_static_scale(op, *scale, gate);
  const QuantMode mode = scale.has_value() ? QuantMode::kStatic : QuantMode::kPerToken;
  const c10::cuda::CUDAGuard guard(gate.device());
  at::Tensor x_q = int8_like(gate);
  at::Tensor x_scale = scale_out(gate, scale);
  if (gate.size(0) == 0) {
    if (scale.has_value()) x_scale.copy_(scale->reshape({1}));
    return {x_q, x_scale};
  }
  ActQuantParams p;
  p.dtype = float_type(op, "gate", gate);
  p.act = Activation::kSiluMul;
  p.mode = mode;
  p.x = gate.data_ptr();
  p.x_stride = row_stride(gate);
  p.up = up.data_ptr();
  p.up_stride = row_stride(up);
  p.m = gate.size(0);
  p.h = gate.size(1);
  p.out = x_q.data_ptr<int8_t>();
  p.out_scale = x_scale.data_ptr<float>();
  p.static_scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  p.stream = current_stream(gate);
  run(op, act_quant(p));
  return {x_q, x_scale};
}

// The shared body of the four norm ops; residual_out is defined iff residual is.
Triple norm_quant_op(const char* op, NormType norm, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                     const at::Tensor& weight, const std::optional<at::Tensor>& bias, double eps,
                     const std::optional<at::Tensor>& scale) {
  check_rows(op, "x", x);
  TORCH_CHECK_VALUE(x.size(1) >= 1, op, ": x must have at least one column (H >= 1), got shape ", x.sizes());
  if (residual.has_value()) {
    check_rows(op, "residual", *residual);
    check_like(op, "residual", *residual, "x", x);
  }
  check_vector(op, "weight", weight, x);
  if (bias.has_value()) check_vector(op, "bias", *bias, x);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, op, ": eps must be a finite number > 0, got ", eps);
  if (scale.has_value()) check_static_scale(op, *scale, x);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_q = int8_like(x);
  at::Tensor x_scale = scale_out(x, scale);
  at::Tensor res_out = residual.has_value() ? at::empty(x.sizes(), x.options()) : at::Tensor();
  if (x.size(0) == 0) {
    if (scale.has_value()) x_scale.copy_(scale->reshape({1}));
    return {x_q, x_scale, res_out};
  }
  NormQuantParams p;
  p.dtype = float_type(op, "x", x);
  p.norm = norm;
  p.mode = scale.has_value() ? QuantMode::kStatic : QuantMode::kPerToken;
  p.x = x.data_ptr();
  p.x_stride = row_stride(x);
  if (residual.has_value()) {
    p.residual = residual->data_ptr();
    p.residual_stride = row_stride(*residual);
    p.residual_out = res_out.data_ptr();
  }
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.eps = static_cast<float>(eps);
  p.m = x.size(0);
  p.h = x.size(1);
  p.out = x_q.data_ptr<int8_t>();
  p.out_scale = x_scale.data_ptr<float>();
  p.static_scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  p.stream = current_stream(x);
  run(op, norm_quant(p));
  return {x_q, x_scale, res_out};
}

Pair rms_norm_quant(const at::Tensor& x, const at::Tensor& weight, double eps, const std::optional<at::Tensor>& scale) {
  auto [q, s, r] = norm_quant_op("rms_norm_quant", NormType::kRms, x, std::nullopt, weight, std::nullopt, eps, scale);
  return {q, s};
}

Triple add_rms_norm_quant(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                          const std::optional<at::Tensor>& scale) {
  return norm_quant_op("add_rms_norm_quant", NormType::kRms, x, residual, weight, std::nullopt, eps, scale);
}

Pair layer_norm_quant(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      double eps, const std::optional<at::Tensor>& scale) {
  auto [q, s, r] = norm_quant_op("layer_norm_quant", NormType::kLayer, x, std::nullopt, weight, bias, eps, scale);
  return {q, s};
}

Triple add_layer_norm_quant(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, double eps, const std::optional<at::Tensor>& scale) {
  return norm_quant_op("add_layer_norm_quant", NormType::kLayer, x, residual, weight, bias, eps, scale);
}

}  // namespace
}  // namespace sqk

TORCH_LIBRARY_IMPL(sq_kernels, CUDA, m) {
  m.impl("quantize_per_token", &sqk::quantize_per_token);
  m.impl("quantize_per_tensor_dynamic", &sqk::quantize_per_tensor_dynamic);
  m.impl("quantize_static", &sqk::quantize_static);
  m.impl("act_quant", &sqk::act_quant_op);
  m.impl("silu_mul_quant", &sqk::silu_mul_quant);
  m.impl("rms_norm_quant", &sqk::rms_norm_quant);
  m.impl("add_rms_norm_quant", &sqk::add_rms_norm_quant);
  m.impl("layer_norm_quant", &sqk::layer_norm_quant);
  m.impl("add_layer_norm_quant", &sqk::add_layer_norm_quant);
}
