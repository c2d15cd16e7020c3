// Router: one simdgroup per token row. fp32 softmax over the E logits, then k rounds of a
// simdgroup arg-max (larger weight first, smaller expert id on ties), optional
// renormalisation. Semantics identical to the CPU path (docs/DESIGN.md, "Router").
#include <metal_stdlib>

#include "common/moe_args.h"

using namespace metal;

template <typename T>
[[kernel]] void moe_route(
    device const T* logits [[buffer(0)]],
    device uint* ids [[buffer(1)]],
    device float* weights [[buffer(2)]],
    constant MoeRouteArgs& args [[buffer(3)]],
    threadgroup float* wbuf [[threadgroup(0)]],
    uint tg [[threadgroup_position_in_grid]],
    uint tpt [[threads_per_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint nsg = tpt / 32;
  const uint row = tg * nsg + sg;
  if (row >= args.rows) {
    return;  // the whole simdgroup leaves together; no threadgroup barrier follows
  }
  const uint E = args.E, k = args.k;
  device const T* l = logits + size_t(row) * E;
  threadgroup float* w = wbuf + sg * E;
  device uint* out_ids = ids + size_t(row) * k;
  device float* out_w = weights + size_t(row) * k;

  float m = -INFINITY;
  bool has_nan = false;
  for (uint i = lane; i < E; i += 32) {
    float v = float(l[i]);
    has_nan = has_nan || isnan(v);
    m = isnan(v) ? m : max(m, v);
  }
  m = simd_max(m);
  has_nan = simd_any(has_nan);
  if (has_nan || m == -INFINITY) {
    for (uint j = lane; j < k; j += 32) {
      out_ids[j] = j;
      out_w[j] = has_nan ? NAN : 0.0f;
    }
    return;
  }
  // Each lane only ever touches the entries i == lane (mod 32) of w: no barrier needed.
  float s = 0.0f;
  for (uint i = lane; i < E; i += 32) {
    float v = float(l[i]);
    float p = (m == INFINITY) ? (v == INFINITY ? 1.0f : 0.0f) : precise::exp(v - m);
    w[i] = p;
    s += p;
  }
  s = simd_sum(s);
  for (uint i = lane; i < E; i += 32) {
    w[i] = w[i] / s;
  }
  float total = 0.0f;
  for (uint j = 0; j < k; ++j) {
    float bv = -1.0f;
    uint bi = 0xffffffffu;
    for (uint i = lane; i < E; i += 32) {
      float v = w[i];
      if (v > bv) {  // ascending i: the first (smallest id) of equal weights stays
        bv = v;
        bi = i;
      }
    }
    for (ushort off = 16; off > 0; off /= 2) {
      float ov = simd_shuffle_xor(bv, off);
      uint oi = simd_shuffle_xor(bi, off);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    if (lane == bi % 32) {
      w[bi] = -1.0f;  // taken: below every weight (weights are >= 0)
    }
    if (lane == 0) {
      out_ids[j] = bi;
      out_w[j] = bv;
    }
    total += bv;
  }
  if (args.normalize != 0 && total > 0.0f && lane == 0) {
    for (uint j = 0; j < k; ++j) {
      out_w[j] = out_w[j] / total;
    }
  }
}

#define MOE_INSTANTIATE_ROUTE(name, T)                                                     \
  template [[host_name("moe_route_" #name)]] [[kernel]] void moe_route<T>(                \
      device const T* logits [[buffer(0)]], device uint* ids [[buffer(1)]],              \
      device float* weights [[buffer(2)]], constant MoeRouteArgs& args [[buffer(3)]],    \
      threadgroup float* wbuf [[threadgroup(0)]], uint tg [[threadgroup_position_in_grid]], \
      uint tpt [[threads_per_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],  \
      uint lane [[thread_index_in_simdgroup]]);

MOE_INSTANTIATE_ROUTE(float32, float)
MOE_INSTANTIATE_ROUTE(float16, half)
MOE_INSTANTIATE_ROUTE(bfloat16, bfloat)
