// CUDA eval_gpu of every mlx_moe primitive: kernels (kernels/moe_cuda.cuh) added as nodes of
// MLX's CUDA command encoder (its CUDA graph). Built only when MLX is its CUDA build.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "backends.h"
#include "bucket.h"
#include "dequant.h"
#include "mlx/allocator.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"
#include "cuda_util.h"
#include "gg_wgmma.h"
#include "moe_cuda.cuh"
#include "moe_mlp.h"
#include "route.h"
#include "mm_dec.h"
#include "regw.h"
#include "ring.h"

namespace mlx_moe::gpu {

namespace cu = mx::cu;
using namespace mlx_moe::cuda;

namespace {

int id_kind(mx::Dtype d) {
  switch (d) {
    case mx::uint32: return 0;
    case mx::int32: return 1;
    case mx::int64: return 2;
    default: throw std::invalid_argument("mlx_moe CUDA: ids must be uint32, int32 or int64");
  }
}

uint32_t scale_kind(mx::Dtype d) {
  switch (d) {
    case mx::float32: return 0;
    case mx::float16: return 1;
    case mx::bfloat16: return 2;
    default: return 3;
  }
}

WDesc make_desc(const mx::array* arrays, const Format& f, const WeightShape& ws) {
  WDesc d{};
  d.w = ptr<uint32_t>(arrays[0]);
  d.scales = ptr<void>(arrays[1]);
  d.biases = f.mode == Mode::Affine ? ptr<void>(arrays[2]) : nullptr;
  d.N = uint32_t(ws.N);
  d.K = uint32_t(ws.K);
  d.row_words = uint32_t(arrays[0].shape(-1));
  d.units = uint32_t(ws.K / 32);
  d.groups = uint32_t(ws.K / f.group_size);
  d.gs_units = uint32_t(f.group_size / 32);
  d.bits = uint32_t(f.bits);
  d.mode = f.mode == Mode::MxFp4 ? 1u : f.mode == Mode::Trellis ? 2u : 0u;
  d.scale_kind = scale_kind(arrays[1].dtype());
  d.fp4_quarter = f.fp4_quarter_subnormal ? 1u : 0u;
  d.group_size = uint32_t(f.group_size);
  if (f.mode == Mode::Trellis) {
    d.w = reinterpret_cast<const uint32_t*>(ptr<uint8_t>(arrays[0]));
    d.row_words = 0;
    d.grid = ptr<void>(arrays[2]);
    d.grid_kind = scale_kind(arrays[2].dtype());
    d.grid_per_expert = arrays[2].ndim() > 1 ? 1u : 0u;
    int next = 3;
    if (f.has_su) {
      d.su = ptr<void>(arrays[next]);
      d.su_kind = scale_kind(arrays[next++].dtype());
      d.has_su = 1;
    }
    if (f.has_sv) {
      d.sv = ptr<void>(arrays[next]);
      d.sv_kind = scale_kind(arrays[next++].dtype());
      d.has_sv = 1;
    }
  }
  return d;
}

// Kernel nodes added to MLX's graph at once (pdl false), or gathered and added by flush() as
// one chain of programmatic dependents (launch_pdl): every kernel of such a chain runs
// pdl_wait before it reads what an earlier one wrote.
struct NodeChain {
  cu::CommandEncoder& enc;
  bool pdl;
  std::vector<KernelNode> nodes;
  std::vector<mx::array> reads, writes;  // (copies: the callers' arrays may be gone by flush())
  void add(KernelNode n, const std::vector<const mx::array*>& r,
           const std::vector<const mx::array*>& w) {
    if (!pdl) {
      add_node(enc, r, w, n);
      return;
    }
    nodes.push_back(std::move(n));
    for (auto* a : r)
      if (a) reads.push_back(*a);
    for (auto* a : w)
      if (a) writes.push_back(*a);
  }
  void flush() {
    std::vector<KernelNode*> ns;
    for (auto& n : nodes) ns.push_back(&n);
    std::vector<const mx::array*> r, w;
    for (auto& a : reads) r.push_back(&a);
    for (auto& a : writes) w.push_back(&a);
    launch_pdl(enc, r, w, ns);
    nodes.clear();
    reads.clear();
    writes.clear();
  }
};

// Bucketing into counts/offsets/pairs (+ dispatch, active list, tile table, meta).
// Up to MLX_MOE_CUDA_BUCKET_ONE_BLOCK_MAX pairs (default 4096; E <= 1024): one kernel of one
// block (a node of `chain`); above: count, scan, scatter kernels over chunks of BUCKET_CHUNK
// pairs (the chain flushed first). tile_q: how the tile table splits an expert's pairs
// (tile_first_row: tile, or 64 for tiles balanced in steps of 64 pairs).
void encode_bucket(NodeChain& chain, const mx::array& ids, uint32_t P, uint32_t E,
                   uint32_t tile, uint32_t tile_q, const mx::array& counts, const mx::array& offsets,
                   const mx::array& pairs, const mx::array* dispatch, const mx::array* active,
                   const mx::array* tiles, const mx::array* meta) {
  const int kind = id_kind(ids.dtype());
  const void* idp = ptr<void>(ids);
  const uint32_t one_block_max = env_u32("MLX_MOE_CUDA_BUCKET_ONE_BLOCK_MAX", 4096u);
  if (P <= one_block_max && E <= 1024u) {
    chain.add(kernel_node(bucket_small_kernel, dim3(1), dim3(BS_WARPS * 32),
                          (BS_WARPS + 1) * E * 4, idp, kind, P, E, tile, tile_q, ptr<uint32_t>(counts),
                          ptr<uint32_t>(offsets), ptr<uint32_t>(pairs),
                          dispatch ? ptr<uint32_t>(*dispatch) : nullptr,
                          active ? ptr<uint32_t>(*active) : nullptr,
                          tiles ? ptr<uint32_t>(*tiles) : nullptr,
                          meta ? ptr<uint32_t>(*meta) : nullptr),
              {&ids}, {&counts, &offsets, &pairs, dispatch, active, tiles, meta});
    return;
  }
  chain.flush();
  cu::CommandEncoder& enc = chain.enc;
  const uint32_t nblocks = (P + BUCKET_CHUNK - 1) / BUCKET_CHUNK;
  mx::array bc = scratch(enc, size_t(nblocks) * E);
  launch(enc, {&ids}, {&bc}, bucket_count_kernel, dim3(nblocks), dim3(32), E * 4, idp, kind, P,
         E, ptr<uint32_t>(bc));
  launch(enc, {&bc}, {&bc, &counts, &offsets, &pairs, dispatch, active, tiles, meta},
         bucket_scan_kernel, dim3(1), dim3(256),
         3 * E * 4, ptr<uint32_t>(bc), nblocks, E, P, tile, tile_q, ptr<uint32_t>(counts),
         ptr<uint32_t>(offsets), ptr<uint32_t>(pairs),
         dispatch ? ptr<uint32_t>(*dispatch) : nullptr, active ? ptr<uint32_t>(*active) : nullptr,
         tiles ? ptr<uint32_t>(*tiles) : nullptr, meta ? ptr<uint32_t>(*meta) : nullptr);
  launch(enc, {&ids, &bc, &offsets}, {&pairs}, bucket_scatter_kernel, dim3(nblocks), dim3(32),
         E * 4, idp, kind, P, E, ptr<uint32_t>(bc), ptr<uint32_t>(offsets), ptr<uint32_t>(pairs));
}

// The inputs as the kernels read them: row-major ones as they are, the others copied to
// row-major scratch by a copy node (the op builders pass unevaluated inputs of CUDA streams
// without a Contiguous node, which would cost host work at every evaluation even when it
// copies nothing; see common.cpp, ensure_row_contiguous). A row-major input whose data is
// not 16-byte aligned (a view into a larger buffer) is copied too: the kernels read weights,
// activations and scales with 16-byte loads and copies. (The device pointer: `ptr`, i.e.
// mx::gpu_ptr; array::data() is not it on the CUDA backend.)
std::vector<mx::array> row_major_inputs(cu::CommandEncoder& enc,
                                        const std::vector<mx::array>& inputs) {
  std::vector<mx::array> out;
  out.reserve(inputs.size());
  for (const auto& a : inputs) {
    if (a.size() == 0 ||
        (a.flags().row_contiguous && reinterpret_cast<uintptr_t>(ptr<void>(a)) % 16 == 0)) {
      out.push_back(a);
      continue;
    }
    if (a.ndim() > size_t(STRIDED_MAX_DIMS)) {  // the builders wrap these in a Contiguous node
      throw std::invalid_argument("mlx_moe (CUDA): a strided input of more than " +
                                  std::to_string(STRIDED_MAX_DIMS) + " dimensions");
    }
    mx::array c(a.shape(), a.dtype(), nullptr, {});
    allocate(c);
    enc.add_temporary(c);
    StridedDesc d{};
    d.ndim = int(a.ndim());
    for (int j = 0; j < d.ndim; ++j) {
      d.shape[j] = a.shape(j);
      d.strides[j] = a.strides()[j];
    }
    const uint64_t n = a.size();
    const dim3 grid(uint32_t(std::min<uint64_t>((n + 255) / 256, 65535))), block(256);
    auto go = [&](auto tag) {
      using U = decltype(tag);
      launch(enc, {&a}, {&c}, strided_copy_kernel<U>, grid, block, 0, ptr<U>(a), ptr<U>(c), n, d);
    };
    switch (a.itemsize()) {
      case 1: go(uint8_t{}); break;
      case 2: go(uint16_t{}); break;
      case 4: go(uint32_t{}); break;
      case 8: go(uint64_t{}); break;
      default: throw std::invalid_argument("mlx_moe (CUDA): unsupported element size");
    }
    out.push_back(std::move(c));
  }
  return out;
}

// Routing kernel node: up to MLX_MOE_CUDA_ROUTE_BLOCK_MAX_ROWS rows (default 256; E <= 256,
// k <= 32) one block per row (route_block_kernel: top-k by ranks, no dependent arg-max
// rounds), else one warp per row (route_kernel). Bitwise the same ids and weights.
void encode_route(NodeChain& chain, const mx::array& logits, uint32_t rows, uint32_t E,
                  uint32_t k, uint32_t norm, const mx::array& ids, const mx::array& w) {
  const bool by_block = E <= ROUTE_BLOCK_MAX_E && k <= 32u &&
                        rows <= env_u32("MLX_MOE_CUDA_ROUTE_BLOCK_MAX_ROWS", 256u);
  auto go = [&](auto tag) {
    using T = decltype(tag);
    if (by_block) {
      chain.add(kernel_node(route_block_kernel<T>, dim3(rows), dim3(256), 0, ptr<T>(logits), E, k,
                            norm, ptr<uint32_t>(ids), ptr<float>(w)),
                {&logits}, {&ids, &w});
    } else {
      chain.add(kernel_node(route_kernel<T>, dim3((rows + 3) / 4), dim3(128), 0, ptr<T>(logits),
                            rows, E, k, norm, ptr<uint32_t>(ids), ptr<float>(w)),
                {&logits}, {&ids, &w});
    }
  };
  if (logits.dtype() == mx::float64) go(double{});
  else dispatch_float(logits.dtype(), go);
}

}  // namespace

// ------------------------------------------------------------------------------ route
void route(Route& p, const std::vector<mx::array>& inputs_in, std::vector<mx::array>& outputs) {
  auto& enc = cu::get_command_encoder(p.stream());
  const std::vector<mx::array> inputs = row_major_inputs(enc, inputs_in);
  const auto& logits = inputs[0];
  auto& ids = outputs[0];
  auto& w = outputs[1];
  allocate(ids);
  allocate(w);
  const uint32_t E = uint32_t(logits.shape(-1));
  const uint32_t rows = E ? uint32_t(logits.size() / E) : 0;
  if (rows == 0) return;
  NodeChain now{enc, false};
  encode_route(now, logits, rows, E, uint32_t(p.k()), p.normalize() ? 1u : 0u, ids, w);
}

// ------------------------------------------------------------------------------ bucket
void bucket(Bucket& p, const std::vector<mx::array>& inputs_in, std::vector<mx::array>& outputs) {
  auto& enc = cu::get_command_encoder(p.stream());
  const std::vector<mx::array> inputs = row_major_inputs(enc, inputs_in);
  const auto& ids = inputs[0];
  for (auto& o : outputs) allocate(o);
  NodeChain now{enc, false};
  encode_bucket(now, ids, uint32_t(ids.size()), uint32_t(p.num_experts()), uint32_t(p.tile()),
                uint32_t(p.tile()), outputs[0], outputs[1], outputs[2], &outputs[3], nullptr, nullptr, nullptr);
}

// ------------------------------------------------------------------------------ dequantize
void dequantize(Dequantize& p, const std::vector<mx::array>& inputs_in,
                std::vector<mx::array>& outputs) {
  auto& enc = cu::get_command_encoder(p.stream());
  const std::vector<mx::array> inputs = row_major_inputs(enc, inputs_in);
  auto& out = outputs[0];
  allocate(out);
  const WeightShape ws = check_weight(inputs, p.format(), "weight");
  WDesc d = make_desc(inputs.data(), p.format(), ws);
  if (p.format().mode == Mode::Trellis) {
    const uint64_t runs = uint64_t(ws.num_matrices()) * ws.N * moe_trellis_tiles_k(uint32_t(ws.K));
    if (runs == 0) return;
    dispatch_float(out.dtype(), [&](auto tag) {
      using T = decltype(tag);
      for (auto& a : inputs) enc.set_input_array(a);
      launch(enc, {}, {&out}, dequant_trellis_kernel<T>, dim3(uint32_t((runs + 127) / 128)),
             dim3(128), 0, d, runs, ptr<T>(out));
    });
    return;
  }
  const uint64_t rows = uint64_t(ws.num_matrices()) * ws.N;
  d.N = uint32_t(rows);  // the kernel indexes rows across matrices
  const uint64_t total = rows * d.units;
  if (total == 0) return;
  const uint32_t fp16s = (p.format().mode == Mode::MxFp4 && out.dtype() == mx::float16) ? 1u : 0u;
  const dim3 grid(uint32_t((total + 127) / 128)), block(128);
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = decltype(tag);
    for (auto& a : inputs) enc.set_input_array(a);
    launch(enc, {}, {&out}, dequant_kernel<T>, grid, block, 0, d, total, fp16s, ptr<T>(out));
  });
}

