#include "common.h"

#include "common/moe_args.h"
#include "mlx/backend/cuda/cuda.h"

#include <cstdlib>
#include <sstream>

namespace mlx_moe {

std::vector<mx::array> InferencePrimitive::jvp(const std::vector<mx::array>&,
                                               const std::vector<mx::array>&,
                                               const std::vector<int>&) {
  throw std::invalid_argument(std::string("mlx_moe.") + name() +
                              " is inference-only: it has no jvp (forward-mode derivative)");
}

std::vector<mx::array> InferencePrimitive::vjp(const std::vector<mx::array>&,
                                               const std::vector<mx::array>&,
                                               const std::vector<int>&,
                                               const std::vector<mx::array>&) {
  throw std::invalid_argument(std::string("mlx_moe.") + name() +
                              " is inference-only: it has no vjp (gradient)");
}

std::pair<std::vector<mx::array>, std::vector<int>> InferencePrimitive::vmap(
    const std::vector<mx::array>&, const std::vector<int>&) {
  throw std::invalid_argument(std::string("mlx_moe.") + name() +
                              " has no vmap: call it on the batched arrays directly");
}

std::string shape_str(const mx::Shape& s) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << "]";
  return os.str();
}

std::string dtype_str(mx::Dtype d) {
  switch (d) {
    case mx::bool_: return "bool";
    case mx::uint8: return "uint8";
    case mx::uint16: return "uint16";
    case mx::uint32: return "uint32";
    case mx::uint64: return "uint64";
    case mx::int8: return "int8";
    case mx::int16: return "int16";
    case mx::int32: return "int32";
    case mx::int64: return "int64";
    case mx::float16: return "float16";
    case mx::bfloat16: return "bfloat16";
    case mx::float32: return "float32";
    case mx::float64: return "float64";
    case mx::complex64: return "complex64";
  }
  return "unknown";
}

bool is_float(mx::Dtype d) {
  return d == mx::float16 || d == mx::bfloat16 || d == mx::float32;
}

bool is_integer(mx::Dtype d) {
  return mx::issubdtype(d, mx::integer);
}

void check_ids_if_available(const mx::array& ids, int num_experts, const std::string& what,
                            const mx::Stream& stream) {
  if (stream.device != mx::Device::cpu || ids.size() == 0) return;
  if (!ids.is_available() || !ids.flags().row_contiguous) return;
  const void* p = ids.data<void>();
  for (size_t i = 0; i < ids.size(); ++i) {
    int64_t e;
    switch (ids.dtype()) {
      case mx::uint8: e = static_cast<const uint8_t*>(p)[i]; break;
      case mx::uint16: e = static_cast<const uint16_t*>(p)[i]; break;
      case mx::uint32: e = static_cast<const uint32_t*>(p)[i]; break;
      case mx::uint64: e = int64_t(std::min<uint64_t>(static_cast<const uint64_t*>(p)[i], INT64_MAX)); break;
      case mx::int8: e = static_cast<const int8_t*>(p)[i]; break;
      case mx::int16: e = static_cast<const int16_t*>(p)[i]; break;
      case mx::int32: e = static_cast<const int32_t*>(p)[i]; break;
      case mx::int64: e = static_cast<const int64_t*>(p)[i]; break;
      default: return;
    }
    if (e < 0 || e >= num_experts) {
      throw std::invalid_argument(what + ": expert id " + std::to_string(e) + " at flat position " +
                                  std::to_string(i) + " is out of range [0, " +
                                  std::to_string(num_experts) + ")");
    }
  }
}

bool env_flag(const char* name, bool dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::string(v) != "0" : dflt;
}

mx::array ensure_row_contiguous(const mx::array& a, mx::StreamOrDevice s) {
  // A Contiguous node costs a graph node's host work at every evaluation even when it copies
  // nothing (~5 us on the H100 machine's host), and the weights pass through here at every
  // call: arrays whose layout is already known are passed as they are.
  //  - evaluated (the weights, usually): their flags say it;
  //  - outputs of our own primitives: every backend allocates them fresh, row-major.
  if (a.status() != mx::array::Status::unscheduled && a.flags().row_contiguous) return a;
  if (a.status() == mx::array::Status::unscheduled && a.has_primitive() &&
      dynamic_cast<const InferencePrimitive*>(&a.primitive()) != nullptr) {
    return a;
  }
  //  - CUDA streams: the eval copies an input whose layout at evaluation is not row-major
  //    (csrc/cuda: row_major_inputs, a copy kernel node only then), so the common case (an
  //    unevaluated, row-major activation or router logits) costs no node.
  const mx::Stream stream = mx::to_stream(s);
  if (stream.device.type == mx::Device::gpu && mx::cu::is_available() &&
      a.ndim() <= MOE_STRIDED_MAX_DIMS) {
    return a;
  }
  return mx::contiguous(a, /*allow_col_major=*/false, s);
}

