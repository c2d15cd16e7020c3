// CUDA kernels of mlx_moe (router, bucketing, dequantize, fused expert MLP). Format math
// comes from kernels/common/ (the one definition shared with the CPU and Metal backends).
// Host dispatch: mlx_moe/csrc/cuda/cuda_ops.cu. Design notes: docs/DESIGN.md, "CUDA backend".
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/affine.h"
#include "common/defines.h"
#include "common/fp4.h"
#include "common/moe_args.h"
#include "common/trellis.h"

namespace mlx_moe::cuda {

// ------------------------------------------------------------------------------ helpers

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(double v) { return float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// x / d by a shift where d is a power of two (the group sizes MLX uses): sh = pow2_shift(d),
// computed once per block; div_shift(x, d, sh) = x / d.
__device__ __forceinline__ uint32_t pow2_shift(uint32_t d) {
  return (d & (d - 1u)) == 0u ? uint32_t(__ffs(int(d)) - 1) : 32u;
}
__device__ __forceinline__ uint32_t div_shift(uint32_t x, uint32_t d, uint32_t sh) {
  return sh < 32u ? x >> sh : x / d;
}

// Programmatic dependent launch (host: launch_pdl in cuda_util.h, a chain of kernels each the
// programmatic dependent of the one before). pdl_trigger: this block lets the dependent grid
// start (once every block of this grid has triggered or exited); pdl_wait: returns once the
// grid this one depends on has completed, its writes visible. Both are no-ops in a grid
// launched without such a dependency, and below sm_90.
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Expert id of flat position i, widened; -1 when it is negative.
__device__ __forceinline__ int64_t load_id(const void* ids, int id_kind, int64_t i) {
  switch (id_kind) {
    case 0: return int64_t(static_cast<const uint32_t*>(ids)[i]);
    case 1: return int64_t(static_cast<const int32_t*>(ids)[i]);
    default: return static_cast<const int64_t*>(ids)[i];
  }
}

// Whether a loaded id names one of the E experts (others are dropped: they add nothing).
__device__ __forceinline__ bool valid_id(int64_t id, uint32_t E) { return id >= 0 && id < int64_t(E); }

// Scale / bias dtype codes (MoeWeightArgs::scale_kind): 0 f32, 1 f16, 2 bf16, 3 E8M0.
__device__ __forceinline__ float load_scale(const void* p, uint32_t kind, int64_t i) {
  switch (kind) {
    case 0: return static_cast<const float*>(p)[i];
    case 1: return __half2float(static_cast<const __half*>(p)[i]);
    case 2: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return moe_e8m0_scale(static_cast<const uint8_t*>(p)[i]);
  }
}

// Bytes of one scale / bias value of that kind.
__host__ __device__ inline uint32_t scale_elem_bytes(uint32_t kind) {
  return kind == 0u ? 4u : kind == 3u ? 1u : 2u;
}

// Exact float of a small unsigned code (q < 2^23): one OR, one add.
__device__ __forceinline__ float code_to_float(uint32_t q) {
  return __uint_as_float(0x4B000000u | q) - 8388608.f;
}

// One projection as the kernels see it. Units of 32 codes: every group size is a multiple
// of 32, so a unit has one scale (and bias), and a unit of `bits`-bit codes is exactly
// `bits` packed words (32 * bits bits).
struct WDesc {
  const uint32_t* w;
  const void* scales;
  const void* biases;  // null for mxfp4
  uint32_t N, K;
  uint32_t row_words;  // K * bits / 32
  uint32_t units;      // K / 32
  uint32_t groups;     // K / group_size
  uint32_t gs_units;   // group_size / 32
  uint32_t bits;
  uint32_t mode;        // 0 affine, 1 mxfp4, 2 trellis
  uint32_t scale_kind;  // see load_scale
  uint32_t fp4_quarter;
  // trellis (mode 2): w holds the 16x16 tiles; biases is unused; value =
  // ((grid[idx] * scales[e, k / group_size, n]) * su[e, k]) * sv[e, n] (common/trellis.h)
  const void* grid;
  const void* su;
  const void* sv;
  uint32_t group_size;
  uint32_t grid_kind, su_kind, sv_kind;  // load_scale kinds
  uint32_t grid_per_expert, has_su, has_sv;
};

// Codes of unit u of row n of matrix m, decoded to floats that are exact small values
// (affine: the integer code; mxfp4: the E2M1 value), plus the unit's scale and bias:
// value_j = s * q[j] + b.
template <int BITS>
__device__ __forceinline__ void unpack_unit(const uint32_t* words, float* q) {
  uint32_t w[BITS];
#pragma unroll
  for (int i = 0; i < BITS; ++i) w[i] = words[i];
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const uint32_t bit = uint32_t(j * BITS);
    const uint32_t idx = bit >> 5;
    const uint32_t hi = w[(idx + 1 < uint32_t(BITS)) ? idx + 1 : idx];
    q[j] = code_to_float(moe_affine_code64(w[idx], hi, bit & 31u, uint32_t(BITS)));
  }
}

// 32 E2M1 codes (4 words, element 0 in the low nibble) to their exact values. The default
// decoder works by bit placement: e (2 bits) and m land in a binary32's low exponent bits
// and top mantissa bit, and that float times 2^126 is exactly moe_fp4_e2m1(c) (e >= 1:
// 2^(e-1) * (1 + m/2); e == 0: the subnormal m * 2^-127, scaled exactly), sign from bit 3:
// two integer ops and a multiply instead of common/fp4.h's branches (bitwise the same
// values; the dequantize tests compare with the CPU). The opt-in quarter decoder keeps
// the shared definition.
__device__ __forceinline__ void unpack_fp4(const uint32_t* ww, float* q, uint32_t quarter) {
  if (!quarter) {
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const uint32_t c = (ww[j >> 3] >> ((j & 7) * 4)) & 0xfu;
      q[j] = __uint_as_float(((c & 7u) << 22) | ((c & 8u) << 28)) * 0x1p126f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < 32; ++j) q[j] = moe_fp4_e2m1_quarter_subnormal((ww[j >> 3] >> ((j & 7) * 4)) & 0xfu);
  }
}

__device__ __forceinline__ void decode_unit(const WDesc& d, int64_t m, uint32_t n, uint32_t u,
                                            float* q, float& s, float& b) {
  const int64_t row = m * int64_t(d.N) + n;
  const uint32_t* words = d.w + row * d.row_words + int64_t(u) * d.bits;
  const int64_t g = row * d.groups + u / d.gs_units;
  s = load_scale(d.scales, d.scale_kind, g);
  if (d.mode == 1u) {
    b = 0.f;
    const uint4 v = *reinterpret_cast<const uint4*>(words);
    const uint32_t ww[4] = {v.x, v.y, v.z, v.w};
    unpack_fp4(ww, q, d.fp4_quarter);
    return;
  }
  b = load_scale(d.biases, d.scale_kind, g);
  switch (d.bits) {
    case 2: unpack_unit<2>(words, q); break;
    case 3: unpack_unit<3>(words, q); break;
    case 4: {
      const uint4 v = *reinterpret_cast<const uint4*>(words);
      const uint32_t ww[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < 32; ++j) q[j] = code_to_float((ww[j >> 3] >> ((j & 7) * 4)) & 0xfu);
      break;
    }
    case 5: unpack_unit<5>(words, q); break;
    case 6: unpack_unit<6>(words, q); break;
    default: unpack_unit<8>(words, q); break;
  }
}

// Trellis unit u of row n: its 32 codes are the column runs of n in tiles (2u, n/16) and
// (2u+1, n/16), 2*BITS bytes each, LSB first; concatenated they are one bit stream like an
// affine unit's (BITS words). A run starts at an even byte (tiles are 4-byte aligned), so it
// is read as BITS 16-bit loads, and every index is a compile-time constant: raw stays in
// registers (a byte-indexed copy with a run-time length would put the caller's whole raw
// array in local memory, for every format).
template <int BITS>
__device__ __forceinline__ void load_trellis_runs(const WDesc& d, int64_t m, uint32_t n, uint32_t u,
                                                  uint32_t* raw) {
  const uint8_t* base = reinterpret_cast<const uint8_t*>(d.w);
  uint32_t hw[2 * BITS];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const uint16_t* run = reinterpret_cast<const uint16_t*>(
        base + moe_trellis_tile_offset(uint32_t(m), 2u * u + uint32_t(h), n >> 4, d.K, d.N, uint32_t(BITS)) +
        (n & 15u) * uint32_t(2 * BITS));
#pragma unroll
    for (int i = 0; i < BITS; ++i) hw[h * BITS + i] = run[i];
  }
#pragma unroll
  for (int i = 0; i < BITS; ++i) raw[i] = hw[2 * i] | (hw[2 * i + 1] << 16);
}

// Two-phase form of decode_unit, so that a lane can issue the loads of several units
// before it decodes any: load_unit fetches the packed words (16-byte loads for 4-bit and
// mxfp4, two for 8-bit), scale and bias; unpack_raw turns them into exact values.
__device__ __forceinline__ void load_unit(const WDesc& d, int64_t m, uint32_t n, uint32_t u,
                                          uint32_t* raw, float& s, float& b) {
  if (d.mode == 2u) {
    switch (d.bits) {
      case 2: load_trellis_runs<2>(d, m, n, u, raw); break;
      case 3: load_trellis_runs<3>(d, m, n, u, raw); break;
      case 4: load_trellis_runs<4>(d, m, n, u, raw); break;
      case 5: load_trellis_runs<5>(d, m, n, u, raw); break;
      case 6: load_trellis_runs<6>(d, m, n, u, raw); break;
      case 7: load_trellis_runs<7>(d, m, n, u, raw); break;
      default: load_trellis_runs<8>(d, m, n, u, raw); break;
    }
    s = d.has_sv ? load_scale(d.sv, d.sv_kind, int64_t(moe_trellis_sv_index(uint32_t(m), n, d.N))) : 1.f;
    b = 0.f;
    return;
  }
  const int64_t row = m * int64_t(d.N) + n;
  const uint32_t* words = d.w + row * d.row_words + int64_t(u) * d.bits;
  const int64_t g = row * d.groups + u / d.gs_units;
  s = load_scale(d.scales, d.scale_kind, g);
  b = d.mode == 1u ? 0.f : load_scale(d.biases, d.scale_kind, g);
  if (d.bits == 4u) {
    const uint4 v = *reinterpret_cast<const uint4*>(words);
    raw[0] = v.x; raw[1] = v.y; raw[2] = v.z; raw[3] = v.w;
  } else if (d.bits == 8u) {
    const uint4 v = *reinterpret_cast<const uint4*>(words);
    const uint4 w2 = *reinterpret_cast<const uint4*>(words + 4);
    raw[0] = v.x; raw[1] = v.y; raw[2] = v.z; raw[3] = v.w;
    raw[4] = w2.x; raw[5] = w2.y; raw[6] = w2.z; raw[7] = w2.w;
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if (i < int(d.bits)) raw[i] = words[i];
  }
}

template <int BITS>
__device__ __forceinline__ void unpack_raw_bits(const uint32_t* w, float* q) {
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const uint32_t bit = uint32_t(j * BITS);
    const uint32_t idx = bit >> 5;
    const uint32_t hi = w[(idx + 1 < uint32_t(BITS)) ? idx + 1 : idx];
    q[j] = code_to_float(moe_affine_code64(w[idx], hi, bit & 31u, uint32_t(BITS)));
  }
}

template <int BITS>
__device__ __forceinline__ void trellis_levels(const WDesc& d, const uint32_t* w, float* q,
                                               int64_t m, uint32_t n, uint32_t u) {
  const uint32_t gbase = moe_trellis_grid_index(uint32_t(m), 0u, uint32_t(BITS), d.grid_per_expert);
  // group_size is a multiple of 16: each 16-run of the unit has one scale.
  float sc2[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    sc2[h] = load_scale(d.scales, d.scale_kind,
                        int64_t(moe_trellis_scale_index(uint32_t(m), (u * 32u + 16u * h) / d.group_size,
                                                        n, d.groups, d.N)));
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const uint32_t bit = uint32_t(j * BITS);
    const uint32_t idx = bit >> 5;
    const uint32_t hi = w[(idx + 1 < uint32_t(BITS)) ? idx + 1 : idx];
    const uint32_t code = moe_affine_code64(w[idx], hi, bit & 31u, uint32_t(BITS));
    const uint32_t k = u * 32u + uint32_t(j);
    const float level = load_scale(d.grid, d.grid_kind, gbase + code);
    const float sc = sc2[j >> 4];
    const float su = d.has_su ? load_scale(d.su, d.su_kind, int64_t(moe_trellis_su_index(uint32_t(m), k, d.K)))
                              : 1.f;
    q[j] = (level * sc) * su;  // the value without sv, which load_unit returns as the scale
  }
}

// Decoded values of a unit loaded by load_unit (m, n, u: where it came from; trellis needs
// them for its codebook, per-k scales and su).
__device__ __forceinline__ void unpack_raw(const WDesc& d, const uint32_t* w, float* q,
                                           int64_t m = 0, uint32_t n = 0, uint32_t u = 0) {
  if (d.mode == 2u) {
    switch (d.bits) {
      case 2: trellis_levels<2>(d, w, q, m, n, u); break;
      case 3: trellis_levels<3>(d, w, q, m, n, u); break;
      case 4: trellis_levels<4>(d, w, q, m, n, u); break;
      case 5: trellis_levels<5>(d, w, q, m, n, u); break;
      case 6: trellis_levels<6>(d, w, q, m, n, u); break;
      case 7: trellis_levels<7>(d, w, q, m, n, u); break;
      default: trellis_levels<8>(d, w, q, m, n, u); break;
    }
    return;
  }
  if (d.mode == 1u) {
    unpack_fp4(w, q, d.fp4_quarter);
    return;
  }
  switch (d.bits) {
    case 2: unpack_raw_bits<2>(w, q); break;
    case 3: unpack_raw_bits<3>(w, q); break;
    case 4: unpack_raw_bits<4>(w, q); break;
    case 5: unpack_raw_bits<5>(w, q); break;
    case 6: unpack_raw_bits<6>(w, q); break;
    default: unpack_raw_bits<8>(w, q); break;
  }
}

// 8 consecutive 16-bit floats of type T (one 16-byte load) as fp32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4 w, float* v) {
  const uint32_t ww[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int h = 0; h < 4; ++h) {
    T lo, hi;
    const uint16_t a = uint16_t(ww[h] & 0xffffu), b = uint16_t(ww[h] >> 16);
    memcpy(&lo, &a, 2);
    memcpy(&hi, &b, 2);
    v[2 * h] = to_f(lo);
    v[2 * h + 1] = to_f(hi);
  }
}

// 32 consecutive activations (16-byte aligned: rows and units are multiples of 32) as fp32.
// CG: through L2 only (data written by other blocks of the same launch).
template <typename T, bool CG = false>
__device__ __forceinline__ void load32(const T* src, float* v) {
  if constexpr (sizeof(T) == 4) {
    const float4* p = reinterpret_cast<const float4*>(src);
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const float4 f = CG ? __ldcg(p + q) : p[q];
      v[4 * q] = f.x; v[4 * q + 1] = f.y; v[4 * q + 2] = f.z; v[4 * q + 3] = f.w;
    }
  } else {
    const uint4* p = reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int q = 0; q < 4; ++q) unpack8<T>(p[q], v + 8 * q);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// g * sigmoid(g) in fp32 by the hardware exponential and reciprocal (ex2.approx, rcp.approx:
// 5 instructions; expf and an IEEE division took ~19 with a slow-path branch, 13% of the
// grouped gate/up kernel's stall samples at 4096 tokens sat in that epilogue). Relative error
// ~1e-6 for |g| < 16 (the argument's rounding times |g| log2 e), far under the XT rounding of
// the result; g < -87 (1 + e^-g beyond 2^126) gives -0 where the exact value is below 1e-36.
__device__ __forceinline__ float silu(float g) { return __fdividef(g, 1.f + __expf(-g)); }

// ------------------------------------------------------------------------------ router
// One warp per row. Top-k by k rounds of a warp arg-max under the strict order
// (p descending, id ascending), each round restricted to entries after the previous pick:
// the same sequence as the CPU's insertion with strict '>' (ties to the smaller id).
// The warp's row maximum from the lanes' partial maxima m (and whether any lane saw a NaN);
// for a degenerate row (a NaN, or every logit -inf) writes the CPU's answer (ids 0..k-1,
// weights NaN or 0) and returns true.
__device__ __forceinline__ bool route_row_degenerate(float& m, bool nan, uint32_t k, uint32_t* id,
                                                     float* w, uint32_t lane) {
  nan = __any_sync(0xffffffffu, nan);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (!(nan || m == -INFINITY)) return false;
  const float v = nan ? __uint_as_float(0x7fc00000u) : 0.f;
  for (uint32_t j = lane; j < k; j += 32u) {
    id[j] = j;
    w[j] = v;
  }
  return true;
}

