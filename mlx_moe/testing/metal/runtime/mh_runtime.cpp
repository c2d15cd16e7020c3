// Metal harness runtime: executes one dispatch of a kernel compiled from .metal source on the
// CPU with Metal's execution semantics, and checks every memory access it makes.
//
//  * Threadgroups run one after another; the threads of a threadgroup are cooperative fibers
//    (a few lines of context switch below). A thread runs until it reaches a synchronisation
//    point: threadgroup_barrier, a simd-group collective, an atomic load (so spin-waits let
//    others run), or its end.
//  * A simd-group collective completes when no lane of that simdgroup can run any more; its
//    participants are the lanes waiting at the same call site (Metal's active lanes: lanes
//    that returned, or wait elsewhere, take no part).
//  * threadgroup_barrier releases when every live thread of the threadgroup waits at the same
//    barrier; a thread that returned, or one waiting at another barrier, is a divergence error.
//  * Kernels are compiled with clang's AddressSanitizer instrumentation in "callback" mode:
//    every load and store calls __asan_load<N> / __asan_store<N>, defined here. They check
//    the address against the dispatch's buffers (allocated with red zones) and threadgroup
//    allocations, count bytes per buffer, and keep a shadow of threadgroup memory (which
//    thread wrote / read each byte in which barrier interval) to find races and reads of
//    never-written threadgroup memory.
//
// Plain C++ without the C++ runtime (no exceptions, RTTI or operator new): the module links
// with a C linker.
#include "mh_runtime.h"

#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define MH_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

#if !defined(__x86_64__)
ucontext_t g_sched_uc;
#endif

// ---------------------------------------------------------------------------------------
// Allocations with red zones (Python allocates every buffer through mh_alloc).
struct AllocHeader {
  uint64_t magic;
  uint64_t size;
  uint64_t redzone;
  uint64_t total;
};
constexpr uint64_t kMagic = 0x6d685f616c6c6f63ull;
constexpr uint64_t kPage = 4096;

uint64_t round_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// ---------------------------------------------------------------------------------------
// Context switch. x86-64 System V: callee-saved registers, MXCSR and the x87 control word.
#if defined(__x86_64__)
extern "C" void mh_switch(void** save_sp, void* new_sp);
extern "C" void mh_fiber_start();
asm(R"(
  .text
  .p2align 4
  .type mh_switch,@function
mh_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mh_switch, .-mh_switch
  .p2align 4
  .type mh_fiber_start,@function
mh_fiber_start:
  andq $-16, %rsp
  call mh_fiber_main
  ud2
  .size mh_fiber_start, .-mh_fiber_start
)");
#endif

enum State { RUN = 0, BARRIER = 1, SIMD = 2, DONE = 3, YIELD = 4 };

struct Fiber {
  void* sp;
  int state;
  const void* site;
  int barrier_tg;  // 1 threadgroup_barrier, 0 simdgroup_barrier (state BARRIER)
  mh_coll_fn cfn;
  const void* cin;
  void* cout;
  uint32_t carg;
  mh_ids ids;
  char* stack;  // base of the usable stack (a guard page below)
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
};

constexpr uint64_t kStack = 256 * 1024;

// Threadgroup-memory shadow, one entry per byte of the arena.
struct Shadow {
  uint32_t serial;  // threadgroup serial of the last write (!= current: never written)
  uint32_t w_ep;    // barrier interval of the last write
  uint32_t r_ep;    // barrier interval of the last read(s)
  uint32_t w_sgep;  // writer's simdgroup collective count at the write
  uint32_t r_sgep;  // latest reader's simdgroup collective count
  uint16_t w_tid;
  uint16_t r_tid;   // 0xffff: several readers
  uint32_t r_serial;
};
constexpr uint16_t kMulti = 0xffff;

struct Region {
  uintptr_t lo, hi;        // valid bytes
  uintptr_t rz_lo, rz_hi;  // with red zones
  int slot;                // buffer slot; -1 - i for threadgroup allocation i
  bool device;
  // distinct-byte tracking
  uint64_t* tg_bits;
  uint64_t* all_bits;
  uint64_t* w_bits;
  uint64_t* touched;
  uint64_t n_touched, cap_touched;
};

struct TgAlloc {
  uint32_t id;
  uintptr_t lo, hi;
};

struct Dispatch {
  mh_launch* L;
  Region regions[MH_MAX_BUFFERS];
  int n_regions;
  int last_region;
  // threadgroup arena
  char* arena;
  uint64_t arena_size;
  uint64_t arena_used;
  uint64_t arena_dyn_end;  // end of the [[threadgroup(i)]] buffers
  uintptr_t tg_dyn_lo[MH_MAX_TG_BUFFERS], tg_dyn_hi[MH_MAX_TG_BUFFERS];
  TgAlloc statics[64];
  int n_statics;
  Shadow* shadow;
  bool tg_checks;
  bool unique;
  // fibers
  Fiber* fibers;
  uint32_t n_fibers_alloc;
  char* stacks;
  uint64_t stacks_size;
  uint32_t n_threads;
  uint32_t n_sg;
  uint32_t* sg_ep;
  uint32_t tg_ep;
  uint32_t tg_serial;
  Fiber* cur;
  void* sched_sp;
  bool abort;
  uint64_t progress;
  void* dyn_tg_ptrs[MH_MAX_TG_BUFFERS];
  void* buf_ptrs[MH_MAX_BUFFERS];
  bool pending_uninit;
  char pending_msg[512];
};

