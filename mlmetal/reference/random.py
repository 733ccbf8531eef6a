"""Numpy references of the random generators and distributions of kernels/random.metal.

Everything here is exact integer arithmetic (the generators) or float64 (normal), written from
the algorithms' descriptions so the kernels can be checked bit for bit:

- Philox4x32-10: Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3"
  (SC'11). Stream layout (DESIGN §5): key = (seed, 0), counter = (0, 0, 0, block); element i is
  word i mod 4 of block i div 4.
- MTGP32: Saito, Matsumoto, "Variants of Mersenne Twister suitable for graphic processors"
  (ACM TOMS 39, 2013). With B states, output chunk c (256 words) is step c div B of state c mod B.
"""

from __future__ import annotations

import math

import numpy as np

from mlmetal.data import mtgp32_params

U32 = np.uint32
MASK32 = 0xFFFFFFFF

# ---------------------------------------------------------------- Philox4x32-10

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key schedule increments (golden ratio, sqrt(3) - 1)


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 blocks: counters (..., 4) and keys (..., 2) -> (..., 4) uint32."""
    c = [np.asarray(counter, np.uint64)[..., i] for i in range(4)]
    k0, k1 = (np.asarray(key, np.uint64)[..., i] for i in range(2))
    for _ in range(10):
        p0 = np.uint64(PHILOX_M[0]) * c[0]  # 32 x 32 -> 64 bits: exact in uint64
        p1 = np.uint64(PHILOX_M[1]) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & np.uint64(MASK32)
        hi1, lo1 = p1 >> np.uint64(32), p1 & np.uint64(MASK32)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        k0 = (k0 + np.uint64(PHILOX_W[0])) & np.uint64(MASK32)
        k1 = (k1 + np.uint64(PHILOX_W[1])) & np.uint64(MASK32)
    return np.stack(c, axis=-1).astype(U32)


def philox_uint32(seed: int, start: int, n: int) -> np.ndarray:
    """Elements start … start+n-1 of the Philox stream of `seed`.

    Counter word 3 holds the block index; blocks past 2**32 carry into word 2 (a 64-bit block
    index), which leaves the DESIGN §5 layout (0, 0, 0, block) unchanged below that.
    """
    i = np.arange(start, start + n, dtype=np.uint64)
    first = start // 4
    blocks = np.arange(first, (start + n + 3) // 4, dtype=np.uint64)
    zeros = np.zeros_like(blocks)
    counter = np.stack([zeros, zeros, blocks >> np.uint64(32), blocks & np.uint64(MASK32)], axis=-1)
    words = philox4x32_10(counter, np.array([seed, 0], np.uint64))
    return words[(i // np.uint64(4)) - np.uint64(first), i % np.uint64(4)]


# ---------------------------------------------------------------- MTGP32

MTGP32_N = 351  # state words: mexp // 32 + 1 for mexp = 11213
MTGP32_STEP = 256  # words per step (one per thread of a threadgroup)


def mtgp32_init_state(param: dict, seed: int) -> np.ndarray:
    """The 351-word initial state of one MTGP32 generator (the reference seeding)."""
    tbl = param["tbl"]
    hidden = (tbl[4] ^ (tbl[8] << 16)) & MASK32
    fill = hidden
    fill = (fill + (fill >> 16)) & MASK32
    fill = (fill + (fill >> 8)) & MASK32
    state = [(fill & 0xFF) * 0x01010101] * MTGP32_N  # every byte of the array set to fill & 0xff
    state[0], state[1] = seed & MASK32, hidden
    for i in range(1, MTGP32_N):  # the Mersenne Twister initialisation recurrence
        prev = state[i - 1]
        state[i] ^= (1812433253 * (prev ^ (prev >> 30)) + i) & MASK32
    return np.array(state, U32)


def _recursion(p: dict, x1, x2, y):
    """MTGP32's state recursion of one word from words k, k+1 and k+pos."""
    x = ((x1 & p["mask"]) ^ x2) & MASK32
    x ^= (x << p["sh1"]) & MASK32
    y = x ^ (y >> p["sh2"])
    return y ^ p["tbl"][y & 0xF]


