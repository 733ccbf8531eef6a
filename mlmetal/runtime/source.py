"""Kernel sources: find, parse, lint, and generate one entry wrapper per target.

A kernel is an MSL `kernel void` function. This module reads its signature
(buffers, `constant` structs, builtins), checks the source against the MSL
subset every backend can honour (DESIGN §2), and rewrites each kernel's
parameter list into the entry point a backend calls — one generator, three
targets (cpu, cuda, metal). Kernel bodies are never edited; the wrapper
replaces the parameter list and prepends the builtin values and the
predicate check.
"""

from __future__ import annotations

import dataclasses
import re
from functools import cached_property
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent.parent / "kernels"
if not KERNEL_DIR.is_dir():  # editable install / source checkout: kernels/ sits beside the package
    KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"

SCALARS = {"int": "i", "uint": "I", "float": "f", "unsigned": "I", "unsigned int": "I"}

# builtin attribute -> how the wrappers compute its three components from
# the launch (g = threadgroup position, l = position in threadgroup, lid = flat index).
BUILTINS = {
    "thread_position_in_grid": ("__mlm_g0*__mlm_t0+__mlm_l0", "__mlm_g1*__mlm_t1+__mlm_l1", "__mlm_g2*__mlm_t2+__mlm_l2"),
    "threads_per_grid": ("__mlm_n0*__mlm_t0", "__mlm_n1*__mlm_t1", "__mlm_n2*__mlm_t2"),
    "threadgroup_position_in_grid": ("__mlm_g0", "__mlm_g1", "__mlm_g2"),
    "threadgroups_per_grid": ("__mlm_n0", "__mlm_n1", "__mlm_n2"),
    "thread_position_in_threadgroup": ("__mlm_l0", "__mlm_l1", "__mlm_l2"),
    "threads_per_threadgroup": ("__mlm_t0", "__mlm_t1", "__mlm_t2"),
    "thread_index_in_threadgroup": ("__mlm_lid",),
    "thread_index_in_simdgroup": ("(__mlm_lid%32u)",),
    "simdgroup_index_in_threadgroup": ("(__mlm_lid/32u)",),
    "threads_per_simdgroup": ("32u",),
    "thread_execution_width": ("32u",),
    "simdgroups_per_threadgroup": ("((__mlm_t0*__mlm_t1*__mlm_t2+31u)/32u)",),
}
BUILTIN_TYPES = {"uint", "uint2", "uint3", "ushort", "ushort2", "ushort3", "int", "short"}

# Calls that wait for other threads: on cpu a kernel making one runs its threads as fibers. A
# simdgroup matrix load is collective (mlm_simdgroup_matrix.h).
SYNC_CALL = re.compile(r"\b(threadgroup_barrier|simdgroup_barrier|simd_\w+|quad_\w+|simdgroup_load)\s*\(")


class KernelSourceError(Exception):
    """A kernel source problem, reported as `file:line: message` lines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class LintError(KernelSourceError):
    """The source uses MSL that Apple's compiler would reject or the emulation cannot honour."""


# ---------------------------------------------------------------- scanning

def blank_comments(text: str) -> str:
    """Replace comments and string/char literals with spaces, keeping every offset and newline."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            if text[i:j].startswith('"') and _is_include(text, i):
                i = j
                continue
        else:
            i += 1
            continue
        for k in range(i, j):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def _is_include(text: str, quote: int) -> bool:
    line_start = text.rfind("\n", 0, quote) + 1
    return text[line_start:quote].strip().startswith("#include")


def _match(text: str, open_at: int) -> int:
    """Index of the bracket closing the one at `open_at` (in comment-free text)."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    opener, closer = text[open_at], pairs[text[open_at]]
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == opener:
            depth += 1
        elif text[i] == closer:
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced")


def _split_top(text: str, sep: str = ",") -> list[tuple[int, str]]:
    """Split at top-level separators; returns (offset, piece) pairs."""
    pieces, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        elif c == sep and depth == 0:
            pieces.append((start, text[start:i]))
            start = i + 1
    pieces.append((start, text[start:]))
    return [(o, p) for o, p in pieces if p.strip()]


# ---------------------------------------------------------------- parsed forms

