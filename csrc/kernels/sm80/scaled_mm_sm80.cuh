// CUTLASS 2.x INT8 GEMM (mma.sync m16n8k32, cp.async multistage) for sm_80 / sm_86 / sm_89, which
// also runs on sm_90 (tests, fallback). Dequantization is fused as an Sm80 epilogue visitor tree:
//
//   out[m,n] = max(a_scale[m] * (w_scale[n] * acc[m,n]) + bias[n], floor)      (fp16 / bf16)
//   out[m,n] = sat_int8(rint(that / out_scale))                                 (int8)
//   out[m,n] = acc[m,n]                                                         (int32)
//
// The Sm80 broadcast visitors read vectors only, so per-tensor scales arrive here already expanded
// to [M] / [N] vectors (the torch entry point does that); bias may be null (reads as 0).
// Layouts: A [M,K] row-major, B = weight [N,K] row-major (ColumnMajor K x N), D [M,N] row-major.
// Alignment: K % 16 and N % 16 (16-byte vector accesses), checked by the caller (gemm.h).
#pragma once

// Order matters: the 2.x visitor headers name gemm::GemmCoord and must see cutlass::gemm first.
#include <cutlass/cutlass.h>
#include <cutlass/functional.h>
#include <cutlass/numeric_types.h>
#include <cutlass/gemm/device/gemm_universal.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/default_gemm_universal_with_visitor.h>
#include <cutlass/gemm/threadblock/threadblock_swizzle.h>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/epilogue/threadblock/fusion/visitors.hpp>
#include <cute/tensor.hpp>

#include <limits>
#include <type_traits>

#include "gemm.h"

namespace sqk::sm80 {

using namespace cute;
namespace tb = cutlass::epilogue::threadblock;

template <class T>
using maximum_nan = cutlass::maximum<T, /*PropagateNaN=*/true>;

template <int TM, int TN, int TK, int WM, int WN, int WK, int Stages_>
struct Config {
  using ThreadblockShape = cutlass::gemm::GemmShape<TM, TN, TK>;
  using WarpShape = cutlass::gemm::GemmShape<WM, WN, WK>;
  static constexpr int Stages = Stages_;
};

template <class Cfg, class OutT>
struct Gemm {
  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<OutT>::value;
  static constexpr int kEpiStages = 1;
  using ThreadMap = tb::OutputTileThreadLayout<typename Cfg::ThreadblockShape, typename Cfg::WarpShape, OutT,
                                               kAlignD, kEpiStages>;
  static constexpr bool kInt32 = std::is_same_v<OutT, int32_t>;
  static constexpr bool kInt8 = std::is_same_v<OutT, int8_t>;

  using Acc = tb::VisitorAccFetch;
  using AScale = tb::VisitorColBroadcast<ThreadMap, float, Stride<_1, _0, int64_t>>;
  using WScale = tb::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, int64_t>>;
  using Bias = tb::VisitorRowBroadcast<ThreadMap, float, Stride<_0, _1, int64_t>>;
  using Scalar = tb::VisitorScalarBroadcast<float>;
  using ScaleW = tb::Sm80EVT<tb::VisitorCompute<cutlass::multiplies, float, float, RN>, WScale, Acc>;
  using Dequant = tb::Sm80EVT<tb::VisitorCompute<cutlass::homogeneous_multiply_add, float, float, RN>, AScale,
                              ScaleW, Bias>;
  using Floored = tb::Sm80EVT<tb::VisitorCompute<maximum_nan, std::conditional_t<kInt8, float, OutT>, float, RN>,
                              Dequant, Scalar>;
  using Requant = tb::Sm80EVT<tb::VisitorCompute<cutlass::divides, int8_t, float, RN>, Floored, Scalar>;
  using Raw = tb::Sm80EVT<tb::VisitorCompute<cutlass::epilogue::thread::Identity, int32_t, int32_t, RN>, Acc>;
  using Tree = std::conditional_t<kInt32, Raw, std::conditional_t<kInt8, Requant, Floored>>;
  using Store = tb::VisitorAuxStore<ThreadMap, OutT, RN, Stride<int64_t, _1, int64_t>>;
  using EVT = tb::Sm80EVT<Store, Tree>;

  using Kernel = typename cutlass::gemm::kernel::DefaultGemmWithVisitor<
      int8_t, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignAB,
      int8_t, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignAB,
      OutT, cutlass::layout::RowMajor, kAlignD, int32_t, float, cutlass::arch::OpClassTensorOp,
      cutlass::arch::Sm80, typename Cfg::ThreadblockShape, typename Cfg::WarpShape,
      cutlass::gemm::GemmShape<16, 8, 32>, EVT, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>,
      Cfg::Stages, cutlass::arch::OpMultiplyAddSaturate, kEpiStages>::GemmKernel;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static typename Tree::Arguments tree_arguments(const ScaledMMParams& p) {
    if constexpr (kInt32) {
      return {};
    } else {
      const float floor = p.relu ? 0.0f : -std::numeric_limits<float>::infinity();
      typename Scalar::Arguments floor_args;
      floor_args.scalars[0] = floor;
      typename Floored::Arguments floored{
          {{p.a_scale, 0.0f, {_1{}, _0{}, int64_t(0)}},
           {{p.w_scale, 0.0f, {_0{}, _1{}, int64_t(0)}}, {}, {}},
           {p.bias, 0.0f, {_0{}, _1{}, int64_t(0)}},
           {}},
          floor_args,
          {}};
      if constexpr (kInt8) {
        typename Scalar::Arguments out_scale;
        out_scale.scalar_ptrs[0] = p.out_scale;
        return {floored, out_scale, {}};
      } else {
        return floored;
      }
    }
  }

  static const char* run(const ScaledMMParams& p) {
    typename EVT::Arguments evt{tree_arguments(p),
                                {static_cast<OutT*>(p.out), {p.ldo, _1{}, p.batch_stride_out}}};
    typename Device::Arguments args(
        p.batch > 1 ? cutlass::gemm::GemmUniversalMode::kBatched : cutlass::gemm::GemmUniversalMode::kGemm,
        cutlass::gemm::GemmCoord(static_cast<int>(p.m), static_cast<int>(p.n), static_cast<int>(p.k)),
        static_cast<int>(p.batch), evt, p.a, p.w, nullptr, nullptr, p.batch_stride_a, p.batch_stride_w, 0, 0,
        p.lda, p.ldw, 0, 0);
    Device gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "sm80 GEMM: CUTLASS cannot implement this problem";
    if (Device::get_workspace_size(args) != 0) return "sm80 GEMM: this configuration needs a workspace (not supported)";
    if (gemm.initialize(args, nullptr, p.stream) != cutlass::Status::kSuccess) return "sm80 GEMM: initialize failed";
    if (gemm.run(p.stream) != cutlass::Status::kSuccess) return "sm80 GEMM: kernel launch failed";
    return nullptr;
  }
};

// 64-row tile for M <= 128 (less waste at small M), 128x128 for everything larger.
using Tile64 = Config<64, 128, 64, 32, 64, 64, 5>;
using Tile128 = Config<128, 128, 64, 64, 64, 64, 4>;

template <class Cfg, class OutT>
const char* run(const ScaledMMParams& p);

#define SQK_SM80_INSTANTIATE(CFG, OUT)                                           \
  template <>                                                                   \
  const char* run<CFG, OUT>(const ScaledMMParams& p) {                          \
    return Gemm<CFG, OUT>::run(p);                                              \
  }

}  // namespace sqk::sm80
