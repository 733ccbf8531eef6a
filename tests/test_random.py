"""Random numbers (issue 6): known answers, stream layouts, kernels against the references bit for
bit, statistics with fixed seeds, and argument errors. The backend comes from MLMETAL_DEVICE."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlmetal as mm
import mlmetal.random as mr
from mlmetal.data import mtgp32_params
from mlmetal.reference import random as ref

VECTORS = json.loads((Path(__file__).parent / "data" / "rng_test_vectors.json").read_text())
# MTGP32 has two kernel variants (one picked per backend); every variant runs on every backend.
GENERATORS = ["philox", "mtgp32", "mtgp32_serial"]
MTGP32_KERNELS = ["mtgp32", "mtgp32_serial"]


@pytest.fixture(scope="module")
def dev():
    return mm.device()


def make(dev, kind, seed, states=3):
    """A fresh generator of `kind` (a GENERATORS entry); few MTGP32 states keep the cpu backend quick."""
    if kind == "philox":
        return mr.Philox(dev, seed)
    gen = mr.MTGP32(dev, seed, states=states)
    gen.kernel = kind
    return gen


def expected(kind, seed, start, n, dist="uint32", a=0.0, b=1.0, states=3):
    return ref.stream("philox" if kind == "philox" else "mtgp32", seed, start, n, dist, a, b, states=states)


def draw(gen, n, distribution=None):
    """Encode one call of n numbers, run it, and return them as the distribution's dtype."""
    distribution = distribution or mr.UInt32()
    out = gen.device.buffer(nbytes=4 * max(n, 1))
    cb = gen.device.command_buffer()
    gen.encode(cb, out, distribution, n=n)
    cb.commit()
    cb.wait()
    return out.numpy(distribution.dtype)[:n].copy()


# ---------------------------------------------------------------- known answers

@pytest.mark.parametrize("vector", VECTORS["philox4x32_10_known_answers"]["vectors"])
def test_philox_reference_known_answers(vector):
    counter, key, output = ([int(x, 16) for x in vector[k]] for k in ("counter", "key", "output"))
    assert ref.philox4x32_10(counter, key).tolist() == output


def test_philox_kernel_known_answer(dev):
    # counter (0,0,0,0) with key (0,0) is block 0 of seed 0: the first published vector
    zero = VECTORS["philox4x32_10_known_answers"]["vectors"][0]
    assert draw(mr.Philox(dev, 0), 4).tolist() == [int(x, 16) for x in zero["output"]]


@pytest.mark.parametrize("kernel", MTGP32_KERNELS)
@pytest.mark.parametrize("stream", VECTORS["mtgp32_reference_streams"]["streams"], ids=lambda s: f"seed{s['seed']}")
def test_mtgp32_reference_streams(dev, stream, kernel):
    param, seed, want = mtgp32_params()[stream["param_index"]], stream["seed"], stream["uint32_first64"]
    assert ref.mtgp32_reference_stream(param, seed, 64).tolist() == want
    # a single state (parameter set 0) is seeded with seed + 0 + 1
    assert ref.mtgp32_uint32(seed - 1, 0, 64, states=1).tolist() == want
    assert draw(make(dev, kernel, seed - 1, states=1), 64).tolist() == want


def test_mtgp32_vectorised_reference_matches_word_by_word():
    for b in (0, 7, 199):  # per-state parameter sets and seeds (seed + b + 1)
        words = ref.mtgp32_steps(41, b + 1, 5)[b]
        assert (words == ref.mtgp32_reference_stream(mtgp32_params()[b], 42 + b, 5 * 256)).all()


def test_uniform_t_is_mtgp_close_open():
    # MTGP's float tables hold 1.0f's exponent over the tempering table's top 23 bits, so its
    # [1, 2) float minus one is exactly (x >> 9) * 2**-23 — DESIGN §5's t.
    for s in mtgp32_params():
        assert s["flt_tmp_tbl"] == [0x3F800000 | (v >> 9) for v in s["tmp_tbl"]]


