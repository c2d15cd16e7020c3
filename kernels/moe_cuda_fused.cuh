// One-launch decode kernel of mlx_moe's CUDA backend: routing, gate/up + SwiGLU, down and the
// combine of a whole MoE layer in one kernel, for few pairs (a decoding step) whose three
// projections are affine 4-bit or mxfp4. Host dispatch: mlx_moe/csrc/cuda/cuda_fused.cu.
// Design notes: docs/DESIGN.md, "CUDA backend", one-launch decode.
//
// Why: at 1 token the three-kernel path (route, gate/up, down) spends most of its device
// time on launch gaps and on each kernel's load latency, and each graph node costs host time.
// Here every block claims one gate/up item (16 rows of gate and up of one pair, all of K)
// and one down item (16*MTD rows of down of one pair) as soon as it starts, and issues both
// items' weight copies (cp.async) right after routing, so the down weights are on chip by
// the time the pair's hidden row is complete. Then:
//   1. gate/up: H[pair, rows] = silu(gate x) * (up x), published on ctr[pair] (release);
//   2. down: wait until ctr[pair] counts all gate/up items of the pair (acquire), then
//      Yp[pair, rows] = rw * (down H);
//   3. combine: the last down item of a row slice (ctr[P + slice]) sums y[t, rows] over the
//      slots in slot order.
// Items come from two ticket counters (gate/up first, then down), so a block waits on a
// pair only once every gate/up item has been claimed by a running block, and those never
// wait: no deadlock whatever the residency. The counters live in a persistent buffer that
// is zero at launch; the last block to exit zeroes it again for the next launch.
// The item math is mm_issue / mm_compute (moe_cuda.cuh), the same functions and split-K as the
// three-kernel path, and the combine sums in the same order: results are bitwise equal.
#pragma once

#include "moe_cuda.cuh"

