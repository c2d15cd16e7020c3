// Decode-path expert MLP with the weights loaded straight into registers (compiled in
// mlx_moe/csrc/cuda/cuda_regw.cu; kernels/moe_cuda.cuh has the helpers, moe_cuda_regw_host.h
// what the launch code needs).
//
// Affine 4-bit projections with bf16 scales and biases, bf16 activations (8-bit: BITS, below,
// the same on rows of twice as many nibbles; mxfp4: FP4, below). Block = (non-empty
// expert slot j, 16 * MT output rows); K / 256 warps, warp w owns k in [256 w, 256 w + 256).
// Lane (gid, t4) loads, for each of its rows gid and gid + 8 (of each projection and row
// tile), the codes it feeds the MMA as one 4/8/16-byte load per scale group: 32 / GS * 8
// codes, group g's part t4 -- so that the 16 k of every MMA lie in one group and its products
// can be scaled in fp32 (acc += s * T + (b - 128 s) * sum(x), the codes entering as 128 + q,
// nib2_bf16_128). The code word's nibbles (s, s + 4) form the A operand's k pairs; the
// staged activations are permuted to match (per 8 values: 0, 4, 1, 5, 2, 6, 3, 7), so one
// 16-byte shared load is a word's two B operands. Nothing of the weights goes through shared
// memory: each thread issues all its loads (8 words per row, and its rows' scales and
// biases) first, then the block stages the activations, and the products need no ldmatrix.
// The warps' partial sums meet in shared memory (split-K over the warps).
// GATEUP: H[pos, n] = silu(gate) * up as bf16 (bucketed position order, the down kernel's
// rows); down: Yp[pair, n] = rw[pair] * (H W^T)[pos, n] in fp32 (combine_kernel sums the slots).
//
// DIRECT (few pairs, no bucketing; RegwDirect): gate/up block x is pair p (its id read from
// ids; H row p); the down block is (token t, 16 rows) with k * K / 256 warps: the token's k
// slots, each over its own expert's rows and K / 256 warps, with H rows t k .. t k + k - 1
// staged as the MMA's columns (slot s uses column s) -- the slots are one more split of the
// sum, weighted by rw, so the block writes y[t] itself (bf16; no Yp, no combine kernel),
// summing the slots in order as combine_kernel does (not bitwise its result: the weighted
// products may contract into FMAs here). A slot with an out-of-range id adds
// nothing (its H row is not written: it is staged as zeros and skipped).
#pragma once

#include "moe_cuda.cuh"
#include "moe_cuda_regw_host.h"