// One row (logits l, E entries) by one warp: ids and weights of its k slots to id[] / w[]
// (global or shared memory). route_kernel and the one-launch MLP kernel both call this, so
// their routing is bitwise the same.
template <typename T>
__device__ __forceinline__ void route_row(const T* __restrict__ l, uint32_t E, uint32_t k,
                                          uint32_t normalize, uint32_t* id, float* w,
                                          uint32_t lane) {
  float m = -INFINITY;
  bool nan = false;
  for (uint32_t i = lane; i < E; i += 32u) {
    const float v = to_f(l[i]);
    nan |= isnan(v);
    m = fmaxf(m, v);
  }
  if (route_row_degenerate(m, nan, k, id, w, lane)) return;
  const bool inf = (m == INFINITY);
  // Unnormalised probabilities, cached in registers (rows of up to 256 experts).
  constexpr int CACHE = 8;
  const bool cached = E <= 32u * CACHE;
  float pc[CACHE];
  auto raw_prob = [&](uint32_t i) -> float {
    const float v = to_f(l[i]);
    return inf ? (v == m ? 1.f : 0.f) : expf(v - m);
  };
  float s = 0.f;
  if (cached) {
#pragma unroll
    for (int c = 0; c < CACHE; ++c) {
      const uint32_t i = lane + 32u * c;
      pc[c] = i < E ? raw_prob(i) : 0.f;
      s += pc[c];
    }
  } else {
    for (uint32_t i = lane; i < E; i += 32u) s += raw_prob(i);
  }
  s = warp_sum(s);
  if (cached) {
#pragma unroll
    for (int c = 0; c < CACHE; ++c) pc[c] = pc[c] / s;
  }
  float prev_v = INFINITY, my_v = 0.f;
  uint32_t prev_i = 0xffffffffu, my_i = 0u;
  bool first = true;
  float total = 0.f;
  for (uint32_t j = 0; j < k; ++j) {
    float bv = -1.f;
    uint32_t bi = 0xffffffffu;
    auto consider = [&](uint32_t i, float v) {
      const bool after = first || v < prev_v || (v == prev_v && i > prev_i);
      if (after && (v > bv || (v == bv && i < bi))) {
        bv = v;
        bi = i;
      }
    };
    if (cached) {
#pragma unroll
      for (int c = 0; c < CACHE; ++c) {
        const uint32_t i = lane + 32u * c;
        if (i < E) consider(i, pc[c]);
      }
    } else {
      for (uint32_t i = lane; i < E; i += 32u) consider(i, raw_prob(i) / s);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    prev_v = bv;
    prev_i = bi;
    first = false;
    if (k <= 32u) {  // lane j keeps slot j; written once below
      if (lane == j) {
        my_v = bv;
        my_i = bi;
      }
    } else if (lane == 0) {
      id[j] = bi;
      w[j] = bv;
    }
    total += bv;  // the CPU's normalising sum: slots in order from 0
  }
  const bool norm = normalize && total > 0.f;
  if (k <= 32u) {
    if (lane < k) {
      id[lane] = my_i;
      w[lane] = norm ? my_v / total : my_v;
    }
  } else if (norm && lane == 0) {
    for (uint32_t j = 0; j < k; ++j) w[j] = w[j] / total;
  }
}

template <typename T>
__global__ void route_kernel(const T* __restrict__ logits, uint32_t rows, uint32_t E, uint32_t k,
                             uint32_t normalize, uint32_t* __restrict__ ids,
                             float* __restrict__ wout) {
  pdl_trigger();  // (the first kernel of a decode chain)
  const uint32_t lane = threadIdx.x & 31u;
  const uint32_t row = blockIdx.x * (blockDim.x / 32u) + threadIdx.x / 32u;
  if (row >= rows) return;
  route_row(logits + int64_t(row) * E, E, k, normalize, ids + int64_t(row) * k,
            wout + int64_t(row) * k, lane);
}

// Routing of one row by a whole block (blockDim.x >= E), the same values and order as
// route_row, so the same ids and weights bitwise: warp 0 computes the row maximum, the
// probabilities and their sum exactly as route_row does (lane-strided partial sums, then
// warp_sum), then each expert is ranked under (p descending, id ascending) against all E
// probabilities in shared memory -- the experts of rank < k are route_row's picks in its
// order, without its k dependent rounds of warp arg-max -- and the slots are normalised by
// their sum taken in slot order. The rank of expert e counts the experts before it with
// q >= p and those after it with q > p; the row is padded with -1 (below every probability)
// to a multiple of 8, read four entries per load, and split over two adjacent threads per
// expert when the block has 2 E threads. Needs E <= ROUTE_BLOCK_MAX_E and k <= 32. Shared
// scratch: s_p[ROUTE_BLOCK_MAX_E] (16-byte aligned: the callers' __align__(16) arrays, or
// dec_route's 1024 bytes into aligned dynamic shared memory), s_w[32], s_id[32], s_state.
// Every thread of the block must call it.
constexpr uint32_t ROUTE_BLOCK_MAX_E = 256;
template <typename T>
__device__ __forceinline__ void route_row_block(const T* __restrict__ l, uint32_t E, uint32_t k,
                                                uint32_t normalize, uint32_t* id, float* w,
                                                float* s_p, float* s_w, uint32_t* s_id,
                                                uint32_t* s_state) {
  const uint32_t tid = threadIdx.x, lane = tid & 31u;
  const uint32_t EP = (E + 7u) & ~7u;  // (the padded row)
  if (tid < 32u) {
    float m = -INFINITY;
    bool nan = false;
    constexpr int CACHE = 8;
    float v[CACHE];
#pragma unroll
    for (int c = 0; c < CACHE; ++c) {
      const uint32_t i = lane + 32u * c;
      v[c] = i < E ? to_f(l[i]) : 0.f;
      if (i < E) {
        nan |= isnan(v[c]);
        m = fmaxf(m, v[c]);
      }
    }
    if (route_row_degenerate(m, nan, k, id, w, lane)) {
      if (lane == 0) *s_state = 1u;  // done
    } else {
      const bool inf = (m == INFINITY);
      float pc[CACHE];
      float s = 0.f;
#pragma unroll
      for (int c = 0; c < CACHE; ++c) {
        const uint32_t i = lane + 32u * c;
        pc[c] = i < E ? (inf ? (v[c] == m ? 1.f : 0.f) : expf(v[c] - m)) : 0.f;
        s += pc[c];
      }
      s = warp_sum(s);
#pragma unroll
      for (int c = 0; c < CACHE; ++c) {
        const uint32_t i = lane + 32u * c;
        if (i < E) s_p[i] = pc[c] / s;
        else if (i < EP) s_p[i] = -1.f;  // (the padding: never counted)
      }
      if (lane == 0) *s_state = 0u;
    }
  }
  __syncthreads();
  if (*s_state == 0u) {
    const bool two = blockDim.x >= 2u * E;  // (uniform)
    const uint32_t e = two ? tid >> 1 : tid, h = two ? tid & 1u : 0u;
    const uint32_t len = two ? EP / 2u : EP, j0 = h * len;  // (multiples of 4)
    uint32_t rank = 0;
    float p = 0.f;
    if (e < E) {
      p = s_p[e];
      // entry j (probability q) ranks above e
      auto above = [&](uint32_t j, float q) { return (j < e ? q >= p : q > p) ? 1u : 0u; };
      const float4* q4 = reinterpret_cast<const float4*>(s_p + j0);
#pragma unroll 4
      for (uint32_t m = 0; m < len / 4u; ++m) {
        const float4 q = q4[m];
        const uint32_t j = j0 + 4u * m;
        rank += above(j, q.x) + above(j + 1u, q.y) + above(j + 2u, q.z) + above(j + 3u, q.w);
      }
    }
    if (two) rank += __shfl_xor_sync(0xffffffffu, rank, 1);  // (the pair: adjacent lanes)
    if (e < E && h == 0u && rank < k) {
      s_id[rank] = e;
      s_w[rank] = p;
    }
    __syncthreads();
    if (tid < k) {
      float v = s_w[tid];
      if (normalize) {
        float total = 0.f;  // route_row's sum: slots in order from 0
        for (uint32_t j = 0; j < k; ++j) total += s_w[j];
        if (total > 0.f) v = v / total;
      }
      id[tid] = s_id[tid];
      w[tid] = v;
    }
  }
  __syncthreads();
}

// One block per row (few rows: the warp kernel's k dependent arg-max rounds are its latency).
template <typename T>
__global__ void __launch_bounds__(256)
    route_block_kernel(const T* __restrict__ logits, uint32_t E, uint32_t k, uint32_t normalize,
                       uint32_t* __restrict__ ids, float* __restrict__ wout) {
  __shared__ __align__(16) float s_p[ROUTE_BLOCK_MAX_E];
  __shared__ float s_w[32];
  __shared__ uint32_t s_id[32];
  __shared__ uint32_t s_state;
  pdl_trigger();  // (the first kernel of a decode chain)
  const uint32_t row = blockIdx.x;
  route_row_block(logits + int64_t(row) * E, E, k, normalize, ids + int64_t(row) * k,
                  wout + int64_t(row) * k, s_p, s_w, s_id, &s_state);
}

// ------------------------------------------------------------------------------ bucketing
// Stable counting sort of P expert ids in three kernels (no atomics decide any order):
//  1. count:   block b (one warp) counts its chunk of BUCKET_CHUNK pairs per expert.
//  2. scan:    per expert, exclusive prefix over blocks; offsets; tiles; active list.
//  3. scatter: block b places its pairs at offsets[e] + base[b][e] + rank, where the rank
//              inside a step of 32 comes from __match_any_sync (lanes in ascending order).
// Out-of-range ids are skipped and counted as dropped.
constexpr uint32_t BUCKET_CHUNK = 256;

// First row, relative to the expert's first, of tile j of an expert with c pairs on tiles of up
// to `tile` pairs (ceil(c / tile) tiles: the count the grids are sized from). q = tile: the plain
// split (tiles of `tile` pairs, the last one short). q a divisor of tile (64: the wgmma kernels'
// rows per warpgroup): the ceil(c / q) steps of q pairs are spread evenly over the tiles, the
// first ones taking one step more; 256 pairs on tiles of 192 become 128 + 128 instead of
// 192 + 64 (on tiles of 64 or 128 with q = 64 this is the plain split). The grouped kernels take
// a tile's end from the next entry of the table (gg_tile).
__device__ __forceinline__ uint32_t tile_first_row(uint32_t c, uint32_t tile, uint32_t q, uint32_t j) {
  const uint32_t u = (c + q - 1u) / q, t = (c + tile - 1u) / tile, base = u / t;
  return q * (j * base + min(j, u - base * t));
}

// Expert of pair i as a bucketing key: 0xffffffff for pairs past P and out-of-range ids
// (dropped), so lanes with equal keys can be matched.
__device__ __forceinline__ uint32_t bucket_key(const void* ids, int id_kind, uint32_t P,
                                               uint32_t E, uint32_t i) {
  if (i >= P) return 0xffffffffu;
  const int64_t e = load_id(ids, id_kind, i);
  return valid_id(e, E) ? uint32_t(e) : 0xffffffffu;
}

static __global__ void bucket_count_kernel(const void* __restrict__ ids, int id_kind, uint32_t P,
                                    uint32_t E, uint32_t* __restrict__ block_counts) {
  extern __shared__ uint32_t hist[];
  const uint32_t lane = threadIdx.x;
  for (uint32_t e = lane; e < E; e += 32u) hist[e] = 0u;
  __syncwarp();
  const uint32_t p0 = blockIdx.x * BUCKET_CHUNK;
  for (uint32_t s = 0; s < BUCKET_CHUNK; s += 32u) {
    const uint32_t i = p0 + s + lane;
    const uint32_t key = bucket_key(ids, id_kind, P, E, i);
    const bool ok = key != 0xffffffffu;
    const uint32_t mask = __match_any_sync(0xffffffffu, key);
    if (ok && (__ffs(mask) - 1) == int(lane)) hist[key] += __popc(mask);
    __syncwarp();
  }
  for (uint32_t e = lane; e < E; e += 32u) block_counts[int64_t(blockIdx.x) * E + e] = hist[e];
}

// One block. block_counts becomes per-(block, expert) bases. Writes counts/offsets and,
// when asked: dispatch (public op), the list of non-empty experts and the GEMM tile table.
static __global__ void bucket_scan_kernel(uint32_t* __restrict__ block_counts, uint32_t nblocks,
                                   uint32_t E, uint32_t P, uint32_t tile, uint32_t tile_q,
                                   uint32_t* __restrict__ counts, uint32_t* __restrict__ offsets,
                                   uint32_t* __restrict__ pairs, uint32_t* __restrict__ dispatch,
                                   uint32_t* __restrict__ active, uint32_t* __restrict__ tiles,
                                   uint32_t* __restrict__ meta) {
  extern __shared__ uint32_t sm[];  // [E] counts, [E] tile prefix, [E] active prefix
  uint32_t* cnt = sm;
  uint32_t* tpre = sm + E;
  uint32_t* apre = sm + 2 * E;
  for (uint32_t e = threadIdx.x; e < E; e += blockDim.x) {
    // Expert e's column, 16 loads in flight at a time (one load after the other costs an L2
    // round trip per bucketing block: 128 at 4096 tokens of top-8).
    uint32_t run = 0;
    for (uint32_t b0 = 0; b0 < nblocks; b0 += 16u) {
      uint32_t c[16];
#pragma unroll
      for (uint32_t j = 0; j < 16u; ++j)
        c[j] = b0 + j < nblocks ? block_counts[int64_t(b0 + j) * E + e] : 0u;
#pragma unroll
      for (uint32_t j = 0; j < 16u; ++j) {
        if (b0 + j < nblocks) block_counts[int64_t(b0 + j) * E + e] = run;
        run += c[j];
      }
    }
    cnt[e] = run;
    counts[e] = run;
  }
  __syncthreads();
  // Exclusive prefix sums over the experts of the counts, tiles and non-empty flags: warp 0,
  // 32 experts at a time (shuffle scans).
  if (threadIdx.x < 32u) {
    const uint32_t lane = threadIdx.x;
    uint32_t off = 0, nt = 0, na = 0;
    for (uint32_t base = 0; base < E; base += 32u) {
      const uint32_t e = base + lane;
      const uint32_t c = e < E ? cnt[e] : 0u;
      const uint32_t t = c / tile + (c % tile ? 1u : 0u), a = c ? 1u : 0u;
      uint32_t sc = c, st = t, sa = a;
#pragma unroll
      for (uint32_t o = 1; o < 32u; o <<= 1) {
        const uint32_t xc = __shfl_up_sync(0xffffffffu, sc, o);
        const uint32_t xt = __shfl_up_sync(0xffffffffu, st, o);
        const uint32_t xa = __shfl_up_sync(0xffffffffu, sa, o);
        if (lane >= o) {
          sc += xc;
          st += xt;
          sa += xa;
        }
      }
      if (e < E) {
        offsets[e] = off + sc - c;
        tpre[e] = nt + st - t;
        apre[e] = na + sa - a;
      }
      off += __shfl_sync(0xffffffffu, sc, 31);
      nt += __shfl_sync(0xffffffffu, st, 31);
      na += __shfl_sync(0xffffffffu, sa, 31);
    }
    if (lane == 0) {
      offsets[E] = off;
      if (dispatch) {
        dispatch[0] = nt > 1u ? nt : 1u;  // the tiles (at least one)
        dispatch[1] = 1u;
        dispatch[2] = 1u;
        dispatch[3] = P - off;
      }
      if (meta) {
        meta[0] = na;
        meta[1] = nt;
        meta[2] = P - off;
      }
      cnt[0] = off;  // reuse: total kept
    }
  }
  __syncthreads();
  const uint32_t total = cnt[0];
  __syncthreads();
  // Pair slots past the kept ones (dropped ids) are marked.
  for (uint32_t i = total + threadIdx.x; i < P; i += blockDim.x) pairs[i] = 0xffffffffu;
  if (active || tiles) {
    for (uint32_t e = threadIdx.x; e < E; e += blockDim.x) {
      const uint32_t c = offsets[e + 1] - offsets[e];
      if (c == 0) continue;
      if (active) active[apre[e]] = e;
      if (tiles) {
        for (uint32_t j = 0, t = tpre[e], nt = (c + tile - 1u) / tile; j < nt; ++j, ++t) {
          tiles[2 * t] = e;
          tiles[2 * t + 1] = offsets[e] + tile_first_row(c, tile, tile_q, j);
        }
      }
    }
  }
}

static __global__ void bucket_scatter_kernel(const void* __restrict__ ids, int id_kind, uint32_t P,
                                      uint32_t E, const uint32_t* __restrict__ block_base,
                                      const uint32_t* __restrict__ offsets,
                                      uint32_t* __restrict__ pairs) {
  extern __shared__ uint32_t cur[];
  const uint32_t lane = threadIdx.x;
  for (uint32_t e = lane; e < E; e += 32u)
    cur[e] = offsets[e] + block_base[int64_t(blockIdx.x) * E + e];
  __syncwarp();
  const uint32_t p0 = blockIdx.x * BUCKET_CHUNK;
  for (uint32_t s = 0; s < BUCKET_CHUNK; s += 32u) {
    const uint32_t i = p0 + s + lane;
    const uint32_t key = bucket_key(ids, id_kind, P, E, i);
    const bool ok = key != 0xffffffffu;
    const uint32_t mask = __match_any_sync(0xffffffffu, key);
    const uint32_t rank = __popc(mask & ((1u << lane) - 1u));
    uint32_t base = 0;
    if (ok) base = cur[key];
    __syncwarp();
    if (ok) {
      pairs[base + rank] = i;
      if ((__ffs(mask) - 1) == int(lane)) cur[key] = base + __popc(mask);
    }
    __syncwarp();
  }
}

// Small-P bucketing in one kernel (one block of 32 warps), the same stable counting sort as
// the three kernels above with the chunks as warps of one block: warp w counts its chunk of
// pairs per expert (__match_any_sync, one histogram row per warp: no atomics), the block
// turns the rows into per-warp bases and scans the experts (offsets, GEMM tile prefix,
// active prefix), then each warp scatters its chunk in order. Bitwise the same results.
// Only the warps whose chunk holds pairs (nw: 4 at P = 128) have a histogram row to clear and
// to scan, and a warp keeps its first step's keys for the scatter (one load of the ids less
// up to 1024 pairs, where that step is its whole chunk).
// Shared memory: [32][E] histogram rows, [E] offsets. Needs E <= 1024.
constexpr uint32_t BS_WARPS = 32;

// Inclusive block scan of up to three values per thread (1024 threads).
__device__ __forceinline__ void block_scan3(uint32_t (&v)[3], uint32_t (*wtot)[3]) {
  const uint32_t lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      const uint32_t n = __shfl_up_sync(0xffffffffu, v[c], o);
      if (lane >= uint32_t(o)) v[c] += n;
    }
  }
  if (lane == 31u) {
#pragma unroll
    for (int c = 0; c < 3; ++c) wtot[warp][c] = v[c];
  }
  __syncthreads();
  if (warp == 0) {
    uint32_t t[3];
#pragma unroll
    for (int c = 0; c < 3; ++c) t[c] = wtot[lane][c];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        const uint32_t n = __shfl_up_sync(0xffffffffu, t[c], o);
        if (lane >= uint32_t(o)) t[c] += n;
      }
    }
