// Register-blocked fp32 micro-kernel: MR activation rows (any addresses) times one
// K-major weight panel of 16 columns, accumulated over the whole K in registers.
// 2*MR vector accumulators of 8 lanes; per k: two panel loads, MR broadcasts, 2*MR FMAs.
#pragma once

#include "cpu/quant.h"

namespace mlx_moe::cpu {

constexpr int MR_MAX = 6;

template <int MR>
inline void gemm_rows_panel(const float* const* x, const float* panel, int K,
                            float out[][PANEL_N]) {
  v8f acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) {
    acc0[r] = v8f{};
    acc1[r] = v8f{};
  }
  const float* p = panel;
#pragma GCC unroll 4
  for (int k = 0; k < K; ++k, p += PANEL_N) {
    v8f b0 = load8(p), b1 = load8(p + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      float a = x[r][k];
      acc0[r] += a * b0;
      acc1[r] += a * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store8(out[r], acc0[r]);
    store8(out[r] + 8, acc1[r]);
  }
}

// out[r][c] = sum_k x[r][k] * panel[k][c] for r < m (m <= MR_MAX).
inline void gemm_tile(int m, const float* const* x, const float* panel, int K,
                      float out[][PANEL_N]) {
  switch (m) {
    case 1: return gemm_rows_panel<1>(x, panel, K, out);
    case 2: return gemm_rows_panel<2>(x, panel, K, out);
    case 3: return gemm_rows_panel<3>(x, panel, K, out);
    case 4: return gemm_rows_panel<4>(x, panel, K, out);
    case 5: return gemm_rows_panel<5>(x, panel, K, out);
    default: return gemm_rows_panel<6>(x, panel, K, out);
  }
}

}  // namespace mlx_moe::cpu
