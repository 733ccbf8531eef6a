"""The matmul precision policy: how matmul, every convolution pass and the Gram matrix round their
operands on matrix hardware, named as PyTorch and JAX name it.

- ``"highest"`` (the default): float32 accuracy. On NVIDIA GPUs the tensor cores run the
  split-TF32 scheme (each operand as the sum of two TF32 numbers, three products), and the float
  kernels run where they are faster (3×3 convolutions into fewer than 17 channels).
- ``"high"``: operands rounded to TF32 (10 mantissa bits), float32 accumulation — what PyTorch's
  convolutions use by default on NVIDIA GPUs.
- ``"medium"``: operands rounded to bfloat16 (7 mantissa bits), float32 accumulation.

The policy in force is the innermost of: a graph's own setting (``mm.Graph(dev,
matmul_precision=...)``), a ``with mm.matmul_precision(...)`` block, and the process-wide
``mm.set_matmul_precision(...)``. It is read when work is encoded, so a graph built under one
policy runs under the policy in force when it runs unless it has its own. The cpu backend rounds
exactly as the cuda backend does, so the policy's numerics are tested on any machine. Apple GPUs
multiply float matrices at float32 precision whatever the policy.

In float16 and bfloat16 storage the operands are the stored values, exact in TF32, and so are
their products in float32: ``"highest"`` and ``"high"`` compute the same single TF32 products
(on tensor cores), and ``"medium"`` rounds float16 values to bfloat16 and leaves bfloat16 ones,
so bfloat16 storage under ``"medium"`` is exactly bfloat16 operands.
"""

from __future__ import annotations

import contextlib
import contextvars

from .runtime.device import MATMUL_PRECISIONS as POLICIES

_default = "highest"
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("mlmetal_matmul_precision", default=None)


def check(policy) -> str:
    """`policy` if it names a policy, else ValueError listing them."""
    if policy not in POLICIES:
        raise ValueError(f"matmul precision must be one of {', '.join(map(repr, POLICIES))}, got {policy!r}")
    return policy


def set_matmul_precision(policy: str) -> None:
    """Set the process-wide matmul precision policy.

    Args:
        policy: "highest" (float32 accuracy, the default), "high" (TF32 operands) or
            "medium" (bfloat16 operands); accumulation is float32 in all three.

    Example:
        >>> mm.set_matmul_precision("high")
    """
    global _default
    _default = check(policy)


def get_matmul_precision() -> str:
    """The policy in force here: a `matmul_precision` block's, else the process-wide one."""
    return _scoped.get() or _default


@contextlib.contextmanager
def matmul_precision(policy: str | None):
    """Run a block under `policy` (None: leave the policy in force as it is).

    Example:
        >>> with mm.matmul_precision("medium"):
        ...     y = mm.ops.conv2d(x, w, padding=1)
    """
    if policy is None:
        yield
        return
    token = _scoped.set(check(policy))
    try:
        yield
    finally:
        _scoped.reset(token)
