// Fused expert MLP, token-tile x F-slice variant (decode and small batches).
//
// Grid (indirect, from moe_bucket_scan): x = grouped-GEMM tiles of up to TM pairs of one
// expert (bucketed order), y = slices of FS hidden units. A threadgroup
//   1. stages the activations of its TM pairs in threadgroup memory (once per threadgroup),
//   2. computes h[t][f] = silu(gate_f . x_t) * (up_f . x_t) for the FS rows f of its slice
//      (a simdgroup per row at a time, lanes across K, one read of each weight byte),
//   3. multiplies h by the slice's FS columns of down for every output row d (one read of
//      each down byte), scales by the routing weight, and writes the pair's partial
//      output for this slice: partial[(pair * nslices + slice) * D + d].
// Every weight byte of a touched expert is read once per token tile; nothing is
// recomputed per output block. moe_mlp_combine then sums, per token, the k slots and the
// slices in a fixed order (slot-major), so results are bitwise reproducible: no float
// atomics decide an order.
#include <metal_stdlib>

#include "moe_decode.h"

using namespace metal;

// Format specialisation: the host (mlx_moe/csrc/metal/encode.h) creates each pipeline with
// the (mode, bits) of the gate, up and down projections as function constants, so one
// kernel body compiles into a decoder specialised for each format combination (bits may
// differ per projection) without enumerating instantiations.
constant uint MOE_FC_GATE_MODE [[function_constant(0)]];
constant uint MOE_FC_GATE_BITS [[function_constant(1)]];
constant uint MOE_FC_UP_MODE [[function_constant(2)]];
constant uint MOE_FC_UP_BITS [[function_constant(3)]];
constant uint MOE_FC_DOWN_MODE [[function_constant(4)]];
constant uint MOE_FC_DOWN_BITS [[function_constant(5)]];
constant bool MOE_FC_SET = is_function_constant_defined(MOE_FC_GATE_MODE) &&
                           is_function_constant_defined(MOE_FC_GATE_BITS) &&
                           is_function_constant_defined(MOE_FC_UP_MODE) &&
                           is_function_constant_defined(MOE_FC_UP_BITS) &&
                           is_function_constant_defined(MOE_FC_DOWN_MODE) &&
                           is_function_constant_defined(MOE_FC_DOWN_BITS);

inline MoeFmt moe_fmt(constant MoeWeightArgs& a, uint mode, uint bits) {
  return MOE_FC_SET ? MoeFmt{mode, bits} : MoeFmt{a.mode, a.bits};
}

