// Instantiations of the register-operand decode kernels (regw.h).
#include <type_traits>

#include "moe_cuda_regw.cuh"
#include "regw.h"

namespace mlx_moe::gpu {

using namespace mlx_moe::cuda;

// The kernel for group size gs (32, 64, or for affine 4-bit codes 128; FP4: 32); null
// otherwise. STREAM: the streaming form (bucketed only). Down on dn_mt tiles of 16 rows: the
// plain bucketed form's REGW_DN_MT, or 1 for 4-bit codes; the direct and streaming forms' 1.
template <bool DIRECT, int BITS, bool FP4 = false, bool STREAM = false>
static RegwKernel regw_pick(bool gateup, uint32_t gs, uint32_t dn_mt) {
  constexpr bool PLAIN = !DIRECT && !STREAM;
  auto pick = [&](auto g) -> RegwKernel {
    constexpr int G = decltype(g)::value;
    if (gateup) return mlp_regw_kernel<true, G, 1, DIRECT, BITS, FP4, STREAM>;
    if constexpr (PLAIN) {
      if (dn_mt == uint32_t(REGW_DN_MT)) return mlp_regw_kernel<false, G, REGW_DN_MT, DIRECT, BITS, FP4, STREAM>;
      if constexpr (BITS == 4) {
        if (dn_mt == 1u) return mlp_regw_kernel<false, G, 1, DIRECT, BITS, FP4, STREAM>;
      }
      return nullptr;
    } else {
      return dn_mt == 1u ? mlp_regw_kernel<false, G, 1, DIRECT, BITS, FP4, STREAM> : nullptr;
    }
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

RegwKernel regw_kernel(bool gateup, uint32_t gs, bool direct, uint32_t bits, bool fp4, bool stream,
                       uint32_t dn_mt) {
  // (DIRECT: 4-bit only; STREAM: bucketed only)
  auto by_format = [&](auto direct_c, auto stream_c) -> RegwKernel {
    constexpr bool D = decltype(direct_c)::value, S = decltype(stream_c)::value;
    if (fp4) return bits == 4u ? regw_pick<D, 4, true, S>(gateup, gs, dn_mt) : nullptr;
    if (bits == 4u) return regw_pick<D, 4, false, S>(gateup, gs, dn_mt);
    if constexpr (!D) {
      if (bits == 8u) return regw_pick<D, 8, false, S>(gateup, gs, dn_mt);
    }
    return nullptr;
  };
  if (direct) return stream ? nullptr : by_format(std::true_type{}, std::false_type{});
  return stream ? by_format(std::false_type{}, std::true_type{})
                : by_format(std::false_type{}, std::false_type{});
}

}  // namespace mlx_moe::gpu
