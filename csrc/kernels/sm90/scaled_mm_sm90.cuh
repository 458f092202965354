// CUTLASS 3.x INT8 GEMM for Hopper (sm_90a): TMA loads, wgmma, warp-specialized persistent kernels,
// and the dequantization fused into the epilogue as an epilogue visitor tree (EVT).
//
//   out[m,n] = max(a_scale[m] * (w_scale[n] * acc[m,n]) + bias[n], floor)      (fp16 / bf16)
//   out[m,n] = sat_int8(rint(that / out_scale))                                 (int8)
//   out[m,n] = acc[m,n]                                                         (int32)
//
// floor is -inf, or 0 for a fused ReLU: one runtime scalar instead of a second instantiation.
// Scales use CUTLASS's dynamic broadcast (a bool stride): stride 1 reads a vector (per-token /
// per-channel), stride 0 re-reads element 0 (per-tensor), so one kernel serves every granularity.
// Bias is a row broadcast whose null pointer means 0.
//
// Layouts: A = activations [M,K] row-major, B = weight [N,K] row-major (ColumnMajor K x N in CUTLASS
// terms): both K-major, the only layout int8 wgmma accepts. D [M,N] row-major. TMA needs 16-byte
// aligned base pointers and strides: K % 16, N % 16 (checked by the caller, see gemm.h).
// This header is included only by csrc/kernels/sm90/*.cu, which are compiled for sm_90a alone.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_compute_tma_warpspecialized.hpp>
#include <cutlass/epilogue/fusion/sm90_visitor_load_tma_warpspecialized.hpp>
#include <cutlass/epilogue/thread/activation.h>
#include <cutlass/functional.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/numeric_types.h>

#include <limits>
#include <type_traits>

#include "gemm.h"

namespace sqk::sm90 {

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

template <class T>
using maximum_nan = cutlass::maximum<T, /*PropagateNaN=*/true>;

// One kernel configuration: CTA tile (M x N x K), cluster shape and schedules.
template <int TM, int TN, int TK, int CM, int CN, class KernelSchedule_, class EpilogueSchedule_>
struct Config {
  using TileShape = Shape<Int<TM>, Int<TN>, Int<TK>>;
  using ClusterShape = Shape<Int<CM>, Int<CN>, _1>;
  using KernelSchedule = KernelSchedule_;
  using EpilogueSchedule = EpilogueSchedule_;
};

// The epilogue visitor tree for output element OutT.
template <class OutT, class TileShape>
struct Epilogue {
  static constexpr auto RN = cutlass::FloatRoundStyle::round_to_nearest;
  using AScale = fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<bool, _0, int64_t>, 1>;
  using WScale = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, bool, int64_t>, 1>;
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, float, float, Stride<_0, _1, int64_t>, 1>;
  using Scalar = fusion::Sm90ScalarBroadcast<float>;

  using ScaleW = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, RN>, WScale,
                                 fusion::Sm90AccFetch>;
  using Dequant = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::homogeneous_multiply_add, float, float, RN>,
                                  AScale, ScaleW, Bias>;
  static constexpr bool kInt8 = std::is_same_v<OutT, int8_t>;
  using Floored = fusion::Sm90EVT<fusion::Sm90Compute<maximum_nan, std::conditional_t<kInt8, float, OutT>, float, RN>,
                                  Dequant, Scalar>;
  using Requant = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::divides, int8_t, float, RN>, Floored, Scalar>;
  using Tree = std::conditional_t<kInt8, Requant, Floored>;

