// One instantiation of the sm90 INT8 GEMM (see scaled_mm_sm90.cuh): Tile256, cutlass::bfloat16_t output.
#include "sm90/scaled_mm_sm90.cuh"

namespace sqk::sm90 {
SQK_SM90_INSTANTIATE(Tile256, cutlass::bfloat16_t)
}  // namespace sqk::sm90
