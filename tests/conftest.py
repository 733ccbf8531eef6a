"""Shared test settings: the backend under test, hypothesis profiles, tolerances."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import mlmetal as mm
from mlmetal.runtime.backends import check_bounds_requested

# One place for hypothesis: CI runs a short profile on 2 cores; `--hypothesis-profile=thorough`
# draws many more cases on a workstation or GPU machine.
_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=12, **_common)
settings.register_profile("dev", max_examples=25, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Sizes that catch the usual off-by-one: single elements, around a simdgroup, around a
# threadgroup, and a few that are not multiples of anything.
AWKWARD = [1, 2, 31, 32, 33, 63, 64, 65, 255, 256, 257, 1000, 1023, 1024, 1025, 4099]


def pytest_collection_modifyitems(config, items):
    """The bounds-checked pass leaves out the tests marked `no_cpu_kernels`: they run no kernel on
    the cpu backend (they compile CUDA with NVRTC or nvcc), so bounds checking changes nothing in
    them, and the unchecked pass has run them (five minutes of CI's 2 cores, twice)."""
    if not check_bounds_requested():
        return
    kept, dropped = [], []
    for item in items:
        (dropped if item.get_closest_marker("no_cpu_kernels") else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


# The checked pass also checks eager replay (ops/eager.py): each call of a kind seen before encodes
# afresh too, and a template other than the recorded one fails the test.
mm.ops.eager.checking = check_bounds_requested()


@pytest.fixture(autouse=True)
def _no_recorded_calls():
    """Each test starts without recorded eager calls: tests change how ops pick their kernels
    (monkeypatched tilings, forced matrix hardware), which the recordings' keys leave out."""
    mm.ops.eager.forget()


@pytest.fixture
def monkeypatch(monkeypatch):
    """pytest's monkeypatch, which also drops the recorded eager calls after every change it makes:
    an eager call after a patch encodes afresh, as it would if the patch had been there first."""
    for name in ("setattr", "setitem", "delattr", "delitem", "setenv", "delenv"):
        change = getattr(monkeypatch, name)

        def changed(*args, _change=change, **kwargs):
            _change(*args, **kwargs)
            mm.ops.eager.forget()

        setattr(monkeypatch, name, changed)
    return monkeypatch


def backend() -> str:
    return os.environ.get("MLMETAL_DEVICE", "cpu")


@pytest.fixture(scope="session")
def dev():
    """The device under test: MLMETAL_DEVICE (cpu by default)."""
    name = backend()
    why = mm.available(name)
    if why:
        pytest.skip(f"backend {name} unavailable: {why}")
    return mm.device(name)


def cuda_reason() -> str | None:
    return mm.available("cuda")


def rtol_for(length: int, base: float = 1e-6) -> float:
    """Float32 tolerance for a result accumulated over `length` terms."""
    return base * max(1.0, float(np.sqrt(length))) * 4
