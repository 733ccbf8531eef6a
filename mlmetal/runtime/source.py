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

import ast
import dataclasses
import numbers
import re
import struct
from functools import cached_property
from pathlib import Path
from typing import Any

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

# `device float* y [[buffer(1)]],  // extent: p.n` — the comment after the last parameter of a line.
EXTENT = re.compile(r"[\s,){]*//\s*extent:\s*([^;\n]*)")

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
    extent: str | None = None  # the `// extent: EXPR` after a buffer parameter: elements it may touch
    extent_loc: str = ""  # file:line of that comment

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

    @cached_property
    def extents(self) -> list["Extent"]:
        """The declared extent of every buffer parameter that has one (the lint has checked them)."""
        return [compile_extent(self, p) for p in self.buffers if p.extent is not None]

    def unpack(self, param: Param, data: bytes) -> dict | int | float:
        """The values in a constant's packed bytes: a dict of its struct's fields, or its scalar."""
        st = self.struct_of(param)
        if st is None:
            return struct.unpack_from("<" + SCALARS[param.base_type], data)[0]
        flat = struct.unpack_from("<" + "".join(SCALARS[f.type] * f.count for f in st.fields), data)
        values, at = {}, 0
        for f in st.fields:
            values[f.name] = flat[at] if f.count == 1 else list(flat[at:at + f.count])
            at += f.count
        return values

    def extent_bytes(self, values: dict) -> list[tuple[Param, int, int]]:
        """(parameter, elements, bytes) each declared extent reaches, for constants given as
        `values` (parameter name -> dict of fields, or a scalar). Extents that read a constant
        bound as a buffer, whose values the host does not see, are left out."""
        out = []
        for e in self.extents:
            scope = {name: values.get(name) for name in e.uses}
            if all(isinstance(v, (dict, numbers.Number)) for v in scope.values()):
                try:
                    count = int(eval(e.code, {"__builtins__": {}, "min": min, "max": max}, scope))
                except (ArithmeticError, LookupError, TypeError, ValueError):
                    continue  # e.g. a zero divisor: the kernel's own arithmetic fails alike, not its bounds
                out.append((e.param, count, max(count, 0) * e.item))
        return out


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

    @cached_property
    def include_breaks(self) -> list[tuple[int, str, int]]:
        """(offset, file, line) of each line of the inlined text that does not follow its predecessor
        in the same file: where a header's lines start, and where the includer's resume."""
        starts = [0] + [m.end() for m in re.finditer("\n", self.text)]
        return [(starts[i], *self.line_map[i]) for i in range(1, len(self.line_map))
                if self.line_map[i] != (self.line_map[i - 1][0], self.line_map[i - 1][1] + 1)]

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
            end = a + 1 + offset + len(text)
            eol = self.text.find("\n", end)
            extent = EXTENT.match(self.text, end, len(self.text) if eol < 0 else eol)
            extent = (extent.group(1).strip(), self.loc(extent.start(1))) if extent else (None, "")
            if attr and attr.group(1) == "buffer":
                is_ref = "&" in ptype and "*" not in ptype
                kind = "constant" if is_ref and ptype.startswith("constant") else "buffer"
                index = int(attr.group(2)) if attr.group(2) and attr.group(2).isdigit() else None
                params.append(Param(kind, name, ptype, index, None, where, *extent))
            else:
                params.append(Param("builtin", name, ptype, None, attr.group(1) if attr else None, where, *extent))
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


# ---------------------------------------------------------------- extents
#
# A buffer parameter may declare how many elements of its type the kernel touches, as a C
# expression over the kernel's constants, in a comment after the parameter:
#
#     device float* y [[buffer(1)]],  // extent: p.n
#
# Binding then refuses a smaller buffer, and the bounds-checked cpu build holds accesses to it.

SCALAR_BYTES = {"bool": 1, "char": 1, "uchar": 1, "short": 2, "ushort": 2, "half": 2, "int": 4, "uint": 4,
                "float": 4, "unsigned": 4, "unsigned int": 4, "atomic_int": 4, "atomic_uint": 4}