inline uint moe_find_expert(device const uint* tile_starts, uint E, uint tile) {
  uint lo = 0, hi = E;  // tile_starts[lo] <= tile < tile_starts[hi]
  while (hi - lo > 1) {
    uint mid = (lo + hi) / 2;
    if (tile_starts[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

template <typename T, int TM>
[[kernel]] void moe_mlp_fused(
    device const T* x [[buffer(0)]],
    device const float* route_w [[buffer(1)]],
    device const uint* pairs [[buffer(2)]],
    device const uint* offsets [[buffer(3)]],
    device const uint* tile_starts [[buffer(4)]],
    device const uint8_t* gate_w [[buffer(5)]],
    device const uint8_t* gate_s [[buffer(6)]],
    device const uint8_t* gate_b [[buffer(7)]],
    device const uint8_t* up_w [[buffer(8)]],
    device const uint8_t* up_s [[buffer(9)]],
    device const uint8_t* up_b [[buffer(10)]],
    device const uint8_t* down_w [[buffer(11)]],
    device const uint8_t* down_s [[buffer(12)]],
    device const uint8_t* down_b [[buffer(13)]],
    device float* partial [[buffer(14)]],
    constant MoeMlpArgs& args [[buffer(15)]],
    device const uint8_t* gate_su [[buffer(18)]],
    device const uint8_t* gate_sv [[buffer(19)]],
    device const uint8_t* up_su [[buffer(20)]],
    device const uint8_t* up_sv [[buffer(21)]],
    device const uint8_t* down_su [[buffer(22)]],
    device const uint8_t* down_sv [[buffer(23)]],
    threadgroup T* xs [[threadgroup(0)]],     // [TM][D]
    threadgroup float* hs [[threadgroup(1)]],  // [TM][fs]
    uint2 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint3 tpt [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint nthreads = tpt.x;
  const uint nsg = nthreads / 32;
  const uint D = args.D, F = args.F;
  const uint e = moe_find_expert(tile_starts, args.E, tg.x);
  const uint r0 = offsets[e] + (tg.x - tile_starts[e]) * TM;
  const uint c = min(uint(TM), offsets[e + 1] - r0);
  const uint slice = tg.y;
  const uint f0 = slice * args.fs;
  const uint fs = min(args.fs, F - f0);
  const MoeProj gp = {gate_w, gate_s, gate_b, gate_su, gate_sv};
  const MoeProj upp = {up_w, up_s, up_b, up_su, up_sv};
  const MoeProj dp = {down_w, down_s, down_b, down_su, down_sv};
  const MoeFmt gf = moe_fmt(args.gate, MOE_FC_GATE_MODE, MOE_FC_GATE_BITS);
  const MoeFmt uf = moe_fmt(args.up, MOE_FC_UP_MODE, MOE_FC_UP_BITS);
  const MoeFmt df = moe_fmt(args.down, MOE_FC_DOWN_MODE, MOE_FC_DOWN_BITS);

  // 1. Activations of the tile's pairs, once per threadgroup.
  for (uint t = 0; t < c; ++t) {
    device const T* xr = x + size_t(pairs[r0 + t] / args.k) * D;
    for (uint d = tid; d < D; d += nthreads) {
      xs[t * D + d] = xr[d];
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 2. Gate and up rows of the slice: simdgroup per row, lanes across K.
  float v[MOE_CHUNK + 2];  // 64 codes, then the current scale and bias
  for (uint f = sg; f < fs; f += nsg) {
    float g_acc[TM], u_acc[TM];
    for (int t = 0; t < TM; ++t) {
      g_acc[t] = 0.0f;
      u_acc[t] = 0.0f;
    }
    for (uint k0 = lane * MOE_CHUNK; k0 < D; k0 += 32 * MOE_CHUNK) {
      const uint n = min(MOE_CHUNK, D - k0);  // D is a multiple of 32
      moe_decode_chunk(gp, args.gate, gf, e, f0 + f, k0, n, v);
      for (int t = 0; t < TM; ++t) {
        if (uint(t) < c) {
          for (uint j = 0; j < n; ++j) {
            g_acc[t] = fma(v[j], float(xs[t * D + k0 + j]), g_acc[t]);
          }
        }
      }
      moe_decode_chunk(upp, args.up, uf, e, f0 + f, k0, n, v);
      for (int t = 0; t < TM; ++t) {
        if (uint(t) < c) {
          for (uint j = 0; j < n; ++j) {
            u_acc[t] = fma(v[j], float(xs[t * D + k0 + j]), u_acc[t]);
          }
        }
      }
    }
    for (int t = 0; t < TM; ++t) {
      float g = simd_sum(g_acc[t]);
      float u = simd_sum(u_acc[t]);
      if (lane == 0 && uint(t) < c) {
        hs[t * args.fs + f] = g / (1.0f + precise::exp(-g)) * u;
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);

  // 3. Down: output row d takes the slice's fs columns (one group-aligned run of codes).
  for (uint d = tid; d < D; d += nthreads) {
    float acc[TM];
    for (int t = 0; t < TM; ++t) {
      acc[t] = 0.0f;
    }
    for (uint j0 = 0; j0 < fs; j0 += MOE_CHUNK) {
      const uint n = min(MOE_CHUNK, fs - j0);  // fs is a multiple of 32
      moe_decode_chunk(dp, args.down, df, e, d, f0 + j0, n, v);
      for (int t = 0; t < TM; ++t) {
        if (uint(t) < c) {
          for (uint j = 0; j < n; ++j) {
            acc[t] = fma(v[j], hs[t * args.fs + j0 + j], acc[t]);
          }
        }
      }
    }
    for (uint t = 0; t < c; ++t) {
      const uint pair = pairs[r0 + t];
      partial[(size_t(pair) * args.nslices + slice) * D + d] = route_w[pair] * acc[t];
    }
  }
}

// y[t][d] = sum over slots j (in order) of sum over slices s (in order) of partials.
template <typename T>
[[kernel]] void moe_mlp_combine(
    device const float* partial [[buffer(0)]],
    device T* y [[buffer(1)]],
    constant MoeMlpArgs& args [[buffer(2)]],
    uint gid [[thread_position_in_grid]]) {
  const uint D = args.D;
  if (gid >= args.T * D) {
    return;
  }
  const uint t = gid / D, d = gid % D;
  float acc = 0.0f;
  for (uint j = 0; j < args.k; ++j) {
    const size_t base = (size_t(t) * args.k + j) * args.nslices;
    for (uint s = 0; s < args.nslices; ++s) {
      acc += partial[(base + s) * D + d];
    }
  }
  y[gid] = T(acc);
}

#define MOE_INSTANTIATE_FUSED(tname, T, TM)                                                   \
  template [[host_name("moe_mlp_fused_" #tname "_tm" #TM)]] [[kernel]] void                  \
  moe_mlp_fused<T, TM>(                                                                      \
      device const T* x [[buffer(0)]], device const float* route_w [[buffer(1)]],           \
      device const uint* pairs [[buffer(2)]], device const uint* offsets [[buffer(3)]],     \
      device const uint* tile_starts [[buffer(4)]], device const uint8_t* gate_w [[buffer(5)]], \
      device const uint8_t* gate_s [[buffer(6)]], device const uint8_t* gate_b [[buffer(7)]], \
      device const uint8_t* up_w [[buffer(8)]], device const uint8_t* up_s [[buffer(9)]],   \
      device const uint8_t* up_b [[buffer(10)]], device const uint8_t* down_w [[buffer(11)]], \
      device const uint8_t* down_s [[buffer(12)]], device const uint8_t* down_b [[buffer(13)]], \
      device float* partial [[buffer(14)]], constant MoeMlpArgs& args [[buffer(15)]],       \
      device const uint8_t* gate_su [[buffer(18)]], device const uint8_t* gate_sv [[buffer(19)]], \
      device const uint8_t* up_su [[buffer(20)]], device const uint8_t* up_sv [[buffer(21)]], \
      device const uint8_t* down_su [[buffer(22)]], device const uint8_t* down_sv [[buffer(23)]], \
      threadgroup T* xs [[threadgroup(0)]], threadgroup float* hs [[threadgroup(1)]],        \
      uint2 tg [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],  \
      uint3 tpt [[threads_per_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],    \
      uint lane [[thread_index_in_simdgroup]]);

#define MOE_INSTANTIATE_TYPE(tname, T)                                                        \
  MOE_INSTANTIATE_FUSED(tname, T, 1)                                                          \
  MOE_INSTANTIATE_FUSED(tname, T, 2)                                                          \
  MOE_INSTANTIATE_FUSED(tname, T, 4)                                                          \
  MOE_INSTANTIATE_FUSED(tname, T, 8)                                                          \
  template [[host_name("moe_mlp_combine_" #tname)]] [[kernel]] void moe_mlp_combine<T>(       \
      device const float* partial [[buffer(0)]], device T* y [[buffer(1)]],                  \
      constant MoeMlpArgs& args [[buffer(2)]], uint gid [[thread_position_in_grid]]);

MOE_INSTANTIATE_TYPE(float32, float)
MOE_INSTANTIATE_TYPE(float16, half)
MOE_INSTANTIATE_TYPE(bfloat16, bfloat)

// ---------------------------------------------------------------------------------------
// Grouped GEMM variant (larger batches): the two projections as tiled GEMMs over the
// bucketed rows of each expert, on simdgroup_matrix 8x8 tiles.
//   moe_gemm_gateup: H[row][f] = silu(X_e W_gate^T) * (X_e W_up^T), rows in bucketed order
//   moe_gemm_down:   partial[pair][d] = w_pair * (H_e W_down^T)[row][d]
// then moe_mlp_combine (nslices = 1) sums each token's k slots in slot order.
// A threadgroup owns a BM x BN output tile of one expert (tile index from tile_starts,
// grid y over N) and walks K in steps of BK: activations gathered into threadgroup memory,
// weights decoded once per tile step into threadgroup memory (transposed, K-major), then
// four simdgroups each accumulate a 16 x 16 block (2 x 2 fragments).

constant constexpr uint GEMM_BM = 32;
constant constexpr uint GEMM_BN = 32;
constant constexpr uint GEMM_BK = 32;

// Decodes rows [n0, n0 + 32) x codes [k0, k0 + 32) of one expert's projection into
// wt[k][n] (K-major). Thread t < 32 decodes row n0 + t.
inline void moe_gemm_load_w(
    thread const MoeProj& p, constant MoeWeightArgs& a, MoeFmt f, uint e, uint n0, uint k0,
    uint t, threadgroup float* wt) {
  if (t < GEMM_BN) {
    const uint n = n0 + t;
    float v[MOE_CHUNK + 2];
    if (n < a.N) {
      moe_decode_chunk(p, a, f, e, n, k0, MOE_HALF, v);
    } else {
      for (uint j = 0; j < MOE_HALF; ++j) {
        v[j] = 0.0f;
      }
    }
    for (uint j = 0; j < MOE_HALF; ++j) {
      wt[j * GEMM_BN + t] = v[j];
    }
  }
}

template <typename T>
[[kernel]] void moe_gemm_gateup(
    device const T* x [[buffer(0)]],
    device const uint* pairs [[buffer(2)]],
    device const uint* offsets [[buffer(3)]],
    device const uint* tile_starts [[buffer(4)]],
    device const uint8_t* gate_w [[buffer(5)]],
    device const uint8_t* gate_s [[buffer(6)]],
    device const uint8_t* gate_b [[buffer(7)]],
    device const uint8_t* up_w [[buffer(8)]],
    device const uint8_t* up_s [[buffer(9)]],
    device const uint8_t* up_b [[buffer(10)]],
    device float* H [[buffer(14)]],
    constant MoeMlpArgs& args [[buffer(15)]],
    device const uint8_t* gate_su [[buffer(18)]],
    device const uint8_t* gate_sv [[buffer(19)]],
    device const uint8_t* up_su [[buffer(20)]],
    device const uint8_t* up_sv [[buffer(21)]],
    uint2 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float xs[GEMM_BM * GEMM_BK];
  threadgroup float wg[GEMM_BK * GEMM_BN];
  threadgroup float wu[GEMM_BK * GEMM_BN];
  threadgroup float og[GEMM_BM * GEMM_BN];
  threadgroup float ou[GEMM_BM * GEMM_BN];
  const uint e = moe_find_expert(tile_starts, args.E, tg.x);
  const uint r0 = offsets[e] + (tg.x - tile_starts[e]) * GEMM_BM;
  const uint rows = min(GEMM_BM, offsets[e + 1] - r0);
  const uint n0 = tg.y * GEMM_BN;
  const uint sm = (sg / 2) * 16, sn = (sg % 2) * 16;  // this simdgroup's 16 x 16 block
  const MoeProj gp = {gate_w, gate_s, gate_b, gate_su, gate_sv};
  const MoeProj upp = {up_w, up_s, up_b, up_su, up_sv};
  simdgroup_float8x8 cg[2][2], cu[2][2];
  for (uint i = 0; i < 2; ++i) {
    for (uint j = 0; j < 2; ++j) {
      cg[i][j] = simdgroup_float8x8(0.0f);
      cu[i][j] = simdgroup_float8x8(0.0f);
    }
  }
  for (uint k0 = 0; k0 < args.D; k0 += GEMM_BK) {
    for (uint i = tid; i < GEMM_BM * GEMM_BK; i += 128) {
      const uint r = i / GEMM_BK, kk = i % GEMM_BK;
      xs[i] = r < rows ? float(x[size_t(pairs[r0 + r] / args.k) * args.D + k0 + kk]) : 0.0f;
    }
    moe_gemm_load_w(gp, args.gate, moe_fmt(args.gate, MOE_FC_GATE_MODE, MOE_FC_GATE_BITS), e, n0,
                    k0, tid, wg);
    moe_gemm_load_w(upp, args.up, moe_fmt(args.up, MOE_FC_UP_MODE, MOE_FC_UP_BITS), e, n0, k0,
                    tid >= 64 ? tid - 64 : GEMM_BN, wu);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < GEMM_BK; kk += 8) {
      simdgroup_float8x8 a[2], bg[2], bu[2];
      for (uint i = 0; i < 2; ++i) {
        simdgroup_load(a[i], xs + (sm + 8 * i) * GEMM_BK + kk, GEMM_BK);
        simdgroup_load(bg[i], wg + kk * GEMM_BN + sn + 8 * i, GEMM_BN);
        simdgroup_load(bu[i], wu + kk * GEMM_BN + sn + 8 * i, GEMM_BN);
      }
      for (uint i = 0; i < 2; ++i) {
        for (uint j = 0; j < 2; ++j) {
          simdgroup_multiply_accumulate(cg[i][j], a[i], bg[j], cg[i][j]);
          simdgroup_multiply_accumulate(cu[i][j], a[i], bu[j], cu[i][j]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint i = 0; i < 2; ++i) {
    for (uint j = 0; j < 2; ++j) {
      simdgroup_store(cg[i][j], og + (sm + 8 * i) * GEMM_BN + sn + 8 * j, GEMM_BN);
      simdgroup_store(cu[i][j], ou + (sm + 8 * i) * GEMM_BN + sn + 8 * j, GEMM_BN);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint i = tid; i < GEMM_BM * GEMM_BN; i += 128) {
    const uint r = i / GEMM_BN, n = i % GEMM_BN;
    if (r < rows && n0 + n < args.F) {
      const float g = og[i];
      H[size_t(r0 + r) * args.F + n0 + n] = g / (1.0f + precise::exp(-g)) * ou[i];
    }
  }
}

[[kernel]] void moe_gemm_down(
    device const float* route_w [[buffer(1)]],
    device const uint* pairs [[buffer(2)]],
    device const uint* offsets [[buffer(3)]],
    device const uint* tile_starts [[buffer(4)]],
    device const uint8_t* down_w [[buffer(11)]],
    device const uint8_t* down_s [[buffer(12)]],
    device const uint8_t* down_b [[buffer(13)]],
    device float* partial [[buffer(14)]],
    constant MoeMlpArgs& args [[buffer(15)]],
    device const float* H [[buffer(16)]],
    device const uint8_t* down_su [[buffer(22)]],
    device const uint8_t* down_sv [[buffer(23)]],
    uint2 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float hs[GEMM_BM * GEMM_BK];
  threadgroup float wd[GEMM_BK * GEMM_BN];
  threadgroup float os[GEMM_BM * GEMM_BN];
  const uint e = moe_find_expert(tile_starts, args.E, tg.x);
  const uint r0 = offsets[e] + (tg.x - tile_starts[e]) * GEMM_BM;
  const uint rows = min(GEMM_BM, offsets[e + 1] - r0);
  const uint n0 = tg.y * GEMM_BN;
  const uint sm = (sg / 2) * 16, sn = (sg % 2) * 16;
  const MoeProj dp = {down_w, down_s, down_b, down_su, down_sv};
  simdgroup_float8x8 c[2][2];
  for (uint i = 0; i < 2; ++i) {
    for (uint j = 0; j < 2; ++j) {
      c[i][j] = simdgroup_float8x8(0.0f);
    }
  }
  for (uint k0 = 0; k0 < args.F; k0 += GEMM_BK) {
    for (uint i = tid; i < GEMM_BM * GEMM_BK; i += 128) {
      const uint r = i / GEMM_BK, kk = i % GEMM_BK;
      hs[i] = r < rows ? H[size_t(r0 + r) * args.F + k0 + kk] : 0.0f;
    }
    moe_gemm_load_w(dp, args.down, moe_fmt(args.down, MOE_FC_DOWN_MODE, MOE_FC_DOWN_BITS), e, n0,
                    k0, tid, wd);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint kk = 0; kk < GEMM_BK; kk += 8) {
      simdgroup_float8x8 a[2], b[2];
      for (uint i = 0; i < 2; ++i) {
        simdgroup_load(a[i], hs + (sm + 8 * i) * GEMM_BK + kk, GEMM_BK);
        simdgroup_load(b[i], wd + kk * GEMM_BN + sn + 8 * i, GEMM_BN);
      }
      for (uint i = 0; i < 2; ++i) {
        for (uint j = 0; j < 2; ++j) {
          simdgroup_multiply_accumulate(c[i][j], a[i], b[j], c[i][j]);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint i = 0; i < 2; ++i) {
    for (uint j = 0; j < 2; ++j) {
      simdgroup_store(c[i][j], os + (sm + 8 * i) * GEMM_BN + sn + 8 * j, GEMM_BN);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint i = tid; i < GEMM_BM * GEMM_BN; i += 128) {
    const uint r = i / GEMM_BN, n = i % GEMM_BN;
    if (r < rows && n0 + n < args.D) {
      const uint pair = pairs[r0 + r];
      partial[size_t(pair) * args.D + n0 + n] = route_w[pair] * os[i];
    }
  }
}

// The second indirect-argument block: same tile count, grid y over the down projection.
[[kernel]] void moe_gemm_dispatch_down(
    device const uint* dispatch [[buffer(0)]],
    device uint* dispatch_down [[buffer(1)]],
    constant MoeMlpArgs& args [[buffer(2)]],
    uint i [[thread_position_in_grid]]) {
  if (i == 0) {
    dispatch_down[0] = dispatch[0];
    dispatch_down[1] = (args.D + GEMM_BN - 1) / GEMM_BN;
    dispatch_down[2] = 1;
    dispatch_down[3] = 0;
  }
}

#define MOE_INSTANTIATE_GEMM(tname, T)                                                        \
  template [[host_name("moe_gemm_gateup_" #tname)]] [[kernel]] void moe_gemm_gateup<T>(       \
      device const T* x [[buffer(0)]], device const uint* pairs [[buffer(2)]],              \
      device const uint* offsets [[buffer(3)]], device const uint* tile_starts [[buffer(4)]], \
      device const uint8_t* gate_w [[buffer(5)]], device const uint8_t* gate_s [[buffer(6)]], \
      device const uint8_t* gate_b [[buffer(7)]], device const uint8_t* up_w [[buffer(8)]],  \
      device const uint8_t* up_s [[buffer(9)]], device const uint8_t* up_b [[buffer(10)]],   \
      device float* H [[buffer(14)]], constant MoeMlpArgs& args [[buffer(15)]],             \
      device const uint8_t* gate_su [[buffer(18)]], device const uint8_t* gate_sv [[buffer(19)]], \
      device const uint8_t* up_su [[buffer(20)]], device const uint8_t* up_sv [[buffer(21)]], \
      uint2 tg [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],  \
      uint sg [[simdgroup_index_in_threadgroup]]);

MOE_INSTANTIATE_GEMM(float32, float)
MOE_INSTANTIATE_GEMM(float16, half)
MOE_INSTANTIATE_GEMM(bfloat16, bfloat)
