// Dequantize one (stacked) weight to [rows, K]: one thread per 8 consecutive values of a
// row. The format math is kernels/common/{affine,fp4}.h, shared with the CPU and CUDA.
#include <metal_stdlib>

#include "moe_decode.h"

using namespace metal;

template <typename T, typename S>
[[kernel]] void moe_dequant_affine(
    device const uint8_t* w [[buffer(0)]],
    device const S* scales [[buffer(1)]],
    device const S* biases [[buffer(2)]],
    device T* out [[buffer(3)]],
    constant MoeDequantArgs& args [[buffer(4)]],
    uint gid [[thread_position_in_grid]]) {
  const uint K = args.w.K, bits = args.w.bits;
  const uint per_row = K / 8;
  const uint row = gid / per_row;
  if (row >= args.rows) {
    return;
  }
  const uint k0 = (gid % per_row) * 8;
  device const uint8_t* r = w + size_t(row) * args.w.row_bytes;
  const uint g = k0 / args.w.group_size;  // 8 | group_size: one group per thread
  const float s = float(scales[size_t(row) * args.w.groups + g]);
  const float b = float(biases[size_t(row) * args.w.groups + g]);
  for (uint i = k0; i < k0 + 8; ++i) {
    uint byte = (i * bits) / 8;
    uint window = r[byte];
    if (byte + 1 < args.w.row_bytes) {
      window |= uint(r[byte + 1]) << 8;
    }
    out[size_t(row) * K + i] = T(moe_affine_value(moe_affine_code(window, i, bits), s, b));
  }
}

template <typename T>
[[kernel]] void moe_dequant_mxfp4(
    device const uint8_t* w [[buffer(0)]],
    device const uint8_t* scales [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant MoeDequantArgs& args [[buffer(3)]],
    uint gid [[thread_position_in_grid]]) {
  const uint K = args.w.K;
  const uint per_row = K / 8;
  const uint row = gid / per_row;
  if (row >= args.rows) {
    return;
  }
  const uint k0 = (gid % per_row) * 8;
  device const uint8_t* r = w + size_t(row) * args.w.row_bytes;
  // mx.dequantize rounds the group scale to the output dtype first (docs/FORMATS.md).
  const float s = float(T(moe_e8m0_scale(scales[size_t(row) * args.w.groups + k0 / 32])));
  const bool quarter = (args.w.flags & 1u) != 0;
  for (uint i = k0; i < k0 + 8; ++i) {
    uint code = moe_fp4_code(r[i / 2], i);
    float v = quarter ? moe_fp4_e2m1_quarter_subnormal(code) : moe_fp4_e2m1(code);
    out[size_t(row) * K + i] = T(v * s);
  }
}

// Trellis: one thread per run of 16 codes (16 consecutive k of one output row n).
template <typename T>
[[kernel]] void moe_dequant_trellis(
    device const uint8_t* w [[buffer(0)]],
    device const uint8_t* scales [[buffer(1)]],
    device const uint8_t* grid [[buffer(2)]],
    device const uint8_t* su [[buffer(3)]],
    device const uint8_t* sv [[buffer(4)]],
    device T* out [[buffer(5)]],
    constant MoeDequantArgs& args [[buffer(6)]],
    uint gid [[thread_position_in_grid]]) {
  const uint K = args.w.K, N = args.w.N;
  const uint runs = K / 16;
  const uint row = gid / runs;  // over all matrices: e * N + n
  if (row >= args.rows) {
    return;
  }
  const uint e = row / N, n = row % N, k0 = (gid % runs) * 16;
  const MoeProj p = {w, scales, grid, su, sv};
  float v[16];
  moe_decode16_trellis(p, args.w, MoeFmt{args.w.mode, args.w.bits}, e, n, k0, v);
  for (uint i = 0; i < 16; ++i) {
    out[size_t(row) * K + k0 + i] = T(v[i]);
  }
}

#define MOE_INSTANTIATE_DQ_TRELLIS(tname, T)                                                     \
  template [[host_name("moe_dequant_trellis_" #tname)]] [[kernel]] void moe_dequant_trellis<T>( \
      device const uint8_t* w [[buffer(0)]], device const uint8_t* scales [[buffer(1)]],        \
      device const uint8_t* grid [[buffer(2)]], device const uint8_t* su [[buffer(3)]],         \
      device const uint8_t* sv [[buffer(4)]], device T* out [[buffer(5)]],                      \
      constant MoeDequantArgs& args [[buffer(6)]], uint gid [[thread_position_in_grid]]);

#define MOE_INSTANTIATE_DQ_AFFINE(tname, T, sname, S)                                      \
  template [[host_name("moe_dequant_affine_" #tname "_" #sname)]] [[kernel]] void          \
  moe_dequant_affine<T, S>(                                                                \
      device const uint8_t* w [[buffer(0)]], device const S* scales [[buffer(1)]],        \
      device const S* biases [[buffer(2)]], device T* out [[buffer(3)]],                   \
      constant MoeDequantArgs& args [[buffer(4)]], uint gid [[thread_position_in_grid]]);

#define MOE_INSTANTIATE_DQ_FP4(tname, T)                                                   \
  template [[host_name("moe_dequant_mxfp4_" #tname)]] [[kernel]] void moe_dequant_mxfp4<T>( \
      device const uint8_t* w [[buffer(0)]], device const uint8_t* scales [[buffer(1)]],  \
      device T* out [[buffer(2)]], constant MoeDequantArgs& args [[buffer(3)]],           \
      uint gid [[thread_position_in_grid]]);

#define MOE_INSTANTIATE_DQ_AFFINE_ALL_SCALES(tname, T)      \
  MOE_INSTANTIATE_DQ_AFFINE(tname, T, float32, float)       \
  MOE_INSTANTIATE_DQ_AFFINE(tname, T, float16, half)        \
  MOE_INSTANTIATE_DQ_AFFINE(tname, T, bfloat16, bfloat)

MOE_INSTANTIATE_DQ_AFFINE_ALL_SCALES(float32, float)
MOE_INSTANTIATE_DQ_AFFINE_ALL_SCALES(float16, half)
MOE_INSTANTIATE_DQ_AFFINE_ALL_SCALES(bfloat16, bfloat)
MOE_INSTANTIATE_DQ_FP4(float32, float)
MOE_INSTANTIATE_DQ_FP4(float16, half)
MOE_INSTANTIATE_DQ_FP4(bfloat16, bfloat)
MOE_INSTANTIATE_DQ_TRELLIS(float32, float)
MOE_INSTANTIATE_DQ_TRELLIS(float16, half)
MOE_INSTANTIATE_DQ_TRELLIS(bfloat16, bfloat)
