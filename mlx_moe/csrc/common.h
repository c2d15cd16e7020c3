// Shared pieces of every mlx_moe primitive: the inference-only base class, the weight
// format descriptor and its validation, and the error types the bindings translate.
#pragma once

#include <stdexcept>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlx_moe {

namespace mx = mlx::core;

// Raised for a wrong dtype/type; the bindings turn it into Python's TypeError
// (std::invalid_argument becomes ValueError).
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// Every mlx_moe primitive is inference-only: differentiating or vmapping it is an error
// with a clear message rather than a silent wrong gradient.
class InferencePrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
  std::vector<mx::array> jvp(const std::vector<mx::array>&, const std::vector<mx::array>&,
                             const std::vector<int>&) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>&,
                             const std::vector<int>&, const std::vector<mx::array>&) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>&,
                                                          const std::vector<int>&) override;
};

enum class Mode : int { Affine = 0, MxFp4 = 1, Trellis = 2 };

// How one projection's weights are encoded. The arrays travel separately, in the order
// [w, scales, biases (affine) | grid, su?, sv? (trellis)].
struct Format {
  Mode mode = Mode::Affine;
  int bits = 4;
  int group_size = 64;
  bool has_su = false;
  bool has_sv = false;
  bool fp4_quarter_subnormal = false;  // opt-in FP4 decoder, see docs/FORMATS.md

  bool operator==(const Format& o) const {
    return mode == o.mode && bits == o.bits && group_size == o.group_size &&
           has_su == o.has_su && has_sv == o.has_sv &&
           fp4_quarter_subnormal == o.fp4_quarter_subnormal;
  }
  int num_arrays() const {
    switch (mode) {
      case Mode::Affine: return 3;
      case Mode::MxFp4: return 2;
      case Mode::Trellis: return 3 + int(has_su) + int(has_sv);
    }
    return 0;
  }
  std::string describe() const;
};

Format make_format(const std::string& mode, int bits, int group_size, bool has_su, bool has_sv,
                   bool fp4_quarter_subnormal);

// Logical shape of a (stacked) weight: `batch` leading dims (the experts), N rows, K columns.
struct WeightShape {
  mx::Shape batch;  // e.g. {E}; empty for a single matrix
  int N = 0;
  int K = 0;
  int64_t num_matrices() const {
    int64_t n = 1;
    for (auto b : batch) n *= b;
    return n;
  }
};

// Validates the arrays of one projection against its format (dtypes, ranks, shapes,
// group size) and returns the logical shape. `name` prefixes every error message.
WeightShape check_weight(const std::vector<mx::array>& arrays, const Format& fmt,
                         const std::string& name);

std::string shape_str(const mx::Shape& s);
std::string dtype_str(mx::Dtype d);
bool is_float(mx::Dtype d);
bool is_integer(mx::Dtype d);

// Raises ValueError naming `what` if an expert id is outside [0, num_experts), when the
// ids are already materialised on the host (free: no evaluation is forced). Lazy ids are
// checked by the kernels at evaluation, where MLX re-raises the error as RuntimeError.
void check_ids_if_available(const mx::array& ids, int num_experts, const std::string& what,
                            const mx::Stream& stream);

// The id dtypes the kernels read directly (others are widened to int64 in the graph).
inline bool supported_id_dtype(mx::Dtype d) {
  return d == mx::uint32 || d == mx::int32 || d == mx::int64;
}

// An on/off environment knob: unset or empty gives `dflt`, "0" gives false, anything else true.
bool env_flag(const char* name, bool dflt);

// Row-major contiguous copy of `a` when it is not already (graph-level, lazy); `a` itself,
// with no graph node, when it is known to be row-contiguous (evaluated with that layout, or
// an output of one of our primitives).
mx::array ensure_row_contiguous(const mx::array& a, mx::StreamOrDevice s);

}  // namespace mlx_moe
