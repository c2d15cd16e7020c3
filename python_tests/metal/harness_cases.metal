// Kernels that test the Metal harness itself (python_tests/test_metal_harness.py): known
// answers for every construct our kernels rely on, and planted bugs it must catch.
#include <metal_stdlib>

using namespace metal;

// ---- simd-group functions: every lane writes what each function gave it ------------------
[[kernel]] void simd_ops(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],   // [8][threads]
    device uint* bits [[buffer(2)]],   // [2][threads]: ballot (low word), is_first
    uint gid [[thread_position_in_grid]],
    uint3 tpg [[threads_per_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint n = tpg.x;
  const float v = x[gid];
  out[0 * n + gid] = simd_sum(v);
  out[1 * n + gid] = simd_max(v);
  out[2 * n + gid] = simd_min(v);
  out[3 * n + gid] = simd_prefix_exclusive_sum(v);
  out[4 * n + gid] = simd_shuffle_xor(v, ushort(5));
  out[5 * n + gid] = simd_broadcast(v, ushort(7));
  out[6 * n + gid] = simd_shuffle_down(v, ushort(3));
  out[7 * n + gid] = simd_shuffle(v, ushort((lane * 3) % 32));
  bits[gid] = uint(uint64_t(simd_ballot(v > 0.5f)) & 0xffffffffu);
  bits[n + gid] = simd_is_first() ? 1u : 0u;
}

// A butterfly reduction with shuffles, as kernels write it.
[[kernel]] void simd_butterfly(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& first_offset [[buffer(2)]],  // 16 is right; 8 misses half the lanes
    uint gid [[thread_position_in_grid]]) {
  float v = x[gid];
  for (ushort off = ushort(first_offset); off > 0; off /= 2) {
    v += simd_shuffle_xor(v, off);
  }
  out[gid] = v;
}

// Divergent collective: only the active lanes (lane < 16) take part.
[[kernel]] void simd_partial(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  float s = -1.0f;
  if (lane < 16) {
    s = simd_sum(x[gid]);
  }
  out[gid] = s;
}

// ---- threadgroup memory and barriers: tree reduction per threadgroup -----------------------
[[kernel]] void tg_tree_sum(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* sh [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint3 tptg [[threads_per_threadgroup]],
    uint tg [[threadgroup_position_in_grid]]) {
  sh[tid] = x[tg * tptg.x + tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = tptg.x / 2; s > 0; s /= 2) {
    if (tid < s) {
      sh[tid] += sh[tid + s];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) {
    out[tg] = sh[0];
  }
}

// Kernel-scope threadgroup array (shared by the threads of a threadgroup) + 2D positions.
[[kernel]] void tg_static_transpose(
    device const uint* x [[buffer(0)]],   // [16][16] per threadgroup
    device uint* out [[buffer(1)]],
    uint2 tpitg [[thread_position_in_threadgroup]],
    uint2 tgpig [[threadgroup_position_in_grid]],
    uint2 tgpg [[threadgroups_per_grid]]) {
  threadgroup uint tile[16][17];
  const uint base = (tgpig.y * tgpg.x + tgpig.x) * 256;
  tile[tpitg.y][tpitg.x] = x[base + tpitg.y * 16 + tpitg.x];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[base + tpitg.y * 16 + tpitg.x] = tile[tpitg.x][tpitg.y];
}

// ---- simdgroup_matrix: C[M][N] = A[M][K] B[K][N], one simdgroup per 8x8 output tile -------
template <typename T>
[[kernel]] void sg_matmul(
    device const T* a [[buffer(0)]],
    device const T* b [[buffer(1)]],
    device float* c [[buffer(2)]],
    constant uint3& mnk [[buffer(3)]],
    uint2 tg [[threadgroup_position_in_grid]]) {
  const uint N = mnk.y, K = mnk.z;
  simdgroup_matrix<float, 8, 8> acc = simdgroup_matrix<float, 8, 8>(0.0f);
  for (uint k = 0; k < K; k += 8) {
    simdgroup_matrix<T, 8, 8> am, bm;
    simdgroup_load(am, a + tg.y * 8 * K + k, K);
    simdgroup_load(bm, b + k * N + tg.x * 8, N);
    simdgroup_multiply_accumulate(acc, am, bm, acc);
  }
  simdgroup_store(acc, c + tg.y * 8 * N + tg.x * 8, N);
}
template [[host_name("sg_matmul_float")]] [[kernel]] void sg_matmul<float>(
    device const float* a [[buffer(0)]], device const float* b [[buffer(1)]],
    device float* c [[buffer(2)]], constant uint3& mnk [[buffer(3)]],
    uint2 tg [[threadgroup_position_in_grid]]);
template [[host_name("sg_matmul_half")]] [[kernel]] void sg_matmul<half>(
    device const half* a [[buffer(0)]], device const half* b [[buffer(1)]],
    device float* c [[buffer(2)]], constant uint3& mnk [[buffer(3)]],
    uint2 tg [[threadgroup_position_in_grid]]);

// Diagonal constructor and transpose load: out = transpose(A) * (2 I).
[[kernel]] void sg_diag_transpose(
    device const float* a [[buffer(0)]],
    device float* out [[buffer(1)]]) {
  simdgroup_float8x8 m, d = simdgroup_float8x8(2.0f), r;
  simdgroup_load(m, a, 8, ulong2(0, 0), true);
  simdgroup_multiply(r, m, d);
  simdgroup_store(r, out, 8);
}

// ---- atomics under contention ---------------------------------------------------------------
[[kernel]] void atomic_histogram(
    device const uint* x [[buffer(0)]],
    device atomic_uint* global_hist [[buffer(1)]],
    device uint* tg_hist_out [[buffer(2)]],   // [groups][bins]
    constant uint& bins [[buffer(3)]],
    threadgroup atomic_uint* hist [[threadgroup(0)]],
    uint gid [[thread_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint3 tptg [[threads_per_threadgroup]],
    uint tg [[threadgroup_position_in_grid]]) {
  for (uint b = tid; b < bins; b += tptg.x) {
    atomic_store_explicit(&hist[b], 0u, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint v = x[gid] % bins;
  atomic_fetch_add_explicit(&hist[v], 1u, memory_order_relaxed);
  atomic_fetch_add_explicit(&global_hist[v], 1u, memory_order_relaxed);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint b = tid; b < bins; b += tptg.x) {
    tg_hist_out[tg * bins + b] = atomic_load_explicit(&hist[b], memory_order_relaxed);
  }
}

// Threads of one threadgroup hand a value along a chain by spinning on a flag.
[[kernel]] void spin_chain(
    device uint* out [[buffer(0)]],
    threadgroup atomic_uint* flag [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  if (tid == 0) {
    atomic_store_explicit(flag, 0u, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  while (atomic_load_explicit(flag, memory_order_relaxed) != tid) {
  }
  out[tid] = tid * 10u;
  atomic_store_explicit(flag, tid + 1u, memory_order_relaxed);
}

// ---- indirect dispatch: a kernel writes the grid of the next one ----------------------------
[[kernel]] void write_grid(
    device const uint* n [[buffer(0)]],
    device uint* args [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid == 0) {
    args[0] = (n[0] + 63) / 64;
    args[1] = 2;
    args[2] = 1;
  }
}

[[kernel]] void mark_groups(
    device uint* seen [[buffer(0)]],   // [gy][gx]
    uint2 tg [[threadgroup_position_in_grid]],
    uint2 ng [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]]) {
  if (tid == 0) {
    seen[tg.y * ng.x + tg.x] += 1u;
  }
}

// dispatchThreads: the edge threadgroup is partial; threads_per_threadgroup says its size.
[[kernel]] void grid_positions(
    device uint* pos [[buffer(0)]],
    device uint* size [[buffer(1)]],
    uint gid [[thread_position_in_grid]],
    uint3 tptg [[threads_per_threadgroup]]) {
  pos[gid] = gid + 1u;
  size[gid] = tptg.x;
}

// ---- function constants ----------------------------------------------------------------------
constant uint SCALE [[function_constant(0)]];
constant bool ADD_ONE [[function_constant(1)]];

[[kernel]] void specialised(
    device const uint* x [[buffer(0)]],
    device uint* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  uint v = x[gid] * SCALE;
  if (ADD_ONE) {
    v += 1u;
  }
  out[gid] = is_function_constant_defined(ADD_ONE) ? v : 0xffffffffu;
}

// ---- numeric types ---------------------------------------------------------------------------
[[kernel]] void convert_types(
    device const float* x [[buffer(0)]],
    device half* h [[buffer(1)]],
    device bfloat* b [[buffer(2)]],
    device uint* u [[buffer(3)]],
    uint gid [[thread_position_in_grid]]) {
  const float v = x[gid];
  h[gid] = half(v);
  b[gid] = bfloat(v);
  u[gid] = as_type<uint>(v);
}

// ================= planted bugs ==============================================================
// A neighbour's value read without a barrier in between.
[[kernel]] void bug_missing_barrier(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* sh [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint3 tptg [[threads_per_threadgroup]]) {
  sh[tid] = x[tid];
  // threadgroup_barrier(mem_flags::mem_threadgroup);  <- missing
  out[tid] = sh[(tid + 1) % tptg.x];
}

// One past the end of the output.
[[kernel]] void bug_oob_write(
    device float* out [[buffer(0)]],
    constant uint& n [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid <= n) {  // should be <
    out[gid] = 1.0f;
  }
}

// One past the end of the threadgroup allocation.
[[kernel]] void bug_oob_threadgroup(
    device float* out [[buffer(0)]],
    threadgroup float* sh [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  sh[tid + 1] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = sh[tid];
}

// A barrier only some threads reach.
[[kernel]] void bug_divergent_barrier(
    device float* out [[buffer(0)]],
    threadgroup float* sh [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  sh[tid] = float(tid);
  if (tid < 16) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = sh[tid];
}

// The two halves of a threadgroup at two different barriers.
[[kernel]] void bug_two_barriers(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  if (tid < 32) {
    out[tid] = 1.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = 2.0f;
  }
}

// Reads threadgroup memory nobody wrote.
[[kernel]] void bug_uninitialized(
    device float* out [[buffer(0)]],
    threadgroup float* sh [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  if (tid > 0) {
    sh[tid] = 1.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = sh[0];
}

// Threadgroup 0 waits for a flag threadgroup 1 sets: Metal does not promise that two
// threadgroups run concurrently.
[[kernel]] void bug_cross_group_wait(
    device atomic_uint* flag [[buffer(0)]],
    uint tg [[threadgroup_position_in_grid]]) {
  if (tg == 0) {
    while (atomic_load_explicit(flag, memory_order_relaxed) == 0u) {
    }
  } else {
    atomic_store_explicit(flag, 1u, memory_order_relaxed);
  }
}

// Reads a constant buffer shorter than its struct.
struct Big {
  uint a, b, c, d;
};
[[kernel]] void bug_short_constant(
    constant Big& args [[buffer(0)]],
    device uint* out [[buffer(1)]]) {
  out[0] = args.d;
}
