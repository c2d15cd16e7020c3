// Trellis k-bit weights (16x16 tiles of packed codebook indices): the one definition of the
// decode used by every backend. Bit-exact specification: docs/FORMATS.md, "Trellis k-bit".
//
// A projection W [E, N, K] (N out features, K in features, y = x @ W^T) is stored as
//   w      uint8 [E, TK = K/16, TN = ceil(N/16), 32*bits]  tiles, (kt, nt) row-major
//   scales        [E, K/group_size, N]                     float16 | bfloat16 | float32
//   grid          [2^bits] (shared) or [E, 2^bits]         float32 | float16
//   su [E, K], sv [E, N] (optional)                        float16 | bfloat16 | float32
// Inside a tile, element (k, n) is number p = (n % 16) * 16 + (k % 16): the 16 k of one
// column n are consecutive, so a column's 16 indices are the 2*bits bytes starting at byte
// (n % 16) * 2 * bits of the tile. Index p occupies bits [p*bits, (p+1)*bits) of the tile,
// least significant bit first (bit j of byte i is bit 8*i + j). The tile's last index ends
// exactly at its last byte (256*bits is a multiple of 32), so every read below stays inside
// the tile: no padding is needed after the array.
//   W[e, n, k] = ((grid[idx] * scales[e, k / group_size, n]) * su[e, k]) * sv[e, n]  (fp32)
//
// Everything here works on values or on a template pointer type `Ptr` (any of Metal's
// device/constant/threadgroup/thread pointers, a CUDA or host pointer): compiled unchanged as
// C++20, Metal Shading Language and CUDA C++. No C++17 features (MSL is C++14-based).
#pragma once
#include "common/defines.h"

MOE_CONSTANT uint32_t MOE_TRELLIS_TILE = 16u;        // tile edge, in k and in n
MOE_CONSTANT uint32_t MOE_TRELLIS_TILE_ELEMS = 256u;  // indices per tile

// ---- sizes ----------------------------------------------------------------------------
MOE_FN uint32_t moe_trellis_levels(uint32_t bits) { return 1u << bits; }
// 256 * bits / 8: a multiple of 4 for every bits, so tiles stay 4-byte aligned.
MOE_FN uint32_t moe_trellis_tile_bytes(uint32_t bits) { return 32u * bits; }
// Bytes of one column run (16 consecutive k of one n inside a tile).
MOE_FN uint32_t moe_trellis_run_bytes(uint32_t bits) { return 2u * bits; }
MOE_FN uint32_t moe_trellis_tiles_k(uint32_t K) { return (K + 15u) / 16u; }
MOE_FN uint32_t moe_trellis_tiles_n(uint32_t N) { return (N + 15u) / 16u; }
MOE_FN uint32_t moe_trellis_groups(uint32_t K, uint32_t group_size) { return K / group_size; }
MOE_FN uint64_t moe_trellis_expert_bytes(uint32_t K, uint32_t N, uint32_t bits) {
  return uint64_t(moe_trellis_tiles_k(K)) * uint64_t(moe_trellis_tiles_n(N)) *
         uint64_t(moe_trellis_tile_bytes(bits));
}

