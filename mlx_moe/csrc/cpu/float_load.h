#pragma once
#include "cpu/quant.h"

namespace mlx_moe::cpu {

// out[i] = float(src[offset + i]) for a float16 / bfloat16 / float32 / float64 source.
inline void load_floats(const void* src, mx::Dtype dt, int64_t offset, int64_t n, float* out) {
  switch (dt) {
    case mx::float32: {
      const float* s = static_cast<const float*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = s[i];
      break;
    }
    case mx::float16: {
      const mx::float16_t* s = static_cast<const mx::float16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = float(s[i]);
      break;
    }
    case mx::bfloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) {
        uint32_t u = uint32_t(s[i]) << 16;
        std::memcpy(out + i, &u, 4);
      }
      break;
    }
    case mx::float64: {
      const double* s = static_cast<const double*>(src) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = float(s[i]);
      break;
    }
    default: break;
  }
}

}  // namespace mlx_moe::cpu
