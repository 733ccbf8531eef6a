"""mlmetal: hand-written Metal Shading Language kernels, run on Apple GPUs, NVIDIA GPUs and any CPU."""

from .runtime.backends import BackendUnavailable, available, device
from .runtime.device import (Buffer, CommandBuffer, Device, DispatchError, ExecutionError, Kernel, Library,
                             Predicate)
from .runtime.source import KernelSourceError, LintError

__version__ = "0.1.0"
