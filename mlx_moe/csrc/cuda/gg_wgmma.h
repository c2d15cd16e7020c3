// The sm_90a build of the grouped expert MLP (kernels/moe_cuda_wgmma.cuh), compiled in its
// own translation unit (sm90a/gg_wgmma.cu, -arch sm_90a: wgmma exists only there); the
// host code of cuda_ops.cu picks its kernels through these two functions (it does not
// include the kernel header).
#pragma once

#include <cstdint>

#include "moe_cuda.cuh"

namespace mlx_moe::cuda {

// The signature of mlp_gg_kernel and mlp_wg_kernel.
template <typename XT>
using GgKernel = void (*)(MlpDesc, const XT*, const uint32_t*, const uint32_t*, const uint32_t*,
                          const uint32_t*, const float*, XT*, uint32_t);

// mlp_wg_kernel of (gate/up or down, weight format GG_*, scale kind, raw stages 3 or 4,
// warpgroups 2 or 3: tiles of 128 or 192 pairs; rs: the register-sourced form, 2 warpgroups,
// 4 or 6 stages, affine 4-bit / mxfp4), or nullptr where it has none (a format the grouped
// kernels do not cover; trellis on 3 warpgroups; rs for other formats or stages).
template <typename XT>
GgKernel<XT> wg_kernel(bool gateup, int fmt, int sk, int stages, int nwg, bool rs);

// Its dynamic shared memory for the projections' weight descriptors (gate/up: gate, up;
// down: down twice, gateup false).
uint32_t wg_smem(int fmt, int stages, const WDesc& p0, const WDesc& p1, int nwg, bool rs, bool gateup);

}  // namespace mlx_moe::cuda
