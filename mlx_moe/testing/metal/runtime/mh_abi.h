// Metal harness: the one definition of the structures shared by the runtime (mh_runtime.cpp),
// the Metal shim (mh_metal.h), the generated kernel entry points and Python (ctypes mirrors
// these in mlx_moe/testing/metal/__init__.py: keep the three in step).
#pragma once
#include <stdint.h>

#define MH_MAX_BUFFERS 32
#define MH_MAX_TG_BUFFERS 32
#define MH_SIMD_WIDTH 32

// Built-in attribute values of one thread (Metal's [[...]] kernel inputs).
typedef struct mh_ids {
  uint32_t tpig[3];   // thread_position_in_grid
  uint32_t tgpig[3];  // threadgroup_position_in_grid
  uint32_t tpitg[3];  // thread_position_in_threadgroup
  uint32_t tptg[3];   // threads_per_threadgroup (the actual size of this threadgroup)
  uint32_t tgpg[3];   // threadgroups_per_grid
  uint32_t tpg[3];    // threads_per_grid
  uint32_t dtptg[3];  // dispatch_threads_per_threadgroup (the size the host asked for)
  uint32_t tiitg;     // thread_index_in_threadgroup
  uint32_t tiisg;     // thread_index_in_simdgroup
  uint32_t sgitg;     // simdgroup_index_in_threadgroup
  uint32_t sgptg;     // simdgroups_per_threadgroup
  uint32_t tpsg;      // threads_per_simdgroup (32)
} mh_ids;

typedef void (*mh_entry_fn)(void* const* buffers, void* const* tg_buffers, const mh_ids* ids);

enum mh_buffer_kind { MH_UNBOUND = 0, MH_DEVICE = 1, MH_CONSTANT = 2 };

typedef struct mh_buffer {
  void* ptr;      // start of the valid bytes (allocated by mh_alloc: red zones around it)
  uint64_t size;  // valid bytes
  uint32_t kind;  // mh_buffer_kind
  uint32_t pad;
} mh_buffer;

// Per-buffer counters of one dispatch.
typedef struct mh_counters {
  uint64_t bytes_read;       // every load of every thread (simdgroup_load: once per simdgroup)
  uint64_t bytes_written;
  uint64_t tg_unique_read;   // sum over threadgroups of the distinct bytes each one read
  uint64_t unique_read;      // distinct bytes read by the whole dispatch
  uint64_t unique_written;   // distinct bytes written by the whole dispatch
} mh_counters;

enum mh_error {
  MH_OK = 0,
  MH_OUT_OF_BOUNDS = 1,
  MH_BARRIER_DIVERGENCE = 2,
  MH_DEADLOCK = 3,
  MH_UNINITIALIZED_READ = 4,
  MH_RACE = 5,
  MH_CRASH = 6,
  MH_BAD_LAUNCH = 7,
};

enum mh_flags {
  MH_REVERSE = 1,        // threadgroups and threads in reverse order (schedule variant)
  MH_NO_TG_CHECKS = 2,   // no race / uninitialized tracking of threadgroup memory
  MH_NO_UNIQUE = 4,      // no distinct-byte counting (faster)
};

typedef struct mh_launch {
  uint32_t groups[3];       // threadgroups per grid
  uint32_t tptg[3];         // threads per threadgroup (as dispatched)
  uint32_t threads[3];      // dispatchThreads: threads per grid (0: dispatchThreadgroups)
  uint32_t flags;
  uint32_t n_tg_buffers;
  uint64_t tg_sizes[MH_MAX_TG_BUFFERS];   // [[threadgroup(i)]] lengths
  mh_buffer buffers[MH_MAX_BUFFERS];      // [[buffer(i)]]
  mh_counters counters[MH_MAX_BUFFERS];   // out
  mh_entry_fn entry;
  const char* kernel_name;
  // statistics (out)
  uint64_t threadgroups_run, barriers, simd_collectives, fiber_switches;
  // error (out)
  int32_t error;
  int32_t error_buffer;     // buffer slot of an out-of-bounds access (-1: threadgroup memory)
  char message[1024];
} mh_launch;
