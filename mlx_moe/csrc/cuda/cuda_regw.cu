// Instantiations of the register-operand decode kernels (regw.h).
#include <type_traits>

#include "regw.h"

namespace mlx_moe::gpu {

using namespace mlx_moe::cuda;

// The kernel for group size gs (32, 64, or for affine 4-bit codes 128; FP4: 32); null
// otherwise. STREAM: the streaming form (bucketed only).
template <bool DIRECT, int BITS, bool FP4 = false, bool STREAM = false>
static RegwKernel regw_pick(bool gateup, uint32_t gs) {
  constexpr int MT = DIRECT || STREAM ? 1 : REGW_DN_MT;
  auto pick = [&](auto g) -> RegwKernel {
    constexpr int G = decltype(g)::value;
    return gateup ? mlp_regw_kernel<true, G, 1, DIRECT, BITS, FP4, STREAM>
                  : mlp_regw_kernel<false, G, MT, DIRECT, BITS, FP4, STREAM>;
  };
  if (gs == 32u) return pick(std::integral_constant<int, 32>{});
  if constexpr (!FP4) {
    if (gs == 64u) return pick(std::integral_constant<int, 64>{});
    if constexpr (BITS == 4) {
      if (gs == 128u) return pick(std::integral_constant<int, 128>{});
    }
  }
  return nullptr;
}

RegwKernel regw_kernel(bool gateup, uint32_t gs, bool direct, uint32_t bits, bool fp4, bool stream) {
  if (stream) {  // (bucketed)
    if (direct) return nullptr;
    if (fp4) return bits == 4u ? regw_pick<false, 4, true, true>(gateup, gs) : nullptr;
    if (bits == 8u) return regw_pick<false, 8, false, true>(gateup, gs);
    return bits == 4u ? regw_pick<false, 4, false, true>(gateup, gs) : nullptr;
  }
  if (fp4) {
    if (bits != 4u) return nullptr;
    return direct ? regw_pick<true, 4, true>(gateup, gs) : regw_pick<false, 4, true>(gateup, gs);
  }
  if (bits == 8u) return direct ? nullptr : regw_pick<false, 8>(gateup, gs);  // (bucketed only)
  if (bits == 4u) return direct ? regw_pick<true, 4>(gateup, gs) : regw_pick<false, 4>(gateup, gs);
  return nullptr;
}

}  // namespace mlx_moe::gpu
