// The sm_90a kernels of the grouped expert MLP (kernels/moe_cuda_wgmma.cuh). CMake compiles
// this file alone with -arch sm_90a (the rest of the CUDA code keeps the project's
// architectures); cuda_ops.cu launches these kernels only on compute capability 9.0.
#include "../gg_wgmma.h"
#include "moe_cuda_wgmma.cuh"

namespace mlx_moe::cuda {

template <typename XT, bool GATEUP, int FMT, int SK>
GgKernel<XT> wg_pick_stages(int stages, int nwg, bool rs) {
  if (rs) {
    if constexpr (FMT == GG_A4 || FMT == GG_FP4) {
      if (nwg == 2 && stages == 6) return mlp_wg_kernel<GATEUP, XT, FMT, SK, 6, 2, true>;
      if (nwg == 2 && stages == 4) return mlp_wg_kernel<GATEUP, XT, FMT, SK, 4, 2, true>;
    }
    return nullptr;
  }
  if constexpr (FMT != GG_TR) {
    if (nwg == 3)
      return stages == 3 ? mlp_wg_kernel<GATEUP, XT, FMT, SK, 3, 3> : mlp_wg_kernel<GATEUP, XT, FMT, SK, 4, 3>;
  } else {
    if (nwg == 3) return nullptr;
  }
  return stages == 3 ? mlp_wg_kernel<GATEUP, XT, FMT, SK, 3> : mlp_wg_kernel<GATEUP, XT, FMT, SK, 4>;
}

template <typename XT, bool GATEUP>
GgKernel<XT> wg_pick(int fmt, int sk, int stages, int nwg, bool rs) {
  if (fmt == GG_A4)
    return sk ? wg_pick_stages<XT, GATEUP, GG_A4, 1>(stages, nwg, rs)
              : wg_pick_stages<XT, GATEUP, GG_A4, 0>(stages, nwg, rs);
  if (fmt == GG_A8)
    return sk ? wg_pick_stages<XT, GATEUP, GG_A8, 1>(stages, nwg, rs)
              : wg_pick_stages<XT, GATEUP, GG_A8, 0>(stages, nwg, rs);
  if (fmt == GG_FP4) return wg_pick_stages<XT, GATEUP, GG_FP4, 0>(stages, nwg, rs);
  if (fmt == GG_TR) return wg_pick_stages<XT, GATEUP, GG_TR, 0>(stages, nwg, rs);
  return nullptr;
}

template <typename XT>
GgKernel<XT> wg_kernel(bool gateup, int fmt, int sk, int stages, int nwg, bool rs) {
  return gateup ? wg_pick<XT, true>(fmt, sk, stages, nwg, rs) : wg_pick<XT, false>(fmt, sk, stages, nwg, rs);
}

uint32_t wg_smem(int fmt, int stages, const WDesc& p0, const WDesc& p1, int nwg, bool rs, bool gateup) {
  return wg_smem_bytes(fmt, stages, p0, p1, nwg, rs, gateup);
}

template GgKernel<__half> wg_kernel<__half>(bool, int, int, int, int, bool);
template GgKernel<__nv_bfloat16> wg_kernel<__nv_bfloat16>(bool, int, int, int, int, bool);

}  // namespace mlx_moe::cuda
