// Grouped (many tokens per expert) expert MLP for bf16 / fp16 activations and affine 4-bit,
// affine 8-bit, mxfp4 or trellis weights: the large-batch path of moe_mlp on CUDA (trellis:
// from a few tokens up; the gg_tr_* helpers below). Included from
// moe_cuda.cuh (uses its helpers: WDesc, MlpDesc, load_scale, FP4_2MAG0 / 1, cp_async16,
// cp_async4, ldsm_x4, smem_u32, silu). Host dispatch: mlx_moe/csrc/cuda/cuda_ops.cu.
//
// Block = one tile of GG_TM = 128 bucketed pairs of one expert (bucketing tile = GG_TM) x
// two "panels" of GG_TN = 128 weight rows: gate/up: the gate rows and the up rows of the
// same 128 output columns (SwiGLU in registers); down: 256 consecutive rows of the down
// projection. 8 warps, 2 (M) x 4 (N); a warp owns 64 pairs x 32 rows of each panel
// (128 fp32 accumulators per thread). K runs in steps of GG_BK = 64 through a
// GG_STAGES-deep cp.async pipeline (one __syncthreads per step): the gathered activation
// rows (gate/up: row pairs[i] / k of x; down: bucketed row i of H) and the packed weight
// rows are copied raw; the block's scales / biases for all of K are copied raw once, with
// the first stage.
//
// Precision: the weights are dequantized in registers to the activation type, value =
// s * q + b rounded once (one HFMA2 of exact codes; mxfp4: 2v times s/2, exact), i.e. what
// MLX's own quantized matmul does; products accumulate in fp32 (mma.sync m16n8k16). The
// hidden layer H and the per-pair down outputs Yp are stored in the activation type (as
// mlx-lm's SwitchGLU does), the combine sums the k slots in fp32 in slot order.
//
// K order: inside each unit of 32 k, thread t4 of a quad owns k = 8*t4 .. 8*t4+7 (one
// packed 4-bit word, two 8-bit words, one 16-byte chunk of activations); MMA step h (two
// per unit) takes k 8*t4 + 4h + {0,1} (b0) and + {2,3} (b1). The same permutation is used
// for the activations (one 16-byte shared load gives the A registers of both steps) and the
// weights (byte j of a 4-bit word = nibbles 2j, 2j+1 -> one bf16x2 / f16x2), so no
// register shuffles are needed.
#pragma once

#include <type_traits>

namespace mlx_moe::cuda {

constexpr int GG_TM = 128, GG_TN = 128, GG_BK = 64, GG_STAGES = 4, GG_THREADS = 256;
constexpr int GG_A4 = 0, GG_A8 = 1, GG_FP4 = 2;  // weight formats of the grouped kernel
constexpr int GG_TR = 3;  // trellis k-bit (helpers below: gg_tr_*)

// Bytes of one packed weight row per K step.
__host__ __device__ constexpr uint32_t gg_brow(int fmt) { return fmt == GG_A8 ? 64u : 32u; }
__host__ __device__ constexpr uint32_t gg_stage_bytes(int fmt) {
  return uint32_t(GG_TM) * GG_BK * 2u + 2u * GG_TN * gg_brow(fmt);
}
// Shared memory of the block's raw scales (and biases) of one panel (16-byte multiple).
__host__ __device__ inline uint32_t gg_panel_sc_bytes(const WDesc& d) {
  return (uint32_t(GG_TN) * d.groups * scale_elem_bytes(d.scale_kind) + 15u) & ~15u;
}
// Bytes of one raw stage of either grouped kernel for the projections' descriptors (trellis,
// GG_TR: by their bit widths; the panels' tiles of one K step, see gg_tr_* below).
__host__ __device__ inline uint32_t gg_stage_bytes(int fmt, const WDesc& p0, const WDesc& p1) {
  return fmt == GG_TR ? uint32_t(GG_TM) * GG_BK * 2u + 1024u * (p0.bits + p1.bits) : gg_stage_bytes(fmt);
}
// Trellis: bytes of a panel's scale and su tables (the codebooks: 2048 more, 1024-aligned).
__host__ __device__ inline uint32_t gg_tr_table_bytes(const WDesc& d) {
  return 4u * (d.groups * uint32_t(GG_TN) + (d.has_su ? d.K : 0u));
}
__host__ __device__ inline uint32_t gg_smem_bytes(int fmt, const WDesc& p0, const WDesc& p1) {
  if (fmt == GG_TR)  // + 1024 to align the codebooks
    return GG_STAGES * gg_stage_bytes(fmt, p0, p1) + 1024u + 2048u + gg_tr_table_bytes(p0) +
           gg_tr_table_bytes(p1);
  const uint32_t nb0 = p0.mode == 1u ? 1u : 2u, nb1 = p1.mode == 1u ? 1u : 2u;
  return GG_STAGES * gg_stage_bytes(fmt) + nb0 * gg_panel_sc_bytes(p0) + nb1 * gg_panel_sc_bytes(p1);
}

template <typename XT>
__device__ __forceinline__ uint32_t gg_magic() {  // 128.0 (bf16) / 1024.0 (f16), both halves
  return std::is_same_v<XT, __half> ? 0x64006400u : 0x43004300u;
}

// (v - magic) on both halves: the exact codes placed in the magic's mantissa.
template <typename XT>
__device__ __forceinline__ uint32_t gg_unmagic(uint32_t v) {
  uint32_t m = gg_magic<XT>();
  if constexpr (std::is_same_v<XT, __half>) {
    __half2 r = __hsub2(*reinterpret_cast<__half2*>(&v), *reinterpret_cast<__half2*>(&m));
    return *reinterpret_cast<uint32_t*>(&r);
  } else {
    __nv_bfloat162 r =
        __hsub2(*reinterpret_cast<__nv_bfloat162*>(&v), *reinterpret_cast<__nv_bfloat162*>(&m));
    return *reinterpret_cast<uint32_t*>(&r);
  }
}

template <typename XT>
__device__ __forceinline__ uint32_t gg_fma2(uint32_t q, uint32_t s, uint32_t b) {
  if constexpr (std::is_same_v<XT, __half>) {
    __half2 r = __hfma2(*reinterpret_cast<__half2*>(&q), *reinterpret_cast<__half2*>(&s),
                        *reinterpret_cast<__half2*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  } else {
    __nv_bfloat162 r = __hfma2(*reinterpret_cast<__nv_bfloat162*>(&q),
                               *reinterpret_cast<__nv_bfloat162*>(&s),
                               *reinterpret_cast<__nv_bfloat162*>(&b));
    return *reinterpret_cast<uint32_t*>(&r);
  }
}

template <typename XT>
__device__ __forceinline__ uint32_t gg_pack(float lo, float hi) {
  if constexpr (std::is_same_v<XT, __half>) {
    __half2 r = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  } else {
    __nv_bfloat162 r = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&r);
  }
}

template <typename XT>
__device__ __forceinline__ void gg_mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<XT, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ uint32_t gg_lop_and_or(uint32_t a, uint32_t m, uint32_t c) {
  uint32_t v;  // (a & m) | c
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(v) : "r"(a), "r"(m), "r"(c));
  return v;
}