// ------------------------------------------------------------------------------ moe_mlp
// Grouped-kernel format of a projection (GG_A4 / GG_A8 / GG_FP4 / GG_TR), -1 when it has
// none.
int gg_format(const WDesc& d) {
  if (d.mode == 0u && d.bits == 4u) return GG_A4;
  if (d.mode == 0u && d.bits == 8u) return GG_A8;
  if (d.mode == 1u && d.fp4_quarter == 0u) return GG_FP4;
  if (d.mode == 2u) return GG_TR;
  return -1;
}

// Whether the raw scales (and biases) of d can be copied with cp.async: 4-byte rows
// (return 1), 16-byte rows and pointers (return 2); 0: not eligible.
int gg_scale_copy(const WDesc& d) {
  const uint32_t row = d.groups * scale_elem_bytes(d.scale_kind);
  auto al = [](const void* p, uintptr_t a) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) % a) == 0; };
  if (row % 4u != 0u || !al(d.scales, 4) || !al(d.biases, 4)) return 0;
  return (row % 16u == 0u && al(d.scales, 16) && al(d.biases, 16)) ? 2 : 1;
}

// sk: affine scales in the activation type (0) or fp32 (1); mxfp4 ignores it.
template <bool GATEUP, typename XT>
auto gg_kernel(int fmt, int sk) {
  switch (fmt) {
    case GG_A4: return sk ? mlp_gg_kernel<GATEUP, XT, GG_A4, 1> : mlp_gg_kernel<GATEUP, XT, GG_A4, 0>;
    case GG_A8: return sk ? mlp_gg_kernel<GATEUP, XT, GG_A8, 1> : mlp_gg_kernel<GATEUP, XT, GG_A8, 0>;
    case GG_TR: return mlp_gg_kernel<GATEUP, XT, GG_TR, 0>;
    default: return mlp_gg_kernel<GATEUP, XT, GG_FP4, 0>;
  }
}

// Whether the sm_90a grouped kernels (gg_wgmma.h) are built and the current device runs them
// (compute capability 9.0; MLX_MOE_CUDA_WGMMA=0: off).
bool wg_available() {
#if defined(MLX_MOE_SM90A)
  return env_u32("MLX_MOE_CUDA_WGMMA", 1u) != 0u && compute_capability() == 90;
#else
  return false;
#endif
}

// Whether the grouped projections take the register-sourced wgmma kernel (mlp_wg_kernel RS:
// the weights dequantized into wgmma's A registers; tiles of 128 pairs): by default both
// affine 4-bit with 4 raw stages in shared memory, and the experts averaging fewer than
// RS_MAX_AVG_PAIRS pairs, where most tiles hold <= 64 pairs and the shared-tile kernel leaves
// one warpgroup idle (H200, same process, affine4 per layer: 256 tokens 443 -> 420 us, 768
// 460 -> 432, 1024 500 -> 501; 2048 631 -> 742 against tiles of 192). Since the shared-tile
// kernel's epilogue is staged, affine4 measures the same on both (256 / 512 / 768 tokens:
// 384 / 395 / 404 us, RS 1% ahead at 768), and mxfp4, whose shared tiles have the scale in
// the byte tables, is faster there: 386 / 397 / 404 us with RS, 340 / 352 / 360 without (H200,
// same process, docs/PERFORMANCE.md), so mxfp4 takes the shared tiles. MLX_MOE_CUDA_WG_RS=0 /
// 1: never / always (affine 4-bit and mxfp4).
constexpr uint32_t RS_MAX_AVG_PAIRS = 64;
#if defined(MLX_MOE_SM90A)
// Whether both grouped projections' mlp_wg_kernel fits in shared memory on nwg warpgroups
// with `stages` raw stages (rs: its register-sourced form).
static bool wg_both_fit(int fgu, int fdn, const MlpDesc& md, int stages, int nwg, bool rs) {
  return wg_smem(fgu, stages, md.gate, md.up, nwg, rs, true) <= 227u * 1024u &&
         wg_smem(fdn, stages, md.down, md.down, nwg, rs, false) <= 227u * 1024u;
}
#endif
bool wg_rs(int fgu, int fdn, const MlpDesc& md) {
#if defined(MLX_MOE_SM90A)
  auto ok = [](int f) { return f == GG_A4 || f == GG_FP4; };
  if (!wg_available() || !ok(fgu) || !ok(fdn)) return false;
  const uint32_t mode = env_u32("MLX_MOE_CUDA_WG_RS", 2u);
  if (mode == 0u) return false;
  if (mode != 1u && (fgu != GG_A4 || fdn != GG_A4 ||
                     uint64_t(md.P) >= uint64_t(RS_MAX_AVG_PAIRS) * md.E))
    return false;
  return wg_both_fit(fgu, fdn, md, 4, 2, true);
#else
  (void)fgu, (void)fdn, (void)md;
  return false;
#endif
}

