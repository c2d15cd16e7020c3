// Grouped expert MLP on sm_90a (H100 / H200): the tile of mlp_gg_kernel (moe_cuda_grouped.cuh:
// 128 bucketed pairs x 256 weight rows, K steps of 64, the same arguments and outputs), with
// the products on the asynchronous warpgroup tensor-core instruction (wgmma) instead of
// mma.sync. Compiled only in mlx_moe/csrc/cuda/sm90a/gg_wgmma.cu (-arch sm_90a); the host
// takes it on devices of compute capability 9.0 (cuda_ops.cu, MLX_MOE_CUDA_WGMMA=0: off).
// With NWG = 3 (tiles of 192 pairs, where experts average >= 128 pairs; cuda_ops.cu
// wg_groups) a third warpgroup copies its 64 activation rows and multiplies them with the
// same dequantized tile; the first 256 threads work as below. With RS (affine 4-bit / mxfp4,
// where the experts average few pairs; cuda_ops.cu wg_rs) the weights are dequantized into
// wgmma's A registers instead of a shared tile (the RS block in mlp_wg_kernel).
//
// Per K step (one block, 2 warpgroups = 256 threads):
//   - the gathered activation rows (128 x 64 XT) and the packed weight rows (256 x 32 bytes,
//     8-bit: 64) arrive by cp.async in an S-deep ring, as in mlp_gg_kernel; the activations
//     land in the 128-byte-swizzled K-major layout wgmma reads (16-byte chunk c of row r at
//     chunk c ^ (r & 7); 8-row atoms of 1024 bytes);
//   - each thread dequantizes one weight row of the *next* step (s * q + b rounded once to XT,
//     the same values as mlp_gg_kernel) into one of two XT tiles of 256 x 64 in that layout,
//     while the tensor cores run this step's four m64n256k16 wgmma per warpgroup (warpgroup w
//     takes activation rows 64w .. 64w+63 and all 256 weight rows);
//   - fence.proxy.async + a barrier hand the new tile to the next step's wgmma; the next
//     copies go out after the fence (which waits for the thread's outstanding copies).
// So every weight is dequantized once per block (mlp_gg_kernel's 2 x 4 warps dequantized
// each twice, in registers, between their mma.sync) and the dequantization overlaps the
// products. Scales / biases of the block's rows for all of K are copied once (4-byte
// cp.async) into rows padded to an odd number of words (each thread reads its own row's
// group: conflict-free).
//
// Trellis k-bit (FMT GG_TR; bits per projection, dispatched per panel inside the kernel): the
// stage layout, tables and value of moe_cuda_grouped.cuh's gg_tr_* helpers; each thread
// dequantizes its row's 4 runs of 16 codes per step into the tile like the other formats.
#pragma once

#include "moe_cuda.cuh"

namespace mlx_moe::cuda {

constexpr uint32_t WG_BTILE = 256u * 128u;  // one dequantized weight tile: 256 rows x 64 XT

// Words per padded scale row of d (odd: the 32 threads of a warp read 32 rows' words in
// distinct banks).
__host__ __device__ inline uint32_t wg_sc_words(const WDesc& d) {
  return ((d.groups * scale_elem_bytes(d.scale_kind) + 3u) / 4u) | 1u;
}
// Shared memory of one panel's scales (and biases); trellis: scales [groups][128] + su [K]
// (when present) + codebook, all fp32.
__host__ __device__ inline uint32_t wg_panel_bytes(const WDesc& d) {
  if (d.mode == 2u) return gg_tr_table_bytes(d) + 1024u;  // + its codebook
  return (d.mode == 1u ? 1u : 2u) * uint32_t(GG_TN) * wg_sc_words(d) * 4u;
}
// One raw stage of the kernel on NWG warpgroups (tiles of 64 * NWG pairs: 64 more activation
// rows of 128 bytes per warpgroup past two).
__host__ __device__ inline uint32_t wg_stage_bytes(int fmt, int nwg, const WDesc& p0, const WDesc& p1) {
  return gg_stage_bytes(fmt, p0, p1) + uint32_t(nwg - 2) * 64u * GG_BK * 2u;
}
// Dynamic shared memory of the wgmma kernel with S raw stages (1024: alignment of the base).
// rs (the register-sourced kernel): no dequantized tiles; 1 KB of per-row output indices and
// routing weights (down) instead. The shared-tile kernel's down keeps those (WG_INFO bytes)
// after the panels: its epilogue stages the outputs over the tiles and the ring.
constexpr uint32_t WG_INFO = 2048u;  // 8 bytes per tile row, tiles of up to 256 pairs
__host__ __device__ inline uint32_t wg_smem_bytes(int fmt, int S, const WDesc& p0, const WDesc& p1,
                                                  int nwg = 2, bool rs = false, bool gateup = true) {
  return 1024u + (rs ? 1024u : 2u * WG_BTILE) + uint32_t(S) * wg_stage_bytes(fmt, nwg, p0, p1) +
         wg_panel_bytes(p0) + wg_panel_bytes(p1) + (rs || gateup ? 0u : WG_INFO);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row atoms 1024 bytes apart.
__device__ __forceinline__ uint64_t wg_desc(uint32_t saddr) {
  return uint64_t((saddr & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024u >> 4) << 32) |
         (uint64_t(1) << 62);
}

// wgmma's accumulator operands: the register lists of 32 / 64 / 128 fp32 accumulators
// ("{%0, ..., %N}") and their "+f" bindings to d[0 .. N].
#define WG_R0 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define WG_R1 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define WG_R2 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define WG_R3 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define WG_OPS8(d, o) "+f"(d[(o) + 0]), "+f"(d[(o) + 1]), "+f"(d[(o) + 2]), "+f"(d[(o) + 3]), "+f"(d[(o) + 4]), "+f"(d[(o) + 5]), "+f"(d[(o) + 6]), "+f"(d[(o) + 7])
#define WG_OPS32(d, o) WG_OPS8(d, o), WG_OPS8(d, (o) + 8), WG_OPS8(d, (o) + 16), WG_OPS8(d, (o) + 24)
#define WG_RS32_REGS "{" WG_R0 "}"
#define WG_RS64_REGS "{" WG_R0 ", " WG_R1 "}"
#define WG_ACC_REGS "{" WG_R0 ", " WG_R1 ", " WG_R2 ", " WG_R3 "}"
#define WG_RS32_OPERANDS(d) WG_OPS32(d, 0)
#define WG_RS64_OPERANDS(d) WG_OPS32(d, 0), WG_OPS32(d, 32)
#define WG_ACC_OPERANDS(d) WG_OPS32(d, 0), WG_OPS32(d, 32), WG_OPS32(d, 64), WG_OPS32(d, 96)

// d[64 x 256] += A[64 x 16] . B[256 x 16]^T, both K-major in shared memory.
template <typename XT>
__device__ __forceinline__ void wg_mma(float (&d)[128], uint64_t da, uint64_t db) {
  if constexpr (std::is_same_v<XT, __half>) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " WG_ACC_REGS
                 ", %128, %129, p, 1, 1, 0, 0;\n}\n"
                 : WG_ACC_OPERANDS(d)
                 : "l"(da), "l"(db));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " WG_ACC_REGS
                 ", %128, %129, p, 1, 1, 0, 0;\n}\n"
                 : WG_ACC_OPERANDS(d)
                 : "l"(da), "l"(db));
  }
}