// ---- positions ------------------------------------------------------------------------
// Byte offset of tile (kt, nt) of expert e in w.
MOE_FN uint64_t moe_trellis_tile_offset(uint32_t e, uint32_t kt, uint32_t nt, uint32_t K,
                                        uint32_t N, uint32_t bits) {
  uint64_t tk = moe_trellis_tiles_k(K), tn = moe_trellis_tiles_n(N);
  return ((uint64_t(e) * tk + uint64_t(kt)) * tn + uint64_t(nt)) *
         uint64_t(moe_trellis_tile_bytes(bits));
}
// Number of element (k, n) inside its tile (k, n may be global: only k % 16, n % 16 count).
MOE_FN uint32_t moe_trellis_pos(uint32_t k, uint32_t n) { return (n & 15u) * 16u + (k & 15u); }
// First bit of element p in its tile.
MOE_FN uint32_t moe_trellis_bit(uint32_t p, uint32_t bits) { return p * bits; }
// Byte offset in w of the first byte of element (k, n) of expert e (the low byte of its
// 16-bit window); its first bit in that byte is moe_trellis_bit(moe_trellis_pos(k, n), bits) & 7.
MOE_FN uint64_t moe_trellis_element_byte(uint32_t e, uint32_t k, uint32_t n, uint32_t K,
                                         uint32_t N, uint32_t bits) {
  return moe_trellis_tile_offset(e, k >> 4, n >> 4, K, N, bits) +
         uint64_t(moe_trellis_bit(moe_trellis_pos(k, n), bits) >> 3u);
}
// Flat index of scale (e, g, n) in scales [E, G, N]; of su (e, k) in [E, K]; of sv (e, n).
MOE_FN uint64_t moe_trellis_scale_index(uint32_t e, uint32_t g, uint32_t n, uint32_t G,
                                        uint32_t N) {
  return (uint64_t(e) * G + g) * N + n;
}
MOE_FN uint64_t moe_trellis_su_index(uint32_t e, uint32_t k, uint32_t K) {
  return uint64_t(e) * K + k;
}
MOE_FN uint64_t moe_trellis_sv_index(uint32_t e, uint32_t n, uint32_t N) {
  return uint64_t(e) * N + n;
}
// Flat index of level q of expert e's codebook: grid [2^bits] (shared, per_expert == 0)
// or [E, 2^bits] (per_expert != 0).
MOE_FN uint32_t moe_trellis_grid_index(uint32_t e, uint32_t q, uint32_t bits,
                                       uint32_t per_expert) {
  return (per_expert != 0u ? e << bits : 0u) + q;
}

// ---- index extraction -----------------------------------------------------------------
MOE_FN uint32_t moe_trellis_mask(uint32_t bits) { return (1u << bits) - 1u; }
// Index p from a 16-bit little-endian window whose low byte is tile byte (p*bits) >> 3
// (bits <= 8 and a start bit <= 7 always fit in 16 bits).
MOE_FN uint32_t moe_trellis_index16(uint32_t window16, uint32_t p, uint32_t bits) {
  return (window16 >> ((p * bits) & 7u)) & moe_trellis_mask(bits);
}
// Index whose first bit is bit `bit` (< 32) of the little-endian pair of 32-bit words
// (lo, hi) = tile words (p*bits) >> 5 and the next one; `hi` is only read when the index
// straddles the two words (never for the tile's last word).
MOE_FN uint32_t moe_trellis_index64(uint32_t lo, uint32_t hi, uint32_t bit, uint32_t bits) {
  uint32_t v = lo >> bit;
  if (bit + bits > 32u) {
    v |= hi << (32u - bit);
  }
  return v & moe_trellis_mask(bits);
}
// Index p of a tile from its bytes (`tile` points at the tile's first byte, any pointer
// type whose elements convert to uint32_t: uint8 bytes). Reads the second byte only when
// the index straddles a byte boundary, so it never reads past the tile.
template <typename Ptr>
MOE_FN uint32_t moe_trellis_index_at(Ptr tile, uint32_t p, uint32_t bits) {
  uint32_t bit = p * bits;
  uint32_t byte = bit >> 3u;
  uint32_t s = bit & 7u;
  uint32_t v = uint32_t(tile[byte]);
  if (s + bits > 8u) {
    v |= uint32_t(tile[byte + 1u]) << 8u;
  }
  return (v >> s) & moe_trellis_mask(bits);
}
template <uint32_t BITS, typename Ptr>
MOE_FN uint32_t moe_trellis_index_at(Ptr tile, uint32_t p) {
  return moe_trellis_index_at(tile, p, BITS);
}
// The same from a tile read as little-endian 32-bit words (`words` points at the tile's
// first word; tiles are 32*bits bytes, so 4-byte aligned when w is).
template <typename Ptr>
MOE_FN uint32_t moe_trellis_index_at_words(Ptr words, uint32_t p, uint32_t bits) {
  uint32_t bit = p * bits;
  uint32_t wi = bit >> 5u;
  uint32_t s = bit & 31u;
  uint32_t lo = uint32_t(words[wi]);
  uint32_t hi = (s + bits > 32u) ? uint32_t(words[wi + 1u]) : 0u;
  return moe_trellis_index64(lo, hi, s, bits);
}

