// Instantiations of the affine 4-bit / mxfp4 tensor-core decode kernels (mm_dec.h).
#include "mm_dec.h"

namespace mlx_moe::gpu {

using namespace mlx_moe::cuda;

template <typename XT>
MmDecKernel<XT> mm_gu_kernel(bool bulk, bool raw8) {
  constexpr bool S = !std::is_same_v<XT, __nv_bfloat16>;  // split fp16 / fp32 activations
  if constexpr (!std::is_same_v<XT, float>) {
    if (bulk && raw8) return mlp_mma_dec_kernel<true, XT, S, 1, MM_WARPS_GU, false, true, true>;
    if (bulk) return mlp_mma_dec_kernel<true, XT, S, 1, MM_WARPS_GU, false, true>;
  }
  return mlp_mma_dec_kernel<true, XT, S, 1, MM_WARPS_GU>;
}
template MmDecKernel<float> mm_gu_kernel<float>(bool, bool);
template MmDecKernel<__half> mm_gu_kernel<__half>(bool, bool);
template MmDecKernel<__nv_bfloat16> mm_gu_kernel<__nv_bfloat16>(bool, bool);

template <int MT>
static MmDecKernel<float> mm_dn_kernel_mt(bool bulk, bool raw8) {
  if (bulk && raw8) return mlp_mma_dec_kernel<false, float, true, MT, MM_WARPS_DN, false, true, true>;
  if (bulk) return mlp_mma_dec_kernel<false, float, true, MT, MM_WARPS_DN, false, true>;
  return mlp_mma_dec_kernel<false, float, true, MT, MM_WARPS_DN>;
}

MmDecKernel<float> mm_dn_kernel(uint32_t mt, bool bulk, bool raw8) {
  return mt == 4u ? mm_dn_kernel_mt<4>(bulk, raw8) : mm_dn_kernel_mt<2>(bulk, raw8);
}

}  // namespace mlx_moe::gpu
