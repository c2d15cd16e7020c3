// Metal harness: a C++20 stand-in for <metal_stdlib>, for the subset of the Metal Shading
// Language our kernels use (docs/METAL_HARNESS.md lists it). The harness preprocesses a
// .metal file with an empty <metal_stdlib>, rewrites the few constructs C++ cannot express
// (attributes, kernel-scope threadgroup arrays, function constants) and compiles the result
// with this header force-included.
//
// Address spaces are erased (device/threadgroup/thread -> nothing, constant -> const): the
// runtime tells them apart by address (buffers and the threadgroup arena are its own
// allocations). Everything that synchronises (barriers, simd-group functions) calls into the
// runtime, which schedules the threads of a threadgroup as fibers.
#pragma once
#include <float.h>
#include <stddef.h>
#include <stdint.h>

#include <type_traits>

#include "mh_runtime.h"

#define device
#define thread
#define threadgroup
#define constant const
#define threadgroup_imageblock

// Synchronising functions are `convergent` (as in OpenCL/CUDA): the optimiser may not hoist
// or merge a call out of divergent control flow, so each call site stays a distinct barrier.
#define MH_NOSAN __attribute__((no_sanitize("address"), noinline, convergent))
// Which call a thread waits at. The harness rewrites every barrier / simd-group call in the
// kernel source to pass a per-call-site id (the optimiser may duplicate a call instruction,
// e.g. into both exits of a rotated loop, so return addresses would split one barrier in two).
struct mh_site_t {
  unsigned id = 0;
};
#define MH_SITE (site.id ? (const void*)(uintptr_t)site.id : __builtin_return_address(0))

#ifndef INFINITY
#define INFINITY __builtin_inff()
#endif
#ifndef NAN
#define NAN __builtin_nanf("")
#endif
#ifndef HUGE_VALF
#define HUGE_VALF __builtin_huge_valf()
#endif
#ifndef MAXFLOAT
#define MAXFLOAT FLT_MAX
#endif
#define M_PI_F 3.14159265358979323846264338327950288f
#define M_LOG2E_F 1.4426950408889634f
#define M_LN2_F 0.6931471805599453f

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;
typedef __bf16 bfloat;

#define MH_VEC(T, name)                                         \
  typedef T name##2 __attribute__((ext_vector_type(2)));        \
  typedef T name##3 __attribute__((ext_vector_type(3)));        \
  typedef T name##4 __attribute__((ext_vector_type(4)));
MH_VEC(float, float)
MH_VEC(half, half)
MH_VEC(bfloat, bfloat)
MH_VEC(int, int)
MH_VEC(uint, uint)
MH_VEC(short, short)
MH_VEC(ushort, ushort)
MH_VEC(char, char)
MH_VEC(uchar, uchar)
MH_VEC(long, long)
MH_VEC(ulong, ulong)
#undef MH_VEC

// Packed vectors: element-aligned, no padding (packed_float3 is 12 bytes).
template <class T, int N>
struct mh_packed {
  T v[N];
  T& operator[](int i) { return v[i]; }
  const T& operator[](int i) const { return v[i]; }
};
typedef mh_packed<float, 2> packed_float2;
typedef mh_packed<float, 3> packed_float3;
typedef mh_packed<float, 4> packed_float4;
typedef mh_packed<half, 2> packed_half2;
typedef mh_packed<half, 3> packed_half3;
typedef mh_packed<half, 4> packed_half4;
typedef mh_packed<uint, 2> packed_uint2;
typedef mh_packed<uint, 3> packed_uint3;
typedef mh_packed<uint, 4> packed_uint4;