namespace mlx_moe::cuda {

// NW words at p into o (the read-only path), with L2 cache policy pol (weight_l2_policy).
// Not volatile: the compiler may move these loads, and may issue one that the source guards by
// a condition without that condition (it hoisted a STREAM kernel's second-pass reloads out of
// their branch). So every address a caller forms must be in bounds whether or not its load
// is taken: the STREAM kernels clamp their next chunk to the warp's last one.
template <int NW>
__device__ __forceinline__ void rw_ldg(const uint32_t* p, uint32_t* o, uint64_t pol) {
  if constexpr (NW == 1) {
    asm("ld.global.nc.L2::cache_hint.u32 %0, [%1], %2;\n" : "=r"(o[0]) : "l"(p), "l"(pol));
  } else if constexpr (NW == 2) {
    asm("ld.global.nc.L2::cache_hint.v2.u32 {%0, %1}, [%2], %3;\n"
        : "=r"(o[0]), "=r"(o[1])
        : "l"(p), "l"(pol));
  } else {
    asm("ld.global.nc.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;\n"
        : "=r"(o[0]), "=r"(o[1]), "=r"(o[2]), "=r"(o[3])
        : "l"(p), "l"(pol));
  }
}

// bf16 number q of packed words w (little-endian halves) as fp32
__device__ __forceinline__ float rw_bf16_at(const uint32_t* w, int q) {
  const uint32_t v = w[q >> 1];
  return __uint_as_float((q & 1) ? (v & 0xFFFF0000u) : (v << 16));
}

// Byte q of packed words w (little-endian)
__device__ __forceinline__ uint32_t rw_u8_at(const uint32_t* w, int q) {
  return (w[q >> 2] >> (8 * (q & 3))) & 0xFFu;
}

// A format's layout in these kernels: group size GS codes of BITS bits (FP4: mxfp4).
template <int GS_, int BITS_, bool FP4_>
struct RwFmt {
  static constexpr int GS = GS_, BITS = BITS_;
  static constexpr bool FP4 = FP4_;
  static constexpr int GV = GS * BITS / 4;                     // nibbles per scale group
  static constexpr float COFF = BITS == 8 ? 2176.f : 128.f;    // the codes' offset per group sum
  static constexpr int WPT = GV / 32;                          // code words per thread, row and group
  static constexpr int GB = 8 / WPT;                           // groups per chunk (256 k)
  // words of a chunk's GB scales (bf16; FP4: E8M0 bytes) and biases (FP4: none)
  static constexpr int SW = FP4 ? GB / 4 : GB / 2 > 0 ? GB / 2 : 1;
  static constexpr int BW = FP4 ? 1 : SW;
};

// What a lane holds of one projection's chunk of 256 k (GB groups) for MT row tiles: its
// rows gid and gid + 8 of each tile, 8 code words each, their scales and biases.
template <class F, int MT>
struct RwUnit {
  uint32_t w[MT][2][8];
  uint32_t s[MT][2][F::SW], b[MT][2][F::BW];
};

// Loads unit u: rows row0 + 16 mt + gid (+ 8) of wd, groups g0 .. g0 + GB - 1 (G groups and
// RWd words per row), with L2 policy pol; zeros when !live (the direct down kernel's dropped
// slot: its products are not used).
template <class F, int MT>
__device__ __forceinline__ void rw_load(RwUnit<F, MT>& u, const WDesc& wd, int64_t row0, uint32_t G,
                                        uint32_t RWd, uint32_t g0, uint32_t gid, uint32_t t4,
                                        uint64_t pol, bool live = true) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t row = row0 + mt * 16 + gid + 8 * r;
      const uint32_t* src = wd.w + row * RWd + g0 * (F::GV / 8) + t4 * F::WPT;
      const int64_t so = row * G + g0;  // scale index (G % GB == 0: SW-word aligned)
      if (!live) {
#pragma unroll
        for (int i = 0; i < 8; ++i) u.w[mt][r][i] = 0u;
#pragma unroll
        for (int i = 0; i < F::SW; ++i) u.s[mt][r][i] = 0u;
#pragma unroll
        for (int i = 0; i < F::BW; ++i) u.b[mt][r][i] = 0u;
        continue;
      }
#pragma unroll
      for (int i = 0; i < F::GB; ++i) rw_ldg<F::WPT>(src + i * (F::GV / 8), &u.w[mt][r][i * F::WPT], pol);
      if constexpr (F::FP4) {
        rw_ldg<F::SW>(reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(wd.scales) + so),
                      u.s[mt][r], pol);
      } else {
        rw_ldg<F::SW>(reinterpret_cast<const uint32_t*>(static_cast<const __nv_bfloat16*>(wd.scales) + so),
                      u.s[mt][r], pol);
        rw_ldg<F::SW>(reinterpret_cast<const uint32_t*>(static_cast<const __nv_bfloat16*>(wd.biases) + so),
                      u.b[mt][r], pol);
      }
    }
}