// Affine 4-bit: byte j of w (= codes 2j, 2j+1; w4 = w >> 4) as exact XT codes.
template <typename XT>
__device__ __forceinline__ uint32_t gg_a4_pair(uint32_t w, uint32_t w4, int j) {
  const uint32_t t = __byte_perm(w, w4, uint32_t(j) | (uint32_t(4 + j) << 8));
  return gg_unmagic<XT>(gg_lop_and_or(t, 0x000F000Fu, gg_magic<XT>()));
}

// XT bits (f16, else bf16) of the integer 0 <= n < 128 (exact).
constexpr uint32_t gg_small_int_bits(uint32_t n, bool f16) {
  if (n == 0u) return 0u;
  uint32_t e = 0u;
  while ((n >> (e + 1u)) != 0u) ++e;
  const uint32_t mant = n - (1u << e);
  return f16 ? ((15u + e) << 10) | (mant << (10u - e)) : ((127u + e) << 7) | (mant << (7u - e));
}
// 2|v| of the E2M1 magnitude bits i (0 .. 7).
constexpr uint32_t gg_fp4_2mag(uint32_t i) {
  return ((i < 4u ? FP4_2MAG0 : FP4_2MAG1) >> (8u * (i & 3u))) & 0xFFu;
}
// byte_perm table word t (magnitudes 4t .. 4t+3) of byte b (0: low, 1: high) of the XT bits
// of 2|v| (FP4_2MAG0 / 1, moe_cuda.cuh).
constexpr uint32_t gg_fp4_table(uint32_t t, uint32_t b, bool f16) {
  uint32_t r = 0u;
  for (uint32_t i = 0; i < 4u; ++i) {
    r |= ((gg_small_int_bits(gg_fp4_2mag(4u * t + i), f16) >> (8u * b)) & 0xFFu) << (8u * i);
  }
  return r;
}
static_assert(gg_fp4_table(0, 1, false) == 0x40403F00u && gg_fp4_table(1, 0, false) == 0x4000C080u &&
                  gg_fp4_table(1, 1, true) == 0x4A484644u && gg_fp4_table(1, 0, true) == 0u,
              "fp4 tables: 2|v| = {0, 1, 2, 3, 4, 6, 8, 12}");

// mxfp4: the byte tables of a nibble's magnitude bits (0 .. 7): high bytes of the XT bits of
// the 8 magnitudes in h0 (0 .. 3) and h1 (4 .. 7), low bytes in l0, l1.
struct GgFp4Tab {
  uint32_t h0, h1, l0, l1;
};

// mxfp4: nibbles 4h .. 4h+3 of w as two words of XT values, q0 = nibbles 4h, 4h + 1, q1 =
// nibbles 4h + 2, 4h + 3, the magnitudes looked up in t: 2 table permutes per 4 values (1 when
// LO is false: low bytes all 0), one permute + LOP3 for the signs (bit 3 of each nibble) and
// a permute per word interleaving the bytes.
template <bool LO>
__device__ __forceinline__ void gg_fp4_quad(uint32_t w, uint32_t h, const GgFp4Tab& t, uint32_t& q0,
                                            uint32_t& q1) {
  const uint32_t sel = (w >> (16u * h)) & 0x7777u;
  const uint32_t hi = __byte_perm(t.h0, t.h1, sel);
  const uint32_t lo = LO ? __byte_perm(t.l0, t.l1, sel) : 0u;
  // byte i: the sign of nibble 4h + i in bit 7 (bytes 2h, 2h+1 of w << 4 and of w)
  const uint32_t sg = __byte_perm(w << 4, w, h ? 0x7362u : 0x5140u);
  uint32_t hs;
  asm("lop3.b32 %0, %1, %2, %3, 0xF8;\n" : "=r"(hs) : "r"(hi), "r"(sg), "r"(0x80808080u));
  q0 = __byte_perm(lo, hs, 0x5140u);
  q1 = __byte_perm(lo, hs, 0x7362u);
}

// The same with the constant tables of 2|v| (gg_fp4_table; the scale, halved to match, is
// applied after).
template <typename XT>
__device__ __forceinline__ void gg_fp4_quad(uint32_t w, uint32_t h, uint32_t& q0, uint32_t& q1) {
  constexpr bool F16 = std::is_same_v<XT, __half>;
  constexpr GgFp4Tab t{gg_fp4_table(0, 1, F16), gg_fp4_table(1, 1, F16), gg_fp4_table(0, 0, F16),
                       gg_fp4_table(1, 0, F16)};
  gg_fp4_quad<!F16>(w, h, t, q0, q1);
}

// Entries 2j, 2j + 1 of 2|v| as XT bits (f16, else bf16) in the low / high 16 bits.
constexpr uint32_t gg_fp4_pair_bits(uint32_t j, bool f16) {
  return gg_small_int_bits(gg_fp4_2mag(2u * j), f16) |
         (gg_small_int_bits(gg_fp4_2mag(2u * j + 1u), f16) << 16);
}
static_assert(gg_fp4_pair_bits(0, false) == 0x3F800000u && gg_fp4_pair_bits(3, false) == 0x41404100u &&
                  gg_fp4_pair_bits(1, true) == 0x42004000u,
              "2|v| pairs: {0, 1}, {2, 3}, {4, 6}, {8, 12}");

