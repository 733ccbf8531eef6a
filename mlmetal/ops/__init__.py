"""The op registry: each op is registered once, with everything the rest of mlmetal needs of it.

An op is a small closed unit:

- `check(*input_shapes, **attrs) -> (output_shape(s), attrs)`: validates shapes and
  attributes *before anything runs* (raising ShapeError naming the op and the problem) and
  returns the output shape — or a list of shapes for several outputs — with the attributes
  normalised (e.g. `stride=None` resolved); an op whose output dtype depends on its
  attributes (random_tensor) says so as `attrs["dtype"]`, else outputs are `out_dtype`;
- `encode(cb, out, *inputs, **attrs)`: dispatches its kernel(s) into a command buffer;
  `out` is one tensor or a tuple of tensors, inputs are tensors;
- `reference(*arrays, **attrs)`: the float64 numpy reference (mlmetal.reference.<family>);
- `grad(g, out, *inputs, **attrs)`: the gradient rule, one entry per op: given the
  gradient `g` of the output, returns one gradient (or None) per input, built by calling
  other ops — so the same rule runs eagerly and, in a graph, appends gradient nodes.
  `grad=None` marks an op as not differentiable (gradient kernels themselves, optimizer
  updates); every such op says so explicitly;
- `kernels`: the `library.kernel` names it dispatches (checked to exist by the tests);
- `in_dtypes`: the dtypes of its leading inputs, for the few that take int32 token ids or
  uint32 flags; every other input is a float input;
- `dtypes`: the floating storage types its float inputs may have (float32 alone unless its
  kernels are instantiated per storage type, mlmetal.dtypes). Its float inputs share one, and so
  do its float outputs; encode picks the kernels of that type (`dtypes.kernel_name`);
- `float32_inputs`, `float32_outputs`: the float inputs and outputs that are float32 whatever the
  storage type (a normalisation's γ, β and running statistics and their gradients, a loss's value
  and its gradient): mixed precision keeps statistics, parameters and losses in float32 beside
  activations in float16 or bfloat16.

Inputs of mixed floating dtypes are first cast to the widest (float32), as PyTorch promotes, and
inside `mm.autocast` the cast follows the autocast policy (mlmetal.autocast). Before `check`
runs, every input's dtype is checked against the op's (DTypeError); after it,
every float attribute is checked to fit a float32, which is how kernels receive them
(ShapeError naming the attribute): infinities pass, as IEEE arithmetic defines them; NaN and
finite values past float32's range do not.

`mm.ops.<name>(*inputs, **attrs)` runs an op eagerly on device tensors. The family modules
(conv.py, pool.py, ...) each register their ops at import.
"""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import inspect
import math
import pkgutil
from typing import Any, Callable

import numpy as np

from .. import dtypes as D
from ..tensor import Symbolic, Tensor, empty
from . import eager


class ShapeError(ValueError):
    """An op was given incompatible shapes or attributes; raised before anything is dispatched."""


class DTypeError(ShapeError, TypeError):
    """An op or a graph input was given a tensor (or array) of the wrong dtype; raised before anything is dispatched."""


FLOAT32 = np.dtype(np.float32)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    check: Callable[..., tuple[Any, dict]]
    encode: Callable[..., None]
    reference: Callable[..., Any]
    grad: Callable[..., tuple] | None
    kernels: tuple[str, ...]  # "library.kernel"
    out_dtype: Any = np.float32
    # False when encode depends on more than its tensors and attributes (a generator's position):
    # a graph's plan then encodes the node afresh on every run instead of replaying its dispatches.
    replayable: bool = True
    in_dtypes: tuple[np.dtype, ...] = ()  # of the leading inputs; the rest are float inputs
    input_names: tuple[str, ...] = ()  # `check`'s names for its inputs, for error messages
    dtypes: tuple[np.dtype, ...] = (D.float32,)  # the storage types its float inputs may have
    float32_inputs: tuple[int, ...] = ()  # float inputs that are float32 whatever the storage type
    float32_outputs: tuple[int, ...] = ()  # float outputs that are float32 whatever the storage type

    def input_dtype(self, i: int) -> np.dtype:
        return self.in_dtypes[i] if i < len(self.in_dtypes) else FLOAT32

    def is_float_input(self, i: int) -> bool:
        return self.input_dtype(i) == FLOAT32

    def is_storage_input(self, i: int) -> bool:
        """A float input in the storage type (not one of `float32_inputs`)."""
        return self.is_float_input(i) and i not in self.float32_inputs

    def storage_dtype(self, inputs) -> np.dtype:
        """The floating storage type of an application to `inputs`: that of its storage inputs."""
        return next((x.dtype for i, x in enumerate(inputs) if self.is_storage_input(i) and x.dtype in D.FLOATS),
                    D.float32)

    def output_dtype(self, inputs, norm: dict, i: int = 0) -> np.dtype:
        """The dtype of its output `i` on `inputs` with normalised attributes `norm`."""
        if "dtype" in norm:
            return D.as_dtype(norm["dtype"])
        out = np.dtype(self.out_dtype)
        return self.storage_dtype(inputs) if out == FLOAT32 and i not in self.float32_outputs else out

    def input_name(self, i: int) -> str:
        return f"input {i}" + (f" ({self.input_names[i]})" if i < len(self.input_names) else "")


