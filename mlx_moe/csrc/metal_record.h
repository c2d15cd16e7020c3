// The Metal host logic (metal/encode.h) run against a recorder instead of a GPU: the list of
// commands a primitive's eval_gpu would encode. Compiled in every build, so Linux CI replays
// the real host logic with the real kernels in the Metal harness (mlx_moe/testing/metal).
#pragma once
#include <map>
#include <string>
#include <vector>

#include "common.h"

namespace mlx_moe::metal_record {

struct Binding {
  int slot = 0;
  int handle = -1;      // array handle (see Recording::arrays), -1 for set_bytes
  int64_t offset = 0;   // byte offset into the array
  bool output = false;
  std::string bytes;    // set_bytes payload
};

struct Command {
  std::string kernel;
  std::vector<uint32_t> constants;  // uint function constants 0, 1, ...
  std::vector<Binding> buffers;
  std::map<int, uint64_t> tg_memory;
  uint32_t groups[3] = {1, 1, 1};
  uint32_t threads[3] = {1, 1, 1};
  int indirect = -1;  // handle of the indirect-argument array
  int64_t indirect_offset = 0;
};

struct ArrayInfo {
  std::string kind;  // "input" | "output" | "temp"
  int index = 0;
  mx::Shape shape;
  mx::Dtype dtype = mx::float32;
};

struct Recording {
  std::vector<ArrayInfo> arrays;
  std::vector<Command> commands;
  std::vector<mx::array> inputs, outputs;
};

// Records what eval_gpu of `out`'s primitive would encode (out: an unevaluated output of
// mlx_moe.route / bucket / dequantize / moe_mlp). device_fence: what the encoder reports for a
// metallib built with Metal's device-scope fences (MSL >= 3.2; see encode.h).
Recording record(const mx::array& out, bool device_fence = true);

}  // namespace mlx_moe::metal_record
