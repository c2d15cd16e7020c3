#include "route.h"

#include "backends.h"

namespace mlx_moe {

std::vector<mx::array> route(const mx::array& logits, int k, bool normalize,
                             mx::StreamOrDevice s) {
  if (!is_float(logits.dtype()) && logits.dtype() != mx::float64) {
    throw TypeError("logits must be a floating-point array (float16, bfloat16, float32), got " +
                    dtype_str(logits.dtype()));
  }
  if (logits.ndim() < 1) {
    throw std::invalid_argument("logits must have shape [..., E], got a scalar");
  }
  const int E = logits.shape(-1);
  if (E < 1) {
    throw std::invalid_argument("logits has shape " + shape_str(logits.shape()) +
                                ": the experts axis (last) is empty");
  }
  if (k < 1 || k > E) {
    throw std::invalid_argument("k must be in [1, E] = [1, " + std::to_string(E) + "], got " +
                                std::to_string(k));
  }
  mx::Shape out_shape = logits.shape();
  out_shape.back() = k;
  auto stream = mx::to_stream(s);
  return mx::array::make_arrays({out_shape, out_shape}, {mx::uint32, mx::float32},
                                std::make_shared<Route>(stream, k, normalize),
                                {ensure_row_contiguous(logits, stream)});
}

void Route::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  gpu::route(*this, inputs, outputs);
}

}  // namespace mlx_moe