def test_parameter_table_shipped_with_licence():
    from importlib import resources
    files = resources.files("mlmetal.data")
    assert "Redistribution and use" in files.joinpath("LICENSE-MTGP32.txt").read_text()
    assert len(mtgp32_params()) == 200 and {s["mexp"] for s in mtgp32_params()} == {11213}


# ---------------------------------------------------------------- layouts

def test_philox_layout(dev):
    n = 4 * 300 + 3
    blocks = ref.philox4x32_10([[0, 0, 0, b] for b in range(301)], [123, 0])
    assert (draw(mr.Philox(dev, 123), n) == blocks.reshape(-1)[:n]).all()


def test_philox_block_index_carries_into_counter_word_2(dev):
    # past 2**32 blocks the block index carries into counter word 2 instead of wrapping
    want = ref.philox4x32_10([[0, 0, 0, 2**32 - 1], [0, 0, 1, 0]], [5, 0]).reshape(-1)
    assert (ref.philox_uint32(5, 4 * (2**32 - 1), 8) == want).all()
    gen = mr.Philox(dev, 5)
    gen.position = 4 * (2**32 - 1) + 1  # Philox may jump anywhere in its stream
    assert (draw(gen, 6) == want[1:7]).all()


@pytest.mark.parametrize("kernel", MTGP32_KERNELS)
@pytest.mark.parametrize("states", [1, 4, 192])
def test_mtgp32_states_interleave(dev, states, kernel):
    steps = 2
    n = 256 * states * steps - 37  # the last chunk only partly written
    words = draw(make(dev, kernel, 9, states=states), n)
    per_state = ref.mtgp32_steps(9, states, steps)
    for c in range(-(-n // 256)):  # chunk c is step c div B of state c mod B
        step, b = divmod(c, states)
        want = per_state[b, 256 * step:256 * (step + 1)]
        assert (words[256 * c:256 * (c + 1)] == want[:len(words[256 * c:256 * (c + 1)])]).all(), f"chunk {c}"


@pytest.mark.parametrize("kind", GENERATORS)
@pytest.mark.parametrize("n", [1, 3, 4, 5, 255, 256, 257, 1000])
def test_two_calls_equal_one(dev, kind, n):
    once = draw(make(dev, kind, 77), 2 * n)
    gen = make(dev, kind, 77)
    twice = np.concatenate([draw(gen, n), draw(gen, n)])
    assert (once == twice).all()
    assert gen.position == 2 * n


@pytest.mark.parametrize("kind", GENERATORS)
def test_stream_continues_across_distributions(dev, kind):
    # every distribution reads the same stream; normal pairs straddling calls are made again
    gen = make(dev, kind, 5)
    u = draw(gen, 3)
    f = draw(gen, 1001, mr.Uniform(-2, 3))
    z = draw(gen, 7, mr.Normal(1, 2))
    assert (u == expected(kind, 5, 0, 3)).all()
    assert (f == expected(kind, 5, 3, 1001, "uniform", -2, 3)).all()
    np.testing.assert_allclose(z, expected(kind, 5, 1004, 7, "normal", 1, 2), rtol=0, atol=2e-5)


def test_mtgp32_state_is_on_the_device(dev):
    gen = mr.MTGP32(dev, 3, states=2)
    gen.device.synchronize()
    state = gen.state.numpy(np.uint32).reshape(2, 351)
    for b in range(2):
        assert (state[b] == ref.mtgp32_init_state(mtgp32_params()[b], 3 + b + 1)).all()


# ---------------------------------------------------------------- kernels against the references

@pytest.mark.parametrize("kind", GENERATORS)
@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-1.0, 1.0), (3.25, 1e4), (-1e-3, 7e-4)])
def test_uniform_bit_identical(dev, kind, low, high):
    got = draw(make(dev, kind, 11), 5000, mr.Uniform(low, high))
    want = expected(kind, 11, 0, 5000, "uniform", low, high)
    assert got.dtype == np.float32 and (got.view(np.uint32) == want.view(np.uint32)).all()
    assert got.min() >= np.float32(low) and got.max() <= np.float32(high)


