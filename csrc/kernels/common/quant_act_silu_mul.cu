// Instantiates the row quantization kernels of quant_act.cuh for Llama's MLP activation,
// y = silu(gate) * up, quantized for down_proj (two inputs, one int8 output).
// Math, layouts and alignment: quant.h and quant_act.cuh.
#include "quant_act.cuh"

namespace sqk {
namespace qact {
template void launch_act_rows<Activation::kSiluMul>(const ActQuantParams&, RowMode);
}  // namespace qact
}  // namespace sqk
