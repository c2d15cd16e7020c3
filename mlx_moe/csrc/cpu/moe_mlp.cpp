// CPU fused expert MLP.
//
// 1. Bucket the (token, slot) pairs by expert (stable counting sort: deterministic).
// 2. Gate/up: one task per (expert, block of 16 rows of F). The task decodes its 16 rows of
//    gate and of up once into K-major fp32 panels, then runs every token routed to that
//    expert through them (6 at a time in registers), and writes silu(g) * u into H, a
//    [pairs, F] fp32 buffer in bucketed order. Each weight byte is decoded once per call.
// 3. Down: one task per (expert, block of 16 rows of D): decode, multiply the expert's rows
//    of H, scale by the routing weight, write the pair's partial output Yp[pair, :].
// 4. Combine: y[t] = sum over slots j in order 0..k-1 of Yp[t*k + j] (fixed order, so the
//    result does not depend on threads), rounded once to x's dtype.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "cpu/float_load.h"
#include "cpu/gemm.h"
#include "cpu/gemv.h"
#include "cpu/parallel.h"
#include "cpu/quant.h"
#include "cpu/util.h"
#include "moe_mlp.h"

namespace mlx_moe {

namespace {

struct AlignedBuf {
  float* p = nullptr;
  size_t n = 0;
  float* get(size_t want) {
    if (want > n) {
      std::free(p);
      n = want;
      p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64));
    }
    return p;
  }
  ~AlignedBuf() { std::free(p); }
};

struct ThreadScratch {
  AlignedBuf panel_a, panel_b;
  std::vector<float> misc;
};

inline float silu(float g) {
  return g / (1.f + std::exp(-g));
}

struct Task {
  int e;
  int block;
};

// Tasks over (expert with tokens, row block), biggest experts first so that the dynamic
// schedule ends evenly.
std::vector<Task> make_tasks(const std::vector<uint32_t>& counts, int blocks) {
  std::vector<int> experts;
  for (int e = 0; e < int(counts.size()); ++e) {
    if (counts[e]) experts.push_back(e);
  }
  std::stable_sort(experts.begin(), experts.end(),
                   [&](int a, int b) { return counts[a] > counts[b]; });
  std::vector<Task> tasks;
  tasks.reserve(experts.size() * blocks);
  for (int e : experts) {
    for (int b = 0; b < blocks; ++b) tasks.push_back({e, b});
  }
  return tasks;
}

}  // namespace