@pytest.mark.parametrize("kind", GENERATORS)
def test_normal_matches_reference(dev, kind):
    got = draw(make(dev, kind, 12), 4097, mr.Normal(0.5, 3.0))
    want = expected(kind, 12, 0, 4097, "normal", 0.5, 3.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=3.0 * 2e-5)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(GENERATORS), seed=st.integers(0, 2**32 - 1), start=st.integers(0, 700),
       n=st.one_of(st.sampled_from([1, 2, 3, 31, 32, 33, 255, 256, 257, 511, 513]), st.integers(1, 3000)),
       dist=st.sampled_from(["uint32", "uniform"]))
def test_kernel_matches_reference(dev, kind, seed, start, n, dist):
    gen = make(dev, kind, seed)
    if start:
        draw(gen, start)  # begin anywhere in a block or chunk
    distribution = mr.UInt32() if dist == "uint32" else mr.Uniform(-1.5, 2.5)
    got = draw(gen, n, distribution)
    want = expected(kind, seed, start, n, dist, -1.5, 2.5)
    assert (got.view(np.uint32) == want.view(np.uint32)).all()


def test_writes_only_n_numbers(dev):
    out = dev.buffer(np.full(10, 0xDEADBEEF, np.uint32))
    for gen in (make(dev, kind, 1) for kind in GENERATORS):
        draw(gen, 3)  # start mid-block and mid-chunk
        cb = dev.command_buffer()
        gen.encode(cb, out, n=5)
        cb.commit()
        cb.wait()
        assert (out.numpy(np.uint32)[5:] == 0xDEADBEEF).all()


# ---------------------------------------------------------------- backends bit for bit

@pytest.mark.skipif(mm.available("cuda") is not None, reason="needs the cuda backend and an NVIDIA GPU")
@pytest.mark.parametrize("kind", GENERATORS)
def test_cpu_and_cuda_bit_identical(kind):
    results = []
    for name in ("cpu", "cuda"):
        gen = make(mm.device(name), kind, 2024, states=192)
        results.append([draw(gen, 100_003).view(np.uint32), draw(gen, 65_537, mr.Uniform(-3, 5)).view(np.uint32)])
    for cpu, cuda in zip(*results):
        assert (cpu == cuda).all()


# ---------------------------------------------------------------- statistics (fixed seeds)

STAT_N = 1 << 20


@pytest.fixture(scope="module", params=["philox", "mtgp32"])
def samples(request, dev):
    """uint32, uniform and normal draws of one generator, each from its own seed."""
    kind = request.param
    gen = {"philox": mr.Philox, "mtgp32": mr.MTGP32}[kind]  # the backend's own variant
    return {"uint32": draw(gen(dev, 1), STAT_N),
            "uniform": draw(gen(dev, 2), STAT_N, mr.Uniform()),
            "normal": draw(gen(dev, 3), STAT_N, mr.Normal())}


def test_chi_square_buckets(samples):
    stats = pytest.importorskip("scipy.stats")
    for bits in (0, 24):  # the top byte and the bottom byte of the words
        counts = np.bincount((samples["uint32"] >> np.uint32(bits)) & np.uint32(255), minlength=256)
        assert stats.chisquare(counts).pvalue > 1e-4
    counts = np.bincount((samples["uniform"] * 1000).astype(np.int64), minlength=1000)
    assert stats.chisquare(counts).pvalue > 1e-4


def test_kolmogorov_smirnov(samples):
    stats = pytest.importorskip("scipy.stats")
    assert stats.kstest(samples["uniform"], "uniform").pvalue > 1e-4
    assert stats.kstest(samples["normal"], "norm").pvalue > 1e-4


