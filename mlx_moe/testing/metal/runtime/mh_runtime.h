// Metal harness: what the Metal shim (mh_metal.h, compiled into each kernel module) calls in
// the runtime (mh_runtime.cpp). Not part of the Python-facing ABI (that is mh_abi.h).
#pragma once
#include "mh_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

// Flags of mh_access.
enum {
  MH_READ = 1,
  MH_WRITE = 2,
  MH_ATOMIC = 4,   // atomic access: bounds and counters, no race tracking
  MH_NOCOUNT = 8,  // bounds and shadow checks only (simdgroup_load on lanes other than 0)
};

// One lane's part in a simd-group collective.
typedef struct mh_coll_lane {
  uint32_t lane;     // index in the simdgroup
  uint32_t arg;      // lane argument (shuffle source, delta, mask, ...)
  const void* in;    // the lane's operand
  void* out;         // where the lane's result goes
} mh_coll_lane;
// Computes the results of one collective for its participating (active) lanes, in lane order.
typedef void (*mh_coll_fn)(const mh_coll_lane* lanes, uint32_t n);

// Bounds / counters / threadgroup-memory shadow check of one access (no-op outside a dispatch).
void mh_access(const void* p, uint64_t n, uint32_t flags);
// threadgroup_barrier (tg = 1) and simdgroup_barrier (tg = 0). `site` identifies the call.
void mh_barrier(int tg, const void* site);
// A simd-group collective over the active lanes of the calling simdgroup.
void mh_collective(mh_coll_fn fn, const void* in, void* out, uint32_t arg, const void* site);
// Kernel-scope `threadgroup T x[N];`: the same address for every thread of a threadgroup.
void* mh_tg_static(uint32_t id, uint64_t size, uint64_t align);
// Called by atomic loads: lets other threads run (spin-waits make progress; endless ones are
// reported as a deadlock).
void mh_atomic_yield(int progress);
// The calling thread's lane / simdgroup.
uint32_t mh_lane(void);

#ifdef __cplusplus
}
#endif
