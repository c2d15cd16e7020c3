// Dequantize one (stacked) weight of any supported format to [..., N, K].
#pragma once
#include "common.h"

namespace mlx_moe {

mx::array dequantize(const std::vector<mx::array>& arrays, const Format& fmt, mx::Dtype dtype,
                     mx::StreamOrDevice s = {});

class Dequantize : public InferencePrimitive {
 public:
  Dequantize(mx::Stream stream, Format fmt) : InferencePrimitive(stream), fmt_(fmt) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  const char* name() const override { return "dequantize"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    return fmt_ == static_cast<const Dequantize&>(other).fmt_;
  }
  const Format& format() const { return fmt_; }

 private:
  Format fmt_;
};

}  // namespace mlx_moe
