// Expert bucketing in three dispatches, deterministic (no order decided by atomics):
//  1. moe_bucket_count:   per chunk of `chunk` pairs, a histogram over experts in
//                         threadgroup memory -> block_counts[block][0..E); column E
//                         counts the chunk's out-of-range ids (dropped).
//  2. moe_bucket_scan:    one threadgroup: per-expert totals, their exclusive prefix sum
//                         (offsets), each block's starting position per expert, and the
//                         indirect-dispatch arguments of the grouped GEMM.
//  3. moe_bucket_scatter: per chunk, pairs written in ascending pair order inside each
//                         expert: 32 pairs at a time, rank among equal experts from
//                         simd shuffles, then a per-expert cursor in threadgroup memory.
//  4. moe_bucket_finish:  slots of dropped pairs set to 0xffffffff (public op), or, for
//                         moe_mlp (keep_dropped), the dropped pairs are listed after
//                         offsets[E] as a pseudo-expert E whose tiles the MLP kernel zeroes;
//                         and the MLP's completion counters zeroed.
// Many tokens (4096 x 8 pairs) spread over ceil(P / chunk) threadgroups.
#include <metal_stdlib>

#include "common/moe_args.h"

using namespace metal;

template <typename I>
[[kernel]] void moe_bucket_count(
    device const I* ids [[buffer(0)]],
    device uint* block_counts [[buffer(1)]],
    constant MoeBucketArgs& args [[buffer(2)]],
    threadgroup atomic_uint* hist [[threadgroup(0)]],  // E + 1 counters
    uint blk [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_threadgroup]],
    uint tpt [[threads_per_threadgroup]]) {
  const uint nt = tpt;
  for (uint e = lane; e <= args.E; e += nt) {
    atomic_store_explicit(&hist[e], 0u, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint begin = blk * args.chunk;
  const uint end = min(begin + args.chunk, args.P);
  for (uint p = begin + lane; p < end; p += nt) {
    long e = long(ids[p]);
    bool valid = e >= 0 && e < long(args.E);
    atomic_fetch_add_explicit(&hist[valid ? uint(e) : args.E], 1u, memory_order_relaxed);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint e = lane; e <= args.E; e += nt) {
    block_counts[size_t(blk) * (args.E + 1) + e] =
        atomic_load_explicit(&hist[e], memory_order_relaxed);
  }
}

[[kernel]] void moe_bucket_scan(
    device uint* block_offsets [[buffer(0)]],  // [nblocks][E + 1]; in: counts, out: starts
    device uint* counts [[buffer(1)]],
    device uint* offsets [[buffer(2)]],
    device uint* dispatch [[buffer(3)]],
    constant MoeBucketArgs& args [[buffer(4)]],
    device uint* tile_starts [[buffer(5)]],  // [E + 1]: first grouped-GEMM tile of each expert
    uint tid [[thread_index_in_threadgroup]],
    uint tpt [[threads_per_threadgroup]]) {
  const uint nt = tpt;
  const size_t stride = args.E + 1;
  for (uint e = tid; e <= args.E; e += nt) {
    uint running = 0;
    for (uint b = 0; b < args.nblocks; ++b) {
      uint c = block_offsets[b * stride + e];
      block_offsets[b * stride + e] = running;
      running += c;
    }
    if (e < args.E) {
      counts[e] = running;
    } else {
      dispatch[3] = running;  // dropped (out-of-range) ids
    }
  }
  threadgroup_barrier(mem_flags::mem_device);
  if (tid == 0) {
    uint total = 0;
    uint tiles = 0;
    for (uint e = 0; e < args.E; ++e) {
      offsets[e] = total;
      total += counts[e];
      tile_starts[e] = tiles;
      tiles += (counts[e] + args.tile - 1) / args.tile;
    }
    tile_starts[args.E] = tiles;
    offsets[args.E] = total;
    if (args.keep_dropped != 0) {
      tiles += (dispatch[3] + args.tile - 1) / args.tile;  // the dropped pairs' tiles
    }
    dispatch[0] = max(tiles, 1u);
    dispatch[1] = args.grid_y;
    dispatch[2] = 1;
  }
  threadgroup_barrier(mem_flags::mem_device);
  for (uint e = tid; e <= args.E; e += nt) {  // column E: dropped pairs, after offsets[E]
    uint base = offsets[e];
    for (uint b = 0; b < args.nblocks; ++b) {
      block_offsets[b * stride + e] += base;
    }
  }
}

template <typename I>
[[kernel]] void moe_bucket_scatter(
    device const I* ids [[buffer(0)]],
    device const uint* block_offsets [[buffer(1)]],
    device uint* pairs [[buffer(2)]],
    constant MoeBucketArgs& args [[buffer(3)]],
    threadgroup uint* cursor [[threadgroup(0)]],
    uint blk [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  // One simdgroup per threadgroup. With keep_dropped, out-of-range ids are expert E.
  const uint nkeys = args.keep_dropped != 0 ? args.E + 1 : args.E;
  const uint dropped_key = args.keep_dropped != 0 ? args.E : 0xffffffffu;
  for (uint e = lane; e < nkeys; e += 32) {
    cursor[e] = block_offsets[size_t(blk) * (args.E + 1) + e];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const uint begin = blk * args.chunk;
  const uint end = min(begin + args.chunk, args.P);
  for (uint base = begin; base < end; base += 32) {
    const uint p = base + lane;
    uint e = 0xffffffffu;
    if (p < end) {
      long v = long(ids[p]);
      e = (v >= 0 && v < long(args.E)) ? uint(v) : dropped_key;
    }
    uint rank = 0, same = 0;
    for (ushort j = 0; j < 32; ++j) {
      uint ej = simd_shuffle(e, j);
      if (ej == e) {
        rank += (j < lane) ? 1u : 0u;
        same += 1;
      }
    }
    uint start = (e != 0xffffffffu) ? cursor[e] : 0u;
    threadgroup_barrier(mem_flags::mem_threadgroup);  // every lane read its cursor
    if (e != 0xffffffffu) {
      pairs[start + rank] = p;
      if (rank + 1 == same) {
        cursor[e] = start + same;  // the last lane of each expert advances it
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
}

// Public op: pairs past offsets[E] (left by dropped ids) are set to 0xffffffff. Both: the
// first nzero words of `counters` are zeroed.
[[kernel]] void moe_bucket_finish(
    device uint* pairs [[buffer(0)]],
    device const uint* offsets [[buffer(1)]],
    constant MoeBucketArgs& args [[buffer(2)]],
    device uint* counters [[buffer(3)]],
    uint i [[thread_position_in_grid]]) {
  if (args.keep_dropped == 0 && i < args.P && i >= offsets[args.E]) {
    pairs[i] = 0xffffffffu;
  }
  if (i < args.nzero) {
    counters[i] = 0u;
  }
}

#define MOE_INSTANTIATE_BUCKET(name, I)                                                        \
  template [[host_name("moe_bucket_count_" #name)]] [[kernel]] void moe_bucket_count<I>(       \
      device const I* ids [[buffer(0)]], device uint* block_counts [[buffer(1)]],              \
      constant MoeBucketArgs& args [[buffer(2)]],                                               \
      threadgroup atomic_uint* hist [[threadgroup(0)]],                                         \
      uint blk [[threadgroup_position_in_grid]], uint lane [[thread_index_in_threadgroup]],    \
      uint tpt [[threads_per_threadgroup]]);                                                   \
  template [[host_name("moe_bucket_scatter_" #name)]] [[kernel]] void moe_bucket_scatter<I>(   \
      device const I* ids [[buffer(0)]], device const uint* block_offsets [[buffer(1)]],       \
      device uint* pairs [[buffer(2)]], constant MoeBucketArgs& args [[buffer(3)]],            \
      threadgroup uint* cursor [[threadgroup(0)]], uint blk [[threadgroup_position_in_grid]],  \
      uint lane [[thread_index_in_simdgroup]]);

MOE_INSTANTIATE_BUCKET(uint32, uint)
MOE_INSTANTIATE_BUCKET(int32, int)
MOE_INSTANTIATE_BUCKET(int64, long)
