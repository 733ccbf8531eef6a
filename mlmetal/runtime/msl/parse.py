"""Reading MSL: a source's kernels, their signatures (buffers, `constant` structs, builtins,
declared extents), structs, template instantiations and integer constants.

A `Source` is one translation unit with its local headers inlined and a map back to each
line's file; everything here works on its comment-free copy, so offsets and lines agree.
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

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
if not KERNEL_DIR.is_dir():  # editable install / source checkout: kernels/ sits beside the package
    KERNEL_DIR = Path(__file__).resolve().parents[3] / "kernels"

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


def split_top(text: str, sep: str = ",") -> list[tuple[int, str]]:
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
            for _, decl in split_top(self.clean[m.end():body_end], ";"):
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
            kernels[inst.name] = Kernel(inst.name, _instantiated(self._params(fn), fn.template, inst.args), self, fn,
                                        self._uses_sync(fn, helpers), inst)
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
            found.append(Instance(name, fn.strip(), tuple(a.strip() for _, a in split_top(args)), m.start(), end + 1))
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
        for offset, text in split_top(self.clean[a + 1:b]):
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
    for _, item in split_top(names):
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

SCALAR_BYTES = {"bool": 1, "char": 1, "uchar": 1, "short": 2, "ushort": 2, "half": 2, "bfloat": 2, "int": 4, "uint": 4,
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


def _instantiated(params: list[Param], template: tuple[TemplateParam, ...], args: tuple[str, ...]) -> list[Param]:
    """A template kernel's parameters with its type parameters replaced by an instantiation's
    arguments (`device const T* x` of `f<half>` is `device const half* x`): what the wrappers
    declare and the extents are sized by."""
    types = {p.name: a for p, a in zip(template, args) if p.type is None}
    if not types:
        return params
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, types)) + r")\b")
    return [dataclasses.replace(p, type=pattern.sub(lambda m: types[m.group(1)], p.type)) for p in params]


def _template_params(decl: str) -> tuple[TemplateParam, ...] | None:
    m = re.search(r"\btemplate\s*<(.*)>", decl, re.S)
    if not m:
        return None
    params = []
    for _, item in split_top(m.group(1)):
        words = item.split()
        params.append(TemplateParam(None if words[0] in ("typename", "class") else " ".join(words[:-1]), words[-1]))
    return tuple(params)


LAUNCH_H = Path(__file__).resolve().parents[1] / "include" / "mlm_launch.h"


def launch_struct() -> Struct:
    """struct mlm_launch of include/mlm_launch.h, as the wrappers read it (the backends pack it from this)."""
    return Source(LAUNCH_H.read_text(), name=LAUNCH_H.name).structs["mlm_launch"]


def find(library: str) -> Path:
    """The .metal file of a library name, e.g. 'elementwise' -> kernels/elementwise.metal."""
    path = KERNEL_DIR / f"{library}.metal"
    if not path.is_file():
        known = sorted(p.stem for p in KERNEL_DIR.glob("*.metal"))
        raise FileNotFoundError(f"no kernel library {library!r}: {path} does not exist (known: {', '.join(known)})")
    return path
