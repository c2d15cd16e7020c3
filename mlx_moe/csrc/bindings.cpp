// Python bindings: the low-level `mlx_moe._ext` module that mlx_moe/ops.py wraps.
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "bucket.h"
#include "dequant.h"
#include "metal_record.h"
#include "moe_mlp.h"
#include "route.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace mlx_moe;

NB_MODULE(_ext, m) {
  m.doc() = "mlx_moe C++ primitives (use the wrappers in mlx_moe instead)";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const mlx_moe::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  nb::class_<Format>(m, "Format")
      .def("__init__",
           [](Format* f, const std::string& mode, int bits, int group_size, bool has_su,
              bool has_sv, bool fp4_quarter_subnormal) {
             new (f) Format(make_format(mode, bits, group_size, has_su, has_sv,
                                        fp4_quarter_subnormal));
           },
           "mode"_a, "bits"_a, "group_size"_a, "has_su"_a = false, "has_sv"_a = false,
           "fp4_quarter_subnormal"_a = false)
      .def_prop_ro("bits", [](const Format& f) { return f.bits; })
      .def_prop_ro("group_size", [](const Format& f) { return f.group_size; })
      .def("__repr__", [](const Format& f) { return "Format(" + f.describe() + ")"; });

  m.def("route", &route, "logits"_a, "k"_a, "normalize"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("bucket", &bucket, "ids"_a, "num_experts"_a, "tile"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def("dequantize", &dequantize, "arrays"_a, "format"_a, "dtype"_a, nb::kw_only(),
        "stream"_a = nb::none());
  m.def(
      "moe_mlp",
      [](const mx::array& x, const mx::array& ids, const mx::array& weights,
         const std::vector<std::vector<mx::array>>& projections, const std::vector<Format>& formats,
         mx::StreamOrDevice s) {
        if (projections.size() != 3 || formats.size() != 3) {
          throw std::invalid_argument("moe_mlp takes three projections (gate, up, down)");
        }
        return moe_mlp(x, ids, weights, {projections[0], projections[1], projections[2]},
                       {formats[0], formats[1], formats[2]}, s);
      },
      "x"_a, "ids"_a, "weights"_a, "projections"_a, "formats"_a, nb::kw_only(),
      "stream"_a = nb::none());
  m.def(
      "weight_shape",
      [](const std::vector<mx::array>& arrays, const Format& fmt) {
        WeightShape ws = check_weight(arrays, fmt, "weight");
        std::vector<int> shape(ws.batch.begin(), ws.batch.end());
        shape.push_back(ws.N);
        shape.push_back(ws.K);
        return shape;
      },
      "arrays"_a, "format"_a);

  m.def(
      "metal_record",
      [](const mx::array& out, bool device_fence) {
        auto r = metal_record::record(out, device_fence);
        nb::list arrays, commands;
        for (auto& a : r.arrays) {
          arrays.append(nb::make_tuple(a.kind, a.index,
                                       std::vector<int>(a.shape.begin(), a.shape.end()),
                                       dtype_str(a.dtype)));
        }
        for (auto& c : r.commands) {
          nb::list bufs;
          for (auto& b : c.buffers) {
            nb::object payload = b.handle < 0 ? nb::object(nb::bytes(b.bytes.data(), b.bytes.size()))
                                              : nb::object(nb::none());
            bufs.append(nb::make_tuple(b.slot, b.handle, b.offset, b.output, payload));
          }
          nb::dict tg;
          for (auto& [i, n] : c.tg_memory) tg[nb::int_(i)] = nb::int_(n);
          nb::dict d;
          d["kernel"] = c.kernel;
          d["function_constants"] = c.constants;
          d["buffers"] = bufs;
          d["threadgroup_memory"] = tg;
          d["groups"] = nb::make_tuple(c.groups[0], c.groups[1], c.groups[2]);
          d["threads"] = nb::make_tuple(c.threads[0], c.threads[1], c.threads[2]);
          d["indirect"] = c.indirect < 0 ? nb::object(nb::none())
                                         : nb::object(nb::make_tuple(c.indirect, c.indirect_offset));
          commands.append(d);
        }
        nb::dict res;
        res["arrays"] = arrays;
        res["commands"] = commands;
        res["inputs"] = r.inputs;
        res["outputs"] = r.outputs;
        return res;
      },
      "out"_a, "device_fence"_a = true,
      "The commands the Metal eval_gpu of out's primitive would encode (metal/encode.h), for "
      "the Metal harness (mlx_moe.testing.metal.replay). device_fence: as for a metallib built "
      "with Metal >= 3.2 (the MLP kernel combines in its own dispatch); False: as for one built "
      "for Metal 3.1 (a separate combine dispatch).");
}