// Register-sourced products (mlp_wg_kernel RS): d[64 x NN] += A[64 x 16] . B[NN x 16]^T, A the
// thread's 4 registers of XT pairs (wgmma's A fragment: rows 16 (warp & 3) + lane / 4 (+ 8 in
// a[1], a[3]), k 2 (lane & 3) (+ 8 in a[2], a[3])), B K-major in shared memory (NN = 64:
// d[0 .. 31]).
template <typename XT, int NN>
__device__ __forceinline__ void wg_mma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t db) {
  static_assert(NN == 64 || NN == 128, "NN");
#define WG_RS_MMA(SHAPE, TY, REGS, OPERANDS_TAIL, OPERANDS)                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\nwgmma.mma_async.sync.aligned." SHAPE     \
               ".f32." TY "." TY " " REGS OPERANDS_TAIL ", p, 1, 1, 0;\n}\n"                       \
               : OPERANDS(d)                                                                     \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db))
  constexpr bool H = std::is_same_v<XT, __half>;
  if constexpr (NN == 128 && H)
    WG_RS_MMA("m64n128k16", "f16", WG_RS64_REGS, ", {%64, %65, %66, %67}, %68", WG_RS64_OPERANDS);
  else if constexpr (NN == 128)
    WG_RS_MMA("m64n128k16", "bf16", WG_RS64_REGS, ", {%64, %65, %66, %67}, %68", WG_RS64_OPERANDS);
  else if constexpr (H)
    WG_RS_MMA("m64n64k16", "f16", WG_RS32_REGS, ", {%32, %33, %34, %35}, %36", WG_RS32_OPERANDS);
  else
    WG_RS_MMA("m64n64k16", "bf16", WG_RS32_REGS, ", {%32, %33, %34, %35}, %36", WG_RS32_OPERANDS);
#undef WG_RS_MMA
}
// Keeps the compiler from moving accumulator accesses across the asynchronous products (the RS
// kernel's 64 per m-block; below: 128).
__device__ __forceinline__ void wg_fence_acc(float (&d)[64]) {
  asm volatile("" : WG_RS64_OPERANDS(d)::"memory");
}
// Keeps the compiler from moving accumulator accesses across the asynchronous products.
__device__ __forceinline__ void wg_fence_acc(float (&d)[128]) {
  asm volatile("" : WG_ACC_OPERANDS(d)::"memory");
}
#undef WG_ACC_REGS
#undef WG_ACC_OPERANDS
#undef WG_RS64_REGS
#undef WG_RS64_OPERANDS
#undef WG_RS32_REGS
#undef WG_RS32_OPERANDS
#undef WG_OPS32
#undef WG_OPS8
#undef WG_R0
#undef WG_R1
#undef WG_R2
#undef WG_R3

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Stores 16-byte chunk c (k 8c .. 8c+7) of dequantized tile row R, whose row starts at shared
// address dst, at its place in the 128-byte-swizzled layout wgmma reads (chunk c ^ (R & 7)).
__device__ __forceinline__ void wg_put_chunk(uint32_t dst, uint32_t c, uint32_t R, uint32_t v0,
                                             uint32_t v1, uint32_t v2, uint32_t v3) {
  asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(dst + ((c ^ (R & 7u)) << 4)), "r"(v0),
               "r"(v1), "r"(v2), "r"(v3));
}

