"""The lint: what a kernel source may use (DESIGN §2), checked before any backend compiles it.

Each problem is reported as `file:line: rule: message`; `Library` refuses a source that has any.
"""

from __future__ import annotations

import re

from .parse import BUILTIN_TYPES, BUILTINS, SCALARS, Function, Kernel, Source, split_top, compile_extent

VEC3 = r"\b(?:float|half|int|uint|short|ushort|char|uchar|bool)3\b"
SWIZZLE = r"\.(?:[xyzw]{2,4}|[rgba]{2,4})\b"


def lint(src: Source) -> list[str]:
    """All MSL-subset violations of a source as `file:line: rule: message` strings."""
    problems: list[str] = []
    clean = src.clean

    def report(offset: int, rule: str, msg: str):
        problems.append(f"{src.loc(offset)}: {rule}: {msg}")

    token_rules = [
        (r"\bdouble\b", "no-double", "`double` is not available in MSL; use float"),
        (r"\blong\s+long\b", "no-long-long", "`long long` is not in the MSL subset; use int/uint"),
        (r"\blong\s+double\b", "no-double", "`long double` is not available in MSL"),
        (r"\bstd\s*::", "no-std", "`std::` is not available in MSL; use the metal namespace"),
        (r"\bnew\b|\bdelete\b", "no-new-delete", "dynamic allocation (`new`/`delete`) is not allowed in kernels"),
        (r"\bvirtual\b", "no-virtual", "virtual functions are not allowed in MSL"),
        (r"\btry\b|\bcatch\b|\bthrow\b", "no-exceptions", "exceptions are not allowed in MSL"),
        (r"\bgoto\b", "no-goto", "`goto` is not allowed in MSL"),
        (r"\bthread_local\b", "no-thread-local", "`thread_local` is not allowed in MSL"),
        (r"\[[\w\s,&=]*\]\s*\([^()]*\)\s*(?:->\s*[\w:]+\s*)?(?:mutable\s*)?\{", "no-lambda",
         "lambdas are not allowed in the MSL subset"),
        (r"\(\s*\*\s*\w+\s*\)\s*\(", "no-function-pointer", "function pointers are not allowed in MSL"),
        (r"\batomic\s*<\s*float\s*>|\batomic_float\b", "no-atomic-float",
         "atomic<float> needs MSL 3.0; use a compare-and-swap loop on atomic_uint"),
        (r"\[\[\s*threadgroup\s*\(", "no-threadgroup-param",
         "[[threadgroup(n)]] parameters cannot be sized by metalcompute; declare a threadgroup array in the kernel"),
        (SWIZZLE, "no-swizzle", "multi-component swizzles are not provided by the compatibility headers; use .x/.y/.z/.w"),
        (r"\bthread_elements\s*\(", "no-thread-elements",
         "thread_elements() exposes a lane's share of a simdgroup matrix, whose layout the cpu and cuda backends "
         "do not reproduce; load and store whole matrices"),
        (r"\bsimdgroup_matrix\s*<\s*\w+\s*,(?!\s*8\s*,\s*8\s*>)[^>]*>", "simdgroup-matrix-size",
         "simdgroup matrices are 8×8 (simdgroup_matrix<T, 8, 8>)"),
    ]
    for pattern, rule, msg in token_rules:
        for m in re.finditer(pattern, clean):
            report(m.start(), rule, msg)

    for m in re.finditer(r"^\s*#\s*include\s*([<\"])([^>\"]+)[>\"]", src.text, re.M):
        if m.group(1) == "<" and m.group(2).strip() != "metal_stdlib":
            report(m.start(), "include", f"only <metal_stdlib> and headers in kernels/ may be included, not <{m.group(2)}>")

    functions = src.functions
    kernel_bodies = [f.body_span for f in functions if f.is_kernel]
    all_bodies = [f.body_span for f in functions]

    def inside(offset, spans):
        return any(a < offset < b for a, b in spans)

    for m in re.finditer(r"\bstatic\b", clean):
        if inside(m.start(), all_bodies):
            report(m.start(), "no-static-local", "static local variables are not allowed in MSL")

    for m in re.finditer(r"\bthreadgroup\b", clean):
        if inside(m.start(), [(f.params_span[0], f.params_span[1]) for f in functions]):
            continue  # pointer parameters of helper functions
        decl = _statement_from(clean, m.start())
        if "*" in decl.split("=")[0]:
            continue  # a threadgroup pointer (a parameter, variable or cast, in a function or a method), fine anywhere
        if not inside(m.start(), all_bodies):
            if not re.match(r"threadgroup\s*\(", clean[m.start():]) and not clean[:m.start()].rstrip().endswith("[["):
                report(m.start(), "threadgroup-scope", "threadgroup variables may only be declared inside a kernel function")
            continue
        if not inside(m.start(), kernel_bodies):
            report(m.start(), "threadgroup-scope", "threadgroup arrays may only be declared in a kernel function, not a helper")
        elif not re.match(r"threadgroup\s+[\w:<>\s,]+?\s+\w+\s*\[", decl):
            report(m.start(), "threadgroup-array", "threadgroup variables must be arrays (`threadgroup float t[256];`)")

    for f in functions:
        if f.is_kernel:
            continue  # kernel parameters are checked with the rest of the kernel contract
        a, b = f.params_span
        for offset, text in split_top(clean[a + 1:b]):
            decl = re.sub(r"\[\[.*?\]\]", " ", text)
            lead = len(text) - len(text.lstrip())
            if ("*" in decl or "&" in decl) and not re.search(r"\b(device|constant|threadgroup|thread)\b", decl):
                report(a + 1 + offset + lead, "address-space",
                       f"pointer/reference parameter `{' '.join(decl.split())}` of {f.name} needs an address space "
                       "(device, constant, threadgroup or thread)")

    _lint_recursion(src, functions, report)
    for k in src.kernels.values():
        _lint_kernel(src, k, problems)
    return problems


