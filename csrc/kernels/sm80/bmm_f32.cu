// INT8 attention BMM, fp32 output (attention scores for an fp32 softmax).
// Instantiates the CUTLASS 2.x 64x64 and 128x128 tiles and the small-M decode kernel for this output
// type only, so that the output types compile in parallel.
// Math, layouts and alignment: bmm.h (TN layout; K, N and strides multiples of 16).
#include "sm80/bmm_kernels.cuh"

namespace sqk {
namespace bmm {

const char* run_f32(const BmmParams& p, cudaStream_t stream, Path path) {
  return run_typed<float>(p, OutType::kF32, stream, path);
}

}  // namespace bmm
}  // namespace sqk
