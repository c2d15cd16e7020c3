// Instantiations of the trellis tensor-core decode kernels (mm_dec.h).
#include "mm_dec.h"

namespace mlx_moe::gpu {

using namespace mlx_moe::cuda;

template <>
MmDecKernel<__nv_bfloat16> tr_gu_kernel<__nv_bfloat16>() {
  return mlp_mma_dec_kernel<true, __nv_bfloat16, false, 1, MM_WARPS_GU, true>;
}

template <>
MmDecKernel<__half> tr_gu_kernel<__half>() {
  return mlp_mma_dec_kernel<true, __half, true, 1, MM_WARPS_GU, true>;
}

MmDecKernel<float> tr_dn_kernel() { return mlp_mma_dec_kernel<false, float, true, 2, MM_WARPS_DN, true>; }

}  // namespace mlx_moe::gpu
