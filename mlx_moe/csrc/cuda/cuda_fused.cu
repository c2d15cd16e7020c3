// Host dispatch of the one-launch decode kernel (kernels/moe_cuda_fused.cuh): a whole MoE
// layer -- routing, gate/up, down, combine -- as one node of MLX's CUDA graph, for few pairs
// with affine 4-bit / mxfp4 projections. Called by moe_mlp's CUDA eval (cuda_ops.cu), which
// takes its other paths when this returns false.
#include "cuda_util.h"
#include "moe_cuda_fused.cuh"

namespace mlx_moe::gpu {

using namespace mlx_moe::cuda;

namespace {

constexpr uint32_t ONE_CTR_WORDS = 1u << 16;  // counters: P + D / 32 + 3 words at most

// The counters of the one-launch kernel: one persistent buffer per stream, zero between
// launches (the kernel zeroes it again before it ends). Named to the encoder as read and
// written by every launch, so launches on one stream never overlap on it. Created (and
// zeroed by a kernel node) on first use; never freed.
const mx::array& one_counters(cu::CommandEncoder& enc, int stream_key) {
  static std::mutex mu;
  static std::map<int, mx::array*> bufs;
  std::lock_guard<std::mutex> lock(mu);
  auto it = bufs.find(stream_key);
  if (it != bufs.end()) return *it->second;
  auto* a = new mx::array(mx::allocator::malloc(size_t(ONE_CTR_WORDS) * 4),
                          {int(ONE_CTR_WORDS)}, mx::uint32);
  launch(enc, {}, {a}, zero_u32_kernel, dim3(64), dim3(256), 0, ptr<uint32_t>(*a), ONE_CTR_WORDS);
  bufs[stream_key] = a;
  return *a;
}

template <typename XT, int MTG, int MTD>
constexpr auto one_kernel() {
  return mlp_one_kernel<XT, !std::is_same_v<XT, __nv_bfloat16>, MTG, MTD>;
}

}  // namespace

bool moe_mlp_one_launch(cu::CommandEncoder& enc, int stream_key, const MlpDesc& md,
                        const mx::array& x, const mx::array* logits, uint32_t normalize,
                        const mx::array* ids, int id_kind, const mx::array* rw, mx::array& out) {
  // Opt-in (MLX_MOE_CUDA_ONE_MAX_PAIRS=n: up to n pairs, at most 64): measured slower on
  // the device than the three-kernel path on the H100 (docs/DESIGN.md, "One-launch decode").
  const uint32_t max_pairs = std::min(env_u32("MLX_MOE_CUDA_ONE_MAX_PAIRS", 0u), ONE_MAX_PAIRS);
  if (md.P == 0 || md.P > max_pairs) return false;
  if (md.D % 32u != 0u || md.F % 32u != 0u) return false;
  const int logits_kind = logits ? float_kind(logits->dtype()) : 0;
  if (logits_kind < 0) return false;  // float64 logits: the route kernel
  const int ns_gu = x.dtype() == mx::bfloat16 ? 1 : 2;
  bool ok = false;
  dispatch_float(x.dtype(), [&](auto tag) {
    using XT = decltype(tag);
    // Gate/up items of 16 * MTG rows (MLX_MOE_CUDA_ONE_MTG, 1 or 2; default 2) and down items
    // of 16 * MTD rows: the fewest (most items in flight) whose items all fit on the device
    // at once, else 64 (MLX_MOE_CUDA_ONE_MTD forces it, 2..4). MLX_MOE_CUDA_ONE_GRID caps
    // the grid; MLX_MOE_CUDA_ONE_PREFETCH=0 skips the L2 prefetch of the down weights.
    const uint32_t mtg = env_u32("MLX_MOE_CUDA_ONE_MTG", 2u);
    const uint32_t force_mtd = env_u32("MLX_MOE_CUDA_ONE_MTD", 0u);
    const uint32_t grid_cap = env_u32("MLX_MOE_CUDA_ONE_GRID", 0u);
    const uint32_t prefetch = env_u32("MLX_MOE_CUDA_ONE_PREFETCH", 1u) != 0u ? 1u : 0u;
    auto try_mtd = [&](auto mtg_tag, auto mtd_tag) -> bool {
      constexpr int MTG = decltype(mtg_tag)::value;
      constexpr int MTD = decltype(mtd_tag)::value;
      if (force_mtd >= 2u && force_mtd <= 4u && force_mtd != uint32_t(MTD)) return false;
      const OneLayout L = one_layout(md, ns_gu, MTG, MTD);
      if (L.total > 227u * 1024u) return false;
      auto kernel = one_kernel<XT, MTG, MTD>();
      const uint32_t cap = capacity(kernel, ONE_WARPS * 32, L.total);
      const uint32_t n_gu = (md.F + 16u * MTG - 1u) / (16u * MTG);
      const uint32_t n_dn = (md.D + 16u * MTD - 1u) / (16u * MTD);
      if (cap == 0 || md.P + n_dn + 3u > ONE_CTR_WORDS) return false;
      if (MTD < 4 && force_mtd == 0u && md.P * n_dn > cap) return false;
      uint32_t grid = std::min(std::max(md.P * n_gu, md.P * n_dn), cap);
      if (grid_cap > 0u) grid = std::min(grid, grid_cap);
      const mx::array& ctr = one_counters(enc, stream_key);
      mx::array H = scratch(enc, size_t(md.P) * md.F);
      mx::array Yp = scratch(enc, size_t(md.P) * md.D);
      OneArgs a{};
      a.logits = logits ? ptr<void>(*logits) : nullptr;
      a.logits_kind = uint32_t(logits_kind);
      a.normalize = normalize;
      a.ids = ids ? ptr<void>(*ids) : nullptr;
      a.id_kind = id_kind;
      a.rw = rw ? ptr<float>(*rw) : nullptr;
      a.ctr = ptr<uint32_t>(ctr);
      a.H = ptr<float>(H);
      a.Yp = ptr<float>(Yp);
      a.y = ptr<void>(out);
      a.y_kind = uint32_t(float_kind(x.dtype()));
      a.n_gu = n_gu;
      a.n_dn = n_dn;
      a.prefetch = prefetch;
      launch(enc, {&x, logits, ids, rw, &ctr}, {&out, &H, &Yp, &ctr}, kernel, dim3(grid),
             dim3(ONE_WARPS * 32), L.total, md, ptr<XT>(x), a);
      return true;
    };
    using I1 = std::integral_constant<int, 1>;
    using I2 = std::integral_constant<int, 2>;
    using I3 = std::integral_constant<int, 3>;
    using I4 = std::integral_constant<int, 4>;
    if (mtg == 1u)
      ok = try_mtd(I1{}, I2{}) || try_mtd(I1{}, I3{}) || try_mtd(I1{}, I4{});
    else
      ok = try_mtd(I2{}, I2{}) || try_mtd(I2{}, I3{}) || try_mtd(I2{}, I4{});
  });
  return ok;
}

}  // namespace mlx_moe::gpu