// Decode the 16 indices of one column run (16 consecutive k of one n; `run` points at tile
// byte (n % 16) * 2 * BITS) into out[0..15] (out[i] is k = 16*kt + i). BITS is a compile-time
// constant so the loop unrolls to fixed shifts.
template <uint32_t BITS, typename Ptr, typename OutPtr>
MOE_FN void moe_trellis_unpack_run16(Ptr run, OutPtr out) {
  for (uint32_t i = 0u; i < 16u; ++i) {
    out[i] = moe_trellis_index_at(run, i, BITS);
  }
}
// Decode a whole tile from its bytes: out[p] for p = n_in * 16 + k_in, p in 0..255.
template <uint32_t BITS, typename Ptr, typename OutPtr>
MOE_FN void moe_trellis_unpack_tile(Ptr tile, OutPtr out) {
  for (uint32_t p = 0u; p < 256u; ++p) {
    out[p] = moe_trellis_index_at(tile, p, BITS);
  }
}
// Decode a whole tile from its 8*BITS little-endian 32-bit words: out[p] as above.
template <uint32_t BITS, typename Ptr, typename OutPtr>
MOE_FN void moe_trellis_unpack_tile_words(Ptr words, OutPtr out) {
  for (uint32_t p = 0u; p < 256u; ++p) {
    out[p] = moe_trellis_index_at_words(words, p, BITS);
  }
}

// ---- value ----------------------------------------------------------------------------
// W[e, n, k] = ((grid[idx] * scale) * su) * sv, in float32 (pass 1.0f for an absent su/sv).
MOE_FN float moe_trellis_value(float level, float scale, float su, float sv) {
  return ((level * scale) * su) * sv;
}
MOE_FN float moe_trellis_value(float level, float scale) { return level * scale; }

// Element (k, n) of expert e, straight from the arrays (the CPU reference loop; kernels that
// decode whole tiles use the unpack functions). WPtr: uint8 bytes of w; SPtr, GPtr, UPtr,
// VPtr: any element type convertible to float (pass su/sv null pointers with has_su/has_sv 0).
template <typename WPtr, typename SPtr, typename GPtr, typename UPtr, typename VPtr>
MOE_FN float moe_trellis_element(WPtr w, SPtr scales, GPtr grid, UPtr su, VPtr sv, uint32_t e,
                                 uint32_t k, uint32_t n, uint32_t K, uint32_t N, uint32_t bits,
                                 uint32_t group_size, uint32_t grid_per_expert, uint32_t has_su,
                                 uint32_t has_sv) {
  uint64_t t = moe_trellis_tile_offset(e, k >> 4, n >> 4, K, N, bits);
  uint32_t q = moe_trellis_index_at(w + t, moe_trellis_pos(k, n), bits);
  float level = float(grid[moe_trellis_grid_index(e, q, bits, grid_per_expert)]);
  float s = float(scales[moe_trellis_scale_index(e, k / group_size, n,
                                                 moe_trellis_groups(K, group_size), N)]);
  float u = has_su != 0u ? float(su[moe_trellis_su_index(e, k, K)]) : 1.0f;
  float v = has_sv != 0u ? float(sv[moe_trellis_sv_index(e, n, N)]) : 1.0f;
  return moe_trellis_value(level, s, u, v);
}