#pragma unroll
    for (int c = 0; c < 3; ++c) wtot[lane][c] = t[c];  // inclusive over warps
  }
  __syncthreads();
  if (warp > 0) {
#pragma unroll
    for (int c = 0; c < 3; ++c) v[c] += wtot[warp - 1][c];
  }
}

static __global__ void __launch_bounds__(BS_WARPS * 32)
    bucket_small_kernel(const void* __restrict__ ids, int id_kind, uint32_t P, uint32_t E,
                        uint32_t tile, uint32_t tile_q, uint32_t* __restrict__ counts,
                        uint32_t* __restrict__ offsets, uint32_t* __restrict__ pairs,
                        uint32_t* __restrict__ dispatch, uint32_t* __restrict__ active,
                        uint32_t* __restrict__ tiles, uint32_t* __restrict__ meta) {
  // In a decode chain (launch_pdl): the router's ids are read after pdl_wait (and the next
  // kernel started only then: see mlp_mma_dec_kernel).
  pdl_wait();
  pdl_trigger();
  extern __shared__ uint32_t bsm[];
  uint32_t* hist = bsm;                       // [BS_WARPS][E]
  uint32_t* offs = bsm + BS_WARPS * E;        // [E]
  __shared__ uint32_t wtot[BS_WARPS][3];
  __shared__ uint32_t ptile_tot[BS_WARPS];
  const uint32_t lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  // chunk per warp: ceil(P / 32) rounded up to whole steps of 32; nw warps have pairs
  const uint32_t chunk = ((P + BS_WARPS - 1u) / BS_WARPS + 31u) & ~31u;
  const uint32_t nw = chunk ? min(BS_WARPS, (P + chunk - 1u) / chunk) : 0u;
  for (uint32_t i = threadIdx.x; i < nw * E; i += blockDim.x) hist[i] = 0u;
  __syncthreads();
  const uint32_t p0 = warp * chunk;
  uint32_t* row = hist + warp * E;
  uint32_t key0 = 0xffffffffu;  // (the first step's key)
  for (uint32_t s = 0; s < chunk && p0 + s < P; s += 32u) {
    const uint32_t i = p0 + s + lane;
    const uint32_t key = bucket_key(ids, id_kind, P, E, i);
    if (s == 0u) key0 = key;
    const uint32_t mask = __match_any_sync(0xffffffffu, key);
    if (key != 0xffffffffu && (__ffs(mask) - 1) == int(lane)) row[key] += __popc(mask);
    __syncwarp();
  }
  __syncthreads();
  // Per expert: bases of the warps (in pair order) and the expert's count.
  const uint32_t e = threadIdx.x;
  uint32_t c = 0;
  if (e < E) {
    for (uint32_t w = 0; w < nw; ++w) {
      const uint32_t v = hist[w * E + e];
      hist[w * E + e] = c;
      c += v;
    }
  }
  uint32_t v[3] = {c, (c + tile - 1u) / tile, c ? 1u : 0u};
  block_scan3(v, wtot);
  // dispatch's tile count (public op): sum of ceil(c / tile)
  uint32_t pt = (dispatch && e < E) ? c / tile + (c % tile ? 1u : 0u) : 0u;
  if (dispatch) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) pt += __shfl_xor_sync(0xffffffffu, pt, o);
    if (lane == 0) ptile_tot[warp] = pt;
  }
  const uint32_t total = wtot[BS_WARPS - 1][0];
  if (e < E) {
    const uint32_t off = v[0] - c, tpre = v[1] - ((c + tile - 1u) / tile), apre = v[2] - (c ? 1u : 0u);
    offs[e] = off;
    counts[e] = c;
    offsets[e] = off;
    if (c) {
      if (active) active[apre] = e;
      if (tiles) {
        for (uint32_t j = 0, t = tpre, nt = (c + tile - 1u) / tile; j < nt; ++j, ++t) {
          tiles[2 * t] = e;
          tiles[2 * t + 1] = off + tile_first_row(c, tile, tile_q, j);
        }
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    offsets[E] = total;
    if (dispatch) {
      uint32_t ptiles = 0;
      for (uint32_t w = 0; w < BS_WARPS; ++w) ptiles += ptile_tot[w];
      dispatch[0] = ptiles > 1u ? ptiles : 1u;
      dispatch[1] = 1u;
      dispatch[2] = 1u;
      dispatch[3] = P - total;
    }
    if (meta) {
      meta[0] = wtot[BS_WARPS - 1][2];
      meta[1] = wtot[BS_WARPS - 1][1];
      meta[2] = P - total;
    }
  }
  for (uint32_t i = total + threadIdx.x; i < P; i += blockDim.x) pairs[i] = 0xffffffffu;
  // Scatter: each warp walks its chunk again; its histogram row is now its cursor.
  for (uint32_t s = 0; s < chunk && p0 + s < P; s += 32u) {
    const uint32_t i = p0 + s + lane;
    const uint32_t key = s == 0u ? key0 : bucket_key(ids, id_kind, P, E, i);
    const bool ok = key != 0xffffffffu;
    const uint32_t mask = __match_any_sync(0xffffffffu, key);
    const uint32_t rank = __popc(mask & ((1u << lane) - 1u));
    uint32_t base = 0;
    if (ok) base = offs[key] + row[key];
    __syncwarp();
    if (ok) {
      pairs[base + rank] = i;
      if ((__ffs(mask) - 1) == int(lane)) row[key] += __popc(mask);
    }
    __syncwarp();
  }
}

// ------------------------------------------------------------------------------ layout
// Row-major copy of a strided input (transposed or broadcast views, slices): the primitives'
// CUDA evals read row-major inputs, and the op builders pass unevaluated inputs of CUDA
// streams without a Contiguous graph node, so the few inputs whose layout turns out strided
// at evaluation are copied here (elements of U = the dtype's size; strides in elements).
constexpr int STRIDED_MAX_DIMS = MOE_STRIDED_MAX_DIMS;
struct StridedDesc {
  int ndim;
  int64_t shape[STRIDED_MAX_DIMS];
  int64_t strides[STRIDED_MAX_DIMS];
};

template <typename U>
__global__ void strided_copy_kernel(const U* __restrict__ in, U* __restrict__ out, uint64_t n,
                                    StridedDesc d) {
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += uint64_t(gridDim.x) * blockDim.x) {
    uint64_t r = i;
    int64_t off = 0;
    for (int j = d.ndim - 1; j >= 0; --j) {
      const uint64_t dim = uint64_t(d.shape[j]);
      off += int64_t(r % dim) * d.strides[j];
      r /= dim;
    }
    out[i] = in[off];
  }
}

// ------------------------------------------------------------------------------ dequantize
// One thread per unit of 32 values of one row.
template <typename OutT>
__global__ void dequant_kernel(WDesc d, uint64_t total_units, uint32_t fp16_scales,
                               OutT* __restrict__ out) {
  const uint64_t t = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total_units) return;
  const uint64_t row = t / d.units;
  const uint32_t u = uint32_t(t % d.units);
  float q[32], s, b;
  decode_unit(d, 0, uint32_t(row), u, q, s, b);  // row indexes across matrices (N stride)
  if (fp16_scales) s = __half2float(__float2half_rn(s));
  OutT* o = out + row * d.K + uint64_t(u) * 32u;
#pragma unroll
  for (int j = 0; j < 32; ++j) {
    const float v = d.mode == 1u ? q[j] * s : fmaf(s, q[j], b);
    o[j] = from_f<OutT>(v);
  }
}

// Trellis: one thread per run of 16 codes (16 consecutive k of one output row n of matrix
// m), the value exactly as common/trellis.h defines it (bitwise equal to the CPU path).
template <typename OutT>
__global__ void dequant_trellis_kernel(WDesc d, uint64_t total_runs, OutT* __restrict__ out) {
  const uint64_t t = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= total_runs) return;
  const uint32_t TK = moe_trellis_tiles_k(d.K);
  const uint64_t row = t / TK;  // m * N + n
  const uint32_t kt = uint32_t(t % TK);
  const uint32_t m = uint32_t(row / d.N), n = uint32_t(row % d.N);
  const uint8_t* run = reinterpret_cast<const uint8_t*>(d.w) +
                       moe_trellis_tile_offset(m, kt, n >> 4, d.K, d.N, d.bits) +
                       (n & 15u) * moe_trellis_run_bytes(d.bits);
  const float sv = d.has_sv ? load_scale(d.sv, d.sv_kind, int64_t(moe_trellis_sv_index(m, n, d.N))) : 1.f;
  const uint32_t gbase = moe_trellis_grid_index(m, 0u, d.bits, d.grid_per_expert);
  OutT* o = out + row * d.K + uint64_t(kt) * 16u;
  for (uint32_t i = 0; i < 16u; ++i) {
    const uint32_t k = kt * 16u + i;
    const float level = load_scale(d.grid, d.grid_kind, gbase + moe_trellis_index_at(run, i, d.bits));
    const float sc = load_scale(d.scales, d.scale_kind,
                                int64_t(moe_trellis_scale_index(m, k / d.group_size, n, d.groups, d.N)));
    const float su = d.has_su ? load_scale(d.su, d.su_kind, int64_t(moe_trellis_su_index(m, k, d.K))) : 1.f;
    o[i] = from_f<OutT>(moe_trellis_value(level, sc, su, sv));
  }
}

// ------------------------------------------------------------------------------ fused MLP
struct MlpDesc {
  uint32_t T, k, D, F, E, P;
  WDesc gate, up, down;
  // Bit 0: the decode kernels load weights, which they read once per call, with L2
  // evict_first (weight_l2_policy), else with plain loads' evict_normal; bit 1: the grouped
  // wgmma kernel too (set where an expert's weights are read about once).
  uint32_t l2_ef;
};

// L2 policy of a kernel's weight loads (a bit of MlpDesc::l2_ef): evict_first, so that a
// layer's stream of weights read once does not push out of L2 what is read again
// (activations, H, the slots' outputs, routing and bucketing), or evict_normal (a plain
// load's).
__device__ __forceinline__ uint64_t weight_l2_policy(uint32_t ef) {
  uint64_t first, normal;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(first));
  asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(normal));
  return ef ? first : normal;
}

// -- decode variant: block = (non-empty expert j, slice of 16 output rows); 8 warps, two
// rows each. Each lane owns units lane, lane+32, ... of a row: the packed words are read
// once per block (16-byte loads for 4-bit and mxfp4), decoded in registers, and applied to
// up to MAXT of the expert's tokens, whose activations are staged as fp32 in shared memory
// (swizzled by 16-byte chunk so that the 32 lanes' float4 reads hit distinct banks) with
// their per-unit sums (the bias term: s * sum(q x) + b * sum(x)).
constexpr int DEC_WARPS = 8;
constexpr int DEC_MAXT = 8;
// Rows per warp: gate/up reads 2 rows of each of 2 weights, down 4 rows of one: either way
// a lane has 4 units in flight before it decodes.
template <bool GATEUP>
constexpr int dec_rows() { return GATEUP ? 2 : 4; }

__device__ __forceinline__ int swz(uint32_t u, uint32_t c) {  // float offset of chunk c of unit u
  return int(u * 32u + ((c + u) & 7u) * 4u);
}

// Decode-path extras (small T*k):
//  - direct: no bucketing; block x is pair p (its expert ids[p], its token p / k; H rows
//    are pairs). Used for few pairs, where bucketing's launches cost more than reading an
//    expert twice when two pairs share it.
//  - fused combine (down kernel, counters != null): every block of row slice y counts itself
//    done on counters[y] (zeroed by the gate/up kernel); the last block of the slice sums
//    y[t, n] = sum over slots j in order of Yp[t*k+j, n] (invalid slots skipped), i.e. what
//    combine_kernel computes, in the same order: which block does it depends on timing, the
//    sums do not.
struct DecExtra {
  const void* ids;
  int id_kind;
  uint32_t direct;
  uint32_t* counters;  // [gridDim.y of the down kernel], or null (separate combine)
  uint32_t ncounters;
  void* y;             // combine output
  uint32_t y_kind;     // 0 f32, 1 f16, 2 bf16
  // Direct tensor-core decode with the router folded into the gate/up kernel (logits !=
  // null): every block routes its pair's token with route_row_block (what route_block_kernel
  // computes, bitwise) and block (p, 0) writes pair p's id and weight for the down kernel.
  const void* logits;
  uint32_t logits_kind;  // 0 f32, 1 f16, 2 bf16
  uint32_t route_norm;
  uint32_t* route_ids;   // [P]
  float* route_w;        // [P]
};

// The block's expert and its range of bucketed positions [first, last); false: no work.
__device__ __forceinline__ bool dec_setup(const MlpDesc& md, const DecExtra& ex,
                                          const uint32_t* __restrict__ offsets,
                                          const uint32_t* __restrict__ active,
                                          const uint32_t* __restrict__ meta, uint32_t& e,
                                          uint32_t& first, uint32_t& last) {
  const uint32_t j = blockIdx.x;
  if (ex.direct) {
    if (j >= md.P) return false;
    const int64_t id = load_id(ex.ids, ex.id_kind, j);
    if (!valid_id(id, md.E)) return false;
    e = uint32_t(id);
    first = j;
    last = j + 1;
    return true;
  }
  if (j >= meta[0]) return false;  // grid sized for min(E, P) experts; the rest exit at once
  e = active[j];
  first = offsets[e];
  last = offsets[e + 1];
  return true;
}