// Warpgroups of the grouped wgmma kernels, which fixes the bucketing tile (64 pairs per
// warpgroup): 3 (tiles of 192 pairs) where both projections have such a kernel with 3 raw
// stages in shared memory and the experts average at least 128 pairs, else 2. With ~256
// pairs per expert (Qwen3, 4096 tokens) an expert takes two tiles of 192 instead of two or
// three of 128, and each dequantized weight tile feeds 1.5x the products: H100, same process,
// affine4 1285 -> 1208 us per layer, mxfp4 1337 -> 1185; with 64 or fewer per expert the
// third warpgroup only idles (1024 tokens: 505 -> 549 us). MLX_MOE_CUDA_WG_TM=128 / 192:
// that tile whatever the pairs. rs (wg_rs): 2, the register-sourced kernel's tiles of 128.
constexpr uint32_t WG3_MIN_AVG_PAIRS = 128;
int wg_groups(int fgu, int fdn, const MlpDesc& md, bool rs) {
#if defined(MLX_MOE_SM90A)
  const uint32_t tm = env_u32("MLX_MOE_CUDA_WG_TM", 0u);
  if (!wg_available() || tm == 128u || rs) return 2;
  if (tm != 192u && uint64_t(md.P) < uint64_t(WG3_MIN_AVG_PAIRS) * md.E) return 2;
  if (fgu == GG_TR || fdn == GG_TR) return 2;
  if (!wg_both_fit(fgu, fdn, md, 3, 3, false)) return 2;
  return 3;
#else
  (void)fgu, (void)fdn, (void)md, (void)rs;
  return 2;
#endif
}

// Whether the grouped projections take mlp_wg_kernel at all (gg_pick's last try: 2 warpgroups,
// 3 raw stages) rather than mlp_gg_kernel (mma.sync).
bool wg_fits(int fgu, int fdn, const MlpDesc& md) {
#if defined(MLX_MOE_SM90A)
  return wg_available() && wg_both_fit(fgu, fdn, md, 3, 2, false);
#else
  (void)fgu, (void)fdn, (void)md;
  return false;
#endif
}

// The grouped kernel of one projection: mlp_wg_kernel on nwg warpgroups (4 raw stages, else
// 3, as shared memory allows; rs: its register-sourced form, 6 stages, else 4) where
// wg_available(), else mlp_gg_kernel (tiles of 128 pairs: nwg 2 only). smem: its dynamic
// shared memory.
template <bool GATEUP, typename XT>
GgKernel<XT> gg_pick(bool wg, int fmt, int sk, const WDesc& a, const WDesc& b, int nwg, bool rs,
                     uint32_t& smem) {
#if defined(MLX_MOE_SM90A)
  if (wg) {
    const int tries[2] = {rs ? 6 : 4, rs ? 4 : 3};
    for (int stages : tries) {
      const uint32_t bytes = wg_smem(fmt, stages, a, b, nwg, rs, GATEUP);
      if (bytes > 227u * 1024u) continue;
      if (auto k = wg_kernel<XT>(GATEUP, fmt, sk, stages, nwg, rs)) {
        smem = bytes;
        return k;
      }
      break;
    }
    if (rs) throw std::runtime_error("mlx_moe CUDA: no register-sourced grouped kernel fits");
  }
#endif
  if (nwg != 2) throw std::runtime_error("mlx_moe CUDA: no grouped kernel for tiles of 192 pairs");
  smem = gg_smem_bytes(fmt, a, b);
  return gg_kernel<GATEUP, XT>(fmt, sk);
}

// cuda_fused.cu: false when the one-launch kernel does not apply.
bool moe_mlp_one_launch(cu::CommandEncoder& enc, int stream_key, const MlpDesc& md,
                        const mx::array& x, const mx::array* logits, uint32_t normalize,
                        const mx::array* ids, int id_kind, const mx::array* rw, mx::array& out);

