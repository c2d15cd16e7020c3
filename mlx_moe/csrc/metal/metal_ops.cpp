// Metal eval of every primitive: picks the kernel variant, binds arrays and the shared
// argument structs (kernels/common/moe_args.h), sizes threadgroup memory, and dispatches
// into MLX's command encoder. The kernels live in kernels/*.metal, built into
// mlx_moe.metallib next to the extension (CMake, mlx_build_metallib); a missing metallib is
// a clear error from MLX naming the path it tried. Nothing here falls back to the CPU.
#include <dlfcn.h>

#include <algorithm>
#include <filesystem>

#include "backends.h"
#include "bucket.h"
#include "common/moe_args.h"
#include "dequant.h"
#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"
#include "moe_mlp.h"
#include "route.h"

namespace mlx_moe::gpu {

namespace {

// MLX's CommandEncoder keeps its MTL::ComputeCommandEncoder private, and has no indirect
// dispatch. An explicit instantiation may name a private member (C++ [temp.spec]), which
// lets us reach the raw encoder for dispatchThreadgroups(indirectBuffer, ...), after
// MLX's own hazard tracking (set_input_array + maybeInsertBarrier) has run.
using RawEncoderFn = MTL::ComputeCommandEncoder* (mx::metal::CommandEncoder::*)();
RawEncoderFn raw_encoder_fn();
template <RawEncoderFn F>
struct RawEncoderAccess {
  friend RawEncoderFn raw_encoder_fn() { return F; }
};
template struct RawEncoderAccess<&mx::metal::CommandEncoder::get_command_encoder>;

void dispatch_indirect(mx::metal::CommandEncoder& enc, const mx::array& args, int unused_index,
                       MTL::Size group) {
  enc.set_input_array(args, unused_index);  // hazard tracking for the argument buffer
  enc.maybeInsertBarrier();
  auto* raw = (enc.*raw_encoder_fn())();
  raw->dispatchThreadgroups(static_cast<const MTL::Buffer*>(args.buffer().ptr()),
                            NS::UInteger(args.offset()), group);
}

std::string binary_dir() {
  static std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&binary_dir), &info)) {
      throw std::runtime_error("mlx_moe: cannot locate the extension's directory");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

MTL::ComputePipelineState* kernel(mx::metal::Device& d, const std::string& name) {
  auto* lib = d.get_library("mlx_moe", binary_dir());
  return d.get_kernel(name, lib);
}

std::string tname(mx::Dtype t) {
  switch (t) {
    case mx::float32: return "float32";
    case mx::float16: return "float16";
    case mx::bfloat16: return "bfloat16";
    case mx::uint32: return "uint32";
    case mx::int32: return "int32";
    case mx::int64: return "int64";
    default:
      throw std::invalid_argument("mlx_moe (Metal): dtype " + dtype_str(t) +
                                  " is not supported on the GPU");
  }
}

mx::array temp(mx::metal::CommandEncoder& enc, mx::Shape shape, mx::Dtype dt) {
  mx::array a(std::move(shape), dt, nullptr, {});
  a.set_data(mx::allocator::malloc(std::max<size_t>(a.nbytes(), 4)));
  enc.add_temporary(a);
  return a;
}

uint32_t scale_kind(mx::Dtype t) {
  switch (t) {
    case mx::float32: return 0;
    case mx::float16: return 1;
    case mx::bfloat16: return 2;
    default: return 3;  // uint8 E8M0
  }
}

MoeWeightArgs weight_args(const std::vector<mx::array>& arrays, const Format& f) {
  WeightShape ws = check_weight(arrays, f, "weight");
  MoeWeightArgs a{};
  a.N = uint32_t(ws.N);
  a.K = uint32_t(ws.K);
  a.bits = uint32_t(f.bits);
  a.group_size = uint32_t(f.group_size);
  a.row_bytes = f.mode == Mode::Trellis ? 0u : uint32_t(arrays[0].shape(-1) * 4);
  a.groups = uint32_t(ws.K / f.group_size);
  a.mode = uint32_t(f.mode);
  a.flags = f.fp4_quarter_subnormal ? 1u : 0u;
  a.scale_kind = scale_kind(arrays[1].dtype());
  if (f.mode == Mode::Trellis) {
    a.grid_kind = arrays[2].dtype() == mx::float16 ? 1u : 0u;
    a.flags |= (f.has_su ? 2u : 0u) | (f.has_sv ? 4u : 0u) | (arrays[2].ndim() > 1 ? 8u : 0u);
    int next = 3;
    if (f.has_su) a.sign_kind |= scale_kind(arrays[next++].dtype());
    if (f.has_sv) a.sign_kind |= scale_kind(arrays[next++].dtype()) << 2;
  }
  return a;
}

constexpr uint32_t BUCKET_CHUNK = 256;
constexpr uint32_t GEMM_TILE = 32;         // GEMM_BM = GEMM_BN in kernels/moe_mlp.metal
constexpr uint32_t GEMM_MIN_TOKENS = 64;   // tokens from which the grouped GEMMs run

// Runs the three bucketing kernels on `ids` (P flat pairs). Outputs must be allocated.
void encode_bucket(mx::metal::Device& d, mx::metal::CommandEncoder& enc, const mx::array& ids,
                   int64_t ids_offset_bytes, uint32_t P, uint32_t E, uint32_t tile,
                   uint32_t grid_y, mx::array& counts, mx::array& offsets, mx::array& pairs,
                   mx::array& dispatch, mx::array& tile_starts) {
  const std::string it = tname(ids.dtype());
  MoeBucketArgs args{};
  args.P = P;
  args.E = E;
  args.tile = tile;
  args.chunk = BUCKET_CHUNK;
  args.nblocks = (P + BUCKET_CHUNK - 1) / BUCKET_CHUNK;
  args.grid_y = grid_y;
  auto block = temp(enc, {int(std::max<uint32_t>(1, args.nblocks) * (E + 1))}, mx::uint32);

  if (args.nblocks > 0) {
    enc.set_compute_pipeline_state(kernel(d, "moe_bucket_count_" + it));
    enc.set_input_array(ids, 0, ids_offset_bytes);
    enc.set_output_array(block, 1);
    enc.set_bytes(args, 2);
    enc.set_threadgroup_memory_length(((E + 1) * 4 + 15) / 16 * 16, 0);
    enc.dispatch_threadgroups(MTL::Size(args.nblocks, 1, 1), MTL::Size(256, 1, 1));
  }

  enc.set_compute_pipeline_state(kernel(d, "moe_bucket_scan"));
  enc.set_output_array(block, 0);
  enc.set_output_array(counts, 1);
  enc.set_output_array(offsets, 2);
  enc.set_output_array(dispatch, 3);
  enc.set_bytes(args, 4);
  enc.set_output_array(tile_starts, 5);
  enc.dispatch_threadgroups(MTL::Size(1, 1, 1), MTL::Size(256, 1, 1));

  if (args.nblocks > 0) {
    enc.set_compute_pipeline_state(kernel(d, "moe_bucket_scatter_" + it));
    enc.set_input_array(ids, 0, ids_offset_bytes);
    enc.set_input_array(block, 1);
    enc.set_output_array(pairs, 2);
    enc.set_bytes(args, 3);
    enc.set_threadgroup_memory_length((E * 4 + 15) / 16 * 16, 0);
    enc.dispatch_threadgroups(MTL::Size(args.nblocks, 1, 1), MTL::Size(32, 1, 1));

    enc.set_compute_pipeline_state(kernel(d, "moe_bucket_fill_dropped"));
    enc.set_output_array(pairs, 0);
    enc.set_input_array(offsets, 1);
    enc.set_bytes(args, 2);
    enc.dispatch_threadgroups(MTL::Size((P + 255) / 256, 1, 1), MTL::Size(256, 1, 1));
  }
}

}  // namespace

