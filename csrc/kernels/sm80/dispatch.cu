// sm80-family GEMM dispatch (A100, A10/L4/L40 and, for tests, H100). M <= 32 never gets here under
// GemmPath::kAuto: the small-M kernel serves decode on every architecture.
//
// | M range | config  | threadblock / warp tile, stages | why                                           |
// |---------|---------|---------------------------------|-----------------------------------------------|
// | <= 128  | Tile64  | 64x128x64 / 32x64x64, 5 stages  | half the wasted rows of a 128-row tile; 5     |
// |         |         |                                 | stages x 12 KB = 60 KB fits sm_86/89's 100 KB |
// | > 128   | Tile128 | 128x128x64 / 64x64x64, 4 stages | the usual A100 int8 tile; 4 x 16 KB = 64 KB   |
// int8 and int32 outputs use Tile128 at every M (fewer instantiations; not decode paths).
#include "sm80/scaled_mm_sm80.cuh"

namespace sqk::sm80 {
#define SQK_DECLARE(CFG, OUT) template <> const char* run<CFG, OUT>(const ScaledMMParams& p);
SQK_DECLARE(Tile64, cutlass::half_t)
SQK_DECLARE(Tile64, cutlass::bfloat16_t)
SQK_DECLARE(Tile128, cutlass::half_t)
SQK_DECLARE(Tile128, cutlass::bfloat16_t)
SQK_DECLARE(Tile128, int8_t)
SQK_DECLARE(Tile128, int32_t)
#undef SQK_DECLARE
}  // namespace sqk::sm80

namespace sqk {

const char* sm80_gemm(const ScaledMMParams& p) {
  const bool small = p.m <= 128;
  switch (p.out_type) {
    case OutType::kFloat16:
      return small ? sm80::run<sm80::Tile64, cutlass::half_t>(p) : sm80::run<sm80::Tile128, cutlass::half_t>(p);
    case OutType::kBFloat16:
      return small ? sm80::run<sm80::Tile64, cutlass::bfloat16_t>(p)
                   : sm80::run<sm80::Tile128, cutlass::bfloat16_t>(p);
    case OutType::kInt8: return sm80::run<sm80::Tile128, int8_t>(p);
    case OutType::kInt32: return sm80::run<sm80::Tile128, int32_t>(p);
  }
  return "sm80 GEMM: unknown output type";
}

}  // namespace sqk
