// Instantiations of the register-operand decode kernels (regw.h).
#include "regw.h"

namespace mlx_moe::gpu {

using namespace mlx_moe::cuda;

RegwKernel regw_kernel(bool gateup, uint32_t gs) {
  if (gateup) {
    return gs == 32u ? mlp_regw_kernel<true, 32, 1>
           : gs == 64u ? mlp_regw_kernel<true, 64, 1>
           : gs == 128u ? mlp_regw_kernel<true, 128, 1>
                        : nullptr;
  }
  return gs == 32u ? mlp_regw_kernel<false, 32, REGW_DN_MT>
         : gs == 64u ? mlp_regw_kernel<false, 64, REGW_DN_MT>
         : gs == 128u ? mlp_regw_kernel<false, 128, REGW_DN_MT>
                      : nullptr;
}

}  // namespace mlx_moe::gpu
