"""Choosing a backend by name: each lives in runtime/<name>.py and exports <Name>Device."""

from __future__ import annotations

import importlib
import os
import sys

from .device import Device

BACKENDS = ("metal", "cuda", "cpu")
_devices: dict[tuple[str, bool], Device] = {}


class BackendUnavailable(RuntimeError):
    """The asked-for backend cannot run on this machine."""


def _backend_class(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown device {name!r}; expected one of {', '.join(BACKENDS)}")
    module = importlib.import_module(f"{__package__}.{name}")
    return getattr(module, f"{name.capitalize()}Device")


def available(name: str) -> str | None:
    """None if backend `name` can run here, else the reason it cannot."""
    try:
        return _backend_class(name).unavailable()
    except ImportError as e:
        return f"{name} backend cannot be imported: {e}"


def check_bounds_requested() -> bool:
    """Whether MLMETAL_CHECK_BOUNDS asks for the bounds-checked cpu backend (set, and not 0)."""
    return os.environ.get("MLMETAL_CHECK_BOUNDS", "0") not in ("", "0")


def device(name: str | None = None, *, check_bounds: bool | None = None) -> Device:
    """The device of backend `name` ('cpu', 'cuda', 'metal'); by default `MLMETAL_DEVICE`, else the best present.

    Args:
        name: the backend; None for `MLMETAL_DEVICE`, else metal on a Mac, cuda with a GPU, else cpu.
        check_bounds: cpu only: compile kernels with bounds-checked pointers, so that an access
            outside a buffer or threadgroup array raises instead of corrupting memory (several
            times slower). None follows `MLMETAL_CHECK_BOUNDS=1`.

    Example:
        >>> import mlmetal as mm
        >>> dev = mm.device("cpu", check_bounds=True)
    """
    name = name or os.environ.get("MLMETAL_DEVICE") or None
    if name is None:
        candidates = (["metal"] if sys.platform == "darwin" else []) + ["cuda", "cpu"]
        name = next(n for n in candidates if n == "cpu" or available(n) is None)
    name = name.lower()
    if check_bounds and name != "cpu":
        raise ValueError(f"check_bounds is a feature of the cpu backend, not of {name!r} "
                         "(on cuda, run under compute-sanitizer)")
    if check_bounds is None:
        check_bounds = name == "cpu" and check_bounds_requested()
    key = (name, bool(check_bounds))
    if key not in _devices:
        cls = _backend_class(name)
        why = cls.unavailable()
        if why:
            raise BackendUnavailable(f"mlmetal device {name!r} is not available here: {why}")
        _devices[key] = cls(check_bounds=True) if check_bounds else cls()
    return _devices[key]
