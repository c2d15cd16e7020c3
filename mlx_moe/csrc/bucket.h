// Expert bucketing: (token, slot) pairs grouped by expert in ascending pair order, and the
// dispatch sizes of a grouped GEMM with `tile` rows per threadgroup.
// Outputs: counts uint32 [E], offsets uint32 [E+1], pairs uint32 [P], dispatch uint32 [4]
// = (threadgroups x, y, z, dropped): the first three are a Metal/CUDA indirect-dispatch
// argument block; `dropped` counts out-of-range ids a GPU kernel skipped (the CPU raises).
#pragma once
#include "common.h"

namespace mlx_moe {

std::vector<mx::array> bucket(const mx::array& ids, int num_experts, int tile,
                              mx::StreamOrDevice s = {});

class Bucket : public InferencePrimitive {
 public:
  Bucket(mx::Stream stream, int num_experts, int tile)
      : InferencePrimitive(stream), num_experts_(num_experts), tile_(tile) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "bucket"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Bucket&>(other);
    return num_experts_ == o.num_experts_ && tile_ == o.tile_;
  }
  int num_experts() const { return num_experts_; }
  int tile() const { return tile_; }

 private:
  int num_experts_;
  int tile_;
};

}  // namespace mlx_moe
