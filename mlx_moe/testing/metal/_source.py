"""From a preprocessed .metal translation unit to C++ the harness can compile: find the
kernels (plain `[[kernel]]` functions and `template [[host_name("...")]] [[kernel]]`
instantiations), read how each parameter is bound (`[[buffer(i)]]`, `[[threadgroup(i)]]`,
built-in attributes), and rewrite what C++ cannot express:

* attributes `[[...]]` are removed (after they are read);
* explicit kernel instantiations are removed (the generated entry points instantiate);
* kernel-scope `threadgroup T name[N];` becomes a reference to storage the runtime shares
  between the threads of a threadgroup;
* `constant T name [[function_constant(i)]];` becomes `constexpr` with the value given at
  compile time (a Metal pipeline's specialisation), and `is_function_constant_defined(name)`
  true or false.

Rewrites keep the line structure, so compiler messages point at the original lines."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

BUILTINS = {
    "thread_position_in_grid": "tpig",
    "threadgroup_position_in_grid": "tgpig",
    "thread_position_in_threadgroup": "tpitg",
    "threads_per_threadgroup": "tptg",
    "threadgroups_per_grid": "tgpg",
    "threads_per_grid": "tpg",
    "dispatch_threads_per_threadgroup": "dtptg",
    "thread_index_in_threadgroup": "&I->tiitg",
    "thread_index_in_simdgroup": "&I->tiisg",
    "simdgroup_index_in_threadgroup": "&I->sgitg",
    "simdgroups_per_threadgroup": "&I->sgptg",
    "threads_per_simdgroup": "&I->tpsg",
    "thread_execution_width": "&I->tpsg",
}


class MetalSourceError(ValueError):
    """The .metal source uses something the harness cannot run."""


@dataclass
class Param:
    text: str          # declaration without the attribute
    type: str          # declared type (address space included)
    name: str
    attr: str          # the attribute's text, e.g. "buffer(3)"
    kind: str = ""     # buffer | threadgroup | builtin
    index: int = -1
    builtin: str = ""

    @property
    def is_const(self) -> bool:
        t = self.type
        return bool(re.search(r"\bconstant\b", t)) or bool(re.search(r"\bconst\b", t.split("*")[0].split("&")[0]))


@dataclass
class Kernel:
    host_name: str
    call: str          # how to call it: name or name<args>
    params: list[Param] = field(default_factory=list)

    def buffer_params(self) -> dict[int, Param]:
        return {p.index: p for p in self.params if p.kind == "buffer"}

    def threadgroup_params(self) -> dict[int, Param]:
        return {p.index: p for p in self.params if p.kind == "threadgroup"}


_ATTR = re.compile(r"\[\[(?:[^\[\]]|\[[^\[\]]*\])*\]\]")


def _blank(s: str) -> str:
    """The same text with everything but newlines turned into spaces."""
    return re.sub(r"[^\n]", " ", s)


def _match_paren(s: str, i: int, open_: str = "(", close: str = ")") -> int:
    """Index of the bracket closing the one at s[i]."""
    depth = 0
    j = i
    while j < len(s):
        c = s[j]
        if c == '"':
            j = s.index('"', j + 1)
        elif c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise MetalSourceError("unbalanced brackets in a kernel declaration")


def _split_top(s: str) -> list[str]:
    out, depth, cur, i = [], 0, [], 0
    while i < len(s):
        c = s[i]
        if c in "(<[":
            depth += 1
        elif c in ")>]":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


def _string_concat(attr: str) -> str:
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', attr))


def _parse_params(text: str, kernel: str) -> list[Param]:
    params = []
    for raw in _split_top(text):
        raw = " ".join(raw.split())
        if not raw or raw == "void":
            continue
        attrs = _ATTR.findall(raw)
        decl = _ATTR.sub(" ", raw).strip()
        m = re.match(r"^(.*?)([A-Za-z_]\w*)\s*$", decl)
        if not m:
            raise MetalSourceError(f"{kernel}: cannot read parameter {raw!r}")
        ptype, name = m.group(1).strip(), m.group(2)
        attr = attrs[0][2:-2].strip() if attrs else ""
        p = Param(text=decl, type=ptype, name=name, attr=attr)
        if m2 := re.fullmatch(r"buffer\s*\(\s*(\d+)\s*\)", attr):
            p.kind, p.index = "buffer", int(m2.group(1))
        elif m2 := re.fullmatch(r"threadgroup\s*\(\s*(\d+)\s*\)", attr):
            p.kind, p.index = "threadgroup", int(m2.group(1))
        elif attr in BUILTINS:
            p.kind, p.builtin = "builtin", attr
        else:
            raise MetalSourceError(
                f"{kernel}: parameter {name!r} has attribute [[{attr}]], which the harness does not "
                "support (buffers, threadgroup memory and the thread-position built-ins are)")
        params.append(p)
    _check_position_builtins(params, kernel)
    return params


# MSL: these built-ins are declared as scalars or vectors, and the vectors of one kernel must
# have the same number of components (a scalar next to a vector the spec leaves unclear; the
# project's kernels avoid it).
_POSITION_BUILTINS = {"thread_position_in_grid", "threads_per_grid", "thread_position_in_threadgroup",
                      "threads_per_threadgroup", "threadgroup_position_in_grid",
                      "dispatch_threads_per_threadgroup", "threadgroups_per_grid"}


def _check_position_builtins(params: list[Param], kernel: str) -> None:
    widths = {}
    for p in params:
        if p.builtin in _POSITION_BUILTINS:
            m = re.search(r"(\d)\s*$", p.type.strip())
            if m:
                widths[p.name] = int(m.group(1))
    if len(set(widths.values())) > 1:
        raise MetalSourceError(
            f"{kernel}: the position built-ins {sorted(widths)} have {sorted(set(widths.values()))} "
            "components: Metal wants their vectors of one size")


def transform(src: str, function_constants: dict | None = None) -> tuple[str, list[Kernel]]:
    """Returns (C++ source, kernels) for a preprocessed .metal translation unit."""
    function_constants = dict(function_constants or {})
    kernels: list[Kernel] = []
    out = src

    # Function constants.
    fc_names = {}

    def _fc(m):
        ctype, name, idx = m.group(1).strip(), m.group(2), int(m.group(3))
        key = idx if idx in function_constants else name if name in function_constants else None
        fc_names[name] = key is not None
        if key is None:
            return f"constexpr {ctype} {name} = {ctype}();"
        v = function_constants[key]
        if isinstance(v, bool):
            v = "true" if v else "false"
        return f"constexpr {ctype} {name} = {ctype}({v});"

    out = re.sub(r"\bconstant\s+([\w:<>, ]+?)\s+(\w+)\s*\[\[\s*function_constant\s*\(\s*(\d+)\s*\)\s*\]\]\s*;",
                 _fc, out)
    out = re.sub(r"\bis_function_constant_defined\s*\(\s*(\w+)\s*\)",
                 lambda m: "true" if fc_names.get(m.group(1)) else "false", out)

    # Kernels.
    edits: list[tuple[int, int, str]] = []
    for m in re.finditer(r"\[\[\s*kernel\s*\]\]|\bkernel\s+void\b", out):
        start = m.start()
        before = out[max(0, start - 400):start]
        inst = re.search(r"template\s*(\[\[\s*host_name\s*\((?:[^()]|\([^()]*\))*\)\s*\]\])\s*$", before)
        tmpl_def = re.search(r"template\s*<[^;{}]*>\s*$", before)
        hn_plain = re.search(r"(\[\[\s*host_name\s*\((?:[^()]|\([^()]*\))*\)\s*\]\])\s*$", before)
        m2 = re.compile(r"\s*(?:kernel\s+)?void\s+([A-Za-z_]\w*)\s*").match(out, m.end() if m.group(0).startswith("[[") else m.start() + len("kernel"))
        if not m2:
            continue
        name = m2.group(1)
        j = m2.end()
        targs = ""
        if out[j] == "<":
            k = _match_paren(out, j, "<", ">")
            targs = out[j:k + 1]
            j = k + 1
            while out[j].isspace():
                j += 1
        if out[j] != "(":
            raise MetalSourceError(f"cannot read the declaration of kernel {name}")
        close = _match_paren(out, j)
        params_text = out[j + 1:close]
        k = close + 1
        while out[k].isspace():
            k += 1
        if inst:
            host = _string_concat(inst.group(1))
            kernels.append(Kernel(host, name + targs, _parse_params(params_text, host)))
            if out[k] != ";":
                raise MetalSourceError(f"{host}: expected ';' after an explicit instantiation")
            s0 = start - len(before) + inst.start()
            edits.append((s0, k + 1, _blank(out[s0:k + 1])))
        elif tmpl_def:
            continue  # a template: instantiated by name below
        else:
            host = _string_concat(hn_plain.group(1)) if hn_plain else name
            kernels.append(Kernel(host, name, _parse_params(params_text, host)))
    for s0, s1, rep in sorted(edits, reverse=True):
        out = out[:s0] + rep + out[s1:]

    # Kernel-scope threadgroup arrays and variables.
    def _tg(m):
        indent, ctype, name, dims = m.group(1), m.group(2).strip(), m.group(3), m.group(4) or ""
        full = f"{ctype}{dims}"
        return (f"{indent}auto& {name} = *reinterpret_cast<{ctype}(*){dims}>("
                f"mh_tg_static(__COUNTER__, sizeof({full}), alignof({ctype})));")

    out = re.sub(r"(?m)^([ \t]*)threadgroup\s+((?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;>]*>)?)\s+"
                 r"([A-Za-z_]\w*)\s*((?:\[[^\]\n]+\])*)\s*;", _tg, out)

    # Barriers and simd-group functions: pass the call site's id (see mh_site_t in mh_metal.h).
    sync = re.compile(r"(?<![\w.:])((?:metal::)?(?:threadgroup_barrier|simdgroup_barrier|simd_(?:sum|product|max|min|and|or|xor|"
                      r"broadcast_first|broadcast|prefix_(?:ex|in)clusive_(?:sum|product)|shuffle(?:_xor|_up|_down|_rotate_up|"
                      r"_rotate_down)?|all|any|ballot|active_threads_mask|is_first)))\s*\(")
    starts = [m for m in sync.finditer(out)]
    for site, m in reversed(list(enumerate(starts, 1))):
        open_ = m.end() - 1
        close = _match_paren(out, open_)
        empty = out[open_ + 1:close].strip() == ""
        out = out[:close] + ("" if empty else ", ") + f"mh_site_t{{{site}}}" + out[close:]

    # Vector constructors: `float4(a, b, c, d)` is not C++ for clang's vector types.
    out = re.sub(r"(?<![\w.])((?:float|half|bfloat|int|uint|short|ushort|char|uchar|long|ulong)[234])\s*\(",
                 lambda m: f"mh::make<{m.group(1)}>(", out)

    # Attributes and old-style `kernel void`.
    out = _ATTR.sub(lambda m: " " * len(m.group(0)), out)
    out = re.sub(r"\bkernel(\s+void\b)", r"      \1", out)
    if not kernels:
        raise MetalSourceError("no [[kernel]] functions found")
    return out, kernels


def entry_points(kernels: list[Kernel]) -> str:
    """C++ entry points `mh_k_<host_name>(buffers, threadgroup buffers, ids)` that bind every
    parameter from the dispatch and call the kernel."""
    lines = ["\n// ---- generated by mlx_moe.testing.metal: kernel entry points ----"]
    for k in kernels:
        args = []
        for p in k.params:
            if p.kind == "buffer":
                if p.type.rstrip().endswith("&"):
                    args.append(f"*(std::remove_reference_t<{p.type}>*)B[{p.index}]")
                else:
                    args.append(f"({p.type})B[{p.index}]")
            elif p.kind == "threadgroup":
                args.append(f"({p.type})T[{p.index}]")
            else:
                field_ = BUILTINS[p.builtin]
                src = field_ if field_.startswith("&") else f"I->{field_}"
                args.append(f"mh::cvt<{p.type}>({src})")
        lines.append(f'extern "C" __attribute__((visibility("default"))) void mh_k_{k.host_name}('
                     "void* const* B, void* const* T, const mh_ids* I) {")
        lines.append(f"  (void)B; (void)T; (void)I;\n  {k.call}({', '.join(args)});\n}}")
    return "\n".join(lines) + "\n"