namespace mh {
template <class T>
struct id {
  typedef T type;
};
// Built-in attribute value (uint, ushort, uint2, uint3, ...) from three 32-bit components.
template <class T>
inline T cvt(const uint32_t* v) {
  if constexpr (std::is_arithmetic_v<T>) {
    return T(v[0]);
  } else {
    T r;
    using E = std::remove_cvref_t<decltype(r[0])>;
    for (int i = 0; i < int(__builtin_vectorelements(T)); ++i) {
      r[i] = E(v[i]);
    }
    return r;
  }
}
template <class T>
struct is_vec : std::false_type {};
template <class T>
  requires requires { __builtin_vectorelements(T); }
struct is_vec<T> : std::true_type {};

// Metal's vector constructors: floatN(scalar) splats, floatN(a, b, ...) concatenates scalars
// and vectors, floatN(other vector) converts. The harness rewrites `floatN(` into make<floatN>(.
template <class V, class... A>
inline V make(A... a) {
  V r;
  using E = std::remove_cvref_t<decltype(r[0])>;
  constexpr int N = int(__builtin_vectorelements(V));
  if constexpr (sizeof...(A) == 1 && (!is_vec<A>::value && ...)) {
    for (int i = 0; i < N; ++i) r[i] = E(a...);
  } else {
    int i = 0;
    auto put = [&](auto x) {
      if constexpr (is_vec<decltype(x)>::value) {
        for (int j = 0; j < int(__builtin_vectorelements(decltype(x))); ++j) r[i++] = E(x[j]);
      } else {
        r[i++] = E(x);
      }
    };
    (put(a), ...);
  }
  return r;
}
}  // namespace mh

// as_type<T>(x) is an operator of the language (MSL 2.19): usable without `metal::`.
template <class T, class U>
inline T as_type(U u) {
  static_assert(sizeof(T) == sizeof(U), "as_type: sizes differ");
  return __builtin_bit_cast(T, u);
}

namespace metal {
using ::as_type;

// ---- math (float; half and bfloat compute in float) ---------------------------------------
#define MH_UNARY(name, fexpr)                                                  \
  inline float name(float x) { return fexpr; }                                 \
  inline half name(half x) { return half(name(float(x))); }                    \
  inline bfloat name(bfloat x) { return bfloat(name(float(x))); }
MH_UNARY(exp, __builtin_expf(x))
MH_UNARY(exp2, __builtin_exp2f(x))
MH_UNARY(log, __builtin_logf(x))
MH_UNARY(log2, __builtin_log2f(x))
MH_UNARY(sqrt, __builtin_sqrtf(x))
MH_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))
MH_UNARY(fabs, __builtin_fabsf(x))
MH_UNARY(floor, __builtin_floorf(x))
MH_UNARY(ceil, __builtin_ceilf(x))
MH_UNARY(round, __builtin_roundf(x))
MH_UNARY(rint, __builtin_rintf(x))
MH_UNARY(trunc, __builtin_truncf(x))
MH_UNARY(sin, __builtin_sinf(x))
MH_UNARY(cos, __builtin_cosf(x))
MH_UNARY(tanh, __builtin_tanhf(x))
MH_UNARY(erf, __builtin_erff(x))
#undef MH_UNARY
inline float pow(float x, float y) { return __builtin_powf(x, y); }
inline float fmod(float x, float y) { return __builtin_fmodf(x, y); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline half fma(half a, half b, half c) { return half(__builtin_fmaf(float(a), float(b), float(c))); }
inline float copysign(float a, float b) { return __builtin_copysignf(a, b); }

template <class T>
inline bool isnan(T x) { return __builtin_isnan(float(x)); }
template <class T>
inline bool isinf(T x) { return __builtin_isinf(float(x)); }
template <class T>
inline bool isfinite(T x) { return __builtin_isfinite(float(x)); }
template <class T>
inline bool signbit(T x) { return __builtin_signbit(float(x)); }

// max/min: Metal's float max/min are fmax/fmin (a NaN operand yields the other one).
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline float fmax(float a, float b) { return __builtin_fmaxf(a, b); }
inline float fmin(float a, float b) { return __builtin_fminf(a, b); }
inline half max(half a, half b) { return half(__builtin_fmaxf(float(a), float(b))); }
inline half min(half a, half b) { return half(__builtin_fminf(float(a), float(b))); }
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
inline T max(T a, T b) { return a > b ? a : b; }
template <class T, class = std::enable_if_t<std::is_integral_v<T>>>
inline T min(T a, T b) { return a < b ? a : b; }
template <class T>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T>
inline T abs(T x) { return x < T(0) ? T(-x) : x; }
inline float abs(float x) { return __builtin_fabsf(x); }
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }

namespace precise {
inline float exp(float x) { return __builtin_expf(x); }
inline float exp2(float x) { return __builtin_exp2f(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float rsqrt(float x) { return 1.0f / __builtin_sqrtf(x); }
inline float tanh(float x) { return __builtin_tanhf(x); }
inline float divide(float a, float b) { return a / b; }
}  // namespace precise
// The harness computes fast:: math exactly (Apple's fast:: precision is not modelled).
namespace fast = precise;

// ---- synchronisation -----------------------------------------------------------------------
enum class mem_flags : uint {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(uint(a) | uint(b)); }

MH_NOSAN inline void threadgroup_barrier(mem_flags, mh_site_t site = {}) { mh_barrier(1, MH_SITE); }
MH_NOSAN inline void simdgroup_barrier(mem_flags, mh_site_t site = {}) { mh_barrier(0, MH_SITE); }

// ---- atomics -------------------------------------------------------------------------------
enum memory_order {
  memory_order_relaxed = 0,
  memory_order_acquire = 2,
  memory_order_release = 3,
  memory_order_acq_rel = 4,
  memory_order_seq_cst = 5,
};
enum thread_scope {
  thread_scope_thread = 0,
  thread_scope_threadgroup = 1,
  thread_scope_device = 2,
  thread_scope_simdgroup = 4,
};
// MSL 3.2. Threadgroups run one after another and the threads of one as fibers on one OS
// thread: every store is visible to every later load, so fences order nothing further here.
MH_NOSAN inline void atomic_thread_fence(mem_flags, memory_order, thread_scope = thread_scope_device) {}
// MSL 3.2 `coherent(device)` buffers: coherent here already.
#define coherent(scope)
template <class T>
struct atomic {
  T __v;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
typedef atomic<ulong> atomic_ulong;

// All threads of a dispatch run on one OS thread, one at a time: plain loads and stores are
// atomic here. Loads yield to the other threads, so that spin-waits make progress.
template <class T>
MH_NOSAN void atomic_store_explicit(atomic<T>* a, typename mh::id<T>::type v, memory_order) {
  mh_access(&a->__v, sizeof(T), MH_WRITE | MH_ATOMIC);
  a->__v = v;
  mh_atomic_yield(1);
}
template <class T>
MH_NOSAN T atomic_load_explicit(atomic<T>* a, memory_order) {
  mh_access(&a->__v, sizeof(T), MH_READ | MH_ATOMIC);
  T v = a->__v;
  mh_atomic_yield(0);
  return v;
}
#define MH_ATOMIC_RMW(name, expr)                                                           \
  template <class T>                                                                        \
  MH_NOSAN T name(atomic<T>* a, typename mh::id<T>::type v, memory_order) {                 \
    mh_access(&a->__v, sizeof(T), MH_READ | MH_WRITE | MH_ATOMIC);                          \
    T old = a->__v;                                                                         \
    a->__v = (expr);                                                                        \
    mh_atomic_yield(1);                                                                     \
    return old;                                                                             \
  }
MH_ATOMIC_RMW(atomic_fetch_add_explicit, T(old + v))
MH_ATOMIC_RMW(atomic_fetch_sub_explicit, T(old - v))
MH_ATOMIC_RMW(atomic_fetch_min_explicit, (v < old ? v : old))
MH_ATOMIC_RMW(atomic_fetch_max_explicit, (v > old ? v : old))
MH_ATOMIC_RMW(atomic_fetch_and_explicit, T(old & v))
MH_ATOMIC_RMW(atomic_fetch_or_explicit, T(old | v))
MH_ATOMIC_RMW(atomic_fetch_xor_explicit, T(old ^ v))
MH_ATOMIC_RMW(atomic_exchange_explicit, v)
#undef MH_ATOMIC_RMW
template <class T>
MH_NOSAN bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected,
                                                    typename mh::id<T>::type desired,
                                                    memory_order, memory_order) {
  mh_access(&a->__v, sizeof(T), MH_READ | MH_WRITE | MH_ATOMIC);
  mh_access(expected, sizeof(T), MH_READ | MH_WRITE);
  bool ok = __builtin_memcmp(&a->__v, expected, sizeof(T)) == 0;
  if (ok) {
    a->__v = desired;
  } else {
    *expected = a->__v;
  }
  mh_atomic_yield(ok ? 1 : 0);
  return ok;
}
template <class T>
MH_NOSAN bool atomic_compare_exchange_strong_explicit(atomic<T>* a, T* expected,
                                                      typename mh::id<T>::type desired,
                                                      memory_order s, memory_order f) {
  return atomic_compare_exchange_weak_explicit(a, expected, desired, s, f);
}

// ---- simd-group functions --------------------------------------------------------------------
// A collective's participants are the active lanes that reach the same call (the runtime
// decides); the functions below compute the results from the lanes' operands.
enum mh_simd_op {
  MH_SUM, MH_PRODUCT, MH_MAX, MH_MIN, MH_AND, MH_OR, MH_XOR, MH_SHUFFLE, MH_SHUFFLE_XOR,
  MH_SHUFFLE_UP, MH_SHUFFLE_DOWN, MH_ROTATE_UP, MH_ROTATE_DOWN, MH_BROADCAST,
  MH_BROADCAST_FIRST, MH_PREFIX_EXCL_SUM, MH_PREFIX_INCL_SUM, MH_PREFIX_EXCL_PRODUCT,
  MH_PREFIX_INCL_PRODUCT, MH_ALL, MH_ANY, MH_BALLOT, MH_IS_FIRST,
};

template <class T>
inline T mh_poison() {
  T r;
  __builtin_memset(&r, 0xff, sizeof(T));  // NaN for floats, all ones for integers
  return r;
}

template <class T, int OP>
MH_NOSAN void mh_simd_resolve(const mh_coll_lane* l, uint32_t n) {
  const T* by_lane[MH_SIMD_WIDTH] = {};
  for (uint32_t i = 0; i < n; ++i) {
    by_lane[l[i].lane] = (const T*)l[i].in;
  }
  if constexpr (OP == MH_SUM || OP == MH_PRODUCT || OP == MH_MAX || OP == MH_MIN ||
                OP == MH_AND || OP == MH_OR || OP == MH_XOR || OP == MH_ALL || OP == MH_ANY) {
    T acc = *(const T*)l[0].in;
    for (uint32_t i = 1; i < n; ++i) {
      const T v = *(const T*)l[i].in;
      if constexpr (OP == MH_SUM) acc = T(acc + v);
      if constexpr (OP == MH_PRODUCT) acc = T(acc * v);
      if constexpr (OP == MH_MAX) acc = max(acc, v);
      if constexpr (OP == MH_MIN) acc = min(acc, v);
      if constexpr (OP == MH_AND) acc = T(acc & v);
      if constexpr (OP == MH_OR) acc = T(acc | v);
      if constexpr (OP == MH_XOR) acc = T(acc ^ v);
      if constexpr (OP == MH_ALL) acc = acc && v;
      if constexpr (OP == MH_ANY) acc = acc || v;
    }
    for (uint32_t i = 0; i < n; ++i) {
      *(T*)l[i].out = acc;
    }
  } else if constexpr (OP == MH_PREFIX_EXCL_SUM || OP == MH_PREFIX_INCL_SUM ||
                       OP == MH_PREFIX_EXCL_PRODUCT || OP == MH_PREFIX_INCL_PRODUCT) {
    constexpr bool sum = OP == MH_PREFIX_EXCL_SUM || OP == MH_PREFIX_INCL_SUM;
    constexpr bool incl = OP == MH_PREFIX_INCL_SUM || OP == MH_PREFIX_INCL_PRODUCT;
    T acc = sum ? T(0) : T(1);
    for (uint32_t i = 0; i < n; ++i) {
      const T v = *(const T*)l[i].in;
      if (!incl) *(T*)l[i].out = acc;
      acc = sum ? T(acc + v) : T(acc * v);
      if (incl) *(T*)l[i].out = acc;
    }
  } else if constexpr (OP == MH_BALLOT) {
    uint64_t mask = 0;
    for (uint32_t i = 0; i < n; ++i) {
      if (*(const bool*)l[i].in) mask |= 1ull << l[i].lane;
    }
    for (uint32_t i = 0; i < n; ++i) {
      *(uint64_t*)l[i].out = mask;
    }
  } else if constexpr (OP == MH_IS_FIRST) {
    for (uint32_t i = 0; i < n; ++i) {
      *(bool*)l[i].out = i == 0;
    }
  } else {
    for (uint32_t i = 0; i < n; ++i) {
      const int lane = int(l[i].lane), a = int(l[i].arg);
      int src = lane;
      bool keep = false;  // shuffle_up/down past the edge: the lane keeps its value
      if constexpr (OP == MH_SHUFFLE || OP == MH_BROADCAST) src = a;
      if constexpr (OP == MH_BROADCAST_FIRST) src = int(l[0].lane);
      if constexpr (OP == MH_SHUFFLE_XOR) src = lane ^ a;
      if constexpr (OP == MH_SHUFFLE_UP) { src = lane - a; keep = src < 0; }
      if constexpr (OP == MH_SHUFFLE_DOWN) { src = lane + a; keep = src >= MH_SIMD_WIDTH; }
      if constexpr (OP == MH_ROTATE_UP) src = (lane - a) & (MH_SIMD_WIDTH - 1);
      if constexpr (OP == MH_ROTATE_DOWN) src = (lane + a) & (MH_SIMD_WIDTH - 1);
      if (keep) {
        *(T*)l[i].out = *(const T*)l[i].in;
      } else if (src >= 0 && src < MH_SIMD_WIDTH && by_lane[src]) {
        *(T*)l[i].out = *by_lane[src];
      } else {
        *(T*)l[i].out = mh_poison<T>();  // an inactive or nonexistent source lane: undefined
      }
    }
  }
}

#define MH_SIMD1(name, OP)                                                          \
  template <class T>                                                                \
  MH_NOSAN T name(T x, mh_site_t site = {}) {                                      \
    T r;                                                                            \
    mh_collective(&mh_simd_resolve<T, OP>, &x, &r, 0, MH_SITE);                     \
    return r;                                                                       \
  }
#define MH_SIMD2(name, OP, A)                                                       \
  template <class T>                                                                \
  MH_NOSAN T name(T x, A a, mh_site_t site = {}) {                                  \
    T r;                                                                            \
    mh_collective(&mh_simd_resolve<T, OP>, &x, &r, uint32_t(a), MH_SITE);           \
    return r;                                                                       \
  }
MH_SIMD1(simd_sum, MH_SUM)
MH_SIMD1(simd_product, MH_PRODUCT)
MH_SIMD1(simd_max, MH_MAX)
MH_SIMD1(simd_min, MH_MIN)
MH_SIMD1(simd_and, MH_AND)
MH_SIMD1(simd_or, MH_OR)
MH_SIMD1(simd_xor, MH_XOR)
MH_SIMD1(simd_broadcast_first, MH_BROADCAST_FIRST)
MH_SIMD1(simd_prefix_exclusive_sum, MH_PREFIX_EXCL_SUM)
MH_SIMD1(simd_prefix_inclusive_sum, MH_PREFIX_INCL_SUM)
MH_SIMD1(simd_prefix_exclusive_product, MH_PREFIX_EXCL_PRODUCT)
MH_SIMD1(simd_prefix_inclusive_product, MH_PREFIX_INCL_PRODUCT)
MH_SIMD2(simd_shuffle, MH_SHUFFLE, ushort)
MH_SIMD2(simd_shuffle_xor, MH_SHUFFLE_XOR, ushort)
MH_SIMD2(simd_shuffle_up, MH_SHUFFLE_UP, ushort)
MH_SIMD2(simd_shuffle_down, MH_SHUFFLE_DOWN, ushort)
MH_SIMD2(simd_shuffle_rotate_up, MH_ROTATE_UP, ushort)
MH_SIMD2(simd_shuffle_rotate_down, MH_ROTATE_DOWN, ushort)
MH_SIMD2(simd_broadcast, MH_BROADCAST, ushort)
#undef MH_SIMD1
#undef MH_SIMD2

MH_NOSAN inline bool simd_all(bool x, mh_site_t site = {}) {
  bool r;
  mh_collective(&mh_simd_resolve<bool, MH_ALL>, &x, &r, 0, MH_SITE);
  return r;
}
MH_NOSAN inline bool simd_any(bool x, mh_site_t site = {}) {
  bool r;
  mh_collective(&mh_simd_resolve<bool, MH_ANY>, &x, &r, 0, MH_SITE);
  return r;
}
struct simd_vote {
  typedef uint64_t vote_t;
  uint64_t v;
  explicit operator uint64_t() const { return v; }
  bool all() const { return false; }
  bool any() const { return v != 0; }
};
MH_NOSAN inline simd_vote simd_ballot(bool x, mh_site_t site = {}) {
  uint64_t r;
  mh_collective(&mh_simd_resolve<bool, MH_BALLOT>, &x, &r, 0, MH_SITE);
  return simd_vote{r};
}
MH_NOSAN inline simd_vote simd_active_threads_mask(mh_site_t site = {}) {
  bool x = true;
  uint64_t r;
  mh_collective(&mh_simd_resolve<bool, MH_BALLOT>, &x, &r, 0, MH_SITE);
  return simd_vote{r};
}
MH_NOSAN inline bool simd_is_first(mh_site_t site = {}) {
  bool x = true, r;
  mh_collective(&mh_simd_resolve<bool, MH_IS_FIRST>, &x, &r, 0, MH_SITE);
  return r;
}

// ---- simdgroup_matrix ------------------------------------------------------------------------
// Every lane holds the whole matrix (the hardware spreads it over the 32 lanes; the results
// are the same). Loads and stores are simd-group-wide operations: each touches the matrix's
// elements once per simdgroup in the byte counters (lane 0 counts; every lane is checked),
// and only lane 0 performs a store.
template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  T e[Rows * Cols];
  simdgroup_matrix() = default;
  // Metal: a diagonal matrix with the given value on the diagonal (zero elsewhere).
  simdgroup_matrix(T dval) {
    for (int r = 0; r < Rows; ++r)
      for (int c = 0; c < Cols; ++c) e[r * Cols + c] = (r == c) ? dval : T(0);
  }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int C, int R>
inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, C, R> m;
  for (int i = 0; i < R * C; ++i) m.e[i] = v;
  return m;
}

template <class T, int C, int R>
MH_NOSAN void simdgroup_load(simdgroup_matrix<T, C, R>& m, const T* src,
                             ulong elements_per_row = C, ulong2 origin = ulong2(0),
                             bool transpose = false) {
  const uint32_t count = mh_lane() == 0 ? 0 : MH_NOCOUNT;
  src += origin.y * elements_per_row + origin.x;
  if (!transpose) {
    for (int r = 0; r < R; ++r) {
      mh_access(src + r * elements_per_row, sizeof(T) * C, MH_READ | count);
      for (int c = 0; c < C; ++c) m.e[r * C + c] = src[r * elements_per_row + c];
    }
  } else {
    for (int c = 0; c < C; ++c) {
      mh_access(src + c * elements_per_row, sizeof(T) * R, MH_READ | count);
      for (int r = 0; r < R; ++r) m.e[r * C + c] = src[c * elements_per_row + r];
    }
  }
}

template <class T, int C, int R>
MH_NOSAN void simdgroup_store(const simdgroup_matrix<T, C, R>& m, T* dst,
                              ulong elements_per_row = C, ulong2 origin = ulong2(0),
                              bool transpose = false) {
  if (mh_lane() != 0) {
    return;
  }
  dst += origin.y * elements_per_row + origin.x;
  if (!transpose) {
    for (int r = 0; r < R; ++r) {
      mh_access(dst + r * elements_per_row, sizeof(T) * C, MH_WRITE);
      for (int c = 0; c < C; ++c) dst[r * elements_per_row + c] = m.e[r * C + c];
    }
  } else {
    for (int c = 0; c < C; ++c) {
      mh_access(dst + c * elements_per_row, sizeof(T) * R, MH_WRITE);
      for (int r = 0; r < R; ++r) dst[c * elements_per_row + r] = m.e[r * C + c];
    }
  }
}

// d = a * b + c, accumulated in float (k in order), rounded once to the destination type.
template <class T, class U, class V, class W, int M, int N, int K>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, N, M>& d,
                                          const simdgroup_matrix<U, K, M>& a,
                                          const simdgroup_matrix<V, N, K>& b,
                                          const simdgroup_matrix<W, N, M>& c) {
  simdgroup_matrix<T, N, M> out;
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float acc = float(c.e[i * N + j]);
      for (int k = 0; k < K; ++k) {
        acc = __builtin_fmaf(float(a.e[i * K + k]), float(b.e[k * N + j]), acc);
      }
      out.e[i * N + j] = T(acc);
    }
  }
  d = out;
}
template <class T, class U, class V, int M, int N, int K>
inline void simdgroup_multiply(simdgroup_matrix<T, N, M>& d, const simdgroup_matrix<U, K, M>& a,
                               const simdgroup_matrix<V, N, K>& b) {
  simdgroup_multiply_accumulate(d, a, b, simdgroup_matrix<T, N, M>(T(0)));
}

}  // namespace metal
