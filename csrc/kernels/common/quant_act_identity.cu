// Instantiates the row quantization kernels of quant_act.cuh for the identity (plain per-token,
// per-tensor and static quantization) and ReLU (OPT's fc1 -> fc2) transforms.
// Math, layouts and alignment: quant.h and quant_act.cuh.
#include "quant_act.cuh"

namespace sqk {
namespace qact {
template void launch_act_rows<Activation::kIdentity>(const ActQuantParams&, RowMode);
template void launch_act_rows<Activation::kRelu>(const ActQuantParams&, RowMode);
}  // namespace qact
}  // namespace sqk