// The direct path's dec_setup with the router folded in (DecExtra::logits): block x is pair
// x of token x / k; returns its expert (>= E: none). The row is first converted to fp32 in
// shared memory (exact), so that one routing copy serves every logits dtype with the same
// bits as route_block_kernel; not inlined, to keep the kernel's hot code compact. Scratch:
// DEC_ROUTE_SCRATCH bytes of the block's dynamic shared memory, free again on return (no
// static shared memory: it would cost some shapes a block per SM). Every thread of the
// block must call it (it syncs).
constexpr uint32_t DEC_ROUTE_SCRATCH = (2u * ROUTE_BLOCK_MAX_E + 3u * 32u + 1u) * 4u;
static __device__ __noinline__ uint32_t dec_route(const void* logits, uint32_t kind, uint32_t E,
                                                  uint32_t k, uint32_t norm, uint32_t* ids_out,
                                                  float* w_out, float* scratch) {
  float* r_l = scratch;
  float* r_p = r_l + ROUTE_BLOCK_MAX_E;
  float* r_sw = r_p + ROUTE_BLOCK_MAX_E;
  float* r_w = r_sw + 32;
  uint32_t* r_id = reinterpret_cast<uint32_t*>(r_w + 32);
  uint32_t* r_state = r_id + 32;
  const uint32_t j = blockIdx.x;
  const int64_t row = int64_t(j / k) * E;
  for (uint32_t i = threadIdx.x; i < E; i += blockDim.x) {
    r_l[i] = kind == 0u   ? static_cast<const float*>(logits)[row + i]
             : kind == 1u ? __half2float(static_cast<const __half*>(logits)[row + i])
                          : __bfloat162float(static_cast<const __nv_bfloat16*>(logits)[row + i]);
  }
  __syncthreads();
  route_row_block(static_cast<const float*>(r_l), E, k, norm, r_id, r_w, r_p, r_sw, r_id, r_state);
  const uint32_t id = r_id[j % k];
  if (blockIdx.y == 0 && threadIdx.x == 0) {
    ids_out[j] = id;
    w_out[j] = r_w[j % k];
  }
  __syncthreads();  // every thread has read the scratch before the caller reuses it
  return id;
}

__device__ __forceinline__ uint32_t dec_pair(const DecExtra& ex, const uint32_t* __restrict__ pairs,
                                             uint32_t i) {
  return ex.direct ? i : pairs[i];
}

// Unit u (32 values) of chunk row i as fp32 -- the token's activations for gate/up, the
// pair's hidden row for down -- and the unit's sum (the bias term's factor).
template <bool GATEUP, typename XT, bool CG = false>
__device__ __forceinline__ float dec_stage_unit(const MlpDesc& md, const DecExtra& ex,
                                                const XT* __restrict__ x,
                                                const float* H_in,
                                                const uint32_t* __restrict__ pairs, uint32_t i,
                                                uint32_t u, uint32_t Kd, float* v) {
  if (GATEUP) {
    load32(x + int64_t(dec_pair(ex, pairs, i) / md.k) * Kd + u * 32u, v);
  } else {
    load32<float, CG>(H_in + int64_t(i) * Kd + u * 32u, v);
  }
  float sum = 0.f;
#pragma unroll
  for (int q = 0; q < 32; ++q) sum += v[q];
  return sum;
}

__device__ __forceinline__ void store_out(void* y, uint32_t kind, int64_t i, float v) {
  switch (kind) {
    case 0: static_cast<float*>(y)[i] = v; break;
    case 1: static_cast<__half*>(y)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(y)[i] = __float2bfloat16_rn(v); break;
  }
}

__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}

// L2 prefetch of bytes [0, n) at p, 128-byte lines spread over the block's threads.
__device__ __forceinline__ void prefetch_range(const void* p, uint64_t n) {
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(127);
  const uintptr_t a1 = reinterpret_cast<uintptr_t>(p) + n;
  for (uintptr_t q = a0 + uintptr_t(threadIdx.x) * 128u; q < a1; q += uintptr_t(blockDim.x) * 128u)
    prefetch_l2(reinterpret_cast<const void*>(q));
}

// L2 prefetch of rows [n0, n0 + rows) of expert e of an affine / mxfp4 projection: codes,
// scales and biases (rows of one expert are contiguous in each).
__device__ __forceinline__ void prefetch_rows(const WDesc& d, uint32_t e, uint32_t n0,
                                              uint32_t rows) {
  const int64_t r0 = int64_t(e) * d.N + n0;
  prefetch_range(d.w + r0 * d.row_words, uint64_t(rows) * d.row_words * 4u);
  const uint32_t es = scale_elem_bytes(d.scale_kind);
  prefetch_range(static_cast<const unsigned char*>(d.scales) + r0 * d.groups * es,
                 uint64_t(rows) * d.groups * es);
  if (d.biases)
    prefetch_range(static_cast<const unsigned char*>(d.biases) + r0 * d.groups * es,
                   uint64_t(rows) * d.groups * es);
}

// Gate/up: block (0, 0) zeroes the down kernel's counters.
__device__ __forceinline__ void dec_zero_counters(const DecExtra& ex) {
  if (ex.counters && blockIdx.x == 0 && blockIdx.y == 0)
    for (uint32_t i = threadIdx.x; i < ex.ncounters; i += blockDim.x) ex.counters[i] = 0u;
}

// sum over the slots j < k with valid(j), in slot order, of Yp[(t*k + j) * D + n] (the
// combine's order), read through L2; the loads are issued 8 slots at a time, then summed.
template <typename Valid>
__device__ __forceinline__ float sum_slots(const float* Yp, uint32_t t, uint32_t k, uint32_t D,
                                           uint32_t n, Valid valid) {
  float acc = 0.f;
  bool any = false;
  for (uint32_t j0 = 0; j0 < k; j0 += 8u) {
    float v[8];
    bool ok[8];
#pragma unroll
    for (uint32_t jj = 0; jj < 8u; ++jj) {
      const uint32_t j = j0 + jj;
      ok[jj] = j < k && valid(j);
      v[jj] = ok[jj] ? __ldcg(Yp + (int64_t(t) * k + j) * D + n) : 0.f;
    }
#pragma unroll
    for (uint32_t jj = 0; jj < 8u; ++jj) {
      if (!ok[jj]) continue;
      acc = any ? acc + v[jj] : v[jj];
      any = true;
    }
  }
  return acc;
}

// Down: the block's part of Yp is written; the last block of row slice blockIdx.y combines
// rows [row0, row0 + rows) for every token.
__device__ __forceinline__ void dec_fused_combine(const MlpDesc& md, const DecExtra& ex,
                                                  const float* Yp, uint32_t row0, uint32_t rows,
                                                  uint32_t* s_flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const uint32_t old = atomicAdd(&ex.counters[blockIdx.y], 1u);
    *s_flag = (old == gridDim.x - 1u) ? 1u : 0u;
  }
  __syncthreads();
  if (!*s_flag) return;
  __threadfence();
  const uint32_t D = md.D, k = md.k;
  const uint32_t total = md.T * rows;
  for (uint32_t idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const uint32_t t = idx / rows, n = row0 + idx % rows;
    if (n >= D) continue;
    const float acc = sum_slots(Yp, t, k, D, n, [&](uint32_t j) {
      const int64_t e = load_id(ex.ids, ex.id_kind, int64_t(t) * k + j);
      return valid_id(e, md.E);
    });
    store_out(ex.y, ex.y_kind, int64_t(t) * D + n, acc);
  }
}

template <bool GATEUP, typename XT>
__global__ void __launch_bounds__(DEC_WARPS * 32, 2)
    mlp_decode_kernel(MlpDesc md, const XT* __restrict__ x, const float* __restrict__ H_in,
                      const uint32_t* __restrict__ pairs, const uint32_t* __restrict__ offsets,
                      const uint32_t* __restrict__ active, const uint32_t* __restrict__ meta,
                      const float* __restrict__ rw, uint32_t maxt, float* __restrict__ out,
                      DecExtra ex) {
  extern __shared__ float smem[];
  __shared__ uint32_t s_flag;
  if (GATEUP) dec_zero_counters(ex);
  uint32_t e = 0, first = 0, last = 0;
  const bool work = dec_setup(md, ex, offsets, active, meta, e, first, last);
  const WDesc& w0 = GATEUP ? md.gate : md.down;
  const uint32_t N = w0.N;
  const uint32_t Kd = w0.K;  // input width (D for gate/up, F for down)
  const uint32_t units = Kd / 32u;
  float* xs = smem;                                  // [maxt][Kd] swizzled
  float* xsum = smem + size_t(maxt) * Kd;            // [maxt][units]
  const uint32_t warp = threadIdx.x / 32u, lane = threadIdx.x & 31u;
  constexpr int DEC_ROWS = dec_rows<GATEUP>();
  const uint32_t n0 = blockIdx.y * (DEC_WARPS * DEC_ROWS) + warp * DEC_ROWS;
  for (uint32_t c0 = first; work && c0 < last; c0 += maxt) {
    const uint32_t nt = min(maxt, last - c0);
    __syncthreads();
    for (uint32_t task = threadIdx.x; task < nt * units; task += blockDim.x) {
      const uint32_t t = task / units, u = task % units;
      const uint32_t i = c0 + t;
      float v[32];
      const float sum = dec_stage_unit<GATEUP>(md, ex, x, H_in, pairs, i, u, Kd, v);
      float* dst = xs + size_t(t) * Kd;
#pragma unroll
      for (int c = 0; c < 8; ++c)
        *reinterpret_cast<float4*>(dst + swz(u, c)) =
            make_float4(v[4 * c], v[4 * c + 1], v[4 * c + 2], v[4 * c + 3]);
      xsum[t * units + u] = sum;
    }
    __syncthreads();
    constexpr int NP = GATEUP ? 2 : 1;
    float acc[NP][DEC_ROWS][DEC_MAXT];
#pragma unroll
    for (int p = 0; p < NP; ++p)
#pragma unroll
      for (int r = 0; r < DEC_ROWS; ++r)
#pragma unroll
        for (int t = 0; t < DEC_MAXT; ++t) acc[p][r][t] = 0.f;
    for (uint32_t u = lane; u < units; u += 32u) {
      uint32_t raw[NP][DEC_ROWS][8];
      float sc[NP][DEC_ROWS], bi[NP][DEC_ROWS];
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) {
          if (n0 + r < N) load_unit(wd, e, n0 + r, u, raw[p][r], sc[p][r], bi[p][r]);
        }
      }
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) {
          if (n0 + r >= N) continue;
          float q[32];
          unpack_raw(wd, raw[p][r], q, e, n0 + r, u);
          const float s = sc[p][r], b = bi[p][r];
#pragma unroll
          for (int t = 0; t < DEC_MAXT; ++t) {
            if (t >= int(nt)) break;
            const float* xt = xs + size_t(t) * Kd;
            float dot = 0.f;
#pragma unroll
            for (int c = 0; c < 8; ++c) {
              const float4 xv = *reinterpret_cast<const float4*>(xt + swz(u, c));
              dot = fmaf(q[4 * c], xv.x, dot);
              dot = fmaf(q[4 * c + 1], xv.y, dot);
              dot = fmaf(q[4 * c + 2], xv.z, dot);
              dot = fmaf(q[4 * c + 3], xv.w, dot);
            }
            acc[p][r][t] += s * dot + b * xsum[t * units + u];
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < DEC_MAXT; ++t) {
      if (t >= int(nt)) break;
#pragma unroll
      for (int p = 0; p < NP; ++p)
#pragma unroll
        for (int r = 0; r < DEC_ROWS; ++r) acc[p][r][t] = warp_sum(acc[p][r][t]);
    }
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < DEC_ROWS; ++r) {
        const uint32_t n = n0 + r;
        if (n >= N) continue;
#pragma unroll
        for (int t = 0; t < DEC_MAXT; ++t) {
          if (t >= int(nt)) break;
          const uint32_t i = c0 + t;
          if (GATEUP) {
            out[int64_t(i) * N + n] = silu(acc[0][r][t]) * acc[NP - 1][r][t];
          } else {
            const uint32_t pair = dec_pair(ex, pairs, i);
            out[int64_t(pair) * N + n] = rw[pair] * acc[0][r][t];
          }
        }
      }
    }
  }
  if (!GATEUP && ex.counters)
    dec_fused_combine(md, ex, out, blockIdx.y * (DEC_WARPS * DEC_ROWS), DEC_WARPS * DEC_ROWS,
                      &s_flag);
}

// -- grouped variant (many tokens): tensor cores, mma.sync m16n8k16 bf16 -> fp32.
// Tile = 64 bucketed pairs of one expert x 64 output rows; 4 warps of 32x32. The weights
// enter the MMA as their exact codes (integers, or E2M1 values: exact in bf16) and each unit
// of 32 codes is scaled afterwards in fp32: acc += s[n] * (A q)[m, n] + b[n] * sum_k A[m, k].
// Activations that are not bf16 are split A = hi + lo (two bf16), so the product keeps 16
// mantissa bits; bf16 activations are exact with one MMA.
constexpr int G_TM = 64, G_TN = 64, G_KC = 64, G_LD = G_KC + 8;

__device__ __forceinline__ void mma_bf16(float* c, const uint32_t* a, const uint32_t* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo_k, float hi_k) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo_k, hi_k);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <bool GATEUP, bool SPLIT, typename XT>
__global__ void __launch_bounds__(128, GATEUP ? 3 : 4)
    mlp_grouped_kernel(MlpDesc md, const XT* __restrict__ x, const float* __restrict__ H_in,
                       const uint32_t* __restrict__ pairs, const uint32_t* __restrict__ offsets,
                       const uint32_t* __restrict__ tiles, const uint32_t* __restrict__ meta,
                       const float* __restrict__ rw, float* __restrict__ out) {
  constexpr int NP = GATEUP ? 2 : 1;
  constexpr int NS = SPLIT ? 2 : 1;
  __shared__ __align__(16) __nv_bfloat16 As[NS][G_TM][G_LD];
  __shared__ __align__(16) __nv_bfloat16 Bs[NP][G_TN][G_LD];
  __shared__ float Ssc[NP][G_TN][2], Sbi[NP][G_TN][2], Asum[G_TM][2];
  const uint32_t tile = blockIdx.x;
  if (tile >= meta[1]) return;  // grid sized for the worst case; the rest exit at once
  const uint32_t e = tiles[2 * tile], row0 = tiles[2 * tile + 1];
  const uint32_t rows = min(uint32_t(G_TM), offsets[e + 1] - row0);
  const WDesc& w0 = GATEUP ? md.gate : md.down;
  const uint32_t N = w0.N, Kd = w0.K, units = Kd / 32u;
  const uint32_t nb = blockIdx.y * G_TN;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = (warp & 1) * 32, wn = (warp >> 1) * 32;
  const int gid = lane >> 2, t4 = lane & 3;

  // Loader roles: thread -> (row r, unit h) for A and (row n, unit h) for B.
  const int lr = tid >> 1, lh = tid & 1;
  const bool a_ok = uint32_t(lr) < rows;
  int64_t a_row = 0;
  if (a_ok) {
    const uint32_t i = row0 + lr;
    a_row = GATEUP ? int64_t(pairs[i] / md.k) : int64_t(i);
  }
  const bool b_ok = nb + lr < N;

  float acc[NP][2][4][4];
#pragma unroll
  for (int p = 0; p < NP; ++p)
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[p][a][b][c] = 0.f;

  for (uint32_t k0 = 0; k0 < Kd; k0 += G_KC) {
    const uint32_t u = k0 / 32u + lh;
    const bool u_ok = u < units;
    // ---- A: 32 activations -> bf16 hi (+ lo), and their exact sum.
    {
      float v[32];
      if (a_ok && u_ok) {
        if (GATEUP) {
          load32(x + a_row * Kd + u * 32u, v);
        } else {
          load32(H_in + a_row * Kd + u * 32u, v);
        }
      } else {
#pragma unroll
        for (int q = 0; q < 32; ++q) v[q] = 0.f;
      }
      float sum = 0.f;
#pragma unroll
      for (int q = 0; q < 32; q += 2) {
        sum += v[q] + v[q + 1];
        const __nv_bfloat162 hi = __floats2bfloat162_rn(v[q], v[q + 1]);
        *reinterpret_cast<__nv_bfloat162*>(&As[0][lr][lh * 32 + q]) = hi;
        if (SPLIT) {
          const float2 hf = __bfloat1622float2(hi);
          *reinterpret_cast<__nv_bfloat162*>(&As[NS - 1][lr][lh * 32 + q]) =
              __floats2bfloat162_rn(v[q] - hf.x, v[q + 1] - hf.y);
        }
      }
      Asum[lr][lh] = sum;
    }
    // ---- B: 32 codes of row nb + lr, exact in bf16, with the unit's scale and bias.
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
      float q[32], s = 0.f, b = 0.f;
      if (b_ok && u_ok) {
        decode_unit(wd, e, nb + lr, u, q, s, b);
      } else {
#pragma unroll
        for (int j = 0; j < 32; ++j) q[j] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < 32; j += 2)
        *reinterpret_cast<uint32_t*>(&Bs[p][lr][lh * 32 + j]) = pack_bf16(q[j], q[j + 1]);
      Ssc[p][lr][lh] = s;
      Sbi[p][lr][lh] = b;
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        float tmp[2][4][4];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c) tmp[a][b][c] = 0.f;
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          const int kk = h * 32 + ks * 16 + t4 * 2;
          uint32_t af[NS][2][4];
#pragma unroll
          for (int sp = 0; sp < NS; ++sp)
#pragma unroll
            for (int a = 0; a < 2; ++a) {
              const int r = wm + a * 16 + gid;
              af[sp][a][0] = *reinterpret_cast<const uint32_t*>(&As[sp][r][kk]);
              af[sp][a][1] = *reinterpret_cast<const uint32_t*>(&As[sp][r + 8][kk]);
              af[sp][a][2] = *reinterpret_cast<const uint32_t*>(&As[sp][r][kk + 8]);
              af[sp][a][3] = *reinterpret_cast<const uint32_t*>(&As[sp][r + 8][kk + 8]);
            }
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const int n = wn + b * 8 + gid;
            uint32_t bf[2];
            bf[0] = *reinterpret_cast<const uint32_t*>(&Bs[p][n][kk]);
            bf[1] = *reinterpret_cast<const uint32_t*>(&Bs[p][n][kk + 8]);
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
              for (int sp = 0; sp < NS; ++sp) mma_bf16(tmp[a][b], af[sp][a], bf);
          }
        }