std::string Format::describe() const {
  std::ostringstream os;
  switch (mode) {
    case Mode::Affine: os << "affine " << bits << "-bit, group_size " << group_size; break;
    case Mode::MxFp4: os << "mxfp4, group_size " << group_size; break;
    case Mode::Trellis: os << "trellis " << bits << "-bit, group_size " << group_size; break;
  }
  return os.str();
}

Format make_format(const std::string& mode, int bits, int group_size, bool has_su, bool has_sv,
                   bool fp4_quarter_subnormal) {
  Format f;
  f.bits = bits;
  f.group_size = group_size;
  f.has_su = has_su;
  f.has_sv = has_sv;
  f.fp4_quarter_subnormal = fp4_quarter_subnormal;
  if (mode == "affine") {
    f.mode = Mode::Affine;
    if (bits != 2 && bits != 3 && bits != 4 && bits != 5 && bits != 6 && bits != 8) {
      throw std::invalid_argument("bits must be one of 2, 3, 4, 5, 6, 8 for affine weights, got " +
                                  std::to_string(bits));
    }
    if (group_size <= 0 || group_size % 32 != 0) {
      throw std::invalid_argument(
          "group_size must be a positive multiple of 32 for affine weights (MLX uses 32, 64, "
          "128), got " + std::to_string(group_size));
    }
  } else if (mode == "mxfp4") {
    f.mode = Mode::MxFp4;
    if (bits != 4) {
      throw std::invalid_argument("bits must be 4 for mxfp4 weights, got " + std::to_string(bits));
    }
    if (group_size != 32) {
      throw std::invalid_argument("group_size must be 32 for mxfp4 weights, got " +
                                  std::to_string(group_size));
    }
  } else if (mode == "trellis") {
    f.mode = Mode::Trellis;
    if (bits < 2 || bits > 8) {
      throw std::invalid_argument("bits must be in 2..8 for trellis weights, got " +
                                  std::to_string(bits));
    }
    if (group_size <= 0 || group_size % 16 != 0) {
      throw std::invalid_argument(
          "group_size must be a positive multiple of 16 (the tile edge) for trellis weights, got " +
          std::to_string(group_size));
    }
  } else {
    throw std::invalid_argument("mode must be 'affine', 'mxfp4' or 'trellis', got '" + mode + "'");
  }
  if (fp4_quarter_subnormal && f.mode != Mode::MxFp4) {
    throw std::invalid_argument("fp4_decoder applies to mxfp4 weights only");
  }
  if ((has_su || has_sv) && f.mode != Mode::Trellis) {
    throw std::invalid_argument("sign vectors su/sv apply to trellis weights only");
  }
  return f;
}

namespace {

void expect_same_batch(const mx::array& a, const mx::array& w, const std::string& what,
                       const std::string& expected) {
  if (a.ndim() != w.ndim()) {
    throw std::invalid_argument(what + " has shape " + shape_str(a.shape()) + "; expected " +
                                expected);
  }
  for (int i = 0; i < int(w.ndim()) - 1; ++i) {
    if (a.shape(i) != w.shape(i)) {
      throw std::invalid_argument(what + " has shape " + shape_str(a.shape()) + "; expected " +
                                  expected);
    }
  }
}

std::string expected_shape(const mx::Shape& batch, int N, const std::string& last) {
  std::ostringstream os;
  os << "[";
  for (auto b : batch) os << b << ", ";
  os << N << ", " << last << "]";
  return os.str();
}

// docs/FORMATS.md, "Trellis k-bit": w uint8 [..., K/16, ceil(N/16), 32*bits], scales
// [..., K/group_size, N], grid [2^bits] or [..., 2^bits], su [..., K], sv [..., N].
WeightShape check_trellis(const std::vector<mx::array>& arrays, const Format& fmt,
                          const std::string& name) {
  const auto& w = arrays[0];
  const auto& scales = arrays[1];
  const auto& grid = arrays[2];
  if (w.dtype() != mx::uint8) {
    throw TypeError(name + ".w must be uint8 for trellis weights, got " + dtype_str(w.dtype()));
  }
  if (!is_float(scales.dtype())) {
    throw TypeError(name + ".scales must be float16, bfloat16 or float32, got " +
                    dtype_str(scales.dtype()));
  }
  if (grid.dtype() != mx::float32 && grid.dtype() != mx::float16) {
    throw TypeError(name + ".grid must be float32 or float16, got " + dtype_str(grid.dtype()));
  }
  if (scales.ndim() < 2) {
    throw std::invalid_argument(name + ".scales must have shape [..., K/group_size, N], got " +
                                shape_str(scales.shape()));
  }
  WeightShape ws;
  ws.batch = mx::Shape(scales.shape().begin(), scales.shape().end() - 2);
  ws.N = scales.shape(-1);
  ws.K = scales.shape(-2) * fmt.group_size;
  mx::Shape wexp = ws.batch;
  wexp.push_back(ws.K / 16);
  wexp.push_back((ws.N + 15) / 16);
  wexp.push_back(32 * fmt.bits);
  if (w.shape() != wexp) {
    throw std::invalid_argument(
        name + ".w has shape " + shape_str(w.shape()) + "; expected " + shape_str(wexp) +
        " ([..., K/16, ceil(N/16), 32*bits] for K = " + std::to_string(ws.K) + ", N = " +
        std::to_string(ws.N) + ", bits = " + std::to_string(fmt.bits) +
        ": bits or group_size mismatch?)");
  }
  const int levels = 1 << fmt.bits;
  mx::Shape gexp = ws.batch;
  gexp.push_back(levels);
  if (!(grid.ndim() == 1 && grid.shape(0) == levels) && grid.shape() != gexp) {
    throw std::invalid_argument(name + ".grid has shape " + shape_str(grid.shape()) +
                                "; expected [" + std::to_string(levels) + "] or " +
                                shape_str(gexp) + " (2^bits levels, bits = " +
                                std::to_string(fmt.bits) + ")");
  }
  int next = 3;
  auto check_sign = [&](bool present, const char* what, int len) {
    if (!present) return;
    const auto& a = arrays[next++];
    if (!is_float(a.dtype())) {
      throw TypeError(name + "." + what + " must be float16, bfloat16 or float32, got " +
                      dtype_str(a.dtype()));
    }
    mx::Shape exp = ws.batch;
    exp.push_back(len);
    if (a.shape() != exp) {
      throw std::invalid_argument(name + "." + what + " has shape " + shape_str(a.shape()) +
                                  "; expected " + shape_str(exp));
    }
  };
  check_sign(fmt.has_su, "su", ws.K);
  check_sign(fmt.has_sv, "sv", ws.N);
  return ws;
}

}  // namespace