// The tables with the group scale 2^(E - 127) folded in (the XT bits of |v| 2^(E - 127) =
// 2|v| 2^(E - 128)), so that a lookup gives the final value: no multiply per pair. Where E
// keeps every nonzero magnitude normal and finite in XT (gg_fp4_exact_int: bf16 2 <= E <= 252,
// f16 114 <= E <= 140) that is E - 128 added to the exponent field of each nonzero entry of
// 2|v|, two entries per word (one IMAD per word: the lanes stay within 16 bits); F32 (any E,
// for the others): as gg_scale, the products with moe_e8m0_scale(E) / 2 in fp32, rounded once
// to XT (subnormals, inf, and NaN for 0 times an infinite scale). Either gives the values of
// gg_scale + gg_fma2 on gg_fp4_quad's 2v (an exact product) but for zero's sign: code 8 gives
// -0, not +0.
template <typename XT>
__device__ __forceinline__ bool gg_fp4_exact_int(uint32_t E) {
  constexpr bool F16 = std::is_same_v<XT, __half>;
  return E - (F16 ? 114u : 2u) <= (F16 ? 140u - 114u : 252u - 2u);
}
template <typename XT, bool F32>
__device__ __forceinline__ GgFp4Tab gg_fp4_scaled(uint32_t E) {
  constexpr bool F16 = std::is_same_v<XT, __half>;
  constexpr uint32_t M = (F16 ? 0x400u : 0x80u) * 0x10001u;  // 1 in each lane's exponent field
  constexpr uint32_t M0 = M & 0xFFFF0000u;                    // entry 0 stays 0
  uint32_t W[4];
  if constexpr (F32) {
    const float s = moe_e8m0_scale(E) * 0.5f;
#pragma unroll
    for (uint32_t j = 0; j < 4; ++j)
      W[j] = gg_pack<XT>(float(gg_fp4_2mag(2u * j)) * s, float(gg_fp4_2mag(2u * j + 1u)) * s);
  } else {
    W[0] = E * M0 + (gg_fp4_pair_bits(0u, F16) - 128u * M0);
#pragma unroll
    for (uint32_t j = 1; j < 4; ++j) W[j] = E * M + (gg_fp4_pair_bits(j, F16) - 128u * M);
  }
  return {__byte_perm(W[0], W[1], 0x7531u), __byte_perm(W[2], W[3], 0x7531u),
          __byte_perm(W[0], W[1], 0x6420u), __byte_perm(W[2], W[3], 0x6420u)};
}

// Affine 8-bit, f16: bytes 2j, 2j+1 of w as exact f16 codes (1024 + q is exact in f16).
__device__ __forceinline__ uint32_t gg_a8_pair_f16(uint32_t w, int j) {
  const uint32_t t = __byte_perm(w, 0u, uint32_t(2 * j) | (uint32_t(2 * j + 1) << 8));
  return gg_unmagic<__half>(gg_lop_and_or(t, 0x00FF00FFu, 0x64006400u));
}

// Affine 8-bit code (byte j of w) as an exact float.
__device__ __forceinline__ float gg_a8_code(uint32_t w, int j) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, uint32_t(j) | 0x7540u)) - 8388608.f;
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Scale and bias of group g of the raw scale / bias row at byte offset r of ss / sb (32-bit
// shared addresses), branch-free by format: affine scales / biases are in the activation type
// (SK = 0) or fp32 (SK = 1: rounded to the activation type here), broadcast to both halves
// (s2, b2), or kept as fp32 (sf, bf: affine 8-bit with bf16 activations, whose codes above 127
// are not exact as 128-biased bf16, is dequantized in fp32); mxfp4: E8M0 halved (the decoder
// gives 2v), no bias.
template <int FMT, int SK>
constexpr uint32_t gg_sc_bytes() { return FMT == GG_FP4 ? 1u : SK == 1 ? 4u : 2u; }

// mxfp4: the E8M0 byte of group g of the raw scale row at byte offset r of ss.
__device__ __forceinline__ uint32_t gg_e8m0(uint32_t ss, uint32_t r, uint32_t g) {
  uint32_t v;
  asm volatile("ld.shared.u8 %0, [%1];\n" : "=r"(v) : "r"(ss + r + g));
  return v;
}

template <typename XT, int FMT, int SK>
__device__ __forceinline__ void gg_scale(uint32_t ss, uint32_t sb, uint32_t r, uint32_t g,
                                         uint32_t& s2, uint32_t& b2, float& sf, float& bf) {
  constexpr bool f32_math = FMT == GG_A8 && std::is_same_v<XT, __nv_bfloat16>;
  if constexpr (FMT == GG_FP4) {
    const float f = moe_e8m0_scale(gg_e8m0(ss, r, g)) * 0.5f;
    s2 = gg_pack<XT>(f, f);
    b2 = 0u;
  } else if constexpr (SK == 1) {
    float a, b;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(a) : "r"(ss + r + 4u * g));
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(b) : "r"(sb + r + 4u * g));
    if constexpr (f32_math) {
      sf = a;
      bf = b;
    } else {
      s2 = gg_pack<XT>(a, a);
      b2 = gg_pack<XT>(b, b);
    }
  } else {
    uint32_t a, b;
    asm volatile("ld.shared.u16 %0, [%1];\n" : "=r"(a) : "r"(ss + r + 2u * g));
    asm volatile("ld.shared.u16 %0, [%1];\n" : "=r"(b) : "r"(sb + r + 2u * g));
    if constexpr (f32_math) {
      sf = __uint_as_float(a << 16);
      bf = __uint_as_float(b << 16);
    } else {
      s2 = __byte_perm(a, 0u, 0x1010u);
      b2 = __byte_perm(b, 0u, 0x1010u);
    }
  }
}