#pragma unroll
        for (int a = 0; a < 2; ++a) {
          const float as0 = Asum[wm + a * 16 + gid][h], as1 = Asum[wm + a * 16 + gid + 8][h];
#pragma unroll
          for (int b = 0; b < 4; ++b) {
            const int n = wn + b * 8 + t4 * 2;
            const float s0 = Ssc[p][n][h], s1 = Ssc[p][n + 1][h];
            const float b0 = Sbi[p][n][h], b1 = Sbi[p][n + 1][h];
            acc[p][a][b][0] += s0 * tmp[a][b][0] + b0 * as0;
            acc[p][a][b][1] += s1 * tmp[a][b][1] + b1 * as0;
            acc[p][a][b][2] += s0 * tmp[a][b][2] + b0 * as1;
            acc[p][a][b][3] += s1 * tmp[a][b][3] + b1 * as1;
          }
        }
      }
    }
    __syncthreads();
  }
  // ---- epilogue
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const uint32_t r = wm + a * 16 + gid + hr * 8;
      if (r >= rows) continue;
      const uint32_t i = row0 + r;
      float scale = 1.f;
      int64_t orow;
      if (GATEUP) {
        orow = i;
      } else {
        const uint32_t pair = pairs[i];
        scale = rw[pair];
        orow = pair;
      }
#pragma unroll
      for (int b = 0; b < 4; ++b) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const uint32_t n = nb + wn + b * 8 + t4 * 2 + c;
          if (n >= N) continue;
          float v;
          if (GATEUP) {
            v = silu(acc[0][a][b][hr * 2 + c]) * acc[NP - 1][a][b][hr * 2 + c];
          } else {
            v = scale * acc[0][a][b][hr * 2 + c];
          }
          out[orow * N + n] = v;
        }
      }
    }
}

// -- tensor-core decode variant (affine 4-bit and mxfp4 projections, few tokens per expert).
// Block = MM_WARPS warps = (non-empty expert or pair, 16*MT output rows); every projection's
// rows of the block (all of K) are copied to shared memory with cp.async at the start (the
// whole block's weight bytes in flight at once; each warp copies its own slice of K in
// commit groups of MM_GRP units, scales and biases are the first group), and each warp takes
// its slice of K (split-K, summed in warp order at the end: deterministic), starting on its
// first units while later ones are in flight. Per unit of 32 codes and 16 rows, the
// codes enter mma.m16n8k16 (bf16 -> fp32) as exact bf16 values of 128 + q (a LOP3 places two
// nibbles in the mantissas of 128.0; mxfp4: 2v by a byte permute) against up to 8 tokens as
// the B operand, and the unit is scaled afterwards in fp32:
// acc += s * ((128 + q) . x) + (b - 128 s) * sum(x), sum(x) the staged operand's. Affine
// gate/up items scale once per group of two units. K is permuted inside each unit (the same
// way for the weights and the activations): thread (g, t) holds word t of its rows' unit (what
// ldmatrix gives), nibbles {2h, 2h+4} and {2h+1, 2h+5} form the k-pairs of MMA h, and the
// activations are staged in that order. Activations that are not bf16 (and the fp32 hidden
// layer) are split into bf16 hi + lo, two MMAs.
constexpr int MM_WARPS_GU = 8;  // gate/up blocks: 8 warps (measured ~10% faster than 4)
constexpr int MM_WARPS_DN = 4;  // down blocks (K = F is short: 8 warps were slower)
constexpr int MM_MAXT = 8;

struct MmLayout {
  uint32_t wstride, w_bytes, sc_off, raw_off, x_off, tstride, xs_off, red_off, total;
  uint32_t w1_off, cb_off, su_off;  // trellis (mm_layout_tr) only
};

// How a tensor-core decode item gets a projection's scales and biases into shared memory:
// 0 = loaded and converted to fp32 pairs by copy_scales (odd group counts, trellis);
// 1 = raw fp32, copied straight into the pairs (cp.async); 2 = raw f16 / bf16 copied as
// 4-byte words (an even number of groups per row) and converted to pairs in mm_compute;
// 3 (raw8: the kernels' RAW8 form) = mxfp4's raw E8M0 bytes copied as 4-byte words (groups
// per row a multiple of 4) and converted to pairs {scale / 2, 0} in mm_compute.
__host__ __device__ inline uint32_t mm_scale_copy(const WDesc& wd, bool raw8 = false) {
  if (wd.mode != 0u)
    return raw8 && wd.mode == 1u && wd.scale_kind == 3u && wd.groups % 4u == 0u ? 3u : 0u;
  if (wd.scale_kind == 0u) return 1u;
  return (wd.scale_kind == 1u || wd.scale_kind == 2u) && wd.groups % 2u == 0u ? 2u : 0u;
}

// Whether an item of the projection(s) copies raw 16-bit scales and biases (mm_scale_copy 2),
// which need their own bytes until mm_compute converts them.
template <bool GATEUP>
__host__ __device__ inline bool mm_raw16(const MlpDesc& md) {
  return GATEUP ? mm_scale_copy(md.gate) == 2u || mm_scale_copy(md.up) == 2u
                : mm_scale_copy(md.down) == 2u;
}

// Whether the RAW8 form applies to the projection(s): every one mxfp4 with raw E8M0 copies
// (mm_scale_copy 3), whose bytes ([NP][ROWS][G], one per value) precede the conversion. The
// form also skips the activations' unit sums (mxfp4 has no bias or code offset).
template <bool GATEUP>
__host__ __device__ inline bool mm_raw8(const MlpDesc& md) {
  return GATEUP ? mm_scale_copy(md.gate, true) == 3u && mm_scale_copy(md.up, true) == 3u
                : mm_scale_copy(md.down, true) == 3u;
}

// Shared-memory layout of mlp_mma_dec_kernel (host and device compute it the same way).
// raw16: scales / biases copied raw as 16-bit values (mm_raw16), which need their own bytes
// until they are converted. raw8: E8M0 scales copied raw (the RAW8 form, mm_raw8), one byte
// per value, in the split-K area where they fit (it is first written after the conversion:
// the layout then keeps copy_scales's size, which decides the blocks per SM).
__host__ __device__ inline MmLayout mm_layout(uint32_t units, uint32_t G, uint32_t maxt, int NP,
                                              int NS, int MT, int NW, bool raw16,
                                              bool raw8 = false) {
  MmLayout l;
  const uint32_t rows = 16u * MT, red_bytes = NW * NP * MT * 4u * 32u * 4u;
  const bool raw8_red = raw8 && NP * rows * G <= red_bytes;
  l.wstride = (units + ((units & 1u) ? 2u : 1u)) * 16u;  // an odd number of 16-byte slots
  l.w_bytes = NP * rows * l.wstride;
  l.sc_off = l.w_bytes;                                  // [NP][rows][G] float2 {s, b}
  l.raw_off = l.sc_off + NP * rows * G * 8u;             // [2][NP][rows][G] 16-bit (raw16)
  l.x_off = l.raw_off + (raw16 ? NP * rows * G * 4u : raw8 && !raw8_red ? NP * rows * G : 0u);
  l.tstride = units * 64u + 16u;                         // per token: [units][4] uint4
  l.xs_off = l.x_off + NS * maxt * l.tstride;
  l.red_off = l.xs_off + ((maxt * units * 4u + 15u) & ~15u);
  l.total = l.red_off + red_bytes;
  if (raw8_red) l.raw_off = l.red_off;
  return l;
}

// Shared-memory layout of the trellis form of mlp_mma_dec_kernel (TR; host and device compute
// it the same way). Weights: each projection's tiles as they are in memory, [MT][K/16] tiles
// of 32 * bits bytes (projection 1 from w1_off), plus 16 bytes that the two-word code reads
// may touch past the last tile; scale * sv as fp32 in the {s, b} pairs' place ([NP][ROWS][G]);
// the codebooks (cb_off: 1 KB of slack, then one 1 KB-aligned KB per projection: entry i is
// bf16 hi | bf16 lo << 16 of level i); su as bf16 in k order ([NP][K]; only projections with
// su); activations bf16 hi (+ lo) in natural k order; no unit sums (no bias).
template <bool GATEUP>
__host__ __device__ inline MmLayout mm_layout_tr(const MlpDesc& md, uint32_t maxt, int NS, int MT,
                                                 int NW) {
  constexpr int NP = GATEUP ? 2 : 1;
  const WDesc& a = GATEUP ? md.gate : md.down;
  const WDesc& b = GATEUP ? md.up : md.down;
  const uint32_t units = a.K / 32u, G = GATEUP ? (a.groups > b.groups ? a.groups : b.groups) : a.groups;
  const uint32_t rows = 16u * MT;
  MmLayout l{};
  l.w1_off = MT * 64u * units * a.bits;
  l.w_bytes = (l.w1_off + (NP == 2 ? MT * 64u * units * b.bits : 0u) + 16u + 15u) & ~15u;
  l.sc_off = l.w_bytes;
  l.cb_off = l.sc_off + NP * rows * G * 8u;
  l.su_off = l.cb_off + 1024u + NP * 1024u;
  const uint32_t su_bytes = (a.has_su ? units * 64u : 0u) + (NP == 2 && b.has_su ? units * 64u : 0u);
  l.raw_off = l.su_off + su_bytes;
  l.x_off = l.raw_off;
  l.tstride = units * 64u + 16u;
  l.xs_off = l.x_off + NS * maxt * l.tstride;
  l.red_off = l.xs_off;
  l.total = l.red_off + NW * NP * MT * 4u * 32u * 4u;
  return l;
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return uint32_t(__cvta_generic_to_shared(p));
}

// v, as a value the compiler cannot rebuild from its inputs: it stays in a register (under a
// register bound the compiler otherwise recomputes loop-invariant shared addresses from
// SR_CgaCtaId at each iteration).
__device__ __forceinline__ uint32_t opaque_u32(uint32_t v) {
  asm volatile("mov.b32 %0, %0;\n" : "+r"(v));
  return v;
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t n) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

// cp_async16 with L2 cache policy pol (weight_l2_policy)
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t n, uint64_t pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
               "r"(n), "l"(pol));
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16 bytes from a shared-space address when `on`, else zeros, as one predicated load (the
// unit loop's B operand: through a generic pointer the compiler rebuilt the shared window
// from SR_CgaCtaId at each load of the down kernel).
__device__ __forceinline__ uint4 lds128_if(bool on, uint32_t addr) {
  uint4 v = make_uint4(0u, 0u, 0u, 0u);
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %4, 0;\n"
      " @p ld.shared.v4.u32 {%0,%1,%2,%3}, [%5];\n}\n"
      : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
      : "r"(uint32_t(on)), "r"(addr));
  return v;
}

// 4 bytes (as float) from a shared-space address when `on`, else 0, as one predicated load.
__device__ __forceinline__ float lds32_if(bool on, uint32_t addr) {
  float v = 0.f;
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %1, 0;\n @p ld.shared.f32 %0, [%2];\n}\n"
               : "+f"(v)
               : "r"(uint32_t(on)), "r"(addr));
  return v;
}

// 8 bytes (a float pair) from a shared-space address.
__device__ __forceinline__ float2 lds64(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}

// 8 bytes from a shared-space address when `on`, else zeros (trellis B operand and su).
__device__ __forceinline__ uint2 lds64u_if(bool on, uint32_t addr) {
  uint2 v = make_uint2(0u, 0u);
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p ld.shared.v2.u32 {%0,%1}, [%3];\n}\n"
      : "+r"(v.x), "+r"(v.y)
      : "r"(uint32_t(on)), "r"(addr));
  return v;
}

// 4 bytes from a shared-space address when `on`, else 0, as one predicated load.
__device__ __forceinline__ uint32_t lds32u_if(bool on, uint32_t addr) {
  uint32_t v = 0u;
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %1, 0;\n @p ld.shared.u32 %0, [%2];\n}\n"
               : "+r"(v)
               : "r"(uint32_t(on)), "r"(addr));
  return v;
}

// 4 bytes from a shared-space address.
__device__ __forceinline__ uint32_t lds32u(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ __nv_bfloat162 bf16x2_bits(uint32_t v) {
  return *reinterpret_cast<__nv_bfloat162*>(&v);
}

// Nibbles s and s + 4 of w as exact bf16 values of 128 + code (low half: nibble s; a LOP3
// places them in the mantissas of 128.0). The unit loop uses them as they are and takes the
// 128 * sum(x) out with the bias (mm_compute).
__device__ __forceinline__ uint32_t nib2_bf16_128(uint32_t w, int s) {
  uint32_t v;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(v) : "r"(w >> (4 * s)), "r"(0x000F000Fu), "r"(0x43004300u));
  return v;
}

// FP4_2MAG0 / 1: the byte_perm table of 2|v| for the E2M1 magnitude bits 0..7 (fp4.h:
// {0, 0.5, 1, 1.5, 2, 3, 4, 6} doubled), the source of the grouped kernels' tables
// (gg_fp4_table).
constexpr uint32_t FP4_2MAG0 = 0x03020100u, FP4_2MAG1 = 0x0C080604u;

