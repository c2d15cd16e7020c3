// Instantiations of the affine 4-bit / mxfp4 tensor-core decode kernels (mm_dec.h).
#include "mm_dec.h"

namespace mlx_moe::gpu {

using namespace mlx_moe::cuda;

template <typename XT>
MmDecKernel<XT> mm_gu_kernel(bool bulk) {
  constexpr bool S = !std::is_same_v<XT, __nv_bfloat16>;  // split fp16 / fp32 activations
  if constexpr (!std::is_same_v<XT, float>) {
    if (bulk) return mlp_mma_dec_kernel<true, XT, S, 1, MM_WARPS_GU, false, true>;
  }
  return mlp_mma_dec_kernel<true, XT, S, 1, MM_WARPS_GU>;
}
template MmDecKernel<float> mm_gu_kernel<float>(bool);
template MmDecKernel<__half> mm_gu_kernel<__half>(bool);
template MmDecKernel<__nv_bfloat16> mm_gu_kernel<__nv_bfloat16>(bool);

MmDecKernel<float> mm_dn_kernel(uint32_t mt, bool bulk) {
  if (mt == 4u) {
    return bulk ? mlp_mma_dec_kernel<false, float, true, 4, MM_WARPS_DN, false, true>
                : mlp_mma_dec_kernel<false, float, true, 4, MM_WARPS_DN>;
  }
  return bulk ? mlp_mma_dec_kernel<false, float, true, 2, MM_WARPS_DN, false, true>
              : mlp_mma_dec_kernel<false, float, true, 2, MM_WARPS_DN>;
}

}  // namespace mlx_moe::gpu
