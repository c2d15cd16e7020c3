// Stand-in for {fmt} in CUDA sources: MLX's CUDA backend headers
// (lru_cache.h, which device.h includes) name fmt::format in an error path that this
// extension never instantiates, and MLX's wheel does not ship {fmt}. Returns the format
// string unformatted.
#pragma once
#include <string>

namespace fmt {
template <typename... Args>
std::string format(const char* f, Args&&...) {
  return std::string(f);
}
}  // namespace fmt
