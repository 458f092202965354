// One instantiation of the sm80 INT8 GEMM (see scaled_mm_sm80.cuh): Tile64, cutlass::half_t output.
#include "sm80/scaled_mm_sm80.cuh"

namespace sqk::sm80 {
SQK_SM80_INSTANTIATE(Tile64, cutlass::half_t)
}  // namespace sqk::sm80
