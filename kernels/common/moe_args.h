// Argument structs shared by the host dispatch code and the kernels (one definition, so
// host and kernel can never disagree on a field's offset). Plain 32-bit fields only:
// identical layout in C++, Metal and CUDA.
#pragma once
#include "common/defines.h"

// Most dimensions of a strided input that the CUDA evals copy to row-major themselves (the
// op builders wrap inputs of more dimensions in a Contiguous node).
#define MOE_STRIDED_MAX_DIMS 8

struct MoeRouteArgs {
  uint32_t rows;       // token rows
  uint32_t E;          // experts (logits per row)
  uint32_t k;          // experts per token
  uint32_t normalize;  // 1: divide the k weights by their sum (when positive)
};

struct MoeBucketArgs {
  uint32_t P;        // pairs (T * k)
  uint32_t E;        // experts
  uint32_t tile;     // rows per threadgroup of the grouped GEMM the dispatch sizes
  uint32_t chunk;    // pairs per bucketing threadgroup
  uint32_t nblocks;  // ceil(P / chunk)
  uint32_t grid_y;   // written to dispatch[1] (1 for the public op)
  uint32_t keep_dropped;  // 1 (moe_mlp): out-of-range pairs are listed after offsets[E], in
                          // pair order, and their tiles counted in dispatch[0]; 0 (public
                          // op): their slots are 0xffffffff
  uint32_t nzero;         // moe_bucket_finish zeroes this many words of its counters buffer
};

// One projection's format, as the kernels see it.
struct MoeWeightArgs {
  uint32_t N;           // rows (out features)
  uint32_t K;           // columns (in features)
  uint32_t bits;        // bits per code
  uint32_t group_size;  // codes per scale
  uint32_t row_bytes;   // bytes of one packed row
  uint32_t groups;      // scales per row
  uint32_t mode;        // 0 affine, 1 mxfp4, 2 trellis
  uint32_t flags;       // bit 0: FP4 quarter-subnormal decoder (opt-in); trellis: bit 1
                        // su present, bit 2 sv present, bit 3 one grid per expert
  uint32_t scale_kind;  // 0 float32, 1 float16, 2 bfloat16, 3 E8M0 (uint8)
  uint32_t grid_kind;   // trellis grid: 0 float32, 1 float16
  uint32_t sign_kind;   // trellis: su kind in bits 0..1, sv kind in bits 2..3 (as scale_kind)
};

struct MoeMlpArgs {
  uint32_t T;        // tokens
  uint32_t k;        // slots per token
  uint32_t D;        // model width
  uint32_t F;        // expert width
  uint32_t E;        // experts
  uint32_t fs;       // hidden units per slice
  uint32_t nslices;  // ceil(F / fs)
  MoeWeightArgs gate, up, down;
  uint32_t combine;  // 1: the MLP kernel combines slices and slots itself (Metal >= 3.2)
};

struct MoeDequantArgs {
  MoeWeightArgs w;
  uint32_t rows;  // matrices * N
};
