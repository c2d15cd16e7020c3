// Instantiations of the persistent ring-fed decode kernels (ring.h).
#include <type_traits>

#include "cuda_util.h"
#include "moe_cuda_ring.cuh"
#include "ring.h"

namespace mlx_moe::gpu {

using namespace mlx_moe::cuda;

RingKernel ring_kernel(bool gateup, uint32_t gs, bool fp4) {
  auto pick = [&](auto g, auto f) -> RingKernel {
    constexpr int G = decltype(g)::value;
    constexpr bool FP4 = decltype(f)::value;
    return gateup ? mlp_ring_kernel<true, G, RING_GU_MT, FP4> : mlp_ring_kernel<false, G, RING_DN_MT, FP4>;
  };
  if (fp4) return gs == 32u ? pick(std::integral_constant<int, 32>{}, std::true_type{}) : nullptr;
  if (gs == 32u) return pick(std::integral_constant<int, 32>{}, std::false_type{});
  if (gs == 64u) return pick(std::integral_constant<int, 64>{}, std::false_type{});
  if (gs == 128u) return pick(std::integral_constant<int, 128>{}, std::false_type{});
  return nullptr;
}

bool ring_available() {
  if (compute_capability() < 90) return false;
  return per_device([](int) {
    cudaFuncAttributes fa{};
    check(cudaFuncGetAttributes(&fa, reinterpret_cast<const void*>(mlp_ring_kernel<true, 64, RING_GU_MT, false>)),
          "cudaFuncGetAttributes");
    return fa.binaryVersion >= 90;
  });
}

}  // namespace mlx_moe::gpu
