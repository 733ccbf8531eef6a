"""Saving and loading models: a directory, or a `.zip`, holding graph.json and weights.safetensors.

graph.json describes the inference graph — its inputs, its parameters by dotted name, its
nodes (op name, normalised attributes, input references, output shapes and dtypes) and its
named outputs — and the optimizer's hyper-parameters and step count. weights.safetensors
holds the parameters and the optimizer's state under dotted names (`conv1.weight`,
`optimizer.adam.m.conv1.weight`), written by the `safetensors` library, so PyTorch and
other tools read them too. Neither file can carry code: the loader parses JSON and a
safetensors header, checks every field against the op registry and against each other,
and only then allocates on the device (DESIGN §6). Every problem is one `FormatError`
saying what is wrong and where.

Version 1 of graph.json:

    {"format": "mlmetal", "version": 1, "kind": "graph",          # or "module": no nodes
     "inputs":     [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32"}],
     "parameters": [{"name": "0.weight", "shape": [4, 3, 3, 3], "dtype": "float32", "trainable": true}],
     "nodes":      [{"op": "conv2d", "inputs": [{"input": "x"}, {"param": "0.weight"}],
                     "attrs": {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1},
                     "outputs": [{"shape": [1, 4, 8, 8], "dtype": "float32"}]}],
     "outputs":    {"output": {"node": 0, "output": 0}},
     "optimizer":  {"type": "adam", "steps": 3, "parameters": ["0.weight"],
                    "attrs": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999, "eps": 1e-08, "weight_decay": 0.0}}}

A parameter's "trainable" is null for a constant (a plain tensor a node reads, such as a
loss's target); "stop_gradient": true may mark any input, parameter or node output.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import errno
import inspect
import json
import math
import os
import secrets
import shutil
import stat
import zipfile
import zlib
from pathlib import Path

import numpy as np
import safetensors.numpy

from . import dtypes as D
from . import ops
from .graph import Graph, GraphTensor
from .nn import Module, Parameter
from .optim import Optimizer
from .tensor import Tensor, _device, empty

VERSION = 1
GRAPH, WEIGHTS = "graph.json", "weights.safetensors"

# Sane limits: a file that claims more is refused before anything that size is read or allocated.
MAX_JSON_BYTES = 64 << 20          # graph.json, and the safetensors header
MAX_NODES = 100_000
MAX_TENSORS = 100_000              # inputs, parameters, or weights entries
MAX_NAME = 512                     # characters in a name
MAX_NDIM = 8
MAX_TENSOR_ELEMENTS = 2**31 - 1    # kernels index elements with 32-bit integers
MAX_TOTAL_ELEMENTS = 2**34         # over every tensor graph.json describes
MAX_NODE_INPUTS = 1024
MAX_ATTRS = 64                     # per node; an attribute list holds at most this many items too
MAX_ATTR_DEPTH = 3
MAX_ATTR_INT = 2**31               # kernels take 32-bit constants
MAX_ZIP_MEMBERS = 64
MAX_FLOAT = float(np.finfo(np.float32).max)  # float attributes reach the kernels as float32
READ_CHUNK = 8 << 20               # bytes of weights read at a time

_DTYPES = {str(d): d for d in D.DTYPES}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32"}


class FormatError(ValueError):
    """A saved model that is malformed, inconsistent, or does not fit what it is loaded into."""


def _fail(where: str, message: str):
    raise FormatError(f"{where}: {message}")


# ---------------------------------------------------------------- saving

def save(path, what, optimizer: Optimizer | None = None, *, outputs=None, module: Module | None = None) -> None:
    """Save a graph (or a module's weights), and optionally an optimizer's state, to `path`.

    A graph is saved as the nodes its outputs depend on (gradient and update nodes of a
    derived training graph are left out: derive it again after loading), with the inputs and
    parameters those nodes read. A module is saved as its weights only: graph.json then lists
    its parameters and no nodes. Parameters are named by dotted name; a graph's tensors that
    have no name, or share one, are saved as `leaves.<i>`.

    In data-parallel training (`mm.distributed`), rank 0 alone writes; on the other ranks this
    does nothing.

    Args:
        path: a directory, or a file ending in `.zip`.
        what: an `mm.Graph` or an `mm.nn.Module`.
        optimizer: an `mm.optim` optimizer over parameters being saved (or an
            `mm.distributed.DataParallel` of one); its state and hyper-parameters are saved with them.
        outputs: for a graph, the tensors to record: {name: tensor}, a list (named
            output0, output1, ...) or one tensor (named output). Default: the outputs of the
            last node that is neither a gradient nor an optimizer update.
        module: for a graph, the module whose dotted names its parameters are saved under
            (default: each parameter's `name`, which `mm.load` sets and is otherwise empty).

    Example:
        >>> mm.save("denoiser.zip", graph, outputs={"rgb": y}, module=net)
        >>> mm.save("ckpt", net, optimizer=opt)
    """
    from . import distributed

    if distributed.rank() != 0:  # every rank holds the same model: one writes it
        return
    if isinstance(optimizer, distributed.DataParallel):
        optimizer = optimizer.optimizer
    path = _target(path)
    if isinstance(what, Graph):
        names = {} if module is None else {id(p): name for name, p in module.named_parameters().items()}
        meta, tensors = _describe_graph(what, outputs, names)
    elif isinstance(what, Module):
        if outputs is not None:
            raise FormatError("outputs= applies to a graph; a module is saved as its weights only")
        meta, tensors = _describe_module(what)
    else:
        raise TypeError(f"mm.save saves an mm.Graph or an mm.nn.Module, got {type(what).__name__}")
    if optimizer is not None:
        meta["optimizer"] = _describe_optimizer(optimizer, tensors)
    # A saved file must load: run the loader's own checks on what is about to be written.
    _validate(json.loads(json.dumps(meta)))
    arrays = {name: np.ascontiguousarray(t.numpy()) for name, t in tensors.items()}
    graph_bytes = _dumps(meta).encode()
    weight_bytes = safetensors.numpy.save(arrays, metadata={"format": "mlmetal", "version": str(VERSION)})
    _write(path, graph_bytes, weight_bytes)


def _describe_module(module: Module):
    params = module.named_parameters()
    meta = _header("module")
    meta["parameters"] = [_tensor_entry(name, p, trainable=bool(p.trainable)) for name, p in params.items()]
    return meta, dict(params)


def _describe_graph(graph: Graph, outputs, names: dict):
    named = _named_outputs(graph, outputs)
    nodes = _nodes_for(graph, named.values())
    # name every leaf the saved nodes read: its dotted name (`names`, by id) or its own, where set and unique
    leaves = [x for n in nodes for x in n.inputs if x.node is None and x.value is not None]
    leaves = list(dict.fromkeys(leaves))
    own = [names.get(id(t.value)) or getattr(t.value, "name", "") or "" for t in leaves]
    uses = collections.Counter(own)
    leaf_names = {t: name if name and uses[name] == 1 and not name.startswith("leaves.") else f"leaves.{i}"
                  for i, (t, name) in enumerate(zip(leaves, own))}
    used_inputs = {x for n in nodes for x in n.inputs if x.is_input}
    index = {id(n): i for i, n in enumerate(nodes)}

    def ref(x: GraphTensor) -> dict:
        if x.node is not None:
            return {"node": index[id(x.node)], "output": x.node.outputs.index(x)}
        if x.value is not None:
            return {"param": leaf_names[x]}
        return {"input": x.name}

    meta = _header("graph")
    meta["inputs"] = [_tensor_entry(name, t, stop_gradient=t.stop_gradient)
                      for name, t in graph.inputs.items() if t in used_inputs]
    meta["parameters"] = [_tensor_entry(leaf_names[t], t.value, stop_gradient=t.stop_gradient,
                                        trainable=bool(t.value.trainable) if isinstance(t.value, Parameter) else None)
                          for t in leaves]
    for i, n in enumerate(nodes):
        where = f"node {i} ({n.op})"
        if n.predicate is not None:
            raise FormatError(f"{where} is predicated; a predicate is a device buffer and cannot be saved")
        meta["nodes"].append({
            "op": n.op, "inputs": [ref(x) for x in n.inputs],
            "attrs": {k: _to_json(v, f"{where}: attribute {k!r}") for k, v in n.attrs.items()},
            "outputs": [_tensor_entry(None, o, stop_gradient=o.stop_gradient) for o in n.outputs]})
    meta["outputs"] = {name: ref(t) for name, t in named.items()}
    return meta, {leaf_names[t]: t.value for t in leaves}


def _named_outputs(graph: Graph, outputs) -> dict[str, GraphTensor]:
    if outputs is None:
        # training_graph appends initial_gradient outside its gradient nodes: skip it too
        forward = [n for n in graph.nodes if n.gradient_of is None and n.op != "initial_gradient"
                   and all(o.value is None for o in n.outputs)]
        if not forward:
            raise FormatError("the graph has no nodes to save")
        outputs = list(forward[-1].outputs)
        outputs = outputs[0] if len(outputs) == 1 else outputs
    if isinstance(outputs, GraphTensor):
        outputs = {"output": outputs}
    elif isinstance(outputs, (list, tuple)):
        outputs = {f"output{i}": t for i, t in enumerate(outputs)}
    for name, t in outputs.items():
        if not isinstance(t, GraphTensor) or t.graph is not graph:
            raise FormatError(f"output {name!r} is not a tensor of this graph")
        if t.node is None:
            raise FormatError(f"output {name!r} is an input or a parameter, not a node's output")
    return dict(outputs)


def _nodes_for(graph: Graph, outputs) -> list:
    """The nodes the outputs depend on, in tape order; in-place updates cannot be among them."""
    needed, todo = set(), [t.node for t in outputs]
    while todo:
        n = todo.pop()
        if id(n) in needed:
            continue
        needed.add(id(n))
        if any(o.value is not None for o in n.outputs):
            raise FormatError(f"an output depends on an in-place {n.op} node; save the inference graph and derive "
                              f"its training graph again after loading")
        todo += [x.node for x in n.inputs if x.node is not None]
    return [n for n in graph.nodes if id(n) in needed]


def _describe_optimizer(opt: Optimizer, tensors: dict) -> dict:
    if Optimizer.KINDS.get(getattr(opt, "name", None)) is not type(opt):
        raise FormatError(f"cannot save a {type(opt).__name__}: the format knows {', '.join(Optimizer.KINDS)}")
    by_id = {id(t): name for name, t in tensors.items()}
    lost = [p for p in opt.params if id(p) not in by_id]
    if lost:
        raise FormatError(f"{len(lost)} of the optimizer's parameters (shapes {[p.shape for p in lost][:4]}) are not "
                          f"among the saved parameters")
    names = [by_id[id(p)] for p in opt.params]
    tensors.update(opt.saved_state(names))
    entry = opt.describe(names)
    entry["attrs"] = {k: _to_json(v, f"optimizer attribute {k!r}") for k, v in entry["attrs"].items()}
    return entry


def _dumps(meta: dict) -> str:
    """graph.json text: one line per input, parameter, node and output, so a diff reads like the graph."""
    def block(v, open_, close, items):
        return f"{open_}\n" + ",\n".join(f"  {x}" for x in items) + f"\n {close}" if v else json.dumps(v)

    lines = []
    for k, v in meta.items():
        if isinstance(v, list):
            body = block(v, "[", "]", (json.dumps(x, allow_nan=False) for x in v))
        elif k == "outputs":
            body = block(v, "{", "}", (f"{json.dumps(n)}: {json.dumps(r)}" for n, r in v.items()))
        else:
            body = json.dumps(v, allow_nan=False)
        lines.append(f" {json.dumps(k)}: {body}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _header(kind: str) -> dict:
    return {"format": "mlmetal", "version": VERSION, "kind": kind, "inputs": [], "parameters": [], "nodes": [],
            "outputs": {}}


def _tensor_entry(name, t, stop_gradient=False, **extra) -> dict:
    entry = {} if name is None else {"name": name}
    entry.update(shape=list(t.shape), dtype=str(np.dtype(t.dtype)), **extra)
    if stop_gradient:
        entry["stop_gradient"] = True
    return entry


def _to_json(v, where: str):
    """An attribute value as JSON: None, bool, int, finite float, str, or lists of them."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            raise FormatError(f"{where} is {v}; the format stores finite numbers only")
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_to_json(x, where) for x in v]
    raise FormatError(f"{where} is a {type(v).__name__}, which has no JSON form (random_tensor nodes hold a "
                      f"generator and cannot be saved; feed random inputs instead)")


def _target(path) -> Path:
    """The path a model is saved to; refused when it names no model (`mm.save("")` would write into the cwd)."""
    if Path(path).name in ("", ".."):
        raise ValueError(f"mm.save: {os.fspath(path)!r} names no model; give a directory or a file ending in .zip")
    return Path(path)


def _write(path: Path, graph_bytes: bytes, weight_bytes: bytes) -> None:
    """Write a saved model so that `path` holds the old model or the whole new one at every moment.

    Each save is written beside `path` under a temporary name and then renamed over it: a `.zip`
    with one rename, a directory by exchanging the two directories. New files and directories
    get the modes `open` and `mkdir` give (0666 and 0777 less the umask). Errors name `path`.
    """
    _check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".zip":
            _write_zip(path, graph_bytes, weight_bytes)
        else:
            _write_directory(path, {WEIGHTS: weight_bytes, GRAPH: graph_bytes})
    except OSError as e:
        # a temporary's name means nothing to the caller: say which path could not be saved, and why
        raise type(e)(e.errno, f"cannot save {path}: {e.strerror or e}") from None


def _check_target(path: Path) -> None:
    """Refuse, before anything is written, a path that cannot hold a model or holds something else."""
    for parent in path.parents:  # the nearest that exists must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, f"cannot save {path}: {parent} is not a directory")
            break
    if path.suffix == ".zip":
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, f"cannot save {path}: {path} is a directory; a .zip model is a file")
    elif path.exists():
        if not path.is_dir():
            raise FileExistsError(errno.EEXIST, f"cannot save {path}: {path} is a file; a model without .zip is "
                                                f"a directory")
        # the whole directory is replaced: what is not a saved model's would be lost with it
        others = sorted(set(os.listdir(path)) - {GRAPH, WEIGHTS})
        if others:
            raise FileExistsError(errno.EEXIST, f"cannot save {path}: it holds files other than a saved model's: "
                                                f"{_few(others)}")