Dispatch* g_d = nullptr;
sigjmp_buf g_jmp;
struct sigaction g_old_segv, g_old_bus, g_old_fpe, g_old_ill;
char* g_altstack = nullptr;

void fail(int code, int slot, const char* fmt, ...) __attribute__((format(printf, 3, 4)));

const char* thread_desc(char* buf, size_t n) {
  Dispatch* d = g_d;
  if (!d || !d->cur) {
    snprintf(buf, n, "(no thread)");
  } else {
    const mh_ids& i = d->cur->ids;
    snprintf(buf, n, "threadgroup (%u,%u,%u) thread (%u,%u,%u) [index %u, simdgroup %u lane %u]",
             i.tgpig[0], i.tgpig[1], i.tgpig[2], i.tpitg[0], i.tpitg[1], i.tpitg[2], i.tiitg,
             i.sgitg, i.tiisg);
  }
  return buf;
}

void switch_to_scheduler();

void fail(int code, int slot, const char* fmt, ...) {
  Dispatch* d = g_d;
  if (d->L->error == MH_OK) {
    d->L->error = code;
    d->L->error_buffer = slot;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->L->message, sizeof(d->L->message), fmt, ap);
    va_end(ap);
  }
  d->abort = true;
  if (d->cur) {
    switch_to_scheduler();  // never resumes: the dispatch is abandoned
  }
}

// ---------------------------------------------------------------------------------------
// Access checks.
void set_bits(Region& r, uint64_t off, uint64_t n, bool write) {
  for (uint64_t b = off; b < off + n; ++b) {
    uint64_t w = b >> 6, m = 1ull << (b & 63);
    if (write) {
      r.w_bits[w] |= m;
      continue;
    }
    if (r.tg_bits[w] == 0) {
      if (r.n_touched == r.cap_touched) {
        r.cap_touched = r.cap_touched ? 2 * r.cap_touched : 1024;
        r.touched = (uint64_t*)realloc(r.touched, r.cap_touched * sizeof(uint64_t));
      }
      r.touched[r.n_touched++] = w;
    }
    r.tg_bits[w] |= m;
  }
}