// acc[p] += unit u[p]'s products with the staged columns, groups g0 .. g0 + GB - 1: per
// group, the MMAs over its codes (from the staged rows at xq; bx: this lane's column
// exists), then the group's scale (and bias times the column's group sum, XS).
template <class F, int NU, int MT>
__device__ __forceinline__ void rw_mma(float (&acc)[NU][MT][4], const RwUnit<F, MT> (&u)[NU],
                                       uint32_t g0, uint32_t xq, const float* XS, uint32_t t4,
                                       bool bx) {
  constexpr int GV = F::GV, WPT = F::WPT;
#pragma unroll
  for (int i = 0; i < F::GB; ++i) {
    const uint32_t gi = g0 + i;
    const float2 xs = F::FP4 ? float2{0.f, 0.f} : lds64(smem_u32(XS + gi * RW_NT + 2u * t4));
    uint4 xb[WPT];
#pragma unroll
    for (int wi = 0; wi < WPT; ++wi) xb[wi] = lds128_if(bx, xq + (gi * GV + wi * 8u) * 2u);
#pragma unroll
    for (int p = 0; p < NU; ++p)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float t[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int wi = 0; wi < WPT; ++wi) {
          const uint32_t wg = u[p].w[mt][0][i * WPT + wi], wh = u[p].w[mt][1][i * WPT + wi];
          uint32_t a0[4], a1[4];
          if constexpr (F::FP4) {
            uint32_t dg[4], dh[4];
            fp4_word_bf16(wg, dg);
            fp4_word_bf16(wh, dh);
            a0[0] = dg[0], a0[1] = dh[0], a0[2] = dg[1], a0[3] = dh[1];
            a1[0] = dg[2], a1[1] = dh[2], a1[2] = dg[3], a1[3] = dh[3];
          } else {
            a0[0] = nib2_bf16_128(wg, 0), a0[1] = nib2_bf16_128(wh, 0);
            a0[2] = nib2_bf16_128(wg, 1), a0[3] = nib2_bf16_128(wh, 1);
            a1[0] = nib2_bf16_128(wg, 2), a1[1] = nib2_bf16_128(wh, 2);
            a1[2] = nib2_bf16_128(wg, 3), a1[3] = nib2_bf16_128(wh, 3);
          }
          const uint32_t b0[2] = {xb[wi].x, xb[wi].y}, b1[2] = {xb[wi].z, xb[wi].w};
          mma_bf16(t, a0, b0);
          mma_bf16(t, a1, b1);
        }
        if constexpr (F::FP4) {  // (s / 2: the codes decoded as 2 v; exact, subnormal or not)
          const float s0 = 0.5f * moe_e8m0_scale(rw_u8_at(u[p].s[mt][0], i));
          const float s1 = 0.5f * moe_e8m0_scale(rw_u8_at(u[p].s[mt][1], i));
          acc[p][mt][0] += s0 * t[0];
          acc[p][mt][1] += s0 * t[1];
          acc[p][mt][2] += s1 * t[2];
          acc[p][mt][3] += s1 * t[3];
        } else {
          const float s0 = rw_bf16_at(u[p].s[mt][0], i), s1 = rw_bf16_at(u[p].s[mt][1], i);
          const float c0v = fmaf(-F::COFF, s0, rw_bf16_at(u[p].b[mt][0], i));
          const float c1v = fmaf(-F::COFF, s1, rw_bf16_at(u[p].b[mt][1], i));
          acc[p][mt][0] += s0 * t[0] + c0v * xs.x;
          acc[p][mt][1] += s0 * t[1] + c0v * xs.y;
          acc[p][mt][2] += s1 * t[2] + c1v * xs.x;
          acc[p][mt][3] += s1 * t[3] + c1v * xs.y;
        }
      }
  }
}