REGISTRY: dict[str, Op] = {}
# Registering an op binds its name in this module, so `abs`, `max`, `min`, `sum` and `pow` are ops
# here: this module reaches Python's own through `builtins`.


def register(name: str, *, check, encode, reference, grad, kernels, out_dtype=np.float32, replayable=True,
             in_dtypes=(), dtypes=(D.float32,), float32_inputs=(), float32_outputs=()) -> Op:
    """Add an op to the registry and expose it as `mm.ops.<name>`. `kernels` names the float32
    instances; with `dtypes` beyond float32, each has its instances for those types as well.
    `float32_inputs` and `float32_outputs` (indices) stay float32 whatever the storage type."""
    if name in REGISTRY:
        raise ValueError(f"op {name!r} registered twice")
    names = tuple(p.name for p in inspect.signature(check).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    op = REGISTRY[name] = Op(name, check, encode, reference, grad, tuple(kernels), out_dtype, replayable,
                             tuple(np.dtype(d) for d in in_dtypes), names, tuple(np.dtype(d) for d in dtypes),
                             tuple(float32_inputs), tuple(float32_outputs))
    globals()[name] = _entry_point(name, check)
    return op


def _entry_point(name: str, check):
    """`mm.ops.<name>(*tensors, *attrs, **attrs)`: leading tensors are the inputs; positional
    arguments after them are attributes, in the order `check` declares them."""
    positional = [p.name for p in inspect.signature(check).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def call(*args, **attrs):
        n = 0
        while n < len(args) and _is_tensor(args[n]):
            n += 1
        extra = args[n:]
        if extra and len(extra) > len(positional) - n:
            raise TypeError(f"{name}: {len(extra)} positional argument(s) after the {n} tensor input(s) cannot be "
                            f"matched to attributes; pass them by keyword")
        attrs.update(zip(positional[n:], extra))
        return apply(name, *args[:n], **attrs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = check.__doc__ or f"The {name} op."
    return call


def _is_tensor(x) -> bool:
    return isinstance(x, (Tensor, Symbolic))


def infer(name: str, *inputs, **attrs) -> tuple[Any, dict]:
    """Output shape(s) and normalised attributes of op `name` on `inputs` (tensors or graph
    tensors); raises ShapeError (DTypeError for an input of the wrong dtype)."""
    op = REGISTRY[name]
    storage = op.storage_dtype(inputs)
    for i, x in enumerate(inputs):
        if not op.is_float_input(i):
            if x.dtype != op.input_dtype(i):
                raise DTypeError(f"{name}: {op.input_name(i)} is {x.dtype}; it takes {op.input_dtype(i)}")
        elif i in op.float32_inputs:
            if x.dtype != FLOAT32:
                raise DTypeError(f"{name}: {op.input_name(i)} is {x.dtype}; it takes float32 whatever the other "
                                 f"inputs' dtype" + (" (cast with .astype)" if x.dtype in D.FLOATS else ""))
        elif x.dtype not in op.dtypes:
            raise DTypeError(f"{name}: {op.input_name(i)} is {x.dtype}; it takes "
                             f"{' or '.join(map(str, op.dtypes))}" + (" (cast with .astype)" if x.dtype in D.FLOATS else ""))
        elif x.dtype != storage:
            raise DTypeError(f"{name}: {op.input_name(i)} is {x.dtype} and an earlier float input {storage}; "
                             f"its float inputs share one dtype (cast with .astype)")
    shapes = [tuple(x.shape) for x in inputs]
    try:
        out, norm = op.check(*shapes, **attrs)
    except ShapeError:
        raise
    except (TypeError, ValueError) as e:  # a missing or unknown attribute, one that is not a number
        raise ShapeError(f"{name}: {e}") from None
    check_float_attrs(name, norm)
    return out, norm


def check_float_attrs(name: str, attrs: dict) -> None:
    """Raise ShapeError unless every float attribute of op `name` (normalised) fits a float32 or is infinite."""
    for k, v in attrs.items():
        for x in v if isinstance(v, tuple) else (v,):
            if isinstance(x, (float, np.floating)) and not (builtins.abs(x) <= FLOAT32_MAX or math.isinf(x)):
                raise ShapeError(f"{name}: attribute {k} = {x!r} " + ("is NaN" if math.isnan(x) else
                                 f"does not fit a float32 (at most ±{FLOAT32_MAX:.7g})"))


def apply(name: str, *inputs, **attrs):
    """Run op `name` eagerly (check, allocate the output(s), encode, commit asynchronously; or
    replay what an earlier call of its kind encoded, ops/eager.py), or, when any input is a graph
    tensor, append it to that graph as a node."""
    op = REGISTRY[name]
    inputs = cast_inputs(name, inputs)
    graph_inputs = [x for x in inputs if isinstance(x, Symbolic)]
    if graph_inputs:
        return graph_inputs[0].graph.append(name, list(inputs), attrs)
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: input {i} must be an mm.Tensor, got {type(x).__name__} (use mm.tensor(array))")
    devs = {x.device for x in inputs}
    if len(devs) > 1:
        raise ShapeError(f"{name}: inputs live on different devices ({', '.join(sorted(d.name for d in devs))})")
    kind = eager.key(op, inputs, attrs)
    recorded = eager.lookup(kind)
    if recorded.__class__ is eager.Recording and not eager.checking:
        outs, attrs = recorded.run(inputs), recorded.attrs  # shared by the kind's replays: copied below
    else:
        shape, attrs = infer(name, *inputs, **attrs)
        dev = inputs[0].device if inputs else attrs["generator"].device  # `random_tensor` is the one op without inputs
        multi = isinstance(shape, list)
        cb = dev.command_buffer()
        with eager.recording(None if recorded is eager.UNRECORDABLE else kind) as rec:
            outs = (tuple(empty(s, dev, op.output_dtype(inputs, attrs, i)) for i, s in enumerate(shape)) if multi
                    else empty(shape, dev, op.output_dtype(inputs, attrs)))
            op.encode(cb, outs, *inputs, **attrs)
        rec.save(recorded, cb.since(0), inputs, outs, multi, attrs)
        cb.commit()
    multi = outs.__class__ is tuple
    if inputs and builtins.all(x.from_parameters for x in inputs):  # `w.T`, `b.reshape(...)`: see Tensor.derivation
        for i, o in enumerate(outs if multi else (outs,)):
            o.derivation, o.from_parameters = (name, inputs, dict(attrs), i if multi else None), True
    return outs


def cast_inputs(name: str, inputs) -> tuple:
    """`inputs` of op `name` with their floating dtypes settled before it runs: inside
    `mm.autocast`, as its policy says; elsewhere, mixed floating dtypes cast to the widest, where
    the op takes several (PyTorch's promotion). Other inputs, `float32_inputs` among them, are
    returned as they are."""
    from ..autocast import policy  # the autocast module imports this one

    op = REGISTRY[name]
    floats = [i for i, x in enumerate(inputs) if op.is_storage_input(i) and _is_tensor(x) and x.dtype in D.FLOATS]
    graph = next((x.graph for x in inputs if isinstance(x, Symbolic)), None)
    target = policy(op, [inputs[i].dtype for i in floats], graph)
    if target is None:
        kinds = {inputs[i].dtype for i in floats}
        if len(kinds) < 2 or not builtins.all(k in op.dtypes for k in kinds):
            return tuple(inputs)
        target = D.widest(kinds)
    # in a graph, a device tensor (a parameter) is cast by a node reading it, so each run casts its current value
    return tuple(apply("astype", graph.leaf(x) if graph is not None and isinstance(x, Tensor) else x, dtype=target.name)
                 if i in floats and x.dtype != target else x for i, x in enumerate(inputs))


# ---------------------------------------------------------------- helpers for family modules

def groups_for(n: int, threads: int) -> int:
    """Threadgroups of `threads` that cover `n` items."""
    return builtins.max(1, (n + threads - 1) // threads)


def ensure(cond: bool, op: str, message: str) -> None:
    """Raise ShapeError(`op: message`) unless `cond`."""
    if not cond:
        raise ShapeError(f"{op}: {message}")


def pair(v, op: str, what: str) -> tuple[int, int]:
    """An int or a pair of ints as a pair, checked to be integers."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        t = (v, v)
    else:
        ensure(isinstance(v, (tuple, list)), op, f"{what} must be an int or a pair of ints, got {v!r}")
        t = tuple(v)
    ensure(len(t) == 2 and all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in t), op,
           f"{what} must be an int or a pair of ints, got {v!r}")
    return int(t[0]), int(t[1])


def _load_families():
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    # importing a family module binds its name here: where it is also an op's name
    # (matmul.py registers `matmul`), the op wins
    for name, op in REGISTRY.items():
        if not callable(globals().get(name)):
            globals()[name] = _entry_point(name, op.check)


_load_families()
