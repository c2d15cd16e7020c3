// Fused expert MLP: gate + up + SwiGLU + down + routing-weight combine in one dispatch.
//
// Grid (indirect, from the bucketing kernels): x = tiles of up to tm() pairs of one expert
// (bucketed order; the last tiles hold the pairs of out-of-range ids, which contribute
// zero), y = slices of `fs` hidden units. A threadgroup
//   1. computes h[t][f] = silu(gate_f . x_t) * (up_f . x_t) for the fs hidden units f of its
//      slice and the pairs t of its tile (activations staged in threadgroup memory once per
//      threadgroup, each gate/up weight byte read once per tile),
//   2. multiplies h by the slice's fs columns of down for every output row d (each down
//      byte read once per tile), scales by the routing weight and writes the pair's partial
//      row for this slice: partial[(pair * nslices + slice) * D + d],
//   3. combines (Metal >= 3.2): the threadgroup that completes a pair (its last slice to
//      arrive, counted by an integer atomic) sums the pair's slices in slice order; the one
//      that completes a token (its last pair) sums the token's k slots in slot order into y.
// Which threadgroup arrives last depends on the schedule; the order of every sum does not,
// so y is bitwise the same run to run (no float atomics). Without device-scope fences
// (Metal < 3.2) the host skips step 3 and dispatches moe_mlp_combine (same orders).
//
// One kernel body; the variants are template instances with a math policy:
//   MoeSimdMath<T, TM>: decode and small batches (TM = 1..8 pairs): a simdgroup per hidden
//                       unit, lanes across K, the whole activation rows in threadgroup memory;
//   MoeMmaMath<T>:      grouped batches (32 pairs): simdgroup_matrix 8x8 tiles, K in steps of
//                       32 codes decoded into threadgroup memory.
// The weight format is the decoder's policy: function constants 0..5 (mode, bits of gate,
// up, down) specialise moe_decode_chunk in every variant (kernels/moe_decode.h).
#include <metal_stdlib>

#include "moe_decode.h"

using namespace metal;

#if __METAL_VERSION__ >= 320
// Partials written by one threadgroup are read by another within the dispatch.
#define MOE_COHERENT coherent(device)
#define MOE_DEVICE_FENCE() \
  atomic_thread_fence(mem_flags::mem_device, memory_order_seq_cst, thread_scope_device)
#define MOE_HAS_DEVICE_FENCE 1
#else
#define MOE_COHERENT
#define MOE_HAS_DEVICE_FENCE 0
#endif

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

constant constexpr uint MOE_NO_PAIR = 0xffffffffu;
constant constexpr uint MOE_MAX_TM = 32;  // pairs per tile, largest policy

// What one threadgroup works on.
template <typename T>
struct MoeMlpCtx {
  device const T* x;
  device const float* route_w;
  device const uint* pairs;
  MoeProj gp, upp, dp;
  MoeFmt gf, uf, df;
  uint e;      // expert; E for the tiles of dropped (out-of-range) pairs
  uint r0;     // first bucketed row of the tile
  uint c;      // pairs in the tile
  uint slice;  // hidden-unit slice: units [f0, f0 + fs)
  uint f0, fs;
  uint tid, nthreads, sg, lane;
};

// Tile `tile` of the grid: its expert (binary search in tile_starts) and rows. Tiles past
// tile_starts[E] hold the dropped pairs (listed after offsets[E] by the bucketing).
inline void moe_find_tile(device const uint* tile_starts, device const uint* offsets,
                          constant MoeMlpArgs& args, uint tile, uint tm, thread uint& e,
                          thread uint& r0, thread uint& c) {
  const uint P = args.T * args.k;
  if (tile >= tile_starts[args.E]) {
    e = args.E;
    r0 = offsets[args.E] + (tile - tile_starts[args.E]) * tm;
  } else {
    uint lo = 0, hi = args.E;  // tile_starts[lo] <= tile < tile_starts[hi]
    while (hi - lo > 1) {
      const uint mid = (lo + hi) / 2;
      if (tile_starts[mid] <= tile) {
        lo = mid;
      } else {
        hi = mid;
      }
    }
    e = lo;
    r0 = offsets[e] + (tile - tile_starts[e]) * tm;
    c = min(tm, offsets[e + 1] - r0);
    return;
  }
  c = r0 < P ? min(tm, P - r0) : 0u;
}

