// Instantiates the fused (residual add +) LayerNorm + int8 quantization kernels of norm_quant.cuh.
// Math, layouts and alignment: quant.h and norm_quant.cuh.
#include "norm_quant.cuh"

namespace sqk {
namespace qnorm {
template void launch_norm_rows<NormType::kLayer>(const NormQuantParams&, RowMode);
}  // namespace qnorm
}  // namespace sqk
