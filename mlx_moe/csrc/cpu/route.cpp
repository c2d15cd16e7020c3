#include <cmath>
#include <limits>

#include "cpu/float_load.h"
#include "cpu/parallel.h"
#include "cpu/util.h"
#include "route.h"

namespace mlx_moe {

namespace {

// One row: see docs/DESIGN.md, "Router", for the NaN / infinity conventions.
void route_row(const float* l, int E, int k, bool normalize, float* p, uint32_t* ids,
               float* w) {
  bool has_nan = false;
  float m = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < E; ++i) {
    has_nan |= std::isnan(l[i]);
    m = std::max(m, l[i]);
  }
  if (has_nan || m == -std::numeric_limits<float>::infinity()) {
    float v = has_nan ? std::numeric_limits<float>::quiet_NaN() : 0.f;
    for (int j = 0; j < k; ++j) {
      ids[j] = uint32_t(j);
      w[j] = v;
    }
    return;
  }
  float s = 0.f;
  if (m == std::numeric_limits<float>::infinity()) {
    for (int i = 0; i < E; ++i) s += (p[i] = l[i] == m ? 1.f : 0.f);
  } else {
    for (int i = 0; i < E; ++i) s += (p[i] = std::exp(l[i] - m));
  }
  for (int i = 0; i < E; ++i) p[i] = p[i] / s;
  // Insertion into a sorted top-k list; strict '>' keeps the smaller id first on ties.
  int n = 0;
  for (int i = 0; i < E; ++i) {
    float v = p[i];
    if (n == k && !(v > w[k - 1])) continue;
    int j = (n < k) ? n++ : k - 1;
    while (j > 0 && v > w[j - 1]) {
      w[j] = w[j - 1];
      ids[j] = ids[j - 1];
      --j;
    }
    w[j] = v;
    ids[j] = uint32_t(i);
  }
  if (normalize) {
    float t = 0.f;
    for (int j = 0; j < k; ++j) t += w[j];
    if (t > 0.f) {
      for (int j = 0; j < k; ++j) w[j] = w[j] / t;
    }
  }
}

}  // namespace

void Route::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& logits = inputs[0];
  auto& ids = outputs[0];
  auto& weights = outputs[1];
  cpu::allocate(ids);
  cpu::allocate(weights);
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(logits);
  enc.set_output_array(ids);
  enc.set_output_array(weights);
  const int E = logits.shape(-1);
  const int64_t rows = E ? int64_t(logits.size() / E) : 0;
  enc.dispatch([l = logits.data<void>(), dt = logits.dtype(), E, rows, k = k_,
                normalize = normalize_, ids = ids.data<uint32_t>(),
                w = weights.data<float>()]() {
    const int64_t chunk = 64;
    const int64_t tasks = (rows + chunk - 1) / chunk;
    cpu::parallel_for(tasks, [&](int64_t t, int) {
      std::vector<float> lf(E), p(E);
      for (int64_t r = t * chunk; r < std::min(rows, (t + 1) * chunk); ++r) {
        cpu::load_floats(l, dt, r * E, E, lf.data());
        route_row(lf.data(), E, k, normalize, p.data(), ids + r * k, w + r * k);
      }
    });
  });
}

}  // namespace mlx_moe