void route(Route& p, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& s = p.stream();
  auto& d = mx::metal::device(s.device);
  const auto& logits = inputs[0];
  auto& ids = outputs[0];
  auto& w = outputs[1];
  ids.set_data(mx::allocator::malloc(std::max<size_t>(ids.nbytes(), 4)));
  w.set_data(mx::allocator::malloc(std::max<size_t>(w.nbytes(), 4)));
  const uint32_t E = uint32_t(logits.shape(-1));
  const uint32_t rows = uint32_t(logits.size() / E);
  if (rows == 0) return;
  if (E > 8192) {
    throw std::invalid_argument("mlx_moe.route (Metal): at most 8192 experts, got " +
                                std::to_string(E));
  }
  const uint32_t nsg = std::max<uint32_t>(1, std::min<uint32_t>(8, 8192 / E));
  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(kernel(d, "moe_route_" + tname(logits.dtype())));
  enc.set_input_array(logits, 0);
  enc.set_output_array(ids, 1);
  enc.set_output_array(w, 2);
  MoeRouteArgs args{rows, E, uint32_t(p.k()), p.normalize() ? 1u : 0u};
  enc.set_bytes(args, 3);
  enc.set_threadgroup_memory_length(nsg * E * 4, 0);
  enc.dispatch_threadgroups(MTL::Size((rows + nsg - 1) / nsg, 1, 1), MTL::Size(32 * nsg, 1, 1));
}

