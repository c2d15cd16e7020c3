// The Metal host logic of every primitive, written once against an encoder interface:
//   enc.kernel(name[, constants])             pipeline by host name (kernels/*.metal), with
//                                             uint function constants 0, 1, ... if given
//   enc.input(a, slot[, offset]) / enc.output(a, slot[, offset])
//   enc.bytes(value, slot)                    setBytes of a struct from common/moe_args.h
//   enc.tg_memory(bytes, index)               setThreadgroupMemoryLength
//   enc.dispatch(groups, threads)             dispatchThreadgroups
//   enc.dispatch_indirect(args, slot, threads) dispatchThreadgroups(indirectBuffer: ...)
//   enc.temp(shape, dtype) / enc.alloc(out)   scratch and output memory
//   enc.device_fence()                        whether the metallib was compiled as MSL >= 3.2
//                                             (device-scope fences; it then has the probe
//                                             kernel moe_mlp_device_fence): the MLP kernel
//                                             then combines in its own dispatch
// metal_ops.cpp instantiates it with MLX's command encoder (macOS); record.cpp with a
// recorder that lists the commands, which the Metal harness replays on Linux CI against the
// same kernels (python_tests/test_metal_kernels.py). So the variant choice, buffer binding,
// threadgroup-memory sizes and grids tested on Linux are the ones the GPU gets.
// Nothing here includes Metal headers.
#pragma once
#include <algorithm>
#include <cstdlib>
#include <string>

#include "bucket.h"
#include "common/moe_args.h"
#include "dequant.h"
#include "moe_mlp.h"
#include "route.h"

