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

// Adds one kernel node. `reads` / `writes` are the arrays whose last writers this node must
// follow (MLX's encoder links nodes through the buffers named before each node). The
// argument types are forced to the kernel's parameter types (the encoder passes raw
// addresses of the arguments).
template <typename... KArgs, typename... Args>
void launch(cu::CommandEncoder& enc, const std::vector<const mx::array*>& reads,
            const std::vector<const mx::array*>& writes, void (*kernel)(KArgs...), dim3 grid,
            dim3 block, uint32_t smem, Args&&... args) {
  static_assert(sizeof...(KArgs) == sizeof...(Args));
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  for (auto* a : reads)
    if (a && a->size()) enc.set_input_array(*a);
  for (auto* a : writes)
    if (a && a->size()) enc.set_output_array(*a);
  // The driver handle and the dynamic shared memory limit are looked up / raised once per
  // kernel and device (and per larger size), not at every node: this runs at every evaluation.
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, std::pair<cudaFunction_t, uint32_t>> known;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  cudaFunction_t f;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto& [fn, limit] = known[{reinterpret_cast<const void*>(kernel), dev}];
    if (fn == nullptr) {
      check(cudaGetFuncBySymbol(&fn, reinterpret_cast<const void*>(kernel)), "cudaGetFuncBySymbol");
      limit = 48 * 1024;
    }
    if (smem > limit) {
      check(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                 cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)),
            "cudaFuncSetAttribute");
      limit = smem;
    }
    f = fn;
  }
  enc.add_kernel_node_ex(reinterpret_cast<CUfunction>(f), grid, block, dim3(), smem,
                         static_cast<KArgs>(args)...);
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

inline uint32_t env_u32(const char* name, uint32_t dflt) {
  const char* v = std::getenv(name);
  return v && *v ? uint32_t(std::atoi(v)) : dflt;
}

}  // namespace mlx_moe::gpu
