// CPU decoding of every weight format into fp32, on top of the shared format math in
// kernels/common/ (the same headers the Metal and CUDA kernels include).
//
// Two shapes of output:
//  * rows:  out[r * ld + k], the plain [N, K] layout (the dequantize op);
//  * panel: K-major blocks of PANEL_N = 16 rows, panel[k * 16 + r], the layout the GEMM
//           micro-kernels stream (rows past N are zero).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "common/affine.h"
#include "common/fp4.h"
#include "common/trellis.h"
#include "mlx/types/half_types.h"

namespace mlx_moe::cpu {

constexpr int PANEL_N = 16;

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(float* p, v8f v) {
  std::memcpy(p, &v, sizeof(v));
}

inline float to_float(const void* p, mx::Dtype dt, int64_t i) {
  switch (dt) {
    case mx::float32: return static_cast<const float*>(p)[i];
    case mx::float16: return float(static_cast<const mx::float16_t*>(p)[i]);
    case mx::bfloat16: return float(static_cast<const mx::bfloat16_t*>(p)[i]);
    default: return 0.f;
  }
}

// A read-only view of one (stacked) projection's arrays, as the kernels see them.
struct WeightView {
  Format fmt;
  int64_t num_matrices = 1;
  int N = 0, K = 0;
  const uint8_t* w = nullptr;
  int64_t row_bytes = 0;  // bytes of one packed row (K * bits / 8)
  const void* scales = nullptr;
  const void* biases = nullptr;
  mx::Dtype sdtype = mx::float32;
  int groups = 0;  // groups per row

  // trellis only
  const void* grid = nullptr;
  mx::Dtype gdtype = mx::float32;
  bool grid_per_expert = false;
  const void* su = nullptr;
  const void* sv = nullptr;
  mx::Dtype udtype = mx::float32, vdtype = mx::float32;

  WeightView() = default;
  WeightView(const std::vector<mx::array>& arrays, const Format& f, const WeightShape& ws)
      : fmt(f), num_matrices(ws.num_matrices()), N(ws.N), K(ws.K) {
    w = arrays[0].data<uint8_t>();
    row_bytes = f.mode == Mode::Trellis ? 0 : int64_t(arrays[0].shape(-1)) * 4;
    scales = arrays[1].data<void>();
    sdtype = arrays[1].dtype();
    if (f.mode == Mode::Affine) biases = arrays[2].data<void>();
    groups = K / f.group_size;
    if (f.mode == Mode::Trellis) {
      grid = arrays[2].data<void>();
      gdtype = arrays[2].dtype();
      grid_per_expert = arrays[2].ndim() > 1;
      int next = 3;
      if (f.has_su) {
        su = arrays[next].data<void>();
        udtype = arrays[next++].dtype();
      }
      if (f.has_sv) {
        sv = arrays[next].data<void>();
        vdtype = arrays[next++].dtype();
      }
    }
  }

  const uint8_t* row(int64_t m, int64_t n) const {
    return w + (m * N + n) * row_bytes;
  }
  int64_t group_index(int64_t m, int64_t n, int g) const {
    return (m * N + n) * groups + g;
  }
};

// 16-entry FP4 table built once from the shared decoder (the single definition).
struct Fp4Table {
  float v[16];
  explicit Fp4Table(bool quarter) {
    for (uint32_t c = 0; c < 16; ++c) {
      v[c] = quarter ? moe_fp4_e2m1_quarter_subnormal(c) : moe_fp4_e2m1(c);
    }
  }
};
const Fp4Table& fp4_table(bool quarter);

// Decode row n of matrix m (all K values) into out[0..K). With `fp16_scales`, FP4 group
// scales are first rounded to float16, as mx.dequantize does for a float16 output
// (docs/FORMATS.md): only the dequantize op to float16 asks for it.
void dequant_row(const WeightView& wv, int64_t m, int64_t n, float* out, bool fp16_scales = false);

// Decode rows [n0, n0 + nr) of matrix m into a K-major panel (panel[k * 16 + r]);
// rows nr..15 are zero. `scratch` is reused between calls.
void dequant_panel(const WeightView& wv, int64_t m, int n0, int nr, float* panel,
                   std::vector<float>& scratch);

}  // namespace mlx_moe::cpu
