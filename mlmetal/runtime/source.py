"""Kernel sources, as the backends and tests use them: found and parsed (msl/parse.py), linted
(msl/lint.py), and written out with one entry wrapper per kernel for a target (msl/wrap.py and
msl/wrap_cpu.py, wrap_cuda.py, wrap_metal.py). Kernel bodies are never edited; the wrapper
replaces the parameter list and prepends the builtin values and the predicate check (the cpu
queue checks predicates before launching instead).
"""

from __future__ import annotations

from .msl import wrap, wrap_cpu, wrap_cuda, wrap_metal
from .msl.lint import lint
from .msl.parse import (BUILTINS, KERNEL_DIR, SCALARS, Extent, Field, Function, Instance, Kernel,  # noqa: F401
                        KernelSourceError, LintError, Param, Source, Struct, TemplateParam, blank_comments,
                        compile_extent, find, launch_struct, layout)
from .msl.wrap import storage_unit  # noqa: F401
from .msl.wrap_cuda import by_value  # noqa: F401

TARGETS = {"cpu": wrap_cpu.TARGET, "cuda": wrap_cuda.TARGET, "metal": wrap_metal.TARGET}


def generate(src: Source, target: str, threads: int | None = None, check_bounds: bool = False,
             unit: str | None = None) -> str:
    """The whole translation unit for `target` (cpu, cuda or metal), with every kernel's entry
    wrapper; metal's are made per threadgroup size (`threads`), and `check_bounds` is a build of
    the cpu target (see msl/wrap_cpu.py). `unit` ("", "f16", "bf16") keeps that storage unit's
    kernels alone (`storage_unit`)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {tuple(TARGETS)}")
    if target == "metal" and not threads:
        raise ValueError("the metal wrapper is generated per threadgroup size: pass threads=")
    if check_bounds and target != "cpu":
        raise ValueError("bounds checking is a build of the cpu target only")
    return wrap.generate(src, TARGETS[target], threads, check_bounds, unit)