// Stages 16 bytes (8 activations, chunk ch) of staged row t from src (its row): permuted for
// the MMA's B operand (per 8 values: 0, 4, 1, 5, 2, 6, 3, 7) into Xs (rows tstride bytes
// apart), and each scale group's sum into XS [group][RW_NT] (the group's GV / 8 lanes: whole
// warps call this). BITS 8: 4 activations as (x, 16 x) pairs. Zeros when !live.
template <class F>
__device__ __forceinline__ void rw_stage(const __nv_bfloat16* src, uint32_t t, uint32_t ch, bool live,
                                         unsigned char* Xs, uint32_t tstride, float* XS) {
  constexpr int BITS = F::BITS, GV = F::GV;
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  float s = 0.f;
  if constexpr (BITS == 8) {  // 4 activations as (x, 16 x) pairs; the sum over x
    const uint2 uv = *reinterpret_cast<const uint2*>(src + ch * 4u);
    const uint32_t uu[2] = {uv.x, uv.y};
    uint32_t vv[4];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const float lo = __uint_as_float(uu[q] << 16), hi = __uint_as_float(uu[q] & 0xFFFF0000u);
      s += lo + hi;
      // (x 16: exact, the exponent moved; bf16 from the exact fp32 product)
      vv[2 * q] = (uu[q] & 0xFFFFu) | (__float_as_uint(lo * 16.f) & 0xFFFF0000u);
      vv[2 * q + 1] = (uu[q] >> 16) | (__float_as_uint(hi * 16.f) & 0xFFFF0000u);
    }
    v = make_uint4(vv[0], vv[1], vv[2], vv[3]);
  } else {
    if (live) v = *reinterpret_cast<const uint4*>(src + ch * 8u);
  }
  uint4 o;
  o.x = __byte_perm(v.x, v.z, 0x5410);
  o.y = __byte_perm(v.x, v.z, 0x7632);
  o.z = __byte_perm(v.y, v.w, 0x5410);
  o.w = __byte_perm(v.y, v.w, 0x7632);
  *reinterpret_cast<uint4*>(Xs + t * tstride + ch * 16u) = o;
  if constexpr (!F::FP4) {  // (FP4: no offset, no group sums)
    if constexpr (BITS == 4) {
      const uint32_t vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) s += __uint_as_float(vv[q] << 16) + __uint_as_float(vv[q] & 0xFFFF0000u);
    }
#pragma unroll
    for (int o2 = 1; o2 < GV / 8; o2 <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o2);
    if (ch % (GV / 8) == 0) XS[(ch / (GV / 8)) * RW_NT + t] = s;
  }
}

// Warp `warp`'s split-K partials (its MMA accumulators) into Red, in the layout
// rw_reduce_store reads: [warp][NP MT][4][32] floats.
template <int NP, int MT>
__device__ __forceinline__ void rw_store_partials(float* Red, const float (&acc)[NP][MT][4], uint32_t warp,
                                                  uint32_t lane) {
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int c = 0; c < 4; ++c) Red[((warp * (NP * MT) + p * MT + mt) * 4u + c) * 32u + lane] = acc[p][mt][c];
}

// The split-K partials in Red ([warps][W][NP MT][4][32] floats, W row tiles of 16 MT rows
// from row nb; W == 1 unless TILED) summed over nwarps warps in warp order, one thread (of
// nthreads, from tid) per (row, token < nt) of each tile: gate/up writes H[c0 + token, row] =
// silu(gate) * up as bf16, down Yp[pair, row] = rw[pair] * y in fp32 (pair = pairs[c0 + token];
// spr / sw given: the chunk's pairs and their weights, spr[token] and sw[token], loaded earlier).
template <bool GATEUP, int NP, int MT, bool TILED>
__device__ __forceinline__ void rw_reduce_store(const float* Red, uint32_t tid, uint32_t nthreads,
                                                uint32_t W, uint32_t nwarps, uint32_t nt, uint32_t nb,
                                                uint32_t N, uint32_t c0, const uint32_t* __restrict__ pairs,
                                                const float* __restrict__ rw,
                                                __nv_bfloat16* __restrict__ Hout, float* __restrict__ Yp,
                                                const uint32_t* spr = nullptr, const float* sw = nullptr) {
  for (uint32_t o = tid; o < uint32_t(MT * 128) * W; o += nthreads) {
    const uint32_t rt2 = TILED ? o / uint32_t(MT * 128) : 0u, oo = TILED ? o % uint32_t(MT * 128) : o;
    const uint32_t mt = oo >> 7, c = (oo >> 5) & 3u, ln = oo & 31u;
    const uint32_t tok = 2u * (ln & 3u) + (c & 1u);
    if (tok >= nt) continue;
    const uint32_t row = nb + rt2 * 16u + mt * 16u + (ln >> 2) + (c >= 2u ? 8u : 0u);
    float v[NP];
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      float s = 0.f;
      for (uint32_t w = 0; w < nwarps; ++w)
        s += Red[(((w * W + rt2) * (NP * MT) + p * MT + mt) * 4u + c) * 32u + ln];
      v[p] = s;
    }
    if (GATEUP) {
      Hout[int64_t(c0 + tok) * N + row] = __float2bfloat16_rn(silu(v[0]) * v[NP - 1]);
    } else {
      const uint32_t pr = spr ? spr[tok] : pairs[c0 + tok];
      Yp[int64_t(pr) * N + row] = (spr ? sw[tok] : rw[pr]) * v[0];
    }
  }
}

