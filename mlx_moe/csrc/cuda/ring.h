// The persistent ring-fed decode kernels (kernels/moe_cuda_ring.cuh: mlp_ring_kernel), in their
// own translation unit (cuda_ring.cu); its layout for the launch code from moe_cuda_regw_host.h.
#pragma once
#include <cuda_bf16.h>

#include "moe_cuda.cuh"
#include "moe_cuda_regw_host.h"

namespace mlx_moe::gpu {

using RingKernel = void (*)(cuda::MlpDesc, const __nv_bfloat16*, const uint32_t*, const uint32_t*,
                            const uint32_t*, const uint32_t*, const float*, __nv_bfloat16*, float*,
                            uint32_t);

// Rows per item: gate/up 16 * RING_GU_MT (both projections), down 16 * RING_DN_MT.
constexpr int RING_GU_MT = 2, RING_DN_MT = 4;

// Gate/up (gateup) or down over 4-bit codes in scale groups of gs: affine 32, 64 or 128 (bf16
// scales and biases), mxfp4 (fp4) 32; null otherwise. Block: K / 256 + 1 warps (K <= 2048).
RingKernel ring_kernel(bool gateup, uint32_t gs, bool fp4);

// Whether the ring kernels' code is for sm_90 or later (bulk copies, mbarriers): the device's
// compute capability and the architecture of the code the runtime loads for it.
bool ring_available();

}  // namespace mlx_moe::gpu