// First element of the partial row of (pair, slice): partial[(pair * nslices + slice) * D].
inline size_t moe_partial_row(constant MoeMlpArgs& args, uint pair, uint slice) {
  return (size_t(pair) * args.nslices + slice) * args.D;
}

// The sum over a pair's slices at output d, in slice order: the one summation order of both
// combines (in-kernel and moe_mlp_combine), which is what makes them bitwise equal.
template <typename P>
inline float moe_slice_sum(P row, uint ns, uint D, uint d) {
  float acc = row[d];
  for (uint s = 1; s < ns; ++s) {
    acc += row[size_t(s) * D + d];
  }
  return acc;
}

inline float moe_silu_mul(float g, float u) {
  return g / (1.0f + precise::exp(-g)) * u;
}

// ---------------------------------------------------------------------------------------
// Decode and small batches: TM pairs, activations [TM][D] (as T) in `stage`, h [TM][fs]
// in `hs`; a simdgroup per hidden unit, lanes across K; a thread per output row for down.
template <typename T, int TM>
struct MoeSimdMath {
  static constexpr uint tm() { return TM; }

  static void gate_up(thread const MoeMlpCtx<T>& c, constant MoeMlpArgs& args,
                      threadgroup float* stage, threadgroup float* hs) {
    threadgroup T* xs = (threadgroup T*)stage;
    const uint D = args.D;
    for (uint t = 0; t < c.c; ++t) {
      device const T* xr = c.x + size_t(c.pairs[c.r0 + t] / args.k) * D;
      for (uint d = c.tid; d < D; d += c.nthreads) {
        xs[t * D + d] = xr[d];
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint nsg = c.nthreads / 32;
    float v[MOE_CHUNK + 2];  // 64 codes, then the current scale and bias
    for (uint f = c.sg; f < c.fs; f += nsg) {
      float g_acc[TM], u_acc[TM];
      for (int t = 0; t < TM; ++t) {
        g_acc[t] = 0.0f;
        u_acc[t] = 0.0f;
      }
      for (uint k0 = c.lane * MOE_CHUNK; k0 < D; k0 += 32 * MOE_CHUNK) {
        const uint n = min(MOE_CHUNK, D - k0);  // D is a multiple of 32
        moe_decode_chunk(c.gp, args.gate, c.gf, c.e, c.f0 + f, k0, n, v);
        for (int t = 0; t < TM; ++t) {
          if (uint(t) < c.c) {
            for (uint j = 0; j < n; ++j) {
              g_acc[t] = fma(v[j], float(xs[t * D + k0 + j]), g_acc[t]);
            }
          }
        }
        moe_decode_chunk(c.upp, args.up, c.uf, c.e, c.f0 + f, k0, n, v);
        for (int t = 0; t < TM; ++t) {
          if (uint(t) < c.c) {
            for (uint j = 0; j < n; ++j) {
              u_acc[t] = fma(v[j], float(xs[t * D + k0 + j]), u_acc[t]);
            }
          }
        }
      }
      for (int t = 0; t < TM; ++t) {
        const float g = simd_sum(g_acc[t]);
        const float u = simd_sum(u_acc[t]);
        if (c.lane == 0 && uint(t) < c.c) {
          hs[t * args.fs + f] = moe_silu_mul(g, u);
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Output row d takes the slice's fs columns of down (one group-aligned run of codes).
  static void down(thread const MoeMlpCtx<T>& c, constant MoeMlpArgs& args,
                   threadgroup float* stage, threadgroup float* hs,
                   MOE_COHERENT device float* partial) {
    const uint D = args.D;
    float v[MOE_CHUNK + 2];
    for (uint d = c.tid; d < D; d += c.nthreads) {
      float acc[TM];
      for (int t = 0; t < TM; ++t) {
        acc[t] = 0.0f;
      }
      for (uint j0 = 0; j0 < c.fs; j0 += MOE_CHUNK) {
        const uint n = min(MOE_CHUNK, c.fs - j0);  // fs is a multiple of 32
        moe_decode_chunk(c.dp, args.down, c.df, c.e, d, c.f0 + j0, n, v);
        for (int t = 0; t < TM; ++t) {
          if (uint(t) < c.c) {
            for (uint j = 0; j < n; ++j) {
              acc[t] = fma(v[j], hs[t * args.fs + j0 + j], acc[t]);
            }
          }
        }
      }
      for (uint t = 0; t < c.c; ++t) {
        const uint pair = c.pairs[c.r0 + t];
        partial[moe_partial_row(args, pair, c.slice) + d] = c.route_w[pair] * acc[t];
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// Grouped batches: 32 pairs, 128 threads (4 simdgroups, each a 16 x 16 block of a 32 x 32
// output), simdgroup_matrix 8x8 fragments, K in steps of 32 codes decoded into threadgroup
// memory. hs: h [32][fs = 128] (16 KiB, fp32); stage (12 KiB): gate/up passes of 32 hidden
// units use xs [32 pairs][32 k] | wg [32 k][32 f] | wu [32 k][32 f]; down steps of 32 output
// columns use wd [32 k][32 n] | os [32][32].
constant constexpr uint MMA_TM = 32;
constant constexpr uint MMA_FS = 128;  // hidden units per slice (MoeMlpArgs::fs on this path)
constant constexpr uint MMA_B = 32;    // the 32 x 32 blocks

// Codes [k0, k0 + 32) of row n of expert e, written K-major: dst[j * stride] (zeros when
// the row does not exist).
inline void moe_decode_kmajor(thread const MoeProj& p, constant MoeWeightArgs& a, MoeFmt f,
                              uint e, uint n, bool valid, uint k0, threadgroup float* dst,
                              uint stride) {
  float v[MOE_CHUNK + 2];
  if (valid) {
    moe_decode_chunk(p, a, f, e, n, k0, MOE_HALF, v);
  } else {
    for (uint j = 0; j < MOE_HALF; ++j) {
      v[j] = 0.0f;
    }
  }
  for (uint j = 0; j < MOE_HALF; ++j) {
    dst[j * stride] = v[j];
  }
}

template <typename T>
struct MoeMmaMath {
  static constexpr uint tm() { return MMA_TM; }

  static void gate_up(thread const MoeMlpCtx<T>& c, constant MoeMlpArgs& args,
                      threadgroup float* stage, threadgroup float* hs) {
    threadgroup float* xs = stage;
    threadgroup float* wg = stage + MMA_B * MMA_B;
    threadgroup float* wu = wg + MMA_B * MMA_B;
    const uint sm = (c.sg / 2) * 16, sn = (c.sg % 2) * 16;  // this simdgroup's block
    // Thread t < 32 decodes gate row f0 + nb + t, thread 64 + t up row f0 + nb + t.
    const bool decoder = c.tid % 64 < MMA_B;
    const bool is_up = c.tid >= 64;
    const uint fn = c.tid % MMA_B;
    for (uint nb = 0; nb < c.fs; nb += MMA_B) {
      simdgroup_float8x8 ag[2][2], au[2][2];
      for (uint i = 0; i < 2; ++i) {
        for (uint j = 0; j < 2; ++j) {
          ag[i][j] = simdgroup_float8x8(0.0f);
          au[i][j] = simdgroup_float8x8(0.0f);
        }
      }
      for (uint k0 = 0; k0 < args.D; k0 += MOE_HALF) {
        for (uint i = c.tid; i < MMA_TM * MOE_HALF; i += c.nthreads) {
          const uint r = i / MOE_HALF, kk = i % MOE_HALF;
          xs[i] = r < c.c ? float(c.x[size_t(c.pairs[c.r0 + r] / args.k) * args.D + k0 + kk])
                          : 0.0f;
        }
        if (decoder) {
          moe_decode_kmajor(is_up ? c.upp : c.gp, is_up ? args.up : args.gate,
                            is_up ? c.uf : c.gf, c.e, c.f0 + nb + fn, nb + fn < c.fs, k0,
                            (is_up ? wu : wg) + fn, MMA_B);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint kk = 0; kk < MOE_HALF; kk += 8) {
          simdgroup_float8x8 a[2], bg[2], bu[2];
          for (uint i = 0; i < 2; ++i) {
            simdgroup_load(a[i], xs + (sm + 8 * i) * MOE_HALF + kk, MOE_HALF);
            simdgroup_load(bg[i], wg + kk * MMA_B + sn + 8 * i, MMA_B);
            simdgroup_load(bu[i], wu + kk * MMA_B + sn + 8 * i, MMA_B);
          }
          for (uint i = 0; i < 2; ++i) {
            for (uint j = 0; j < 2; ++j) {
              simdgroup_multiply_accumulate(ag[i][j], a[i], bg[j], ag[i][j]);
              simdgroup_multiply_accumulate(au[i][j], a[i], bu[j], au[i][j]);
            }
          }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      // gate and up blocks [32][32] through wg / wu, then h = silu(gate) * up into hs.
      for (uint i = 0; i < 2; ++i) {
        for (uint j = 0; j < 2; ++j) {
          simdgroup_store(ag[i][j], wg + (sm + 8 * i) * MMA_B + sn + 8 * j, MMA_B);
          simdgroup_store(au[i][j], wu + (sm + 8 * i) * MMA_B + sn + 8 * j, MMA_B);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      for (uint i = c.tid; i < MMA_TM * MMA_B; i += c.nthreads) {
        const uint r = i / MMA_B, n = i % MMA_B;
        hs[r * MMA_FS + nb + n] = moe_silu_mul(wg[i], wu[i]);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }

  static void down(thread const MoeMlpCtx<T>& c, constant MoeMlpArgs& args,
                   threadgroup float* stage, threadgroup float* hs,
                   MOE_COHERENT device float* partial) {
    threadgroup float* wd = stage;                 // [32 k][32 n]
    threadgroup float* os = stage + MMA_B * MMA_B;  // [32][32]
    const uint sm = (c.sg / 2) * 16, sn = (c.sg % 2) * 16;
    for (uint n0 = 0; n0 < args.D; n0 += MMA_B) {
      simdgroup_float8x8 acc[2][2];
      for (uint i = 0; i < 2; ++i) {
        for (uint j = 0; j < 2; ++j) {
          acc[i][j] = simdgroup_float8x8(0.0f);
        }
      }
      for (uint j0 = 0; j0 < c.fs; j0 += MMA_B) {
        if (c.tid < MMA_B) {
          moe_decode_kmajor(c.dp, args.down, c.df, c.e, n0 + c.tid, n0 + c.tid < args.D,
                            c.f0 + j0, wd + c.tid, MMA_B);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint kk = 0; kk < MMA_B; kk += 8) {
          simdgroup_float8x8 a[2], b[2];
          for (uint i = 0; i < 2; ++i) {
            simdgroup_load(a[i], hs + (sm + 8 * i) * MMA_FS + j0 + kk, MMA_FS);
            simdgroup_load(b[i], wd + kk * MMA_B + sn + 8 * i, MMA_B);
          }
          for (uint i = 0; i < 2; ++i) {
            for (uint j = 0; j < 2; ++j) {
              simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
            }
          }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
      }
      for (uint i = 0; i < 2; ++i) {
        for (uint j = 0; j < 2; ++j) {
          simdgroup_store(acc[i][j], os + (sm + 8 * i) * MMA_B + sn + 8 * j, MMA_B);
        }
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
      // (the next step's decoders write wd, which every simdgroup finished reading before
      // the barrier above; os is rewritten only after the next step's barriers)
      for (uint i = c.tid; i < MMA_TM * MMA_B; i += c.nthreads) {
        const uint r = i / MMA_B, n = i % MMA_B;
        if (r < c.c && n0 + n < args.D) {
          const uint pair = c.pairs[c.r0 + r];
          partial[moe_partial_row(args, pair, c.slice) + n0 + n] =
              c.route_w[pair] * os[i];
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
#if MOE_HAS_DEVICE_FENCE
// Step 3: called by every thread after the threadgroup's partial rows are written.
// counters: [P] per pair (slices in), then [T] per token (pairs in); zeroed by the bucketing.
template <typename T>
inline void moe_mlp_combine_tail(thread const MoeMlpCtx<T>& c, constant MoeMlpArgs& args,
                                 MOE_COHERENT device float* partial,
                                 device atomic_uint* counters, device T* y,
                                 threadgroup uint* done_pair, threadgroup uint* done_token) {
  const uint D = args.D, ns = args.nslices, P = args.T * args.k;
  MOE_DEVICE_FENCE();  // every thread: its partial stores happen before the count
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  if (c.tid < c.c) {
    const uint pair = c.pairs[c.r0 + c.tid];
    MOE_DEVICE_FENCE();  // release: the threadgroup's rows (ordered before by the barrier)
    const uint old = atomic_fetch_add_explicit(&counters[pair], 1u, memory_order_relaxed);
    MOE_DEVICE_FENCE();  // acquire: the rows of the threadgroups counted before
    done_pair[c.tid] = old + 1 == ns ? pair : MOE_NO_PAIR;
  }
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  MOE_DEVICE_FENCE();  // every thread: the counted rows of other threadgroups before reading
  // Pairs whose every slice is in: slice 0's row becomes the sum over slices, in order.
  if (ns > 1) {
    for (uint t = 0; t < c.c; ++t) {
      const uint pair = done_pair[t];
      if (pair == MOE_NO_PAIR) {
        continue;
      }
      MOE_COHERENT device float* row = partial + moe_partial_row(args, pair, 0);
      for (uint d = c.tid; d < D; d += c.nthreads) {
        row[d] = moe_slice_sum(row, ns, D, d);
      }
    }
  }
  MOE_DEVICE_FENCE();
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  if (c.tid < c.c) {
    const uint pair = done_pair[c.tid];
    uint token = MOE_NO_PAIR;
    if (pair != MOE_NO_PAIR) {
      MOE_DEVICE_FENCE();
      const uint old =
          atomic_fetch_add_explicit(&counters[P + pair / args.k], 1u, memory_order_relaxed);
      MOE_DEVICE_FENCE();
      token = old + 1 == args.k ? pair / args.k : MOE_NO_PAIR;
    }
    done_token[c.tid] = token;
  }
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  MOE_DEVICE_FENCE();
  // Tokens whose k pairs are in: y = sum over slots, in slot order.
  for (uint t = 0; t < c.c; ++t) {
    const uint token = done_token[t];
    if (token == MOE_NO_PAIR) {
      continue;
    }
    for (uint d = c.tid; d < D; d += c.nthreads) {
      float acc = 0.0f;
      for (uint j = 0; j < args.k; ++j) {
        acc += partial[moe_partial_row(args, token * args.k + j, 0) + d];
      }
      y[size_t(token) * D + d] = T(acc);
    }
  }
}
#endif

template <typename T, typename Math>
[[kernel]] void moe_mlp(
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
    MOE_COHERENT device float* partial [[buffer(14)]],
    constant MoeMlpArgs& args [[buffer(15)]],
    device atomic_uint* counters [[buffer(17)]],
    device const uint8_t* gate_su [[buffer(18)]],
    device const uint8_t* gate_sv [[buffer(19)]],
    device const uint8_t* up_su [[buffer(20)]],
    device const uint8_t* up_sv [[buffer(21)]],
    device const uint8_t* down_su [[buffer(22)]],
    device const uint8_t* down_sv [[buffer(23)]],
    device T* y [[buffer(24)]],
    threadgroup float* stage [[threadgroup(0)]],
    threadgroup float* hs [[threadgroup(1)]],
    uint2 tg [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint2 tpt [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
#if MOE_HAS_DEVICE_FENCE
  threadgroup uint done_pair[MOE_MAX_TM];
  threadgroup uint done_token[MOE_MAX_TM];
#endif
  MoeMlpCtx<T> c;
  moe_find_tile(tile_starts, offsets, args, tg.x, Math::tm(), c.e, c.r0, c.c);
  if (c.c == 0) {
    return;  // the whole threadgroup (a clamped empty grid)
  }
  c.x = x;
  c.route_w = route_w;
  c.pairs = pairs;
  c.gp = MoeProj{gate_w, gate_s, gate_b, gate_su, gate_sv};
  c.upp = MoeProj{up_w, up_s, up_b, up_su, up_sv};
  c.dp = MoeProj{down_w, down_s, down_b, down_su, down_sv};
  c.gf = moe_fmt(args.gate, MOE_FC_GATE_MODE, MOE_FC_GATE_BITS);
  c.uf = moe_fmt(args.up, MOE_FC_UP_MODE, MOE_FC_UP_BITS);
  c.df = moe_fmt(args.down, MOE_FC_DOWN_MODE, MOE_FC_DOWN_BITS);
  c.slice = tg.y;
  c.f0 = tg.y * args.fs;
  c.fs = min(args.fs, args.F - c.f0);
  c.tid = tid;
  c.nthreads = tpt.x;
  c.sg = sg;
  c.lane = lane;

  if (c.e < args.E) {
    Math::gate_up(c, args, stage, hs);
    Math::down(c, args, stage, hs, partial);
  } else {
    // Out-of-range ids (dropped by the bucketing, counted in dispatch[3]): no contribution.
    for (uint t = 0; t < c.c; ++t) {
      const uint pair = pairs[c.r0 + t];
      for (uint d = tid; d < args.D; d += c.nthreads) {
        partial[moe_partial_row(args, pair, c.slice) + d] = 0.0f;
      }
    }
  }
#if MOE_HAS_DEVICE_FENCE
  if (args.combine != 0) {
    moe_mlp_combine_tail(c, args, partial, counters, y, done_pair, done_token);
  }
#endif
}

#if MOE_HAS_DEVICE_FENCE
// Never dispatched: the host looks this name up in the metallib to learn whether the MLP
// kernels were compiled with the in-kernel combine (the metallib's language version follows
// the SDK and the deployment target, which only the metallib itself records).
[[kernel]] void moe_mlp_device_fence(device uint* out [[buffer(0)]],
                                     uint i [[thread_position_in_grid]]) {
  out[i] = 1u;
}
#endif

// y[t][d] = sum over slots j (in order) of the sum over slices s (in order) of the partials:
// the combine as its own dispatch, when the device has no device-scope fence (Metal < 3.2).
template <typename T>
[[kernel]] void moe_mlp_combine(
    device const float* partial [[buffer(0)]],
    device T* y [[buffer(1)]],
    constant MoeMlpArgs& args [[buffer(2)]],
    uint gid [[thread_position_in_grid]]) {
  const uint D = args.D, ns = args.nslices;
  if (gid >= args.T * D) {
    return;
  }
  const uint t = gid / D, d = gid % D;
  float acc = 0.0f;
  for (uint j = 0; j < args.k; ++j) {
    acc += moe_slice_sum(partial + moe_partial_row(args, t * args.k + j, 0), ns, D, d);
  }
  y[gid] = T(acc);
}

#define MOE_INSTANTIATE_MLP(name, T, ...)                                                      \
  template [[host_name(name)]] [[kernel]] void moe_mlp<T, __VA_ARGS__>(                              \
      device const T* x [[buffer(0)]], device const float* route_w [[buffer(1)]],           \
      device const uint* pairs [[buffer(2)]], device const uint* offsets [[buffer(3)]],     \
      device const uint* tile_starts [[buffer(4)]], device const uint8_t* gate_w [[buffer(5)]], \
      device const uint8_t* gate_s [[buffer(6)]], device const uint8_t* gate_b [[buffer(7)]], \
      device const uint8_t* up_w [[buffer(8)]], device const uint8_t* up_s [[buffer(9)]],   \
      device const uint8_t* up_b [[buffer(10)]], device const uint8_t* down_w [[buffer(11)]], \
      device const uint8_t* down_s [[buffer(12)]], device const uint8_t* down_b [[buffer(13)]], \
      MOE_COHERENT device float* partial [[buffer(14)]],                                    \
      constant MoeMlpArgs& args [[buffer(15)]], device atomic_uint* counters [[buffer(17)]], \
      device const uint8_t* gate_su [[buffer(18)]], device const uint8_t* gate_sv [[buffer(19)]], \
      device const uint8_t* up_su [[buffer(20)]], device const uint8_t* up_sv [[buffer(21)]], \
      device const uint8_t* down_su [[buffer(22)]], device const uint8_t* down_sv [[buffer(23)]], \
      device T* y [[buffer(24)]], threadgroup float* stage [[threadgroup(0)]],              \
      threadgroup float* hs [[threadgroup(1)]], uint2 tg [[threadgroup_position_in_grid]],  \
      uint tid [[thread_index_in_threadgroup]], uint2 tpt [[threads_per_threadgroup]],      \
      uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]);

#define MOE_INSTANTIATE_TYPE(tname, T)                                                        \
  MOE_INSTANTIATE_MLP("moe_mlp_" #tname "_tm1", T, MoeSimdMath<T, 1>)                         \
  MOE_INSTANTIATE_MLP("moe_mlp_" #tname "_tm2", T, MoeSimdMath<T, 2>)                         \
  MOE_INSTANTIATE_MLP("moe_mlp_" #tname "_tm4", T, MoeSimdMath<T, 4>)                         \
  MOE_INSTANTIATE_MLP("moe_mlp_" #tname "_tm8", T, MoeSimdMath<T, 8>)                         \
  MOE_INSTANTIATE_MLP("moe_mlp_" #tname "_mma", T, MoeMmaMath<T>)                             \
  template [[host_name("moe_mlp_combine_" #tname)]] [[kernel]] void moe_mlp_combine<T>(       \
      device const float* partial [[buffer(0)]], device T* y [[buffer(1)]],                  \
      constant MoeMlpArgs& args [[buffer(2)]], uint gid [[thread_position_in_grid]]);

MOE_INSTANTIATE_TYPE(float32, float)
MOE_INSTANTIATE_TYPE(float16, half)
MOE_INSTANTIATE_TYPE(bfloat16, bfloat)