  static typename Tree::Arguments arguments(const ScaledMMParams& p) {
    const float floor = p.relu ? 0.0f : -std::numeric_limits<float>::infinity();
    typename AScale::Arguments a_scale{p.a_scale, 0.0f, {p.a_per_token, {}, int64_t(0)}};
    typename WScale::Arguments w_scale{p.w_scale, 0.0f, {{}, p.w_per_channel, int64_t(0)}};
    typename Bias::Arguments bias{p.bias, 0.0f, {{}, {}, int64_t(0)}};
    typename Floored::Arguments floored{
        {a_scale, {w_scale, {}, {}}, bias, {}},  // Dequant
        {{floor}},                               // floor scalar
        {}};
    if constexpr (kInt8) {
      typename Scalar::Arguments out_scale;
      out_scale.scalar_ptrs[0] = p.out_scale;
      return {floored, out_scale, {}};
    } else {
      return floored;
    }
  }
};

// Raw int32 output for int8_mm: the accumulator, unchanged.
template <class TileShape>
struct EpilogueInt32 {
  using Tree = fusion::Sm90EVT<
      fusion::Sm90Compute<cutlass::epilogue::thread::Identity, int32_t, int32_t, cutlass::FloatRoundStyle::round_to_nearest>,
      fusion::Sm90AccFetch>;
  static typename Tree::Arguments arguments(const ScaledMMParams&) { return {}; }
};

template <class Cfg, class OutT>
struct Gemm {
  using TileShape = typename Cfg::TileShape;
  using Epi = std::conditional_t<std::is_same_v<OutT, int32_t>, EpilogueInt32<TileShape>, Epilogue<OutT, TileShape>>;
  static constexpr int kAlignAB = 16;
  static constexpr int kAlignD = 128 / cutlass::sizeof_bits<OutT>::value;

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, typename Cfg::ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      void, cutlass::layout::RowMajor, kAlignD,  // no C operand
      OutT, cutlass::layout::RowMajor, kAlignD, typename Cfg::EpilogueSchedule,
      typename Epi::Tree>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, cutlass::layout::RowMajor, kAlignAB, int8_t,
      cutlass::layout::ColumnMajor, kAlignAB, int32_t, TileShape, typename Cfg::ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Cfg::KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, CollectiveMainloop,
                                                      CollectiveEpilogue, cutlass::gemm::PersistentScheduler>;
  using Device = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static const char* run(const ScaledMMParams& p) {
    using StrideA = typename Kernel::StrideA;
    using StrideB = typename Kernel::StrideB;
    using StrideD = typename Kernel::StrideD;
    StrideA stride_a = make_stride(p.lda, Int<1>{}, p.batch_stride_a);
    StrideB stride_b = make_stride(p.ldw, Int<1>{}, p.batch_stride_w);
    StrideD stride_d = make_stride(p.ldo, Int<1>{}, p.batch_stride_out);

    typename Device::Arguments args{
        p.batch > 1 ? cutlass::gemm::GemmUniversalMode::kBatched : cutlass::gemm::GemmUniversalMode::kGemm,
        {static_cast<int>(p.m), static_cast<int>(p.n), static_cast<int>(p.k), static_cast<int>(p.batch)},
        {p.a, stride_a, p.w, stride_b},
        {Epi::arguments(p), nullptr, stride_d, static_cast<OutT*>(p.out), stride_d}};
    int device = 0;
    cudaGetDevice(&device);
    args.hw_info.device_id = device;
    args.hw_info.sm_count = p.sm_count;

    Device gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return "sm90 GEMM: CUTLASS cannot implement this problem";
    if (Device::get_workspace_size(args) != 0) return "sm90 GEMM: this configuration needs a workspace (not supported)";
    if (gemm.initialize(args, nullptr, p.stream) != cutlass::Status::kSuccess) return "sm90 GEMM: initialize failed";
    if (gemm.run(p.stream) != cutlass::Status::kSuccess) return "sm90 GEMM: kernel launch failed";
    return nullptr;
  }
};

// The configurations, one per M range; sm90/dispatch.cu says which M each serves and why.
using KernelPingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using KernelCoop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using EpiPingpong = cutlass::epilogue::TmaWarpSpecialized;
using EpiCoop = cutlass::epilogue::TmaWarpSpecializedCooperative;

using Tile64 = Config<64, 128, 128, 1, 1, KernelPingpong, EpiPingpong>;
using Tile128 = Config<128, 128, 128, 1, 2, KernelCoop, EpiCoop>;
using Tile256 = Config<128, 256, 128, 2, 1, KernelCoop, EpiCoop>;

// Explicit instantiations live in one .cu per (config, output type) so the build parallelises.
template <class Cfg, class OutT>
const char* run(const ScaledMMParams& p);

#define SQK_SM90_INSTANTIATE(CFG, OUT)                                           \
  template <>                                                                   \
  const char* run<CFG, OUT>(const ScaledMMParams& p) {                          \
    return Gemm<CFG, OUT>::run(p);                                              \
  }

}  // namespace sqk::sm90
