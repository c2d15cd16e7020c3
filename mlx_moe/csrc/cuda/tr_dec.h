// The trellis tensor-core decode kernels (kernels/moe_cuda.cuh: mlp_mma_dec_kernel with
// TR = true), instantiated in cuda_trellis_dec.cu rather than in cuda_ops.cu, which already
// takes ~5 minutes to compile on a 2-core machine: the two compile in parallel.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moe_cuda.cuh"

namespace mlx_moe::gpu {

template <typename XT>
using MmDecKernel = void (*)(cuda::MlpDesc, const XT*, const float*, const uint32_t*,
                             const uint32_t*, const uint32_t*, const uint32_t*, const float*,
                             uint32_t, float*, cuda::DecExtra);

// Gate/up for bf16 (one MMA operand) and fp16 activations (split into bf16 hi + lo); down
// (the fp32 hidden layer, split).
template <typename XT>
MmDecKernel<XT> tr_gu_kernel();
template <>
MmDecKernel<__nv_bfloat16> tr_gu_kernel<__nv_bfloat16>();
template <>
MmDecKernel<__half> tr_gu_kernel<__half>();
MmDecKernel<float> tr_dn_kernel();

}  // namespace mlx_moe::gpu
