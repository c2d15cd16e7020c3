// Decode path for experts with few tokens (C <= 4): dot products straight from the packed
// affine words, with no decoded panel in between.
//
// One 8-lane vector covers 8 consecutive elements of a packed row. For 4-bit, the vector
// is one word broadcast to all lanes and masked with 0xF << 4l in lane l; for 8-bit, two
// words (lanes alternate between them) masked with 0xFF << 8(l/2). Converted to float, lane
// l holds q * 2^shift(l), exactly (at most 8 significant bits). Instead of shifting the
// codes down, the activations are pre-scaled once per call by 2^-shift(l) and permuted into
// lane order ("lane-transformed" rows), so a multiply-add of the masked word with the
// transformed activations is exactly sum q_k x_k.
// The top field of a word (bits 28..31, resp. 24..31) would convert as a negative int32:
// its sign bit is flipped before the mask, so the lane holds q - 2^(BITS-1) instead, and
// 2^(BITS-1) * (sum of x over those lanes) is added back per group.
// Per group: y += scale * sum(q x) + bias * sum(x)  (MLX's affine: value = scale * q + bias).
#pragma once

#include <cmath>
#include <functional>

#include "cpu/parallel.h"
#include "cpu/quant.h"

namespace mlx_moe::cpu {

template <int BITS>
struct LaneLayout {
  static_assert(BITS == 4 || BITS == 8, "lane layout exists for 4- and 8-bit");
  static constexpr int WORDS = BITS / 4;  // packed words per 8-lane vector
  // element (within the 8-element block) and shift of lane l
  static constexpr int elem(int l) { return BITS == 4 ? l : (l % 2) * 4 + l / 2; }
  static constexpr int shift(int l) { return BITS == 4 ? 4 * l : 8 * (l / 2); }
  static constexpr bool flipped(int l) { return shift(l) + BITS == 32; }
};

// Lane-transformed activation row: xt[K] (permuted, scaled), and per group the plain sum
// of x and the correction sum of the sign-flipped lanes times 2^(BITS-1).
template <int BITS>
void lane_transform(const float* x, int K, int group_size, float* xt, float* gsum, float* gcorr) {
  using L = LaneLayout<BITS>;
  for (int v = 0; v < K / 8; ++v) {
    for (int l = 0; l < 8; ++l) {
      xt[v * 8 + l] = x[v * 8 + L::elem(l)] * std::ldexp(1.0f, -L::shift(l));
    }
  }
  for (int g = 0; g < K / group_size; ++g) {
    float s = 0.f, c = 0.f;
    for (int v = g * group_size / 8; v < (g + 1) * group_size / 8; ++v) {
      for (int l = 0; l < 8; ++l) {
        s += x[v * 8 + L::elem(l)];
        if (L::flipped(l)) c += x[v * 8 + L::elem(l)];
      }
    }
    gsum[g] = s;
    gcorr[g] = c * float(1 << (BITS - 1));
  }
}

struct LaneRow {
  const float* xt;
  const float* gsum;
  const float* gcorr;
};

template <int BITS>
inline v8f lane_codes(const uint32_t* words, int v) {
  using L = LaneLayout<BITS>;
  v8u W;
  if constexpr (BITS == 4) {
    uint32_t w = words[v];
    W = v8u{w, w, w, w, w, w, w, w};
  } else {
    uint32_t w0 = words[2 * v], w1 = words[2 * v + 1];
    W = v8u{w0, w1, w0, w1, w0, w1, w0, w1};
  }
  constexpr uint32_t M = (1u << BITS) - 1u;
  const v8u mask = {M << L::shift(0), M << L::shift(1), M << L::shift(2), M << L::shift(3),
                    M << L::shift(4), M << L::shift(5), M << L::shift(6), M << L::shift(7)};
  const v8u flip = {L::flipped(0) ? 0x80000000u : 0u, L::flipped(1) ? 0x80000000u : 0u,
                    L::flipped(2) ? 0x80000000u : 0u, L::flipped(3) ? 0x80000000u : 0u,
                    L::flipped(4) ? 0x80000000u : 0u, L::flipped(5) ? 0x80000000u : 0u,
                    L::flipped(6) ? 0x80000000u : 0u, L::flipped(7) ? 0x80000000u : 0u};
  v8u q = (W ^ flip) & mask;
  return __builtin_convertvector(reinterpret_cast<v8i&>(q), v8f);
}

inline float hsum(v8f v) {
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += v[i];
  return s;
}

// out[c][r] = row (n0 + r) of matrix m dotted with C lane-transformed rows, r < R.
template <int BITS, int C, int R>
inline void affine_rows_dot(const WeightView& wv, int64_t m, int n0, const LaneRow* in,
                            float out[][PANEL_N], int rbase) {
  const int G = wv.groups;
  const int vpg = wv.fmt.group_size / 8;  // vectors per group
  const uint32_t* rows[R];
  for (int r = 0; r < R; ++r) rows[r] = reinterpret_cast<const uint32_t*>(wv.row(m, n0 + r));
  v8f acc[R][C];
  float extra[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      acc[r][c] = v8f{};
      extra[r][c] = 0.f;
    }
  for (int g = 0; g < G; ++g) {
    v8f accg[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) accg[r][c] = v8f{};
    for (int v = g * vpg; v < (g + 1) * vpg; ++v) {
      v8f xv[C];
      for (int c = 0; c < C; ++c) xv[c] = load8(in[c].xt + v * 8);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        v8f q = lane_codes<BITS>(rows[r], v);
        for (int c = 0; c < C; ++c) accg[r][c] += q * xv[c];
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = to_float(wv.scales, wv.sdtype, wv.group_index(m, n0 + r, g));
      const float b = to_float(wv.biases, wv.sdtype, wv.group_index(m, n0 + r, g));
      for (int c = 0; c < C; ++c) {
        acc[r][c] += s * accg[r][c];
        extra[r][c] += s * in[c].gcorr[g] + b * in[c].gsum[g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[c][rbase + r] = hsum(acc[r][c]) + extra[r][c];
}

// Rows [n0, n0 + nr) for C tokens; rows are taken 4, 2 or 1 at a time to keep the
// accumulators in registers.
template <int BITS, int C>
void affine_block_dot(const WeightView& wv, int64_t m, int n0, int nr, const LaneRow* in,
                      float out[][PANEL_N]) {
  constexpr int R = C == 1 ? 4 : (C == 2 ? 2 : 1);
  int r = 0;
  for (; r + R <= nr; r += R) affine_rows_dot<BITS, C, R>(wv, m, n0 + r, in, out, r);
  for (; r < nr; ++r) affine_rows_dot<BITS, C, 1>(wv, m, n0 + r, in, out, r);
}

template <int BITS>
void affine_block_dot(int c, const WeightView& wv, int64_t m, int n0, int nr, const LaneRow* in,
                      float out[][PANEL_N]) {
  switch (c) {
    case 1: return affine_block_dot<BITS, 1>(wv, m, n0, nr, in, out);
    case 2: return affine_block_dot<BITS, 2>(wv, m, n0, nr, in, out);
    case 3: return affine_block_dot<BITS, 3>(wv, m, n0, nr, in, out);
    default: return affine_block_dot<BITS, 4>(wv, m, n0, nr, in, out);
  }
}

constexpr int GEMV_MAX_TOKENS = 4;

inline bool has_lane_path(const Format& f) {
  return f.mode == Mode::Affine && (f.bits == 4 || f.bits == 8);
}

// Lane-transformed copies of `rows` activation rows of length K for format f.
struct LaneRows {
  int K = 0, G = 0;
  std::vector<float> xt, gsum, gcorr;
  // row(i) gives activation row i; only rows with needed(i) are transformed.
  void build(const Format& f, int K_, int64_t rows, const std::function<const float*(int64_t)>& row,
             const std::function<bool(int64_t)>& needed) {
    K = K_;
    G = K / f.group_size;
    xt.resize(size_t(rows) * K);
    gsum.resize(size_t(rows) * G);
    gcorr.resize(size_t(rows) * G);
    parallel_for((rows + 15) / 16, [&](int64_t t, int) {
      for (int64_t i = t * 16; i < std::min<int64_t>(rows, t * 16 + 16); ++i) {
        if (!needed(i)) continue;
        auto fn = f.bits == 4 ? lane_transform<4> : lane_transform<8>;
        fn(row(i), K, f.group_size, xt.data() + i * K, gsum.data() + i * G, gcorr.data() + i * G);
      }
    });
  }
  LaneRow get(int64_t i) const {
    return {xt.data() + i * K, gsum.data() + i * G, gcorr.data() + i * G};
  }
};

}  // namespace mlx_moe::cpu