def layout(type_: str, structs: dict[str, Struct]) -> tuple[int, int] | None:
    """(size, alignment) of an MSL type in a buffer, or None for a type this cannot size."""
    t = " ".join(re.sub(r"\b(?:const|volatile)\b", " ", type_).split())
    atomic = re.fullmatch(r"atomic\s*<\s*(\w+)\s*>", t)
    if atomic:
        t = atomic.group(1)
    if t in SCALAR_BYTES:
        return SCALAR_BYTES[t], SCALAR_BYTES[t]
    vec = re.fullmatch(r"(\w+?)([234])", t)
    if vec and vec.group(1) in SCALAR_BYTES:
        size = SCALAR_BYTES[vec.group(1)] * (4 if vec.group(2) == "3" else int(vec.group(2)))
        return size, size
    st = structs.get(t)
    if st is None:
        return None
    size, align = 0, 1
    for f in st.fields:
        fl = layout(f.type, structs)
        if fl is None:
            return None
        size = -(-size // fl[1]) * fl[1] + fl[0] * f.count
        align = max(align, fl[1])
    return -(-size // align) * align, align


@dataclasses.dataclass(frozen=True)
class Extent:
    param: Param
    code: Any  # the expression compiled for eval
    uses: frozenset[str]  # the constant parameters it reads
    item: int  # bytes of one element


_EXTENT_OPS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Mod, ast.LShift, ast.RShift, ast.USub, ast.UAdd)


def compile_extent(k: Kernel, p: Param) -> Extent:
    """A parameter's extent expression compiled; ValueError saying what is wrong with it."""
    if p.kind != "buffer" or "*" not in p.type:
        raise ValueError("only buffer pointers declare an extent")
    item = layout(p.base_type, k.source.structs)
    if item is None:
        raise ValueError(f"cannot size its element type `{p.base_type}`")
    constants = {c.name: k.struct_of(c) for c in k.buffers if c.kind == "constant"}
    try:
        tree = ast.parse(re.sub(r"\b(\d+)[uU]\b", r"\1", p.extent), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot read `{p.extent}` (integers, + - * / % << >>, min, max, and the kernel's "
                         "constants such as p.n)") from None
    uses = set()

    class ToPython(ast.NodeTransformer):  # C's integer `/`, and struct fields read from dicts
        def visit_BinOp(self, node):
            self.generic_visit(node)
            return ast.BinOp(node.left, ast.FloorDiv() if isinstance(node.op, ast.Div) else node.op, node.right)

        def visit_Attribute(self, node):
            st = constants.get(getattr(node.value, "id", None))
            if st is None or node.attr not in {f.name for f in st.fields}:
                raise ValueError(f"`{ast.unparse(node)}` is not a field of the kernel's constants")
            uses.add(node.value.id)
            return ast.Subscript(node.value, ast.Constant(node.attr), ast.Load())

        def visit_Name(self, node):
            if node.id not in constants or constants[node.id] is not None:
                raise ValueError(f"`{node.id}` is not a scalar constant of the kernel")
            uses.add(node.id)
            return node

        def visit_Call(self, node):
            if getattr(node.func, "id", None) not in ("min", "max") or node.keywords or len(node.args) < 2:
                raise ValueError("only min(a, b) and max(a, b) may be called")
            node.args = [self.visit(a) for a in node.args]
            return node

        def generic_visit(self, node):
            if not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Subscript, ast.Load) + _EXTENT_OPS) \
                    and not (isinstance(node, ast.Constant) and type(node.value) is int):
                raise ValueError(f"`{ast.unparse(node)}` is not allowed in an extent")
            return super().generic_visit(node)

    # Safe to eval: the tree holds nothing but arithmetic on integers and the constants' values.
    tree = ast.fix_missing_locations(ToPython().visit(tree))
    return Extent(p, compile(tree, p.extent_loc, "eval"), frozenset(uses), item[0])


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