void MoeMLP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  if (route_k() > 0) {  // built only for CUDA streams (moe_mlp.cpp)
    throw std::runtime_error("mlx_moe.moe_mlp: the router-folded primitive runs on CUDA only");
  }
  auto& out = outputs[0];
  cpu::allocate(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);

  const auto& x = inputs[0];
  const auto& ids = inputs[1];
  const auto& wts = inputs[2];
  std::array<cpu::WeightView, 3> views;
  int pos = 3;
  for (int i = 0; i < 3; ++i) {
    int n = formats_[i].num_arrays();
    std::vector<mx::array> arrs(inputs.begin() + pos, inputs.begin() + pos + n);
    pos += n;
    views[i] = cpu::WeightView(arrs, formats_[i], check_weight(arrs, formats_[i], "weight"));
  }
  const int T = x.shape(0), D = x.shape(1), k = ids.shape(1);

  enc.dispatch([views, T, D, k, xp = x.data<void>(), xdt = x.dtype(), idp = ids.data<void>(),
                iddt = ids.dtype(), wp = wts.data<float>(), yp = out.data<void>(),
                ydt = out.dtype()]() {
    const auto& gate = views[0];
    const auto& up = views[1];
    const auto& down = views[2];
    const int E = int(gate.num_matrices);
    const int F = gate.N;
    const int64_t P = int64_t(T) * k;
    if (P == 0) return;
    cpu::check_ids(idp, iddt, P, E, "ids");

    // 1. Bucketing.
    std::vector<uint32_t> counts(E, 0), offsets(E + 1, 0), order(P);
    for (int64_t i = 0; i < P; ++i) counts[cpu::load_index(idp, iddt, i)]++;
    for (int e = 0; e < E; ++e) offsets[e + 1] = offsets[e] + counts[e];
    {
      std::vector<uint32_t> cur(offsets.begin(), offsets.end() - 1);
      for (int64_t i = 0; i < P; ++i) order[cur[cpu::load_index(idp, iddt, i)]++] = uint32_t(i);
    }

    // Activations in fp32 (a view of x when it already is).
    std::vector<float> xf_store;
    const float* xf;
    if (xdt == mx::float32) {
      xf = static_cast<const float*>(xp);
    } else {
      xf_store.resize(size_t(T) * D);
      cpu::parallel_for((T + 63) / 64, [&](int64_t c, int) {
        int64_t t0 = c * 64, t1 = std::min<int64_t>(T, t0 + 64);
        cpu::load_floats(xp, xdt, t0 * D, (t1 - t0) * D, xf_store.data() + t0 * D);
      });
      xf = xf_store.data();
    }

    const int nthreads = cpu::num_threads();
    std::vector<ThreadScratch> scratch(nthreads);
    std::vector<float> H(size_t(P) * F);
    std::vector<float> Yp(size_t(P) * D);

    // Experts with few tokens take the decode path (dot products straight from the
    // packed words) when their format has one.
    auto small = [&](int e) { return counts[e] <= uint32_t(cpu::GEMV_MAX_TOKENS); };
    std::vector<int> expert_of(P);
    for (int e = 0; e < E; ++e)
      for (uint32_t i = offsets[e]; i < offsets[e + 1]; ++i) expert_of[i] = e;
    const bool lanes_gu = cpu::has_lane_path(gate.fmt) && cpu::has_lane_path(up.fmt);
    cpu::LaneRows lanes_g, lanes_u;
    if (lanes_gu) {
      std::vector<char> token_small(T, 0);
      for (int64_t i = 0; i < P; ++i)
        if (small(expert_of[i])) token_small[order[i] / k] = 1;
      auto row = [&](int64_t t) { return xf + t * D; };
      auto needed = [&](int64_t t) { return token_small[t] != 0; };
      lanes_g.build(gate.fmt, D, T, row, needed);
      if (up.fmt.bits != gate.fmt.bits || up.fmt.group_size != gate.fmt.group_size) {
        lanes_u.build(up.fmt, D, T, row, needed);
      }
    }
    const cpu::LaneRows& lanes_up = lanes_u.K ? lanes_u : lanes_g;

    // 2. Gate + up + SwiGLU.
    {
      const int blocks = (F + cpu::PANEL_N - 1) / cpu::PANEL_N;
      auto tasks = make_tasks(counts, blocks);
      cpu::parallel_for(int64_t(tasks.size()), [&](int64_t ti, int th) {
        const Task task = tasks[ti];
        auto& sc = scratch[th];
        const int n0 = task.block * cpu::PANEL_N;
        const int nr = std::min(cpu::PANEL_N, F - n0);
        float g[cpu::MR_MAX][cpu::PANEL_N], u[cpu::MR_MAX][cpu::PANEL_N];
        const uint32_t first = offsets[task.e], last = offsets[task.e + 1];
        if (lanes_gu && small(task.e)) {
          const int c = int(last - first);
          cpu::LaneRow in_g[cpu::GEMV_MAX_TOKENS], in_u[cpu::GEMV_MAX_TOKENS];
          for (int r = 0; r < c; ++r) {
            in_g[r] = lanes_g.get(order[first + r] / k);
            in_u[r] = lanes_up.get(order[first + r] / k);
          }
          auto dot = [&](const cpu::WeightView& wv, const cpu::LaneRow* in, float out[][cpu::PANEL_N]) {
            if (wv.fmt.bits == 4) cpu::affine_block_dot<4>(c, wv, task.e, n0, nr, in, out);
            else cpu::affine_block_dot<8>(c, wv, task.e, n0, nr, in, out);
          };
          dot(gate, in_g, g);
          dot(up, in_u, u);
          for (int r = 0; r < c; ++r) {
            float* h = H.data() + int64_t(first + r) * F + n0;
            for (int cc = 0; cc < nr; ++cc) h[cc] = silu(g[r][cc]) * u[r][cc];
          }
          return;
        }
        float* pg = sc.panel_a.get(size_t(D) * cpu::PANEL_N);
        float* pu = sc.panel_b.get(size_t(D) * cpu::PANEL_N);
        cpu::dequant_panel(gate, task.e, n0, nr, pg, sc.misc);
        cpu::dequant_panel(up, task.e, n0, nr, pu, sc.misc);
        const float* xr[cpu::MR_MAX];
        for (uint32_t i = first; i < last; i += cpu::MR_MAX) {
          int m = int(std::min<uint32_t>(cpu::MR_MAX, last - i));
          for (int r = 0; r < m; ++r) xr[r] = xf + int64_t(order[i + r] / k) * D;
          cpu::gemm_tile(m, xr, pg, D, g);
          cpu::gemm_tile(m, xr, pu, D, u);
          for (int r = 0; r < m; ++r) {
            float* h = H.data() + int64_t(i + r) * F + n0;
            for (int c = 0; c < nr; ++c) h[c] = silu(g[r][c]) * u[r][c];
          }
        }
      });
    }

    // 3. Down projection, scaled by the routing weight, into per-pair rows.
    {
      const bool lanes_d = cpu::has_lane_path(down.fmt);
      cpu::LaneRows lanes_h;
      if (lanes_d) {
        lanes_h.build(down.fmt, F, P, [&](int64_t i) { return H.data() + i * F; },
                      [&](int64_t i) { return small(expert_of[i]); });
      }
      const int blocks = (D + cpu::PANEL_N - 1) / cpu::PANEL_N;
      auto tasks = make_tasks(counts, blocks);
      cpu::parallel_for(int64_t(tasks.size()), [&](int64_t ti, int th) {
        const Task task = tasks[ti];
        auto& sc = scratch[th];
        const int n0 = task.block * cpu::PANEL_N;
        const int nr = std::min(cpu::PANEL_N, D - n0);
        float acc[cpu::MR_MAX][cpu::PANEL_N];
        const uint32_t first = offsets[task.e], last = offsets[task.e + 1];
        auto emit = [&](uint32_t i, int m) {
          for (int r = 0; r < m; ++r) {
            const uint32_t pair = order[i + r];
            const float w = wp[pair];
            float* y = Yp.data() + int64_t(pair) * D + n0;
            for (int c = 0; c < nr; ++c) y[c] = w * acc[r][c];
          }
        };
        if (lanes_d && small(task.e)) {
          const int c = int(last - first);
          cpu::LaneRow in[cpu::GEMV_MAX_TOKENS];
          for (int r = 0; r < c; ++r) in[r] = lanes_h.get(first + r);
          if (down.fmt.bits == 4) cpu::affine_block_dot<4>(c, down, task.e, n0, nr, in, acc);
          else cpu::affine_block_dot<8>(c, down, task.e, n0, nr, in, acc);
          emit(first, c);
          return;
        }
        float* pd = sc.panel_a.get(size_t(F) * cpu::PANEL_N);
        cpu::dequant_panel(down, task.e, n0, nr, pd, sc.misc);
        const float* hr[cpu::MR_MAX];
        for (uint32_t i = first; i < last; i += cpu::MR_MAX) {
          int m = int(std::min<uint32_t>(cpu::MR_MAX, last - i));
          for (int r = 0; r < m; ++r) hr[r] = H.data() + int64_t(i + r) * F;
          cpu::gemm_tile(m, hr, pd, F, acc);
          emit(i, m);
        }
      });
    }

    // 4. Combine the k slots of each token in slot order.
    cpu::parallel_for((T + 15) / 16, [&](int64_t c, int) {
      std::vector<float> row(D);
      for (int64_t t = c * 16; t < std::min<int64_t>(T, c * 16 + 16); ++t) {
        const float* src = Yp.data() + t * k * D;
        std::copy(src, src + D, row.begin());
        for (int j = 1; j < k; ++j) {
          const float* s = src + int64_t(j) * D;
          for (int d = 0; d < D; ++d) row[d] += s[d];
        }
        if (ydt == mx::float32) {
          std::copy(row.begin(), row.end(), static_cast<float*>(yp) + t * D);
        } else {
          for (int d = 0; d < D; ++d) cpu::store_float(yp, ydt, t * D + d, row[d]);
        }
      }
    });
  });
}

}  // namespace mlx_moe
