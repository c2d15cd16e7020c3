#pragma once
#include <cstdint>

#include "common.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/allocator.h"

namespace mlx_moe::cpu {

// Element i of an integer array of any integer dtype, widened to int64.
inline int64_t load_index(const void* p, mx::Dtype dt, int64_t i) {
  switch (dt) {
    case mx::uint8: return static_cast<const uint8_t*>(p)[i];
    case mx::uint16: return static_cast<const uint16_t*>(p)[i];
    case mx::uint32: return static_cast<const uint32_t*>(p)[i];
    case mx::uint64: return int64_t(static_cast<const uint64_t*>(p)[i] > uint64_t(INT64_MAX) ? -1 : static_cast<const uint64_t*>(p)[i]);
    case mx::int8: return static_cast<const int8_t*>(p)[i];
    case mx::int16: return static_cast<const int16_t*>(p)[i];
    case mx::int32: return static_cast<const int32_t*>(p)[i];
    case mx::int64: return static_cast<const int64_t*>(p)[i];
    case mx::bool_: return static_cast<const bool*>(p)[i];
    default: return -1;
  }
}

inline void store_float(void* p, mx::Dtype dt, int64_t i, float v) {
  switch (dt) {
    case mx::float32: static_cast<float*>(p)[i] = v; break;
    case mx::float16: static_cast<mx::float16_t*>(p)[i] = mx::float16_t(v); break;
    case mx::bfloat16: static_cast<mx::bfloat16_t*>(p)[i] = mx::bfloat16_t(v); break;
    default: break;
  }
}

inline void allocate(mx::array& a) {
  a.set_data(mx::allocator::malloc(a.nbytes()));
}

// Checks every expert id once, naming the first bad one; throws ValueError at evaluation.
inline void check_ids(const void* ids, mx::Dtype dt, int64_t n, int64_t num_experts,
                      const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    int64_t e = load_index(ids, dt, i);
    if (e < 0 || e >= num_experts) {
      throw std::invalid_argument(std::string(what) + ": expert id " + std::to_string(e) +
                                  " at flat position " + std::to_string(i) +
                                  " is out of range [0, " + std::to_string(num_experts) + ")");
    }
  }
}

}  // namespace mlx_moe::cpu
