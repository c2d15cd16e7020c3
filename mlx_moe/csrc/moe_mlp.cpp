#include "moe_mlp.h"

#include "backends.h"
#include "mlx/backend/cuda/cuda.h"
#include "route.h"

namespace mlx_moe {

mx::array moe_mlp(const mx::array& x, const mx::array& ids, const mx::array& weights,
                  const std::array<std::vector<mx::array>, 3>& projections,
                  const std::array<Format, 3>& formats, mx::StreamOrDevice s) {
  static const char* names[3] = {"gate", "up", "down"};
  if (!is_float(x.dtype())) {
    throw TypeError("x must be float16, bfloat16 or float32, got " + dtype_str(x.dtype()));
  }
  if (!is_integer(ids.dtype())) {
    throw TypeError("ids must be an integer array, got " + dtype_str(ids.dtype()));
  }
  if (!is_float(weights.dtype()) && weights.dtype() != mx::float64) {
    throw TypeError("weights must be a floating-point array, got " + dtype_str(weights.dtype()));
  }
  if (x.ndim() < 1) throw std::invalid_argument("x must have shape [..., D], got a scalar");
  if (ids.ndim() != x.ndim()) {
    throw std::invalid_argument("ids has shape " + shape_str(ids.shape()) +
                                "; expected x's leading shape plus k, [..., k], with x of shape " +
                                shape_str(x.shape()));
  }
  for (int i = 0; i + 1 < int(x.ndim()); ++i) {
    if (ids.shape(i) != x.shape(i)) {
      throw std::invalid_argument("ids has shape " + shape_str(ids.shape()) +
                                  "; its leading shape must match x's, " + shape_str(x.shape()));
    }
  }
  if (weights.shape() != ids.shape()) {
    throw std::invalid_argument("weights has shape " + shape_str(weights.shape()) +
                                "; expected the shape of ids, " + shape_str(ids.shape()));
  }
  const int D = x.shape(-1);
  const int k = ids.shape(-1);
  if (k < 1) throw std::invalid_argument("ids must have at least one slot per token (k >= 1)");

  WeightShape ws[3];
  for (int i = 0; i < 3; ++i) {
    ws[i] = check_weight(projections[i], formats[i], names[i]);
    if (ws[i].batch.size() != 1) {
      throw std::invalid_argument(std::string(names[i]) +
                                  ".w must be stacked over experts, [E, N, K_packed]; got " +
                                  shape_str(projections[i][0].shape()));
    }
  }
  const int E = ws[0].batch[0];
  const int F = ws[0].N;
  for (int i = 1; i < 3; ++i) {
    if (ws[i].batch[0] != E) {
      throw std::invalid_argument(std::string(names[i]) + " has " + std::to_string(ws[i].batch[0]) +
                                  " experts but gate has " + std::to_string(E));
    }
  }
  if (ws[0].K != D || ws[1].K != D) {
    throw std::invalid_argument("gate/up take " + std::to_string(ws[0].K) + "/" +
                                std::to_string(ws[1].K) + " input features but x has D = " +
                                std::to_string(D));
  }
  if (ws[1].N != F) {
    throw std::invalid_argument("up has " + std::to_string(ws[1].N) +
                                " output features but gate has " + std::to_string(F));
  }
  if (ws[2].N != D || ws[2].K != F) {
    throw std::invalid_argument("down must map F = " + std::to_string(F) + " to D = " +
                                std::to_string(D) + " ([E, D, F]); got N = " +
                                std::to_string(ws[2].N) + ", K = " + std::to_string(ws[2].K));
  }
  if (k > E) {
    throw std::invalid_argument("ids has k = " + std::to_string(k) +
                                " slots per token but there are only " + std::to_string(E) +
                                " experts");
  }

  auto stream = mx::to_stream(s);
  check_ids_if_available(ids, E, "ids", stream);
  int T = 1;
  for (int i = 0; i + 1 < int(x.ndim()); ++i) T *= x.shape(i);

  std::vector<mx::array> weight_inputs;
  for (int i = 0; i < 3; ++i) {
    for (auto& a : projections[i]) weight_inputs.push_back(ensure_row_contiguous(a, stream));
  }

  // CUDA streams: when ids and weights are the two outputs of one unevaluated route() over
  // [T, E] logits (what a layer does), the router runs inside this primitive (its kernel as
  // this primitive's first node): one primitive, so one graph node's host work, less per
  // layer. The results are those of route() + moe_mlp(), bitwise: the same kernel routes.
  // route()'s node stays in the graph for whoever evaluates ids or weights.
  // MLX_MOE_CUDA_FUSED_ROUTE=0 turns it off.
  if (stream.device.type == mx::Device::gpu && mx::cu::is_available() &&
      env_flag("MLX_MOE_CUDA_FUSED_ROUTE", true) && x.ndim() == 2 &&
      ids.status() == mx::array::Status::unscheduled && ids.has_primitive() &&
      weights.has_primitive() && &ids.primitive() == &weights.primitive()) {
    auto* r = dynamic_cast<Route*>(&ids.primitive());
    const auto outs = ids.outputs();
    // (same stream only: the CPU router's weights may differ from the GPU's in the last bit)
    if (r != nullptr && r->stream() == stream && outs.size() == 2 &&
        outs[0].id() == ids.id() &&
        outs[1].id() == weights.id() && ids.inputs().size() == 1) {
      const mx::array& logits = ids.inputs()[0];
      if (logits.ndim() == 2 && logits.shape(0) == T && logits.shape(1) == E &&
          (logits.dtype() == mx::float32 || logits.dtype() == mx::float16 ||
           logits.dtype() == mx::bfloat16)) {
        std::vector<mx::array> inputs = {x, logits};
        inputs.insert(inputs.end(), weight_inputs.begin(), weight_inputs.end());
        return mx::array({T, D}, x.dtype(),
                         std::make_shared<MoeMLP>(stream, formats, r->k(), r->normalize()),
                         inputs);
      }
    }
  }
  std::vector<mx::array> inputs = {
      ensure_row_contiguous(mx::reshape(x, {T, D}, stream), stream),
      ensure_row_contiguous(
          mx::reshape(supported_id_dtype(ids.dtype()) ? ids : mx::astype(ids, mx::int64, stream),
                      {T, k}, stream),
          stream),
      ensure_row_contiguous(mx::astype(mx::reshape(weights, {T, k}, stream), mx::float32, stream),
                            stream)};
  inputs.insert(inputs.end(), weight_inputs.begin(), weight_inputs.end());
  auto y = mx::array({T, D}, x.dtype(), std::make_shared<MoeMLP>(stream, formats), inputs);
  return mx::reshape(y, x.shape(), stream);
}

void MoeMLP::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  gpu::moe_mlp(*this, inputs, outputs);
}

}  // namespace mlx_moe