def _statement_from(clean: str, offset: int) -> str:
    end = clean.find(";", offset)
    return clean[offset:end if end >= 0 else len(clean)]


def _lint_recursion(src: Source, functions: list[Function], report):
    by_name = {f.name: f for f in functions}
    calls = {f.name: set(re.findall(r"\b(\w+)\s*\(", src.clean[f.body_span[0]:f.body_span[1]])) & set(by_name)
             for f in functions}

    def reaches(start, target, seen):
        for c in calls.get(start, ()):
            if c == target or (c not in seen and reaches(c, target, seen | {c})):
                return True
        return False

    for f in functions:
        if reaches(f.name, f.name, {f.name}):
            report(f.start, "no-recursion", f"{f.name} is recursive; MSL does not allow recursion")


def _lint_kernel(src: Source, k: Kernel, problems: list[str]):
    indices = []
    for p in k.params:
        def report(_, rule, msg, loc=p.loc):
            problems.append(f"{loc}: {rule}: {msg}")
        at = None
        if p.extent is not None:
            try:
                compile_extent(k, p)
            except ValueError as e:
                problems.append(f"{p.extent_loc}: extent: kernel {k.name}, parameter `{p.name}`: {e}")
        if p.kind == "builtin":
            if p.builtin is None:
                report(at, "kernel-param", f"kernel {k.name}: parameter `{p.name}` has no attribute "
                       "([[buffer(i)]] or a builtin such as [[thread_position_in_grid]])")
            elif p.builtin not in BUILTINS:
                report(at, "kernel-param", f"kernel {k.name}: `{p.name}` uses [[{p.builtin}]], which mlmetal does not "
                       f"support (supported: {', '.join(sorted(BUILTINS))})")
            elif p.type not in BUILTIN_TYPES:
                report(at, "kernel-param", f"kernel {k.name}: builtin `{p.name}` must be uint, uint2, uint3 or ushort*, not {p.type}")
            continue
        if p.index is None:
            report(at, "buffer-index", f"kernel {k.name}: [[buffer(i)]] of `{p.name}` needs an integer index")
            continue
        indices.append(p.index)
        if not re.search(r"\b(device|constant)\b", p.type):
            report(at, "address-space", f"kernel {k.name}: buffer `{p.name}` needs the device or constant address space")
        if re.search(VEC3, p.type):
            report(at, "no-vec3-in-buffer", f"kernel {k.name}: `{p.name}` has a 3-component vector type; "
                   "its size differs between MSL (16 bytes) and C (12): use a 4-component type")
        struct = k.struct_of(p)
        if struct is not None:
            for fld in struct.fields:
                if re.search(VEC3, fld.type):
                    report(at, "no-vec3-in-buffer", f"kernel {k.name}: struct {struct.name} field `{fld.name}` is a "
                           "3-component vector; its size differs between MSL and C")
            if p.kind == "constant" and not struct.scalar_only:
                bad = [f"{f.type} {f.name}" for f in struct.fields if f.type not in SCALARS]
                report(at, "constant-struct", f"kernel {k.name}: constant struct {struct.name} may hold only 32-bit "
                       f"int/uint/float fields (found {', '.join(bad)})")
        elif p.kind == "constant" and p.base_type not in SCALARS:
            report(at, "constant-struct", f"kernel {k.name}: constant `{p.name}` must be a struct defined in the "
                   f"source or a 32-bit scalar, not {p.base_type}")
    if sorted(indices) != list(range(len(indices))):
        problems.append(f"{k.where}: buffer-index: " + f"kernel {k.name}: buffer indices must be 0..{len(indices) - 1} without gaps or "
                        f"repeats, found {sorted(indices)}")