def test_moments(samples):
    u, z = samples["uniform"].astype(np.float64), samples["normal"].astype(np.float64)
    se = 1 / np.sqrt(STAT_N)  # standard errors are O(1/sqrt(n)); 6 of them is never hit by chance
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 6 * se * np.sqrt(1 / 12) and abs(u.var() - 1 / 12) < 6 * se * np.sqrt(1 / 180)
    assert abs(z.mean()) < 6 * se and abs(z.var() - 1) < 6 * se * np.sqrt(2)
    assert abs((z**3).mean()) < 6 * se * np.sqrt(15) and abs((z**4).mean() - 3) < 6 * se * np.sqrt(96)
    # neighbouring numbers (one Box–Muller pair, one Philox block) are uncorrelated
    for x in (u - 0.5, z):
        assert abs(np.mean(x[:-1] * x[1:])) < 6 * se * x.var()


# ---------------------------------------------------------------- errors, raised before encoding

class FakeTensor:
    """The duck type generators accept: a buffer, a shape and a dtype."""

    def __init__(self, buffer, shape, dtype):
        self.buffer, self.shape, self.dtype, self.size = buffer, shape, np.dtype(dtype), int(np.prod(shape))


@pytest.mark.parametrize("make_dist, err", [
    (lambda: mr.Uniform(1.0, 1.0), ValueError),
    (lambda: mr.Uniform(2.0, 1.0), ValueError),
    (lambda: mr.Uniform(0.0, float("nan")), ValueError),
    (lambda: mr.Uniform(1.0, 1.0 + 1e-12), ValueError),  # equal in float32
    (lambda: mr.Uniform(-3e38, 3e38), ValueError),  # max - min overflows float32
    (lambda: mr.Normal(0.0, 0.0), ValueError),
    (lambda: mr.Normal(0.0, -1.0), ValueError),
    (lambda: mr.Normal(float("inf"), 1.0), ValueError),
    (lambda: mr.Normal("0", 1.0), TypeError),
])
def test_bad_distributions(make_dist, err):
    with pytest.raises(err):
        make_dist()


@pytest.mark.parametrize("kind", GENERATORS)
def test_bad_outputs_encode_nothing(dev, kind):
    gen = make(dev, kind, 0)
    buf = dev.buffer(np.zeros(8, np.uint32))
    cb = dev.command_buffer()
    cases = [
        (FakeTensor(buf, (2, 4), np.uint32), mr.Uniform(), TypeError),
        (FakeTensor(buf, (2, 4), np.float32), mr.UInt32(), TypeError),
        (FakeTensor(buf, (4, 4), np.float16), mr.Normal(), TypeError),
        (np.zeros(8, np.float32), mr.Uniform(), TypeError),
        (buf, "uniform", TypeError),
    ]
    for out, dist, err in cases:
        with pytest.raises(err):
            gen.encode(cb, out, dist)
    with pytest.raises(ValueError):
        gen.encode(cb, buf, mr.UInt32(), n=9)
    assert gen.position == 0
    cb.commit()
    cb.wait()
    assert (buf.numpy(np.uint32) == 0).all()


def test_tensor_output(dev):
    buf = dev.buffer(nbytes=4 * 6)
    gen = mr.Philox(dev, 8)
    cb = dev.command_buffer()
    gen.encode(cb, FakeTensor(buf, (2, 3), np.float32), mr.Uniform())
    cb.commit()
    cb.wait()
    assert (buf.numpy(np.float32) == expected("philox", 8, 0, 6, "uniform")).all()
    assert gen.uniform((2, 3)).shape == (2, 3) and gen.position == 12


@pytest.mark.parametrize("args, err", [
    (dict(seed=-1), ValueError), (dict(seed=2**32), ValueError), (dict(seed=1.5), TypeError),
    (dict(seed=0, states=0), ValueError), (dict(seed=0, states=201), ValueError),
])
def test_bad_generators(dev, args, err):
    with pytest.raises(err):
        (mr.MTGP32 if "states" in args else mr.Philox)(dev, **args)
