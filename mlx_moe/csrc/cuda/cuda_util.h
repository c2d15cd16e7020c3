// Host helpers shared by the CUDA evals (cuda_ops.cu, cuda_fused.cu): buffers, kernel nodes
// in MLX's CUDA graph, dtype dispatch, environment knobs.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.h"
#include "mlx/allocator.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

namespace mlx_moe::gpu {

namespace cu = mx::cu;

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("mlx_moe CUDA: ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

inline uint32_t env_u32(const char* name, uint32_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? uint32_t(std::atoi(v)) : dflt;
}

inline void allocate(mx::array& a) {
  a.set_data(mx::allocator::malloc(a.nbytes()));
}

// A scratch buffer that lives until the encoder's graph has run.
inline mx::array scratch(cu::CommandEncoder& enc, size_t n_u32) {
  mx::array t(mx::allocator::malloc(std::max<size_t>(n_u32, 1) * 4),
              {int(std::max<size_t>(n_u32, 1))}, mx::uint32);
  enc.add_temporary(t);
  return t;
}

template <typename T>
T* ptr(const mx::array& a) {
  return a.size() == 0 ? nullptr : const_cast<T*>(mx::gpu_ptr<T>(a));
}

// One kernel launch, its arguments kept with it: what launch() adds as a node of MLX's graph,
// and what launch_pdl() chains. The argument types are forced to the kernel's parameter types
// (the graph takes raw addresses of the arguments).
struct KernelNode {
  const void* kernel = nullptr;
  cudaFunction_t f = nullptr;
  dim3 grid, block;
  uint32_t smem = 0;
  std::shared_ptr<void> args;  // the argument tuple
  std::vector<void*> ptrs;     // addresses of its elements
  bool empty() const { return grid.x == 0 || grid.y == 0 || grid.z == 0; }
};

template <typename... KArgs, typename... Args>
KernelNode kernel_node(void (*kernel)(KArgs...), dim3 grid, dim3 block, uint32_t smem,
                       Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args));
  KernelNode n;
  n.kernel = reinterpret_cast<const void*>(kernel);
  n.grid = grid;
  n.block = block;
  n.smem = smem;
  auto tup = std::make_shared<std::tuple<KArgs...>>(static_cast<KArgs>(args)...);
  n.ptrs = std::apply([](auto&... a) { return std::vector<void*>{static_cast<void*>(&a)...}; }, *tup);
  n.args = std::move(tup);
  // The driver handle and the dynamic shared memory limit are looked up / raised once per
  // kernel and device (and per larger size), not at every node: this runs at every evaluation.
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, std::pair<cudaFunction_t, uint32_t>> known;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  auto& [fn, limit] = known[{n.kernel, dev}];
  if (fn == nullptr) {
    check(cudaGetFuncBySymbol(&fn, n.kernel), "cudaGetFuncBySymbol");
    limit = 48 * 1024;
  }
  if (smem > limit) {
    check(cudaFuncSetAttribute(n.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute");
    limit = smem;
  }
  n.f = fn;
  return n;
}

// `reads` / `writes` are the arrays whose last writers the next node must follow (MLX's
// encoder links nodes through the buffers named before each node).
inline void name_buffers(cu::CommandEncoder& enc, const std::vector<const mx::array*>& reads,
                         const std::vector<const mx::array*>& writes) {
  for (auto* a : reads)
    if (a && a->size()) enc.set_input_array(*a);
  for (auto* a : writes)
    if (a && a->size()) enc.set_output_array(*a);
}

inline void add_node(cu::CommandEncoder& enc, const std::vector<const mx::array*>& reads,
                     const std::vector<const mx::array*>& writes, KernelNode& n) {
  if (n.empty()) return;
  name_buffers(enc, reads, writes);
  enc.add_kernel_node_raw(reinterpret_cast<CUfunction>(n.f), n.grid, n.block, dim3(), n.smem,
                          n.ptrs.data());
}

// Adds one kernel node.
template <typename... KArgs, typename... Args>
void launch(cu::CommandEncoder& enc, const std::vector<const mx::array*>& reads,
            const std::vector<const mx::array*>& writes, void (*kernel)(KArgs...), dim3 grid,
            dim3 block, uint32_t smem, Args&&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  KernelNode n = kernel_node(kernel, grid, block, smem, std::forward<Args>(args)...);
  add_node(enc, reads, writes, n);
}

// lookup(dev) for the current device, computed once per device: each caller passes its own
// lambda, whose type gives it its own cache.
template <class Lookup>
auto per_device(Lookup lookup) {
  static std::mutex mu;
  static std::map<int, decltype(lookup(0))> known;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  auto it = known.find(dev);
  if (it != known.end()) return it->second;
  return known[dev] = lookup(dev);
}

// The current device's compute capability as 10 * major + minor.
inline int compute_capability() {
  return per_device([](int dev) {
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev), "cudaDeviceGetAttribute");
    return 10 * major + minor;
  });
}

