"""The metal target: per kernel, a 1-D kernel for threadgroups of exactly `threads` threads that
rebuilds the 3-D builtins from a launch buffer, as metalcompute dispatches (runtime/metal.py)."""

from __future__ import annotations

import re

from .parse import LAUNCH_H, Kernel, Source
from .wrap import Target, emit, launch_lines

# metalcompute compiles one string: the launch record's declaration is copied in from its header
PRELUDE = ("#include <metal_stdlib>\nusing namespace metal;\n"
           + re.search(r"^struct mlm_launch \{.*?^\};\n", LAUNCH_H.read_text(), re.M | re.S).group(0))


def _entry(k: Kernel, threads: int | None, check_bounds: bool) -> list[str]:
    n = len(k.buffers)
    params = [f"{p.type} {p.name} [[buffer({p.index})]]" for p in k.buffers] + [
        f"device const uint* __mlm_pred [[buffer({n})]]",
        f"constant mlm_launch& __mlm_L [[buffer({n + 1})]]",
        f"device atomic_uint* __mlm_err [[buffer({n + 2})]]",
        "uint __mlm_id [[thread_position_in_grid]]",
        "uint __mlm_ptg [[threads_per_threadgroup]]",
    ]
    return [f"[[max_total_threads_per_threadgroup({threads})]]",
            f"kernel void {k.name}(" + ",\n        ".join(params) + ") {",
            # The flag records the size Metal chose (never 0), for the runtime's error message.
            f"    if (__mlm_ptg != {threads}u) {{ atomic_store_explicit(__mlm_err, __mlm_ptg, memory_order_relaxed); return; }}",
            "    if (__mlm_L.has_pred != 0u && __mlm_pred[__mlm_L.pred_word] == 0u) return;",
            "    const uint __mlm_n0 = __mlm_L.groups[0], __mlm_n1 = __mlm_L.groups[1], __mlm_n2 = __mlm_L.groups[2];",
            "    const uint __mlm_t0 = __mlm_L.threads[0], __mlm_t1 = __mlm_L.threads[1], __mlm_t2 = __mlm_L.threads[2];",
            f"    const uint __mlm_g = __mlm_id / {threads}u;",
            "    const uint __mlm_g0 = __mlm_g % __mlm_n0, __mlm_g1 = (__mlm_g / __mlm_n0) % __mlm_n1, __mlm_g2 = __mlm_g / (__mlm_n0 * __mlm_n1);",
            *launch_lines(f"__mlm_id % {threads}u")]


def _body(src: Source, text: str, span: tuple[int, int], k: Kernel, check_bounds: bool) -> str:
    # Threadgroup arrays belong in the kernel function's outermost scope (OpenCL's rule, which
    # clang enforces and MSL's address spaces descend from), so the body's statements join the
    # wrapper's scope instead of nesting in a block of their own.
    return emit(src, text, span[0] + 1, span[1])


TARGET = Target(prelude=lambda check_bounds: PRELUDE, entry=_entry, body=_body)
