#include "dequant.h"

#include "backends.h"

namespace mlx_moe {

mx::array dequantize(const std::vector<mx::array>& arrays, const Format& fmt, mx::Dtype dtype,
                     mx::StreamOrDevice s) {
  if (!is_float(dtype)) {
    throw TypeError("dtype must be float16, bfloat16 or float32, got " + dtype_str(dtype));
  }
  WeightShape ws = check_weight(arrays, fmt, "weight");
  mx::Shape out_shape = ws.batch;
  out_shape.push_back(ws.N);
  out_shape.push_back(ws.K);
  auto stream = mx::to_stream(s);
  std::vector<mx::array> inputs;
  for (auto& a : arrays) inputs.push_back(ensure_row_contiguous(a, stream));
  return mx::array(out_shape, dtype, std::make_shared<Dequantize>(stream, fmt), inputs);
}

void Dequantize::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  gpu::dequantize(*this, inputs, outputs);
}

}  // namespace mlx_moe
