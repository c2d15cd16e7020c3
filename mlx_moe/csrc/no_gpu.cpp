// GPU entry points for a build whose MLX has neither Metal nor CUDA.
#if !defined(MLX_MOE_METAL) && !defined(MLX_MOE_CUDA)
#include "backends.h"

namespace mlx_moe::gpu {

namespace {
[[noreturn]] void no_gpu(const char* op) {
  throw std::runtime_error(std::string("mlx_moe.") + op +
                           ": this build has no GPU backend (MLX was built without Metal and "
                           "CUDA); run it on the CPU stream (stream=mx.cpu)");
}
}  // namespace

void route(Route&, const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu("route"); }
void bucket(Bucket&, const std::vector<mx::array>&, std::vector<mx::array>&) { no_gpu("bucket"); }
void dequantize(Dequantize&, const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu("dequantize");
}
void moe_mlp(MoeMLP&, const std::vector<mx::array>&, std::vector<mx::array>&) {
  no_gpu("moe_mlp");
}

}  // namespace mlx_moe::gpu
#endif
