// Decode-path expert MLP, persistent and fed by a ring of bulk copies (sm_90; compiled in
// mlx_moe/csrc/cuda/cuda_ring.cu; it shares moe_cuda_regw.cuh's unit layout, products and
// epilogue, and its layout is in moe_cuda_regw_host.h).
//
// Why: the register-operand kernels (moe_cuda_regw.cuh) start a block per (expert, row tile):
// each block finds its expert, issues its loads, waits a full memory latency, computes,
// reduces and exits, and a block holds at most its registers' worth of weights in flight. At
// 16 tokens of a Qwen3 layer that ran gate/up at ~66% and down at ~54% of the copy bandwidth
// (benchmarks/kernel_timeline.py, docs/PERFORMANCE.md, twenty-seventh session).
//
// Here a block stays resident and walks a contiguous range of items (non-empty expert slot j,
// row tile of 16 MT rows; tiles innermost, so a block's items are one or two experts). Its last
// warp is the producer: for each item it copies the tile's rows of every projection (one bulk
// copy per row, all of K, into rows padded so that the consumers' loads are conflict-free),
// their scales and biases (one bulk copy each: an expert's rows are contiguous) into stage
// q % ns of a ring in shared memory, completing on that stage's `full` mbarrier; it waits on
// the stage's `empty` mbarrier before it refills it, so ns - 1 items' weights are in flight
// while the consumers compute. The other K / 256 warps are the consumers, warp w owning chunk w
// (k in [256 w, 256 w + 256)) as in the plain register-operand block: each reads its unit of
// the stage into registers (rw_lds: the registers rw_load fills), releases the stage, and runs
// rw_mma; the warps' partials meet in shared memory (rw_reduce_store; one barrier of the
// consumer warps per item, the partials double-buffered). The expert's activations are staged
// once per expert (rw_stage; again per chunk of 8 pairs for an expert with more).
// The down kernel's producer copies weights before the kernel waits for gate/up (pdl_wait):
// only the consumers read H. Opt-in (MLX_MOE_CUDA_REGW_RING): measured slower, docs/DESIGN.md.
#pragma once

#include "moe_cuda_regw.cuh"

namespace mlx_moe::cuda {

// A plain arrival on an mbarrier (moe_cuda.cuh has init, wait and the bulk copies' arrival).
__device__ __forceinline__ void ring_bar_arrive(uint32_t bar) {
  MOE_SM90_ASM("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Barrier 1 over the consumer warps (n threads); barrier 0 is __syncthreads.
__device__ __forceinline__ void ring_sync(uint32_t n) {
  asm volatile("bar.sync 1, %0;\n" ::"r"(n) : "memory");
}

// NW words from a shared-space address (ordered after the mbarrier wait: volatile, memory).
template <int NW>
__device__ __forceinline__ void ring_lds(uint32_t a, uint32_t* o) {
  if constexpr (NW == 1) {
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(o[0]) : "r"(a) : "memory");
  } else if constexpr (NW == 2) {
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(o[0]), "=r"(o[1]) : "r"(a) : "memory");
  } else {
    static_assert(NW == 4, "1, 2 or 4 words");
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(o[0]), "=r"(o[1]), "=r"(o[2]), "=r"(o[3])
                 : "r"(a)
                 : "memory");
  }
}

// Reads this lane's unit of a stage (the registers rw_load would fill): rows mt 16 + gid (+ 8),
// groups g0 .. g0 + GB - 1, from a projection's area at `base` (shared-space address).
template <class F, int MT>
__device__ __forceinline__ void rw_lds(RwUnit<F, MT>& u, uint32_t base, const RingLayout& L, uint32_t G,
                                       uint32_t g0, uint32_t gid, uint32_t t4) {
  constexpr uint32_t sb = F::FP4 ? 1u : 2u;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t row = uint32_t(mt) * 16u + gid + 8u * uint32_t(r);
      const uint32_t cw = base + row * L.cs + (g0 * (F::GV / 8) + t4 * F::WPT) * 4u;
#pragma unroll
      for (int i = 0; i < F::GB; ++i) ring_lds<F::WPT>(cw + uint32_t(i) * (F::GV / 8) * 4u, &u.w[mt][r][i * F::WPT]);
      const uint32_t so = (row * G + g0) * sb;  // (SW-word aligned: G % GB == 0, GB sb % 4 == 0)
      ring_lds<F::SW>(base + L.codes + so, u.s[mt][r]);
      if constexpr (!F::FP4) ring_lds<F::BW>(base + L.codes + L.sbytes + so, u.b[mt][r]);
    }
}