// Trellis: dequantizes thread R's row of one K step (4 k-tiles of 16) into the tile row at
// shared address dst. sm: the shared window; raw: byte offset (from sm) of the row's run in
// k-tile 0 of the stage; scf: the row's scale * sv of group 0 (groups 128 floats apart); suf:
// su[0] or null; lv: the codebook's shared address; k0: the step's first k; gsh:
// pow2_shift(gs).
template <uint32_t BITS, typename XT>
__device__ __forceinline__ void wg_tr_dequant(const unsigned char* sm, uint32_t raw, uint32_t dst,
                                              uint32_t R, const float* scf, const float* suf,
                                              uint32_t lv, uint32_t k0, uint32_t K, uint32_t gs,
                                              uint32_t gsh) {
#pragma unroll
  for (uint32_t j = 0; j < 4; ++j) {
    const uint32_t kj = k0 + 16u * j;
    uint32_t v[8];
    if (kj < K) {
      float f[16];
      gg_tr_levels<BITS, 16, (BITS & 1u) ? 2u : 0u>(sm, raw + BITS * 256u * j, lv,
                                                     scf[div_shift(kj, gs, gsh) * uint32_t(GG_TN)],
                                                     suf ? suf + kj : nullptr, f);
#pragma unroll
      for (uint32_t i = 0; i < 8; ++i) v[i] = gg_pack<XT>(f[2 * i], f[2 * i + 1]);
    } else {  // past K (K % 64 == 32): zeros, whatever the zero-filled stage decodes to
#pragma unroll
      for (uint32_t i = 0; i < 8; ++i) v[i] = 0u;
    }
#pragma unroll
    for (uint32_t h = 0; h < 2; ++h)
      wg_put_chunk(dst, 2u * j + h, R, v[4 * h], v[4 * h + 1], v[4 * h + 2], v[4 * h + 3]);
  }
}

// Physical 16-byte chunk of logical chunk ch of raw weight row R in a stage: the 8 rows a
// quarter warp reads at once (one per thread) land in distinct 16-byte bank groups (rows of
// 32 bytes: swap on bit 2 of R; rows of 64 bytes: XOR with bits 1-2).
template <int FMT>
__device__ __forceinline__ uint32_t wg_raw_pos(uint32_t ch, uint32_t R) {
  return FMT == GG_A8 ? ch ^ ((R >> 1) & 3u) : ch ^ ((R >> 2) & 1u);
}

// Stores a block's outputs staged in shared memory at st (rows x OW XT, rows 2 OW + 16 bytes
// apart: the fragments' 4-byte stores of 8 rows by 4 lanes hit 32 distinct banks) to columns
// nb .. of out's rows, 16 bytes per thread and store (N % 8 == 0; else element by element):
// a warp writes 512 contiguous bytes where the fragments' own stores wrote 8 pieces of 16.
// Output row of tile row r: row0 + r (gate/up: H is in bucketed order) or the pair index at
// info + 8 r (down).
template <bool GATEUP, typename XT, uint32_t OW, uint32_t THREADS>
__device__ __forceinline__ void wg_store_rows(XT* __restrict__ out, uint32_t st, uint32_t info,
                                              uint32_t rows, uint32_t row0, uint32_t nb,
                                              uint32_t N, uint32_t tid) {
  constexpr uint32_t ROWB = 2u * OW + 16u, CPR = OW / 8u;
  const bool vec = (N & 7u) == 0u;
  for (uint32_t id = tid; id < rows * CPR; id += THREADS) {
    const uint32_t r = id / CPR, ch = id % CPR, n = nb + 8u * ch;
    if (n >= N) continue;
    uint32_t orow = row0 + r;
    if constexpr (!GATEUP) asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(orow) : "r"(info + 8u * r));
    XT* o = out + int64_t(orow) * N + n;
    const uint32_t src = st + r * ROWB + 16u * ch;
    if (vec) {
      uint4 v;
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(src));
      *reinterpret_cast<uint4*>(o) = v;
    } else {
      for (uint32_t e = 0; e < 8u && n + e < N; ++e) {
        uint16_t b;
        asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(b) : "r"(src + 2u * e));
        reinterpret_cast<uint16_t*>(o)[e] = b;
      }
    }
  }
}