void check_tg(Dispatch* d, uintptr_t a, uint64_t n, uint32_t flags) {
  char who[160];
  // which allocation?
  int which = -1;
  uintptr_t lo = 0, hi = 0;
  for (uint32_t i = 0; i < d->L->n_tg_buffers; ++i) {
    if (a >= d->tg_dyn_lo[i] && a < d->tg_dyn_hi[i]) {
      which = int(i);
      lo = d->tg_dyn_lo[i];
      hi = d->tg_dyn_hi[i];
    }
  }
  for (int i = 0; which < 0 && i < d->n_statics; ++i) {
    if (a >= d->statics[i].lo && a < d->statics[i].hi) {
      which = 1000 + i;
      lo = d->statics[i].lo;
      hi = d->statics[i].hi;
    }
  }
  if (which < 0) {  // in a red zone: name the allocation just below
    uintptr_t best = 0;
    for (uint32_t i = 0; i < d->L->n_tg_buffers; ++i) {
      if (d->tg_dyn_lo[i] <= a && d->tg_dyn_lo[i] >= best) {
        best = d->tg_dyn_lo[i];
        which = int(i);
        lo = d->tg_dyn_lo[i];
        hi = d->tg_dyn_hi[i];
      }
    }
    for (int i = 0; i < d->n_statics; ++i) {
      if (d->statics[i].lo <= a && d->statics[i].lo >= best) {
        best = d->statics[i].lo;
        which = 1000 + i;
        lo = d->statics[i].lo;
        hi = d->statics[i].hi;
      }
    }
  }
  if (which < 0 || a + n > hi) {
    const char* what = "outside every threadgroup allocation";
    if (which < 0) {
      fail(MH_OUT_OF_BOUNDS, -1,
           "%s: out-of-bounds %s of %llu bytes of threadgroup memory (%s, arena offset %lld) by %s",
           d->L->kernel_name, (flags & MH_WRITE) ? "write" : "read", (unsigned long long)n, what,
           (long long)(a - uintptr_t(d->arena)), thread_desc(who, sizeof(who)));
    } else if (which < 1000) {
      fail(MH_OUT_OF_BOUNDS, -1,
           "%s: out-of-bounds %s of %llu bytes at offset %lld of threadgroup(%d) (%llu bytes) by %s",
           d->L->kernel_name, (flags & MH_WRITE) ? "write" : "read", (unsigned long long)n,
           (long long)(a - lo), which, (unsigned long long)(hi - lo), thread_desc(who, sizeof(who)));
    } else {
      fail(MH_OUT_OF_BOUNDS, -1,
           "%s: out-of-bounds %s of %llu bytes at offset %lld of a kernel-scope threadgroup array "
           "(#%d, %llu bytes) by %s",
           d->L->kernel_name, (flags & MH_WRITE) ? "write" : "read", (unsigned long long)n,
           (long long)(a - lo), which - 1000, (unsigned long long)(hi - lo),
           thread_desc(who, sizeof(who)));
    }
    return;
  }
  if (!d->tg_checks) {
    return;
  }
  Fiber* f = d->cur;
  const uint16_t tid = uint16_t(f->ids.tiitg);
  const uint32_t sg = f->ids.sgitg;
  const uint32_t sgep = d->sg_ep[sg];
  Shadow* s = d->shadow + (a - uintptr_t(d->arena));
  for (uint64_t i = 0; i < n; ++i, ++s) {
    const bool written = s->serial == d->tg_serial;
    if (flags & MH_ATOMIC) {
      if (flags & MH_WRITE) {
        s->serial = d->tg_serial;
        s->w_ep = d->tg_ep;
        s->w_tid = tid;
        s->w_sgep = sgep;
      } else if (!written) {
        fail(MH_UNINITIALIZED_READ, -1,
             "%s: atomic read of threadgroup memory that no thread has written (offset %lld) by %s",
             d->L->kernel_name, (long long)(a + i - lo), thread_desc(who, sizeof(who)));
        return;
      }
      continue;
    }
    // Two accesses by different threads are ordered by a barrier between them, or, for lanes
    // of one simdgroup, by a simd-group collective / simdgroup_barrier between them.
    auto ordered = [&](uint16_t other, uint32_t ep, uint32_t other_sgep) {
      if (other == tid || ep != d->tg_ep) {
        return true;
      }
      return other != kMulti && other / MH_SIMD_WIDTH == sg && other_sgep != sgep;
    };
    if (flags & MH_READ) {
      if (!written) {
        // Decided at the next barrier: a write by another thread before then makes it a race
        // (the read may happen before or after that write), otherwise it reads garbage.
        if (!d->pending_uninit) {
          d->pending_uninit = true;
          snprintf(d->pending_msg, sizeof(d->pending_msg),
                   "%s: read of threadgroup memory that no thread has written since the "
                   "threadgroup started (offset %lld of its allocation) by %s",
                   d->L->kernel_name, (long long)(a + i - lo), thread_desc(who, sizeof(who)));
        }
      } else if (!ordered(s->w_tid, s->w_ep, s->w_sgep)) {
        fail(MH_RACE, -1,
             "%s: data race on threadgroup memory (offset %lld of its allocation): read by %s of a "
             "value thread %u wrote with no barrier in between",
             d->L->kernel_name, (long long)(a + i - lo), thread_desc(who, sizeof(who)), s->w_tid);
        return;
      }
      if (s->r_serial != d->tg_serial || s->r_ep != d->tg_ep) {
        s->r_serial = d->tg_serial;
        s->r_ep = d->tg_ep;
        s->r_tid = tid;
      } else if (s->r_tid != tid && s->r_tid != kMulti) {
        // Several readers: remember "several" only across simdgroups (lanes of one
        // simdgroup stay ordered by its collectives).
        s->r_tid = (s->r_tid / MH_SIMD_WIDTH == sg) ? tid : kMulti;
      }
      s->r_sgep = sgep;
    }
    if (flags & MH_WRITE) {
      if (written && !ordered(s->w_tid, s->w_ep, s->w_sgep)) {
        fail(MH_RACE, -1,
             "%s: data race on threadgroup memory (offset %lld of its allocation): write by %s "
             "after a write by thread %u with no barrier in between",
             d->L->kernel_name, (long long)(a + i - lo), thread_desc(who, sizeof(who)), s->w_tid);
        return;
      }
      if (s->r_serial == d->tg_serial && !ordered(s->r_tid, s->r_ep, s->r_sgep)) {
        fail(MH_RACE, -1,
             "%s: data race on threadgroup memory (offset %lld of its allocation): write by %s "
             "after a read by %s%u with no barrier in between",
             d->L->kernel_name, (long long)(a + i - lo), thread_desc(who, sizeof(who)),
             s->r_tid == kMulti ? "several threads, e.g. " : "thread ",
             s->r_tid == kMulti ? 0u : unsigned(s->r_tid));
        return;
      }
      s->serial = d->tg_serial;
      s->w_ep = d->tg_ep;
      s->w_tid = tid;
      s->w_sgep = sgep;
    }
  }
}