// Block: K / 256 consumer warps + 1 producer warp; grid: the blocks resident at once (or
// fewer); dynamic shared memory ring_layout(...).total; ns ring stages.
template <bool GATEUP, int GS, int MT, bool FP4>
__global__ void __launch_bounds__(9 * 32, 1)
    mlp_ring_kernel(MlpDesc md, const __nv_bfloat16* __restrict__ xin, const uint32_t* __restrict__ pairs,
                    const uint32_t* __restrict__ offsets, const uint32_t* __restrict__ active,
                    const uint32_t* __restrict__ meta, const float* __restrict__ rw,
                    __nv_bfloat16* __restrict__ Hout, float* __restrict__ Yp, uint32_t ns) {
  using F = RwFmt<GS, 4, FP4>;
  constexpr int NP = GATEUP ? 2 : 1;
  constexpr uint32_t R = 16u * MT;
  // gate/up reads the bucketing's outputs: it waits, then lets down start; down reads those
  // (complete by then) and copies weights before its consumers wait for H.
  if (GATEUP) pdl_wait();
  pdl_trigger();
  const WDesc& w0 = GATEUP ? md.gate : md.down;
  const uint32_t K = w0.K, N = w0.N, G = w0.groups, RWd = w0.row_words;
  const uint32_t C = K / 256u;  // consumer warps
  const uint32_t tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u;
  const uint32_t tiles = N / R;
  const uint32_t n_items = meta[0] * tiles;
  const uint32_t lo = uint32_t(uint64_t(blockIdx.x) * n_items / gridDim.x);
  const uint32_t hi = uint32_t(uint64_t(blockIdx.x + 1u) * n_items / gridDim.x);
  if (lo >= hi) return;
  const RingLayout L = ring_layout(K, G, GS, FP4, NP, MT, ns);
  extern __shared__ __align__(16) unsigned char ring_smem[];
  const uint32_t sbase = smem_u32(ring_smem);
  auto full = [&](uint32_t s) { return sbase + 8u * s; };
  auto empty = [&](uint32_t s) { return sbase + 8u * (ns + s); };
  auto stage_at = [&](uint32_t s) { return sbase + L.head + s * L.stage; };
  if (tid == 0) {
    for (uint32_t s = 0; s < ns; ++s) {
      mbar_init(full(s), 1u);
      mbar_init(empty(s), C * 32u);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warp == C) {  // the producer
    const uint64_t pol = weight_l2_policy(md.l2_ef & 1u);
    uint32_t jc = ~0u, e = 0u;
    for (uint32_t it = lo, q = 0, s = 0; it < hi; ++it, ++q, s = s + 1u == ns ? 0u : s + 1u) {
      if (q >= ns) mbar_wait(empty(s), ((q / ns) - 1u) & 1u);
      const uint32_t j = it / tiles, tile = it - j * tiles;
      if (j != jc) {
        jc = j;
        e = active[j];
      }
      const int64_t row0 = int64_t(e) * N + int64_t(tile) * R;
      if (lane == 0) mbar_arrive_tx(full(s), L.tx);
      __syncwarp();
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
        const uint32_t dst = stage_at(s) + uint32_t(p) * L.proj;
        for (uint32_t r = lane; r < R; r += 32u)
          bulk_copy(dst + r * L.cs, wd.w + (row0 + r) * RWd, RWd * 4u, full(s), pol);
        if (lane == 0u) {
          if constexpr (FP4) {
            bulk_copy(dst + L.codes, static_cast<const uint8_t*>(wd.scales) + row0 * G, R * G, full(s), pol);
          } else {
            bulk_copy(dst + L.codes, static_cast<const __nv_bfloat16*>(wd.scales) + row0 * G, R * G * 2u,
                      full(s), pol);
          }
        } else if (lane == 1u) {
          if constexpr (!FP4)
            bulk_copy(dst + L.codes + L.sbytes, static_cast<const __nv_bfloat16*>(wd.biases) + row0 * G,
                      R * G * 2u, full(s), pol);
        }
      }
    }
    return;
  }

  // The consumers.
  if (!GATEUP) pdl_wait();  // gate/up's H
  const uint32_t gid = lane >> 2, t4 = lane & 3u, nthr = C * 32u;
  unsigned char* Xs = ring_smem + L.xs_off;
  float* XS = reinterpret_cast<float*>(ring_smem + L.XS_off);
  const uint32_t tstride = (K + 8u) * 2u;
  const uint32_t xq = smem_u32(Xs + gid * tstride + t4 * (F::GV / 4) * 2);
  const uint32_t red_words = C * uint32_t(NP * MT) * 4u * 32u;
  uint32_t jc = ~0u, first = 0u, last = 0u, staged = ~0u, rq = 0u;
  for (uint32_t it = lo, q = 0, s = 0; it < hi; ++it, ++q, s = s + 1u == ns ? 0u : s + 1u) {
    const uint32_t j = it / tiles, tile = it - j * tiles;
    if (j != jc) {
      jc = j;
      const uint32_t e = active[j];
      first = offsets[e];
      last = offsets[e + 1u];
    }
    RwUnit<F, MT> u[NP];
    mbar_wait(full(s), (q / ns) & 1u);
#pragma unroll
    for (int p = 0; p < NP; ++p) rw_lds<F, MT>(u[p], stage_at(s) + uint32_t(p) * L.proj, L, G, warp * F::GB, gid, t4);
    ring_bar_arrive(empty(s));
    for (uint32_t c0 = first; c0 < last; c0 += RW_NT, ++rq) {
      const uint32_t nt = min(uint32_t(RW_NT), last - c0);
      if (staged != c0) {  // (a position identifies the expert and the chunk)
        // Every consumer has passed the last round's barrier, so its products (the readers of
        // Xs and XS) are done.
        for (uint32_t t = 0; t < nt; ++t) {
          const __nv_bfloat16* src =
              GATEUP ? xin + int64_t(pairs[c0 + t] / md.k) * K : xin + int64_t(c0 + t) * K;
          rw_stage<F>(src, t, tid, true, Xs, tstride, XS);
        }
        ring_sync(nthr);
        staged = c0;
      }
      float acc[NP][MT][4] = {};
      rw_mma<F, NP, MT>(acc, u, warp * F::GB, xq, XS, t4, gid < nt);
      // (slot rq % 2: a warp writes it again only after the next round's barrier, which every
      // warp reaches after its sums of this round)
      float* Red = reinterpret_cast<float*>(ring_smem + L.red_off) + (rq % RING_NR) * red_words;
      rw_store_partials<NP, MT>(Red, acc, warp, lane);
      ring_sync(nthr);
      rw_reduce_store<GATEUP, NP, MT, false>(Red, tid, nthr, 1u, C, nt, tile * R, N, c0, pairs, rw, Hout, Yp);
    }
  }
}

}  // namespace mlx_moe::cuda