void bucket(Bucket& p, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& s = p.stream();
  auto& d = mx::metal::device(s.device);
  for (auto& o : outputs) o.set_data(mx::allocator::malloc(std::max<size_t>(o.nbytes(), 4)));
  auto& enc = mx::metal::get_command_encoder(s);
  const uint32_t E = uint32_t(p.num_experts());
  auto tile_starts = temp(enc, {int(E) + 1}, mx::uint32);
  encode_bucket(d, enc, inputs[0], 0, uint32_t(inputs[0].size()), E, uint32_t(p.tile()), 1,
                outputs[0], outputs[1], outputs[2], outputs[3], tile_starts);
}

void dequantize(Dequantize& p, const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) {
  auto& s = p.stream();
  auto& d = mx::metal::device(s.device);
  auto& out = outputs[0];
  out.set_data(mx::allocator::malloc(std::max<size_t>(out.nbytes(), 4)));
  MoeDequantArgs args{};
  args.w = weight_args(inputs, p.format());
  args.rows = uint32_t(out.size() / std::max<uint32_t>(1, args.w.K));
  const uint32_t threads = args.rows * (args.w.K / 8);
  if (threads == 0) return;
  auto& enc = mx::metal::get_command_encoder(s);
  if (p.format().mode == Mode::Affine) {
    enc.set_compute_pipeline_state(kernel(
        d, "moe_dequant_affine_" + tname(out.dtype()) + "_" + tname(inputs[1].dtype())));
    enc.set_input_array(inputs[0], 0);
    enc.set_input_array(inputs[1], 1);
    enc.set_input_array(inputs[2], 2);
    enc.set_output_array(out, 3);
    enc.set_bytes(args, 4);
  } else if (p.format().mode == Mode::MxFp4) {
    enc.set_compute_pipeline_state(kernel(d, "moe_dequant_mxfp4_" + tname(out.dtype())));
    enc.set_input_array(inputs[0], 0);
    enc.set_input_array(inputs[1], 1);
    enc.set_output_array(out, 2);
    enc.set_bytes(args, 3);
  } else {
    // one thread per run of 16 codes: K / 16 per row
    const uint32_t runs = args.rows * (args.w.K / 16);
    int next = 3;
    const auto& su = p.format().has_su ? inputs[next++] : inputs[1];
    const auto& sv = p.format().has_sv ? inputs[next++] : inputs[1];
    enc.set_compute_pipeline_state(kernel(d, "moe_dequant_trellis_" + tname(out.dtype())));
    enc.set_input_array(inputs[0], 0);
    enc.set_input_array(inputs[1], 1);
    enc.set_input_array(inputs[2], 2);
    enc.set_input_array(su, 3);
    enc.set_input_array(sv, 4);
    enc.set_output_array(out, 5);
    enc.set_bytes(args, 6);
    enc.dispatch_threadgroups(MTL::Size((runs + 255) / 256, 1, 1), MTL::Size(256, 1, 1));
    return;
  }
  enc.dispatch_threadgroups(MTL::Size((threads + 255) / 256, 1, 1), MTL::Size(256, 1, 1));
}