// Programmatic dependent launch (compute capability 9.0+, CUDA 12.3+ for graph edge data;
// MLX_MOE_CUDA_PDL=0: off).
inline bool pdl_available() {
#if CUDART_VERSION >= 12030
  return env_u32("MLX_MOE_CUDA_PDL", 1u) != 0u && compute_capability() >= 90;
#else
  return false;
#endif
}

// Nodes in order, each (from the second) a programmatic dependent of the one before (one
// child graph in MLX's graph, its edges of type cudaGraphDependencyTypeProgrammatic): a node's
// blocks may start once every block of the node before has run griddepcontrol.launch_dependents
// (pdl_trigger) or exited, and must run griddepcontrol.wait (pdl_wait) before they touch
// anything an earlier node writes; that wait returns when the node before has completed and
// its writes are visible (and so, through its own wait, every earlier node's). reads /
// writes: all nodes' buffers. Empty nodes (no blocks) are left out.
inline void launch_pdl(cu::CommandEncoder& enc, const std::vector<const mx::array*>& reads,
                       const std::vector<const mx::array*>& writes,
                       const std::vector<KernelNode*>& chain) {
  std::vector<KernelNode*> nodes;
  for (KernelNode* n : chain)
    if (n && !n->empty()) nodes.push_back(n);
#if CUDART_VERSION >= 12030
  if (nodes.size() >= 2) {
    cudaGraph_t g = nullptr;
    check(cudaGraphCreate(&g, 0), "cudaGraphCreate");
    try {
      std::vector<cudaGraphNode_t> gn(nodes.size());
      std::string key = "(K1";
      for (size_t i = 0; i < nodes.size(); ++i) {
        cudaKernelNodeParams kp{};
        kp.func = const_cast<void*>(nodes[i]->kernel);
        kp.gridDim = nodes[i]->grid;
        kp.blockDim = nodes[i]->block;
        kp.sharedMemBytes = nodes[i]->smem;
        kp.kernelParams = nodes[i]->ptrs.data();
        check(cudaGraphAddKernelNode(&gn[i], g, nullptr, 0, &kp), "cudaGraphAddKernelNode");
        if (i == 0) continue;
        cudaGraphEdgeData ed{};
        ed.type = cudaGraphDependencyTypeProgrammatic;
        ed.from_port = cudaGraphKernelNodePortProgrammatic;
#if CUDART_VERSION >= 13000
        check(cudaGraphAddDependencies(g, &gn[i - 1], &gn[i], &ed, 1), "cudaGraphAddDependencies");
#else
        check(cudaGraphAddDependencies_v2(g, &gn[i - 1], &gn[i], &ed, 1),
              "cudaGraphAddDependencies_v2");
#endif
        key += "PK1";
      }
      name_buffers(enc, reads, writes);
      // Its own key per chain length: MLX keys cached executable graphs by node types only,
      // and a child of kernels joined by plain edges must not be taken for this one.
      enc.add_graph_node(g, key + ")", true);
    } catch (...) {
      cudaGraphDestroy(g);
      throw;
    }
    check(cudaGraphDestroy(g), "cudaGraphDestroy");
    return;
  }
#endif
  for (KernelNode* n : nodes) add_node(enc, reads, writes, *n);  // (one node; or CUDA < 12.3)
}

template <typename F>
void dispatch_float(mx::Dtype d, F&& f) {
  switch (d) {
    case mx::float32: f(float{}); break;
    case mx::float16: f(__half{}); break;
    case mx::bfloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("mlx_moe CUDA: unsupported float dtype");
  }
}

// Blocks of `kernel` (`threads` each) that fit on the device at once with `smem` bytes each.
template <typename K>
uint32_t capacity(K kernel, int threads, uint32_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, uint32_t>, uint32_t> known;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), dev, threads, smem);
  auto it = known.find(key);
  if (it != known.end()) return it->second;
  // Raise the kernel's dynamic shared memory limit if needed, never lower it (launch() keeps
  // its own record of the limit it set).
  cudaFuncAttributes fa{};
  check(cudaFuncGetAttributes(&fa, reinterpret_cast<const void*>(kernel)), "cudaFuncGetAttributes");
  if (fa.maxDynamicSharedSizeBytes < int(smem)) {
    check(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                               cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
          "cudaFuncSetAttribute");
  }
  int occ = 0, sms = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kernel, threads, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  const uint32_t cap = uint32_t(std::max(occ, 0)) * uint32_t(std::max(sms, 0));
  known[key] = cap;
  return cap;
}

// The kernels' code of a float dtype (store_out's y_kind, the in-kernel routers'
// logits_kind): 0 f32, 1 f16, 2 bf16; -1 for any other dtype.
inline int float_kind(mx::Dtype d) {
  return d == mx::float32 ? 0 : d == mx::float16 ? 1 : d == mx::bfloat16 ? 2 : -1;
}

}  // namespace mlx_moe::gpu