// mxfp4 (E2M1) codes of word w as exact bf16 values of 2*v (the unit's scale is halved to
// match): d[s] = nibbles s (low half) and s + 4 (high half), s = 0..3. A nibble's magnitude
// bits (e1 e0 m) go to bf16 bits 8..6 -- exponent field e, top mantissa bit m -- which reads
// as v * 2^-126 for every code (e >= 1: 2^(e - 127) (1 + m / 2); e = 0: the subnormal m / 2 *
// 2^-126, linear like E2M1's own subnormal), its bit 3 to the sign bit, and one bf16 multiply
// by 2^127 (an FMA with -0: exact, subnormal inputs kept) makes 2 v. Per word: 4 shifts and
// masks, 3 sign shifts and 4 merges, 4 multiplies (measured faster than the byte-table
// decode it replaced: H200, Qwen3 mxfp4 layer, 16 tokens 158 -> 146 us; docs/PERFORMANCE.md).
// One volatile block: as separate statements the compiler hoisted a thread's every word's
// decode ahead of the MMAs and spilled (register-operand gate/up: 972 bytes per thread).
__device__ __forceinline__ void fp4_word_bf16(uint32_t w, uint32_t (&d)[4]) {
  asm volatile(
      "{\n.reg .b32 m0, m1, m2, m3, s;\n"
      "shl.b32 m0, %4, 6;\nshl.b32 m1, %4, 2;\nshr.b32 m2, %4, 2;\nshr.b32 m3, %4, 6;\n"
      "and.b32 m0, m0, 0x01C001C0;\nand.b32 m1, m1, 0x01C001C0;\n"
      "and.b32 m2, m2, 0x01C001C0;\nand.b32 m3, m3, 0x01C001C0;\n"
      "shl.b32 s, %4, 12;\nlop3.b32 m0, s, 0x80008000, m0, 0xEA;\n"
      "shl.b32 s, %4, 8;\nlop3.b32 m1, s, 0x80008000, m1, 0xEA;\n"
      "shl.b32 s, %4, 4;\nlop3.b32 m2, s, 0x80008000, m2, 0xEA;\n"
      "lop3.b32 m3, %4, 0x80008000, m3, 0xEA;\n"
      "fma.rn.bf16x2 %0, m0, %5, %6;\nfma.rn.bf16x2 %1, m1, %5, %6;\n"
      "fma.rn.bf16x2 %2, m2, %5, %6;\nfma.rn.bf16x2 %3, m3, %5, %6;\n}\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(w), "r"(0x7F007F00u), "r"(0x80008000u));
}

__device__ __forceinline__ uint32_t pack2_bf16(__nv_bfloat16 lo, __nv_bfloat16 hi) {
  return uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  __nv_bfloat162 r = __hmul2(bf16x2_bits(a), bf16x2_bits(b));
  return *reinterpret_cast<uint32_t*>(&r);
}

// Four trellis codes (bits each, from bit 0 of v) to bf16 levels through the codebook at the
// 1 KB-aligned shared address cb (entry i: bf16 hi | bf16 lo << 16): h01 / h23 are the hi
// halves of codes (0, 1) / (2, 3) as bf16x2 (code 0 / 2 low), l01 / l23 the lo halves (LO).
// m2 = mask << 2; s1..s3 = j * bits - 2.
template <bool LO>
__device__ __forceinline__ void tr_decode4(uint32_t v, uint32_t cb, uint32_t m2, uint32_t s1,
                                           uint32_t s2, uint32_t s3, uint32_t& h01, uint32_t& h23,
                                           uint32_t& l01, uint32_t& l23) {
  const uint32_t e0 = lds32u(cb | ((v << 2) & m2));
  const uint32_t e1 = lds32u(cb | ((v >> s1) & m2));
  const uint32_t e2 = lds32u(cb | ((v >> s2) & m2));
  const uint32_t e3 = lds32u(cb | ((v >> s3) & m2));
  h01 = __byte_perm(e0, e1, 0x5410u);
  h23 = __byte_perm(e2, e3, 0x5410u);
  if (LO) {
    l01 = __byte_perm(e0, e1, 0x7632u);
    l23 = __byte_perm(e2, e3, 0x7632u);
  }
}

// Weight copies are issued per warp, for the warp's own slice of K, in commit groups of
// MM_GRP units, so that a warp starts on its first units while later ones are in flight.
constexpr int MM_GRP = 4;

// This warp's slice [ua, ub) of the item's units (an even number per warp; the last warps'
// may be short or empty) and the number of its commit groups of MM_GRP units: mm_issue's and
// mm_compute's arithmetic (which keep their own copy: the tuned kernels' registers differ
// through the helper).
template <int MM_WARPS>
__device__ __forceinline__ uint32_t mm_warp_units(uint32_t units, uint32_t& ua, uint32_t& ub) {
  const uint32_t per_w = (((units + MM_WARPS - 1) / MM_WARPS) + 1u) & ~1u;
  ua = min(units, (threadIdx.x >> 5) * per_w);
  ub = min(units, ua + per_w);
  return (ub - ua + MM_GRP - 1) / MM_GRP;
}

// store(c, load(c)) for c < n, over the block's threads with 8 loads in flight per thread.
template <typename Load, typename Store>
__device__ __forceinline__ void block_load8(uint32_t n, Load load, Store store) {
  constexpr int B = 8;
  for (uint32_t c0 = threadIdx.x; c0 < n; c0 += B * blockDim.x) {
    float v[B];
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const uint32_t c = c0 + j * blockDim.x;
      v[j] = c < n ? load(c) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const uint32_t c = c0 + j * blockDim.x;
      if (c < n) store(c, v[j]);
    }
  }
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, uint32_t n) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void cp_async_wait_pending(uint32_t n) {
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    case 4: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
    case 5: asm volatile("cp.async.wait_group 5;\n" ::: "memory"); break;
    case 6: asm volatile("cp.async.wait_group 6;\n" ::: "memory"); break;
    case 7: asm volatile("cp.async.wait_group 7;\n" ::: "memory"); break;
    case 8: asm volatile("cp.async.wait_group 8;\n" ::: "memory"); break;
    case 9: asm volatile("cp.async.wait_group 9;\n" ::: "memory"); break;
    case 10: asm volatile("cp.async.wait_group 10;\n" ::: "memory"); break;
    case 11: asm volatile("cp.async.wait_group 11;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 12;\n" ::: "memory"); break;
  }
}

// Bulk copies (sm_90: cp.async.bulk, the TMA unit's one-dimensional form) completing on an
// mbarrier: one instruction per contiguous run of bytes (16-byte aligned, a multiple of 16),
// instead of a cp.async per 16 (or 4) bytes and its address arithmetic.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define MOE_SM90_ASM(...) asm volatile(__VA_ARGS__)
#else
#define MOE_SM90_ASM(...) ((void)0)
#endif
// Barrier `bar` expecting `count` arrivals per phase; mbar_init_fence after the block's last
// init, before the barriers are used.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count = 1u) {
  MOE_SM90_ASM("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() {
  MOE_SM90_ASM("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The barrier's one arrival, expecting `bytes` of bulk copies.
__device__ __forceinline__ void mbar_arrive_tx(uint32_t bar, uint32_t bytes) {
  MOE_SM90_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}

// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  MOE_SM90_ASM(
      "{\n .reg .pred p;\n MBAR_WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra MBAR_WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
  MOE_SM90_ASM(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

// bulk_copy with L2 cache policy pol (weight_l2_policy)
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar,
                                          uint64_t pol) {
  MOE_SM90_ASM(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], "
      "%4;\n" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar), "l"(pol)
      : "memory");
}

// Scales and biases of `valid` consecutive groups (rows of one expert are contiguous) into
// shared memory as fp32 {s, b} pairs, zero past `valid`; 8 loads of each in flight per thread.
__device__ __forceinline__ void copy_scales(float2* dsb, const WDesc& wd, int64_t base,
                                            uint32_t total, uint32_t valid) {
  constexpr int B = 8;
  for (uint32_t c0 = threadIdx.x; c0 < total; c0 += B * blockDim.x) {
    float sv[B], bv[B];
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const uint32_t c = c0 + j * blockDim.x;
      const bool ok = c < valid;
      // mxfp4: the tensor-core kernel decodes 2*v, so the scale is halved (exact); no bias
      sv[j] = ok ? load_scale(wd.scales, wd.scale_kind, base + c) * (wd.mode == 1u ? 0.5f : 1.f) : 0.f;
      bv[j] = ok && wd.mode != 1u ? load_scale(wd.biases, wd.scale_kind, base + c) : 0.f;
    }
#pragma unroll
    for (int j = 0; j < B; ++j) {
      const uint32_t c = c0 + j * blockDim.x;
      if (c < total) dsb[c] = make_float2(sv[j], bv[j]);
    }
  }
}

// The pieces of one tensor-core decode item (block = one expert or pair x 16*MT output rows),
// shared by mlp_mma_dec_kernel and the one-launch kernel (moe_cuda_fused.cuh).
// Where the item's operands live in shared memory.
struct MmSmem {
  unsigned char* Ws;  // [NP][ROWS] x wstride: packed weight rows, all of K
  float2* SC;         // [NP][ROWS][G] {scale, bias} as fp32: row r's group g at r * groups + g
  unsigned char* Raw; // raw 16-bit scales [NP][ROWS][G], then biases (mm_raw16 only); RAW8:
                      // raw E8M0 scales [NP][ROWS][G] (in Red where they fit: mm_layout)
  unsigned char* Xs;  // [NS][maxt] x tstride: activations, bf16 hi (+ lo), permuted k order
  float* XSum;        // [maxt][units]: per-unit activation sums
  float* Red;         // [warp][NP][MT][4][32]: split-K partial sums; null: alias Ws (single chunk)
  uint32_t wstride, tstride, G;
  // trellis (mm_smem_tr): projection 1's tiles, the codebooks (1 KB-aligned shared-space
  // address of projection 0's; projection 1's 1 KB above) and su ([NP][K] bf16; su1: null or
  // projection 1's)
  unsigned char* W1;
  uint32_t cb;
  __nv_bfloat16* Su0;
  __nv_bfloat16* Su1;
  // mm_issue's BULK: shared-space address of the mbarrier of the weight rows' bulk copies
  uint32_t mbar;
};

__device__ __forceinline__ MmSmem mm_smem_at(unsigned char* base, const MmLayout& L, uint32_t G) {
  MmSmem s;
  s.Ws = base;
  s.SC = reinterpret_cast<float2*>(base + L.sc_off);
  s.Raw = base + L.raw_off;
  s.Xs = base + L.x_off;
  s.XSum = reinterpret_cast<float*>(base + L.xs_off);
  s.Red = reinterpret_cast<float*>(base + L.red_off);
  s.wstride = L.wstride;
  s.tstride = L.tstride;
  s.G = G;
  s.mbar = 0u;
  return s;
}

template <bool GATEUP>
__device__ __forceinline__ MmSmem mm_smem_tr(unsigned char* base, const MmLayout& L,
                                             const MlpDesc& md, uint32_t G) {
  const WDesc& a = GATEUP ? md.gate : md.down;
  MmSmem s = mm_smem_at(base, L, G);
  s.W1 = base + L.w1_off;
  s.cb = (smem_u32(base + L.cb_off) + 1023u) & ~1023u;
  s.Su0 = reinterpret_cast<__nv_bfloat16*>(base + L.su_off);
  s.Su1 = GATEUP && md.up.has_su ? s.Su0 + (a.has_su ? a.K : 0u) : nullptr;
  s.XSum = nullptr;
  return s;
}

// The trellis item's copies and tables (expert e, rows n0 ..; md's projections all trellis):
// an empty commit group where mm_issue has the scales' (mm_compute waits for it), then this
// warp's K slice of the block's tiles in commit groups of MM_GRP units (the 2 * MM_GRP
// 16-row tiles of each 16 rows, 32 * bits bytes each, copied as they are: consecutive in
// shared memory, TN tiles apart in memory); then scale * sv, the codebooks and su, loaded,
// converted and stored (visible to all warps after mm_compute's first barrier). A tile
// column past the weight's last one is zero-filled. Returns this warp's number of groups.
template <bool GATEUP, int MT, int MM_WARPS>
__device__ __forceinline__ uint32_t mm_issue_tr(const MlpDesc& md, uint32_t e, uint32_t n0,
                                                const MmSmem& sm) {
  constexpr int NP = GATEUP ? 2 : 1;
  constexpr int ROWS = 16 * MT;
  const WDesc& w0 = GATEUP ? md.gate : md.down;
  const uint32_t N = w0.N, units = w0.K / 32u, TK = 2u * units, TN = (N + 15u) / 16u;
  const uint32_t lane = threadIdx.x & 31u;
  const uint64_t pol = weight_l2_policy(md.l2_ef & 1u);
  uint32_t ua, ub;
  const uint32_t ngroups = mm_warp_units<MM_WARPS>(units, ua, ub);
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  // Lane l copies 16-byte chunk l % CB of tiles l / CB + j * (32 / CB) (CB = 2 * bits chunks
  // per tile; 32 / CB whole tiles per pass).
  uint32_t cb_n[NP], c_t[NP], c_b[NP], c_tpp[NP];
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
    cb_n[p] = moe_trellis_run_bytes(wd.bits);  // (a tile is 16 runs: 2 * bits chunks of 16 bytes)
    c_tpp[p] = 32u / cb_n[p];
    c_t[p] = lane / cb_n[p];
    c_b[p] = lane % cb_n[p];
  }
  for (uint32_t q = 0; q < ngroups; ++q) {
    const uint32_t r0 = 2u * (ua + q * MM_GRP), r1 = 2u * min(ub, ua + (q + 1u) * MM_GRP);
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
      const uint32_t tb = moe_trellis_tile_bytes(wd.bits);
      const unsigned char* wb = reinterpret_cast<const unsigned char*>(wd.w);
      unsigned char* ws = p == 0 ? sm.Ws : sm.W1;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint32_t nt = n0 / 16u + mt;
        const bool ok = nt < TN;
        const unsigned char* src = wb + moe_trellis_tile_offset(e, 0u, ok ? nt : 0u, w0.K, N, wd.bits);
        const uint32_t dst = smem_u32(ws + (mt * TK) * tb);
        if (c_b[p] < cb_n[p] && c_t[p] < c_tpp[p]) {
          for (uint32_t r = r0 + c_t[p]; r < r1; r += c_tpp[p])
            cp_async16(dst + r * tb + c_b[p] * 16u, src + int64_t(r) * TN * tb + c_b[p] * 16u,
                       ok ? 16u : 0u, pol);
        }
      }
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  }
  // scale * sv (fp32, in the pairs' .x; row r's group g at r * groups + g, as mm_compute
  // reads it); consecutive threads take consecutive rows (coalesced: scales are
  // [E, K / group_size, N]).
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
    float2* sc = sm.SC + p * ROWS * sm.G;
    block_load8(
        ROWS * wd.groups,
        [&](uint32_t c) {
          const uint32_t n = n0 + c % ROWS;
          const bool ok = n < N;
          const float s = ok ? load_scale(wd.scales, wd.scale_kind,
                                          moe_trellis_scale_index(e, c / ROWS, n, wd.groups, N)) : 0.f;
          const float sv = ok && wd.has_sv ? load_scale(wd.sv, wd.sv_kind, moe_trellis_sv_index(e, n, N)) : 1.f;
          return s * sv;
        },
        [&](uint32_t c, float v) { sc[(c % ROWS) * wd.groups + c / ROWS] = make_float2(v, 0.f); });
    // the codebook: level i as bf16 hi | bf16 lo << 16 (hi + lo: the level to ~16 bits)
    const uint32_t nl = moe_trellis_levels(wd.bits);
    uint32_t* cbk = reinterpret_cast<uint32_t*>(reinterpret_cast<unsigned char*>(sm.Ws) +
                                                (sm.cb + 1024u * p - smem_u32(sm.Ws)));
    for (uint32_t i = threadIdx.x; i < nl; i += blockDim.x) {
      const float lv = load_scale(wd.grid, wd.grid_kind, moe_trellis_grid_index(e, i, wd.bits, wd.grid_per_expert));
      const __nv_bfloat16 hi = __float2bfloat16_rn(lv);
      const __nv_bfloat16 lo = __float2bfloat16_rn(lv - __bfloat162float(hi));
      cbk[i] = pack2_bf16(hi, lo);
    }
    // su as bf16, k order
    __nv_bfloat16* su = p == 0 ? sm.Su0 : sm.Su1;
    if (wd.has_su) {
      block_load8(
          wd.K, [&](uint32_t c) { return load_scale(wd.su, wd.su_kind, moe_trellis_su_index(e, c, wd.K)); },
          [&](uint32_t c, float v) { su[c] = __float2bfloat16_rn(v); });
    }
  }
  return ngroups;
}

