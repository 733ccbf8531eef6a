"""Choosing a backend by name: each lives in runtime/<name>.py and exports <Name>Device."""

from __future__ import annotations

import importlib
import os
import sys

from .device import Device

BACKENDS = ("metal", "cuda", "cpu")
_devices: dict[str, Device] = {}


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


def device(name: str | None = None) -> Device:
    """The device of backend `name` ('cpu', 'cuda', 'metal'); by default `MLMETAL_DEVICE`, else the best present.

    Example:
        >>> import mlmetal as mm
        >>> dev = mm.device("cpu")
    """
    name = name or os.environ.get("MLMETAL_DEVICE") or None
    if name is None:
        candidates = (["metal"] if sys.platform == "darwin" else []) + ["cuda", "cpu"]
        name = next(n for n in candidates if n == "cpu" or available(n) is None)
    name = name.lower()
    if name not in _devices:
        cls = _backend_class(name)
        why = cls.unavailable()
        if why:
            raise BackendUnavailable(f"mlmetal device {name!r} is not available here: {why}")
        _devices[name] = cls()
    return _devices[name]
