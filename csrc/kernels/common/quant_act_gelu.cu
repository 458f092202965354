// Instantiates the row quantization kernels of quant_act.cuh for GELU, exact (erf) and tanh
// approximation (BLOOM's dense_h_to_4h -> dense_4h_to_h).
// Math, layouts and alignment: quant.h and quant_act.cuh.
#include "quant_act.cuh"

namespace sqk {
namespace qact {
template void launch_act_rows<Activation::kGelu>(const ActQuantParams&, RowMode);
template void launch_act_rows<Activation::kGeluTanh>(const ActQuantParams&, RowMode);
}  // namespace qact
}  // namespace sqk