// ---- trellis (GG_TR) in the grouped kernels (mlp_gg_kernel, mlp_wg_kernel) ----------------
// A stage's raw weights of a panel (128 rows) are, for each of the step's 4 k-tiles, the
// panel's 8 tiles of 16x16 exactly as they lie in w (256 * bits contiguous bytes; the 8
// n-tiles of a k-tile are consecutive, n-tile fastest), copied by 16-byte cp.async: the run
// of 16 codes of panel row rr in k-tile j is the 2 * bits bytes at
// bits * (256 j + 32 (rr >> 4) + 2 (rr & 15)) of the panel. The block's tables, fp32 in
// shared memory: per panel scale * sv [group][128 rows] and su [K] (when present), and a
// 1024-aligned codebook of 1024 bytes per panel (a level's address is one OR of the shifted,
// masked index). Values: (grid[idx] * (scale * sv)) * su in fp32, rounded once to the
// activation type (common/trellis.h's product; the scale * sv product first: the same value
// when sv is +-1, else within one fp32 rounding).

// This thread's 16-byte chunks q = tid + 256 i (i < 2: a panel has 64 * bits <= 512 per step)
// of panel p, as (k-tile j << 30) | byte offset from the panel's first tile of the step, or
// ~0u (no chunk, or a tile past N). Computed once per block.
__device__ __forceinline__ void gg_tr_copy_plan(const WDesc& w0, const WDesc& w1, const uint32_t (&n0)[2],
                                                uint32_t N, uint32_t tid, uint32_t (&trq)[2][2]) {
  const uint32_t TNt = (N + 15u) / 16u;
#pragma unroll
  for (int p = 0; p < 2; ++p)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t bits = (p ? w1 : w0).bits, cpj = 16u * bits, q = tid + GG_THREADS * i;
      const uint32_t j = q / cpj, c = q - j * cpj;
      const bool ok = q < 4u * cpj && (n0[p] >> 4) + c / (2u * bits) < TNt;
      trq[p][i] = ok ? (j << 30) | (j * TNt * 32u * bits + 16u * c) : ~0u;
    }
}

// Copies both panels' packed weights of the step at k0 into sbw (panel 1 at 1024 * w0.bits).
__device__ __forceinline__ void gg_tr_copy_stage(uint32_t sbw, const WDesc& w0, const WDesc& w1,
                                                 uint32_t e, uint32_t k0, const uint32_t (&n0)[2],
                                                 uint32_t N, uint32_t K, uint32_t tid,
                                                 const uint32_t (&trq)[2][2]) {
  const uint32_t TKt = K / 16u, TNt = (N + 15u) / 16u;
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const WDesc& wd = p ? w1 : w0;
    const unsigned char* wb = reinterpret_cast<const unsigned char*>(wd.w);
    const unsigned char* base = wb + ((int64_t(e) * TKt + k0 / 16u) * TNt + (n0[p] >> 4)) * (32u * wd.bits);
    const uint32_t dst0 = sbw + (p ? 1024u * w0.bits : 0u);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const uint32_t t = trq[p][i], q = tid + GG_THREADS * i;
      if (t == ~0u) {
        if (q < 64u * wd.bits) cp_async16(dst0 + 16u * q, wb, 0u);  // a tile past N: zeros
        continue;
      }
      const bool ok = k0 / 16u + (t >> 30) < TKt;
      cp_async16(dst0 + 16u * q, ok ? base + (t & 0x3FFFFFFFu) : wb, ok ? 16u : 0u);
    }
  }
}

// Fills the block's tables (plain loads converted to fp32, 8 in flight per thread): sf, s0:
// the shared window as floats and its 32-bit address; scp / sup / grp: per panel the shared
// addresses of scale * sv [g][128], su [K], the codebook.
__device__ __forceinline__ void gg_tr_load_tables(float* sf, uint32_t s0, const uint32_t (&scp)[2],
                                                  const uint32_t (&sup)[2], const uint32_t (&grp)[2],
                                                  const WDesc& w0, const WDesc& w1, uint32_t e,
                                                  const uint32_t (&n0)[2], uint32_t N, uint32_t K,
                                                  uint32_t tid) {
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const WDesc& wd = p ? w1 : w0;
    const uint32_t G = wd.groups;
    // what = 0: scale * sv [g][r] (row n0 + r), 1: su [k], 2: codebook [level]
    for (int what = 0; what < 3; ++what) {
      if (what == 1 && !wd.has_su) continue;
      const uint32_t total = what == 0 ? G * GG_TN : what == 1 ? K : 1u << wd.bits;
      float* dst = sf + ((what == 0 ? scp[p] : what == 1 ? sup[p] : grp[p]) - s0) / 4u;
      for (uint32_t q0 = tid; q0 < total; q0 += 8u * GG_THREADS) {
        float v[8];
#pragma unroll
        for (uint32_t i = 0; i < 8; ++i) {
          const uint32_t q = q0 + i * GG_THREADS;
          v[i] = 0.f;
          if (q >= total) continue;
          if (what == 0) {
            const uint32_t g = q / GG_TN, n = n0[p] + (q % GG_TN);
            if (n < N) {
              v[i] = load_scale(wd.scales, wd.scale_kind, int64_t(moe_trellis_scale_index(e, g, n, G, N)));
              if (wd.has_sv) v[i] *= load_scale(wd.sv, wd.sv_kind, int64_t(moe_trellis_sv_index(e, n, N)));
            }
          } else if (what == 1) {
            v[i] = load_scale(wd.su, wd.su_kind, int64_t(moe_trellis_su_index(e, q, K)));
          } else {
            v[i] = load_scale(wd.grid, wd.grid_kind, moe_trellis_grid_index(e, q, wd.bits, wd.grid_per_expert));
          }
        }
#pragma unroll
        for (uint32_t i = 0; i < 8; ++i)
          if (q0 + i * GG_THREADS < total) dst[q0 + i * GG_THREADS] = v[i];
      }
    }
  }
}