void moe_mlp(MoeMLP& p, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& s = p.stream();
  auto& d = mx::metal::device(s.device);
  auto& y = outputs[0];
  y.set_data(mx::allocator::malloc(std::max<size_t>(y.nbytes(), 4)));
  const auto& x = inputs[0];
  const auto& ids = inputs[1];
  const auto& rw = inputs[2];
  const uint32_t T = uint32_t(x.shape(0)), D = uint32_t(x.shape(1)), k = uint32_t(ids.shape(1));
  if (T == 0) return;

  std::vector<mx::array> proj[3];
  int pos = 3;
  MoeMlpArgs args{};
  MoeWeightArgs* wa[3] = {&args.gate, &args.up, &args.down};
  for (int i = 0; i < 3; ++i) {
    int n = p.formats()[i].num_arrays();
    proj[i].assign(inputs.begin() + pos, inputs.begin() + pos + n);
    pos += n;
    *wa[i] = weight_args(proj[i], p.formats()[i]);
  }
  const uint32_t E = uint32_t(proj[0][0].shape(0));
  const uint32_t F = args.gate.N;
  const size_t xsize = mx::size_of(x.dtype());
  uint32_t tm = 8;
  while (tm > 1 && tm * D * xsize > 16384) tm /= 2;
  args.T = T;
  args.k = k;
  args.D = D;
  args.F = F;
  args.E = E;
  args.tm = tm;
  args.fs = 64;
  args.nslices = (F + args.fs - 1) / args.fs;

  // Few tokens: the token-tile x F-slice kernel (every weight byte once per tile). Many
  // tokens: the grouped GEMMs (gate/up -> H, down -> per-pair rows). The threshold is a
  // first guess until measured on Apple GPUs (docs/MACOS.md).
  const bool gemm = T >= GEMM_MIN_TOKENS;
  if (gemm) args.nslices = 1;
  // Token chunks bound the temporaries (partials, H) to ~256 MiB.
  const size_t per_token = gemm ? size_t(k) * (D + F) * 4 : size_t(k) * args.nslices * D * 4;
  const uint32_t chunk_t = uint32_t(std::max<size_t>(1, (size_t(256) << 20) / per_token));

  auto& enc = mx::metal::get_command_encoder(s);
  const std::string xt = tname(x.dtype());
  auto combine = kernel(d, "moe_mlp_combine_" + xt);
  for (uint32_t t0 = 0; t0 < T; t0 += chunk_t) {
    const uint32_t tc = std::min(chunk_t, T - t0);
    const uint32_t P = tc * k;
    MoeMlpArgs a = args;
    a.T = tc;
    auto counts = temp(enc, {int(E)}, mx::uint32);
    auto offsets = temp(enc, {int(E) + 1}, mx::uint32);
    auto pairs = temp(enc, {int(P)}, mx::uint32);
    auto dispatch = temp(enc, {4}, mx::uint32);
    auto tile_starts = temp(enc, {int(E) + 1}, mx::uint32);
    auto partial = temp(enc, {int(P * a.nslices), int(D)}, mx::float32);
    const uint32_t tile = gemm ? GEMM_TILE : tm;
    const uint32_t grid_y = gemm ? (F + GEMM_TILE - 1) / GEMM_TILE : a.nslices;
    encode_bucket(d, enc, ids, int64_t(t0) * k * mx::size_of(ids.dtype()), P, E, tile, grid_y,
                  counts, offsets, pairs, dispatch, tile_starts);

    auto bind_common = [&]() {
      enc.set_input_array(rw, 1, int64_t(t0) * k * 4);
      enc.set_input_array(pairs, 2);
      enc.set_input_array(offsets, 3);
      enc.set_input_array(tile_starts, 4);
      for (int i = 0; i < 3; ++i) {
        const Format& f = p.formats()[i];
        enc.set_input_array(proj[i][0], 5 + 3 * i);
        enc.set_input_array(proj[i][1], 6 + 3 * i);
        // biases (affine) or grid (trellis); mxfp4 has neither: the scales again, never read.
        enc.set_input_array(proj[i].size() > 2 ? proj[i][2] : proj[i][1], 7 + 3 * i);
        // trellis su / sv, or the scales again (never read).
        int next = 3;
        const auto& su = (f.mode == Mode::Trellis && f.has_su) ? proj[i][next++] : proj[i][1];
        const auto& sv = (f.mode == Mode::Trellis && f.has_sv) ? proj[i][next++] : proj[i][1];
        enc.set_input_array(su, 18 + 2 * i);
        enc.set_input_array(sv, 19 + 2 * i);
      }
      enc.set_bytes(a, 15);
    };
    if (!gemm) {
      enc.set_compute_pipeline_state(kernel(d, "moe_mlp_fused_" + xt + "_tm" + std::to_string(tm)));
      enc.set_input_array(x, 0, int64_t(t0) * D * xsize);
      bind_common();
      enc.set_output_array(partial, 14);
      enc.set_threadgroup_memory_length((tm * D * xsize + 15) / 16 * 16, 0);
      enc.set_threadgroup_memory_length(tm * a.fs * 4, 1);
      dispatch_indirect(enc, dispatch, 16, MTL::Size(256, 1, 1));
    } else {
      auto H = temp(enc, {int(P), int(F)}, mx::float32);
      auto dispatch_down = temp(enc, {4}, mx::uint32);
      enc.set_compute_pipeline_state(kernel(d, "moe_gemm_gateup_" + xt));
      enc.set_input_array(x, 0, int64_t(t0) * D * xsize);
      bind_common();
      enc.set_output_array(H, 14);
      dispatch_indirect(enc, dispatch, 16, MTL::Size(128, 1, 1));

      enc.set_compute_pipeline_state(kernel(d, "moe_gemm_dispatch_down"));
      enc.set_input_array(dispatch, 0);
      enc.set_output_array(dispatch_down, 1);
      enc.set_bytes(a, 2);
      enc.dispatch_threadgroups(MTL::Size(1, 1, 1), MTL::Size(32, 1, 1));

      enc.set_compute_pipeline_state(kernel(d, "moe_gemm_down"));
      bind_common();
      enc.set_output_array(partial, 14);
      enc.set_input_array(H, 16);
      dispatch_indirect(enc, dispatch_down, 17, MTL::Size(128, 1, 1));
    }

    enc.set_compute_pipeline_state(combine);
    enc.set_input_array(partial, 0);
    enc.set_output_array(y, 1, int64_t(t0) * D * mx::size_of(y.dtype()));
    enc.set_bytes(a, 2);
    const uint32_t n = tc * D;
    enc.dispatch_threadgroups(MTL::Size((n + 255) / 256, 1, 1), MTL::Size(256, 1, 1));
  }
}

}  // namespace mlx_moe::gpu
