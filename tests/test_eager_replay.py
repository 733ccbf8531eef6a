"""Eager replay (mlmetal/ops/eager.py): a call of a kind seen before commits the dispatches the
first call of its kind encoded, on its own buffers, and computes what a fresh encoding computes;
calls of other kinds, and calls whose dispatches a template cannot hold, encode afresh."""

import dataclasses

import numpy as np
import pytest

import mlmetal as mm
from mlmetal.ops import REGISTRY, eager, tiling
from mlmetal.reference import gram as R


def rand(dev, *shape, seed=0):
    return mm.tensor(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), dev)


@pytest.fixture
def encodes(monkeypatch):
    """How often each op's encoder has run (replays do not run it); fresh encodings only when
    every call of a kind seen before replays (not under the checked pass's `checking`)."""
    monkeypatch.setattr(eager, "checking", False)
    counts = {}

    def counting(op):
        def encode(*args, **attrs):
            counts[op.name] = counts.get(op.name, 0) + 1
            op.encode(*args, **attrs)
        return encode

    for name in ("add", "scale", "gram", "conv2d"):
        monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], encode=counting(REGISTRY[name])))
    return counts


def fresh(fn):
    """fn()'s result as a fresh encoding computes it (no recording to replay)."""
    eager.forget()
    return fn().numpy()


def test_a_kind_seen_before_replays_with_its_own_buffers(dev, encodes):
    # 1 × 4 × 32², one tile of channels: the reduction is split, so each call has temporaries
    xs = [rand(dev, 1, 4, 32, 32, seed=s) for s in range(3)]
    gs = [mm.ops.gram(x, alpha=1 / 1024) for x in xs]  # all three in flight before any is read
    assert encodes["gram"] == 1
    recorded = eager.lookup(eager.key(REGISTRY["gram"], [xs[0]], {"alpha": 1 / 1024}))
    assert isinstance(recorded, eager.Recording) and recorded.temporaries, "the case must have temporaries"
    for x, g in zip(xs, gs):
        np.testing.assert_allclose(g.numpy(), R.gram(x.numpy().astype(np.float64), alpha=1 / 1024), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(g.numpy(), fresh(lambda: mm.ops.gram(x, alpha=1 / 1024)))


def test_calls_of_other_kinds_encode_afresh(dev, encodes):
    a, b = rand(dev, 33, seed=1), rand(dev, 33, seed=2)
    mm.ops.add(a, a)
    np.testing.assert_array_equal(mm.ops.add(a, b).numpy(), a.numpy() + b.numpy())  # inputs no longer one buffer
    mm.ops.add(rand(dev, 32), rand(dev, 32))  # another shape
    mm.ops.add(a.astype(mm.float16), b.astype(mm.float16))  # another dtype
    assert encodes["add"] == 4
    np.testing.assert_array_equal(mm.ops.add(b, a).numpy(), b.numpy() + a.numpy())
    assert encodes["add"] == 4  # the kind of add(a, b): replayed

    x = mm.tensor(np.array([1.0, 2.0], np.float32), dev)
    assert not np.signbit(mm.ops.scale(x, s=0.0).numpy()).any()
    assert np.signbit(mm.ops.scale(x, s=-0.0).numpy()).all()  # -0.0 is not 0.0's kind
    mm.ops.scale(x, s=2)
    mm.ops.scale(x, s=2.0)
    assert encodes["scale"] == 4  # nor is 2 the kind of 2.0


def test_the_precision_policy_is_part_of_a_calls_kind(dev, encodes, monkeypatch):
    monkeypatch.setattr(tiling, "matrix_hardware", lambda device: True)  # the TF32 products run on cpu too
    monkeypatch.setattr(tiling, "HIGHEST_MMA_MIN_MACS", 0)
    x, w = rand(dev, 1, 9, 6, 6, seed=3), rand(dev, 8, 9, 3, 3, seed=4)
    results = {}
    for policy in ("highest", "high", "highest", "high"):
        with mm.matmul_precision(policy):
            results.setdefault(policy, []).append(mm.ops.conv2d(x, w, padding=1).numpy())
    assert encodes["conv2d"] == 2
    assert not np.array_equal(results["highest"][0], results["high"][0])
    for policy, (first, replayed) in results.items():
        np.testing.assert_array_equal(replayed, first)
        with mm.matmul_precision(policy):
            np.testing.assert_array_equal(replayed, fresh(lambda: mm.ops.conv2d(x, w, padding=1)))


def test_dispatches_a_template_cannot_hold_are_encoded_every_call(dev, monkeypatch):
    add = REGISTRY["add"]
    outside = mm.tensor(np.full(5, 7.0, np.float32), dev)  # a buffer the call did not make

    def adds_outside(cb, out, a, b):
        add.encode(cb, out, a, outside)

    monkeypatch.setitem(REGISTRY, "add", dataclasses.replace(add, encode=adds_outside))
    a = rand(dev, 5, seed=5)
    np.testing.assert_array_equal(mm.ops.add(a, a).numpy(), a.numpy() + 7)
    assert eager.lookup(eager.key(REGISTRY["add"], [a, a], {})) is eager.UNRECORDABLE
    outside.buffer.write(np.full(5, -1.0, np.float32))
    np.testing.assert_array_equal(mm.ops.add(a, a).numpy(), a.numpy() - 1)

    def runs_an_op(cb, out, a, b):  # binds the result of an op it ran, which commits on its own
        add.encode(cb, out, mm.ops.relu(a), b)

    monkeypatch.setitem(REGISTRY, "add", dataclasses.replace(add, encode=runs_an_op))
    for seed in (6, 7):
        b = rand(dev, 5, seed=seed)
        np.testing.assert_array_equal(mm.ops.add(a, b).numpy(), np.maximum(a.numpy(), 0) + b.numpy())
    assert eager.lookup(eager.key(REGISTRY["add"], [a, b], {})) is eager.UNRECORDABLE


def test_attributes_of_equal_value_and_other_types_are_other_kinds(dev):
    x, scale = rand(dev, 3), REGISTRY["scale"]
    kinds = {eager.key(scale, [x], {"s": s}) for s in (1, 1.0, True, 0.0, -0.0, (1,), [1], (1.0,))}
    assert len(kinds) == 8 and None not in kinds
    assert eager.key(scale, [x], {"s": np.float32(1)}) is None  # not held exactly: not recorded


def test_checking_catches_a_kernel_choice_the_key_leaves_out(dev, monkeypatch):
    monkeypatch.setattr(eager, "checking", True)
    x = rand(dev, 1, 8, 4, 4, seed=8)
    mm.ops.gram(x)
    mm.ops.gram(x)  # the same choice: passes
    matrix_hardware = tiling.matrix_hardware
    # now the same call takes the other kernel (gram, gram_small_mma); monkeypatch would forget
    tiling.matrix_hardware = lambda device: not matrix_hardware(device)
    try:
        with pytest.raises(AssertionError, match="leaves out"):
            mm.ops.gram(x)
    finally:
        tiling.matrix_hardware = matrix_hardware


def test_a_call_that_fails_its_checks_records_nothing(dev):
    x = rand(dev, 1, 2, 3, 3)
    for _ in range(2):
        with pytest.raises(mm.ShapeError, match="alpha"):
            mm.ops.gram(x, alpha=float("inf"))
    assert not [k for k in eager._recorded if k[0] == "gram"]