// NI consecutive codes of BITS bits starting at byte off (from sm) of a stage, any alignment
// up to A (the largest off % 4 the caller can have), as f[i] = level * sc (* su[i] when su is
// not null; su 16-byte aligned). lv: the codebook's shared address (1024-aligned).
template <uint32_t BITS, uint32_t NI, uint32_t A>
__device__ __forceinline__ void gg_tr_levels(const unsigned char* sm, uint32_t off, uint32_t lv,
                                             float sc, const float* su, float (&f)[NI]) {
  constexpr uint32_t M = (1u << BITS) - 1u;
  constexpr uint32_t NW = (A + NI * BITS / 8u + 3u) / 4u;  // words covering the codes
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(sm + (off & ~3u));
  uint32_t w[NW + 1];
#pragma unroll
  for (uint32_t i = 0; i < NW; ++i) w[i] = wp[i];
  w[NW] = 0u;
  if constexpr (A != 0u) {
    const uint32_t sh = (off & 3u) * 8u;
#pragma unroll
    for (uint32_t i = 0; i < NW; ++i) w[i] = __funnelshift_r(w[i], w[i + 1], sh);
  }
#pragma unroll
  for (uint32_t i = 0; i < NI; ++i) {
    // index bits [s, s + BITS) to bits [2, 2 + BITS): the level's byte offset
    const uint32_t bit = i * BITS, wi = bit >> 5, s = bit & 31u;
    const uint32_t t = s < 2u ? w[wi] << (2u - s)
                       : s + BITS <= 32u ? w[wi] >> (s - 2u)
                                         : __funnelshift_r(w[wi], w[wi + 1], s - 2u);
    float l;
    asm("ld.shared.f32 %0, [%1];\n" : "=f"(l) : "r"((t & (M << 2)) | lv));  // (codebook: constant)
    f[i] = l * sc;
  }
  if (su != nullptr) {
#pragma unroll
    for (uint32_t i = 0; i < NI / 4u; ++i) {
      const float4 u = reinterpret_cast<const float4*>(su)[i];
      f[4 * i] *= u.x;
      f[4 * i + 1] *= u.y;
      f[4 * i + 2] *= u.z;
      f[4 * i + 3] *= u.w;
    }
  }
}

// Shared memory of the trellis tables' layout: grp (2 x 1024, 1024-aligned), then per panel
// scp, sup; off: the first free byte (32-bit shared address); returns the next free one.
__device__ __forceinline__ uint32_t gg_tr_layout(uint32_t off, const WDesc& w0, const WDesc& w1,
                                                 uint32_t K, uint32_t (&scp)[2], uint32_t (&sup)[2],
                                                 uint32_t (&grp)[2]) {
  off = (off + 1023u) & ~1023u;
  grp[0] = off;
  grp[1] = off + 1024u;
  off += 2048u;
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const WDesc& wd = p ? w1 : w0;
    scp[p] = off;
    off += 4u * wd.groups * GG_TN;
    sup[p] = off;
    off += wd.has_su ? 4u * K : 0u;
  }
  return off;
}

// The block's tile of bucketed pairs (blockIdx.y: expert e, first row row0, rows of it) and
// its projection's sizes and first weight row nb (blockIdx.x); false past the tile count
// (grids are sized for the worst case).
struct GgTile {
  uint32_t e, row0, rows, N, K, nb;
};
// TM: the bucketing tile (rows of pairs per tile).
template <bool GATEUP, int TM = GG_TM>
__device__ __forceinline__ bool gg_tile(const MlpDesc& md, const uint32_t* tiles,
                                        const uint32_t* offsets, const uint32_t* meta, GgTile& t) {
  const uint32_t tile = blockIdx.y, nt = meta[1];
  if (tile >= nt) return false;
  t.e = tiles[2 * tile];
  t.row0 = tiles[2 * tile + 1];
  // the tile ends where the expert's next one starts, else with the expert (tile_first_row)
  const uint32_t end = tile + 1u < nt && tiles[2 * tile + 2] == t.e ? tiles[2 * tile + 3] : offsets[t.e + 1];
  t.rows = min(uint32_t(TM), end - t.row0);
  const WDesc& wd = GATEUP ? md.gate : md.down;
  t.N = wd.N;
  t.K = wd.K;
  t.nb = blockIdx.x * (GATEUP ? GG_TN : 2 * GG_TN);
  return true;
}

// The activation rows this thread copies: rows (tid >> 3) + (THREADS / 8) j of the tile
// (THREADS / 2 rows; gate/up: row pairs[i] / k of x; down: row i of H), aok[j]: the row is
// one of the tile's.
template <bool GATEUP, typename XT, int THREADS = GG_THREADS>
__device__ __forceinline__ void gg_arows(const XT* A, const uint32_t* pairs, uint32_t k,
                                         const GgTile& t, uint32_t tid, const XT* (&arow)[4],
                                         bool (&aok)[4]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t r = (tid >> 3) + uint32_t(THREADS / 8) * j;
    aok[j] = r < t.rows;
    const uint32_t i = t.row0 + (aok[j] ? r : 0u);
    arow[j] = A + int64_t(GATEUP ? pairs[i] / k : i) * t.K;
  }
}

// Copies this thread's activation chunks of K step kt (chunk c = tid & 7, 8 k, of its 4 rows;
// zero-filled past the tile or K) to row r * 128 + 16 * SWZ(c, r) of sa. A zero-filled copy
// reads nothing, so its source is the row's own arow (the tile's first row past the tile):
// no select against another base, whose reload and select cost the copying warps ~3
// instructions per copy and step (H200, Qwen3 4096 tokens: ~3% per layer, with the raw rows'
// copies of mlp_wg_kernel done the same way).
template <typename XT, typename Swz, int THREADS = GG_THREADS>
__device__ __forceinline__ void gg_copy_act(uint32_t sa, const XT* const (&arow)[4],
                                            const bool (&aok)[4], uint32_t kt, uint32_t K,
                                            uint32_t tid, Swz swz) {
  const uint32_t k0 = kt * GG_BK, c = tid & 7u;
  const bool kok = k0 + 8u * c < K;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t r = (tid >> 3) + uint32_t(THREADS / 8) * j;
    const bool ok = aok[j] && kok;
    cp_async16(sa + r * 128u + (swz(c, r) << 4), arow[j] + (ok ? k0 + 8u * c : 0u), ok ? 16u : 0u);
  }
}

// Output row of bucketed row i and its factor: gate/up: row i of H, 1; down: row pairs[i] of
// Yp, its routing weight.
template <bool GATEUP>
__device__ __forceinline__ int64_t gg_out_row(const uint32_t* pairs, const float* rw, uint32_t i,
                                              float& scale) {
  if (GATEUP) {
    scale = 1.f;
    return i;
  }
  const uint32_t pair = pairs[i];
  scale = rw[pair];
  return pair;
}