namespace mlx_moe::metal_encode {

struct Size3 {
  uint32_t x = 1, y = 1, z = 1;
};

inline std::string tname(mx::Dtype t) {
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

inline uint32_t scale_kind(mx::Dtype t) {
  switch (t) {
    case mx::float32: return 0;
    case mx::float16: return 1;
    case mx::bfloat16: return 2;
    default: return 3;  // uint8 E8M0
  }
}

inline MoeWeightArgs weight_args(const std::vector<mx::array>& arrays, const Format& f) {
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
constexpr uint32_t ROUTE_MAX_EXPERTS = 8192;
// moe_mlp variants (kernels/moe_mlp.metal): MoeSimdMath<T, tm> with `SIMD_FS` hidden units
// per slice, 256 threads; MoeMmaMath (32 pairs, 128 hidden units, 128 threads).
constexpr uint32_t SIMD_FS = 64;
constexpr uint32_t SIMD_THREADS = 256;
constexpr uint32_t MMA_TM = 32, MMA_FS = 128, MMA_THREADS = 128;
constexpr uint32_t MMA_STAGE_BYTES = 3 * 32 * 32 * 4;  // xs | wg | wu, then wd | os
constexpr uint32_t TG_MEMORY_BYTES = 32768;  // threadgroup memory of Apple GPUs
constexpr uint32_t TG_LISTS_BYTES = 2 * 32 * 4;  // moe_mlp's kernel-scope completion lists
// The grouped (simdgroup_matrix) instance from this many pairs per expert (T * k / E): where
// its modelled time, max(bytes / bandwidth, executed flops / peak), drops below the simd
// instance's on every chip of docs/PERFORMANCE.md, "Metal variant choice" (bytes from the
// harness's counters; benchmarks/metal_roofline.py). Not yet an Apple-GPU timing; the
// environment variable MLX_MOE_METAL_VARIANT=simd|mma forces one, to time both on a Mac.
constexpr double MMA_MIN_PAIRS_PER_EXPERT = 12.0;

inline bool use_mma(uint32_t T, uint32_t k, uint32_t E) {
  if (const char* v = std::getenv("MLX_MOE_METAL_VARIANT")) {
    const std::string s(v);
    if (s == "mma") return true;
    if (s == "simd") return false;
    if (!s.empty() && s != "auto") {
      throw std::invalid_argument("MLX_MOE_METAL_VARIANT must be simd, mma or auto, got '" + s + "'");
    }
  }
  return double(T) * k >= MMA_MIN_PAIRS_PER_EXPERT * E;
}

// The bucketing kernels on `ids` (P flat pairs). Outputs must be allocated. With
// `counters` (moe_mlp): dropped pairs are kept after offsets[E] (keep_dropped) and the first
// `nzero` counters are zeroed.
template <class Enc>
void encode_bucket(Enc& enc, const mx::array& ids, int64_t ids_offset_bytes, uint32_t P,
                   uint32_t E, uint32_t tile, uint32_t grid_y, mx::array& counts,
                   mx::array& offsets, mx::array& pairs, mx::array& dispatch,
                   mx::array& tile_starts, mx::array* counters = nullptr,
                   uint32_t nzero = 0) {
  const std::string it = tname(ids.dtype());
  MoeBucketArgs args{};
  args.P = P;
  args.E = E;
  args.tile = tile;
  args.chunk = BUCKET_CHUNK;
  args.nblocks = (P + BUCKET_CHUNK - 1) / BUCKET_CHUNK;
  args.grid_y = grid_y;
  if ((E + 1) * 4 > TG_MEMORY_BYTES) {  // one counter per expert in threadgroup memory
    throw std::invalid_argument("mlx_moe (Metal): bucketing takes at most " +
                                std::to_string(TG_MEMORY_BYTES / 4 - 1) + " experts, got " +
                                std::to_string(E));
  }
  args.keep_dropped = counters ? 1u : 0u;
  args.nzero = counters ? nzero : 0u;
  auto block = enc.temp({int(std::max<uint32_t>(1, args.nblocks) * (E + 1))}, mx::uint32);

  if (args.nblocks > 0) {
    enc.kernel("moe_bucket_count_" + it);
    enc.input(ids, 0, ids_offset_bytes);
    enc.output(block, 1);
    enc.bytes(args, 2);
    enc.tg_memory(((E + 1) * 4 + 15) / 16 * 16, 0);
    enc.dispatch({args.nblocks, 1, 1}, {256, 1, 1});
  }

  enc.kernel("moe_bucket_scan");
  enc.output(block, 0);
  enc.output(counts, 1);
  enc.output(offsets, 2);
  enc.output(dispatch, 3);
  enc.bytes(args, 4);
  enc.output(tile_starts, 5);
  enc.dispatch({1, 1, 1}, {256, 1, 1});

  if (args.nblocks > 0) {
    enc.kernel("moe_bucket_scatter_" + it);
    enc.input(ids, 0, ids_offset_bytes);
    enc.input(block, 1);
    enc.output(pairs, 2);
    enc.bytes(args, 3);
    enc.tg_memory(((E + 1) * 4 + 15) / 16 * 16, 0);
    enc.dispatch({args.nblocks, 1, 1}, {32, 1, 1});

    enc.kernel("moe_bucket_finish");
    enc.output(pairs, 0);
    enc.input(offsets, 1);
    enc.bytes(args, 2);
    if (counters) {
      enc.output(*counters, 3);
    } else {
      enc.output(block, 3);  // never written (nzero = 0)
    }
    const uint32_t n = std::max(P, args.nzero);
    enc.dispatch({(n + 255) / 256, 1, 1}, {256, 1, 1});
  }
}

template <class Enc>
void encode_route(Enc& enc, Route& p, const std::vector<mx::array>& inputs,
                  std::vector<mx::array>& outputs) {
  const auto& logits = inputs[0];
  auto& ids = outputs[0];
  auto& w = outputs[1];
  enc.alloc(ids);
  enc.alloc(w);
  const uint32_t E = uint32_t(logits.shape(-1));
  const uint32_t rows = uint32_t(logits.size() / E);
  if (rows == 0) return;
  if (E > ROUTE_MAX_EXPERTS) {
    throw std::invalid_argument("mlx_moe.route (Metal): at most 8192 experts, got " +
                                std::to_string(E));
  }
  const uint32_t nsg = std::max<uint32_t>(1, std::min<uint32_t>(8, ROUTE_MAX_EXPERTS / E));
  enc.kernel("moe_route_" + tname(logits.dtype()));
  enc.input(logits, 0);
  enc.output(ids, 1);
  enc.output(w, 2);
  MoeRouteArgs args{rows, E, uint32_t(p.k()), p.normalize() ? 1u : 0u};
  enc.bytes(args, 3);
  enc.tg_memory(nsg * E * 4, 0);
  enc.dispatch({(rows + nsg - 1) / nsg, 1, 1}, {32 * nsg, 1, 1});
}

template <class Enc>
void encode_bucket_op(Enc& enc, Bucket& p, const std::vector<mx::array>& inputs,
                      std::vector<mx::array>& outputs) {
  for (auto& o : outputs) enc.alloc(o);
  const uint32_t E = uint32_t(p.num_experts());
  auto tile_starts = enc.temp({int(E) + 1}, mx::uint32);
  encode_bucket(enc, inputs[0], 0, uint32_t(inputs[0].size()), E, uint32_t(p.tile()), 1,
                outputs[0], outputs[1], outputs[2], outputs[3], tile_starts);
}

template <class Enc>
void encode_dequantize(Enc& enc, Dequantize& p, const std::vector<mx::array>& inputs,
                       std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  enc.alloc(out);
  MoeDequantArgs args{};
  args.w = weight_args(inputs, p.format());
  args.rows = uint32_t(out.size() / std::max<uint32_t>(1, args.w.K));
  const uint32_t threads = args.rows * (args.w.K / 8);
  if (threads == 0) return;
  if (p.format().mode == Mode::Affine) {
    enc.kernel("moe_dequant_affine_" + tname(out.dtype()) + "_" + tname(inputs[1].dtype()));
    enc.input(inputs[0], 0);
    enc.input(inputs[1], 1);
    enc.input(inputs[2], 2);
    enc.output(out, 3);
    enc.bytes(args, 4);
  } else if (p.format().mode == Mode::MxFp4) {
    enc.kernel("moe_dequant_mxfp4_" + tname(out.dtype()));
    enc.input(inputs[0], 0);
    enc.input(inputs[1], 1);
    enc.output(out, 2);
    enc.bytes(args, 3);
  } else {
    // one thread per run of 16 codes: K / 16 per row
    const uint32_t runs = args.rows * (args.w.K / 16);
    int next = 3;
    const auto& su = p.format().has_su ? inputs[next++] : inputs[1];
    const auto& sv = p.format().has_sv ? inputs[next++] : inputs[1];
    enc.kernel("moe_dequant_trellis_" + tname(out.dtype()));
    enc.input(inputs[0], 0);
    enc.input(inputs[1], 1);
    enc.input(inputs[2], 2);
    enc.input(su, 3);
    enc.input(sv, 4);
    enc.output(out, 5);
    enc.bytes(args, 6);
    enc.dispatch({(runs + 255) / 256, 1, 1}, {256, 1, 1});
    return;
  }
  enc.dispatch({(threads + 255) / 256, 1, 1}, {256, 1, 1});
}

template <class Enc>
void encode_moe_mlp(Enc& enc, MoeMLP& p, const std::vector<mx::array>& inputs,
                    std::vector<mx::array>& outputs) {
  auto& y = outputs[0];
  enc.alloc(y);
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
  // Variant: the grouped (simdgroup_matrix) instance when there are enough pairs per
  // expert (use_mma); else the simd instance with the largest token tile whose activation
  // rows fit in 16 KiB of threadgroup memory.
  uint32_t tm = 8;
  while (tm > 1 && tm * D * xsize > 16384) tm /= 2;
  // Decode (one token): every expert has one pair (top-k ids are distinct), so TM = 1: no
  // masked rows, the fewest registers per thread.
  if (T == 1) tm = 1;
  // The simd instance stages whole activation rows: when even one row does not fit in the
  // 32 KiB of threadgroup memory Apple GPUs give (with h and the completion lists), the
  // matrix instance (which streams K) runs at any token count.
  const bool rows_fit = tm * D * xsize + tm * SIMD_FS * 4 + TG_LISTS_BYTES <= TG_MEMORY_BYTES;
  // The matrix instance steps K by 32 codes; trellis widths may be 16 mod 32 (the simd
  // instance decodes 16 at a time).
  const bool k32 = D % 32 == 0 && F % 32 == 0;
  if (!rows_fit && !k32) {
    throw std::invalid_argument(
        "mlx_moe.moe_mlp (Metal): D = " + std::to_string(D) + ", F = " + std::to_string(F) +
        " with " + dtype_str(x.dtype()) + " activations: a row does not fit in threadgroup "
        "memory and the widths are not multiples of 32");
  }
  const bool mma = k32 && (!rows_fit || use_mma(T, k, E));
  if (mma) tm = MMA_TM;
  args.T = T;
  args.k = k;
  args.D = D;
  args.F = F;
  args.E = E;
  args.fs = mma ? MMA_FS : SIMD_FS;
  args.nslices = (F + args.fs - 1) / args.fs;
  const bool combine = enc.device_fence();
  args.combine = combine ? 1u : 0u;
  // Token chunks bound the partials (fp32, one row per pair and slice) to ~256 MiB.
  const size_t per_token = size_t(k) * args.nslices * D * 4;
  const uint32_t chunk_t = uint32_t(std::max<size_t>(1, (size_t(256) << 20) / per_token));

  const std::string xt = tname(x.dtype());
  const std::string name = "moe_mlp_" + xt + (mma ? std::string("_mma") : "_tm" + std::to_string(tm));
  // The decoders specialise on each projection's (mode, bits): function constants 0..5.
  const std::vector<uint32_t> fmt_constants = {args.gate.mode, args.gate.bits, args.up.mode,
                                               args.up.bits,   args.down.mode, args.down.bits};
  const size_t ysize = mx::size_of(y.dtype());
  for (uint32_t t0 = 0; t0 < T; t0 += chunk_t) {
    const uint32_t tc = std::min(chunk_t, T - t0);
    const uint32_t P = tc * k;
    MoeMlpArgs a = args;
    a.T = tc;
    auto counts = enc.temp({int(E)}, mx::uint32);
    auto offsets = enc.temp({int(E) + 1}, mx::uint32);
    auto pairs = enc.temp({int(P)}, mx::uint32);
    auto dispatch = enc.temp({4}, mx::uint32);
    auto tile_starts = enc.temp({int(E) + 1}, mx::uint32);
    auto partial = enc.temp({int(P * a.nslices), int(D)}, mx::float32);
    // completion counters: one per pair (slices in), one per token (slots in)
    auto counters = enc.temp({int(combine ? P + tc : 1)}, mx::uint32);
    encode_bucket(enc, ids, int64_t(t0) * k * mx::size_of(ids.dtype()), P, E, tm, a.nslices,
                  counts, offsets, pairs, dispatch, tile_starts, &counters,
                  combine ? P + tc : 0u);

    enc.kernel(name, fmt_constants);
    enc.input(x, 0, int64_t(t0) * D * xsize);
    enc.input(rw, 1, int64_t(t0) * k * 4);
    enc.input(pairs, 2);
    enc.input(offsets, 3);
    enc.input(tile_starts, 4);
    for (int i = 0; i < 3; ++i) {
      const Format& f = p.formats()[i];
      enc.input(proj[i][0], 5 + 3 * i);
      enc.input(proj[i][1], 6 + 3 * i);
      // biases (affine) or grid (trellis); mxfp4 has neither: the scales again, never read.
      enc.input(proj[i].size() > 2 ? proj[i][2] : proj[i][1], 7 + 3 * i);
      // trellis su / sv, or the scales again (never read).
      int next = 3;
      const auto& su = (f.mode == Mode::Trellis && f.has_su) ? proj[i][next++] : proj[i][1];
      const auto& sv = (f.mode == Mode::Trellis && f.has_sv) ? proj[i][next++] : proj[i][1];
      enc.input(su, 18 + 2 * i);
      enc.input(sv, 19 + 2 * i);
    }
    enc.output(partial, 14);
    enc.bytes(a, 15);
    enc.output(counters, 17);
    enc.output(y, 24, int64_t(t0) * D * ysize);
    if (mma) {
      enc.tg_memory(MMA_STAGE_BYTES, 0);
      enc.tg_memory(MMA_TM * MMA_FS * 4, 1);
    } else {
      enc.tg_memory((tm * D * xsize + 15) / 16 * 16, 0);
      enc.tg_memory(tm * a.fs * 4, 1);
    }
    enc.dispatch_indirect(dispatch, 16, {mma ? MMA_THREADS : SIMD_THREADS, 1, 1});

    if (!combine) {  // no device-scope fences (Metal < 3.2): the combine is a dispatch
      enc.kernel("moe_mlp_combine_" + xt);
      enc.input(partial, 0);
      enc.output(y, 1, int64_t(t0) * D * ysize);
      enc.bytes(a, 2);
      const uint32_t n = tc * D;
      enc.dispatch({(n + 255) / 256, 1, 1}, {256, 1, 1});
    }
  }
}

}  // namespace mlx_moe::metal_encode