// BITS 8: each code's two nibbles are read as two 4-bit codes of a row twice as long (code
// i = 16 h + l: nibble 2 i = l, 2 i + 1 = h), the activations staged as (x_i, 16 x_i) pairs
// (exact in bf16): sum (128 + l) x + (128 + h) 16 x = sum q x + 2176 sum x, so the 4-bit
// machinery runs unchanged on the virtual row (GV = 2 GS nibbles per scale group, K / 4
// threads per block) and the scaling subtracts 2176 s instead of 128 s per group sum.
// FP4 (mxfp4: E2M1 codes, GS 32, an E8M0 byte per group, no bias): the word's nibble pairs
// decode to exact bf16 values of 2 v (fp4_word_bf16, as in the shared-memory kernels), so
// acc += (s / 2) * T, with no offset and no group sums.
// STREAM (bucketed, MT 1): the weights stream through registers instead of being loaded
// once. Block = (non-empty expert slot j, W tiles of 16 rows: W = N / (16 gridDim.y)) with
// KS = warps / W warps per tile, warp w = (slice w / W, tile w % W); a warp covers K / 256 /
// KS chunks of 256 k, two units in registers: while it computes one, the next is in flight
// (gate/up: gate's and up's chunk c, then c + 1; down: chunks c and c + 1). Per block the
// activations are staged, and the partials reduced, once for W tiles of rows instead of
// one, over KS partials instead of K / 256.
// Registers: the plain 4-bit blocks, gate/up and down, at most 80 per thread (3 blocks of 256
// threads per SM), so that down's small blocks (F / 8 threads: 96 at Qwen3 widths) fit 8 to an
// SM instead of 5 at 120 and keep more weight loads in flight (H200, Qwen3 affine 4-bit
// 16 tokens 105.6 -> 101.0 us per layer, mxfp4 128.2 -> 119.6; docs/PERFORMANCE.md,
// twenty-ninth session); the plain down block of 16 rows (MT 1, mxfp4's) at most 64 (10 to an
// SM at Qwen3 widths); the streaming blocks at most 128 (2 per SM: at 80 they spill, and the
// layer lost 2-25%).
template <bool GATEUP, int GS, int MT, bool DIRECT = false, int BITS = 4, bool FP4 = false,
          bool STREAM = false>