inline void access(uintptr_t a, uint64_t n, uint32_t flags) {
  Dispatch* d = g_d;
  if (!d || !d->cur || d->abort || n == 0) {
    return;
  }
  if (a >= uintptr_t(d->arena) && a < uintptr_t(d->arena) + d->arena_size) {
    check_tg(d, a, n, flags);
    return;
  }
  Region* r = nullptr;
  if (d->last_region >= 0) {
    Region& c = d->regions[d->last_region];
    if (a >= c.rz_lo && a < c.rz_hi) {
      r = &c;
    }
  }
  if (!r) {
    for (int i = 0; i < d->n_regions; ++i) {
      if (a >= d->regions[i].rz_lo && a < d->regions[i].rz_hi) {
        r = &d->regions[i];
        d->last_region = i;
        break;
      }
    }
  }
  if (!r) {
    return;  // the thread's own stack, the kernel's constants, ...
  }
  if (a < r->lo || a + n > r->hi) {
    char who[160];
    fail(MH_OUT_OF_BOUNDS, r->slot,
         "%s: out-of-bounds %s of %llu bytes at byte offset %lld of buffer(%d) (%llu bytes) by %s",
         d->L->kernel_name, (flags & MH_WRITE) ? "write" : "read", (unsigned long long)n,
         (long long)(a - r->lo), r->slot, (unsigned long long)(r->hi - r->lo),
         thread_desc(who, sizeof(who)));
    return;
  }
  if ((flags & MH_WRITE) && !r->device) {
    char who[160];
    fail(MH_OUT_OF_BOUNDS, r->slot, "%s: write to constant buffer(%d) by %s", d->L->kernel_name,
         r->slot, thread_desc(who, sizeof(who)));
    return;
  }
  if (flags & MH_NOCOUNT) {
    return;
  }
  mh_counters& c = d->L->counters[r->slot];
  if (flags & MH_READ) {
    c.bytes_read += n;
  }
  if (flags & MH_WRITE) {
    c.bytes_written += n;
  }
  if (d->unique) {
    if (flags & MH_READ) {
      set_bits(*r, a - r->lo, n, false);
    }
    if (flags & MH_WRITE) {
      set_bits(*r, a - r->lo, n, true);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Fibers.
void switch_to_scheduler() {
  Dispatch* d = g_d;
  Fiber* f = d->cur;
#if defined(__x86_64__)
  mh_switch(&f->sp, d->sched_sp);
#else
  swapcontext(&f->uc, &g_sched_uc);
#endif
}

// The calling thread waits (state BARRIER / SIMD / YIELD) until the scheduler resumes it.
void block(int state) {
  g_d->cur->state = state;
  switch_to_scheduler();
}

}  // namespace

extern "C" void mh_fiber_main() {
  Dispatch* d = g_d;
  Fiber* f = d->cur;
  d->L->entry(d->buf_ptrs, d->dyn_tg_ptrs, &f->ids);
  f->state = DONE;
  d->progress++;
  switch_to_scheduler();
  __builtin_trap();
}

namespace {

#if !defined(__x86_64__)
void fiber_tramp() { mh_fiber_main(); }
#endif

void resume(Dispatch* d, Fiber* f) {
  d->cur = f;
  f->state = RUN;
  d->L->fiber_switches++;
#if defined(__x86_64__)
  mh_switch(&d->sched_sp, f->sp);
#else
  swapcontext(&g_sched_uc, &f->uc);
#endif
  d->cur = nullptr;
}

void init_fiber(Dispatch* d, Fiber* f) {
#if defined(__x86_64__)
  // Stack image mh_switch pops: [mxcsr|fpucw] r15 r14 r13 r12 rbx rbp, return address.
  uint64_t* top = (uint64_t*)(f->stack + kStack);
  top -= 2;  // keep 16-byte alignment room
  *--top = (uint64_t)(uintptr_t)&mh_fiber_start;
  for (int i = 0; i < 6; ++i) {
    *--top = 0;
  }
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  uint16_t cw;
  asm volatile("fnstcw %0" : "=m"(cw));
  csr[1] = cw;
  --top;
  memcpy(top, csr, 8);
  f->sp = top;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack;
  f->uc.uc_stack.ss_size = kStack;
  f->uc.uc_link = nullptr;
  makecontext(&f->uc, fiber_tramp, 0);
#endif
  (void)d;
}

bool ensure_fibers(Dispatch* d, uint32_t n) {
  if (n <= d->n_fibers_alloc) {
    return true;
  }
  const uint64_t per = kStack + kPage;
  if (d->stacks) {  // a larger threadgroup than before: replace the old stacks
    munmap(d->stacks, d->stacks_size);
    free(d->fibers);
    d->stacks = nullptr;
    d->n_fibers_alloc = 0;
  }
  d->stacks_size = per * n;
  d->stacks = (char*)mmap(nullptr, d->stacks_size, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (d->stacks == MAP_FAILED) {
    d->stacks = nullptr;
    return false;
  }
  d->fibers = (Fiber*)calloc(n, sizeof(Fiber));
  for (uint32_t i = 0; i < n; ++i) {
    char* base = d->stacks + per * i;
    mprotect(base, kPage, PROT_NONE);  // guard page: a stack overflow faults
    d->fibers[i].stack = base + kPage;
  }
  d->n_fibers_alloc = n;
  return true;
}

void finish_threadgroup_unique(Dispatch* d) {
  for (int i = 0; i < d->n_regions; ++i) {
    Region& r = d->regions[i];
    if (!r.tg_bits) {
      continue;
    }
    uint64_t cnt = 0;
    for (uint64_t j = 0; j < r.n_touched; ++j) {
      uint64_t w = r.touched[j];
      cnt += __builtin_popcountll(r.tg_bits[w]);
      r.all_bits[w] |= r.tg_bits[w];
      r.tg_bits[w] = 0;
    }
    r.n_touched = 0;
    d->L->counters[r.slot].tg_unique_read += cnt;
  }
}

const char* site_name(const void* site, char* buf, size_t n) {
  snprintf(buf, n, "code address %p", site);
  return buf;
}

bool flush_uninit(Dispatch* d) {
  if (d->pending_uninit) {
    d->pending_uninit = false;
    d->cur = nullptr;
    fail(MH_UNINITIALIZED_READ, -1, "%s", d->pending_msg);
    return false;
  }
  return true;
}

// Runs one threadgroup to completion. Returns false on error.
bool run_threadgroup(Dispatch* d, const uint32_t tg[3], const uint32_t size[3]) {
  mh_launch* L = d->L;
  const uint32_t n = size[0] * size[1] * size[2];
  d->n_threads = n;
  d->n_sg = (n + MH_SIMD_WIDTH - 1) / MH_SIMD_WIDTH;
  d->tg_ep = 1;
  d->tg_serial++;
  for (uint32_t s = 0; s < d->n_sg; ++s) {
    d->sg_ep[s] = 0;
  }
  // Threadgroup memory: fresh (poisoned) for every threadgroup; static arrays re-placed.
  d->n_statics = 0;
  memset(d->arena, 0xff, d->arena_used);
  d->arena_used = d->arena_dyn_end;
  for (uint32_t i = 0; i < n; ++i) {
    Fiber* f = &d->fibers[i];
    f->state = RUN;
    f->site = nullptr;
    mh_ids& id = f->ids;
    memset(&id, 0, sizeof(id));
    id.tpitg[0] = i % size[0];
    id.tpitg[1] = (i / size[0]) % size[1];
    id.tpitg[2] = i / (size[0] * size[1]);
    for (int a = 0; a < 3; ++a) {
      id.tgpig[a] = tg[a];
      id.tptg[a] = size[a];
      id.dtptg[a] = L->tptg[a];
      id.tgpg[a] = L->groups[a];
      id.tpig[a] = tg[a] * L->tptg[a] + id.tpitg[a];
      id.tpg[a] = L->threads[0] ? L->threads[a] : L->groups[a] * L->tptg[a];
    }
    id.tiitg = i;
    id.tiisg = i % MH_SIMD_WIDTH;
    id.sgitg = i / MH_SIMD_WIDTH;
    id.sgptg = d->n_sg;
    id.tpsg = MH_SIMD_WIDTH;
    init_fiber(d, f);
  }
  const bool rev = (L->flags & MH_REVERSE) != 0;
  uint64_t idle_rounds = 0, last_progress = d->progress;
  mh_coll_lane lanes[MH_SIMD_WIDTH];
  for (;;) {
    bool any_live = false, yielded = false;
    for (uint32_t j = 0; j < n; ++j) {
      Fiber* f = &d->fibers[rev ? n - 1 - j : j];
      if (f->state == RUN || f->state == YIELD) {
        resume(d, f);
        if (d->abort) {
          return false;
        }
      }
      any_live = any_live || f->state != DONE;
      yielded = yielded || f->state == YIELD;
    }
    if (!any_live) {
      break;
    }
    bool resolved = false;
    for (uint32_t s = 0; s < d->n_sg; ++s) {
      const uint32_t l0 = s * MH_SIMD_WIDTH, l1 = l0 + MH_SIMD_WIDTH < n ? l0 + MH_SIMD_WIDTH : n;
      bool running = false;
      int first = -1;
      for (uint32_t l = l0; l < l1; ++l) {
        int st = d->fibers[l].state;
        running = running || st == RUN || st == YIELD;
        if (st == SIMD && first < 0) {
          first = int(l);
        }
      }
      if (running || first < 0) {
        continue;
      }
      const Fiber* ff = &d->fibers[first];
      uint32_t m = 0;
      for (uint32_t l = l0; l < l1; ++l) {
        Fiber* f = &d->fibers[l];
        if (f->state == SIMD && f->site == ff->site && f->cfn == ff->cfn) {
          lanes[m].lane = l - l0;
          lanes[m].arg = f->carg;
          lanes[m].in = f->cin;
          lanes[m].out = f->cout;
          ++m;
          f->state = RUN;
        }
      }
      ff->cfn(lanes, m);
      d->sg_ep[s]++;
      d->progress++;
      L->simd_collectives++;
      resolved = true;
    }
    // simdgroup_barrier: releases when no lane of the simdgroup can run.
    for (uint32_t s = 0; s < d->n_sg; ++s) {
      const uint32_t l0 = s * MH_SIMD_WIDTH, l1 = l0 + MH_SIMD_WIDTH < n ? l0 + MH_SIMD_WIDTH : n;
      bool running = false, waiting = false;
      for (uint32_t l = l0; l < l1; ++l) {
        const Fiber& f = d->fibers[l];
        running = running || f.state == RUN || f.state == YIELD || f.state == SIMD;
        waiting = waiting || (f.state == BARRIER && f.barrier_tg == 0);
      }
      if (!running && waiting) {
        for (uint32_t l = l0; l < l1; ++l) {
          Fiber& f = d->fibers[l];
          if (f.state == BARRIER && f.barrier_tg == 0) {
            f.state = RUN;
          }
        }
        d->sg_ep[s]++;
        d->progress++;
        resolved = true;
      }
    }
    if (resolved) {
      continue;
    }
    if (yielded) {
      if (d->progress != last_progress) {
        last_progress = d->progress;
        idle_rounds = 0;
      } else if (++idle_rounds > 200000) {
        char who[160];
        d->cur = nullptr;
        fail(MH_DEADLOCK, -1,
             "%s: deadlock in threadgroup (%u,%u,%u): threads spin on atomics and nothing else "
             "makes progress (a wait for another threadgroup, which Metal does not guarantee to "
             "run concurrently, or for a store that never happens) %s",
             L->kernel_name, tg[0], tg[1], tg[2], thread_desc(who, sizeof(who)));
        return false;
      }
      continue;
    }
    // Everybody blocked: a threadgroup barrier.
    int first = -1, done = -1, other = -1;
    for (uint32_t i = 0; i < n; ++i) {
      const Fiber& f = d->fibers[i];
      if (f.state == DONE) {
        if (done < 0) done = int(i);
      } else if (f.state == BARRIER && f.barrier_tg == 1) {
        if (first < 0) {
          first = int(i);
        } else if (f.site != d->fibers[first].site && other < 0) {
          other = int(i);
        }
      }
    }
    if (first < 0) {
      fail(MH_DEADLOCK, -1, "%s: deadlock in threadgroup (%u,%u,%u): no thread can proceed",
           L->kernel_name, tg[0], tg[1], tg[2]);
      return false;
    }
    if (done >= 0) {
      fail(MH_BARRIER_DIVERGENCE, -1,
           "%s: threadgroup_barrier not reached by all threads of threadgroup (%u,%u,%u): thread "
           "%d waits at a barrier, thread %d has returned",
           L->kernel_name, tg[0], tg[1], tg[2], first, done);
      return false;
    }
    if (other >= 0) {
      char s1[64], s2[64];
      fail(MH_BARRIER_DIVERGENCE, -1,
           "%s: threads of threadgroup (%u,%u,%u) wait at different threadgroup_barrier calls: "
           "thread %d at %s, thread %d at %s (a barrier inside divergent control flow)",
           L->kernel_name, tg[0], tg[1], tg[2], first,
           site_name(d->fibers[first].site, s1, sizeof(s1)), other,
           site_name(d->fibers[other].site, s2, sizeof(s2)));
      return false;
    }
    if (!flush_uninit(d)) {
      return false;
    }
    for (uint32_t i = 0; i < n; ++i) {
      d->fibers[i].state = RUN;
    }
    d->tg_ep++;
    d->progress++;
    L->barriers++;
  }
  if (!flush_uninit(d)) {
    return false;
  }
  if (d->unique) {
    finish_threadgroup_unique(d);
  }
  L->threadgroups_run++;
  return true;
}

void on_signal(int sig, siginfo_t* info, void*) {
  Dispatch* d = g_d;
  if (!d) {
    return;
  }
  char who[160];
  const char* what = sig == SIGFPE ? "arithmetic exception (integer division by zero?)"
                     : sig == SIGILL ? "illegal instruction (a trap)"
                                     : "memory fault";
  const char* where = "";
  uintptr_t a = uintptr_t(info->si_addr);
  for (uint32_t i = 0; d->cur && i < d->n_threads; ++i) {
    uintptr_t lo = uintptr_t(d->fibers[i].stack) - kPage;
    if (a >= lo && a < lo + kPage) {
      where = " (stack overflow of a thread)";
    }
  }
  snprintf(d->L->message, sizeof(d->L->message), "%s: %s at address %p%s in %s", d->L->kernel_name,
           what, info->si_addr, where, thread_desc(who, sizeof(who)));
  d->L->error = MH_CRASH;
  siglongjmp(g_jmp, 1);
}

void install_signals() {
  if (!g_altstack) {
    g_altstack = (char*)malloc(1 << 16);
  }
  stack_t ss;
  ss.ss_sp = g_altstack;
  ss.ss_size = 1 << 16;
  ss.ss_flags = 0;
  sigaltstack(&ss, nullptr);
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  sigaction(SIGFPE, &sa, &g_old_fpe);
  sigaction(SIGILL, &sa, &g_old_ill);
}

void restore_signals() {
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
  sigaction(SIGFPE, &g_old_fpe, nullptr);
  sigaction(SIGILL, &g_old_ill, nullptr);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Exports to Python.
MH_EXPORT void* mh_alloc(uint64_t size) {
  const uint64_t rz = round_up(kPage + size / 4, kPage);
  const uint64_t body = round_up(size, 64);
  const uint64_t total = kPage + rz + body + rz;
  char* base = (char*)mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                           -1, 0);
  if (base == MAP_FAILED) {
    return nullptr;
  }
  AllocHeader* h = (AllocHeader*)base;
  h->magic = kMagic;
  h->size = size;
  h->redzone = rz;
  h->total = total;
  char* p = base + kPage + rz;
  // The tail: the last valid byte is followed directly by the red zone.
  p += body - size;
  memset(base + kPage, 0xbe, total - kPage);
  return p;
}

static AllocHeader* header_of(void* p, uint64_t size) {
  const uint64_t rz = round_up(kPage + size / 4, kPage);
  const uint64_t body = round_up(size, 64);
  char* base = (char*)p - (body - size) - rz - kPage;
  AllocHeader* h = (AllocHeader*)base;
  return h->magic == kMagic ? h : nullptr;
}

MH_EXPORT void mh_free(void* p, uint64_t size) {
  AllocHeader* h = header_of(p, size);
  if (h) {
    munmap(h, h->total);
  }
}

MH_EXPORT int mh_dispatch(mh_launch* L) {
  static Dispatch D;  // fibers and stacks are kept from one dispatch to the next
  Dispatch* d = &D;
  L->error = MH_OK;
  L->error_buffer = -1;
  L->message[0] = 0;
  L->threadgroups_run = L->barriers = L->simd_collectives = L->fiber_switches = 0;
  memset(L->counters, 0, sizeof(L->counters));
  const uint32_t n = L->tptg[0] * L->tptg[1] * L->tptg[2];
  if (n == 0 || n > 1024 || !L->entry) {
    snprintf(L->message, sizeof(L->message), "%s: bad launch: %u threads per threadgroup (1..1024)",
             L->kernel_name, n);
    L->error = MH_BAD_LAUNCH;
    return L->error;
  }
  d->L = L;
  d->abort = false;
  d->cur = nullptr;
  d->last_region = -1;
  d->tg_checks = (L->flags & MH_NO_TG_CHECKS) == 0;
  d->unique = (L->flags & MH_NO_UNIQUE) == 0;
  if (!ensure_fibers(d, n)) {
    snprintf(L->message, sizeof(L->message), "out of memory for thread stacks");
    L->error = MH_BAD_LAUNCH;
    return L->error;
  }
  // Regions of the bound buffers.
  d->n_regions = 0;
  for (int s = 0; s < MH_MAX_BUFFERS; ++s) {
    const mh_buffer& b = L->buffers[s];
    d->buf_ptrs[s] = b.ptr;
    if (b.kind == MH_UNBOUND || !b.ptr) {
      continue;
    }
    Region& r = d->regions[d->n_regions++];
    memset(&r, 0, sizeof(r));
    const uint64_t rz = round_up(kPage + b.size / 4, kPage);
    const uint64_t body = round_up(b.size, 64);
    r.lo = uintptr_t(b.ptr);
    r.hi = r.lo + b.size;
    r.rz_lo = r.lo - (body - b.size) - rz;
    r.rz_hi = r.hi + rz;
    r.slot = s;
    r.device = b.kind == MH_DEVICE;
    if (d->unique) {
      const uint64_t words = (b.size + 63) / 64 + 1;
      r.tg_bits = (uint64_t*)calloc(words, 8);
      r.all_bits = (uint64_t*)calloc(words, 8);
      r.w_bits = (uint64_t*)calloc(words, 8);
    }
  }
  // Threadgroup arena: the [[threadgroup(i)]] buffers, then room for kernel-scope arrays;
  // gaps between allocations are red zones.
  uint64_t off = 256;
  for (uint32_t i = 0; i < L->n_tg_buffers; ++i) {
    off = round_up(off, 16);
    d->tg_dyn_lo[i] = off;
    off += L->tg_sizes[i];
    d->tg_dyn_hi[i] = off;
    off += 256 + L->tg_sizes[i] / 2;
  }
  const uint64_t static_room = 512 * 1024;
  d->arena_size = round_up(off + static_room, kPage);
  d->arena = (char*)mmap(nullptr, d->arena_size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  d->arena_used = off;
  d->arena_dyn_end = off;
  for (uint32_t i = 0; i < L->n_tg_buffers; ++i) {
    d->tg_dyn_lo[i] += uintptr_t(d->arena);
    d->tg_dyn_hi[i] += uintptr_t(d->arena);
    d->dyn_tg_ptrs[i] = (void*)d->tg_dyn_lo[i];
  }
  d->shadow = d->tg_checks ? (Shadow*)calloc(d->arena_size, sizeof(Shadow)) : nullptr;
  d->sg_ep = (uint32_t*)calloc(1024 / MH_SIMD_WIDTH + 1, sizeof(uint32_t));
  d->tg_serial = 0;
  d->progress = 0;
  d->pending_uninit = false;

  g_d = d;
  install_signals();
  if (sigsetjmp(g_jmp, 1) == 0) {
    const bool rev = (L->flags & MH_REVERSE) != 0;
    const uint64_t total = uint64_t(L->groups[0]) * L->groups[1] * L->groups[2];
    for (uint64_t j = 0; j < total && !d->abort; ++j) {
      const uint64_t g = rev ? total - 1 - j : j;
      uint32_t tg[3] = {uint32_t(g % L->groups[0]), uint32_t((g / L->groups[0]) % L->groups[1]),
                        uint32_t(g / (uint64_t(L->groups[0]) * L->groups[1]))};
      uint32_t size[3];
      for (int a = 0; a < 3; ++a) {
        size[a] = L->tptg[a];
        if (L->threads[0]) {  // dispatchThreads: partial threadgroups at the edges
          uint32_t left = L->threads[a] - tg[a] * L->tptg[a];
          size[a] = left < L->tptg[a] ? left : L->tptg[a];
        }
      }
      if (!run_threadgroup(d, tg, size)) {
        break;
      }
    }
  }
  restore_signals();
  g_d = nullptr;
  d->cur = nullptr;
  for (int i = 0; i < d->n_regions; ++i) {
    Region& r = d->regions[i];
    if (r.all_bits) {
      const uint64_t words = (r.hi - r.lo + 63) / 64 + 1;
      uint64_t u = 0, w = 0;
      for (uint64_t k = 0; k < words; ++k) {
        u += __builtin_popcountll(r.all_bits[k]);
        w += __builtin_popcountll(r.w_bits[k]);
      }
      L->counters[r.slot].unique_read = u;
      L->counters[r.slot].unique_written = w;
    }
    free(r.tg_bits);
    free(r.all_bits);
    free(r.w_bits);
    free(r.touched);
  }
  free(d->shadow);
  free(d->sg_ep);
  munmap(d->arena, d->arena_size);
  d->arena = nullptr;
  return L->error;
}

// ---------------------------------------------------------------------------------------
// Called by the shim.
extern "C" {

void mh_access(const void* p, uint64_t n, uint32_t flags) { access(uintptr_t(p), n, flags); }

void mh_barrier(int tg, const void* site) {
  Dispatch* d = g_d;
  if (!d || !d->cur) {
    return;
  }
  d->cur->site = site;
  d->cur->barrier_tg = tg;
  block(BARRIER);
}

void mh_collective(mh_coll_fn fn, const void* in, void* out, uint32_t arg, const void* site) {
  Dispatch* d = g_d;
  if (!d || !d->cur) {
    mh_coll_lane l = {0, arg, in, out};
    fn(&l, 1);
    return;
  }
  Fiber* f = d->cur;
  f->cfn = fn;
  f->cin = in;
  f->cout = out;
  f->carg = arg;
  f->site = site;
  block(SIMD);
}

void* mh_tg_static(uint32_t id, uint64_t size, uint64_t align) {
  Dispatch* d = g_d;
  if (!d) {
    return nullptr;
  }
  for (int i = 0; i < d->n_statics; ++i) {
    if (d->statics[i].id == id) {
      return (void*)d->statics[i].lo;
    }
  }
  if (d->n_statics == 64) {
    fail(MH_BAD_LAUNCH, -1, "%s: more than 64 kernel-scope threadgroup arrays", d->L->kernel_name);
    return nullptr;
  }
  uint64_t off = round_up(d->arena_used + 256, align < 16 ? 16 : align);
  if (off + size + 256 > d->arena_size) {
    fail(MH_BAD_LAUNCH, -1, "%s: kernel-scope threadgroup arrays exceed the harness's 512 KiB",
         d->L->kernel_name);
    return nullptr;
  }
  TgAlloc& a = d->statics[d->n_statics++];
  a.id = id;
  a.lo = uintptr_t(d->arena) + off;
  a.hi = a.lo + size;
  memset((void*)a.lo, 0xff, size);
  d->arena_used = off + size;
  return (void*)a.lo;
}

void mh_atomic_yield(int progress) {
  Dispatch* d = g_d;
  if (!d || !d->cur) {
    return;
  }
  if (progress) {
    d->progress++;
    return;
  }
  block(YIELD);
}

uint32_t mh_lane(void) {
  Dispatch* d = g_d;
  return d && d->cur ? d->cur->ids.tiisg : 0;
}

// AddressSanitizer callbacks (the kernels are compiled with
// -fsanitize=address -mllvm -asan-instrumentation-with-call-threshold=0).
#define MH_ASAN_SIZED(N)                                                          \
  void __asan_load##N(uintptr_t a) { access(a, N, MH_READ); }                     \
  void __asan_store##N(uintptr_t a) { access(a, N, MH_WRITE); }                   \
  void __asan_load##N##_noabort(uintptr_t a) { access(a, N, MH_READ); }           \
  void __asan_store##N##_noabort(uintptr_t a) { access(a, N, MH_WRITE); }
MH_ASAN_SIZED(1)
MH_ASAN_SIZED(2)
MH_ASAN_SIZED(4)
MH_ASAN_SIZED(8)
MH_ASAN_SIZED(16)
void __asan_loadN(uintptr_t a, uintptr_t n) { access(a, n, MH_READ); }
void __asan_storeN(uintptr_t a, uintptr_t n) { access(a, n, MH_WRITE); }
void __asan_loadN_noabort(uintptr_t a, uintptr_t n) { access(a, n, MH_READ); }
void __asan_storeN_noabort(uintptr_t a, uintptr_t n) { access(a, n, MH_WRITE); }
void* __asan_memcpy(void* dst, const void* src, uintptr_t n) {
  access(uintptr_t(src), n, MH_READ);
  access(uintptr_t(dst), n, MH_WRITE);
  return memcpy(dst, src, n);
}
void* __asan_memmove(void* dst, const void* src, uintptr_t n) {
  access(uintptr_t(src), n, MH_READ);
  access(uintptr_t(dst), n, MH_WRITE);
  return memmove(dst, src, n);
}
void* __asan_memset(void* dst, int c, uintptr_t n) {
  access(uintptr_t(dst), n, MH_WRITE);
  return memset(dst, c, n);
}
// float -> bfloat16, round to nearest even (NaN stays a quiet NaN): the conversion Metal's
// bfloat(float) performs. clang calls it for __bf16 casts; zig's compiler-rt lacks it.
__attribute__((visibility("default"))) __bf16 __truncsfbf2(float x) {
  uint32_t u;
  memcpy(&u, &x, 4);
  uint16_t h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h = uint16_t((u >> 16) | 0x40u);
  } else {
    h = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  __bf16 r;
  memcpy(&r, &h, 2);
  return r;
}

void __asan_init(void) {}
void __asan_version_mismatch_check_v8(void) {}
void __asan_handle_no_return(void) {}
void __asan_register_globals(void*, uintptr_t) {}
void __asan_unregister_globals(void*, uintptr_t) {}
void __asan_register_elf_globals(void*, void*, void*) {}
void __asan_unregister_elf_globals(void*, void*, void*) {}
void __asan_before_dynamic_init(const char*) {}
void __asan_after_dynamic_init(void) {}

}  // extern "C"