def _temper(p: dict, v, t):
    """MTGP32's tempering of a new word v with word k+pos-1."""
    t ^= t >> 16
    t ^= t >> 8
    return v ^ p["tmp_tbl"][t & 0xF]


def mtgp32_reference_stream(param: dict, seed: int, n: int) -> np.ndarray:
    """First n words of one MTGP32 generator, one word at a time as the reference C code runs."""
    p, pos = param, param["pos"]
    x = [int(v) for v in mtgp32_init_state(param, seed)]
    out = []
    for k in range(n):  # word k+N is made from words k, k+1, k+pos; tempered with word k+pos-1
        new = _recursion(p, x[k], x[k + 1], x[k + pos])
        x.append(new)
        out.append(_temper(p, new, x[k + pos - 1]))
    return np.array(out, U32)


def _mtgp32_tables(states: int):
    """Per-state parameter columns, shaped for broadcasting over (states, words)."""
    sets = mtgp32_params()[:states]
    col = lambda key: np.array([s[key] for s in sets], U32)[:, None]  # noqa: E731
    tables = lambda key: np.array([s[key] for s in sets], U32)  # noqa: E731
    return col("pos"), col("sh1"), col("sh2"), col("mask"), tables("tbl"), tables("tmp_tbl")


def mtgp32_steps(seed: int, states: int, steps: int) -> np.ndarray:
    """(states, steps * 256) words: `steps` steps of every state, vectorised a step at a time.

    One step makes words k+N … k+N+255 at once, which is possible because every parameter set
    has pos <= 93 < N - 255: no word of a step reads another word of the same step.
    """
    params = mtgp32_params()
    if not 1 <= states <= len(params):
        raise ValueError(f"states must be in 1..{len(params)}, got {states}")
    pos, sh1, sh2, mask, tbl, tmp_tbl = _mtgp32_tables(states)
    assert int(pos.max()) < MTGP32_N - MTGP32_STEP + 1
    N, S = MTGP32_N, MTGP32_STEP
    x = np.zeros((states, N + S * steps), U32)
    for b in range(states):
        x[b, :N] = mtgp32_init_state(params[b], (seed + b + 1) & MASK32)
    rows = np.arange(states)[:, None]
    t = np.arange(S)[None, :]
    out = np.empty((states, S * steps), U32)
    for step in range(steps):
        k = step * S
        xk = x[:, k:k + S]
        xk1 = x[:, k + 1:k + 1 + S]
        y = x[rows, k + t + pos]
        v = (xk & mask) ^ xk1
        v ^= v << sh1
        y = v ^ (y >> sh2)
        new = y ^ tbl[rows, y & U32(0xF)]
        x[:, k + N:k + N + S] = new
        tt = x[rows, k + t + pos - 1]
        tt ^= tt >> U32(16)
        tt ^= tt >> U32(8)
        out[:, k:k + S] = new ^ tmp_tbl[rows, tt & U32(0xF)]
    return out


