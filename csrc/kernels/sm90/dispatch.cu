// sm90 GEMM dispatch: picks the tile configuration by M and the instantiation by output type.
// (M <= kSmallMMax never reaches this file under GemmPath::kAuto: the small-M kernel serves decode.)
//
// | M range                 | config  | tile (MxNxK), cluster, schedule | why (H100, CUDA graphs, see   |
// |                         |         |                                 | tools/gemm_paths.py)          |
// |-------------------------|---------|---------------------------------|-------------------------------|
// | 9..256                  | Tile64  | 64x128x128, 1x1, ping-pong      | 64-row wgmma minimum wastes   |
// |                         |         |                                 | least; many tiles fill 132 SMs|
// | 257..1024, N*K < 32M    | Tile64  |                                 | small weights: the 256 tile   |
// |                         |         |                                 | leaves SMs idle (0.98x FP16   |
// |                         |         |                                 | vs 1.37x at 4096^2, M=512)    |
// | 257..1024, N*K >= 32M   | Tile256 | 128x256x128, 2x1, cooperative   | 2.11x vs 1.24x at 8192x28672  |
// | > 1024                  | Tile256 |                                 | 1555 TOPS at 8192^3 (2.24x)   |
// Tile128 (128x128x128, 1x2, cooperative) is never the best by more than noise at any measured M;
// it stays for int32 output (int8_mm) and as a comparison point.
// int32 output (int8_mm) uses Tile128 at every M: it is a test and debugging path, not a hot one.
#include "sm90/scaled_mm_sm90.cuh"

namespace sqk::sm90 {
#define SQK_DECLARE(CFG, OUT) template <> const char* run<CFG, OUT>(const ScaledMMParams& p);
SQK_DECLARE(Tile64, cutlass::half_t)
SQK_DECLARE(Tile64, cutlass::bfloat16_t)
SQK_DECLARE(Tile64, int8_t)
SQK_DECLARE(Tile128, cutlass::half_t)
SQK_DECLARE(Tile128, cutlass::bfloat16_t)
SQK_DECLARE(Tile128, int8_t)
SQK_DECLARE(Tile128, int32_t)
SQK_DECLARE(Tile256, cutlass::half_t)
SQK_DECLARE(Tile256, cutlass::bfloat16_t)
SQK_DECLARE(Tile256, int8_t)
#undef SQK_DECLARE

template <class Cfg>
static const char* by_output(const ScaledMMParams& p) {
  switch (p.out_type) {
    case OutType::kFloat16: return run<Cfg, cutlass::half_t>(p);
    case OutType::kBFloat16: return run<Cfg, cutlass::bfloat16_t>(p);
    case OutType::kInt8: return run<Cfg, int8_t>(p);
    case OutType::kInt32: return run<Tile128, int32_t>(p);
  }
  return "sm90 GEMM: unknown output type";
}

}  // namespace sqk::sm90

namespace sqk {

const char* sm90_gemm(const ScaledMMParams& p, GemmPath path) {
  if (path == GemmPath::kAuto) {
    const bool big_weight = p.n * p.k >= (int64_t(32) << 20);
    path = p.m <= 256 || (p.m <= 1024 && !big_weight) ? GemmPath::kSm90Tile64 : GemmPath::kSm90Tile256;
  }
  switch (path) {
    case GemmPath::kSm90Tile64: return sm90::by_output<sm90::Tile64>(p);
    case GemmPath::kSm90Tile128: return sm90::by_output<sm90::Tile128>(p);
    case GemmPath::kSm90Tile256: return sm90::by_output<sm90::Tile256>(p);
    default: return "sm90 GEMM: not an sm90 path";
  }
}

}  // namespace sqk
