// Fused expert MLP: y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j],
// over quantized expert weights, accumulated in fp32, in one primitive.
// Inputs: x [T, D], ids uint32 [T, k], weights float32 [T, k], then the arrays of gate, up
// and down (each in its own format). Output: [T, D] in x's dtype.
// Router folded in (route_k() > 0; CUDA streams only, see moe_mlp.cpp): the inputs are
// x [T, D], logits [T, E], then the weight arrays, and the primitive routes itself exactly as
// route(logits, route_k(), route_normalize()) does.
#pragma once
#include <array>

#include "common.h"

namespace mlx_moe {

mx::array moe_mlp(const mx::array& x, const mx::array& ids, const mx::array& weights,
                  const std::array<std::vector<mx::array>, 3>& projections,
                  const std::array<Format, 3>& formats, mx::StreamOrDevice s = {});

class MoeMLP : public InferencePrimitive {
 public:
  MoeMLP(mx::Stream stream, std::array<Format, 3> formats, int route_k = 0,
         bool route_normalize = false)
      : InferencePrimitive(stream),
        formats_(formats),
        route_k_(route_k),
        route_normalize_(route_normalize) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "moe_mlp"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const MoeMLP&>(other);
    return formats_ == o.formats_ && route_k_ == o.route_k_ &&
           route_normalize_ == o.route_normalize_;
  }
  const std::array<Format, 3>& formats() const { return formats_; }
  int route_k() const { return route_k_; }  // 0: ids and weights are inputs
  bool route_normalize() const { return route_normalize_; }

 private:
  std::array<Format, 3> formats_;
  int route_k_;
  bool route_normalize_;
};

}  // namespace mlx_moe