def mtgp32_uint32(seed: int, start: int, n: int, states: int = 192) -> np.ndarray:
    """Elements start … start+n-1 of the MTGP32 stream of `seed` with `states` states (DESIGN §5)."""
    if n == 0:
        return np.zeros(0, U32)
    S = MTGP32_STEP
    last_chunk = (start + n - 1) // S
    per_state = mtgp32_steps(seed, states, last_chunk // states + 1).reshape(states, -1, S)
    chunks = per_state.transpose(1, 0, 2).reshape(-1, S)  # chunk c = step c // B of state c % B
    return chunks.reshape(-1)[start:start + n]


# ---------------------------------------------------------------- distributions

def uniform_t(words) -> np.ndarray:
    """t = (x >> 9) * 2**-23 in [0, 1): the top 23 bits as a float32 mantissa step."""
    return ((np.asarray(words, U32) >> U32(9)).astype(np.float32) * np.float32(2.0 ** -23)).astype(np.float32)


def fma_f32(a, b, c) -> np.ndarray:
    """float32 fused multiply-add a*b + c, rounded once (numpy has no fma).

    The float32 product is exact in float64; the float64 sum can round once more, which only
    changes the float32 result when it lands exactly halfway between two float32 values — then
    the sum's rounding error (two-sum) says which way the exact value lies.
    """
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    prod = a * b
    s = prod + c
    bv = s - prod
    err = (prod - (s - bv)) + (c - bv)  # exact: s + err == prod + c
    r = s.astype(np.float32)
    towards = np.where(s > r.astype(np.float64), np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
    other = np.nextafter(r, towards)
    tie = (s != r) & (s == (r.astype(np.float64) + other.astype(np.float64)) / 2) & (err != 0)
    # at a tie the exact value lies beyond s on the side err points to: pick that neighbour
    beyond = np.sign(err) == np.sign(other.astype(np.float64) - s)
    return np.where(tie & beyond, other, r).astype(np.float32)


def uniform(words, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """Uniform float32 in [low, high): fma(high - low, t, low) with high - low in float32."""
    scale = np.float32(high) - np.float32(low)
    return fma_f32(scale, uniform_t(words), np.float32(low))


def normal(words, mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """float64 Box–Muller of word pairs (2j, 2j+1): element 2j = r cos θ, element 2j+1 = r sin θ.

    u1 = ((x0 >> 8) + 1) * 2**-24 lies in (0, 1], so log(u1) is finite; θ = 2π (x1 >> 8) * 2**-24.
    `words` must start at an even stream position and have even length.
    """
    w = np.asarray(words, U32).reshape(-1, 2).astype(np.float64)
    u1 = (np.floor(w[:, 0] / 256) + 1) * 2.0 ** -24
    u2 = np.floor(w[:, 1] / 256) * 2.0 ** -24
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.stack([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=-1).reshape(-1)
    return mean + std * z


def stream(generator: str, seed: int, start: int, n: int, distribution: str = "uint32", a: float = 0.0,
           b: float = 1.0, states: int = 192) -> np.ndarray:
    """Elements start … start+n-1 of a generator's stream under a distribution.

    generator: 'philox' or 'mtgp32'; distribution: 'uint32', 'uniform' (a=min, b=max) or
    'normal' (a=mean, b=std; float64).
    """
    def words(s, m):
        return philox_uint32(seed, s, m) if generator == "philox" else mtgp32_uint32(seed, s, m, states)

    if distribution == "uint32":
        return words(start, n)
    if distribution == "uniform":
        return uniform(words(start, n), a, b)
    if distribution == "normal":  # whole pairs around the requested range
        lo, hi = start & ~1, (start + n + 1) & ~1
        return normal(words(lo, hi - lo), a, b)[start - lo:start - lo + n]
    raise ValueError(f"unknown distribution {distribution!r}")


def random_tensor(*, shape, generator, distribution, start, dtype=None):
    """The numbers a generator hands out from stream position `start` (float64 for float distributions)."""
    kind = "philox" if type(generator).__name__ == "Philox" else "mtgp32"
    name = type(distribution).__name__.lower()
    a, b = {"uint32": (0.0, 1.0), "uniform": (getattr(distribution, "min", 0.0), getattr(distribution, "max", 1.0)),
            "normal": (getattr(distribution, "mean", 0.0), getattr(distribution, "std", 1.0))}[name]
    extra = {"states": generator.states} if kind == "mtgp32" else {}
    out = stream(kind, generator.seed, start, math.prod(shape), name, a, b, **extra)
    return np.asarray(out).reshape(shape)
