// What the host needs of the register-operand decode kernels (moe_cuda_regw.cuh) and of the
// ring-fed kernels (moe_cuda_ring.cuh): their shapes, shared-memory layouts and argument
// structs, host and device alike. The launch code (mlx_moe/csrc/cuda/cuda_ops.cu) includes this
// header and not the kernels', so a change to those kernels recompiles only their own
// translation units (cuda_regw.cu, cuda_ring.cu; docs/DESIGN.md, "Translation units").
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace mlx_moe::cuda {

constexpr int RW_NT = 8;  // tokens per chunk (one MMA column tile)

// Shared memory of a block: the staged rows, their group sums, the split-K partials (of
// `slots` sets of K / 256 warps: the direct down kernel's k, else 1; STREAM: `warps`, the
// block's warp count).
__host__ __device__ constexpr uint32_t regw_smem_bytes(uint32_t K, uint32_t GS, int NP, int MT,
                                                       uint32_t slots = 1u, uint32_t warps = 0u) {
  return RW_NT * (K + 8u) * 2u + (K / GS) * RW_NT * 4u +
         (warps ? warps : slots * (K / 256u)) * uint32_t(NP * MT) * 4u * 32u * 4u;
}

// The direct kernels' routing (DIRECT; unused otherwise): ids [P] of kind id_kind (load_id),
// and the down kernel's output y [T, N] (bf16).
struct RegwDirect {
  const void* ids;
  int id_kind;
  __nv_bfloat16* y;
};
// Threads of the direct down block at most: k * K / 8 (one 16-byte chunk of a staged row
// each); 768 covers top-8 at K = 768 (Qwen3-30B-A3B) and top-4 at 1536 (GLM-4.7-Flash).
constexpr int RW_DIRECT_THREADS = 768;

// Slots of the consumers' partial sums (double-buffered: one barrier per round).
constexpr uint32_t RING_NR = 2;

// A ring stage's layout for one projection: R = 16 MT rows of codes, each padded to `cs`
// bytes (K / 8 words + 4 WPT: the lanes of a load phase then hit distinct banks), then the R
// rows' scales (G per row; bf16, mxfp4: E8M0 bytes) and biases (bf16; mxfp4: none), each area
// 16-byte aligned.
struct RingLayout {
  uint32_t cs;      // bytes per padded code row
  uint32_t codes;   // bytes of a projection's code rows
  uint32_t sbytes;  // bytes of a projection's scales (and of its biases)
  uint32_t proj;    // bytes per projection in a stage
  uint32_t stage;   // bytes per stage (NP projections)
  uint32_t tx;      // bytes the copies of one stage deliver
  uint32_t head;    // bytes before the stages (2 ns mbarriers, rounded to 16)
  uint32_t xs_off, XS_off, red_off, total;
};

// K: codes per row (4-bit), G scale groups per row of gs codes (RwFmt: gs / 32 code words per
// lane, row and group).
__host__ __device__ inline RingLayout ring_layout(uint32_t K, uint32_t G, uint32_t gs, bool fp4, int NP,
                                                  int MT, uint32_t ns) {
  RingLayout L{};
  const uint32_t WPT = gs / 32u;
  const uint32_t R = 16u * uint32_t(MT), rwd = K / 8u;
  auto r16 = [](uint32_t b) { return (b + 15u) & ~15u; };
  L.cs = (rwd + 4u * WPT) * 4u;
  L.codes = R * L.cs;
  L.sbytes = r16(R * G * (fp4 ? 1u : 2u));
  L.proj = L.codes + L.sbytes * (fp4 ? 1u : 2u);
  L.stage = uint32_t(NP) * L.proj;
  L.tx = uint32_t(NP) * (R * rwd * 4u + R * G * (fp4 ? 1u : 4u));
  L.head = r16(2u * ns * 8u);
  L.xs_off = L.head + ns * L.stage;
  L.XS_off = L.xs_off + uint32_t(RW_NT) * (K + 8u) * 2u;
  L.red_off = L.XS_off + r16(G * uint32_t(RW_NT) * 4u);
  L.total = L.red_off + RING_NR * (K / 256u) * uint32_t(NP * MT) * 4u * 32u * 4u;
  return L;
}

}  // namespace mlx_moe::cuda
