// FP4 E2M1 and its group scales: the one definition used by every backend.
// Bit-exact specification: docs/FORMATS.md, "FP4 E2M1".
#pragma once
#include "common/defines.h"

// E2M1 code (low 4 bits of `code`): bit 3 sign, bits 2..1 exponent e, bit 0 mantissa m.
//   e == 0 : m * 0.5                   (subnormal: 0, 0.5)
//   e >= 1 : 2^(e-1) * (1 + m / 2)     (1, 1.5, 2, 3, 4, 6)
// The magnitudes are {0, 0.5, 1, 1.5, 2, 3, 4, 6}: OCP MX v1.0, NVIDIA and MLX agree.
MOE_FN float moe_fp4_e2m1(uint32_t code) {
  uint32_t e = (code >> 1) & 3u;
  uint32_t m = code & 1u;
  float mag = (e == 0u) ? 0.5f * float(m) : float(1u << (e - 1u)) * (1.0f + 0.5f * float(m));
  return (code & 8u) ? -mag : mag;
}

// Opt-in only (never the default): a decoder some tools used whose subnormal step is 0.25,
// giving magnitudes {0, 0.25, 1, 1.5, 2, 3, 4, 6}. It has no 0.5 and disagrees with
// MLX, OCP MX and every FP4 checkpoint; it exists to read data that was encoded with it.
MOE_FN float moe_fp4_e2m1_quarter_subnormal(uint32_t code) {
  uint32_t e = (code >> 1) & 3u;
  uint32_t m = code & 1u;
  float mag = (e == 0u) ? 0.25f * float(m) : float(1u << (e - 1u)) * (1.0f + 0.5f * float(m));
  return (code & 8u) ? -mag : mag;
}

// E8M0 group scale (MX): 2^(s - 127). s = 0 is 2^-127 (a binary32 subnormal), s = 255 is
// +inf, as MLX computes it (an element 0 times that scale is then NaN, as in MLX).
MOE_FN float moe_e8m0_scale(uint32_t s) {
  return s == 0u ? moe_bits_to_float(0x00400000u) : moe_bits_to_float((s & 0xffu) << 23);
}

// Element `i` of an FP4 row packed two per byte, low nibble first (MLX's mxfp4 layout:
// eight codes per uint32 word, element 0 in bits 0..3).
MOE_FN uint32_t moe_fp4_code(uint32_t byte_value, uint32_t i) {
  return (byte_value >> ((i & 1u) * 4u)) & 0xfu;
}