def _temporary(path: Path) -> Path:
    """An unused name beside `path`, hidden, for a save in progress."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def _create(path: Path):
    """A new file open for writing; the umask applies to its mode, as for `open(path, "w")`."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def _write_zip(path: Path, graph_bytes: bytes, weight_bytes: bytes) -> None:
    tmp = _temporary(path)
    try:
        with _create(tmp) as f, zipfile.ZipFile(f, "w") as zf:
            zf.writestr(GRAPH, graph_bytes, compress_type=zipfile.ZIP_DEFLATED)
            zf.writestr(WEIGHTS, weight_bytes, compress_type=zipfile.ZIP_STORED)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_directory(path: Path, members: dict) -> None:
    if path.is_symlink() and path.is_dir():
        path = Path(os.path.realpath(path))  # save into the directory the link names, as before
    old = path.stat() if path.exists() else None
    tmp = _temporary(path)
    os.mkdir(tmp, 0o777)
    try:
        if old is not None:
            os.chmod(tmp, stat.S_IMODE(old.st_mode))  # the model directory keeps its permissions
        for name, data in members.items():
            with _create(tmp / name) as f:
                f.write(data)
        if old is None:
            os.rename(tmp, path)
            return
        if not _exchange(tmp, path):  # no atomic exchange here: the old model steps aside for a moment
            aside = _temporary(path)
            os.rename(path, aside)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(aside, path)
                raise
            tmp = aside
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # the old model, now under the temporary name


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux's renameat2, macOS's renamex_np); False where the system cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        result = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), ctypes.c_uint(rename_exchange))
    elif hasattr(libc, "renamex_np"):
        rename_swap = 2
        result = libc.renamex_np(os.fsencode(a), os.fsencode(b), ctypes.c_uint(rename_swap))
    else:
        return False
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # a file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