// Issues the item's copies (expert e, rows n0 ..): raw scales/biases as one commit group,
// then this warp's slice of the weight rows in commit groups of MM_GRP units; scales of other
// formats are loaded and converted here. Returns this warp's number of weight groups.
// BULK (sm_90; mlp_mma_dec_kernel): the weight rows instead as one bulk copy per row of all
// of K, issued by warp 0's lanes and completing on the mbarrier at sm.mbar (returns 0 weight
// groups then; mm_compute waits on the barrier before its first unit).
template <bool GATEUP, int MT, int MM_WARPS, bool BULK = false, bool RAW8 = false>
__device__ __forceinline__ uint32_t mm_issue(const MlpDesc& md, uint32_t e, uint32_t n0,
                                             const MmSmem& sm) {
  constexpr int NP = GATEUP ? 2 : 1;
  constexpr int ROWS = 16 * MT;
  const WDesc& w0 = GATEUP ? md.gate : md.down;
  const uint32_t N = w0.N, units = w0.K / 32u, G = sm.G;
  const uint32_t tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u;
  const uint64_t pol = weight_l2_policy(md.l2_ef & 1u);
  const uint32_t per_w = (((units + MM_WARPS - 1) / MM_WARPS) + 1u) & ~1u;
  const uint32_t ua = min(units, warp * per_w), ub = min(units, ua + per_w);
  const uint32_t ngroups = (ub - ua + MM_GRP - 1) / MM_GRP;
  const uint32_t vrows = min(uint32_t(ROWS), N - n0);
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
    const uint32_t how = mm_scale_copy(wd, RAW8);
    if (how == 0u) continue;
    const bool e8 = RAW8 && how == 3u;  // (RAW8: every projection of the kernel)
    const uint32_t es = e8 ? 1u : how == 1u ? 4u : 2u;  // bytes per value
    const uint32_t words = ROWS * wd.groups * es / 4u, vwords = vrows * wd.groups * es / 4u;
    const int64_t base = (int64_t(e) * N + n0) * wd.groups * es;  // bytes
    // fp32: value c into pair c; 16- / 8-bit: word c (two / four values) into the raw arrays
    const uint32_t ds0 = how == 1u ? smem_u32(sm.SC + p * ROWS * G)
                                   : smem_u32(sm.Raw + p * ROWS * G * (e8 ? 1u : 2u));
    const uint32_t db0 = how == 1u ? ds0 + 4u : smem_u32(sm.Raw + (NP + p) * ROWS * G * 2u);
    const uint32_t step = how == 1u ? 8u : 4u;
    const unsigned char* ss = static_cast<const unsigned char*>(wd.scales);
    const unsigned char* sb = static_cast<const unsigned char*>(wd.biases);
    for (uint32_t c = tid; c < words; c += blockDim.x) {
      const bool ok = c < vwords;
      cp_async4(ds0 + c * step, ok ? ss + base + c * 4u : ss, ok ? 4u : 0u);
      if (!e8) cp_async4(db0 + c * step, ok ? sb + base + c * 4u : sb, ok ? 4u : 0u);
    }
  }
  asm volatile("cp.async.commit_group;\n" ::: "memory");
  uint32_t ng_out = 0u;
  if constexpr (BULK) {
    // warp 0's lane l copies rows l, l + 32, .. (row i: projection i / ROWS, row i % ROWS)
    // whole, zero-filling rows past N
    const uint32_t bar = sm.mbar;
    if (warp == 0) {
      if (lane == 0) {
        mbar_init(bar);
        mbar_init_fence();
        mbar_arrive_tx(bar, NP * vrows * units * 16u);
      }
      __syncwarp();
      for (uint32_t i = lane; i < uint32_t(NP * ROWS); i += 32u) {
        const uint32_t p = i / ROWS, r = i % ROWS, n = n0 + r;
        const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
        const uint32_t dst = smem_u32(sm.Ws + i * sm.wstride);
        if (n < N) {
          bulk_copy(dst, wd.w + (int64_t(e) * N + n) * wd.row_words, units * 16u, bar, pol);
        } else {
          for (uint32_t u = 0; u < units; ++u)
            asm volatile("st.shared.v4.u32 [%0], {%1,%1,%1,%1};\n" ::"r"(dst + u * 16u), "r"(0u) : "memory");
        }
      }
    }
  } else {
    // This warp's slice of the block's rows (zero-filled past N), in commit groups: lane copies
    // unit ua + q * MM_GRP + lane % MM_GRP of rows lane / MM_GRP + j * (32 / MM_GRP). Addresses
    // are set up once and stepped by a group per commit (rows past N keep the base pointer).
    constexpr int RSTEP = 32 / MM_GRP, CPL = ROWS / RSTEP;
    static_assert(ROWS % RSTEP == 0, "rows per block");
    const uint32_t lu = ua + lane % MM_GRP, lr = lane / MM_GRP;
    const uint32_t* src[NP][CPL];
    uint32_t dst[NP][CPL], nb[NP][CPL];
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
#pragma unroll
      for (int j = 0; j < CPL; ++j) {
        const uint32_t r = lr + j * RSTEP, n = n0 + r;
        nb[p][j] = n < N ? 16u : 0u;
        src[p][j] = n < N ? wd.w + (int64_t(e) * N + n) * wd.row_words + lu * 4u : wd.w;
        dst[p][j] = smem_u32(sm.Ws + (p * ROWS + r) * sm.wstride + lu * 16u);
      }
    }
    for (uint32_t q = 0; q < ngroups; ++q) {
      if (lu + q * MM_GRP < ub) {
#pragma unroll
        for (int p = 0; p < NP; ++p)
#pragma unroll
          for (int j = 0; j < CPL; ++j)
            cp_async16(dst[p][j] + q * (MM_GRP * 16u), src[p][j] + (nb[p][j] ? q * (MM_GRP * 4u) : 0u),
                       nb[p][j], pol);
      }
      asm volatile("cp.async.commit_group;\n" ::: "memory");
    }
    ng_out = ngroups;
  }
  // Other scale formats: loaded and converted (visible to all warps after the first barrier
  // of mm_compute).
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
    if (mm_scale_copy(wd, RAW8) != 0u) continue;
    copy_scales(sm.SC + p * ROWS * G, wd, (int64_t(e) * N + n0) * wd.groups, ROWS * wd.groups,
                vrows * wd.groups);
  }
  return ng_out;
}

// Computes the item issued by mm_issue over the bucketed positions [first, last) (chunks of
// maxt tokens) and writes H rows (gate/up: silu(g) * u) or Yp rows (down: rw * acc).
// `extra`: commit groups this thread issued after the item's (they may stay in flight).
// CG: H_in was written by other blocks of the same launch (read through L2).
// Warps from MM_WARPS on (a larger block) only help staging and meet the barriers.
template <bool GATEUP, typename XT, bool SPLIT, int MT, int MM_WARPS, bool CG, bool TR = false,
          bool BULK = false, bool RAW8 = false>
__device__ __forceinline__ void mm_compute(const MlpDesc& md, const DecExtra& ex,
                                           const XT* __restrict__ x, const float* H_in,
                                           const uint32_t* __restrict__ pairs,
                                           const float* rw, uint32_t first, uint32_t last,
                                           uint32_t maxt, float* out, uint32_t n0,
                                           const MmSmem& sm, uint32_t ngroups, uint32_t extra) {
  constexpr int NP = GATEUP ? 2 : 1;
  constexpr int NS = SPLIT ? 2 : 1;
  constexpr int ROWS = 16 * MT;
  const WDesc& w0 = GATEUP ? md.gate : md.down;
  const uint32_t N = w0.N, Kd = w0.K, units = Kd / 32u, G = sm.G;
  unsigned char* Ws = sm.Ws;
  unsigned char* Xs = sm.Xs;
  float* XSum = sm.XSum;
  const uint32_t tid = threadIdx.x, warp = tid >> 5, lane = tid & 31u;
  const uint32_t gid = lane >> 2, t4 = lane & 3u;
  const uint32_t per_w = (((units + MM_WARPS - 1) / MM_WARPS) + 1u) & ~1u;
  const uint32_t ua = min(units, warp * per_w), ub = min(units, ua + per_w);
  // Group of unit u: u >> gsh when the group size is a power-of-two number of units (MLX's
  // 32 / 64 / 128), else u / gsu. (This form rather than pow2_shift / div_shift: those give
  // the tuned decode kernels other SASS.)
  uint32_t gsu[NP], gst[NP], gsh[NP];
  bool fp4[NP], pow2[NP];
#pragma unroll
  for (int p = 0; p < NP; ++p) {
    fp4[p] = RAW8 || ((GATEUP && p == 1) ? md.up : w0).mode == 1u;  // (RAW8: all mxfp4)
    gsu[p] = ((GATEUP && p == 1) ? md.up : w0).gs_units;
    gst[p] = ((GATEUP && p == 1) ? md.up : w0).groups;
    gsh[p] = uint32_t(__ffs(int(gsu[p])) - 1);
    pow2[p] = (gsu[p] & (gsu[p] - 1u)) == 0u;
  }
  // The unit loop's form (below): per scale group for affine gate/up, per unit otherwise.
  const bool grp = GATEUP && !fp4[0] && !fp4[NP - 1];
  auto group_of = [&](int p, uint32_t u) { return pow2[p] ? u >> gsh[p] : u / gsu[p]; };

  for (uint32_t c0 = first; c0 < last; c0 += maxt) {
    const uint32_t nt = min(maxt, last - c0);
    __syncthreads();
    // Activations of the chunk's tokens: bf16 hi (+ lo), in the permuted k order, and the
    // fp32 sum of each unit.
    for (uint32_t task = tid; task < nt * units; task += blockDim.x) {
      const uint32_t t = task / units, u = task % units;
      const uint32_t i = c0 + t;
      float v[32];
      dec_stage_unit<GATEUP, XT, CG>(md, ex, x, H_in, pairs, i, u, Kd, v);
      // The unit's sum is that of the staged operand (hi, + lo when split; hi + lo is exact in
      // fp32), so that the 128 * sum the unit loop takes out of its products of 128 + code
      // (affine) cancels to fp32 rounding (bf16 activations: hi is v).
      float sum = 0.f;
#pragma unroll
      for (int q4 = 0; q4 < 4; ++q4) {
        __nv_bfloat16 hi[8], lo[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float f = v[8 * q4 + j];
          hi[j] = __float2bfloat16_rn(f);
          lo[j] = __float2bfloat16_rn(f - __bfloat162float(hi[j]));
          sum += SPLIT ? __bfloat162float(hi[j]) + __bfloat162float(lo[j]) : __bfloat162float(hi[j]);
        }
        // (trellis: natural k order, see the trellis unit loop)
        constexpr int o = TR ? 1 : 4, m = TR ? 2 : 1;
        uint4 wv = make_uint4(pack2_bf16(hi[0], hi[o]), pack2_bf16(hi[m], hi[m + o]),
                              pack2_bf16(hi[2 * m], hi[2 * m + o]), pack2_bf16(hi[3 * m], hi[3 * m + o]));
        *reinterpret_cast<uint4*>(Xs + t * sm.tstride + u * 64u + q4 * 16u) = wv;
        if (SPLIT) {
          wv = make_uint4(pack2_bf16(lo[0], lo[o]), pack2_bf16(lo[m], lo[m + o]),
                          pack2_bf16(lo[2 * m], lo[2 * m + o]), pack2_bf16(lo[3 * m], lo[3 * m + o]));
          *reinterpret_cast<uint4*>(Xs + (maxt + t) * sm.tstride + u * 64u + q4 * 16u) = wv;
        }
      }
      if (!TR && !RAW8) XSum[t * units + u] = sum;  // (RAW8: mxfp4, no bias to apply)
    }
    // The scale group (the oldest) has landed for this thread's copies; the barrier makes
    // every thread's visible.
    cp_async_wait_pending(ngroups + extra);
    __syncthreads();
    if (c0 == first && (RAW8 || mm_raw16<GATEUP>(md))) {
      // Raw 16-bit scales and biases (RAW8: E8M0 scales, halved as copy_scales does, no
      // bias) to fp32 {s, b} pairs, once per item: the unit loop reads one 8-byte word per
      // row and group, with no per-kind branches.
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
        if (RAW8) {
          const void* rs = sm.Raw + p * ROWS * G;
          for (uint32_t i = tid; i < ROWS * gst[p]; i += blockDim.x)
            sm.SC[p * ROWS * G + i] = make_float2(load_scale(rs, 3u, i) * 0.5f, 0.f);
          continue;
        }
        if (mm_scale_copy(wd) != 2u) continue;
        const void* rs = sm.Raw + p * ROWS * G * 2u;
        const void* rb = sm.Raw + (NP + p) * ROWS * G * 2u;
        for (uint32_t i = tid; i < ROWS * gst[p]; i += blockDim.x)
          sm.SC[p * ROWS * G + i] = make_float2(load_scale(rs, wd.scale_kind, i),
                                                load_scale(rb, wd.scale_kind, i));
      }
      __syncthreads();
    }

    float acc[NP][MT][4];
#pragma unroll
    for (int p = 0; p < NP; ++p)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[p][mt][c] = 0.f;
    if constexpr (TR) {
      // Trellis: a run (16 k of one row, in one tile) is one MMA k step. Thread (gid, t4)
      // takes codes 4 t4 .. 4 t4 + 3 of rows gid and gid + 8 -- 4 * bits bits from bit
      // moe_trellis_bit(moe_trellis_pos(4 t4, row)) of the tile, one word, or two and a funnel
      // shift where they may straddle (3, 5, 6, 7 bits) -- as the A fragment's k pairs
      // (2 t4, 2 t4 + 1) and (2 t4 + 8, 2 t4 + 9), and the staged activations' k 4 t4 .. 4 t4
      // + 3 (natural order) as B; each code is a 4-byte load from the codebook (bf16 hi, lo)
      // at cb | (code << 2) (1 KB-aligned). B is multiplied by su (bf16, exact for sign
      // vectors), and each run's product -- or, when every group is whole units, each unit's
      // -- is scaled by its group's scale * sv in fp32. Split activations (NS = 2) take the
      // levels' lo half too: hi.hi + hi.lo + lo.hi (three MMAs). The unit's body has no branch
      // (predicated loads, the scale group by a counter), so that its four runs' load ->
      // lookup -> MMA chains can overlap. Measured (H200, Qwen3 trellis4, 16 tokens): this
      // form 405 us per layer; applying the scale per run also with whole-unit groups 428; a
      // table of code pairs (one load per two 4-bit codes, 35% fewer loop instructions) 446
      // -- its 256 entries take the loads' bank conflicts.
      uint32_t wq[NP][MT], tbp[NP], shp[NP], m2[NP], s1[NP], s2[NP], s3[NP], suq[NP], scq[NP];
      uint32_t rpg[NP], rstep[NP], gq[NP], left[NP];
      bool hsu[NP], word1[NP];
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        const WDesc& wd = (GATEUP && p == 1) ? md.up : w0;
        const uint32_t bits = wd.bits;
        tbp[p] = moe_trellis_tile_bytes(bits);
        const uint32_t bit = moe_trellis_bit(moe_trellis_pos(4u * t4, gid), bits);
        shp[p] = bit & 31u;
        rstep[p] = 8u * moe_trellis_run_bytes(bits);  // row gid + 8's run: 8 runs further
        unsigned char* ws = p == 0 ? Ws : sm.W1;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          wq[p][mt] = opaque_u32(smem_u32(ws + (mt * 2u * units + 2u * ua) * tbp[p] + (bit >> 5) * 4u));
        m2[p] = moe_trellis_mask(bits) << 2;
        // 2, 4 or 8 bits: a thread's 4 codes never straddle a word (one load, no funnel shift)
        word1[p] = (bits & (bits - 1u)) == 0u;
        s1[p] = bits - 2u;
        s2[p] = 2u * bits - 2u;
        s3[p] = 3u * bits - 2u;
        hsu[p] = wd.has_su != 0u;
        suq[p] = hsu[p] ? smem_u32((p == 0 ? sm.Su0 : sm.Su1) + 32u * ua + 4u * t4) : 0u;
        scq[p] = opaque_u32(smem_u32(sm.SC + p * ROWS * G + gid * gst[p]));
        // runs per scale group; the group of the warp's first run (its {s, b} pair's address)
        // and the runs left in it
        rpg[p] = wd.group_size / 16u;
        gq[p] = scq[p] + (2u * ua / rpg[p]) * 8u;
        left[p] = rpg[p] - 2u * ua % rpg[p];
      }
      const uint32_t xq = smem_u32(Xs + gid * sm.tstride + ua * 64u + t4 * 8u);  // B operand
      const uint32_t xlo = maxt * sm.tstride;
      const bool bx = gid < nt;
      // UNIT: every projection's groups are whole units (group_size % 32 == 0): the unit's two
      // runs share a scale, so their products are applied once (the loop's form is chosen here,
      // outside it, so that its body stays without branches).
      auto unit_loop = [&](auto unit_c) {
        constexpr bool UNIT = decltype(unit_c)::value;
        for (uint32_t dq = 0; ua + dq < ub; dq += MM_GRP) {
          cp_async_wait_pending(ngroups - 1u - dq / MM_GRP + extra);  // this group has landed
          __syncwarp();
#pragma unroll 1
          for (uint32_t du = dq; du < dq + MM_GRP && ua + du < ub; ++du) {
            float t[NP][MT][4];
#pragma unroll
            for (int p = 0; p < NP; ++p)
#pragma unroll
              for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int c = 0; c < 4; ++c) t[p][mt][c] = 0.f;
#pragma unroll
            for (uint32_t h = 0; h < 2u; ++h) {
              const uint32_t kr = 2u * du + h;  // run, from the warp's first
              uint32_t bxs[NS][2];
#pragma unroll
              for (int sp = 0; sp < NS; ++sp) {
                const uint2 v = lds64u_if(bx, xq + sp * xlo + du * 64u + h * 32u);
                bxs[sp][0] = v.x;
                bxs[sp][1] = v.y;
              }
#pragma unroll
              for (int p = 0; p < NP; ++p) {
                uint32_t b[NS][2];
#pragma unroll
                for (int sp = 0; sp < NS; ++sp) {
                  b[sp][0] = bxs[sp][0];
                  b[sp][1] = bxs[sp][1];
                }
                if (hsu[p]) {
                  const uint2 su = lds64u_if(true, suq[p] + kr * 32u);
#pragma unroll
                  for (int sp = 0; sp < NS; ++sp) {
                    b[sp][0] = bf16x2_mul(b[sp][0], su.x);
                    b[sp][1] = bf16x2_mul(b[sp][1], su.y);
                  }
                }
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                  const uint32_t wa = wq[p][mt] + kr * tbp[p];
                  // (the second word only where a thread's codes may straddle two)
                  const uint32_t va = __funnelshift_r(lds32u(wa), lds32u_if(!word1[p], wa + 4u), shp[p]);
                  const uint32_t vb = __funnelshift_r(lds32u(wa + rstep[p]),
                                                      lds32u_if(!word1[p], wa + rstep[p] + 4u), shp[p]);
                  uint32_t ah[4], al[4];
                  const uint32_t cb = sm.cb + 1024u * p;
                  tr_decode4<NS == 2>(va, cb, m2[p], s1[p], s2[p], s3[p], ah[0], ah[2], al[0], al[2]);
                  tr_decode4<NS == 2>(vb, cb, m2[p], s1[p], s2[p], s3[p], ah[1], ah[3], al[1], al[3]);
                  mma_bf16(t[p][mt], ah, b[0]);
                  if (NS == 2) {
                    mma_bf16(t[p][mt], ah, b[NS - 1]);
                    mma_bf16(t[p][mt], al, b[0]);
                  }
                }
                // the run's (UNIT: the unit's, after its second run) scale: the group's, stepped
                // by a counter (no branch, no division)
                if (UNIT && h == 0u) continue;
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                  const uint32_t sc = gq[p] + mt * 16u * gst[p] * 8u;
                  const float sa = lds32_if(true, sc), sb = lds32_if(true, sc + 64u * gst[p]);
                  acc[p][mt][0] += sa * t[p][mt][0];
                  acc[p][mt][1] += sa * t[p][mt][1];
                  acc[p][mt][2] += sb * t[p][mt][2];
                  acc[p][mt][3] += sb * t[p][mt][3];
#pragma unroll
                  for (int c = 0; c < 4; ++c) t[p][mt][c] = 0.f;
                }
                left[p] -= UNIT ? 2u : 1u;
                const bool adv = left[p] == 0u;
                gq[p] += adv ? 8u : 0u;
                left[p] = adv ? rpg[p] : left[p];
              }
            }
          }
        }
      };
      bool unit_groups = true;
