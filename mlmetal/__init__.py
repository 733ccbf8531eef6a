"""mlmetal: hand-written Metal Shading Language kernels, run on Apple GPUs, NVIDIA GPUs and any CPU."""

from .runtime.backends import BackendUnavailable, available, device
from .runtime.device import (Buffer, CommandBuffer, Device, DispatchError, ExecutionError, Kernel, Library,
                             Predicate)
from .runtime.source import KernelSourceError, LintError
from .precision import get_matmul_precision, matmul_precision, set_matmul_precision
from .dtypes import bfloat16, float16, float32, int32, uint32
from .tensor import Tensor, empty, tensor
from . import ops  # noqa: E402  (ops use the names above)
from .ops import DTypeError, ShapeError
from .graph import Graph, GraphError, GraphTensor
from .autocast import autocast
from . import distributed, nn, optim, random, train
from .train import LossScaler
from .factories import arange, full, ones, rand, randn, zeros
from .functional import grad, value_and_grad
from .ops.predicate import Predicates

__version__ = "0.1.0"
from .io import FormatError, load, save  # noqa: E402
