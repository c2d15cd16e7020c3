// See metal_record.h.
#include "metal_record.h"

#include <cstring>

#include "metal/encode.h"

namespace mlx_moe::metal_record {

namespace {

struct Recorder {
  Recording& r;
  bool fence = true;
  std::map<uintptr_t, int> handles;
  Command cur;
  std::map<int, uint64_t> tg;

  int handle(const mx::array& a) {
    auto it = handles.find(a.id());
    if (it == handles.end()) {
      throw std::logic_error("mlx_moe metal recorder: an array the host code never declared");
    }
    return it->second;
  }
  void declare(const mx::array& a, const std::string& kind, int index) {
    handles[a.id()] = int(r.arrays.size());
    r.arrays.push_back({kind, index, a.shape(), a.dtype()});
  }
  void kernel(const std::string& name, const std::vector<uint32_t>& constants = {}) {
    cur = Command{};
    cur.kernel = name;
    cur.constants = constants;
    tg.clear();
  }
  void bind(const mx::array& a, int slot, int64_t offset, bool output) {
    for (auto& b : cur.buffers) {
      if (b.slot == slot) {
        b = Binding{slot, handle(a), offset, output, {}};
        return;
      }
    }
    cur.buffers.push_back({slot, handle(a), offset, output, {}});
  }
  void input(const mx::array& a, int slot, int64_t offset = 0) { bind(a, slot, offset, false); }
  void output(mx::array& a, int slot, int64_t offset = 0) { bind(a, slot, offset, true); }
  template <class T>
  void bytes(const T& v, int slot) {
    Binding b;
    b.slot = slot;
    b.bytes.assign(reinterpret_cast<const char*>(&v), sizeof(T));
    for (auto& e : cur.buffers) {
      if (e.slot == slot) {
        e = b;
        return;
      }
    }
    cur.buffers.push_back(b);
  }
  void tg_memory(size_t len, int idx) { tg[idx] = len; }
  void emit(metal_encode::Size3 g, metal_encode::Size3 t) {
    Command c = cur;  // MLX's encoder keeps bindings between dispatches: so does this
    c.tg_memory = tg;
    c.groups[0] = g.x, c.groups[1] = g.y, c.groups[2] = g.z;
    c.threads[0] = t.x, c.threads[1] = t.y, c.threads[2] = t.z;
    r.commands.push_back(c);
  }
  void dispatch(metal_encode::Size3 g, metal_encode::Size3 t) {
    emit(g, t);
    r.commands.back().indirect = -1;
  }
  void dispatch_indirect(const mx::array& args, int, metal_encode::Size3 t) {
    emit({0, 0, 0}, t);
    r.commands.back().indirect = handle(args);
    r.commands.back().indirect_offset = 0;
  }
  mx::array temp(mx::Shape shape, mx::Dtype dt) {
    mx::array a(std::move(shape), dt, nullptr, {});
    declare(a, "temp", int(r.arrays.size()));
    keep.push_back(a);  // alive until the recording ends, so ids stay unique
    return a;
  }
  void alloc(mx::array&) {}
  bool device_fence() const { return fence; }
  std::vector<mx::array> keep;
};

}  // namespace

Recording record(const mx::array& out, bool device_fence) {
  if (!out.has_primitive()) {
    throw std::invalid_argument("metal_record: the array has no primitive (already evaluated?)");
  }
  Recording r;
  r.inputs = out.inputs();
  r.outputs = out.outputs();
  Recorder rec{r, device_fence};
  for (size_t i = 0; i < r.inputs.size(); ++i) rec.declare(r.inputs[i], "input", int(i));
  for (size_t i = 0; i < r.outputs.size(); ++i) rec.declare(r.outputs[i], "output", int(i));
  auto& prim = out.primitive();
  std::vector<mx::array> outs = r.outputs;
  if (auto* p = dynamic_cast<Route*>(&prim)) {
    metal_encode::encode_route(rec, *p, r.inputs, outs);
  } else if (auto* p = dynamic_cast<Bucket*>(&prim)) {
    metal_encode::encode_bucket_op(rec, *p, r.inputs, outs);
  } else if (auto* p = dynamic_cast<Dequantize*>(&prim)) {
    metal_encode::encode_dequantize(rec, *p, r.inputs, outs);
  } else if (auto* p = dynamic_cast<MoeMLP*>(&prim)) {
    metal_encode::encode_moe_mlp(rec, *p, r.inputs, outs);
  } else {
    throw std::invalid_argument("metal_record: not an mlx_moe primitive");
  }
  return r;
}

}  // namespace mlx_moe::metal_record