// One projection of the grouped MLP (see the top of this file and mlp_gg_kernel: the same
// arguments, grid and outputs). S: raw stages in the cp.async ring (3 or 4, by shared memory).
// NWG: warpgroups (2: tiles of 128 pairs; 3: tiles of 192 pairs, where the third warpgroup
// only copies activations and multiplies: the first 256 threads load and dequantize the
// weight rows, as with 2, so each dequantized tile feeds 1.5x the products; not trellis).
//
// RS (affine 4-bit / mxfp4, 2 warpgroups, S >= 4): the weights are wgmma's A operand,
// dequantized straight into registers, and the activations its B operand (the RS block below).
template <bool GATEUP, typename XT, int FMT, int SK, int S, int NWG = 2, bool RS = false>
__global__ void __launch_bounds__(128 * NWG, 1)
    mlp_wg_kernel(MlpDesc md, const XT* __restrict__ A, const uint32_t* __restrict__ pairs,
                  const uint32_t* __restrict__ offsets, const uint32_t* __restrict__ tiles,
                  const uint32_t* __restrict__ meta, const float* __restrict__ rw,
                  XT* __restrict__ out, uint32_t) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // (other targets: an empty body, never launched)
  extern __shared__ __align__(1024) unsigned char wg_shared[];
  static_assert(NWG == 2 || (NWG == 3 && FMT != GG_TR), "warpgroups");
  constexpr uint32_t THREADS = 128u * NWG, TM = 64u * NWG;
  GgTile t;
  if (!gg_tile<GATEUP, TM>(md, tiles, offsets, meta, t)) return;
  const uint32_t e = t.e, row0 = t.row0, rows = t.rows, N = t.N, K = t.K, nb = t.nb;
  const WDesc& wd0 = GATEUP ? md.gate : md.down;
  const WDesc& wd1 = GATEUP ? md.up : md.down;
  // First weight row of panel p (gate/up: gate and up rows of the same 128 columns; down:
  // 256 consecutive rows).
  const uint32_t n0[2] = {nb, GATEUP ? nb : nb + uint32_t(GG_TN)};
  const uint32_t tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
  constexpr uint32_t ABYTES = TM * GG_BK * 2u;
  const uint32_t STAGE = wg_stage_bytes(FMT, NWG, wd0, wd1);
  constexpr uint32_t BROW = gg_brow(FMT), BPR = BROW / 16u, KPC = FMT == GG_A8 ? 16u : 32u;
  const uint32_t smem0 = (smem_u32(wg_shared) + 1023u) & ~1023u;
  const uint32_t bt0 = smem0, ring = smem0 + (RS ? 1024u : 2u * WG_BTILE);
  // padded raw scales / biases: [panel][128 rows][sw[p] words]
  // (trellis: gg_tr_layout: scp = scale * sv, bip = su, grp = codebooks)
  uint32_t scp[2], bip[2], sw[2], grp[2];
  uint32_t info;  // down, shared tiles: each tile row's pair and routing weight (WG_INFO)
  {
    uint32_t off = ring + uint32_t(S) * STAGE;
    if constexpr (FMT == GG_TR) off = gg_tr_layout(off, wd0, wd1, K, scp, bip, grp);
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      if constexpr (FMT == GG_TR) continue;
      const WDesc& wd = p ? wd1 : wd0;
      sw[p] = wg_sc_words(wd);
      scp[p] = off;
      off += GG_TN * sw[p] * 4u;
      bip[p] = off;
      if (wd.mode != 1u) off += GG_TN * sw[p] * 4u;
    }
    info = off;
  }
  // Down: tile row r's output row (its pair index) and routing weight, 8 bytes at info + 8 r.
  auto put_info = [&](uint32_t at) {
    for (uint32_t r = tid; r < rows; r += THREADS) {
      const uint32_t pr = pairs[row0 + r];
      asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" ::"r"(at + 8u * r), "r"(pr),
                   "r"(__float_as_uint(rw[pr])));
    }
  };

  // activation copies: straight into wgmma's 128-byte-swizzled layout
  const XT* arow[4];
  bool aok[4];
  gg_arows<GATEUP, XT, THREADS>(A, pairs, md.k, t, tid, arow, aok);
  // Weight loader / dequantizer: thread -> weight row R = tid (panel R >> 7); threads from 256
  // on (NWG 3) have no row.
  const bool wthr = NWG == 2 || tid < 256u;
  const uint32_t R = wthr ? tid : 0u, rp = R >> 7, rr = R & 127u;
  const WDesc& wdr = rp ? wd1 : wd0;
  const uint32_t nrow = (rp ? n0[1] : n0[0]) + rr;
  const bool rok = nrow < N;
  const uint32_t* wrow = wdr.w + (int64_t(e) * N + (rok ? nrow : 0u)) * wdr.row_words;
  const uint64_t wpol = weight_l2_policy(md.l2_ef & 2u);
  const uint32_t rsc = FMT == GG_TR ? 0u : rr * (rp ? sw[1] : sw[0]) * 4u;  // row's scales (bytes)
  const uint32_t ssr = rp ? scp[1] : scp[0], sbr = rp ? bip[1] : bip[0];
  const uint32_t gsu = wdr.gs_units, G = wdr.groups;
  const uint32_t gush = pow2_shift(gsu);  // the group of a unit of 32 k by a shift
  // scale group of unit u (32 k) of K step kt (clamped: units past K read the last group)
  auto unit_group = [&](uint32_t kt, uint32_t u) { return min(div_shift(2u * kt + u, gsu, gush), G - 1u); };
  const uint32_t KT = (K + GG_BK - 1) / GG_BK;

  uint32_t trq[2][2];  // trellis: the copy plan (gg_tr_copy_plan)
  if constexpr (FMT == GG_TR) gg_tr_copy_plan(wd0, wd1, n0, N, tid, trq);
  auto load_stage = [&](uint32_t kt, uint32_t slot) {
    const uint32_t k0 = kt * GG_BK;
    const uint32_t sa = ring + slot * STAGE, sbw = sa + ABYTES;
    auto swz = [](uint32_t c, uint32_t r) { return c ^ (r & 7u); };
    gg_copy_act<XT, decltype(swz), THREADS>(sa, arow, aok, kt, K, tid, swz);
    if constexpr (FMT == GG_TR) {
      gg_tr_copy_stage(sbw, wd0, wd1, e, k0, n0, N, K, tid, trq);
    } else if (wthr) {
      // raw weight row R: BROW bytes (64 codes), 16-byte chunks permuted by wg_raw_pos
#pragma unroll
      for (uint32_t ch = 0; ch < BPR; ++ch) {
        const bool ok = rok && k0 + KPC * ch < K;
        // (a zero-filled copy reads nothing: its source is wrow, a row of the expert, not a
        // select against the projection's base; see gg_copy_act)
        cp_async16(sbw + R * BROW + (wg_raw_pos<FMT>(ch, R) << 4),
                   wrow + (ok ? k0 / (FMT == GG_A8 ? 4u : 8u) + 4u * ch : 0u), ok ? 16u : 0u, wpol);
      }
    }
  };
  auto load_scales = [&]() {
    if constexpr (FMT == GG_TR) {
      gg_tr_load_tables(reinterpret_cast<float*>(wg_shared), smem_u32(wg_shared), scp, bip, grp, wd0,
                        wd1, e, n0, N, K, tid);
    } else {
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const WDesc& wd = p ? wd1 : wd0;
        const uint32_t per_row = wd.groups * scale_elem_bytes(wd.scale_kind) / 4u;  // words
        const uint32_t vrows = n0[p] < N ? min(uint32_t(GG_TN), N - n0[p]) : 0u;
        const int64_t base = (int64_t(e) * N + n0[p]) * per_row;
        for (int a = 0; a < (FMT == GG_FP4 ? 1 : 2); ++a) {
          const uint32_t* src = static_cast<const uint32_t*>(a ? wd.biases : wd.scales);
          const uint32_t dst = a ? bip[p] : scp[p];
          for (uint32_t q = tid; q < GG_TN * per_row; q += THREADS) {
            const uint32_t r = q / per_row, c = q - r * per_row;
            const bool ok = r < vrows;
            cp_async4(dst + (r * sw[p] + c) * 4u, ok ? src + base + q : src, ok ? 4u : 0u);
          }
        }
      }
    }
  };
  const uint32_t gsh = pow2_shift(wdr.group_size);  // trellis: the group of k by a shift
  // Dequantize the raw weight row R of stage kt (ring slot) into tile buffer b: 16-byte
  // chunk c of the tile = k 8c .. 8c+7 = 4-bit word c (byte j: codes 2j, 2j+1) or 8-bit
  // words 2c, 2c+1 (trellis: wg_tr_dequant).
  auto dequant = [&](uint32_t kt, uint32_t slot, uint32_t b) {
    if constexpr (FMT == GG_TR) {
      const uint32_t s0 = smem_u32(wg_shared);
      const uint32_t raw = ring + slot * STAGE + ABYTES + (rp ? 1024u * wd0.bits : 0u) - s0 +
                           wdr.bits * (32u * (rr >> 4) + 2u * (rr & 15u));
      const float* sf = reinterpret_cast<const float*>(wg_shared);
      const float* scf = sf + (ssr - s0) / 4u + rr;
      const float* suf = wdr.has_su ? sf + (sbr - s0) / 4u : nullptr;
      const uint32_t lv = rp ? grp[1] : grp[0];
      const uint32_t dst = bt0 + b * WG_BTILE + R * 128u, k0 = kt * GG_BK, gs = wdr.group_size;
#define WG_TR(B) wg_tr_dequant<B, XT>(wg_shared, raw, dst, R, scf, suf, lv, k0, K, gs, gsh)
      switch (wdr.bits) {
        case 2: WG_TR(2); break;
        case 3: WG_TR(3); break;
        case 4: WG_TR(4); break;
        case 5: WG_TR(5); break;
        case 6: WG_TR(6); break;
        case 7: WG_TR(7); break;
        default: WG_TR(8); break;
      }
#undef WG_TR
    } else {
      const uint32_t sbw = ring + slot * STAGE + ABYTES + R * BROW;
      auto load_raw = [&](uint32_t (&w)[4 * BPR]) {
#pragma unroll
        for (uint32_t ch = 0; ch < BPR; ++ch)
          asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                       : "=r"(w[4 * ch]), "=r"(w[4 * ch + 1]), "=r"(w[4 * ch + 2]), "=r"(w[4 * ch + 3])
                       : "r"(sbw + (wg_raw_pos<FMT>(ch, R) << 4)));
      };
      if constexpr (FMT == GG_FP4 && NWG == 2) {
        // Tiles of 128 pairs: the scale folded into the byte tables (gg_fp4_scaled), no
        // multiply per pair; the integer form of the tables, and where a scale byte lies
        // outside its range (never, for real checkpoints) the row step is read and written
        // again from the fp32 form. (H200, mxfp4 per layer: 1024 tokens 476 -> 447 us. On
        // three warpgroups, tiles of 192, the same code made gate/up 3% slower, 4096 tokens
        // 1047 -> 1073 us, and without the second pass 1045: they keep the multiply below.)
        uint32_t E[2];
        bool exact = true;
#pragma unroll
        for (uint32_t u = 0; u < 2; ++u) {
          E[u] = gg_e8m0(ssr, rsc, unit_group(kt, u));
          exact = exact && gg_fp4_exact_int<XT>(E[u]);
        }
        const uint32_t dst = bt0 + b * WG_BTILE + R * 128u;
        auto put = [&](auto f32) {
          uint32_t w[4 * BPR];
          load_raw(w);
          const GgFp4Tab tab[2] = {gg_fp4_scaled<XT, decltype(f32)::value>(E[0]),
                                   gg_fp4_scaled<XT, decltype(f32)::value>(E[1])};
#pragma unroll
          for (uint32_t c = 0; c < 8; ++c) {
            uint32_t v[4];
            gg_fp4_quad<true>(w[c], 0u, tab[c >> 2], v[0], v[1]);
            gg_fp4_quad<true>(w[c], 1u, tab[c >> 2], v[2], v[3]);
            wg_put_chunk(dst, c, R, v[0], v[1], v[2], v[3]);
          }
        };
        put(std::false_type{});
        if (!exact) put(std::true_type{});
      } else {
        uint32_t w[4 * BPR];
        load_raw(w);
        uint32_t s2[2], b2[2];
        float sf[2], bf[2];
#pragma unroll
        for (uint32_t u = 0; u < 2; ++u)
          gg_scale<XT, FMT, SK>(ssr, sbr, rsc, unit_group(kt, u), s2[u], b2[u], sf[u], bf[u]);
        const uint32_t dst = bt0 + b * WG_BTILE + R * 128u;
#pragma unroll
        for (uint32_t c = 0; c < 8; ++c) {
          const uint32_t u = c >> 2;
          uint32_t v[4];
          if constexpr (FMT == GG_A4) {
            const uint32_t wc = w[c], w4 = wc >> 4;
#pragma unroll
            for (int j = 0; j < 4; ++j) v[j] = gg_fma2<XT>(gg_a4_pair<XT>(wc, w4, j), s2[u], b2[u]);
          } else if constexpr (FMT == GG_FP4) {
            uint32_t q[4];
            gg_fp4_quad<XT>(w[c], 0u, q[0], q[1]);
            gg_fp4_quad<XT>(w[c], 1u, q[2], q[3]);
#pragma unroll
            for (int j = 0; j < 4; ++j) v[j] = gg_fma2<XT>(q[j], s2[u], b2[u]);
          } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const uint32_t wc = w[2 * c + (j >> 1)], jb = j & 1;
              if constexpr (std::is_same_v<XT, __half>) {
                v[j] = gg_fma2<XT>(gg_a8_pair_f16(wc, jb), s2[u], b2[u]);
              } else {
                v[j] = gg_pack<XT>(fmaf(sf[u], gg_a8_code(wc, 2 * jb), bf[u]),
                                   fmaf(sf[u], gg_a8_code(wc, 2 * jb + 1), bf[u]));
              }
            }
          }
          wg_put_chunk(dst, c, R, v[0], v[1], v[2], v[3]);
        }
      }
    }
  };

  if constexpr (RS) {
    // ---- register-sourced products: D[weight rows x pairs] = W . X^T per warpgroup ----
    // Warpgroup w owns two m64 blocks of the block's 256 weight rows (gate/up: the gate and the
    // up row of the same 64 features, so that each thread holds both halves of its outputs;
    // down: 128 consecutive rows) and multiplies them with all the tile's pairs (wgmma N =
    // 128, or 64 when the tile has no more). Each thread dequantizes its A fragment's rows
    // (16 q + g (+ 8) of both m-blocks) at its 16 k of each half step (32 k: bytes lane & 3
    // of 4 consecutive 4-bit words) into registers while the previous half step's products
    // run: the weights never pass through a shared-memory tile, so no block barrier or proxy
    // fence stands between dequantization and the products, and both warpgroups multiply
    // even when the tile has <= 64 pairs. The raw stages still arrive by cp.async (one
    // barrier per K step: the copies landed; the ring slot refilled is the one of step kt-2,
    // which every warpgroup has retired).
    static_assert(NWG == 2 && (FMT == GG_A4 || FMT == GG_FP4) && S >= 4, "RS");
    constexpr uint32_t MB = 2u, PN = GG_TN;  // m-blocks per warpgroup, weight rows per panel
    if (!GATEUP) put_info(smem0);
#pragma unroll
    for (int s = 0; s < S - 2; ++s) {
      if (uint32_t(s) < KT) load_stage(s, s);
      if (s == 0) load_scales();
      cp_async_commit();
    }
    const uint32_t q = warp & 3u, g = lane >> 2, t4 = lane & 3u, wgrp = warp >> 2;
    // the thread's rows R(i, h): raw row offset in a stage (chunk 0; chunk 1 is bit 4 flipped),
    // scale and bias row addresses
    uint32_t rraw[MB][2], rsa[MB][2], rba[MB][2];
#pragma unroll
    for (uint32_t i = 0; i < MB; ++i)
#pragma unroll
      for (uint32_t h = 0; h < 2; ++h) {
        const uint32_t R = GATEUP ? PN * h + (PN / 2u) * wgrp + 32u * i + 8u * q + g
                                  : PN * wgrp + 64u * i + 16u * q + 8u * h + g;
        const uint32_t p = R / PN, rrow = (R % PN) * (p ? sw[1] : sw[0]) * 4u;
        rraw[i][h] = ABYTES + R * BROW + (wg_raw_pos<FMT>(0u, R) << 4);
        rsa[i][h] = (p ? scp[1] : scp[0]) + rrow;
        rba[i][h] = (p ? bip[1] : bip[0]) + rrow;
      }
    const uint32_t sel = t4 | ((4u + t4) << 4);  // byte lane & 3 of word 0, of word 1
    const uint32_t ush = pow2_shift(gsu);         // the group of a half step: a shift
    auto run = [&](auto nn) {
      constexpr int NN = decltype(nn)::value;
      float acc[MB][64];
#pragma unroll
      for (uint32_t i = 0; i < MB; ++i)
#pragma unroll
        for (uint32_t v = 0; v < 64; ++v) acc[i][v] = 0.f;
      // A fragments of the two half steps: [half][m-block][k16 of the half][register]
      uint32_t a[2][MB][2][4];
      // Stage kt landed for everyone (and every warpgroup retired step kt-2): refill its slot.
      auto landed = [&](uint32_t kt) {
        cp_async_wait<S - 3>();
        fence_proxy_async();
        __syncthreads();
        const uint32_t nk = kt + S - 2;
        if (nk < KT) load_stage(nk, nk % S);
        cp_async_commit();
      };
      // Dequantizes half step u of step kt into ar: per row, one 16-byte chunk of 4 words;
      // byte j of x = byte lane & 3 of word j = k 16 (j >> 1) + 8 (j & 1) + 2 (lane & 3) + {0, 1}.
      auto dequant_half = [&](uint32_t kt, uint32_t u, uint32_t (&ar)[MB][2][4]) {
        const uint32_t sa = ring + (kt % S) * STAGE;
        const uint32_t grp = min(div_shift(2u * kt + u, gsu, ush), G - 1u);
#pragma unroll
        for (uint32_t i = 0; i < MB; ++i)
#pragma unroll
          for (uint32_t h = 0; h < 2; ++h) {
            uint32_t w[4];
            asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                         : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                         : "r"(sa + (rraw[i][h] ^ (u << 4))));
            uint32_t s2, b2;
            float sf, bf;
            gg_scale<XT, FMT, SK>(rsa[i][h], rba[i][h], 0u, grp, s2, b2, sf, bf);
            const uint32_t x = __byte_perm(__byte_perm(w[0], w[1], sel), __byte_perm(w[2], w[3], sel), 0x5410u);
            if constexpr (FMT == GG_A4) {
              const uint32_t x4 = x >> 4;
#pragma unroll
              for (int j = 0; j < 4; ++j)
                ar[i][j >> 1][h + 2 * (j & 1)] = gg_fma2<XT>(gg_a4_pair<XT>(x, x4, j), s2, b2);
            } else {
              uint32_t q[4];
              gg_fp4_quad<XT>(x, 0u, q[0], q[1]);
              gg_fp4_quad<XT>(x, 1u, q[2], q[3]);
#pragma unroll
              for (int j = 0; j < 4; ++j) ar[i][j >> 1][h + 2 * (j & 1)] = gg_fma2<XT>(q[j], s2, b2);
            }
          }
      };
      // Issues half step u of step kt: one commit group per k16.
      auto issue_half = [&](uint32_t kt, uint32_t u, uint32_t (&ar)[MB][2][4]) {
        const uint32_t sa = ring + (kt % S) * STAGE;
        wg_fence();
#pragma unroll
        for (uint32_t kk = 0; kk < 2; ++kk) {
#pragma unroll
          for (uint32_t i = 0; i < MB; ++i)
            wg_mma_rs<XT, NN>(acc[i], ar[i][kk], wg_desc(sa + 32u * (2u * u + kk)));
          wg_commit();
        }
      };
      // Issue a half step, retire the one before it (wait 2: this half's two groups stay in
      // flight), dequantize the next into the registers just freed. (Waiting before the
      // issue instead, with one group in flight while the next A registers are written,
      // makes ptxas serialize every wgmma of the kernel, C7513.)
      landed(0);
      dequant_half(0, 0, a[0]);
      for (uint32_t kt = 0; kt < KT; ++kt) {
        issue_half(kt, 0, a[0]);
        wg_wait<2>();
        dequant_half(kt, 1, a[1]);
        issue_half(kt, 1, a[1]);
        wg_wait<2>();
        if (kt + 1 < KT) {
          landed(kt + 1);
          dequant_half(kt + 1, 0, a[0]);
        }
      }
      wg_wait<0>();
#pragma unroll
      for (uint32_t i = 0; i < MB; ++i) wg_fence_acc(acc[i]);
      cp_async_wait<0>();
      __syncthreads();  // the ring is free: it stages the outputs

      // ---- epilogue: acc[i][4 j + 2 h + c] = (row 16 q + g + 8 h of m-block i, pair
      // 8 j + 2 (lane & 3) + c); staged as [pair][column] XT rows of OW columns (+16 bytes),
      // then stored 16 bytes at a time (wg_store_rows)
      constexpr uint32_t OW = GATEUP ? PN : 2u * PN, ROWB = 2u * OW + 16u;
#pragma unroll
      for (uint32_t j = 0; j < uint32_t(NN) / 8u; ++j)
#pragma unroll
        for (uint32_t c = 0; c < 2; ++c) {
          const uint32_t r = 8u * j + 2u * t4 + c;
          float scale = 1.f;
          if constexpr (!GATEUP) {
            if (r < rows) asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(scale) : "r"(smem0 + 8u * r + 4u));
          }
#pragma unroll
          for (uint32_t i = 0; i < MB; ++i)
#pragma unroll
            for (uint32_t h = 0; h < (GATEUP ? 1u : 2u); ++h) {
              const uint32_t col = GATEUP ? (PN / 2u) * wgrp + 32u * i + 8u * q + g
                                          : PN * wgrp + 64u * i + 16u * q + 8u * h + g;
              const float v = GATEUP ? silu(acc[i][4 * j + c]) * acc[i][4 * j + 2 + c]
                                     : scale * acc[i][4 * j + 2 * h + c];
              asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(ring + r * ROWB + 2u * col),
                           "h"(uint16_t(gg_pack<XT>(v, 0.f) & 0xFFFFu)));
            }
        }
      __syncthreads();
      wg_store_rows<GATEUP, XT, OW, THREADS>(out, ring, smem0, rows, row0, nb, N, tid);
    };
    if (rows <= 64u)
      run(std::integral_constant<int, 64>{});
    else
      run(std::integral_constant<int, 128>{});
  } else {
    float acc[128];
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.f;

#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
      if (uint32_t(s) < KT) load_stage(s, s);
      if (s == 0) load_scales();
      cp_async_commit();
    }
    // (down: loaded here, read in the epilogue; in the epilogue, two dependent global loads per
    // row stood between the products and the stores: ncu, mxfp4 down at 4096 tokens, 11% of
    // the kernel's stall samples)
    if (!GATEUP) put_info(info);
    cp_async_wait<S - 2>();
    __syncthreads();
    if (wthr) dequant(0, 0, 0);
    fence_proxy_async();  // (every thread: its activation copies too)
    __syncthreads();

    const uint32_t wgrp = warp >> 2;  // warpgroup: activation rows 64 wgrp ..
    // A warpgroup whose 64 rows are all padding (tiles of <= 64 pairs: an expert's last tile,
    // every tile at a few hundred tokens) issues no products: the other one gets the SM's
    // tensor cores to itself.
    const bool busy = wgrp * 64u < rows;
    // Step kt: issue its products, then (while they run, queued behind step kt-1's) wait for
    // step kt-1's, refill the ring slot they read and dequantize step kt+1 into the tile they
    // read. The tensor cores stay busy while one barrier + dequantization + one barrier take
    // less than a step's products.
    for (uint32_t kt = 0; kt < KT; ++kt) {
      const uint32_t sa = ring + (kt % S) * STAGE + wgrp * 8192u, sb = bt0 + (kt & 1u) * WG_BTILE;
      if (busy) {
        wg_fence_acc(acc);
        wg_fence();
#pragma unroll
        for (uint32_t kk = 0; kk < 4; ++kk) wg_mma<XT>(acc, wg_desc(sa + 32u * kk), wg_desc(sb + 32u * kk));
        wg_commit();
      }
      wg_wait<1>();  // step kt-1's products (this warpgroup's) are done
      wg_fence_acc(acc);
      cp_async_wait<S - 3>();  // stage kt+1 landed (this thread's copies)
      __syncthreads();  // every warpgroup past step kt-1; everyone's copies of stage kt+1 landed
      if (kt + 1 < KT) {
        if (wthr) dequant(kt + 1, (kt + 1) % S, (kt + 1) & 1u);  // into the tile step kt-1 read
        fence_proxy_async();
      }
      // The next copies go out after the fence (it waits for this thread's outstanding memory
      // operations: issued before it, they cost a memory round trip per step, 795 -> 735 us
      // of gate/up at 4096 tokens), into the ring slot step kt-1 read.
      {
        const uint32_t nk = kt + S - 1;
        if (nk < KT) load_stage(nk, nk % S);
        cp_async_commit();
      }
      __syncthreads();  // the tile of step kt+1 is complete
    }
    wg_wait<0>();
    wg_fence_acc(acc);
    cp_async_wait<0>();
    __syncthreads();  // every warpgroup's products are done: the tiles and the ring stage the outputs

    // ---- epilogue: acc[4 j + 2 h + c] = (row 64 wgrp + 16 (warp & 3) + gid + 8 h,
    // column 8 j + 2 t4 + c) of the block's 64 x 256 (weight rows: panel 0 then panel 1);
    // staged as [tile row][column] XT rows of OW columns, then stored 16 bytes at a time
    // (wg_store_rows; the fragments' own 4-byte stores, with down's two dependent loads per
    // row, were the epilogue that held 26% of down's stall samples, ncu, mxfp4 at 4096
    // tokens; staged, with the loads in the prologue: down 361 -> 309 us there)
    constexpr uint32_t OW = GATEUP ? GG_TN : 2u * GG_TN, ROWB = 2u * OW + 16u;
    static_assert(TM * ROWB <= 2u * WG_BTILE + uint32_t(S) * ABYTES, "staging past the ring");
    const uint32_t gid = lane >> 2, t4 = lane & 3u;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t r = wgrp * 64u + (warp & 3u) * 16u + gid + 8u * h;
      if (r >= rows) continue;
      float scale = 1.f;
      if constexpr (!GATEUP) asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(scale) : "r"(info + 8u * r + 4u));
#pragma unroll
      for (int j = 0; j < (GATEUP ? 16 : 32); ++j) {
        float v[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float a = acc[4 * j + 2 * h + c];
          v[c] = GATEUP ? silu(a) * acc[4 * (j + 16) + 2 * h + c] : scale * a;
        }
        asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(bt0 + r * ROWB + 16u * j + 4u * t4),
                     "r"(gg_pack<XT>(v[0], v[1])));
      }
    }
    __syncthreads();
    wg_store_rows<GATEUP, XT, OW, THREADS>(out, bt0, info, rows, row0, nb, N, tid);
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

}  // namespace mlx_moe::cuda