// Stores columns n, n + 1 (< N) of an output row in XT: one 32-bit store where N is even.
template <typename XT>
__device__ __forceinline__ void gg_store2(XT* o, uint32_t N, uint32_t n, float v0, float v1) {
  if ((N & 1u) == 0u) {
    *reinterpret_cast<uint32_t*>(o) = gg_pack<XT>(v0, v1);
  } else {
    o[0] = from_f<XT>(v0);
    if (n + 1u < N) o[1] = from_f<XT>(v1);
  }
}

// One projection step of the grouped kernel. GATEUP: out = H [bucketed row, F] =
// silu(gate) * up; else out = Yp [pair, D] = rw[pair] * (down . H[row]). A = x (gate/up) or
// H (down), both XT, rows of K contiguous.
template <bool GATEUP, typename XT, int FMT, int SK>
__global__ void __launch_bounds__(GG_THREADS, 1)
    mlp_gg_kernel(MlpDesc md, const XT* __restrict__ A, const uint32_t* __restrict__ pairs,
                  const uint32_t* __restrict__ offsets, const uint32_t* __restrict__ tiles,
                  const uint32_t* __restrict__ meta, const float* __restrict__ rw,
                  XT* __restrict__ out, uint32_t sc16) {
  extern __shared__ __align__(16) unsigned char gg_smem[];
  GgTile t;
  if (!gg_tile<GATEUP>(md, tiles, offsets, meta, t)) return;
  const uint32_t e = t.e, row0 = t.row0, rows = t.rows, N = t.N, K = t.K, nb = t.nb;
  const WDesc& wd0 = GATEUP ? md.gate : md.down;
  const WDesc& wd1 = GATEUP ? md.up : md.down;
#define GG_N0(p) (nb + ((GATEUP || (p) == 0) ? 0u : uint32_t(GG_TN)))
  const uint32_t tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
  const uint32_t gid = lane >> 2, t4 = lane & 3u;
  const uint32_t wm = (warp >> 2) * 64u, wn = (warp & 3u) * 32u;
  constexpr uint32_t BROW = gg_brow(FMT);
  const uint32_t STAGE = gg_stage_bytes(FMT, wd0, wd1);
  constexpr uint32_t ABYTES = uint32_t(GG_TM) * GG_BK * 2u;
  constexpr uint32_t BPR = BROW / 16u;  // 16-byte chunks per weight row per step
  constexpr uint32_t KPC = FMT == GG_A8 ? 16u : 32u;  // k per weight chunk
  const uint32_t smem0 = smem_u32(gg_smem);
  // raw scales / biases: [panel][128][groups] (trellis: gg_tr_layout: scp = scale * sv, bip =
  // su, grp = codebooks)
  uint32_t scp[2], bip[2], grp[2];
  const uint32_t n0[2] = {GG_N0(0), GG_N0(1)};  // (the trellis helpers take an array)
  uint32_t trq[2][2];  // trellis: the copy plan (gg_tr_copy_plan)
  uint32_t trsh[2];    // trellis: pow2_shift of each panel's group size
  if constexpr (FMT == GG_TR) {
    gg_tr_layout(smem0 + GG_STAGES * STAGE, wd0, wd1, K, scp, bip, grp);
    gg_tr_copy_plan(wd0, wd1, n0, N, tid, trq);
    trsh[0] = pow2_shift(wd0.group_size);
    trsh[1] = pow2_shift(wd1.group_size);
  } else {
    uint32_t off = smem0 + GG_STAGES * STAGE;
    const uint32_t b0 = gg_panel_sc_bytes(wd0), b1 = gg_panel_sc_bytes(wd1);
    scp[0] = off; off += b0;
    bip[0] = off; off += wd0.mode == 1u ? 0u : b0;
    scp[1] = off; off += b1;
    bip[1] = off;
  }

  // activation copies: 16-byte chunks XOR-swizzled by row parity
  const XT* arow[4];
  bool aok[4];
  gg_arows<GATEUP>(A, pairs, md.k, t, tid, arow, aok);
  const uint32_t KT = (K + GG_BK - 1) / GG_BK;

  auto load_stage = [&](uint32_t kt, uint32_t slot) {
    const uint32_t k0 = kt * GG_BK;
    const uint32_t sa = smem0 + slot * STAGE, sbw = sa + ABYTES;
    gg_copy_act(sa, arow, aok, kt, K, tid, [](uint32_t c, uint32_t r) { return c ^ ((r & 1u) << 2); });
    if constexpr (FMT == GG_TR) gg_tr_copy_stage(sbw, wd0, wd1, e, k0, n0, N, K, tid, trq);
#pragma unroll
    for (int p = 0; p < (FMT == GG_TR ? 0 : 2); ++p) {
      const WDesc& wd = p ? wd1 : wd0;
#pragma unroll
      for (uint32_t j = 0; j < GG_TN * BPR / GG_THREADS; ++j) {
        const uint32_t q = tid + j * GG_THREADS;
        const uint32_t r = q / BPR, ch = q % BPR, R = p * GG_TN + r;
        const uint32_t n = GG_N0(p) + r;
        const bool ok = n < N && k0 + ch * KPC < K;
        const uint32_t* src =
            ok ? wd.w + (int64_t(e) * N + n) * wd.row_words + (k0 * wd.bits) / 32u + ch * 4u : wd.w;
        uint32_t pos;
        if constexpr (FMT == GG_A8) pos = ch ^ (((R >> 1) & 1u) << 1);
        else pos = ch ^ ((R >> 2) & 1u);
        cp_async16(sbw + R * BROW + (pos << 4), src, ok ? 16u : 0u);
      }
    }
  };
  auto load_scales = [&]() {
    if constexpr (FMT == GG_TR)
      gg_tr_load_tables(reinterpret_cast<float*>(gg_smem), smem0, scp, bip, grp, wd0, wd1, e, n0, N,
                        K, tid);
#pragma unroll
    for (int p = 0; p < (FMT == GG_TR ? 0 : 2); ++p) {
      const WDesc& wd = p ? wd1 : wd0;
      const uint32_t es = scale_elem_bytes(wd.scale_kind);
      const uint32_t per_row = wd.groups * es;  // bytes, a multiple of 4
      const uint32_t n0p = GG_N0(p);
      const uint32_t vrows = n0p < N ? min(uint32_t(GG_TN), N - n0p) : 0u;
      const uint32_t total = GG_TN * per_row, valid = vrows * per_row;
      const int64_t base = (int64_t(e) * N + n0p) * per_row;
      for (int a = 0; a < (FMT == GG_FP4 ? 1 : 2); ++a) {
        const unsigned char* src = static_cast<const unsigned char*>(a ? wd.biases : wd.scales);
        const uint32_t dst = a ? bip[p] : scp[p];
        if (sc16) {
          for (uint32_t c = tid * 16u; c < total; c += GG_THREADS * 16u) {
            const bool ok = c < valid;
            cp_async16(dst + c, ok ? src + base + c : src, ok ? 16u : 0u);
          }
        } else {
          for (uint32_t c = tid * 4u; c < total; c += GG_THREADS * 4u) {
            const bool ok = c < valid;
            cp_async4(dst + c, ok ? src + base + c : src, ok ? 4u : 0u);
          }
        }
      }
    }
  };

  float acc[2][4][4][4];
#pragma unroll
  for (int p = 0; p < 2; ++p)
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[p][a][b][c] = 0.f;

#pragma unroll
  for (int s = 0; s < GG_STAGES - 1; ++s) {
    if (uint32_t(s) < KT) load_stage(s, s);
    if (s == 0) load_scales();
    cp_async_commit();
  }

  const uint32_t gsu0 = wd0.gs_units, gsu1 = wd1.gs_units, G0 = wd0.groups, G1 = wd1.groups;
  for (uint32_t kt = 0; kt < KT; ++kt) {
    cp_async_wait<GG_STAGES - 2>();
    __syncthreads();
    {
      const uint32_t nk = kt + GG_STAGES - 1;
      if (nk < KT) load_stage(nk, nk % GG_STAGES);
      cp_async_commit();
    }
    const uint32_t slot = kt % GG_STAGES;
    const uint32_t sa = smem0 + slot * STAGE, sbw = sa + ABYTES;
    const uint32_t k0 = kt * GG_BK;
    // weight words of this thread: [panel][n-tile][unit] (8-bit: two words each)
    uint32_t wr[2][4][2][FMT == GG_A8 ? 2 : 1];
    if constexpr (FMT == GG_A8) {
#pragma unroll
      for (int p = 0; p < 2; ++p)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const uint32_t R = p * GG_TN + wn + nt * 8u + gid;
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const uint32_t ch = 2u * u + (t4 >> 1);
            const uint32_t pos = ch ^ (((R >> 1) & 1u) << 1);
            uint2 v;
            asm volatile("ld.shared.v2.u32 {%0,%1}, [%2];\n"
                         : "=r"(v.x), "=r"(v.y)
                         : "r"(sbw + R * BROW + (pos << 4) + 8u * (t4 & 1u)));
            wr[p][nt][u][0] = v.x;
            wr[p][nt][u][1] = v.y;
          }
        }
    } else if constexpr (FMT != GG_TR) {
      const uint32_t mi = lane >> 3;
#pragma unroll
      for (int p = 0; p < 2; ++p)
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          const uint32_t R = p * GG_TN + wn + np * 16u + (mi >> 1) * 8u + (lane & 7u);
          const uint32_t ch = mi & 1u;
          uint32_t r4[4];
          ldsm_x4(sbw + R * BROW + ((ch ^ ((R >> 2) & 1u)) << 4), r4);
          wr[p][2 * np][0][0] = r4[0];
          wr[p][2 * np][1][0] = r4[1];
          wr[p][2 * np + 1][0][0] = r4[2];
          wr[p][2 * np + 1][1][0] = r4[3];
        }
    }
    // (a unit past K, when K % 64 == 32, multiplies zero-filled activations and weights)
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      // scales of this unit: [panel][n-tile]
      uint32_t s2[2][4], b2[2][4];
      float sf[2][4], bfv[2][4];
      // trellis: this thread's 8 k of the unit (k-tile jt, codes 8 (t4 & 1) ..) of each row,
      // as 4 XT pairs: [panel][n-tile][pair]
      uint32_t tq[2][4][4];
      if constexpr (FMT == GG_TR) {
        const uint32_t jt = 2u * u + (t4 >> 1), kj = k0 + 16u * jt;
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          const WDesc& wd = p ? wd1 : wd0;
          if (kj >= K) {  // past K (K % 64 == 32): zeros (the tables end at K)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
#pragma unroll
              for (int i = 0; i < 4; ++i) tq[p][nt][i] = 0u;
            continue;
          }
          const float* sfl = reinterpret_cast<const float*>(gg_smem);
          const float* scf = sfl + (scp[p] - smem0) / 4u + div_shift(kj, wd.group_size, trsh[p]) * uint32_t(GG_TN);
          const float* su = wd.has_su ? sfl + (bip[p] - smem0) / 4u + kj + 8u * (t4 & 1u) : nullptr;
          const uint32_t pb = sbw - smem0 + (p ? 1024u * wd0.bits : 0u);
          auto dec = [&](auto bits_tag) {
            constexpr uint32_t B = decltype(bits_tag)::value;
            constexpr uint32_t AL = B % 4u == 0u ? 0u : B % 2u == 0u ? 2u : 3u;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
              const uint32_t rr = wn + nt * 8u + gid;
              float f[8];
              gg_tr_levels<B, 8, AL>(gg_smem, pb + B * (256u * jt + 32u * (rr >> 4) + 2u * (rr & 15u) + (t4 & 1u)),
                                     grp[p], scf[rr], su, f);
#pragma unroll
              for (int i = 0; i < 4; ++i) tq[p][nt][i] = gg_pack<XT>(f[2 * i], f[2 * i + 1]);
            }
          };
          switch (wd.bits) {
            case 2: dec(std::integral_constant<uint32_t, 2>{}); break;
            case 3: dec(std::integral_constant<uint32_t, 3>{}); break;
            case 4: dec(std::integral_constant<uint32_t, 4>{}); break;
            case 5: dec(std::integral_constant<uint32_t, 5>{}); break;
            case 6: dec(std::integral_constant<uint32_t, 6>{}); break;
            case 7: dec(std::integral_constant<uint32_t, 7>{}); break;
            default: dec(std::integral_constant<uint32_t, 8>{}); break;
          }
        }
      }