# ---------------------------------------------------------------- reading archives

class _Archive:
    """The two members of a saved model, read with bounded sizes from a directory or a zip.

    Errors name the member, not the path: `_read` puts the path in front of every message.
    """

    def __init__(self, path: Path):
        self.zip = self.dir = None
        if path.suffix == ".zip":
            file, _ = _open_regular(path, "the archive", follow=True)  # the caller's own path may be a link
            try:
                self.zip = zipfile.ZipFile(file)
            except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, NotImplementedError) as e:
                file.close()
                raise FormatError(f"not a readable zip archive ({e})") from None
            try:
                self._check_members()
            except FormatError:
                self.zip.close()
                raise
            return
        try:
            # members are opened relative to this handle: a save swapping the directory meanwhile gives an
            # error, never graph.json of one model and the weights of another
            self.dir = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except (FileNotFoundError, NotADirectoryError):
            raise FormatError("no saved model here (expected a directory, or a file ending in .zip)") from None

    def _check_members(self) -> None:
        infos = self.zip.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise FormatError(f"{len(infos)} archive members; a saved model has 2")
        seen = set()
        for info in infos:
            name = info.filename
            parts = name.replace("\\", "/").split("/")
            if not name or name.startswith(("/", "\\")) or "\\" in name or ".." in parts or ":" in name or "\0" in name:
                raise FormatError(f"archive member {name[:MAX_NAME]!r} has a path outside the archive")
            if name in seen:
                raise FormatError(f"archive member {name[:MAX_NAME]!r} appears twice")
            seen.add(name)

    def open(self, name: str):
        """(binary stream, size in bytes) of member `name`."""
        if self.zip is not None:
            try:
                info = self.zip.getinfo(name)
            except KeyError:
                raise FormatError(f"the archive has no {name}") from None
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 0x1:
                _fail(name, "is encrypted or compressed with a method other than stored or deflated")
            if name == WEIGHTS and info.compress_type != zipfile.ZIP_STORED:
                # stored, as mm.save writes it: the archive's size then bounds what loading reads (no zip bombs)
                _fail(name, "must be stored uncompressed")
            return self.zip.open(info), info.file_size
        return _open_regular(name, name, dir_fd=self.dir)

    def close(self):
        if self.zip is not None:
            self.zip.close()
        if self.dir is not None:
            os.close(self.dir)


_NOT_REGULAR = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}


