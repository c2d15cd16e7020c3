// Portability layer for the format math shared by the CPU (C++), Metal and CUDA code.
// Every header in kernels/common/ compiles unchanged as C++20, Metal Shading Language
// and CUDA C++: functions are written on values (never on address-space-qualified
// pointers), and the few primitives that differ between languages live here.
#pragma once

#if defined(__METAL_VERSION__)
#include <metal_stdlib>
#define MOE_FN inline
#define MOE_CONSTANT constant
#define MOE_METAL 1
#elif defined(__CUDACC__)
#include <cstdint>
#include <cstring>
#define MOE_FN __host__ __device__ __forceinline__
#define MOE_CONSTANT constexpr
#define MOE_CUDA 1
#else
#include <cstdint>
#include <cstring>
#define MOE_FN inline
#define MOE_CONSTANT constexpr
#define MOE_HOST 1
#endif

// Reinterpret the bits of a 32-bit word as an IEEE-754 binary32.
MOE_FN float moe_bits_to_float(uint32_t u) {
#if defined(MOE_METAL)
  return as_type<float>(u);
#elif defined(MOE_CUDA) && defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// a * b + c with one rounding (IEEE fused multiply-add) on every backend, so that formats
// whose value is a multiply-add (affine) decode to the same bits everywhere, whatever a
// compiler's contraction settings are.
MOE_FN float moe_fma(float a, float b, float c) {
#if defined(MOE_METAL)
  return metal::fma(a, b, c);
#elif defined(MOE_CUDA) && defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}