#pragma unroll
      for (int p = 0; p < NP; ++p) unit_groups = unit_groups && rpg[p] % 2u == 0u;
      if (unit_groups) unit_loop(std::true_type{});
      else unit_loop(std::false_type{});
    } else {
      // Per-thread operand addresses at unit ua, stepped by the unit offset du in the loop.
      const uint32_t lrow = (lane & 7u) + ((lane >> 3) & 1u) * 8u, lunit = lane >> 4;
      uint32_t wq[NP][MT];  // ldmatrix rows
#pragma unroll
      for (int p = 0; p < NP; ++p)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          wq[p][mt] = opaque_u32(
              smem_u32(Ws + (p * ROWS + mt * 16 + lrow) * sm.wstride + (ua + lunit) * 16u));
      const uint32_t xq = smem_u32(Xs + gid * sm.tstride + ua * 64u + t4 * 16u);  // B operand
      const uint32_t xlo = maxt * sm.tstride;                                   // its lo half
      const uint32_t xsq = opaque_u32(smem_u32(XSum + (2u * t4) * units + ua));  // unit sums
      const bool bx = gid < nt, bs0 = 2u * t4 < nt, bs1 = 2u * t4 + 1u < nt;
      uint32_t scq[NP];  // row gid's {s, b} pairs
#pragma unroll
      for (int p = 0; p < NP; ++p)
        scq[p] = opaque_u32(smem_u32(sm.SC + p * ROWS * G + gid * gst[p]));
      // The operand addresses above are opaque to the compiler (opaque_u32), so that it keeps
      // them in registers rather than rebuilding them at each iteration under gate/up's
      // register bound. A commit group (MM_GRP units) per iteration: its wait once, then its
      // units two at a time.
      for (uint32_t dq = 0; ua + dq < ub; dq += MM_GRP) {
        if constexpr (BULK) {  // the block's whole rows have landed
          if (dq == 0u) mbar_wait(sm.mbar, 0u);  // (its one phase)
        } else {
          cp_async_wait_pending(ngroups - 1u - dq / MM_GRP + extra);  // this group has landed
        }
        __syncwarp();
#pragma unroll
        for (uint32_t d2 = 0; d2 < uint32_t(MM_GRP); d2 += 2u) {
          const uint32_t du = dq + d2;
          if (ua + du >= ub) break;
          const uint32_t u = ua + du;
          uint32_t fr[NP][MT][4];
#pragma unroll
          for (int p = 0; p < NP; ++p)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ldsm_x4(wq[p][mt] + du * 16u, fr[p][mt]);
          // Unit u + h2's products for projection p, rows mt, added to t: the B fragments bq,
          // codes decoded to bf16 (affine: 128 + q, without a subtract; mxfp4: 2v).
          auto unit_mma = [&](int p, int mt, int h2, const uint32_t (&bq)[NS][4], float (&t)[4]) {
            const uint32_t wa = fr[p][mt][2 * h2], wb = fr[p][mt][2 * h2 + 1];
            uint32_t af[2][4];
            if (fp4[p]) {
              uint32_t da[4], db[4];
              fp4_word_bf16(wa, da);
              fp4_word_bf16(wb, db);
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                af[h][0] = da[2 * h];
                af[h][1] = db[2 * h];
                af[h][2] = da[2 * h + 1];
                af[h][3] = db[2 * h + 1];
              }
            } else {
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                af[h][0] = nib2_bf16_128(wa, 2 * h);
                af[h][1] = nib2_bf16_128(wb, 2 * h);
                af[h][2] = nib2_bf16_128(wa, 2 * h + 1);
                af[h][3] = nib2_bf16_128(wb, 2 * h + 1);
              }
            }
#pragma unroll
            for (int h = 0; h < 2; ++h) {
#pragma unroll
              for (int sp = 0; sp < NS; ++sp) {
                const uint32_t b[2] = {bq[sp][2 * h], bq[sp][2 * h + 1]};
                mma_bf16(t, af[h], b);
              }
            }
          };
          // acc += s * t + (b - 128 s) * sum(x) for group g of projection p, rows mt (affine:
          // the codes entered as 128 + q; mxfp4: no bias and no offset).
          auto apply = [&](int p, int mt, uint32_t g, const float (&t)[4], float ya, float yb) {
            const uint32_t sc = scq[p] + (mt * 16u * gst[p] + g) * 8u;
            if constexpr (RAW8) {
              // mxfp4 only: no bias and no offset, so the unit sums are not read (the form
              // below adds 0 * sum: the same roundings, __fmul_rn keeping s * t unfused)
              const float s0 = __uint_as_float(lds32u(sc)), s1 = __uint_as_float(lds32u(sc + 64u * gst[p]));
              acc[p][mt][0] += __fmul_rn(s0, t[0]);
              acc[p][mt][1] += __fmul_rn(s0, t[1]);
              acc[p][mt][2] += __fmul_rn(s1, t[2]);
              acc[p][mt][3] += __fmul_rn(s1, t[3]);
              return;
            }
            const float2 sb0 = lds64(sc), sb1 = lds64(sc + 64u * gst[p]);
            const bool o128 = !fp4[p];
            const float c0 = o128 ? fmaf(-128.f, sb0.x, sb0.y) : sb0.y;
            const float c1 = o128 ? fmaf(-128.f, sb1.x, sb1.y) : sb1.y;
            acc[p][mt][0] += sb0.x * t[0] + c0 * ya;
            acc[p][mt][1] += sb0.x * t[1] + c0 * yb;
            acc[p][mt][2] += sb1.x * t[2] + c1 * ya;
            acc[p][mt][3] += sb1.x * t[3] + c1 * yb;
          };
          auto load_b = [&](int h2, uint32_t (&bq)[NS][4]) {
#pragma unroll
            for (int sp = 0; sp < NS; ++sp) {
              const uint4 bv = lds128_if(bx, xq + sp * xlo + (du + h2) * 64u);
              bq[sp][0] = bv.x; bq[sp][1] = bv.y; bq[sp][2] = bv.z; bq[sp][3] = bv.w;
            }
          };
          if (grp) {
            // Affine gate/up: units u and u + 1 in one scale group (groups of 2+ units) get one
            // scale application, their products in two accumulators (two short MMA chains)
            // added first.
            const bool two = u + 1u < ub;
            uint32_t bf[2][NS][4];
            load_b(0, bf[0]);
            const float xa0 = lds32_if(bs0, xsq + du * 4u);
            const float xb0 = lds32_if(bs1, xsq + (units + du) * 4u);
            float xa1 = 0.f, xb1 = 0.f;
            if (two) {
              load_b(1, bf[1]);
              xa1 = lds32_if(bs0, xsq + (du + 1u) * 4u);
              xb1 = lds32_if(bs1, xsq + (units + du + 1u) * 4u);
            }
#pragma unroll
            for (int p = 0; p < NP; ++p) {
              const uint32_t g0 = group_of(p, u), g1 = group_of(p, u + 1u);
#pragma unroll
              for (int mt = 0; mt < MT; ++mt) {
                float t0[4] = {0.f, 0.f, 0.f, 0.f}, t1[4] = {0.f, 0.f, 0.f, 0.f};
                unit_mma(p, mt, 0, bf[0], t0);
                if (two) unit_mma(p, mt, 1, bf[1], t1);
                if (two && g0 == g1) {
                  const float ts[4] = {t0[0] + t1[0], t0[1] + t1[1], t0[2] + t1[2], t0[3] + t1[3]};
                  apply(p, mt, g0, ts, xa0 + xa1, xb0 + xb1);
                } else {
                  apply(p, mt, g0, t0, xa0, xb0);
                  if (two) apply(p, mt, g1, t1, xa1, xb1);
                }
              }
            }
          } else {
            // Down and mxfp4: one scale application per unit (measured faster there than the
            // form above).
#pragma unroll
            for (int h2 = 0; h2 < 2; ++h2) {
              const uint32_t uu = u + h2;
              if (uu >= ub) break;
              uint32_t bf[NS][4];
              load_b(h2, bf);
              const float xs0 = RAW8 ? 0.f : lds32_if(bs0, xsq + (du + h2) * 4u);
              const float xs1 = RAW8 ? 0.f : lds32_if(bs1, xsq + (units + du + h2) * 4u);
#pragma unroll
              for (int p = 0; p < NP; ++p) {
                const uint32_t g = group_of(p, uu);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                  float t[4] = {0.f, 0.f, 0.f, 0.f};
                  unit_mma(p, mt, h2, bf, t);
                  apply(p, mt, g, t, xs0, xs1);
                }
              }
            }
          }
        }
      }
    }
    // Split-K: the warps' partial sums, added in warp order by warp 0. Red may alias the
    // weight rows (one chunk only): every warp must be done with them first.
    float* Red = sm.Red;
    if (Red == nullptr) {
      Red = reinterpret_cast<float*>(Ws);
      __syncthreads();
    }
    if (warp < uint32_t(MM_WARPS)) {
#pragma unroll
      for (int p = 0; p < NP; ++p)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int c = 0; c < 4; ++c) Red[(((warp * NP + p) * MT + mt) * 4 + c) * 32 + lane] = acc[p][mt][c];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int p = 0; p < NP; ++p)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            float v = acc[p][mt][c];
            for (int w = 1; w < MM_WARPS; ++w) v += Red[(((w * NP + p) * MT + mt) * 4 + c) * 32 + lane];
            acc[p][mt][c] = v;
          }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const uint32_t n = n0 + mt * 16 + gid + (c >= 2 ? 8u : 0u);
          const uint32_t t = 2u * t4 + (c & 1u);
          if (n >= N || t >= nt) continue;
          const uint32_t i = c0 + t;
          if (GATEUP) {
            out[int64_t(i) * N + n] = silu(acc[0][mt][c]) * acc[NP - 1][mt][c];
          } else {
            const uint32_t pair = dec_pair(ex, pairs, i);
            out[int64_t(pair) * N + n] = rw[pair] * acc[0][mt][c];
          }
        }
    }
  }
}

// Gate/up: 3 blocks of 8 warps per SM (<= 80 registers; shared memory allows 3 too at
// Qwen3's widths): without the bound the unit loop takes 89 and a block per SM is lost.
// TR: the trellis form (all projections of the kernel trellis; mm_issue_tr, mm_layout_tr).
template <bool GATEUP, typename XT, bool SPLIT, int MT, int MM_WARPS, bool TR = false,
          bool BULK_REQ = false, bool RAW8 = false>
__global__ void __launch_bounds__(MM_WARPS * 32, MM_WARPS == 8 ? 3 : 4)
    mlp_mma_dec_kernel(MlpDesc md, const XT* __restrict__ x, const float* __restrict__ H_in,
                       const uint32_t* __restrict__ pairs, const uint32_t* __restrict__ offsets,
                       const uint32_t* __restrict__ active, const uint32_t* __restrict__ meta,
                       const float* __restrict__ rw, uint32_t maxt, float* __restrict__ out,
                       DecExtra ex) {
  constexpr int NP = GATEUP ? 2 : 1;
  constexpr int NS = SPLIT ? 2 : 1;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool BULK = !TR && BULK_REQ;  // mm_issue's bulk copies (sm_90)
#else
  constexpr bool BULK = false;
#endif
  extern __shared__ __align__(16) unsigned char mm_smem[];
  __shared__ uint32_t s_flag;
  __shared__ __align__(8) uint64_t s_mbar;
  // In a decode chain (launch_pdl) gate/up waits for the router's ids or the bucketing
  // first, and only then lets down start: down reads those before its own pdl_wait (a kernel
  // triggers only once whatever its dependent reads before waiting has completed). Down lets
  // the combine start at once: the combine reads everything after its pdl_wait.
  if (GATEUP && !ex.logits) pdl_wait();
  pdl_trigger();
  if (GATEUP) dec_zero_counters(ex);
  uint32_t e = 0, first = 0, last = 0;
  bool work;
  if (GATEUP && ex.logits) {
    // the scratch is the start of the item's shared memory (the layout's split-K area
    // alone is larger), free until mm_issue copies into it
    static_assert(!GATEUP || DEC_ROUTE_SCRATCH <= 2u * 4u * 32u * 4u * MM_WARPS, "route scratch");
    e = dec_route(ex.logits, ex.logits_kind, md.E, md.k, ex.route_norm, ex.route_ids, ex.route_w,
                  reinterpret_cast<float*>(mm_smem));
    work = e < md.E;
    first = blockIdx.x;
    last = first + 1;
  } else {
    work = dec_setup(md, ex, offsets, active, meta, e, first, last);
  }
  const WDesc& w0 = GATEUP ? md.gate : md.down;
  const uint32_t units = w0.K / 32u;
  const uint32_t G = GATEUP ? max(md.gate.groups, md.up.groups) : w0.groups;
  const MmLayout L = TR ? mm_layout_tr<GATEUP>(md, maxt, NS, MT, MM_WARPS)
                       : mm_layout(units, G, maxt, NP, NS, MT, MM_WARPS, !RAW8 && mm_raw16<GATEUP>(md), RAW8);
  MmSmem sm = TR ? mm_smem_tr<GATEUP>(mm_smem, L, md, G) : mm_smem_at(mm_smem, L, G);
  if constexpr (BULK) sm.mbar = smem_u32(&s_mbar);
  const uint32_t n0 = blockIdx.y * 16u * MT;
  uint32_t ngroups = 0;
  if (work) {
    if constexpr (TR) ngroups = mm_issue_tr<GATEUP, MT, MM_WARPS>(md, e, n0, sm);
    else ngroups = mm_issue<GATEUP, MT, MM_WARPS, BULK, RAW8>(md, e, n0, sm);
  }
  // Down as gate/up's programmatic dependent: its weight copies are in flight; H and the
  // counters are gate/up's (a no-op otherwise).
  if (!GATEUP) pdl_wait();
  if (work)
    mm_compute<GATEUP, XT, SPLIT, MT, MM_WARPS, false, TR, BULK, RAW8>(md, ex, x, H_in, pairs, rw,
                                                                       first, last, maxt, out, n0, sm,
                                                                       ngroups, 0u);
  if (!GATEUP && ex.counters) dec_fused_combine(md, ex, out, n0, 16 * MT, &s_flag);
}

// y[t] = sum over slots j in order of Yp[t*k + j] (slots whose id was out of range skipped).
template <typename OutT>
__global__ void combine_kernel(const float* __restrict__ Yp, const void* __restrict__ ids,
                               int id_kind, uint32_t T, uint32_t k, uint32_t D, uint32_t E,
                               OutT* __restrict__ y) {
  pdl_wait();  // (the last kernel of a decode chain: after down's Yp)
  const uint64_t idx = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= uint64_t(T) * D) return;
  const uint64_t t = idx / D, d = idx % D;
  float s = 0.f;
  bool any = false;
  for (uint32_t j = 0; j < k; ++j) {
    const int64_t e = load_id(ids, id_kind, t * k + j);
    if (!valid_id(e, E)) continue;
    const float v = Yp[(t * k + j) * D + d];
    s = any ? s + v : v;
    any = true;
  }
  y[idx] = from_f<OutT>(s);
}

}  // namespace mlx_moe::cuda

// Grouped path for bf16 / fp16 activations and affine 4/8-bit or mxfp4 weights.
#include "moe_cuda_grouped.cuh"