void moe_mlp(MoeMLP& p, const std::vector<mx::array>& inputs_in, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  allocate(out);
  if (inputs_in[0].shape(0) == 0) return;
  auto& enc = cu::get_command_encoder(p.stream());
  const std::vector<mx::array> inputs = row_major_inputs(enc, inputs_in);
  const auto& x = inputs[0];
  const uint32_t T = uint32_t(x.shape(0)), D = uint32_t(x.shape(1));
  // Router folded in (p.route_k() > 0; see moe_mlp.cpp): inputs[1] is the logits, and ids /
  // weights are scratch that route_kernel writes first (a kernel node of this primitive,
  // not a primitive of its own: one graph node's host work less per layer).
  const bool fused_route = p.route_k() > 0;
  const uint32_t k = fused_route ? uint32_t(p.route_k()) : uint32_t(inputs[1].shape(1));
  mx::array ids = fused_route ? mx::array({int(T), int(k)}, mx::uint32, nullptr, {}) : inputs[1];
  mx::array rw = fused_route ? mx::array({int(T), int(k)}, mx::float32, nullptr, {}) : inputs[2];
  if (fused_route) {
    allocate(ids);
    allocate(rw);
    enc.add_temporary(ids);
    enc.add_temporary(rw);
  }
  const mx::array& logits = inputs[1];  // (fused_route only)

  MlpDesc md{};
  int pos = fused_route ? 2 : 3;
  WDesc* descs[3] = {&md.gate, &md.up, &md.down};
  bool any_trellis = false;
  for (int i = 0; i < 3; ++i) {
    const Format& f = p.formats()[i];
    const int n = f.num_arrays();
    std::vector<mx::array> arrs(inputs.begin() + pos, inputs.begin() + pos + n);
    *descs[i] = make_desc(inputs.data() + pos, f, check_weight(arrs, f, "weight"));
    if (f.mode == Mode::Trellis) {
      any_trellis = true;
      if (descs[i]->K % 32u != 0u) {
        throw std::invalid_argument(
            "mlx_moe.moe_mlp (CUDA): trellis projections need an input width that is a "
            "multiple of 32, got " + std::to_string(descs[i]->K));
      }
    }
    pos += n;
  }
  const uint32_t E = uint32_t(inputs[fused_route ? 2 : 3].shape(0));
  const uint32_t F = md.gate.N;
  const uint32_t P = T * k;
  md.T = T;
  md.k = k;
  md.D = D;
  md.F = F;
  md.E = E;
  md.P = P;

  // Every input of the primitive is read by the first node that touches it.
  for (auto& a : inputs) enc.set_input_array(a);

  const uint32_t decode_max_pairs = env_u32("MLX_MOE_CUDA_DECODE_MAX_PAIRS", 128u);
  // Few pairs: no bucketing, one block column per pair (MLX_MOE_CUDA_DIRECT_MAX_PAIRS).
  const uint32_t direct_max_pairs = env_u32("MLX_MOE_CUDA_DIRECT_MAX_PAIRS", 32u);
  // Decode path, up to MLX_MOE_CUDA_FUSED_COMBINE tokens (default 1; 0: never): the down
  // kernel also combines (one launch less; measured neutral at 1 token and 2-7% slower from 4
  // tokens up, where the last block's serial combine outweighs the separate launch).
  const bool fused_combine = T <= env_u32("MLX_MOE_CUDA_FUSED_COMBINE", 1u);
  // Affine 4-bit and mxfp4 projections take the tensor-core decode kernel
  // (MLX_MOE_CUDA_MMA_DECODE=0: the fp32 decode kernel for every format), up to
  // MLX_MOE_CUDA_MMA_MAX_PAIRS pairs when all three projections are such (mma_max_pairs,
  // below).
  const bool mma_on = env_u32("MLX_MOE_CUDA_MMA_DECODE", 1u) != 0u;
  auto affine4 = [](const WDesc& d) {  // affine 4-bit or mxfp4 (standard E2M1 decoding)
    return (d.mode == 0u && d.bits == 4u) || (d.mode == 1u && d.fp4_quarter == 0u);
  };
  const bool mma_all = mma_on && affine4(md.gate) && affine4(md.up) && affine4(md.down);
  // Trellis layers with bf16 / fp16 activations take the same kernels in their trellis form
  // (codebook levels as bf16, + their lo half for fp16; su on the activation operand; scale
  // * sv applied in fp32 per run or unit), up to MLX_MOE_CUDA_TR_MMA_MAX_PAIRS pairs (below),
  // where their shared memory fits at one token per chunk.
  const bool x16 = x.dtype() == mx::bfloat16 || x.dtype() == mx::float16;
  // 16-byte aligned (the tensor-core kernels' cp.async copies, trellis decode and grouped)
  auto al16 = [](const void* q) { return (reinterpret_cast<uintptr_t>(q) % 16) == 0; };
  const bool w_al16 = al16(md.gate.w) && al16(md.up.w) && al16(md.down.w);
  bool tr_mm = mma_on && x16 && md.gate.mode == 2u && md.up.mode == 2u && md.down.mode == 2u;
  if (tr_mm) {
    const int ns = x.dtype() == mx::bfloat16 ? 1 : 2;
    tr_mm = mm_layout_tr<true>(md, 1, ns, 1, MM_WARPS_GU).total <= 227u * 1024u &&
            mm_layout_tr<false>(md, 1, 2, 2, MM_WARPS_DN).total <= 227u * 1024u && w_al16;
  }
  // Grouped tensor-core kernels (bf16 / fp16 activations; gate/up of one format among affine
  // 4-bit, 8-bit, mxfp4 and trellis, down of one of them; MLX_MOE_CUDA_GG=0: the older
  // fp32-rescale kernel): mlp_gg_kernel (moe_cuda_grouped.cuh) / mlp_wg_kernel
  // (moe_cuda_wgmma.cuh), tiles of GG_TM pairs.
  // Trellis: grouped from MLX_MOE_CUDA_TR_GG_MIN_PAIRS pairs. Default: always on wgmma
  // (measured faster than the fp32 decode kernels from 1 token up, Qwen3 layer on the H100:
  // 137 vs 219 us at 1 token, 567 vs 1938 at 16), from 16 pairs on mma.sync (256 vs 216 us
  // at 8 pairs, 1072 vs 1918 at 128; linear in between: even at ~13); docs/PERFORMANCE.md.
  const uint32_t tr_gg_min =
      any_trellis ? env_u32("MLX_MOE_CUDA_TR_GG_MIN_PAIRS", wg_available() ? 1u : 16u) : 0u;
  int gg_fgu = -1, gg_fdn = -1, gg_sc_gu = 0, gg_sc_dn = 0, gg_sk_gu = 0, gg_sk_dn = 0;
  bool gg_ok = false;
  if ((any_trellis ? P >= tr_gg_min : P > decode_max_pairs) && x16 &&
      env_u32("MLX_MOE_CUDA_GG", 1u) != 0u) {
    gg_fgu = gg_format(md.gate);
    gg_fdn = gg_format(md.down);
    auto sc_of = [](const WDesc& d) { return d.mode == 2u ? 2 : gg_scale_copy(d); };
    gg_sc_gu = std::min(sc_of(md.gate), sc_of(md.up));
    gg_sc_dn = sc_of(md.down);
    // Affine scales / biases in the activation type (what mlx-community checkpoints have;
    // broadcast as they are) or fp32 (rounded to it); other scale dtypes keep the older kernel.
    const uint32_t xkind = x.dtype() == mx::bfloat16 ? 2u : 1u;
    auto sk_of = [&](const WDesc& d) {
      return d.mode != 0u ? 0 : d.scale_kind == xkind ? 0 : d.scale_kind == 0u ? 1 : -1;
    };
    gg_sk_gu = sk_of(md.gate);
    gg_sk_dn = sk_of(md.down);
    gg_ok = gg_fgu >= 0 && gg_fgu == gg_format(md.up) && gg_fdn >= 0 && gg_sc_gu > 0 &&
            gg_sk_gu >= 0 && gg_sk_gu == sk_of(md.up) && gg_sk_dn >= 0 &&
            gg_sc_dn > 0 && al16(ptr<void>(x)) && w_al16;
    // Shared memory: the mma.sync kernel's (the sm_90a kernel falls back to it when its own
    // stages do not fit).
    auto fits = [&](int fmt, const WDesc& a, const WDesc& b) {
      return gg_smem_bytes(fmt, a, b) <= 227u * 1024u;
    };
    if (gg_ok) gg_ok = fits(gg_fgu, md.gate, md.up) && fits(gg_fdn, md.down, md.down);
  }
  // The shared-memory tensor-core decode kernels' pair limits (affine 4-bit / mxfp4:
  // MLX_MOE_CUDA_MMA_MAX_PAIRS; trellis: MLX_MOE_CUDA_TR_MMA_MAX_PAIRS). Where the layer has
  // the sm_90a grouped kernels (gg_ok, wg_fits), they are pairs per expert, like the
  // register-operand kernels' (thirty-second session): a decode block walks its expert's pairs
  // 8 at a time, so its cost against the grouped kernels follows pairs per expert, and with fp16
  // activations (bf16 hi + lo: twice the products) it crosses earlier. H200, device time per
  // layer, crossovers measured in pairs per expert (decode against grouped on both sides):
  // bf16 activations, affine 4-bit with fp32 scales: Qwen3 6.2 (6 E 370.9 vs 379.8 us, 8 E
  // 446.3 vs 381.8), GLM-4.7-Flash 4.9 (4.5 E 355.4 vs 369.2, 6 E 422.6 vs 368.1); trellis:
  // Qwen3 5.6 (4 E 688.9 vs 789.9, 6 E 817.0 vs 793.1), GLM-4.7-Flash 4.5 (4.5 E 771.7 vs
  // 774.9, 5 E 803.7 vs 775.0); fp16 activations: affine 4-bit (fp32 scales) ~3.2 and ~2.9,
  // mxfp4 2.7 and 2.6, trellis 2.75 and 2.6 (docs/PERFORMANCE.md, thirty-second session).
  // Hence 5.5 E (mma) and 5 E (trellis) for bf16, 2.75 E for fp16. The absolute limits they
  // replace (1024 and 768, tuned on Qwen3 against older grouped kernels) took GLM-4.7-Flash
  // affine 4-bit at 1024 pairs to 904 us against 372 grouped. Elsewhere -- no sm_90a kernel
  // (mma.sync grouped kernels: 785-801 us per layer at 48-128 tokens against 262-446 decode),
  // or scales the grouped kernels do not take (bf16 scales with fp16 activations: 1013-1077 us
  // against 368-700) -- the absolute limits stay.
  const bool wg_fast = gg_ok && wg_fits(gg_fgu, gg_fdn, md);
  const bool x_bf16 = x.dtype() == mx::bfloat16;
  const uint32_t mma_max_pairs = env_u32(
      "MLX_MOE_CUDA_MMA_MAX_PAIRS", !wg_fast ? 1024u : x_bf16 ? 11u * E / 2u : 11u * E / 4u);
  if (tr_mm)
    tr_mm = P <= env_u32("MLX_MOE_CUDA_TR_MMA_MAX_PAIRS", !wg_fast ? 768u : x_bf16 ? 5u * E : 11u * E / 4u);
  // Layers the register-operand decode kernels take (kernels/moe_cuda_regw.cuh: weights
  // loaded straight into the MMA's registers, no shared-memory staging; H in bf16): bf16
  // activations, every projection affine 4-bit or 8-bit with bf16 scales and biases (what
  // mlx-community's 4- and 8-bit checkpoints of bf16 models hold) or mxfp4, widths D and F
  // multiples of 256 up to 2048. MLX_MOE_CUDA_REGW=0: never (the shared-memory decode
  // kernels). They stay on the decode path up to MLX_MOE_CUDA_REGW_MAX_PAIRS pairs (12 E;
  // H200, Qwen3 layer with bf16 scales, device time per layer against the grouped kernels:
  // 273 vs 359 us at 1280 pairs, 375 vs 364 at 2048; docs/PERFORMANCE.md, twenty-first
  // session), layers with an 8-bit projection up to MLX_MOE_CUDA_REGW8_MAX_PAIRS (6 E; Qwen3
  // 8-bit: 352 vs 446 us at 512 pairs, 485 vs 450 at 1024; twenty-second session).
  // 8-bit projections (group size 32 or 64) as rows of twice as many 4-bit codes (the
  // kernels' BITS = 8; bucketed form only, at 1 token too: the shared-memory direct kernels
  // have no tensor-core form for them).
  // mxfp4 projections (E8M0 scales, standard E2M1 decoding) in their FP4 form, bucketed or
  // direct like affine 4-bit, up to MLX_MOE_CUDA_REGW_FP4_MAX_PAIRS pairs (10 E; Qwen3 mxfp4
  // layer, against the grouped kernels: 322 vs 337 us at 1280 pairs, 285 vs 335 at 1024;
  // the byte-table decode's build 402 vs 335 at 1536; docs/PERFORMANCE.md, twenty-third
  // session).
  // (bits and group size: those regw_kernel has a kernel for)
  auto regw_fmt = [&](const WDesc& d) {
    const bool aff = d.mode == 0u && d.scale_kind == 2u && d.biases != nullptr && al16(d.biases);
    const bool fp4 = d.mode == 1u && d.scale_kind == 3u && d.fp4_quarter == 0u;
    return (aff || fp4) && regw_kernel(false, d.group_size, false, d.bits, fp4) != nullptr &&
           al16(d.scales);
  };
  const bool regw_all4 = md.gate.bits == 4u && md.up.bits == 4u && md.down.bits == 4u;
  const bool regw_any_fp4 = md.gate.mode == 1u || md.down.mode == 1u;
  const bool regw_fmt_ok = mma_on && x.dtype() == mx::bfloat16 &&
                           env_u32("MLX_MOE_CUDA_REGW", 1u) != 0u && regw_fmt(md.gate) &&
                           regw_fmt(md.up) && regw_fmt(md.down) &&
                           md.gate.group_size == md.up.group_size && md.gate.bits == md.up.bits &&
                           md.gate.mode == md.up.mode &&
                           D % 256u == 0u &&
                           D <= 2048u && F % 256u == 0u && F <= 2048u && w_al16 &&
                           al16(ptr<void>(x));
  // (bucketed: no fused combine, these kernels leave the slots to combine_kernel; layers with
  // 8-bit projections take them at 1 token too)
  const bool regw_layer = regw_fmt_ok && (!fused_combine || !regw_all4);
  // The limits above are pairs per expert (thirty-first session): 6 E, 10 E and 12 E, the
  // values measured on Qwen3's 128 experts (768, 1280, 1536). A block of these kernels
  // walks its expert's pairs 8 at a time with the weights in registers, so their cost
  // against the grouped kernels follows the pairs per expert, not the pairs: GLM-4.7-Flash
  // (64 experts) at 1280 pairs, 20 per expert, took 490.8 us per layer for mxfp4 (the
  // grouped kernels: 324.75 at 1024 pairs, 328.5 at 1536), affine 4-bit at 1536 pairs 499.4
  // against 352.55 on the grouped kernels; at 8 pairs per expert the register-operand
  // kernels win (mxfp4 269.5 vs 318.9, affine 232.9 vs 345.8), at 12 affine still wins
  // (303.1 vs 347.6) and mxfp4 loses (350.1 vs 323.45) (docs/PERFORMANCE.md, thirty-first
  // session). The MLX_MOE_CUDA_REGW*_MAX_PAIRS overrides are pairs.
  const uint32_t decode_top =
      regw_layer ? std::max(!regw_all4     ? env_u32("MLX_MOE_CUDA_REGW8_MAX_PAIRS", 6u * E)
                            : regw_any_fp4 ? env_u32("MLX_MOE_CUDA_REGW_FP4_MAX_PAIRS", 10u * E)
                                           : env_u32("MLX_MOE_CUDA_REGW_MAX_PAIRS", 12u * E),
                            decode_max_pairs)
      : mma_all  ? std::max(mma_max_pairs, decode_max_pairs)
                 : decode_max_pairs;
  const uint32_t max_active = std::min(E, P);
  const bool gg_tiles_ok = (P + GG_TM - 1) / GG_TM + max_active <= 65535u;  // grid.y
  const bool grouped =
      any_trellis ? !tr_mm && gg_ok && gg_tiles_ok && P >= tr_gg_min
                  : P > decode_top;
  const bool gg = grouped && gg_ok && gg_tiles_ok;
  // The register-operand kernels' direct form (kernels/moe_cuda_regw.cuh, DIRECT): no
  // bucketing, the down kernel sums a token's slots itself (one MMA column each: k <= 8; k F /
  // 8 threads per block, one such block per SM), up to MLX_MOE_CUDA_REGW_DIRECT_MAX_TOKENS
  // tokens (2), above which such layers take the bucketed form (MLX_MOE_CUDA_REGW_DIRECT=0:
  // the direct path's shared-memory kernels at 1 token, up to MLX_MOE_CUDA_DIRECT_MAX_PAIRS).
  // H200, bf16 scales, device time per layer, direct form against the shared-memory direct
  // kernels at 1 token and the bucketed form above: Qwen3 19.3 vs 27.5 us, 2 tokens 32.7 vs
  // 33.4; GLM-4.7-Flash 18.2 vs 27.1, 2 tokens 31.1 vs 33.5; 4 tokens (an intermediate build)
  // Qwen3 64.0 vs 56.8, GLM-4.7-Flash 62.5 vs 59.2: the direct down blocks, one per SM, take
  // a wave per token (docs/PERFORMANCE.md, twenty-second session). mxfp4 (Qwen3): 1 token
  // 22.5 us against 26.6 bucketed and 28.4 on the shared-memory kernels, 2 tokens 38.4
  // against 41.3 and 39.6 (twenty-third session).
  const bool regw_direct_ok = regw_fmt_ok && regw_all4 && k <= 8u &&
                              k * F <= 8u * uint32_t(cuda::RW_DIRECT_THREADS) &&
                              env_u32("MLX_MOE_CUDA_REGW_DIRECT", 1u) != 0u &&
                              T <= env_u32("MLX_MOE_CUDA_REGW_DIRECT_MAX_TOKENS", 2u);
  // (the shared-memory direct kernels: layers the bucketed register-operand form does not take)
  const bool direct = !grouped && (regw_direct_ok || (!regw_layer && P <= direct_max_pairs));
  const bool regw_direct = direct && regw_direct_ok;
  const bool regw = regw_layer && !grouped && !direct;  // (affine / mxfp4 layers: tr_mm is false)
  const int ik = id_kind(ids.dtype());

  // Bucketing (device-side; no host sync). Grids below are sized for the worst case and
  // read the actual counts (meta) on the device, exiting early (CUDA graphs: no indirect
  // dispatch).
  const bool gg_rs = gg && wg_rs(gg_fgu, gg_fdn, md);
  const int gg_nwg = gg ? wg_groups(gg_fgu, gg_fdn, md, gg_rs) : 2;
  const uint32_t btile = gg ? uint32_t(64 * gg_nwg) : uint32_t(G_TM);
  // Weight loads with L2 evict_first (MlpDesc::l2_ef): the decode kernels (shared-memory,
  // register-operand and one-launch kernels: each weight read once per call) always, the
  // grouped wgmma kernel's affine / mxfp4 copies while the experts average at most one tile of
  // pairs (their weights then read about once too). H200, Qwen3 layer, device time per layer,
  // same process: affine 4-bit (bf16 scales) 1 / 2 / 16 tokens 19.9 / 33.7 / 115.8 -> 18.8 /
  // 31.4 / 112.0 us, mxfp4 23.1 / 41.0 / 147.5 -> 22.0 / 38.3 / 143.7, trellis 4-bit 48.4 ->
  // 44.7 at 1 token; grouped, 256 tokens: affine 4-bit 369.4 -> 363.0, mxfp4 347.8 -> 341.3,
  // 1024 tokens equal, 4096 tokens (two tiles per expert) affine 4-bit 965.4 -> 967.3
  // (docs/PERFORMANCE.md, twenty-fourth session). MLX_MOE_CUDA_L2_EVICT_FIRST=0: plain loads
  // everywhere.
  md.l2_ef = env_u32("MLX_MOE_CUDA_L2_EVICT_FIRST", 1u) == 0u ? 0u
             : gg && P <= btile * E                          ? 3u
                                                             : 1u;
  const uint32_t max_tiles = (P + btile - 1) / btile + max_active;
  // An expert's tiles balanced in steps of 64 pairs (tile_first_row; only tiles of 192 differ
  // from the plain split): an expert of 193-256 pairs takes 128 + the rest rather than 192 + a
  // tail of 1-64 (H200, Qwen3 affine4 at 4096 tokens, 256 pairs per expert: 1186 -> 1158 us
  // per layer; docs/PERFORMANCE.md, seventeenth session). MLX_MOE_CUDA_TILE_SPLIT=0: plain.
  const uint32_t tile_q = btile % 64u == 0u && env_u32("MLX_MOE_CUDA_TILE_SPLIT", 1u) != 0u ? 64u : btile;
  // Few pairs, affine 4-bit / mxfp4: the whole layer as one kernel (cuda_fused.cu), opt-in:
  // MLX_MOE_CUDA_ONE_MAX_PAIRS=n (default 0: off; measured slower, docs/DESIGN.md).
  if (!grouped && mma_all &&
      moe_mlp_one_launch(enc, p.stream().index, md, x, fused_route ? &logits : nullptr,
                         uint32_t(p.route_normalize()), fused_route ? nullptr : &ids, ik,
                         fused_route ? nullptr : &rw, out)) {
    return;
  }
  mx::array counts = scratch(enc, direct ? 1 : E), offsets = scratch(enc, direct ? 1 : E + 1),
            pairs = scratch(enc, direct ? 1 : P);
  mx::array active = scratch(enc, direct ? 1 : E),
            tiles = scratch(enc, grouped ? size_t(2) * max_tiles : 1), meta = scratch(enc, 4);
  // Decode path on the tensor-core kernels (affine 4-bit / mxfp4 projections, or trellis: tr_mm).
  const bool gu_mm = tr_mm || (mma_on && affine4(md.gate) && affine4(md.up));
  const bool dn_mm = tr_mm || (mma_on && affine4(md.down));
  // ... on sm_90+ (MLX_MOE_CUDA_PDL=0: off): its kernels -- the router when folded in, the
  // one-block bucketing, gate/up, down, the combine -- as one chain of programmatic dependents
  // (launch_pdl): each kernel's blocks start while the one before runs, and wait
  // (pdl_wait) before they read its outputs; the down blocks issue their weight copies
  // first. H100, Qwen3 layer, same process: 2 / 16 tokens 49.3 -> 46.1 / 195.5 ->
  // 192.3-195.6 us of device time per layer, mlx-lm's pipelined loop 52.2 -> 51.2 / 195.5 ->
  // 192.8 us/layer (the chain costs 5-18 us/layer more host encoding, hidden there: the
  // device is the bound). Layers on the register-operand kernels too, 8-bit ones included
  // (gu_mm / dn_mm false for them; H200, Qwen3 8-bit, 1 / 16 tokens 36.9 / 225.6 -> 35.3 /
  // 223.9 us; twenty-third session).
  NodeChain chain{enc, !grouped && ((gu_mm && dn_mm) || regw || regw_direct) && pdl_available()};
  // Direct: the gate/up kernel may route instead (decided below, where its grid is resident
  // at once: 1 token), with plain edges: one kernel and no child graph. Preferred to the
  // chain: on the H100 the chain with the router as its first kernel has 1.9 us less device
  // time per layer (31.1 -> 29.2 us) but 4.4 us more host encoding, which makes mlx-lm's
  // pipelined loop, host-bound at 1 token, 2.9 us/layer slower (34.7 -> 37.6);
  // MLX_MOE_CUDA_ROUTE_IN_GU=0: never (the chain).
  const bool route_in_gu_ok =
      fused_route && direct && gu_mm && !regw_direct &&
      E <= ROUTE_BLOCK_MAX_E && E <= uint32_t(MM_WARPS_GU * 32) && k <= 32u &&
      float_kind(logits.dtype()) >= 0 && env_u32("MLX_MOE_CUDA_ROUTE_IN_GU", 1u) != 0u;
  if (fused_route && !route_in_gu_ok)
    encode_route(chain, logits, T, E, k, uint32_t(p.route_normalize()), ids, rw);
  if (!direct)
    encode_bucket(chain, ids, P, E, btile, tile_q, counts, offsets, pairs, nullptr, &active,
                  grouped ? &tiles : nullptr, &meta);

  mx::array H = scratch(enc, size_t(P) * F);
  mx::array Yp = scratch(enc, regw_direct ? 1 : size_t(P) * D);

  dispatch_float(x.dtype(), [&](auto tag) {
    using XT = decltype(tag);
    const XT* xp = ptr<XT>(x);
    bool combined = false;
    if (regw || regw_direct) {
      if constexpr (std::is_same_v<XT, __nv_bfloat16>) {
        // gate/up: D / 8 threads (one 16-byte chunk of a staged row each; 8-bit: D / 4), 16
        // rows per block; down: F / 8 (F / 4) threads, 16 * dn_mt rows (below). H holds bf16 rows
        // [bucketed pair, F].
        // Direct: gate/up blocks per pair (H rows [pair, F]); down blocks per token, k F / 8
        // threads, 16 rows, writing the output.
        const uint32_t gs_gu = md.gate.group_size, gs_dn = md.down.group_size;
        const uint32_t b_gu = md.gate.bits, b_dn = md.down.bits;
        // (8-bit: rows of twice as many nibbles, in groups of twice as many)
        const uint32_t Kg = D * b_gu / 4u, Kd = F * b_dn / 4u;
        __nv_bfloat16* Hb = reinterpret_cast<__nv_bfloat16*>(ptr<uint32_t>(H));
        const cuda::RegwDirect dx{ptr<void>(ids), ik, regw_direct ? ptr<__nv_bfloat16>(out) : nullptr};
        // The bucketed kernels' streaming form (STREAM in kernels/moe_cuda_regw.cuh: blocks of W
        // tiles of 16 rows with KS warps each, the weights streamed through registers), up to
        // MLX_MOE_CUDA_REGW_STREAM_MAX_PAIRS pairs (default 8 E: experts averaging up to 8
        // pairs; 0: never). Gate/up on W = 4, KS = 2, or 8 x 1 for mxfp4 from E pairs up (one
        // pair per expert on average); down on the plain form (its block already covers 32
        // rows). MLX_MOE_CUDA_REGW_{GU,DN}_{W,KS} override the shape (W 0, or a shape that does
        // not fit N, K or 8 warps: that projection on the plain form).
        // H200, device time per layer, plain -> gate/up streamed (4 x 2), Qwen3 affine 4-bit
        // (bf16 scales) 16 / 32 / 64 tokens 111.4 / 144.8 / 178.7 -> 104.9 / 136.8 / 171.9 us,
        // affine 8-bit 224.1 / 292.8 / 355.7 -> 165.2 / 217.0 / 274.8; mxfp4 (8 x 1) 142.9 /
        // 185.0 / 220.7 -> 126.7 / 166.9 / 205.9, 4 x 2 at 8 tokens 92.8 -> 88.0. Above 8 pairs
        // per expert it loses (192 tokens: 7-19 us; the streamed units are reloaded for each
        // pass of 8 columns); down streamed was slower than its plain form (Qwen3 affine 4-bit,
        // 16 tokens: 47-83 us against 41) (docs/PERFORMANCE.md, twenty-fifth and twenty-sixth
        // sessions).
        const uint32_t st_max = env_u32("MLX_MOE_CUDA_REGW_STREAM_MAX_PAIRS", 8u * E);
        const bool gu_8x1 = md.gate.mode == 1u && P >= E;
        // Whether a projection streams; W (1 when not) and its block's warps (0 when not).
        auto stream_shape = [&](bool gu, uint32_t Kn, uint32_t N, uint32_t& Wt, uint32_t& warps) {
          Wt = env_u32(gu ? "MLX_MOE_CUDA_REGW_GU_W" : "MLX_MOE_CUDA_REGW_DN_W",
                       gu ? (gu_8x1 ? 8u : 4u) : 0u);
          const uint32_t KS = env_u32(gu ? "MLX_MOE_CUDA_REGW_GU_KS" : "MLX_MOE_CUDA_REGW_DN_KS",
                                      gu ? (gu_8x1 ? 1u : 2u) : 1u);
          const bool on = regw && P <= st_max && Wt > 0u && KS > 0u && Wt <= 8u && KS <= 8u &&
                          Wt * KS <= 8u && N % (16u * Wt) == 0u && (Kn / 256u) % KS == 0u;
          warps = on ? Wt * KS : 0u;
          if (!on) Wt = 1u;
          return on;
        };
        uint32_t w_gu, wp_gu, w_dn, wp_dn;
        const bool st_gu = stream_shape(true, Kg, F, w_gu, wp_gu);
        const bool st_dn = stream_shape(false, Kd, D, w_dn, wp_dn);
        // The plain down block: 32 rows (REGW_DN_MT), or 16 for mxfp4 down (at most 64
        // registers: 10 blocks per SM at Qwen3 widths against 8). H200, device time per layer,
        // 32 -> 16 rows: Qwen3 mxfp4 4 / 16 / 64 tokens 53.6 / 120.0 / 200.0 -> 51.25 / 116.45 /
        // 197.95 us, GLM-4.7-Flash mxfp4 55.1 / 124.5 / 197.95 -> 52.05 / 117.65 / 192.6. Affine
        // 4-bit gains 1-4% at 4-8 tokens and loses 1-2% at 32-64 (Qwen3 64 tokens 170.75 ->
        // 174.1), so it keeps 32. 64-row blocks (168 registers, 4 per SM) were slower for both
        // (Qwen3 16 tokens: affine 101.05 -> 106.75, mxfp4 119.65 -> 132.55; docs/PERFORMANCE.md,
        // thirty-first session). MLX_MOE_CUDA_REGW_DN_MT=1 / 2 forces either (4-bit).
        const uint32_t dn_mt_env =
            env_u32("MLX_MOE_CUDA_REGW_DN_MT", md.down.mode == 1u ? 1u : uint32_t(REGW_DN_MT));
        const uint32_t dn_mt =
            regw_direct || st_dn || (b_dn == 4u && dn_mt_env == 1u) ? 1u : uint32_t(REGW_DN_MT);
        // The persistent ring-fed kernels (kernels/moe_cuda_ring.cuh: a producer warp copying
        // each item's weight rows into a ring of shared-memory stages by bulk copies, K / 256
        // consumer warps), bucketed 4-bit projections on sm_90, up to
        // MLX_MOE_CUDA_REGW_RING_MAX_PAIRS pairs (8 E). MLX_MOE_CUDA_REGW_RING: bit 0 gate/up,
        // bit 1 down (default 0: off; slower, DESIGN.md). The grid is the blocks resident at once:
        // gate/up one per SM, down MLX_MOE_CUDA_RING_DN_BPS (2) per SM, each with as many
        // stages as fit (at most MLX_MOE_CUDA_RING_NS, 8).
        const uint32_t ring_env = env_u32("MLX_MOE_CUDA_REGW_RING", 0u);
        const bool ring_on = regw && ring_env != 0u &&
                             P <= env_u32("MLX_MOE_CUDA_REGW_RING_MAX_PAIRS", 8u * E) && ring_available();
        auto ring_node = [&](bool gu, uint32_t Kn, uint32_t N, const cuda::WDesc& wd, const XT* xin,
                             KernelNode& out_node) {
          RingKernel rk = ring_kernel(gu, wd.group_size, wd.mode == 1u);
          if (!rk || wd.bits != 4u || Kn % 256u != 0u || Kn > 2048u) return false;
          const int mt = gu ? RING_GU_MT : RING_DN_MT;
          if (N % (16u * uint32_t(mt)) != 0u) return false;
          const uint32_t bps = gu ? 1u : std::max(1u, env_u32("MLX_MOE_CUDA_RING_DN_BPS", 2u));
          // (the device's shared memory per SM and per block, looked up once per device)
          const std::pair<int, int> smem_lim = per_device([](int dev) {
            int sm = 0, blk = 0;
            check(cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev),
                  "cudaDeviceGetAttribute");
            check(cudaDeviceGetAttribute(&blk, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                  "cudaDeviceGetAttribute");
            return std::pair<int, int>(sm, blk);
          });
          const int smem_sm = smem_lim.first, smem_blk = smem_lim.second;
          const uint32_t budget = std::min<uint32_t>(uint32_t(smem_blk), uint32_t(smem_sm) / bps - 1024u);
          const uint32_t G = Kn / wd.group_size;
          const int np = gu ? 2 : 1;
          // as many stages as fit, down to 2 (MLX_MOE_CUDA_RING_NS: at most that many, 1-8; 0
          // stages would divide by zero in the kernel's ring index)
          uint32_t ns = std::clamp(env_u32("MLX_MOE_CUDA_RING_NS", 8u), 1u, 8u);
          auto smem_of = [&](uint32_t n) {
            return cuda::ring_layout(Kn, G, wd.group_size, wd.mode == 1u, np, mt, n).total;
          };
          uint32_t smem = smem_of(ns);
          while (ns > 2u && smem > budget) smem = smem_of(--ns);
          if (smem > budget) return false;
          const uint32_t threads = Kn / 8u + 32u;
          const uint32_t grid = std::min(capacity(rk, int(threads), smem),
                                         max_active * (N / (16u * uint32_t(mt))));
          if (grid == 0u) return false;
          out_node = kernel_node(rk, dim3(grid), dim3(threads), smem, md,
                                 reinterpret_cast<const __nv_bfloat16*>(xin), ptr<uint32_t>(pairs),
                                 ptr<uint32_t>(offsets), ptr<uint32_t>(active), ptr<uint32_t>(meta),
                                 ptr<float>(rw), gu ? Hb : static_cast<__nv_bfloat16*>(nullptr),
                                 gu ? static_cast<float*>(nullptr) : ptr<float>(Yp), ns);
          return true;
        };
        KernelNode ring_gu, ring_dn;
        // (gate/up: one kernel for both projections, so up in gate's format)
        const bool rg_gu = ring_on && (ring_env & 1u) && md.up.group_size == md.gate.group_size &&
                           md.up.mode == md.gate.mode && md.up.bits == md.gate.bits &&
                           ring_node(true, Kg, F, md.gate, xp, ring_gu);
        const bool rg_dn = ring_on && (ring_env & 2u) &&
                           ring_node(false, Kd, D, md.down, reinterpret_cast<const XT*>(Hb), ring_dn);
        if (rg_gu) {
          chain.add(ring_gu, {&x, &ids, &pairs, &offsets, &active, &meta}, {&H});
        } else {
          chain.add(kernel_node(regw_kernel(true, gs_gu, regw_direct, b_gu, md.gate.mode == 1u, st_gu),
                                dim3(regw_direct ? P : max_active, F / (16u * w_gu)),
                                dim3(st_gu ? 32u * wp_gu : Kg / 8u),
                                regw_smem_bytes(Kg, gs_gu * b_gu / 4u, 2, 1, 1u, wp_gu),
                                md, xp, ptr<uint32_t>(pairs), ptr<uint32_t>(offsets), ptr<uint32_t>(active),
                                ptr<uint32_t>(meta), ptr<float>(rw), Hb, static_cast<float*>(nullptr), dx),
                    {&x, &ids, &pairs, &offsets, &active, &meta}, {&H});
        }
        if (rg_dn) {
          chain.add(ring_dn, {&H, &ids, &pairs, &offsets, &active, &meta, &rw}, {&Yp});
        } else {
          chain.add(kernel_node(regw_kernel(false, gs_dn, regw_direct, b_dn, md.down.mode == 1u, st_dn, dn_mt),
                                dim3(regw_direct ? T : max_active, D / (16u * dn_mt * w_dn)),
                                dim3(regw_direct ? k * F / 8u : st_dn ? 32u * wp_dn : Kd / 8u),
                                regw_smem_bytes(Kd, gs_dn * b_dn / 4u, 1, int(dn_mt), regw_direct ? k : 1u,
                                                wp_dn),
                                md, static_cast<const __nv_bfloat16*>(Hb), ptr<uint32_t>(pairs),
                                ptr<uint32_t>(offsets), ptr<uint32_t>(active), ptr<uint32_t>(meta),
                                ptr<float>(rw), static_cast<__nv_bfloat16*>(nullptr), ptr<float>(Yp), dx),
                    {&H, &ids, &pairs, &offsets, &active, &meta, &rw}, {regw_direct ? &out : &Yp});
        }
        combined = regw_direct;
      }
    } else if (!grouped) {
      auto smem_for = [&](uint32_t Kd, uint32_t cap, uint32_t& maxt) {
        const uint32_t per = (Kd + Kd / 32) * 4;
        maxt = std::min<uint32_t>({cap, P, std::max<uint32_t>(1, (200 * 1024) / per)});
        return maxt * per;
      };
      // Tensor-core kernel: tokens per chunk (one block per pair when direct), shrunk while
      // the block's shared memory is large (fewer blocks per SM).
      auto mm_smem = [&](uint32_t units, uint32_t G, int NP, int NS, int MT, int NW, bool raw16,
                         bool raw8, uint32_t& maxt, uint32_t cap) {
        auto layout = [&](uint32_t mt) {
          if (!tr_mm) return mm_layout(units, G, mt, NP, NS, MT, NW, raw16, raw8);
          return NP == 2 ? mm_layout_tr<true>(md, mt, NS, MT, NW) : mm_layout_tr<false>(md, mt, NS, MT, NW);
        };
        maxt = direct ? 1u : std::min<uint32_t>(cap, P);
        MmLayout l = layout(maxt);
        while (maxt > 1 && l.total > 76u * 1024u) {
          maxt = (maxt + 1) / 2;
          l = layout(maxt);
        }
        return l.total;
      };
      const uint32_t gx = direct ? P : max_active;
      // Tensor-core blocks: gate/up 16 rows (32 measured slower or equal at 1-64 tokens).
      const uint32_t rows_gu = gu_mm ? 16 : DEC_WARPS * dec_rows<true>();
      // Weight rows as bulk copies (mm_issue's BULK: one cp.async.bulk per row and all of K,
      // from warp 0, on sm_90; other devices' code keeps the cp.async slices): gate/up for
      // mxfp4 and up to 16 pairs, down for mxfp4 and the direct path (up to 32 pairs). The
      // per-warp cp.async slices let each warp start on its first units while the rest are in
      // flight, which is faster for affine gate/up from 32 pairs (16 tokens: 178.6 against
      // 184.9 us per layer) and neutral for affine down there; the bulk copies take a quarter
      // of the item's instructions off (docs/PERFORMANCE.md, sixteenth session).
      // MLX_MOE_CUDA_MM_BULK=0: never, 1: always.
      const uint32_t bulk_env = env_u32("MLX_MOE_CUDA_MM_BULK", 2u);
      auto bulk = [&](bool fp4, bool few) { return bulk_env == 1u || (bulk_env == 2u && (fp4 || few)); };
      const bool bulk_gu = bulk(md.gate.mode == 1u || md.up.mode == 1u, P <= 16u);
      const bool bulk_dn = bulk(md.down.mode == 1u, direct);
      // mxfp4 scales as raw E8M0 bytes by cp.async, converted after the first barrier, and
      // no activation unit sums (no bias): the kernels' RAW8 form, with the bulk copies;
      // copy_scales's loads otherwise. H200, Qwen3 mxfp4 layer, device time per layer 1 / 4 /
      // 16 / 64 tokens 35.9 / 96.2 / 261.5 / 471.0 -> 28.6 / 72.2 / 189.1 / 342.4 us
      // (docs/PERFORMANCE.md, seventeenth session). MLX_MOE_CUDA_MM_RAW8=0: off.
      const bool raw8_on = !tr_mm && env_u32("MLX_MOE_CUDA_MM_RAW8", 1u) != 0u;
      const bool raw8_gu = raw8_on && gu_mm && bulk_gu && !std::is_same_v<XT, float> && mm_raw8<true>(md);
      const bool raw8_dn = raw8_on && dn_mm && bulk_dn && mm_raw8<false>(md);
      // Down: 64 rows per block (MT 4) instead of 32 for affine 4-bit down from 32 pairs up,
      // where four such blocks still fit on an SM at 4 tokens per chunk (Qwen3's widths; not
      // GLM-4.7-Flash's 1536-wide down); tokens per chunk 4 while the experts average at most
      // 2 pairs (that fourth block per SM), else up to 8. H200, Qwen3 affine4 layer, device
      // time per layer, 64 rows against 32: 4 tokens 69.3 -> 65.4 us, 16 tokens 178.6 ->
      // 167.7 (chunks of 4 tokens; 174.9 with 8), 64 tokens 319.2 -> 309.8; 1 token (8
      // pairs) 28.9 -> 30.1, hence not below 32 pairs (docs/PERFORMANCE.md, sixteenth session).
      // mxfp4 down keeps 32 rows (measured with an early form of its raw scale copies, above:
      // 4 tokens 83.0 -> 78.0 us, but 16 tokens 230.0 -> 233.4 and 64 tokens 500 -> 543).
      // MLX_MOE_CUDA_DN_MT=2 / 4 forces either.
      const uint32_t dn_force = env_u32("MLX_MOE_CUDA_DN_MT", 0u);
      auto dn4_bytes = [&](uint32_t maxt) {  // a 64-row down block's shared memory
        return mm_layout(F / 32, md.down.groups, maxt, 1, 2, 4, MM_WARPS_DN,
                         !raw8_dn && mm_raw16<false>(md), raw8_dn).total;
      };
      const bool dn_fits4 = dn_mm && !tr_mm && dn4_bytes(1) <= 227u * 1024u;
      const bool dn_auto4 = dn_fits4 && md.down.mode == 0u && P >= 32u &&
                            dn4_bytes(std::min(4u, P)) <= 56u * 1024u;
      const uint32_t dn_mt = dn_fits4 && (dn_force == 4u || (dn_force != 2u && dn_auto4)) ? 4u : 2u;
      const uint32_t dn_cap = dn_mt == 4u && P <= 2u * E ? 4u : MM_MAXT;
      const uint32_t rows_d = dn_mm ? 16 * dn_mt : DEC_WARPS * dec_rows<false>();
      const uint32_t gy_d = (D + rows_d - 1) / rows_d;
      mx::array counters = scratch(enc, fused_combine ? gy_d : 1);
      uint32_t mt1, mt2, sm1, sm2;
      constexpr bool xsplit = !std::is_same_v<XT, __nv_bfloat16>;
      if (gu_mm) {
        sm1 = mm_smem(D / 32, std::max(md.gate.groups, md.up.groups), 2, xsplit ? 2 : 1, 1,
                      MM_WARPS_GU, !raw8_gu && mm_raw16<true>(md), raw8_gu, mt1, MM_MAXT);
      } else {
        sm1 = smem_for(D, DEC_MAXT, mt1);
      }
      if (dn_mm) {
        sm2 = mm_smem(F / 32, md.down.groups, 1, 2, int(dn_mt), MM_WARPS_DN,
                      !raw8_dn && mm_raw16<false>(md), raw8_dn, mt2, dn_cap);
      } else {
        sm2 = smem_for(F, DEC_MAXT, mt2);
      }
      DecExtra ex{};
      ex.ids = ptr<void>(ids);
      ex.id_kind = ik;
      ex.direct = direct ? 1u : 0u;
      ex.counters = fused_combine ? ptr<uint32_t>(counters) : nullptr;
      ex.ncounters = gy_d;
      ex.y = ptr<void>(out);
      ex.y_kind = uint32_t(float_kind(x.dtype()));
      const dim3 grid_gu(gx, (F + rows_gu - 1) / rows_gu), grid_d(gx, gy_d);
      MmDecKernel<XT> gu_kernel = gu_mm ? mm_gu_kernel<XT>(bulk_gu, raw8_gu) : mlp_decode_kernel<true, XT>;
      if constexpr (!std::is_same_v<XT, float>) {
        if (tr_mm) gu_kernel = tr_gu_kernel<XT>();
      }
      // Routing in the gate/up kernel costs each block ~3 us before its weight loads can
      // start: only while the whole grid is resident at once (one wave; measured 1.3 us/layer
      // faster at 8 pairs, equal at 16, slower at 32, where every wave pays it).
      const bool route_in_gu =
          route_in_gu_ok && uint64_t(grid_gu.x) * grid_gu.y <= capacity(gu_kernel, MM_WARPS_GU * 32, sm1);
      if (route_in_gu_ok && !route_in_gu)
        encode_route(chain, logits, T, E, k, uint32_t(p.route_normalize()), ids, rw);
      if (route_in_gu) {
        chain.pdl = false;  // (nothing gathered yet: direct, and the router not encoded)
        ex.logits = ptr<void>(logits);
        ex.logits_kind = uint32_t(float_kind(logits.dtype()));
        ex.route_norm = uint32_t(p.route_normalize());
        ex.route_ids = ptr<uint32_t>(ids);
        ex.route_w = ptr<float>(rw);
      }
      chain.add(kernel_node(gu_kernel, grid_gu, dim3(gu_mm ? MM_WARPS_GU * 32 : DEC_WARPS * 32),
                            sm1, md, xp, static_cast<const float*>(nullptr), ptr<uint32_t>(pairs),
                            ptr<uint32_t>(offsets), ptr<uint32_t>(active), ptr<uint32_t>(meta),
                            ptr<float>(rw), mt1, ptr<float>(H), ex),
                {&x, route_in_gu ? &logits : &ids, &pairs, &offsets, &active, &meta},
                {&H, &counters, route_in_gu ? &ids : nullptr, route_in_gu ? &rw : nullptr});
      const MmDecKernel<float> dn_kernel = tr_mm ? tr_dn_kernel()
                                           : dn_mm ? mm_dn_kernel(dn_mt, bulk_dn, raw8_dn)
                                                   : mlp_decode_kernel<false, float>;
      const dim3 block_d(dn_mm ? MM_WARPS_DN * 32 : DEC_WARPS * 32);
      combined = fused_combine;
      chain.add(kernel_node(dn_kernel, grid_d, block_d, sm2, md, static_cast<const float*>(nullptr),
                            ptr<float>(H), ptr<uint32_t>(pairs), ptr<uint32_t>(offsets),
                            ptr<uint32_t>(active), ptr<uint32_t>(meta), ptr<float>(rw), mt2,
                            ptr<float>(Yp), ex),
                {&H, &ids, &pairs, &offsets, &active, &meta, &rw, &counters},
                {&Yp, &counters, combined ? &out : nullptr});
    } else if (gg) {
      // H [bucketed pair, F] and Yp [pair, D] in the activation type; fp32 combine.
      if constexpr (!std::is_same_v<XT, float>) {
        XT* Hx = reinterpret_cast<XT*>(ptr<uint32_t>(H));
        XT* Ypx = reinterpret_cast<XT*>(ptr<uint32_t>(Yp));
        const bool wg = wg_available();
        uint32_t sm_gu = 0, sm_dn = 0;
        const auto k_gu = gg_pick<true, XT>(wg, gg_fgu, gg_sk_gu, md.gate, md.up, gg_nwg, gg_rs, sm_gu);
        const auto k_dn = gg_pick<false, XT>(wg, gg_fdn, gg_sk_dn, md.down, md.down, gg_nwg, gg_rs, sm_dn);
        const dim3 gg_block(128 * gg_nwg);
        launch(enc, {&x, &pairs, &offsets, &tiles, &meta}, {&H}, k_gu,
               dim3((F + GG_TN - 1) / GG_TN, max_tiles), gg_block, sm_gu, md, xp,
               ptr<uint32_t>(pairs), ptr<uint32_t>(offsets), ptr<uint32_t>(tiles),
               ptr<uint32_t>(meta), ptr<float>(rw), Hx, uint32_t(gg_sc_gu == 2));
        launch(enc, {&H, &pairs, &offsets, &tiles, &meta, &rw}, {&Yp},
               k_dn, dim3((D + 2 * GG_TN - 1) / (2 * GG_TN), max_tiles),
               gg_block, sm_dn, md, static_cast<const XT*>(Hx), ptr<uint32_t>(pairs),
               ptr<uint32_t>(offsets), ptr<uint32_t>(tiles), ptr<uint32_t>(meta), ptr<float>(rw),
               Ypx, uint32_t(gg_sc_dn == 2));
        const uint64_t n8 = uint64_t(T) * (D / 8);
        launch(enc, {&Yp, &ids}, {&out}, combine_gg_kernel<XT>, dim3(uint32_t((n8 + 255) / 256)),
               dim3(256), 0, static_cast<const XT*>(Ypx), ptr<void>(ids), ik, T, k, D, E,
               ptr<XT>(out));
        combined = true;
      }
    } else {
      constexpr bool split = !std::is_same_v<XT, __nv_bfloat16>;
      launch(enc, {&x, &pairs, &offsets, &tiles, &meta}, {&H}, mlp_grouped_kernel<true, split, XT>,
             dim3(max_tiles, (F + G_TN - 1) / G_TN), dim3(128), 0, md, xp,
             static_cast<const float*>(nullptr), ptr<uint32_t>(pairs), ptr<uint32_t>(offsets),
             ptr<uint32_t>(tiles), ptr<uint32_t>(meta), ptr<float>(rw), ptr<float>(H));
      launch(enc, {&H, &pairs, &offsets, &tiles, &meta, &rw}, {&Yp},
             mlp_grouped_kernel<false, true, float>, dim3(max_tiles, (D + G_TN - 1) / G_TN),
             dim3(128), 0, md, static_cast<const float*>(nullptr), ptr<float>(H),
             ptr<uint32_t>(pairs), ptr<uint32_t>(offsets), ptr<uint32_t>(tiles),
             ptr<uint32_t>(meta), ptr<float>(rw), ptr<float>(Yp));
    }
    if (!combined) {
      const uint64_t n = uint64_t(T) * D;
      chain.add(kernel_node(combine_kernel<XT>, dim3(uint32_t((n + 255) / 256)), dim3(256), 0,
                            ptr<float>(Yp), ptr<void>(ids), ik, T, k, D, E, ptr<XT>(out)),
                {&Yp, &ids}, {&out});
    }
    chain.flush();
  });
}

}  // namespace mlx_moe::gpu