#pragma unroll
      for (int p = 0; p < 2 && FMT != GG_TR; ++p) {
        const uint32_t G = p ? G1 : G0;
        const uint32_t g = min((k0 / 32u + u) / (p ? gsu1 : gsu0), G - 1u);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
          gg_scale<XT, FMT, SK>(scp[p], bip[p], (wn + nt * 8u + gid) * G * gg_sc_bytes<FMT, SK>(), g,
                                s2[p][nt], b2[p][nt], sf[p][nt], bfv[p][nt]);
      }
      // activations: [m-tile][row gid / gid+8] x 4 words (k 8*t4 .. 8*t4+7 of this unit)
      uint32_t af[4][2][4];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const uint32_t r = wm + mt * 16u + gid + hr * 8u;
          const uint32_t addr = sa + r * 128u + (((4u * u + t4) ^ ((r & 1u) << 2)) << 4);
          asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                       : "=r"(af[mt][hr][0]), "=r"(af[mt][hr][1]), "=r"(af[mt][hr][2]),
                         "=r"(af[mt][hr][3])
                       : "r"(addr));
        }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t bq[2][4][2];
#pragma unroll
        for (int p = 0; p < 2; ++p)
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            if constexpr (FMT == GG_TR) {
              bq[p][nt][0] = tq[p][nt][2 * h];
              bq[p][nt][1] = tq[p][nt][2 * h + 1];
            } else if constexpr (FMT == GG_A4) {
              const uint32_t w = wr[p][nt][u][0];
#pragma unroll
              for (int jb = 0; jb < 2; ++jb)
                bq[p][nt][jb] = gg_fma2<XT>(gg_a4_pair<XT>(w, w >> 4, 2 * h + jb), s2[p][nt], b2[p][nt]);
            } else if constexpr (FMT == GG_FP4) {
              uint32_t q[2];
              gg_fp4_quad<XT>(wr[p][nt][u][0], h, q[0], q[1]);
#pragma unroll
              for (int jb = 0; jb < 2; ++jb) bq[p][nt][jb] = gg_fma2<XT>(q[jb], s2[p][nt], b2[p][nt]);
            } else {
              const uint32_t w = wr[p][nt][u][h];
              if constexpr (std::is_same_v<XT, __half>) {
#pragma unroll
                for (int jb = 0; jb < 2; ++jb)
                  bq[p][nt][jb] = gg_fma2<XT>(gg_a8_pair_f16(w, jb), s2[p][nt], b2[p][nt]);
              } else {
#pragma unroll
                for (int jb = 0; jb < 2; ++jb)
                  bq[p][nt][jb] = gg_pack<XT>(fmaf(sf[p][nt], gg_a8_code(w, 2 * jb), bfv[p][nt]),
                                              fmaf(sf[p][nt], gg_a8_code(w, 2 * jb + 1), bfv[p][nt]));
              }
            }
          }
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          const uint32_t a[4] = {af[mt][0][2 * h], af[mt][1][2 * h], af[mt][0][2 * h + 1],
                                 af[mt][1][2 * h + 1]};