def _open_regular(path, where: str, dir_fd=None, follow=False):
    """(binary file, size) of a regular file; anything else is refused before a byte is read.

    O_NONBLOCK: opening a named pipe would otherwise wait for a writer, forever. O_NOFOLLOW (unless
    `follow`): a symbolic link in a saved model could point anywhere. The check is made on the
    opened file (fstat), so nothing can be swapped in between.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FormatError(f"{where} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise FormatError(f"{where} is a symbolic link; symbolic links are refused") from None
        raise FormatError(f"{where} cannot be opened ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise FormatError(f"{where} is {_NOT_REGULAR.get(stat.S_IFMT(st.st_mode), 'not a file')}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), st.st_size


def _read_exact(stream, n: int, where: str) -> bytes:
    """n bytes, read in chunks: a size claimed by a header costs memory only as the bytes really arrive."""
    chunks, left = [], n
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            _fail(where, f"ends after {n - left} of the {n} bytes expected (truncated?)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _parse_json(data: bytes, where: str):
    """JSON with duplicate keys, NaN and Infinity refused (each would make a file mean two things)."""
    def pairs(items):
        out = {}
        for k, v in items:
            if k in out:
                _fail(where, f"duplicate key {k[:MAX_NAME]!r}")
            out[k] = v
        return out

    def constant(name):
        _fail(where, f"{name} is not a number the format accepts")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except FormatError:
        raise
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, nesting too deep, an integer too long
        _fail(where, f"is not valid JSON ({str(e)[:200]})")


# ---------------------------------------------------------------- validating graph.json

@dataclasses.dataclass
class _TensorSpec:
    name: str
    shape: tuple
    dtype: np.dtype
    stop_gradient: bool = False
    trainable: bool | None = None


@dataclasses.dataclass
class _NodeSpec:
    op: str
    inputs: list          # refs: ("input", name), ("param", name) or ("node", i, j)
    attrs: dict
    outputs: list         # _TensorSpec (unnamed)


@dataclasses.dataclass
class _Spec:
    kind: str
    inputs: list
    params: list
    nodes: list
    outputs: dict
    optimizer: dict | None
    weights: dict         # every weights.safetensors entry: name -> (shape, dtype)


def _obj(v, where: str, required=(), optional=()) -> dict:
    if not isinstance(v, dict):
        _fail(where, f"expected an object, got {type(v).__name__}")
    missing = [k for k in required if k not in v]
    unknown = [k for k in v if k not in required and k not in optional]
    if missing:
        _fail(where, f"missing field {missing[0]!r}")
    if unknown:
        _fail(where, f"unknown field {str(unknown[0])[:MAX_NAME]!r}")
    return v


def _bounded(v, kind: type, what: str, where: str, limit: int):
    """v, if it is a `kind` (`what` in the message) of at most `limit` entries."""
    if not isinstance(v, kind):
        _fail(where, f"expected {what}, got {type(v).__name__}")
    if len(v) > limit:
        _fail(where, f"{len(v)} entries; at most {limit} are accepted")
    return v


def _dict(v, where: str, limit: int) -> dict:
    """A JSON object whose keys are names (attributes, outputs)."""
    for k in _bounded(v, dict, "an object", where, limit):
        _check_name(k, where)
    return v


def _list(v, where: str, limit: int) -> list:
    return _bounded(v, list, "a list", where, limit)


def _int(v, where: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        _fail(where, f"expected an integer in [{lo}, {hi}], got {_show(v)}")
    return v


def _bool(v, where: str) -> bool:
    if type(v) is not bool:
        _fail(where, f"expected true or false, got {_show(v)}")
    return v


def _choice(v, options, where: str) -> str:
    if not isinstance(v, str) or v not in options:
        _fail(where, f"expected one of {', '.join(options)}, got {_show(v)}")
    return v


def _check_name(v, where: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME or not v.isprintable():
        raise FormatError(f"{where}: a name must be a printable string of 1 to {MAX_NAME} characters, got {_show(v)}")
    if v.startswith("__"):
        raise FormatError(f"{where}: names starting with '__' are reserved by safetensors")
    return v


def _show(v) -> str:
    return repr(v)[:80]


def _shape(v, where: str) -> tuple:
    dims = _list(v, where, MAX_NDIM)
    shape = tuple(_int(d, f"{where}[{i}]", 0, MAX_TENSOR_ELEMENTS) for i, d in enumerate(dims))
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        _fail(where, f"{shape} has {math.prod(shape)} elements; at most {MAX_TENSOR_ELEMENTS} are accepted")
    return shape


def _tensor(v, where: str, named=True, param=False) -> _TensorSpec:
    fields = ("name", "shape", "dtype") if named else ("shape", "dtype")
    e = _obj(v, where, fields, ("stop_gradient", "trainable") if param else ("stop_gradient",))
    dtype = _DTYPES[_choice(e["dtype"], _DTYPES, f"{where}.dtype")]
    t = _TensorSpec(_check_name(e["name"], f"{where}.name") if named else "", _shape(e["shape"], f"{where}.shape"),
                    dtype, _bool(e.get("stop_gradient", False), f"{where}.stop_gradient"))
    if param:
        trainable = e.get("trainable")
        t.trainable = None if trainable is None else _bool(trainable, f"{where}.trainable")
    return t


def _attr(v, where: str, depth: int = 0):
    """An attribute value from JSON, with lists as tuples (as the ops' checks normalise them)."""
    if v is None or type(v) is bool:
        return v
    if type(v) is int:
        return _int(v, where, -MAX_ATTR_INT, MAX_ATTR_INT)
    if type(v) is float:  # the parser already refused NaN and infinities
        if abs(v) > MAX_FLOAT:
            _fail(where, f"{v!r} is beyond float32's range (±{MAX_FLOAT:.7g}), which the kernels take")
        return v
    if type(v) is str:
        if len(v) > MAX_NAME:
            _fail(where, f"a string of {len(v)} characters; at most {MAX_NAME} are accepted")
        return v
    if type(v) is list and depth < MAX_ATTR_DEPTH:
        return tuple(_attr(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(_list(v, where, MAX_ATTRS)))
    _fail(where, f"not an attribute value the format accepts: {_show(v)}")


def _holds_bool(v) -> bool:
    return type(v) is bool or (type(v) is tuple and any(_holds_bool(x) for x in v))


def _canonical(attrs: dict) -> str:
    """A comparable form of attributes that tells 1, 1.0 and true apart."""
    return json.dumps({k: _to_json(v, f"attribute {k!r}") for k, v in attrs.items()}, sort_keys=True)


def _checked(op_name: str, shapes: list, attrs: dict, where: str):
    """Run the op's own shape check on the recorded shapes and attributes; (output shapes, attrs)."""
    op = ops.REGISTRY[op_name]
    # Python takes true for 1, and some checks let it through; a flag must be a flag in the signature too
    declared = inspect.signature(op.check).parameters
    for k, v in attrs.items():
        default = declared[k].default if k in declared else None
        if _holds_bool(v) and not (type(v) is bool and type(default) is bool):
            _fail(where, f"attribute {k!r} is {_show(v)}: true/false where {op_name} takes a number")
    try:
        out, norm = op.check(*shapes, **attrs)
        canonical = _canonical(norm)
    except Exception as e:  # noqa: BLE001 — checks are pure shape arithmetic written for trusted
        # callers; whatever one raises on hostile attributes means the node is not valid
        _fail(where, f"{op_name} rejects its recorded inputs or attributes: {str(e)[:300]}")
    if canonical != _canonical(attrs):
        _fail(where, f"attributes {_canonical(attrs)[:300]} are not in the normal form {op_name} gives them "
                     f"({canonical[:300]})")
    shapes_out = out if isinstance(out, list) else [out]
    return [tuple(s) for s in shapes_out], norm


def _validate(meta) -> _Spec:
    """Check every field of a parsed graph.json; returns what it describes. Allocates nothing on a device."""
    g = GRAPH
    _obj(meta, g, ("format", "version", "kind", "inputs", "parameters", "nodes", "outputs"), ("optimizer",))
    _choice(meta["format"], ("mlmetal",), f"{g}.format")
    if type(meta["version"]) is not int or meta["version"] != VERSION:
        _fail(f"{g}.version", f"unknown format version {_show(meta['version'])}; this mlmetal reads version {VERSION}")
    kind = _choice(meta["kind"], ("graph", "module"), f"{g}.kind")
    total = 0

    def count(t: _TensorSpec, where: str):
        nonlocal total
        total += math.prod(t.shape)
        if total > MAX_TOTAL_ELEMENTS:
            _fail(where, f"the tensors described so far hold over {MAX_TOTAL_ELEMENTS} elements")

    inputs = {}
    for i, e in enumerate(_list(meta["inputs"], f"{g}.inputs", MAX_TENSORS)):
        t = _tensor(e, f"{g}.inputs[{i}]")
        if t.name in inputs:
            _fail(f"{g}.inputs[{i}]", f"a second input named {t.name!r}")
        inputs[t.name] = t
        count(t, f"{g}.inputs[{i}]")
    params = {}
    for i, e in enumerate(_list(meta["parameters"], f"{g}.parameters", MAX_TENSORS)):
        t = _tensor(e, f"{g}.parameters[{i}]", param=True)
        if t.name in params:
            _fail(f"{g}.parameters[{i}]", f"a second parameter named {t.name!r}")
        if t.name.startswith("optimizer."):
            _fail(f"{g}.parameters[{i}]", "names starting with 'optimizer.' are reserved for optimizer state")
        if t.trainable is not None and t.dtype not in D.FLOATS:
            _fail(f"{g}.parameters[{i}]", f"{t.name} is {t.dtype}; parameters are float32, float16 or bfloat16 "
                                          f"(a constant of another dtype has \"trainable\": null)")
        params[t.name] = t
        count(t, f"{g}.parameters[{i}]")

    nodes = []
    for i, e in enumerate(_list(meta["nodes"], f"{g}.nodes", MAX_NODES)):
        where = f"{g}.nodes[{i}]"
        _obj(e, where, ("op", "inputs", "attrs", "outputs"))
        op = e["op"]
        if not isinstance(op, str) or op not in ops.REGISTRY:
            _fail(f"{where}.op", f"unknown op {_show(op)}")
        refs = [_ref(r, f"{where}.inputs[{j}]", inputs, params, nodes)
                for j, r in enumerate(_list(e["inputs"], f"{where}.inputs", MAX_NODE_INPUTS))]
        shapes = [_ref_spec(r, inputs, params, nodes).shape for r in refs]
        raw = _dict(e["attrs"], f"{where}.attrs", MAX_ATTRS)
        attrs = {k: _attr(v, f"{where}.attrs.{k}") for k, v in raw.items()}
        out_shapes, norm = _checked(op, shapes, attrs, where)
        outs = [_tensor(o, f"{where}.outputs[{j}]", named=False)
                for j, o in enumerate(_list(e["outputs"], f"{where}.outputs", MAX_NODE_INPUTS))]
        specs = [_ref_spec(r, inputs, params, nodes) for r in refs]
        dtypes = [ops.REGISTRY[op].output_dtype(specs, norm, j) for j in range(len(out_shapes))]
        recorded = [o.shape for o in outs]
        if recorded != out_shapes or [o.dtype for o in outs] != dtypes:
            _fail(f"{where}.outputs", f"records {recorded} of {[str(o.dtype) for o in outs]}; {op} on inputs "
                                      f"{shapes} gives {out_shapes} of {[str(d) for d in dtypes]}")
        for j, o in enumerate(outs):
            count(o, f"{where}.outputs[{j}]")
        nodes.append(_NodeSpec(op, refs, attrs, outs))

    outputs = {}
    for name, r in _dict(meta["outputs"], f"{g}.outputs", MAX_TENSORS).items():
        outputs[name] = _ref(r, f"{g}.outputs.{name}", inputs, params, nodes)
        if outputs[name][0] != "node":
            _fail(f"{g}.outputs.{name}", "an output must be a node's output")
    if kind == "module" and (nodes or inputs or outputs):
        _fail(g, "a module's save holds parameters only, yet lists inputs, nodes or outputs")

    weights = {t.name: (t.shape, t.dtype) for t in params.values()}
    optimizer = None
    if "optimizer" in meta:
        optimizer = _validate_optimizer(meta["optimizer"], params, weights)
    return _Spec(kind, list(inputs.values()), list(params.values()), nodes, outputs, optimizer, weights)


def _ref(r, where: str, inputs: dict, params: dict, nodes: list) -> tuple:
    if isinstance(r, dict) and len(r) == 1 and "input" in r:
        if not isinstance(r["input"], str) or r["input"] not in inputs:
            _fail(where, f"no input named {_show(r['input'])}")
        return ("input", r["input"])
    if isinstance(r, dict) and len(r) == 1 and "param" in r:
        if not isinstance(r["param"], str) or r["param"] not in params:
            _fail(where, f"no parameter named {_show(r['param'])}")
        return ("param", r["param"])
    e = _obj(r, where, ("node", "output"))
    if not nodes:
        _fail(where, "refers to a node, but none comes before it")
    i = _int(e["node"], f"{where}.node", 0, len(nodes) - 1)  # earlier nodes only: no cycles
    j = _int(e["output"], f"{where}.output", 0, len(nodes[i].outputs) - 1)
    return ("node", i, j)


def _ref_spec(r: tuple, inputs: dict, params: dict, nodes: list) -> _TensorSpec:
    if r[0] == "input":
        return inputs[r[1]]
    if r[0] == "param":
        return params[r[1]]
    return nodes[r[1]].outputs[r[2]]


def _validate_optimizer(v, params: dict, weights: dict) -> dict:
    where = f"{GRAPH}.optimizer"
    e = _obj(v, where, ("type", "steps", "parameters", "attrs"))
    kind = Optimizer.KINDS[_choice(e["type"], Optimizer.KINDS, f"{where}.type")]
    steps = _int(e["steps"], f"{where}.steps", 0, MAX_ATTR_INT)
    attrs = {k: _attr(v, f"{where}.attrs.{k}") for k, v in _dict(e["attrs"], f"{where}.attrs", MAX_ATTRS).items()}
    if "step" in attrs:
        _fail(f"{where}.attrs", "the step number is `steps`, not an attribute")
    # the update op's own check validates the hyper-parameters (and the step its next update uses)
    shapes = [(1,)] * (2 + len(kind.slots))
    _checked(kind.op, shapes, kind.update_attrs(attrs, steps), where)
    names = _list(e["parameters"], f"{where}.parameters", MAX_TENSORS)
    if not names:
        _fail(f"{where}.parameters", "an optimizer needs at least one parameter")
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in params or params[name].trainable is None:
            _fail(f"{where}.parameters[{i}]", f"no parameter named {_show(name)}")
        if params[name].dtype != np.float32:
            _fail(f"{where}.parameters[{i}]", f"{name} is {params[name].dtype}; optimizers update float32")
    if len(set(names)) != len(names):
        _fail(f"{where}.parameters", "lists a parameter twice")
    for name in names:
        for slot in kind.slots:
            weights[kind.state_name(slot, name)] = (params[name].shape, params[name].dtype)
    return {"type": e["type"], "steps": steps, "attrs": attrs, "parameters": list(names)}


# ---------------------------------------------------------------- reading weights.safetensors

def _read_header(stream, size: int, expected: dict) -> list:
    """Check a safetensors stream's header against `expected` ({name: (shape, dtype)}); the tensors'
    (begin, end, name) in file order, the stream left at the first tensor's first byte."""
    n, header = _safetensors_header(stream, size, WEIGHTS)
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        _fail(WEIGHTS, f"tensors differ from graph.json: missing {_few(missing)}; unexpected {_few(extra)}")
    return _spans(header, n, size, expected, WEIGHTS, f"{GRAPH} says")


def _safetensors_header(stream, size: int, w: str) -> tuple[int, dict]:
    """(its length, the header: {name: entry}) of a safetensors stream of `size` bytes named `w`;
    the stream is left at the first tensor's first byte."""
    n = int.from_bytes(_read_exact(stream, 8, w), "little")
    if n > MAX_JSON_BYTES or 8 + n > size:
        _fail(w, f"header of {n} bytes claimed in a file of {size} bytes")
    header = _parse_json(_read_exact(stream, n, w), f"{w} header")
    if not isinstance(header, dict):
        _fail(f"{w} header", "expected an object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        _fail(f"{w} header.__metadata__", "expected an object of strings")
    if len(header) > MAX_TENSORS:
        _fail(f"{w} header", f"{len(header)} tensors; at most {MAX_TENSORS} are accepted")
    return n, header


def _spans(header: dict, n: int, size: int, expected: dict, w: str, says: str) -> list:
    """The (begin, end, name) of each tensor of a safetensors `header` in file order, each entry
    checked against `expected` ({name: (shape, dtype)}, `says` where that comes from) and the
    data checked to fill the file's `size` bytes after the header's `n`, without gaps or overlaps."""
    spans = []
    for name, entry in header.items():
        where = f"{w} header.{name}"
        e = _obj(entry, where, ("dtype", "shape", "data_offsets"))
        shape, dtype = expected[name]
        if not isinstance(e["dtype"], str) or _SAFETENSORS_DTYPES.get(e["dtype"]) != dtype.name:
            _fail(where, f"dtype {_show(e['dtype'])}; {says} {dtype}")
        if _shape(e["shape"], f"{where}.shape") != shape:
            _fail(where, f"shape {e['shape']}; {says} {list(shape)}")
        offsets = _list(e["data_offsets"], f"{where}.data_offsets", 2)
        if len(offsets) != 2:
            _fail(f"{where}.data_offsets", "expected [begin, end]")
        begin, end = (_int(o, f"{where}.data_offsets", 0, size) for o in offsets)
        if end - begin != math.prod(shape) * dtype.itemsize:
            _fail(f"{where}.data_offsets", f"[{begin}, {end}] do not span the {math.prod(shape)} elements of {shape}")
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            _fail(f"{w} header.{name}", f"data starts at byte {begin}, not at {position}: "
                                        f"tensors overlap or leave gaps")
        position = end
    if 8 + n + position != size:
        _fail(w, f"the file has {size} bytes; its header describes {8 + n + position}")
    return spans


def _read_data(stream, spans: list, write, w: str = WEIGHTS) -> None:
    """Stream each tensor's bytes to `write(name, offset, chunk)`: memory for one chunk, not for the file."""
    chunk = memoryview(bytearray(min(READ_CHUNK, max((end - begin for begin, end, _ in spans), default=0))))
    for begin, end, name in spans:
        offset = 0
        while offset < end - begin:
            got = stream.readinto(chunk[:min(len(chunk), end - begin - offset)])
            if not got:
                _fail(w, f"ends after {begin + offset} of the {spans[-1][1]} data bytes its header "
                         f"describes (truncated?)")
            write(name, offset, chunk[:got])
            offset += got
    if stream.read(1):
        _fail(w, "has bytes after its last tensor")


def _few(names: list) -> str:
    shown = [n if len(n) <= 80 else n[:77] + "..." for n in names[:8]]
    return (", ".join(shown) + (f" and {len(names) - 8} more" if len(names) > 8 else "")) or "none"


def _read(path, place) -> _Spec:
    """Read and check a saved model on the host; only then call `place(spec)` for a `write(name, offset,
    chunk)` that receives each tensor's bytes, streamed from the file."""
    path = Path(path)
    archive = None
    try:
        archive = _Archive(path)
        stream, size = archive.open(GRAPH)
        with stream:
            if size > MAX_JSON_BYTES:
                _fail(GRAPH, f"{size} bytes; at most {MAX_JSON_BYTES} are accepted")
            data = _read_exact(stream, size, GRAPH)
            if stream.read(1):
                _fail(GRAPH, f"longer than the {size} bytes its archive entry declares")
        spec = _validate(_parse_json(data, GRAPH))
        stream, size = archive.open(WEIGHTS)
        with stream:
            spans = _read_header(stream, size, spec.weights)
            _read_data(stream, spans, place(spec))
        return spec
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    # a damaged member (zipfile raises NotImplementedError for flags it does not know), or a vanished file
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as e:
        raise FormatError(f"{path}: cannot be read ({str(e)[:200]})") from None
    finally:
        if archive is not None:
            archive.close()


# ---------------------------------------------------------------- loading

class Model:
    """A loaded model: its graph (None for a module's weights), named inputs, outputs, parameters and optimizer.

    Example:
        >>> model = mm.load("denoiser.zip", device="cuda")
        >>> rgb = model.run({"x": noisy})["rgb"]
        >>> train = model.outputs["loss"].training_graph(optimizer=model.optimizer)  # resume training
    """

    def __init__(self, graph, inputs, outputs, parameters, optimizer):
        self.graph: Graph | None = graph
        self.inputs: dict[str, GraphTensor] = inputs
        self.outputs: dict[str, GraphTensor] = outputs
        self.parameters: dict[str, Tensor] = parameters
        self.optimizer: Optimizer | None = optimizer

    def run(self, inputs: dict, outputs=None) -> dict[str, np.ndarray]:
        """Run the graph on `inputs` ({name: array}); returns {output name: array} for `outputs` (default all)."""
        if self.graph is None:
            raise FormatError("this save holds a module's weights, not a graph to run")
        names = list(self.outputs) if outputs is None else list(outputs)
        unknown = [n for n in names if n not in self.outputs]
        if unknown:
            raise KeyError(f"no output named {unknown[0]!r}; the model has {', '.join(self.outputs)}")
        values = self.graph.run(inputs, outputs=[self.outputs[n] for n in names])
        return dict(zip(names, values))

    def __repr__(self):
        return (f"Model({len(self.graph.nodes) if self.graph else 0} nodes, inputs {list(self.inputs)}, "
                f"outputs {list(self.outputs)}, {len(self.parameters)} parameters)")


def load(path, device=None) -> Model:
    """Load a model saved by `mm.save`, checking all of it before anything is put on the device.

    Args:
        path: the directory or `.zip` file `mm.save` wrote.
        device: where to put it (a Device or a backend name; default `mm.device()`); any
            backend loads what any other saved.

    Returns:
        a `Model`: `run(inputs)` runs the saved graph; `parameters`, `optimizer` (restored,
        over those parameters) and the graph's `inputs` and `outputs` are there to resume training.

    Raises:
        FormatError: the files are missing, malformed or inconsistent; the message says where.

    Example:
        >>> model = mm.load("denoiser.zip")
        >>> model.run({"x": noisy})["output"].shape
        (1, 3, 64, 64)
    """
    params: dict[str, Tensor] = {}
    dev = optimizer = None

    def place(spec: _Spec):
        nonlocal dev, optimizer
        dev = _device(device)
        for t in spec.params:
            p = empty(t.shape, dev, t.dtype)  # filled from the file below, without a host copy of it all
            p = p if t.trainable is None else Parameter(p, trainable=t.trainable)
            p.name = t.name
            if t.stop_gradient:
                p.stop_gradient = True
            params[t.name] = p
        tensors = dict(params)
        if spec.optimizer:
            saved = spec.optimizer
            optimizer = Optimizer.from_saved([params[n] for n in saved["parameters"]], saved)
            tensors.update(optimizer.saved_state(saved["parameters"]))
        dev.synchronize()  # nothing in flight may write these buffers after the file does
        return lambda name, offset, chunk: tensors[name].buffer.write(chunk, offset)

    spec = _read(path, place)
    if spec.kind == "module":
        return Model(None, {}, {}, params, optimizer)
    g = Graph(dev)
    for t in spec.inputs:
        g.input(t.name, t.shape, t.dtype).stop_gradient = t.stop_gradient
    built: list[tuple] = []

    def resolve(r):
        return g.inputs[r[1]] if r[0] == "input" else params[r[1]] if r[0] == "param" else built[r[1]][r[2]]

    for n in spec.nodes:
        out = g.append(n.op, [resolve(r) for r in n.inputs], n.attrs)
        out = out if isinstance(out, tuple) else (out,)
        for o, s in zip(out, n.outputs):
            o.stop_gradient = s.stop_gradient
        built.append(out)
    return Model(g, dict(g.inputs), {name: resolve(r) for name, r in spec.outputs.items()}, params, optimizer)


def restore(path, module: Module, optimizer: Optimizer | None = None, strict: bool = True) -> None:
    """Load saved weights into `module` (by dotted name) and, optionally, saved state into `optimizer`.

    Nothing is changed unless everything fits: the module's parameters must match the saved
    ones by name, shape and dtype (with `strict`, none missing or extra; one error lists every
    difference), and the optimizer must be of the saved type over the saved parameters.
    Constants a graph save holds (leaves that are not parameters) are not compared.

    Args:
        path: what `mm.save` wrote (a graph's or a module's save).
        module: receives the parameters.
        optimizer: an optimizer over `module`'s parameters; receives the step count,
            hyper-parameters and state, so training continues exactly where it stopped.
        strict: refuse missing and extra parameters (wrong shapes and dtypes are always refused).

    Example:
        >>> net, opt = make_net(), mm.optim.Adam(net.parameters())
        >>> mm.io.restore("ckpt", net, opt)
    """
    mine = module.named_parameters()
    targets: dict[str, Tensor] = {}  # what the save will change, by saved name
    arrays: dict[str, np.ndarray] = {}
    optimizer_saved = None

    def place(spec: _Spec):
        nonlocal optimizer_saved
        saved = {t.name: t for t in spec.params if t.trainable is not None}
        missing = [n for n in mine if n not in saved]
        extra = [n for n in saved if n not in mine]
        wrong = [f"{n} {mine[n].shape} {mine[n].dtype} (saved {saved[n].shape} {saved[n].dtype})"
                 for n in mine if n in saved and (mine[n].shape != saved[n].shape or mine[n].dtype != saved[n].dtype)]
        if wrong or (strict and (missing or extra)):
            raise FormatError(f"the weights do not fit the {type(module).__name__}: missing {_few(missing)}; "
                              f"unexpected {_few(extra)}; wrong shape or dtype {_few(wrong)}")
        targets.update((n, p) for n, p in mine.items() if n in saved)
        if optimizer is not None:
            optimizer_saved = spec.optimizer
            targets.update(optimizer.saved_state(_optimizer_names(spec, optimizer, mine)))
        # read into host arrays first: a save that cannot be read to its end changes nothing
        arrays.update((n, np.empty(t.shape, t.dtype)) for n, t in targets.items())
        flat = {n: a.reshape(-1).view(np.uint8) for n, a in arrays.items()}

        def write(name, offset, chunk):
            if name in flat:  # constants, and parameters the module lacks, are skipped
                flat[name][offset:offset + len(chunk)] = chunk
        return write

    _read(path, place)
    for n, t in targets.items():
        t.assign(arrays[n])
    if optimizer is not None:
        optimizer.restore(optimizer_saved)


def _optimizer_names(spec: _Spec, optimizer: Optimizer, mine: dict) -> list:
    """The saved name of each of the optimizer's parameters, once the saved state is known to fit."""
    saved = spec.optimizer
    if saved is None:
        raise FormatError("holds no optimizer state")
    if type(optimizer) is not Optimizer.KINDS[saved["type"]]:
        raise FormatError(f"holds {saved['type']} state; cannot restore a {type(optimizer).__name__}")
    by_id = {id(p): n for n, p in mine.items()}
    names = [by_id.get(id(p)) for p in optimizer.params]
    if None in names:
        raise FormatError("the optimizer updates parameters outside the module")
    missing = [n for n in names if n not in saved["parameters"]]
    extra = [n for n in saved["parameters"] if n not in names]
    if missing or extra:
        raise FormatError(f"the optimizer's parameters differ from the saved ones: missing {_few(missing)}; "
                          f"unexpected {_few(extra)}")
    return names


# ---------------------------------------------------------------- one safetensors file of weights

def save_safetensors(path, module: Module) -> None:
    """Write `module`'s parameters to one safetensors file under their dotted names, as MLX's
    `save_weights` does; `safetensors.numpy.load_file` and `safetensors.torch.load_file` read it.

    Like `save`, it writes beside `path` and renames over it (the old file or the whole new one
    at every moment), and only rank 0 of a data-parallel run writes.
    """
    from . import distributed

    if distributed.rank() != 0:
        return
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot save {path}: it is a directory; a .safetensors file is a file")
    arrays = {name: np.ascontiguousarray(p.numpy()) for name, p in module.named_parameters().items()}
    data = safetensors.numpy.save(arrays, metadata={"format": "mlmetal"})
    tmp = _temporary(path)
    try:
        with _create(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise type(e)(e.errno, f"cannot save {path}: {e.strerror or e}") from None


def load_safetensors(path, module: Module, strict: bool = True) -> None:
    """Load one safetensors file into `module`'s parameters, matched by dotted name.

    The header is checked before any data is read, and nothing changes unless every tensor
    fits: one `FormatError` lists the names the module has and the file lacks (with `strict`),
    the names the file has and the module lacks (with `strict`), and those of another shape or
    dtype (always). Tensors must be of a dtype mlmetal stores: float32, float16, bfloat16, int32 or
    uint32 (F32, F16, BF16, I32, U32); a module converted with `Module.astype` loads what it saved.
    """
    where = "the weights file"
    mine = module.named_parameters()
    try:
        file, size = _open_regular(path, where, follow=True)
        with file:
            n, header = _safetensors_header(file, size, where)
            saved = {}
            for name, entry in header.items():
                e = _obj(entry, f"{where} header.{name}", ("dtype", "shape", "data_offsets"))
                if not isinstance(e["dtype"], str) or e["dtype"] not in _SAFETENSORS_DTYPES:
                    _fail(f"{where} header.{name}", f"dtype {_show(e['dtype'])} is not one mlmetal stores "
                                                    f"({', '.join(_SAFETENSORS_DTYPES)})")
                saved[name] = (_shape(e["shape"], f"{where} header.{name}.shape"),
                               _DTYPES[_SAFETENSORS_DTYPES[e["dtype"]]])
            missing = [n for n in mine if n not in saved] if strict else []
            extra = [n for n in saved if n not in mine] if strict else []
            wrong = [f"{n} {mine[n].shape} {mine[n].dtype} (saved {saved[n][0]} {saved[n][1]})"
                     for n in mine if n in saved and (mine[n].shape, mine[n].dtype) != saved[n]]
            if missing or extra or wrong:
                _fail(where, f"does not fit the {type(module).__name__}: missing {_few(missing)}; "
                             f"unexpected {_few(extra)}; wrong shape or dtype {_few(wrong)}")
            spans = _spans(header, n, size, saved, where, "its header says")
            # into host arrays first: a file that cannot be read to its end changes nothing
            arrays = {name: np.empty(saved[name][0], saved[name][1]) for name in mine if name in saved}
            flat = {name: a.reshape(-1).view(np.uint8) for name, a in arrays.items()}

            def write(name, offset, chunk):
                if name in flat:
                    flat[name][offset:offset + len(chunk)] = chunk

            _read_data(file, spans, write, where)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({str(e)[:200]})") from None
    for name, a in arrays.items():
        mine[name].assign(a)
