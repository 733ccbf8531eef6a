"""Entry wrappers: one generator, three targets (DESIGN §1).

`generate` writes out a source as the translation unit a target compiles: the text as it is,
except that each kernel's parameter list becomes the target's entry point (wrap_cpu.py,
wrap_cuda.py, wrap_metal.py), which binds the buffers, computes the builtins and checks the
predicate before the untouched body. A template kernel gets one entry per instantiation.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from .parse import BUILTINS, Kernel, Param, Source


@dataclasses.dataclass(frozen=True)
class Target:
    """What a target makes of a source."""

    prelude: Callable[[bool], str]  # check_bounds -> what every translation unit starts with
    entry: Callable[[Kernel, "int | None", bool], list[str]]  # the wrapper's head: signature, bindings, launch values
    body: Callable[[Source, str, tuple[int, int], Kernel, bool], str]  # the kernel's body, as the wrapper goes on
    rules: Callable[[bool], list] = lambda check_bounds: []  # rewrites of the text outside kernel bodies
    after: Callable[[Kernel], str] = lambda k: ""  # what follows each wrapper


# `threadgroup` where it declares an array
TG_ARRAY = re.compile(r"\bthreadgroup(?=\s+(?:const\s+)?[\w:]+(?:\s*<[^;>]*>)?\s+\w+\s*\[)")
UNUSED = ["    (void)__mlm_n0; (void)__mlm_n1; (void)__mlm_n2; (void)__mlm_t0; (void)__mlm_t1; (void)__mlm_t2; "
          "(void)__mlm_g0; (void)__mlm_g1; (void)__mlm_g2;",
          "    (void)__mlm_lid; (void)__mlm_l0; (void)__mlm_l1; (void)__mlm_l2;"]


def storage_unit(kernel: str) -> str:
    """The compilation unit of a kernel by its name: "f16" or "bf16" for the instances of a
    storage type (`relu_f16`, `sum_threads_f16_f32`, `cast_f32_bf16`), "" for the rest. The cpu and
    cuda backends build each unit of a library on first use, so float32 work never compiles the
    16-bit instances."""
    words = kernel.split("_")
    return "bf16" if "bf16" in words else "f16" if "f16" in words else ""


def generate(src: Source, target: Target, threads: int | None = None, check_bounds: bool = False,
             unit: str | None = None) -> str:
    """The translation unit for `target`, with every kernel's entry wrapper (of `unit`'s kernels
    alone, where given: see storage_unit)."""
    text = src.text
    # Instantiation lines are replaced by their kernels' wrappers: blank them, keeping the lines.
    for inst in src.instances:
        text = text[:inst.offset] + re.sub(r"[^\n]", " ", text[inst.offset:inst.end]) + text[inst.end:]
    rules = target.rules(check_bounds)
    out = [_defines(src), target.prelude(check_bounds), line(src, 0)]
    pos = 0
    by_function: dict[int, list[Kernel]] = {}
    for k in src.kernels.values():
        if unit is None or storage_unit(k.name) == unit:
            by_function.setdefault(k.function.start, []).append(k)
    for fn in sorted(src.functions, key=lambda f: f.start):
        if fn.start not in by_function:
            if fn.is_kernel:  # a template kernel never instantiated: nothing to compile
                out.append(emit(src, text, pos, fn.start, rules))
                pos = fn.body_span[1] + 1
            continue
        out.append(emit(src, text, pos, fn.start, rules))
        # A template kernel's body is written out once for each instantiation, after the
        # definitions of its template parameters.
        for k in by_function[fn.start]:
            body = target.body(src, text, fn.body_span, k, check_bounds)
            out.append("\n".join(target.entry(k, threads, check_bounds) + _builtin_lines(k) + UNUSED) + "\n")
            out.append("".join(line + "\n" for line in k.template_bindings()))
            out.append(line(src, fn.body_span[0]) + body + "\n}\n")
            out.append(target.after(k))
        out.append(line(src, fn.body_span[1] + 1))
        pos = fn.body_span[1] + 1
    out.append(emit(src, text, pos, len(text), rules))
    return "".join(out)


def _defines(src: Source) -> str:
    return "".join(f"#define {name} {value}\n" for name, value in src.defines.items())


def emit(src: Source, text: str, a: int, b: int, rules=()) -> str:
    """text[a:b] (src's text, or a copy with the same offsets) with each rule's matches (found in
    the comment-free text) replaced by rule(match), and a `#line` wherever an inlined header
    starts or ends, so that compiler messages and the bounds checks' `__FILE__`/`__LINE__` name
    the header's own lines."""
    edits = [(m.start(), m.end(), repl(m)) for pattern, repl in rules for m in pattern.finditer(src.clean, a, b)]
    edits += [(at, at, f'#line {line} "{name}"\n') for at, name, line in src.include_breaks if a < at < b]
    out, last = [], a
    for start, end, repl in sorted(edits, key=lambda e: (e[0], -e[1])):
        if start < last:
            continue  # inside an earlier (longer) match
        out += [text[last:start], repl]
        last = end
    out.append(text[last:b])
    return "".join(out)


def line(src: Source, offset: int) -> str:
    f, l = src.where(min(offset, len(src.text) - 1)) if src.text else (src.name, 1)
    return f'\n#line {l} "{f}"\n'


def _components(expr: tuple[str, ...], ctype: str) -> str:
    n = int(ctype[-1]) if ctype[-1].isdigit() else 1
    scalar = ctype.rstrip("234")
    parts = [f"({scalar})({expr[i] if i < len(expr) else '0u'})" for i in range(n)]
    return parts[0] if n == 1 else f"{ctype}({', '.join(parts)})"


def _builtin_lines(k: Kernel) -> list[str]:
    return [f"    {p.type} {p.name} = {_components(BUILTINS[p.builtin], p.type)};" for p in k.builtins]


def binding_lines(p: Param, ref: str) -> list[str]:
    """Declare buffer or constant parameter `p` as a local bound from the pointer expression `ref`."""
    if p.kind == "constant" or "&" in p.type:
        ptr = p.type.replace("&", "*")
        return [f"    {p.type} {p.name} = *({ptr})({ref});"]
    return [f"    {p.type} {p.name} = ({p.type})({ref});"]


def launch_lines(lid: str) -> list[str]:
    """The thread's flat index `lid` in its threadgroup, and its 3-D position from it."""
    return [
        f"    const uint __mlm_lid = {lid};",
        "    const uint __mlm_l0 = __mlm_lid % __mlm_t0, __mlm_l1 = (__mlm_lid / __mlm_t0) % __mlm_t1,"
        " __mlm_l2 = __mlm_lid / (__mlm_t0 * __mlm_t1);",
    ]