def generate(src: Source, target: str, threads: int | None = None, check_bounds: bool = False) -> str:
    """The whole translation unit for `target`, with every kernel's entry wrapper.

    cpu:   per kernel, `<name>__mlm_group` (runs a threadgroup as a plain loop) and
           `<name>__mlm_thread` (runs one thread; the runtime gives it a fiber). With
           `check_bounds`, device, constant and threadgroup pointers and threadgroup arrays
           become checked pointers (include/mlm_cpu_check.h), and the wrapper takes each
           buffer's extent and an error record after the buffers.
    cuda:  per kernel, an `extern "C" __global__` of the same name taking
           the buffers as pointers and a predicate pointer.
    metal: per kernel, a 1-D kernel for threadgroups of exactly `threads` threads
           that rebuilds the 3-D builtins from a launch buffer.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")
    if target == "metal" and not threads:
        raise ValueError("the metal wrapper is generated per threadgroup size: pass threads=")
    if check_bounds and target != "cpu":
        raise ValueError("bounds checking is a build of the cpu target only")
    text = src.text
    # Instantiation lines are replaced by their kernels' wrappers: blank them, keeping the lines.
    for inst in src.instances:
        text = text[:inst.offset] + re.sub(r"[^\n]", " ", text[inst.offset:inst.end]) + text[inst.end:]
    rules = [(_POINTER, _checked_pointer)] if check_bounds else []
    out = [_defines(src), PRELUDE[target] + (CHECK_PRELUDE if check_bounds else ""), _line(src, 0)]
    pos = 0
    by_function: dict[int, list[Kernel]] = {}
    for k in src.kernels.values():
        by_function.setdefault(k.function.start, []).append(k)
    for fn in sorted(src.functions, key=lambda f: f.start):
        if fn.start not in by_function:
            if fn.is_kernel:  # a template kernel never instantiated: nothing to compile
                out.append(_emit(src, text, pos, fn.start, rules))
                pos = fn.body_span[1] + 1
            continue
        out.append(_emit(src, text, pos, fn.start, rules))
        body_a, body_b = fn.body_span
        # A template kernel's body is written out once for each instantiation, after the
        # definitions of its template parameters.
        for k in by_function[fn.start]:
            if check_bounds:
                body = _emit(src, text, body_a, body_b + 1, [(_TG_DECL, lambda m: _checked_array(m, k.name)),
                                                              (_TG_ARRAY, lambda m: "static thread_local"), *rules])
            elif target != "metal":
                body = _emit(src, text, body_a, body_b + 1,
                             [(_TG_ARRAY, lambda m: "static thread_local" if target == "cpu" else "__shared__")])
            else:
                # Threadgroup arrays belong in the kernel function's outermost scope (OpenCL's rule,
                # which clang enforces and MSL's address spaces descend from), so the body's statements
                # join the wrapper's scope instead of nesting in a block of their own.
                body = _emit(src, text, body_a + 1, body_b)
            out.append(_entry(k, target, threads, check_bounds))
            out.append("".join(line + "\n" for line in k.template_bindings()))
            out.append(_line(src, body_a) + body + "\n}\n")
            if target == "cpu":
                out.append(_cpu_entries(k))
        out.append(_line(src, body_b + 1))
        pos = body_b + 1
    out.append(_emit(src, text, pos, len(text), rules))
    return "".join(out)


def _defines(src: Source) -> str:
    return "".join(f"#define {name} {value}\n" for name, value in src.defines.items())


def _emit(src: Source, text: str, a: int, b: int, rules=()) -> str:
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


def _line(src: Source, offset: int) -> str:
    f, l = src.where(min(offset, len(src.text) - 1)) if src.text else (src.name, 1)
    return f'\n#line {l} "{f}"\n'


def _checked_binding_lines(k: Kernel) -> list[str]:
    """Each buffer pointer as a checked pointer over its region: the extents and the error
    record come after the buffers in the wrapper's array of pointers."""
    n = len(k.buffers)
    lines = [f"    const unsigned long long* __mlm_ext = (const unsigned long long*)__mlm_b[{n}];",
             f"    mlm_bounds_error* __mlm_err = (mlm_bounds_error*)__mlm_b[{n + 1}];"]
    for p in k.buffers:
        if p.kind == "constant" or "&" in p.type:
            lines += _binding_lines_one(p, f"__mlm_b[{p.index}]")
            continue
        i = p.index
        lines += [f'    const ::metal::check::region __mlm_r{i}(__mlm_b[{i}], __mlm_ext[{i}], "buffer `{p.name}` '
                  f'[[buffer({i})]]", "{k.name}", {i}, __mlm_err);',
                  f"    {_POINTER.sub(_checked_pointer, p.type)} {p.name}(__mlm_b[{i}], &__mlm_r{i});"]
    return lines


def _entry(k: Kernel, target: str, threads: int | None, check_bounds: bool = False) -> str:
    if target == "cpu":
        head = [f"static inline __attribute__((always_inline)) void {k.name}__mlm_body("
                "void* const* __mlm_b, const mlm_launch& __mlm_L, uint __mlm_g0, uint __mlm_g1, uint __mlm_g2, "
                "uint __mlm_lid, uint __mlm_l0, uint __mlm_l1, uint __mlm_l2) {",
                "    const uint __mlm_n0 = __mlm_L.groups[0], __mlm_n1 = __mlm_L.groups[1], __mlm_n2 = __mlm_L.groups[2];",
                "    const uint __mlm_t0 = __mlm_L.threads[0], __mlm_t1 = __mlm_L.threads[1], __mlm_t2 = __mlm_L.threads[2];",
                *(_checked_binding_lines(k) if check_bounds else _binding_lines(k, lambda i: f"__mlm_b[{i}]"))]
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


CHECK_PRELUDE = '#include "mlm_cpu_check.h"\n'
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
