// Instantiations of the register-operand decode kernels (regw.h).
#include "regw.h"

namespace mlx_moe::gpu {

using namespace mlx_moe::cuda;

template <bool DIRECT>
static RegwKernel regw_pick(bool gateup, uint32_t gs) {
  constexpr int MT = DIRECT ? 1 : REGW_DN_MT;
  if (gateup) {
    return gs == 32u ? mlp_regw_kernel<true, 32, 1, DIRECT>
           : gs == 64u ? mlp_regw_kernel<true, 64, 1, DIRECT>
           : gs == 128u ? mlp_regw_kernel<true, 128, 1, DIRECT>
                        : nullptr;
  }
  return gs == 32u ? mlp_regw_kernel<false, 32, MT, DIRECT>
         : gs == 64u ? mlp_regw_kernel<false, 64, MT, DIRECT>
         : gs == 128u ? mlp_regw_kernel<false, 128, MT, DIRECT>
                      : nullptr;
}

RegwKernel regw_kernel(bool gateup, uint32_t gs, bool direct, uint32_t bits) {
  if (bits == 8u) {  // (bucketed only; group sizes 32 and 64)
    if (direct) return nullptr;
    if (gateup)
      return gs == 32u ? mlp_regw_kernel<true, 32, 1, false, 8>
             : gs == 64u ? mlp_regw_kernel<true, 64, 1, false, 8>
                         : nullptr;
    return gs == 32u ? mlp_regw_kernel<false, 32, REGW_DN_MT, false, 8>
           : gs == 64u ? mlp_regw_kernel<false, 64, REGW_DN_MT, false, 8>
                       : nullptr;
  }
  return direct ? regw_pick<true>(gateup, gs) : regw_pick<false>(gateup, gs);
}

}  // namespace mlx_moe::gpu
