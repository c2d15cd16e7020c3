// Router: fp32 softmax over the experts axis, top-k (ties to the smaller expert id),
// optional renormalisation. Output: ids uint32 [..., k], weights float32 [..., k].
#pragma once
#include "common.h"

namespace mlx_moe {

std::vector<mx::array> route(const mx::array& logits, int k, bool normalize,
                             mx::StreamOrDevice s = {});

class Route : public InferencePrimitive {
 public:
  Route(mx::Stream stream, int k, bool normalize)
      : InferencePrimitive(stream), k_(k), normalize_(normalize) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "route"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Route&>(other);
    return k_ == o.k_ && normalize_ == o.normalize_;
  }
  int k() const { return k_; }
  bool normalize() const { return normalize_; }

 private:
  int k_;
  bool normalize_;
};

}  // namespace mlx_moe
