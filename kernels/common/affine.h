// MLX's affine quantization: the one definition used by every backend.
// Bit-exact specification: docs/FORMATS.md, "Affine (MLX)".
#pragma once
#include "common/defines.h"

// A row of K elements quantized to `bits` bits is a little-endian bit stream: element i
// occupies bits [i*bits, (i+1)*bits) of the row's bytes, least significant bit first.
// For bits in {2, 4, 8} no element straddles a 32-bit word; for {3, 5, 6} one may
// straddle a byte boundary, never more than two bytes (3 + 7 < 16).
// Value: scale[g] * q + bias[g], g = i / group_size, in fp32 with one rounding (fused
// multiply-add): bit-identical on every backend.
MOE_FN float moe_affine_value(uint32_t q, float scale, float bias) {
  return moe_fma(scale, float(q), bias);
}

// Code of element i read from a 16-bit window whose first byte holds bit (i*bits) / 8.
MOE_FN uint32_t moe_affine_code(uint32_t window16, uint32_t i, uint32_t bits) {
  return (window16 >> ((i * bits) & 7u)) & ((1u << bits) - 1u);
}

// Code whose first bit is bit `bit` (< 32) of the little-endian 64-bit pair (lo, hi) of
// packed words: the word-wise form of moe_affine_code, for kernels that load whole words.
MOE_FN uint32_t moe_affine_code64(uint32_t lo, uint32_t hi, uint32_t bit, uint32_t bits) {
  uint32_t v = lo >> bit;
  if (bit + bits > 32u) {
    v |= hi << (32u - bit);
  }
  return v & ((1u << bits) - 1u);
}
