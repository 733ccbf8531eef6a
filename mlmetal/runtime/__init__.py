"""Backends behind one contract (device.py), chosen by name: cpu.py, cuda.py, metal.py."""

from .device import Buffer, CommandBuffer, DispatchError, ExecutionError, Device, Kernel, Library, Predicate
from .source import KernelSourceError, LintError
