#include "cpu/float_load.h"
#include "cpu/parallel.h"
#include "cpu/quant.h"
#include "cpu/util.h"
#include "dequant.h"

namespace mlx_moe {

void Dequantize::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  cpu::allocate(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  WeightShape ws = check_weight(inputs, fmt_, "weight");
  cpu::WeightView wv(inputs, fmt_, ws);
  enc.dispatch([wv, dst = out.data<void>(), dt = out.dtype()]() {
    const int64_t rows = wv.num_matrices * wv.N;
    const int64_t chunk = std::max<int64_t>(1, 65536 / std::max(1, wv.K));
    cpu::parallel_for((rows + chunk - 1) / chunk, [&](int64_t t, int) {
      std::vector<float> buf(wv.K);
      for (int64_t r = t * chunk; r < std::min(rows, (t + 1) * chunk); ++r) {
        int64_t m = r / wv.N, n = r % wv.N;
        if (dt == mx::float32) {
          cpu::dequant_row(wv, m, n, static_cast<float*>(dst) + r * wv.K);
        } else {
          cpu::dequant_row(wv, m, n, buf.data(), /*fp16_scales=*/dt == mx::float16);
          for (int k = 0; k < wv.K; ++k) cpu::store_float(dst, dt, r * wv.K + k, buf[k]);
        }
      }
    });
  });
}

}  // namespace mlx_moe