WeightShape check_weight(const std::vector<mx::array>& arrays, const Format& fmt,
                         const std::string& name) {
  if (int(arrays.size()) != fmt.num_arrays()) {
    throw std::invalid_argument(name + ": expected " + std::to_string(fmt.num_arrays()) +
                                " arrays for " + fmt.describe() + ", got " +
                                std::to_string(arrays.size()));
  }
  const auto& w = arrays[0];
  const auto& scales = arrays[1];
  WeightShape ws;
  if (fmt.mode == Mode::Trellis) {
    return check_trellis(arrays, fmt, name);
  }
  if (w.dtype() != mx::uint32) {
    throw TypeError(name + ".w must be uint32 (MLX's packed layout), got " + dtype_str(w.dtype()));
  }
  if (w.ndim() < 2) {
    throw std::invalid_argument(name + ".w must have at least 2 dimensions [..., N, K_packed], got " +
                                shape_str(w.shape()));
  }
  ws.batch = mx::Shape(w.shape().begin(), w.shape().end() - 2);
  ws.N = w.shape(-2);
  int64_t kbits = int64_t(w.shape(-1)) * 32;
  if (kbits % fmt.bits != 0) {
    throw std::invalid_argument(name + ".w: its last dimension (" + std::to_string(w.shape(-1)) +
                                " words) does not hold a whole number of " +
                                std::to_string(fmt.bits) + "-bit values");
  }
  ws.K = int(kbits / fmt.bits);
  if (ws.K % fmt.group_size != 0) {
    throw std::invalid_argument(name + ": group_size " + std::to_string(fmt.group_size) +
                                " does not divide K = " + std::to_string(ws.K));
  }
  if (fmt.mode == Mode::Affine) {
    if (!is_float(scales.dtype())) {
      throw TypeError(name + ".scales must be float16, bfloat16 or float32, got " +
                      dtype_str(scales.dtype()));
    }
    if (arrays[2].dtype() != scales.dtype()) {
      throw TypeError(name + ".biases must have the dtype of scales (" +
                      dtype_str(scales.dtype()) + "), got " + dtype_str(arrays[2].dtype()));
    }
  } else if (fmt.mode == Mode::MxFp4) {
    if (scales.dtype() != mx::uint8) {
      throw TypeError(name + ".scales must be uint8 (E8M0) for mxfp4, got " +
                      dtype_str(scales.dtype()));
    }
  }
  std::string exp_scales = expected_shape(ws.batch, ws.N, std::to_string(ws.K / fmt.group_size));
  expect_same_batch(scales, w, name + ".scales", exp_scales + " (K = " + std::to_string(ws.K) +
                                                     ", group_size = " +
                                                     std::to_string(fmt.group_size) + ")");
  if (scales.shape(-1) * fmt.group_size != ws.K) {
    throw std::invalid_argument(name + ".scales has shape " + shape_str(scales.shape()) +
                                "; expected " + exp_scales + " (K = " + std::to_string(ws.K) +
                                ", group_size = " + std::to_string(fmt.group_size) +
                                "): group size mismatch?");
  }
  if (fmt.mode == Mode::Affine && arrays[2].shape() != scales.shape()) {
    throw std::invalid_argument(name + ".biases has shape " + shape_str(arrays[2].shape()) +
                                "; expected the shape of scales, " + shape_str(scales.shape()));
  }
  return ws;
}

}  // namespace mlx_moe
