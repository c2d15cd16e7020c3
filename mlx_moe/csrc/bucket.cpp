#include "bucket.h"

#include "backends.h"

namespace mlx_moe {

std::vector<mx::array> bucket(const mx::array& ids, int num_experts, int tile,
                              mx::StreamOrDevice s) {
  if (!is_integer(ids.dtype())) {
    throw TypeError("ids must be an integer array, got " + dtype_str(ids.dtype()));
  }
  if (num_experts < 1) {
    throw std::invalid_argument("num_experts must be >= 1, got " + std::to_string(num_experts));
  }
  if (tile < 1) {
    throw std::invalid_argument("tile must be >= 1, got " + std::to_string(tile));
  }
  if (ids.size() > size_t(UINT32_MAX)) {
    throw std::invalid_argument("ids has more than 2^32 - 1 pairs");
  }
  auto stream = mx::to_stream(s);
  check_ids_if_available(ids, num_experts, "ids", stream);
  const int P = int(ids.size());
  // Kernels read uint32, int32 or int64 ids; other integer dtypes are widened.
  mx::array id = supported_id_dtype(ids.dtype()) ? ids : mx::astype(ids, mx::int64, stream);
  return mx::array::make_arrays(
      {{num_experts}, {num_experts + 1}, {P}, {4}},
      {mx::uint32, mx::uint32, mx::uint32, mx::uint32},
      std::make_shared<Bucket>(stream, num_experts, tile),
      {ensure_row_contiguous(mx::reshape(id, {P}, stream), stream)});
}

void Bucket::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  gpu::bucket(*this, inputs, outputs);
}

}  // namespace mlx_moe