@dataclasses.dataclass(frozen=True)
class Field:
    type: str
    name: str
    count: int  # 1 for a scalar, n for `T name[n]`


@dataclasses.dataclass(frozen=True)
class Struct:
    name: str
    fields: tuple[Field, ...]
    line: int

    @property
    def scalar_only(self) -> bool:
        return all(f.type in SCALARS for f in self.fields)

    @property
    def nbytes(self) -> int:
        return 4 * sum(f.count for f in self.fields)


@dataclasses.dataclass(frozen=True)
class Param:
    """One kernel parameter: kind is 'buffer', 'constant' or 'builtin'."""

    kind: str
    name: str
    type: str  # declared type without the name, e.g. 'device const float*'
    index: int | None  # [[buffer(i)]]
    builtin: str | None
    loc: str  # file:line of the declaration

    @property
    def base_type(self) -> str:
        """The pointee/referent type with address space and qualifiers removed."""
        words = re.sub(r"[*&]", " ", self.type).split()
        return " ".join(w for w in words if w not in ("device", "constant", "const", "threadgroup", "thread", "volatile"))

    @property
    def writable(self) -> bool:
        return self.kind == "buffer" and "const" not in self.type.split() and not self.type.startswith("constant")


@dataclasses.dataclass(frozen=True)
class Function:
    name: str
    is_kernel: bool
    params_span: tuple[int, int]  # offsets of '(' and ')'
    body_span: tuple[int, int]  # offsets of '{' and '}'
    start: int  # offset of the declaration's first character
    line: int
    template: tuple["TemplateParam", ...] | None = None  # a function template's parameters


@dataclasses.dataclass(frozen=True)
class TemplateParam:
    """One parameter of a template kernel: `uint WM` (type 'uint') or `typename Acc` (type None)."""

    type: str | None
    name: str


@dataclasses.dataclass(frozen=True)
class Instance:
    """`template [[host_name("name")]] [[kernel]] decltype(fn<args>) fn<args>;`: a kernel `name`
    made of template kernel `fn` with `args`."""

    name: str
    template: str
    args: tuple[str, ...]
    offset: int  # of the instantiation's `template`
    end: int  # just past its `;`


@dataclasses.dataclass
class Kernel:
    """A parsed kernel signature."""

    name: str
    params: list[Param]
    source: "Source"
    function: Function
    uses_sync: bool  # calls barriers or simd functions (directly or through helpers)
    instance: Instance | None = None  # the instantiation this kernel is, for a template kernel

    def template_bindings(self) -> list[str]:
        """The template parameters as the local definitions a generated wrapper starts with."""
        if self.instance is None:
            return []
        return [f"    constexpr {p.type} {p.name} = ({a});" if p.type else f"    using {p.name} = {a};"
                for p, a in zip(self.function.template, self.instance.args)]

    @property
    def buffers(self) -> list[Param]:
        """Buffer and constant parameters in binding order."""
        return sorted((p for p in self.params if p.kind != "builtin"), key=lambda p: p.index)

    @property
    def builtins(self) -> list[Param]:
        return [p for p in self.params if p.kind == "builtin"]

    def struct_of(self, param: Param) -> Struct | None:
        return self.source.structs.get(param.base_type)

    @property
    def where(self) -> str:
        return self.source.loc(self.function.start)