__global__ void __launch_bounds__(DIRECT && !GATEUP ? RW_DIRECT_THREADS : BITS == 8 && !STREAM ? 512 : 256,
                                  DIRECT && !GATEUP                  ? 1
                                  : BITS == 8 && !STREAM             ? 1
                                  : STREAM                           ? 2
                                  : !GATEUP && !DIRECT && MT == 1    ? 4
                                                                     : 3)
    mlp_regw_kernel(MlpDesc md, const __nv_bfloat16* __restrict__ xin,
                    const uint32_t* __restrict__ pairs, const uint32_t* __restrict__ offsets,
                    const uint32_t* __restrict__ active, const uint32_t* __restrict__ meta,
                    const float* __restrict__ rw, __nv_bfloat16* __restrict__ Hout,
                    float* __restrict__ Yp, RegwDirect dx) {
  using F = RwFmt<GS, BITS, FP4>;
  constexpr int NP = GATEUP ? 2 : 1;
  constexpr bool DDN = DIRECT && !GATEUP;  // the direct down block (slots x K / 256 warps)
  constexpr int GV = F::GV, GB = F::GB;
  static_assert((GS == 32 || GS == 64 || GS == 128) && (BITS == 4 || (BITS == 8 && GS <= 64)) &&
                    (BITS == 4 || !DIRECT) && (!FP4 || (BITS == 4 && GS == 32)) &&
                    (!STREAM || (!DIRECT && MT == 1)),
                "group size / bits");
  // In a decode chain (launch_pdl): gate/up reads the bucketing's outputs, so it waits first
  // and then lets down start; down reads those (complete by then) and issues its weight loads
  // before it waits for gate/up's H. The direct gate/up kernel stages its token's activations
  // first: x is no kernel's output in the chain (complete before its first kernel started).
  if (GATEUP && !DIRECT) pdl_wait();
  if (!GATEUP || !DIRECT) pdl_trigger();
  const WDesc& w0 = GATEUP ? md.gate : md.down;
  const uint32_t K = w0.K * (BITS / 4), N = w0.N, G = w0.groups, RWd = w0.row_words;  // (K: nibbles)
  extern __shared__ __align__(16) unsigned char rw_smem[];
  const uint32_t tstride = (K + 8u) * 2u;  // bytes per staged row (16-byte shift per row: the
                                           // 8 rows' B loads hit distinct banks)
  unsigned char* Xs = rw_smem;
  float* XS = reinterpret_cast<float*>(rw_smem + RW_NT * tstride);  // [G][RW_NT]
  float* Red = XS + G * RW_NT;                                       // [warps][NP MT][4][32]
  // (down) the epilogue's routing weights and pairs, loaded before they are needed: the chunk's
  // (direct: the token's slots' weights, and which slots have an expert)
  __shared__ float rw_sw[RW_NT];
  __shared__ uint32_t rw_spr[RW_NT];
  __shared__ uint32_t rw_sok;
  const uint32_t j = blockIdx.x;
  const uint32_t tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u, gid = lane >> 2, t4 = lane & 3u;
  const uint32_t kw = K / 256u;                   // chunks of 256 k per row
  const uint32_t slot = DDN ? warp / kw : 0u;     // (direct down) this warp's slot
  // STREAM: row tiles per block, this warp's tile, its slice's chunks
  const uint32_t W = STREAM ? N / (16u * gridDim.y) : 1u;
  const uint32_t rt = STREAM ? warp % W : 0u;
  // partial sums per output (the warps of a slot, or of a row tile)
  const uint32_t nwarps = DDN ? kw : STREAM ? (blockDim.x >> 5) / W : blockDim.x >> 5;
  const uint32_t cpw = STREAM ? kw / nwarps : 1u;
  uint32_t e, first, last;
  bool live = true;  // (direct down) this warp's slot has an expert
  if constexpr (DDN) {
    // (ids before pdl_wait, like the bucketed down kernel's pairs: the router that may write
    // them is two kernels back, and gate/up waits for it before it lets this kernel start)
    const int64_t id = load_id(dx.ids, dx.id_kind, int64_t(j) * md.k + slot);
    live = valid_id(id, md.E);
    e = live ? uint32_t(id) : 0u;
    first = j;  // (one chunk: the token's k slots as its columns)
    last = j + 1;
  } else if constexpr (DIRECT) {
    // (the staging of the one column, token j / k, chunk tid; then the router's ids)
    rw_stage<F>(xin + int64_t(j / md.k) * w0.K, 0u, tid, true, Xs, tstride, XS);
    pdl_wait();
    pdl_trigger();
    const int64_t id = load_id(dx.ids, dx.id_kind, j);
    if (!valid_id(id, md.E)) return;
    e = uint32_t(id);
    first = j;
    last = j + 1;
  } else {
    // (grid sized for min(E, P) <= E experts: active[j] exists, and is loaded with the count,
    // not after it)
    const uint32_t nact = meta[0], ea = active[j];
    if (j >= nact) return;
    e = ea;
    first = offsets[e];
    last = offsets[e + 1];
  }
  const uint32_t nb = blockIdx.y * 16u * MT * W;  // the block's first row
  const uint32_t n0 = nb + rt * 16u;              // this warp's
  // this warp's first chunk
  const uint32_t c0w = STREAM ? (warp / W) * cpw : DDN ? warp % kw : warp;
  // Codes, scales and biases into registers. Rows n0 .. n0 + 16 MT - 1 exist (N % (16 MT W)
  // == 0, checked on the host).
  const uint64_t pol = weight_l2_policy(md.l2_ef & 1u);
  const int64_t row0 = int64_t(e) * N + n0;
  // u[p]: projection p's chunk c0w; STREAM: u[0] and u[1] are the two units in flight (gate
  // and up, or down's chunks c0w and c0w + 1)
  RwUnit<F, MT> u[STREAM ? 2 : NP];
  // (STREAM) chunk c, clamped to the warp's last: the address of a load the source skips
  // stays in bounds if the compiler issues it anyway (rw_ldg)
  auto cl = [&](uint32_t c) { return min(c, c0w + cpw - 1u); };
  auto load_first = [&]() {
    if constexpr (STREAM) {
      rw_load(u[0], w0, row0, G, RWd, c0w * GB, gid, t4, pol);
      if (GATEUP)
        rw_load(u[1], md.up, row0, G, RWd, c0w * GB, gid, t4, pol);
      else if (cpw > 1u)
        rw_load(u[1], w0, row0, G, RWd, cl(c0w + 1u) * GB, gid, t4, pol);
    } else {
#pragma unroll
      for (int p = 0; p < NP; ++p)
        rw_load(u[p], (GATEUP && p == 1) ? md.up : w0, row0, G, RWd, c0w * GB, gid, t4, pol, live);
    }
  };
  load_first();
  // (down) the epilogue's weights (route's, as the ids above) and pairs (the bucketing's), so
  // that its loop does not wait for two loads per slot or output in turn
  auto load_epilogue = [&](uint32_t c0, uint32_t nt) {
    if (warp != 0u) return;
    if constexpr (DDN) {
      const bool in = lane < md.k;
      const int64_t pr = int64_t(j) * md.k + (in ? lane : 0u);
      const bool ok = in && valid_id(load_id(dx.ids, dx.id_kind, pr), md.E);
      const float wv = rw[pr];
      const uint32_t m = __ballot_sync(0xffffffffu, ok);
      if (in) rw_sw[lane] = wv;
      if (lane == 0u) rw_sok = m;
    } else if (!GATEUP && lane < nt) {
      const uint32_t pr = pairs[c0 + lane];
      rw_spr[lane] = pr;
      rw_sw[lane] = rw[pr];
    }
  };
  load_epilogue(first, DDN ? md.k : min(uint32_t(RW_NT), last - first));
  if (!GATEUP) pdl_wait();  // gate/up's H
  const uint32_t xq = smem_u32(Xs + gid * tstride + t4 * (GV / 4) * 2);
  for (uint32_t c0 = first; c0 < last; c0 += RW_NT) {
    // (direct down: the token's k slots are the columns)
    const uint32_t nt = DDN ? md.k : min(uint32_t(RW_NT), last - c0);
    if (c0 != first) {
      __syncthreads();  // the previous chunk's Xs, XS, Red and epilogue values are read
      if (STREAM) load_first();  // (its units were consumed)
      load_epilogue(c0, nt);
    }
    // Stage the chunk's rows: 8 values per thread and chunk ch of 16 bytes (K / 8 ==
    // blockDim.x, one chunk each; STREAM: every blockDim.x-th; direct down: chunk ch of its own
    // slot's row, K / 8 == 32 kw, zeros for a dropped slot), permuted, and each group's sum
    // (its GV / 8 lanes).
    auto stage = [&](uint32_t t, uint32_t ch) {
      const uint32_t Kx = w0.K;  // (activations per row)
      const __nv_bfloat16* src =
          DDN      ? xin + (int64_t(j) * md.k + t) * Kx
          : GATEUP ? xin + int64_t((DIRECT ? c0 + t : pairs[c0 + t]) / md.k) * Kx
                   : xin + int64_t(c0 + t) * Kx;
      rw_stage<F>(src, t, ch, live, Xs, tstride, XS);
    };
    // (direct gate/up: staged before pdl_wait, above)
    for (uint32_t t = DDN ? slot : 0u; !(DIRECT && GATEUP) && t < nt; t += DDN ? nt : 1u) {
      if constexpr (STREAM) {
        // (K / 8 and blockDim.x multiples of 32: whole warps take each step)
        for (uint32_t ch = tid; ch < K / 8u; ch += blockDim.x) stage(t, ch);
      } else {
        stage(t, DDN ? tid - slot * (K / 8u) : tid);
      }
    }
    __syncthreads();
    float acc[NP][MT][4] = {};
    const bool bx = gid < nt;
    if constexpr (!STREAM) {
      rw_mma<F, NP, MT>(acc, u, c0w * GB, xq, XS, t4, bx);
    } else if constexpr (GATEUP) {
      // gate's chunk c (u[0]) while up's is in flight, then up's (u[1]) while gate's c + 1 is
      for (uint32_t q = 0; q < cpw; ++q) {
        const uint32_t c = c0w + q;
        rw_mma<F, 1, MT>(reinterpret_cast<float(&)[1][MT][4]>(acc[0]),
                         reinterpret_cast<const RwUnit<F, MT>(&)[1]>(u[0]), c * GB, xq, XS, t4, bx);
        if (q + 1u < cpw) rw_load(u[0], w0, row0, G, RWd, cl(c + 1u) * GB, gid, t4, pol);
        rw_mma<F, 1, MT>(reinterpret_cast<float(&)[1][MT][4]>(acc[NP - 1]),
                         reinterpret_cast<const RwUnit<F, MT>(&)[1]>(u[1]), c * GB, xq, XS, t4, bx);
        if (q + 1u < cpw) rw_load(u[1], md.up, row0, G, RWd, cl(c + 1u) * GB, gid, t4, pol);
      }
    } else {
      // chunks c (u[0]) and c + 1 (u[1]), each reloaded with c + 2 / c + 3 once used
      for (uint32_t q = 0; q < cpw; q += 2u) {
        const uint32_t c = c0w + q;
        rw_mma<F, 1, MT>(acc, reinterpret_cast<const RwUnit<F, MT>(&)[1]>(u[0]), c * GB, xq, XS, t4, bx);
        if (q + 2u < cpw) rw_load(u[0], w0, row0, G, RWd, cl(c + 2u) * GB, gid, t4, pol);
        if (q + 1u < cpw) {
          rw_mma<F, 1, MT>(acc, reinterpret_cast<const RwUnit<F, MT>(&)[1]>(u[1]), (c + 1u) * GB, xq, XS,
                           t4, bx);
          if (q + 3u < cpw) rw_load(u[1], w0, row0, G, RWd, cl(c + 3u) * GB, gid, t4, pol);
        }
      }
    }
    // The warps' partial sums, then one thread per (row, token) of each row tile.
    rw_store_partials<NP, MT>(Red, acc, warp, lane);
    __syncthreads();
    if constexpr (DDN) {
      // One thread per row: the token's slots in order (as combine_kernel), each the sum of
      // its kw warps' partials in column s, times its routing weight.
      for (uint32_t o = tid; o < uint32_t(MT * 16); o += blockDim.x) {
        const uint32_t mt = o >> 4, r = o & 15u;
        float y = 0.f;
        bool any = false;
        for (uint32_t s2 = 0; s2 < nt; ++s2) {
          if (!((rw_sok >> s2) & 1u)) continue;
          const uint32_t c = (r >= 8u ? 2u : 0u) + (s2 & 1u), ln = (r & 7u) * 4u + (s2 >> 1);
          float v = 0.f;
          for (uint32_t w = 0; w < kw; ++w) v += Red[(((s2 * kw + w) * (NP * MT) + mt) * 4u + c) * 32u + ln];
          const float yv = rw_sw[s2] * v;
          y = any ? y + yv : yv;
          any = true;
        }
        dx.y[int64_t(j) * N + n0 + mt * 16u + r] = __float2bfloat16_rn(y);
      }
    } else {
      rw_reduce_store<GATEUP, NP, MT, STREAM>(Red, tid, blockDim.x, W, nwarps, nt, nb, N, c0, pairs, rw, Hout,
                                              Yp, GATEUP ? nullptr : rw_spr, rw_sw);
    }
  }
}

}  // namespace mlx_moe::cuda
