#include "cpu/quant.h"

#include <algorithm>

namespace mlx_moe::cpu {

const Fp4Table& fp4_table(bool quarter) {
  static const Fp4Table standard(false);
  static const Fp4Table quarter_table(true);
  return quarter ? quarter_table : standard;
}

namespace {

inline uint32_t affine_code_at(const uint8_t* row, int64_t row_bytes, int64_t i, int bits) {
  int64_t bit = i * bits;
  int64_t b = bit >> 3;
  uint32_t window = row[b];
  if (b + 1 < row_bytes) window |= uint32_t(row[b + 1]) << 8;
  return moe_affine_code(window, uint32_t(i), uint32_t(bits));
}

void dequant_row_affine(const WeightView& wv, int64_t m, int64_t n, float* out) {
  const uint8_t* row = wv.row(m, n);
  const int gs = wv.fmt.group_size, bits = wv.fmt.bits;
  for (int g = 0; g < wv.groups; ++g) {
    float s = to_float(wv.scales, wv.sdtype, wv.group_index(m, n, g));
    float b = to_float(wv.biases, wv.sdtype, wv.group_index(m, n, g));
    int k0 = g * gs;
    if (bits == 4) {
      const uint8_t* p = row + k0 / 2;
      for (int j = 0; j < gs / 2; ++j) {
        out[k0 + 2 * j] = moe_affine_value(p[j] & 0xf, s, b);
        out[k0 + 2 * j + 1] = moe_affine_value(p[j] >> 4, s, b);
      }
    } else if (bits == 8) {
      const uint8_t* p = row + k0;
      for (int j = 0; j < gs; ++j) out[k0 + j] = moe_affine_value(p[j], s, b);
    } else {
      for (int j = 0; j < gs; ++j) {
        out[k0 + j] = moe_affine_value(affine_code_at(row, wv.row_bytes, k0 + j, bits), s, b);
      }
    }
  }
}

void dequant_row_fp4(const WeightView& wv, int64_t m, int64_t n, float* out, bool fp16_scales) {
  const uint8_t* row = wv.row(m, n);
  const float* lut = fp4_table(wv.fmt.fp4_quarter_subnormal).v;
  const uint8_t* sc = static_cast<const uint8_t*>(wv.scales);
  const int gs = wv.fmt.group_size;
  for (int g = 0; g < wv.groups; ++g) {
    float s = moe_e8m0_scale(sc[wv.group_index(m, n, g)]);
    if (fp16_scales) s = float(mx::float16_t(s));
    const uint8_t* p = row + (g * gs) / 2;
    float* o = out + g * gs;
    for (int j = 0; j < gs / 2; ++j) {
      o[2 * j] = lut[p[j] & 0xf] * s;
      o[2 * j + 1] = lut[p[j] >> 4] * s;
    }
  }
}

inline float grid_level(const WeightView& wv, int64_t m, uint32_t q) {
  int64_t i = (wv.grid_per_expert ? (m << wv.fmt.bits) : 0) + q;
  return wv.gdtype == mx::float32 ? static_cast<const float*>(wv.grid)[i]
                                  : float(static_cast<const mx::float16_t*>(wv.grid)[i]);
}

// Row n (output feature) of trellis matrix m: for each 16-k tile row, the 16 indices of
// column n are one run of 2*bits bytes (docs/FORMATS.md).
template <uint32_t BITS>
void dequant_row_trellis_bits(const WeightView& wv, int64_t m, int64_t n, float* out) {
  const uint32_t K = uint32_t(wv.K), N = uint32_t(wv.N);
  const uint32_t TK = moe_trellis_tiles_k(K);
  const float sv = wv.sv ? to_float(wv.sv, wv.vdtype, moe_trellis_sv_index(uint32_t(m), uint32_t(n), N)) : 1.f;
  uint32_t idx[16];
  for (uint32_t kt = 0; kt < TK; ++kt) {
    const uint8_t* tile = wv.w + moe_trellis_tile_offset(uint32_t(m), kt, uint32_t(n) >> 4, K, N, BITS);
    moe_trellis_unpack_run16<BITS>(tile + (uint32_t(n) & 15u) * moe_trellis_run_bytes(BITS), idx);
    for (uint32_t i = 0; i < 16; ++i) {
      const uint32_t k = kt * 16 + i;
      const float s = to_float(wv.scales, wv.sdtype,
                               moe_trellis_scale_index(uint32_t(m), k / wv.fmt.group_size,
                                                       uint32_t(n), uint32_t(wv.groups), N));
      const float su = wv.su ? to_float(wv.su, wv.udtype, moe_trellis_su_index(uint32_t(m), k, K)) : 1.f;
      out[k] = moe_trellis_value(grid_level(wv, m, idx[i]), s, su, sv);
    }
  }
}

void dequant_row_trellis(const WeightView& wv, int64_t m, int64_t n, float* out) {
  switch (wv.fmt.bits) {
    case 2: return dequant_row_trellis_bits<2>(wv, m, n, out);
    case 3: return dequant_row_trellis_bits<3>(wv, m, n, out);
    case 4: return dequant_row_trellis_bits<4>(wv, m, n, out);
    case 5: return dequant_row_trellis_bits<5>(wv, m, n, out);
    case 6: return dequant_row_trellis_bits<6>(wv, m, n, out);
    case 7: return dequant_row_trellis_bits<7>(wv, m, n, out);
    default: return dequant_row_trellis_bits<8>(wv, m, n, out);
  }
}

// Eight rows at a time, K-major: one packed word of each row is decoded into PER
// vectors of 8 lanes (one lane per row), written to panel[k * 16 + half * 8].
template <int BITS>
void affine_panel8(const WeightView& wv, int64_t m, int n0, float* panel,
                   std::vector<float>& scratch) {
  constexpr int PER = 32 / BITS;
  constexpr uint32_t MASK = (1u << BITS) - 1u;
  const int G = wv.groups, gs = wv.fmt.group_size;
  scratch.resize(size_t(2) * G * 8);
  float* sc = scratch.data();
  float* bi = sc + G * 8;
  const uint32_t* rows[8];
  for (int r = 0; r < 8; ++r) {
    rows[r] = reinterpret_cast<const uint32_t*>(wv.row(m, n0 + r));
    for (int g = 0; g < G; ++g) {
      sc[g * 8 + r] = to_float(wv.scales, wv.sdtype, wv.group_index(m, n0 + r, g));
      bi[g * 8 + r] = to_float(wv.biases, wv.sdtype, wv.group_index(m, n0 + r, g));
    }
  }
  const int words = wv.K / PER;
  const int words_per_group = gs / PER;
  for (int wi = 0; wi < words; ++wi) {
    v8u W = {rows[0][wi], rows[1][wi], rows[2][wi], rows[3][wi],
             rows[4][wi], rows[5][wi], rows[6][wi], rows[7][wi]};
    int g = wi / words_per_group;
    v8f S = load8(sc + g * 8), B = load8(bi + g * 8);
    float* out = panel + int64_t(wi) * PER * PANEL_N;
#pragma GCC unroll 16
    for (int j = 0; j < PER; ++j) {
      v8u q = (W >> (BITS * j)) & MASK;
      v8f qf = __builtin_convertvector(reinterpret_cast<v8i&>(q), v8f);
      store8(out + j * PANEL_N, qf * S + B);
    }
  }
}

template <int BITS>
void affine_panel(const WeightView& wv, int64_t m, int n0, int nr, float* panel,
                  std::vector<float>& scratch) {
  int r = 0;
  for (; r + 8 <= nr; r += 8) affine_panel8<BITS>(wv, m, n0 + r, panel + r, scratch);
  return (void)r;
}

}  // namespace

void dequant_row(const WeightView& wv, int64_t m, int64_t n, float* out, bool fp16_scales) {
  switch (wv.fmt.mode) {
    case Mode::Affine: return dequant_row_affine(wv, m, n, out);
    case Mode::MxFp4: return dequant_row_fp4(wv, m, n, out, fp16_scales);
    case Mode::Trellis: return dequant_row_trellis(wv, m, n, out);
  }
}

void dequant_panel(const WeightView& wv, int64_t m, int n0, int nr, float* panel,
                   std::vector<float>& scratch) {
  const int K = wv.K;
  int done = 0;
  if (wv.fmt.mode == Mode::Affine && (wv.fmt.bits == 2 || wv.fmt.bits == 4 || wv.fmt.bits == 8)) {
    done = nr & ~7;
    if (wv.fmt.bits == 4) affine_panel<4>(wv, m, n0, done, panel, scratch);
    else if (wv.fmt.bits == 8) affine_panel<8>(wv, m, n0, done, panel, scratch);
    else affine_panel<2>(wv, m, n0, done, panel, scratch);
  }
  // Remaining rows (other formats, or a tail of fewer than 8 rows): decode a row, then
  // scatter it into its panel column.
  if (done < PANEL_N) {
    thread_local std::vector<float> rowbuf;
    rowbuf.resize(K);
    for (int r = done; r < PANEL_N; ++r) {
      if (r < nr) {
        dequant_row(wv, m, n0 + r, rowbuf.data());
        for (int k = 0; k < K; ++k) panel[int64_t(k) * PANEL_N + r] = rowbuf[k];
      } else {
        for (int k = 0; k < K; ++k) panel[int64_t(k) * PANEL_N + r] = 0.f;
      }
    }
  }
}

}  // namespace mlx_moe::cpu