class Source:
    """One MSL translation unit: a file in kernels/ or a user string, with local headers inlined."""

    def __init__(self, text: str, name: str = "<source>", include_dir: Path | None = None,
                 defines: dict[str, int] | None = None):
        self.name = name
        self.include_dir = include_dir or KERNEL_DIR
        self.defines = dict(defines or {})  # macros every target's translation unit starts with
        self.raw = text
        self.text, self.line_map = self._inline_includes(text, name)
        self.clean = blank_comments(self.text)

    @classmethod
    def from_file(cls, path: Path | str, defines: dict[str, int] | None = None) -> "Source":
        path = Path(path)
        return cls(path.read_text(), name=_display_name(path), include_dir=path.parent, defines=defines)

    # -- includes: local headers are inlined so every target compiles one self-contained unit
    def _inline_includes(self, text: str, name: str, seen: tuple = ()) -> tuple[str, list[tuple[str, int]]]:
        out, line_map = [], []
        for lineno, line in enumerate(text.split("\n"), 1):
            m = re.match(r'\s*#\s*include\s*"([^"]+)"', line)
            if m:
                path = self.include_dir / m.group(1)
                if not path.is_file() or path in seen:
                    why = "recursive include" if path in seen else f"header not found in {self.include_dir}"
                    raise LintError([f"{name}:{lineno}: include: {m.group(1)}: {why}"])
                sub, sub_map = self._inline_includes(path.read_text(), _display_name(path), seen + (path,))
                out.append(sub)
                line_map.extend(sub_map)
            else:
                out.append(line)
                line_map.append((name, lineno))
        return "\n".join(out), line_map

    def where(self, offset: int) -> tuple[str, int]:
        """(file, line) of an offset in the inlined text."""
        return self.line_map[self.text.count("\n", 0, offset)]

    def loc(self, offset: int) -> str:
        f, l = self.where(offset)
        return f"{f}:{l}"

    # -- top level
    @cached_property
    def functions(self) -> list[Function]:
        fns = []
        clean = self.clean
        for m in re.finditer(r"\b(\w+)\s*\(", clean):
            name = m.group(1)
            if name in ("if", "for", "while", "switch", "return", "sizeof", "defined"):
                continue
            if _depth_at(clean, m.start()) != 0:
                continue
            try:
                close = _match(clean, m.end() - 1)
            except ValueError:
                continue
            after = clean[close + 1:]
            brace = re.match(r"\s*(?:const\s*)?\{", after)
            if not brace:
                continue
            open_b = close + 1 + brace.end() - 1
            stmt = max(clean.rfind(c, 0, m.start()) for c in ";}")
            start = stmt + 1
            # a declaration starts after the last statement and after any preprocessor line
            while start < m.start() and (clean[start].isspace() or clean[start] == "#"):
                if clean[start] == "#":
                    eol = clean.find("\n", start)
                    if eol < 0 or eol > m.start():
                        break
                    start = eol
                start += 1
            decl = clean[start:m.start()]
            if decl.lstrip().startswith("#") or "=" in decl:
                continue
            fns.append(Function(name, bool(re.search(r"\bkernel\b", decl)), (m.end() - 1, close),
                                (open_b, _match(clean, open_b)), start, self.where(m.start())[1],
                                _template_params(decl)))
        return fns

    @cached_property
    def structs(self) -> dict[str, Struct]:
        structs = {}
        for m in re.finditer(r"\bstruct\s+(\w+)\s*\{", self.clean):
            body_end = _match(self.clean, m.end() - 1)
            fields = []
            for _, decl in _split_top(self.clean[m.end():body_end], ";"):
                for name_part in _field_names(decl):
                    fields.append(name_part)
            structs[m.group(1)] = Struct(m.group(1), tuple(fields), self.where(m.start())[1])
        return structs

    @cached_property
    def kernels(self) -> dict[str, Kernel]:
        """The dispatchable kernels: plain kernel functions, and each instantiation of a template kernel."""
        kernels = {}
        helpers = {f.name: f for f in self.functions if not f.is_kernel}
        templates = {f.name: f for f in self.functions if f.is_kernel and f.template is not None}
        for fn in self.functions:
            if fn.is_kernel and fn.template is None:
                kernels[fn.name] = Kernel(fn.name, self._params(fn), self, fn, self._uses_sync(fn, helpers))
        for inst in self.instances:
            fn = templates.get(inst.template)
            if fn is None or len(fn.template) != len(inst.args):
                why = f"no template kernel {inst.template}" if fn is None else \
                      f"{inst.template} takes {len(fn.template)} template arguments, not {len(inst.args)}"
                raise LintError([f"{self.loc(inst.offset)}: instantiation: {inst.name}: {why}"])
            kernels[inst.name] = Kernel(inst.name, self._params(fn), self, fn, self._uses_sync(fn, helpers), inst)
        return kernels

    @cached_property
    def instances(self) -> list[Instance]:
        """Every `template [[host_name("name")]] [[kernel]] decltype(fn<args>) fn<args>;` line."""
        found = []
        clean = self.clean
        for m in INSTANCE.finditer(clean):
            name = self.text[m.start("name"):m.end("name")].strip().strip('"')
            inner = clean[m.end() :_match(clean, m.end() - 1)]
            fn, args = inner.split("<", 1)
            args = args[:args.rindex(">")]
            end = clean.index(";", m.end())
            found.append(Instance(name, fn.strip(), tuple(a.strip() for _, a in _split_top(args)), m.start(), end + 1))
        return found

    @cached_property
    def constants(self) -> dict[str, int]:
        """Integer `#define NAME value` constants of the source and its headers, their values worked
        out (other such constants, + - * / % and parentheses): what Python shares with the kernels."""
        defines = dict(re.findall(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+([^\n]+)$", self.clean, re.M))
        values: dict[str, int] = {}

        def value(name, seen=()):
            if name not in values:
                expr = defines[name].strip()
                if name in seen or not re.fullmatch(r"[\w\s+\-*/%()]+", expr):
                    raise ValueError(name)
                names = {n: value(n, seen + (name,)) for n in re.findall(r"[A-Za-z_]\w*", expr)}
                values[name] = int(eval(expr.replace("/", "//"), {"__builtins__": {}}, names))
            return values[name]

        out = {}
        for name in defines:
            try:
                out[name] = value(name)
            except (ValueError, KeyError, SyntaxError, ZeroDivisionError, TypeError):
                pass  # not an integer constant (a function-like macro, a float, an expression of variables)
        return out

    def _params(self, fn: Function) -> list[Param]:
        params = []
        a, b = fn.params_span
        for offset, text in _split_top(self.clean[a + 1:b]):
            lead = len(text) - len(text.lstrip())
            where = self.loc(a + 1 + offset + lead)
            attr = re.search(r"\[\[\s*(\w+)\s*(?:\(\s*(\w+)\s*\))?\s*\]\]", text)
            decl = re.sub(r"\[\[.*?\]\]", " ", text).strip()
            nm = re.search(r"(\w+)\s*$", decl)
            name = nm.group(1) if nm else "?"
            ptype = " ".join(decl[: nm.start()].split()) if nm else decl
            if attr and attr.group(1) == "buffer":
                is_ref = "&" in ptype and "*" not in ptype
                kind = "constant" if is_ref and ptype.startswith("constant") else "buffer"
                index = int(attr.group(2)) if attr.group(2) and attr.group(2).isdigit() else None
                params.append(Param(kind, name, ptype, index, None, where))
            else:
                params.append(Param("builtin", name, ptype, None, attr.group(1) if attr else None, where))
        return params

    def _uses_sync(self, fn: Function, helpers: dict[str, Function]) -> bool:
        seen, todo = set(), [fn]
        while todo:
            f = todo.pop()
            body = self.clean[f.body_span[0]:f.body_span[1]]
            if SYNC_CALL.search(body):
                return True
            for call in re.findall(r"\b(\w+)\s*\(", body):
                if call in helpers and call not in seen:
                    seen.add(call)
                    todo.append(helpers[call])
        return False


def _display_name(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(KERNEL_DIR.parent))
    except ValueError:
        return str(path)


def _depth_at(clean: str, offset: int) -> int:
    return clean.count("{", 0, offset) - clean.count("}", 0, offset)


def _field_names(decl: str) -> list[Field]:
    decl = " ".join(decl.split())
    m = re.match(r"((?:const\s+)?[\w:]+(?:\s+int)?)\s+(.*)$", decl)
    if not m:
        return []
    ftype, names = m.group(1).replace("const ", ""), m.group(2)
    fields = []
    for _, item in _split_top(names):
        item = item.strip()
        arr = re.match(r"(\w+)\s*\[\s*(\d+)\s*\]$", item)
        if arr:
            fields.append(Field(ftype, arr.group(1), int(arr.group(2))))
        elif re.match(r"\w+$", item):
            fields.append(Field(ftype, item, 1))
    return fields


INSTANCE = re.compile(r"\btemplate\s*\[\[\s*host_name\s*\((?P<name>[^)]*)\)\s*\]\]\s*"
                      r"(?:\[\[\s*kernel\s*\]\]|kernel)\s*decltype\s*\(")


def _template_params(decl: str) -> tuple[TemplateParam, ...] | None:
    m = re.search(r"\btemplate\s*<(.*)>", decl, re.S)
    if not m:
        return None
    params = []
    for _, item in _split_top(m.group(1)):
        words = item.split()
        params.append(TemplateParam(None if words[0] in ("typename", "class") else " ".join(words[:-1]), words[-1]))
    return tuple(params)


# ---------------------------------------------------------------- lint

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
        (r"\bbfloat\w*|\bsimdgroup_bfloat8x8\b", "no-bfloat", "bfloat needs MSL 3.1; mlmetal targets MSL 2.3"),
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
        for offset, text in _split_top(clean[a + 1:b]):
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


# ---------------------------------------------------------------- generation

TARGETS = ("cpu", "cuda", "metal")
_TG_ARRAY = re.compile(r"\bthreadgroup(?=\s+(?:const\s+)?[\w:]+(?:\s*<[^;>]*>)?\s+\w+\s*\[)")


def _components(expr: tuple[str, ...], ctype: str) -> str:
    n = int(ctype[-1]) if ctype[-1].isdigit() else 1
    scalar = ctype.rstrip("234")
    parts = [f"({scalar})({expr[i] if i < len(expr) else '0u'})" for i in range(n)]
    return parts[0] if n == 1 else f"{ctype}({', '.join(parts)})"


def _builtin_lines(k: Kernel) -> list[str]:
    return [f"    {p.type} {p.name} = {_components(BUILTINS[p.builtin], p.type)};" for p in k.builtins]


def _binding_lines(k: Kernel, ref: str) -> list[str]:
    """Declare each buffer/constant parameter as a local bound from `ref(i)`."""
    return [line for p in k.buffers for line in _binding_lines_one(p, ref(p.index))]


def _binding_lines_one(p: Param, ref: str) -> list[str]:
    if p.kind == "constant" or "&" in p.type:
        ptr = p.type.replace("&", "*")
        return [f"    {p.type} {p.name} = *({ptr})({ref});"]
    return [f"    {p.type} {p.name} = ({p.type})({ref});"]


def by_value(p: Param) -> bool:
    """Whether the cuda wrapper takes this parameter's value as a kernel argument: every
    `constant T&`. The launch then carries the bytes itself (no upload before the kernel runs),
    and a companion pointer, null unless the caller bound a device buffer instead."""
    return p.kind == "constant" and "&" in p.type


def _cuda_param(p: Param) -> str:
    if by_value(p):
        return f"const {p.base_type} __mlm_v{p.index}, const void* __mlm_b{p.index}"
    return f"void* __mlm_b{p.index}"


def _cuda_binding_lines(k: Kernel) -> list[str]:
    lines = []
    for p in k.buffers:
        if not by_value(p):
            lines += _binding_lines_one(p, f"__mlm_b{p.index}")
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


def _launch_vars(lid: str) -> list[str]:
    return [
        f"    const uint __mlm_lid = {lid};",
        "    const uint __mlm_l0 = __mlm_lid % __mlm_t0, __mlm_l1 = (__mlm_lid / __mlm_t0) % __mlm_t1,"
        " __mlm_l2 = __mlm_lid / (__mlm_t0 * __mlm_t1);",
    ]


def generate(src: Source, target: str, threads: int | None = None) -> str:
    """The whole translation unit for `target`, with every kernel's entry wrapper.

    cpu:   per kernel, `<name>__mlm_group` (runs a threadgroup as a plain loop) and
           `<name>__mlm_thread` (runs one thread; the runtime gives it a fiber).
    cuda:  per kernel, an `extern "C" __global__` of the same name taking
           the buffers as pointers and a predicate pointer.
    metal: per kernel, a 1-D kernel for threadgroups of exactly `threads` threads
           that rebuilds the 3-D builtins from a launch buffer.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    if target == "metal" and not threads:
        raise ValueError("the metal wrapper is generated per threadgroup size: pass threads=")
    text, clean = src.text, src.clean
    # Instantiation lines are replaced by their kernels' wrappers: blank them, keeping the lines.
    for inst in src.instances:
        text = text[:inst.offset] + re.sub(r"[^\n]", " ", text[inst.offset:inst.end]) + text[inst.end:]
    out = [_defines(src), PRELUDE[target], _line(src, 0)]
    pos = 0
    by_function: dict[int, list[Kernel]] = {}
    for k in src.kernels.values():
        by_function.setdefault(k.function.start, []).append(k)
    for fn in sorted(src.functions, key=lambda f: f.start):
        if fn.start not in by_function:
            if fn.is_kernel:  # a template kernel never instantiated: nothing to compile
                out.append(text[pos:fn.start])
                pos = fn.body_span[1] + 1
            continue
        out.append(text[pos:fn.start])
        body_a, body_b = fn.body_span
        body = text[body_a:body_b + 1]
        if target != "metal":
            repl = "static thread_local" if target == "cpu" else "__shared__"
            body_clean = clean[body_a:body_b + 1]
            body = "".join(_sub_at(body, body_clean, _TG_ARRAY, repl))
        else:
            # Threadgroup arrays belong in the kernel function's outermost scope (OpenCL's rule,
            # which clang enforces and MSL's address spaces descend from), so the body's statements
            # join the wrapper's scope instead of nesting in a block of their own.
            body = body[1:-1]
        # A template kernel's body is written out once for each instantiation, after the
        # definitions of its template parameters.
        for k in by_function[fn.start]:
            out.append(_entry(k, target, threads))
            out.append("".join(line + "\n" for line in k.template_bindings()))
            out.append(_line(src, body_a) + body + "\n}\n")
            if target == "cpu":
                out.append(_cpu_entries(k))
        out.append(_line(src, body_b + 1))
        pos = body_b + 1
    out.append(text[pos:])
    return "".join(out)


def _defines(src: Source) -> str:
    return "".join(f"#define {name} {value}\n" for name, value in src.defines.items())


def _sub_at(text: str, clean: str, pattern: re.Pattern, repl: str):
    last = 0
    for m in pattern.finditer(clean):
        yield text[last:m.start()]
        yield repl
        last = m.end()
    yield text[last:]


def _line(src: Source, offset: int) -> str:
    f, l = src.where(min(offset, len(src.text) - 1)) if src.text else (src.name, 1)
    return f'\n#line {l} "{f}"\n'


def _entry(k: Kernel, target: str, threads: int | None) -> str:
    if target == "cpu":
        head = [f"static inline __attribute__((always_inline)) void {k.name}__mlm_body("
                "void* const* __mlm_b, const mlm_launch& __mlm_L, uint __mlm_g0, uint __mlm_g1, uint __mlm_g2, "
                "uint __mlm_lid, uint __mlm_l0, uint __mlm_l1, uint __mlm_l2) {",
                "    const uint __mlm_n0 = __mlm_L.groups[0], __mlm_n1 = __mlm_L.groups[1], __mlm_n2 = __mlm_L.groups[2];",
                "    const uint __mlm_t0 = __mlm_L.threads[0], __mlm_t1 = __mlm_L.threads[1], __mlm_t2 = __mlm_L.threads[2];",
                *_binding_lines(k, lambda i: f"__mlm_b[{i}]")]
    elif target == "cuda":
        args = ", ".join([_cuda_param(p) for p in k.buffers] + ["const unsigned int* __mlm_pred"])
        head = [f'extern "C" __global__ void {k.name}({args}) {{',
                "    if (__mlm_pred != nullptr && *__mlm_pred == 0u) return;",
                "    const uint __mlm_n0 = gridDim.x, __mlm_n1 = gridDim.y, __mlm_n2 = gridDim.z;",
                "    const uint __mlm_t0 = blockDim.x, __mlm_t1 = blockDim.y, __mlm_t2 = blockDim.z;",
                "    const uint __mlm_g0 = blockIdx.x, __mlm_g1 = blockIdx.y, __mlm_g2 = blockIdx.z;",
                *_launch_vars("threadIdx.z * __mlm_t0 * __mlm_t1 + threadIdx.y * __mlm_t0 + threadIdx.x"),
                *_cuda_binding_lines(k)]
    else:
        n = len(k.buffers)
        params = [f"{p.type} {p.name} [[buffer({p.index})]]" for p in k.buffers] + [
            f"device const uint* __mlm_pred [[buffer({n})]]",
            f"constant mlm_launch& __mlm_L [[buffer({n + 1})]]",
            f"device atomic_uint* __mlm_err [[buffer({n + 2})]]",
            "uint __mlm_id [[thread_position_in_grid]]",
            "uint __mlm_ptg [[threads_per_threadgroup]]",
        ]
        head = [f"[[max_total_threads_per_threadgroup({threads})]]",
                f"kernel void {k.name}(" + ",\n        ".join(params) + ") {",
                # The flag records the size Metal chose (never 0), for the runtime's error message.
                f"    if (__mlm_ptg != {threads}u) {{ atomic_store_explicit(__mlm_err, __mlm_ptg, memory_order_relaxed); return; }}",
                "    if (__mlm_L.has_pred != 0u && __mlm_pred[__mlm_L.pred_word] == 0u) return;",
                "    const uint __mlm_n0 = __mlm_L.groups[0], __mlm_n1 = __mlm_L.groups[1], __mlm_n2 = __mlm_L.groups[2];",
                "    const uint __mlm_t0 = __mlm_L.threads[0], __mlm_t1 = __mlm_L.threads[1], __mlm_t2 = __mlm_L.threads[2];",
                f"    const uint __mlm_g = __mlm_id / {threads}u;",
                "    const uint __mlm_g0 = __mlm_g % __mlm_n0, __mlm_g1 = (__mlm_g / __mlm_n0) % __mlm_n1, __mlm_g2 = __mlm_g / (__mlm_n0 * __mlm_n1);",
                *_launch_vars(f"__mlm_id % {threads}u")]
    unused = ["    (void)__mlm_n0; (void)__mlm_n1; (void)__mlm_n2; (void)__mlm_t0; (void)__mlm_t1; (void)__mlm_t2; (void)__mlm_g0; (void)__mlm_g1; (void)__mlm_g2;",
              "    (void)__mlm_lid; (void)__mlm_l0; (void)__mlm_l1; (void)__mlm_l2;"]
    return "\n".join(head + _builtin_lines(k) + unused) + "\n"


def _cpu_entries(k: Kernel) -> str:
    # The plain loop walks the threadgroup in thread_index order with the 3-D position kept
    # in counters: no division per thread, and the innermost loop is simple enough to vectorise.
    return (
        f'extern "C" void {k.name}__mlm_group(void* const* b, const mlm_launch* L, uint g0, uint g1, uint g2) {{\n'
        "    if (L->pred != nullptr && *L->pred == 0u) return;\n"
        "    const uint t0 = L->threads[0], t1 = L->threads[1], t2 = L->threads[2];\n"
        "    uint lid = 0;\n"
        "    for (uint l2 = 0; l2 < t2; ++l2)\n"
        "        for (uint l1 = 0; l1 < t1; ++l1)\n"
        f"            for (uint l0 = 0; l0 < t0; ++l0, ++lid) {k.name}__mlm_body(b, *L, g0, g1, g2, lid, l0, l1, l2);\n"
        "}\n"
        f'extern "C" void {k.name}__mlm_thread(void* const* b, const mlm_launch* L, uint g0, uint g1, uint g2, uint lid) {{\n'
        "    if (L->pred != nullptr && *L->pred == 0u) return;\n"
        "    const uint t0 = L->threads[0], t1 = L->threads[1];\n"
        f"    {k.name}__mlm_body(b, *L, g0, g1, g2, lid, lid % t0, (lid / t0) % t1, lid / (t0 * t1));\n"
        "}\n"
    )


PRELUDE = {
    "cpu": '#include "mlm_cpu_launch.h"\n',
    "cuda": '#include "mlm_cuda_launch.h"\n',
    "metal": (
        "#include <metal_stdlib>\nusing namespace metal;\n"
        "struct mlm_launch { uint groups[3]; uint threads[3]; uint pred_word; uint has_pred; };\n"
    ),
}


def find(library: str) -> Path:
    """The .metal file of a library name, e.g. 'elementwise' -> kernels/elementwise.metal."""
    path = KERNEL_DIR / f"{library}.metal"
    if not path.is_file():
        known = sorted(p.stem for p in KERNEL_DIR.glob("*.metal"))
        raise FileNotFoundError(f"no kernel library {library!r}: {path} does not exist (known: {', '.join(known)})")
    return path
