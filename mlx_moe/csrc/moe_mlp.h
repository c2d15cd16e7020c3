// Fused expert MLP: y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j],
// over quantized expert weights, accumulated in fp32, in one primitive.
// Inputs: x [T, D], ids uint32 [T, k], weights float32 [T, k], then the arrays of gate, up
// and down (each in its own format). Output: [T, D] in x's dtype.
#pragma once
#include <array>

#include "common.h"

namespace mlx_moe {

mx::array moe_mlp(const mx::array& x, const mx::array& ids, const mx::array& weights,
                  const std::array<std::vector<mx::array>, 3>& projections,
                  const std::array<Format, 3>& formats, mx::StreamOrDevice s = {});

class MoeMLP : public InferencePrimitive {
 public:
  MoeMLP(mx::Stream stream, std::array<Format, 3> formats)
      : InferencePrimitive(stream), formats_(formats) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "moe_mlp"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return formats_ == static_cast<const MoeMLP&>(other).formats_;
  }
  const std::array<Format, 3>& formats() const { return formats_; }

 private:
  std::array<Format, 3> formats_;
};

}  // namespace mlx_moe
