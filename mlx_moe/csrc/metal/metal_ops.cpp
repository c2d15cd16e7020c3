// Metal eval of every primitive: the host logic (variant choice, binding, threadgroup
// memory, grids) is metal/encode.h, run here against MLX's command encoder. The kernels live
// in kernels/*.metal, built into mlx_moe.metallib next to the extension (CMake,
// mlx_build_metallib); a missing metallib is a clear error from MLX naming the path it tried.
// Nothing here falls back to the CPU.
#include <dlfcn.h>

#include <algorithm>
#include <filesystem>

#include "backends.h"
#include "metal/encode.h"
#include "mlx/allocator.h"
#include "mlx/backend/metal/device.h"
#include "mlx/backend/metal/utils.h"

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

// encode.h's encoder interface on MLX's Metal command encoder.
struct MlxEncoder {
  mx::metal::Device& d;
  mx::metal::CommandEncoder& enc;

  MTL::ComputePipelineState* pipeline = nullptr;
  std::string pipeline_name;

  MTL::Library* library() { return d.get_library("mlx_moe", binary_dir()); }

  void kernel(const std::string& name, const std::vector<uint32_t>& constants = {}) {
    auto* lib = library();
    pipeline_name = name;
    if (constants.empty()) {
      pipeline = d.get_kernel(name, lib);
      enc.set_compute_pipeline_state(pipeline);
      return;
    }
    // One pipeline per specialisation, cached by MLX under its hash name.
    std::string hash = name + "_fc";
    mx::metal::MTLFCList list;
    for (size_t i = 0; i < constants.size(); ++i) {
      hash += "_" + std::to_string(constants[i]);
      list.emplace_back(&constants[i], MTL::DataTypeUInt, NS::UInteger(i));
    }
    pipeline = d.get_kernel(name, lib, hash, list);
    enc.set_compute_pipeline_state(pipeline);
  }
  // The kernels are written for the threadgroup sizes encode.h asks for; a pipeline whose
  // register use lowers its limit below that is an error, not a silent wrong launch.
  void check_threads(metal_encode::Size3 t) const {
    const size_t n = size_t(t.x) * t.y * t.z;
    if (pipeline && n > pipeline->maxTotalThreadsPerThreadgroup()) {
      throw std::runtime_error("mlx_moe (Metal): kernel " + pipeline_name + " allows " +
                               std::to_string(pipeline->maxTotalThreadsPerThreadgroup()) +
                               " threads per threadgroup on this GPU, the dispatch needs " +
                               std::to_string(n));
    }
  }
  void input(const mx::array& a, int slot, int64_t offset = 0) { enc.set_input_array(a, slot, offset); }
  void output(mx::array& a, int slot, int64_t offset = 0) { enc.set_output_array(a, slot, offset); }
  template <class T>
  void bytes(const T& v, int slot) {
    enc.set_bytes(v, slot);
  }
  void tg_memory(size_t len, int idx) { enc.set_threadgroup_memory_length(len, idx); }
  void dispatch(metal_encode::Size3 g, metal_encode::Size3 t) {
    check_threads(t);
    enc.dispatch_threadgroups(MTL::Size(g.x, g.y, g.z), MTL::Size(t.x, t.y, t.z));
  }
  void dispatch_indirect(const mx::array& args, int unused_slot, metal_encode::Size3 t) {
    check_threads(t);
    mlx_moe::gpu::dispatch_indirect(enc, args, unused_slot, MTL::Size(t.x, t.y, t.z));
  }
  mx::array temp(mx::Shape shape, mx::Dtype dt) {
    mx::array a(std::move(shape), dt, nullptr, {});
    a.set_data(mx::allocator::malloc(std::max<size_t>(a.nbytes(), 4)));
    enc.add_temporary(a);
    return a;
  }
  void alloc(mx::array& out) { out.set_data(mx::allocator::malloc(std::max<size_t>(out.nbytes(), 4))); }
  // Whether the metallib was compiled as MSL >= 3.2 (atomic_thread_fence, coherent(device)):
  // its language version follows the SDK and the deployment target, so ask the metallib
  // itself, which then has the probe kernel (kernels/moe_mlp.metal). Once per process.
  bool device_fence() {
    static const bool has = [this] {
      try {
        d.get_kernel("moe_mlp_device_fence", library());
        return true;
      } catch (const std::exception&) {
        return false;
      }
    }();
    return has;
  }
};

MlxEncoder encoder(mx::Primitive& p) {
  auto& s = p.stream();
  return MlxEncoder{mx::metal::device(s.device), mx::metal::get_command_encoder(s)};
}

}  // namespace

void route(Route& p, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto enc = encoder(p);
  metal_encode::encode_route(enc, p, inputs, outputs);
}

void bucket(Bucket& p, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto enc = encoder(p);
  metal_encode::encode_bucket_op(enc, p, inputs, outputs);
}

void dequantize(Dequantize& p, const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) {
  auto enc = encoder(p);
  metal_encode::encode_dequantize(enc, p, inputs, outputs);
}

void moe_mlp(MoeMLP& p, const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  if (p.route_k() > 0) {  // built only for CUDA streams (moe_mlp.cpp)
    throw std::runtime_error("mlx_moe.moe_mlp: the router-folded primitive runs on CUDA only");
  }
  auto enc = encoder(p);
  metal_encode::encode_moe_mlp(enc, p, inputs, outputs);
}

}  // namespace mlx_moe::gpu
