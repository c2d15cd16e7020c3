#include "bucket.h"
#include "cpu/util.h"

namespace mlx_moe {

void Bucket::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& ids = inputs[0];
  for (auto& o : outputs) cpu::allocate(o);
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(ids);
  for (auto& o : outputs) enc.set_output_array(o);
  enc.dispatch([src = ids.data<void>(), dt = ids.dtype(), P = int64_t(ids.size()),
                E = num_experts_, tile = tile_, counts = outputs[0].data<uint32_t>(),
                offsets = outputs[1].data<uint32_t>(), pairs = outputs[2].data<uint32_t>(),
                dispatch = outputs[3].data<uint32_t>()]() {
    cpu::check_ids(src, dt, P, E, "ids");
    std::fill(counts, counts + E, 0u);
    for (int64_t i = 0; i < P; ++i) counts[cpu::load_index(src, dt, i)]++;
    offsets[0] = 0;
    uint64_t tiles = 0;
    for (int e = 0; e < E; ++e) {
      offsets[e + 1] = offsets[e] + counts[e];
      tiles += (uint64_t(counts[e]) + tile - 1) / tile;
    }
    // Stable counting sort: ascending pair order inside each expert.
    std::vector<uint32_t> cursor(offsets, offsets + E);
    for (int64_t i = 0; i < P; ++i) pairs[cursor[cpu::load_index(src, dt, i)]++] = uint32_t(i);
    dispatch[0] = uint32_t(std::max<uint64_t>(1, tiles));
    dispatch[1] = 1;
    dispatch[2] = 1;
    dispatch[3] = 0;  // out-of-range ids raised above
  });
}

}  // namespace mlx_moe
