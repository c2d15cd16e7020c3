// Metal-side decoding of one projection's weights, on top of the shared format math in
// common/ (the same headers the CPU and CUDA code use). Included by the .metal kernels.
#pragma once
#include <metal_stdlib>

#include "common/affine.h"
#include "common/fp4.h"
#include "common/moe_args.h"
#include "common/trellis.h"

using namespace metal;

constant constexpr uint MOE_HALF = 32;   // codes per decode step (divides every group size)
constant constexpr uint MOE_CHUNK = 64;  // codes a lane takes at once: two steps

inline float moe_load_scale(device const uint8_t* p, uint kind, size_t i) {
  switch (kind) {
    case 0: return ((device const float*)p)[i];
    case 1: return float(((device const half*)p)[i]);
    case 2: return float(((device const bfloat*)p)[i]);
    default: return moe_e8m0_scale(p[i]);
  }
}

// The (mode, bits) a projection's decoder runs with. Kernels specialised by function
// constants (moe_mlp.metal; the host always sets them) see compile-time values here, so the
// unpacking loops are unrolled for the bit width and the format switch folds away; kernels
// without them pass the argument struct's values.
struct MoeFmt {
  uint mode;
  uint bits;
};

// One projection's buffers: w, scales, and biases (affine) or grid (trellis), su, sv.
struct MoeProj {
  device const uint8_t* w;
  device const uint8_t* s;
  device const uint8_t* b;
  device const uint8_t* su;
  device const uint8_t* sv;
};

// Decodes the 32 codes [k0, k0 + 32) of row n of expert e (affine / mxfp4) with scale s and
// bias b into v.
inline void moe_decode32_rowmajor(
    thread const MoeProj& p, constant MoeWeightArgs& a, MoeFmt f, size_t row, uint k0, float s,
    float b, thread float* v) {
  device const uint* words = (device const uint*)(p.w + row * a.row_bytes) + (k0 * f.bits) / 32;
  if (f.mode == 0) {
    uint local[9];
    for (uint i = 0; i < f.bits; ++i) {
      local[i] = words[i];
    }
    local[f.bits] = 0;
    for (uint j = 0; j < MOE_HALF; ++j) {
      uint bit = j * f.bits;
      uint code = moe_affine_code64(local[bit / 32], local[bit / 32 + 1], bit % 32, f.bits);
      v[j] = moe_affine_value(code, s, b);
    }
  } else {
    const bool quarter = (a.flags & 1u) != 0;
    for (uint i = 0; i < 4; ++i) {
      uint word = words[i];
      for (uint j = 0; j < 8; ++j) {
        uint code = (word >> (4 * j)) & 0xfu;
        float e = quarter ? moe_fp4_e2m1_quarter_subnormal(code) : moe_fp4_e2m1(code);
        v[8 * i + j] = e * s;
      }
    }
  }
}

// Trellis: the 16 k of column n inside tile (k / 16, n / 16) are one run of 2*bits bytes
// (docs/FORMATS.md, "Trellis k-bit"); the scale changes every group_size (>= 16) codes.
inline void moe_decode16_trellis(
    thread const MoeProj& p, constant MoeWeightArgs& a, MoeFmt f, uint e, uint n, uint k0,
    thread float* v) {
  const uint K = a.K, N = a.N, bits = f.bits;
  device const uint8_t* run = p.w + moe_trellis_tile_offset(e, k0 >> 4, n >> 4, K, N, bits) +
                              (n & 15u) * moe_trellis_run_bytes(bits);
  const float s = moe_load_scale(p.s, a.scale_kind,
                                 moe_trellis_scale_index(e, k0 / a.group_size, n, a.groups, N));
  const float sv = (a.flags & 4u) ? moe_load_scale(p.sv, a.sign_kind >> 2, moe_trellis_sv_index(e, n, N)) : 1.0f;
  const uint grid_base = moe_trellis_grid_index(e, 0, bits, (a.flags & 8u) ? 1u : 0u);
  for (uint i = 0; i < 16; ++i) {
    const uint q = moe_trellis_index_at(run, i, bits);
    const float level = moe_load_scale(p.b, a.grid_kind, grid_base + q);
    const float su = (a.flags & 2u) ? moe_load_scale(p.su, a.sign_kind & 3u, moe_trellis_su_index(e, k0 + i, K)) : 1.0f;
    v[i] = moe_trellis_value(level, s, su, sv);
  }
}

// Decodes codes [k0, k0 + cnt) of row n of expert e, cnt in {32, 64}, k0 a multiple of 32,
// reading each affine/fp4 scale (and bias) once: a 64-code chunk inside one group shares them.
inline void moe_decode_chunk(
    thread const MoeProj& p, constant MoeWeightArgs& a, MoeFmt f, uint e, uint n, uint k0,
    uint cnt, thread float* v) {
  if (f.mode == 2) {
    for (uint h = 0; h < cnt; h += 16) {
      moe_decode16_trellis(p, a, f, e, n, k0 + h, v + h);
    }
    return;
  }
  const size_t row = size_t(e) * a.N + n;
  for (uint h = 0; h < cnt; h += MOE_HALF) {
    const uint kk = k0 + h;
    if (h == 0 || kk % a.group_size == 0) {
      const size_t g = row * a.groups + kk / a.group_size;
      v[MOE_CHUNK] = moe_load_scale(p.s, a.scale_kind, g);
      v[MOE_CHUNK + 1] = f.mode == 0 ? moe_load_scale(p.b, a.scale_kind, g) : 0.0f;
    }
    moe_decode32_rowmajor(p, a, f, row, kk, v[MOE_CHUNK], v[MOE_CHUNK + 1], v + h);
  }
}
