// Entry points of the GPU backends. Each primitive's eval_gpu forwards here; a build
// without a GPU backend (or without this op on it) raises a clear error instead of
// silently running elsewhere.
#pragma once
#include "common.h"

namespace mlx_moe {

class Route;
class Bucket;
class Dequantize;
class MoeMLP;

namespace gpu {
void route(Route& p, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs);
void bucket(Bucket& p, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs);
void dequantize(Dequantize& p, const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs);
void moe_mlp(MoeMLP& p, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs);
}  // namespace gpu

}  // namespace mlx_moe