#pragma unroll
          for (int p = 0; p < 2; ++p)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) gg_mma<XT>(acc[p][mt][nt], a, bq[p][nt][0], bq[p][nt][1]);
        }
      }
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: stored in XT (pairs of columns where N is even)
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const uint32_t r = wm + mt * 16u + gid + hr * 8u;
      if (r >= rows) continue;
      float scale;
      const int64_t orow = gg_out_row<GATEUP>(pairs, rw, row0 + r, scale);
#pragma unroll
      for (int p = 0; p < (GATEUP ? 1 : 2); ++p)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          const uint32_t n = GG_N0(p) + wn + nt * 8u + 2u * t4;
          if (n >= N) continue;
          float v[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            if (GATEUP) {
              v[c] = silu(acc[0][mt][nt][hr * 2 + c]) * acc[1][mt][nt][hr * 2 + c];
            } else {
              v[c] = scale * acc[p][mt][nt][hr * 2 + c];
            }
          }
          gg_store2<XT>(out + orow * N + n, N, n, v[0], v[1]);
        }
    }
}

#undef GG_N0

// y[t] = sum over slots j in order of Yp[t*k + j] (XT), in fp32; slots whose id is out of
// range skipped (their Yp rows were never written). 8 columns per thread (D % 32 == 0).
template <typename XT>
__global__ void combine_gg_kernel(const XT* __restrict__ Yp, const void* __restrict__ ids,
                                  int id_kind, uint32_t T, uint32_t k, uint32_t D, uint32_t E,
                                  XT* __restrict__ y) {
  const uint64_t idx = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const uint32_t D8 = D / 8u;
  if (idx >= uint64_t(T) * D8) return;
  const uint64_t t = idx / D8, d = (idx % D8) * 8u;
  float s[8];
#pragma unroll
  for (int q = 0; q < 8; ++q) s[q] = 0.f;
  bool any = false;
  for (uint32_t j = 0; j < k; ++j) {
    const int64_t ex = load_id(ids, id_kind, t * k + j);
    if (!valid_id(ex, E)) continue;
    float f[8];
    unpack8<XT>(*reinterpret_cast<const uint4*>(Yp + (t * k + j) * D + d), f);
#pragma unroll
    for (int q = 0; q < 8; ++q) s[q] = any ? s[q] + f[q] : f[q];
    any = true;
  }
  uint4 o;
  o.x = gg_pack<XT>(s[0], s[1]);
  o.y = gg_pack<XT>(s[2], s[3]);
  o.z = gg_pack<XT>(s[4], s[5]);
  o.w = gg_pack<XT>(s[6], s[7]);
  *reinterpret_cast<uint4*>(y + t * D + d) = o;
}

}  // namespace mlx_moe::cuda
