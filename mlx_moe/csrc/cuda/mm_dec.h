// The tensor-core decode kernels (kernels/moe_cuda.cuh: mlp_mma_dec_kernel), instantiated
// outside cuda_ops.cu, which already takes ~5 minutes to compile on a 2-core machine: the
// translation units compile in parallel. Trellis forms (TR) in cuda_trellis_dec.cu, affine
// 4-bit / mxfp4 forms in cuda_mm_dec.cu.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "moe_cuda.cuh"

namespace mlx_moe::gpu {

template <typename XT>
using MmDecKernel = void (*)(cuda::MlpDesc, const XT*, const float*, const uint32_t*,
                             const uint32_t*, const uint32_t*, const uint32_t*, const float*,
                             uint32_t, float*, cuda::DecExtra);

// Trellis gate/up for bf16 (one MMA operand) and fp16 activations (split into bf16 hi + lo);
// down (the fp32 hidden layer, split).
template <typename XT>
MmDecKernel<XT> tr_gu_kernel();
template <>
MmDecKernel<__nv_bfloat16> tr_gu_kernel<__nv_bfloat16>();
template <>
MmDecKernel<__half> tr_gu_kernel<__half>();
MmDecKernel<float> tr_dn_kernel();

// Affine 4-bit / mxfp4 gate/up (16 rows per block) and down (16 * mt rows, mt 2 or 4); bulk:
// the weight rows as bulk copies (mm_issue's BULK; gate/up: bf16 / fp16 activations only);
// raw8 (with bulk only): the RAW8 form, for projections that are all mxfp4 (mm_raw8).
template <typename XT>
MmDecKernel<XT> mm_gu_kernel(bool bulk, bool raw8 = false);
MmDecKernel<float> mm_dn_kernel(uint32_t mt, bool bulk, bool raw8 = false);

}  // namespace mlx_moe::gpu
