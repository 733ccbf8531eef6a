"""The cuda target: per kernel, an `extern "C" __global__` of the same name taking the buffers as
pointers (constants by value) and a predicate pointer; the launch shape is CUDA's own."""

from __future__ import annotations

from .parse import Kernel, Param, Source
from .wrap import TG_ARRAY, Target, binding_lines, emit, launch_lines


def by_value(p: Param) -> bool:
    """Whether the cuda wrapper takes this parameter's value as a kernel argument: every
    `constant T&`. The launch then carries the bytes itself (no upload before the kernel runs),
    and a companion pointer, null unless the caller bound a device buffer instead."""
    return p.kind == "constant" and "&" in p.type


def _param(p: Param) -> str:
    if by_value(p):
        return f"const {p.base_type} __mlm_v{p.index}, const void* __mlm_b{p.index}"
    return f"void* __mlm_b{p.index}"


def _bindings(k: Kernel) -> list[str]:
    lines = []
    for p in k.buffers:
        if not by_value(p):
            lines += binding_lines(p, f"__mlm_b{p.index}")
            continue
        i, t = p.index, p.base_type
        pick = f"__mlm_b{i} != nullptr ? *(const {t}*)(__mlm_b{i}) : __mlm_v{i}"
        st = k.struct_of(p)
        if st is not None and any(f.count != 1 for f in st.fields):
            # arrays are indexed at run time: read them where they are rather than copy them to every thread
            lines.append(f"    {p.type} {p.name} = {pick};")
        else:  # a local copy of a few scalars lives in registers
            lines += [f"    const {t} __mlm_c{i} = {pick};", f"    {p.type} {p.name} = __mlm_c{i};"]
    return lines


def _entry(k: Kernel, threads: int | None, check_bounds: bool) -> list[str]:
    args = ", ".join([_param(p) for p in k.buffers] + ["const unsigned int* __mlm_pred"])
    return [f'extern "C" __global__ void {k.name}({args}) {{',
            "    if (__mlm_pred != nullptr && *__mlm_pred == 0u) return;",
            "    const uint __mlm_n0 = gridDim.x, __mlm_n1 = gridDim.y, __mlm_n2 = gridDim.z;",
            "    const uint __mlm_t0 = blockDim.x, __mlm_t1 = blockDim.y, __mlm_t2 = blockDim.z;",
            "    const uint __mlm_g0 = blockIdx.x, __mlm_g1 = blockIdx.y, __mlm_g2 = blockIdx.z;",
            *launch_lines("threadIdx.z * __mlm_t0 * __mlm_t1 + threadIdx.y * __mlm_t0 + threadIdx.x"),
            *_bindings(k)]


def _body(src: Source, text: str, span: tuple[int, int], k: Kernel, check_bounds: bool) -> str:
    return emit(src, text, span[0], span[1] + 1, [(TG_ARRAY, lambda m: "__shared__")])


TARGET = Target(prelude=lambda check_bounds: '#include "mlm_cuda_launch.h"\n', entry=_entry, body=_body)
