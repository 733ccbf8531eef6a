"""The dtypes mlmetal stores, and how a dtype picks its kernels.

Floating storage comes in three types: `float32`, `float16` (IEEE binary16, Metal's `half`) and
`bfloat16` (float32's top 16 bits, Metal's `bfloat`, NumPy's through `ml_dtypes`, as JAX has it).
Kernels read and write the storage type and compute in float; a kernel family is one MSL template
instantiated per storage type, the float32 instance under the plain name (`add`) and the others
with a suffix (`add_f16`, `add_bf16`): `kernel_name` makes the name an op dispatches.

Integers are int32 (token ids) and uint32 (predicates, flags).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

float32 = np.dtype(np.float32)
float16 = np.dtype(np.float16)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
int32 = np.dtype(np.int32)
uint32 = np.dtype(np.uint32)

FLOATS = (float32, float16, bfloat16)  # the floating storage types, widest first
DTYPES = (float32, float16, bfloat16, int32, uint32)

# MSL's name of each storage type, and the suffix of its kernels' names
MSL_TYPES = {float32: "float", float16: "half", bfloat16: "bfloat", int32: "int", uint32: "uint"}
SUFFIXES = {float32: "", float16: "_f16", bfloat16: "_bf16"}
SHORT = {float32: "f32", float16: "f16", bfloat16: "bf16"}  # in kernels between two types: cast_f32_f16

_NAMES = {"float32": float32, "float": float32, "float16": float16, "half": float16, "bfloat16": bfloat16,
          "bf16": bfloat16, "fp16": float16, "f16": float16, "int32": int32, "uint32": uint32}


def as_dtype(dtype) -> np.dtype:
    """`dtype` as a NumPy dtype: a NumPy dtype or type, `mm.bfloat16`, or a name ("float16", "bfloat16",
    "bf16", "half", ...). Raises TypeError for anything else."""
    if isinstance(dtype, str):
        if dtype.lower() not in _NAMES:
            raise TypeError(f"unknown dtype {dtype!r}; mlmetal stores {', '.join(map(str, DTYPES))}")
        return _NAMES[dtype.lower()]
    return np.dtype(dtype)


def is_float(dtype) -> bool:
    """A floating dtype, float64 included (NumPy's kind "f", and bfloat16, whose kind is "V")."""
    d = np.dtype(dtype)
    return d.kind == "f" or d == bfloat16


def kernel_name(name: str, dtype) -> str:
    """The instance of kernel template `name` for storage type `dtype`: `name` for float32,
    `name_f16` for float16, `name_bf16` for bfloat16."""
    return name + SUFFIXES[np.dtype(dtype)]


def widest(dtypes) -> np.dtype:
    """The widest of floating dtypes (float32 over either 16-bit type), as PyTorch promotes a mixed
    operation; float16 with bfloat16 is float32, which holds both exactly."""
    ds = {np.dtype(d) for d in dtypes}
    if len(ds) == 1:
        return ds.pop()
    return float32
