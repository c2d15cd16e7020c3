// The register-operand decode kernels (kernels/moe_cuda_regw.cuh: mlp_regw_kernel), in their
// own translation unit (cuda_regw.cu); their shapes for the launch code from
// moe_cuda_regw_host.h, not the kernels' header (a kernel change recompiles cuda_regw.cu only).
#pragma once
#include <cuda_bf16.h>

#include "moe_cuda.cuh"
#include "moe_cuda_regw_host.h"

namespace mlx_moe::gpu {

using RegwKernel = void (*)(cuda::MlpDesc, const __nv_bfloat16*, const uint32_t*, const uint32_t*,
                            const uint32_t*, const uint32_t*, const float*, __nv_bfloat16*, float*,
                            cuda::RegwDirect);

// Rows per block of the plain bucketed down kernel, in tiles of 16, by default (4-bit codes:
// 16 too, regw_kernel's dn_mt 1); gate/up and the direct and streaming down kernels: 16.
constexpr int REGW_DN_MT = 2;

// Gate/up (gateup) or down for scale groups of gs codes of `bits` bits: affine 4-bit 32, 64
// or 128, bucketed or direct (the kernels' DIRECT form); affine 8-bit 32 or 64, bucketed;
// mxfp4 (fp4) 32, bucketed or direct; stream: the bucketed kernels' STREAM form (weights
// streamed through registers); null otherwise.
// Block: K * bits / 32 threads for a K-wide projection (one 16-byte chunk of the staged
// nibble-row activations each); the direct down block k times F / 8; STREAM: 32 W KS threads
// for W tiles of 16 rows (grid.y = N / (16 W)) and KS warps per tile (K * bits / 1024 a
// multiple of KS), at most 256.
// dn_mt: down's tiles of 16 rows per block: the plain bucketed form REGW_DN_MT, or 1 for
// 4-bit codes; the direct and streaming forms 1 (null for any other; gate/up ignores it).
RegwKernel regw_kernel(bool gateup, uint32_t gs, bool direct, uint32_t bits, bool fp4,
                       bool stream = false, uint32_t dn_mt = uint32_t(REGW_DN_MT));

}  // namespace mlx_moe::gpu
