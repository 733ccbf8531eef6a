"""Every registered op has its kernel(s), reference, gradient rule (or an explicit None) and a test row."""

import importlib
from pathlib import Path

import pytest

from mlmetal import dtypes as D
from mlmetal import ops
from mlmetal.runtime import source as S
from opcheck import ALL_ROWS

for path in sorted(Path(__file__).parent.glob("test_ops_*.py")):
    importlib.import_module(path.stem)


@pytest.mark.parametrize("name", sorted(ops.REGISTRY))
def test_op_is_complete(name):
    op = ops.REGISTRY[name]
    assert callable(op.check) and callable(op.encode), name
    assert callable(op.reference) and op.reference.__module__.startswith("mlmetal.reference."), name
    assert op.grad is None or callable(op.grad), name
    assert op.kernels, f"{name} names no kernel"
    for qualified in op.kernels:
        lib, kernel = qualified.split(".")
        kernels = S.Source.from_file(S.find(lib)).kernels
        assert kernel in kernels, f"{name}: kernels/{lib}.metal has no kernel {kernel}"
        # a plain (not template) kernel reads and writes float32 whatever the storage type (a
        # normalisation's γ gradient from its partial sums); astype names each of its instances
        for dtype in op.dtypes if name != "astype" and kernels[kernel].instance is not None else ():
            typed = D.kernel_name(kernel, dtype)
            assert typed in kernels, f"{name} takes {dtype}: kernels/{lib}.metal has no {typed}"
    assert name in ALL_ROWS, f"{name} has no row in a tests/test_ops_*.py table"
    assert hasattr(ops, name) and callable(getattr(ops, name))