namespace mlx_moe::cuda {

constexpr int ONE_WARPS = MM_WARPS_GU;  // 8 warps: gate/up as in the three-kernel path
constexpr uint32_t ONE_MAX_PAIRS = 64;  // routing kept in shared memory

struct OneArgs {
  const void* logits;  // routing in the kernel when non-null ([T, E], logits_kind)
  uint32_t logits_kind;  // 0 f32, 1 f16, 2 bf16
  uint32_t normalize;
  const void* ids;  // else ids / weights as inputs
  int id_kind;
  const float* rw;
  uint32_t* ctr;  // persistent, zero at launch: [P] H ready, [n_dn] slices, gu, dn, exits
  float* H;       // [P, F]
  float* Yp;      // [P, D]
  void* y;        // [T, D]
  uint32_t y_kind;
  uint32_t n_gu, n_dn;  // row slices of gate/up (16 * MTG rows) and of down (16 * MTD rows)
  uint32_t prefetch;    // 1: the first down item's bytes are prefetched to L2 after routing
};

// Shared memory: the gate/up item (its split-K sums alias its weight rows), then the down
// item in the same bytes, each laid out as mlp_mma_dec_kernel lays it out.
struct OneLayout {
  MmLayout gu, dn;
  uint32_t total;
};

__host__ __device__ inline OneLayout one_layout(const MlpDesc& md, int ns_gu, int mtg, int mtd) {
  OneLayout o;
  const uint32_t Ggu = md.gate.groups > md.up.groups ? md.gate.groups : md.up.groups;
  o.gu = mm_layout(md.D / 32u, Ggu, 1u, 2, ns_gu, mtg, ONE_WARPS, mm_raw16<true>(md));
  o.dn = mm_layout(md.F / 32u, md.down.groups, 1u, 1, 2, mtd, MM_WARPS_DN, mm_raw16<false>(md));
  const uint32_t red_bytes = o.gu.total - o.gu.red_off;  // may run past the weight rows
  uint32_t t = o.gu.red_off > red_bytes ? o.gu.red_off : red_bytes;  // into dead bytes
  t = t > o.dn.total ? t : o.dn.total;
  o.total = (t + 15u) & ~15u;
  return o;
}

__device__ __forceinline__ uint32_t ld_acquire_u32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

template <typename XT, bool SPLIT, int MTG, int MTD>
__global__ void __launch_bounds__(ONE_WARPS * 32, 2)
    mlp_one_kernel(MlpDesc md, const XT* __restrict__ x, OneArgs a) {
  extern __shared__ __align__(16) unsigned char one_smem[];
  __shared__ uint32_t s_ids[ONE_MAX_PAIRS];
  __shared__ float s_rw[ONE_MAX_PAIRS];
  __shared__ __align__(16) float s_p[ROUTE_BLOCK_MAX_E];
  __shared__ float s_w[32];
  __shared__ uint32_t s_id[32];
  __shared__ uint32_t s_claim[2];
  __shared__ uint32_t s_flag;
  const uint32_t tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u;
  const uint32_t T = md.T, k = md.k, P = md.P, E = md.E;
  const uint32_t n_gu_items = P * a.n_gu, n_dn_items = P * a.n_dn;
  uint32_t* hready = a.ctr;
  uint32_t* slice_done = a.ctr + P;
  uint32_t* next = a.ctr + P + a.n_dn;  // [0] gate/up tickets, [1] down tickets, [2] exits

  // Claim one gate/up and one down item while the routing runs.
  if (tid == 0) {
    s_claim[0] = atomicAdd(&next[0], 1u);
    s_claim[1] = atomicAdd(&next[1], 1u);
  }
  if (a.logits != nullptr) {
    // Token rows routed in the block: one row at a time by the whole block (ranks) when it
    // can, else one row per warp; bitwise the same either way.
    auto route_as = [&](auto tag) {
      using LT = decltype(tag);
      const LT* lg = static_cast<const LT*>(a.logits);
      if (E <= ROUTE_BLOCK_MAX_E && k <= 32u) {
        for (uint32_t r = 0; r < T; ++r)
          route_row_block(lg + int64_t(r) * E, E, k, a.normalize, s_ids + r * k, s_rw + r * k,
                          s_p, s_w, s_id, &s_flag);
      } else {
        for (uint32_t r = warp; r < T; r += ONE_WARPS)
          route_row(lg + int64_t(r) * E, E, k, a.normalize, s_ids + r * k, s_rw + r * k, lane);
      }
    };
    switch (a.logits_kind) {
      case 0: route_as(float{}); break;
      case 1: route_as(__half{}); break;
      default: route_as(__nv_bfloat16{}); break;
    }
  } else {
    for (uint32_t i = tid; i < P; i += blockDim.x) {
      const int64_t id = load_id(a.ids, a.id_kind, i);
      s_ids[i] = valid_id(id, E) ? uint32_t(id) : 0xffffffffu;
      s_rw[i] = a.rw[i];
    }
  }
  __syncthreads();

  const OneLayout L = one_layout(md, SPLIT ? 2 : 1, MTG, MTD);
  const uint32_t Ggu = md.gate.groups > md.up.groups ? md.gate.groups : md.up.groups;
  MmSmem sa = mm_smem_at(one_smem, L.gu, Ggu);
  sa.Red = nullptr;  // aliases the weight rows (one chunk)
  const MmSmem sb = mm_smem_at(one_smem, L.dn, md.down.groups);

  DecExtra ex{};
  ex.direct = 1u;  // positions are pairs (mm_compute's dec_pair)

  uint32_t gi = s_claim[0], di = s_claim[1];
  __syncthreads();  // read by every thread before thread 0 claims into s_claim again
  // The first down item's weight rows, scales and biases go to L2 now; its block copies
  // them to shared memory once its gate/up items are done.
  if (a.prefetch && di < n_dn_items) {
    const uint32_t e = s_ids[di / a.n_dn];
    if (e < E) {
      const uint32_t n0 = (di % a.n_dn) * 16u * MTD;
      prefetch_rows(md.down, e, n0, min(16u * MTD, md.down.N - n0));
    }
  }

  // 1. gate/up items (the next ticket is claimed as an item starts, so its round trip
  // overlaps the item's work)
  while (gi < n_gu_items) {
    const uint32_t pair = gi / a.n_gu, n0 = (gi % a.n_gu) * 16u * MTG, e = s_ids[pair];
    if (tid == 0) s_claim[0] = atomicAdd(&next[0], 1u);
    if (e < E) {
      const uint32_t ng = mm_issue<true, MTG, ONE_WARPS>(md, e, n0, sa);
      mm_compute<true, XT, SPLIT, MTG, ONE_WARPS, false>(md, ex, x, nullptr, nullptr, s_rw, pair,
                                                         pair + 1u, 1u, a.H, n0, sa, ng, 0u);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) atomicAdd(&hready[pair], 1u);
    gi = s_claim[0];
    __syncthreads();  // every thread has read s_claim before it is claimed into again
  }
  // Every gate/up item is claimed now (by running blocks, which do not wait): waiting on a
  // pair's hidden row cannot deadlock.

  // 2. down items, 3. combine
  while (di < n_dn_items) {
    const uint32_t pair = di / a.n_dn, e = s_ids[pair];
    const uint32_t s = di % a.n_dn, n0 = s * 16u * MTD;
    if (tid == 0) s_claim[1] = atomicAdd(&next[1], 1u);
    if (e < E) {
      const uint32_t ng = mm_issue<false, MTD, MM_WARPS_DN>(md, e, n0, sb);
      if (tid == 0) {
        while (ld_acquire_u32(&hready[pair]) < a.n_gu) __nanosleep(32);
      }
      __syncthreads();
      mm_compute<false, float, true, MTD, MM_WARPS_DN, true>(md, ex, nullptr, a.H, nullptr, s_rw,
                                                             pair, pair + 1u, 1u, a.Yp, n0, sb,
                                                             ng, 0u);
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) s_flag = (atomicAdd(&slice_done[s], 1u) == P - 1u) ? 1u : 0u;
    __syncthreads();
    if (s_flag) {  // the last down item of slice s: y[t, rows of s] for every token
      __threadfence();
      const uint32_t D = md.D, rows = 16u * MTD, total = T * rows;
      for (uint32_t idx = tid; idx < total; idx += blockDim.x) {
        const uint32_t t = idx / rows, n = n0 + idx % rows;
        if (n >= D) continue;
        const float acc =
            sum_slots(a.Yp, t, k, D, n, [&](uint32_t j) { return s_ids[t * k + j] < E; });
        store_out(a.y, a.y_kind, int64_t(t) * D + n, acc);
      }
    }
    di = s_claim[1];
    __syncthreads();
  }

  // The last block out zeroes the counters for the next launch (every claim and count of
  // this launch happened before its block's exit count).
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    if (atomicAdd(&next[2], 1u) == gridDim.x - 1u) {
      for (uint32_t i = 0; i < P + a.n_dn + 3u; ++i) a.ctr[i] = 0u;
      __threadfence();
    }
  }
}

static __global__ void zero_u32_kernel(uint32_t* p, uint32_t n) {
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) p[i] = 0u;
}

}  // namespace mlx_moe::cuda
