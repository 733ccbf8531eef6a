"""The cpu target: per kernel, `<name>__mlm_group` (runs a threadgroup as a plain loop) and
`<name>__mlm_thread` (runs one thread; the runtime gives it a fiber), over one inlined body.

With `check_bounds`, device, constant and threadgroup pointers and threadgroup arrays become
checked pointers (include/mlm_cpu_check.h), and the wrapper takes each buffer's extent and an
error record after the buffers.
"""

from __future__ import annotations

import re

from .parse import Kernel, Source
from .wrap import TG_ARRAY, Target, binding_lines, emit

# The address space of a pointer type (`device const float*`, `(device uint4*)`, `threadgroup float4*`)
# and its pointee; `thread` pointers stay raw.
_POINTER = re.compile(r"\b(const\s+)?(device|constant|threadgroup)\s+((?:const\s+|volatile\s+)*)"
                      r"([A-Za-z_][\w:]*(?:\s*<[^<>;()]*>)?)(\s+const)?\s*\*")
# A whole threadgroup array declaration: type, name, dimensions.
_TG_DECL = re.compile(r"\bthreadgroup\s+((?:const\s+)?[\w:]+(?:\s*<[^;>]*>)?)\s+(\w+)\s*((?:\[[^\];]*\]\s*)+);")


def _checked_pointer(m: re.Match) -> str:
    const = m.group(1) or "const" in m.group(3).split() or m.group(5) or m.group(2) == "constant"
    return f"::metal::check::ptr<{'const ' if const else ''}{m.group(4)}>"


def _checked_array(m: re.Match, kernel: str) -> str:
    """A threadgroup array as its storage plus a checked view of it under the array's name."""
    t, name, dims = m.group(1), m.group(2), " ".join(m.group(3).split())
    return (f"static thread_local {t} {name}__mlm_tg{dims}; "
            f"const ::metal::check::region {name}__mlm_rg(&{name}__mlm_tg, sizeof({name}__mlm_tg), "
            f'"threadgroup array `{name}`", "{kernel}", -1, __mlm_err); '
            f"auto {name} = ::metal::check::view({name}__mlm_tg, &{name}__mlm_rg);")


def _checked_bindings(k: Kernel) -> list[str]:
    """Each buffer pointer as a checked pointer over its region: the extents and the error
    record come after the buffers in the wrapper's array of pointers."""
    n = len(k.buffers)
    lines = [f"    const unsigned long long* __mlm_ext = (const unsigned long long*)__mlm_b[{n}];",
             f"    mlm_bounds_error* __mlm_err = (mlm_bounds_error*)__mlm_b[{n + 1}];"]
    for p in k.buffers:
        if p.kind == "constant" or "&" in p.type:
            lines += binding_lines(p, f"__mlm_b[{p.index}]")
            continue
        i = p.index
        lines += [f'    const ::metal::check::region __mlm_r{i}(__mlm_b[{i}], __mlm_ext[{i}], "buffer `{p.name}` '
                  f'[[buffer({i})]]", "{k.name}", {i}, __mlm_err);',
                  f"    {_POINTER.sub(_checked_pointer, p.type)} {p.name}(__mlm_b[{i}], &__mlm_r{i});"]
    return lines


def _entry(k: Kernel, threads: int | None, check_bounds: bool) -> list[str]:
    bindings = _checked_bindings(k) if check_bounds else \
        [line for p in k.buffers for line in binding_lines(p, f"__mlm_b[{p.index}]")]
    return [f"static inline __attribute__((always_inline)) void {k.name}__mlm_body("
            "void* const* __mlm_b, const mlm_launch& __mlm_L, uint __mlm_g0, uint __mlm_g1, uint __mlm_g2, "
            "uint __mlm_lid, uint __mlm_l0, uint __mlm_l1, uint __mlm_l2) {",
            "    const uint __mlm_n0 = __mlm_L.groups[0], __mlm_n1 = __mlm_L.groups[1], __mlm_n2 = __mlm_L.groups[2];",
            "    const uint __mlm_t0 = __mlm_L.threads[0], __mlm_t1 = __mlm_L.threads[1], __mlm_t2 = __mlm_L.threads[2];",
            *bindings]


def _rules(check_bounds: bool) -> list:
    return [(_POINTER, _checked_pointer)] if check_bounds else []


def _body(src: Source, text: str, span: tuple[int, int], k: Kernel, check_bounds: bool) -> str:
    if check_bounds:
        rules = [(_TG_DECL, lambda m: _checked_array(m, k.name)), (TG_ARRAY, lambda m: "static thread_local"),
                 *_rules(True)]
    else:
        rules = [(TG_ARRAY, lambda m: "static thread_local")]
    return emit(src, text, span[0], span[1] + 1, rules)


def _entries(k: Kernel) -> str:
    # The plain loop walks the threadgroup in thread_index order with the 3-D position kept
    # in counters: no division per thread, and the innermost loop is simple enough to vectorise.
    # No predicate check: the cpu queue reads the predicate before it launches a dispatch.
    return (
        f'extern "C" void {k.name}__mlm_group(void* const* b, const mlm_launch* L, uint g0, uint g1, uint g2) {{\n'
        "    const uint t0 = L->threads[0], t1 = L->threads[1], t2 = L->threads[2];\n"
        "    uint lid = 0;\n"
        "    for (uint l2 = 0; l2 < t2; ++l2)\n"
        "        for (uint l1 = 0; l1 < t1; ++l1)\n"
        f"            for (uint l0 = 0; l0 < t0; ++l0, ++lid) {k.name}__mlm_body(b, *L, g0, g1, g2, lid, l0, l1, l2);\n"
        "}\n"
        f'extern "C" void {k.name}__mlm_thread(void* const* b, const mlm_launch* L, uint g0, uint g1, uint g2, uint lid) {{\n'
        "    const uint t0 = L->threads[0], t1 = L->threads[1];\n"
        f"    {k.name}__mlm_body(b, *L, g0, g1, g2, lid, lid % t0, (lid / t0) % t1, lid / (t0 * t1));\n"
        "}\n"
    )


TARGET = Target(prelude=lambda check_bounds: '#include "mlm_cpu_launch.h"\n'
                + ('#include "mlm_cpu_check.h"\n' if check_bounds else ""),
                entry=_entry, body=_body, rules=_rules, after=_entries)
