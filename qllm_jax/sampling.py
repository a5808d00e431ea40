"""The on-device sampler (``SamplingParams`` itself is plain Python, in the scheduler).

Every sampling parameter is a per-row array, not a static jit argument, so a batch mixing greedy and
sampled requests compiles once. Randomness is a pure function of ``(seed, output index)``, so
a seeded request yields the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _ordered_keys(x: Array) -> Array:
    """float32 [S, V] → uint32 keys in the same order (-inf lowest), for exact bisection."""
    i = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _kth_largest(keys: Array, k: Array) -> Array:
    """The k-th largest key of each row: keys [S, V] uint32, k [S] int32 → [S] uint32.

    Bisection over the 2**32 key values (32 rounds of a compare and a count over the row)
    finds it exactly, without sorting the row.
    """

    def halve(_, bounds):  # invariant: count(keys >= lo) >= k > count(keys > hi)
        lo, hi = bounds
        d = hi - lo
        mid = lo + (d >> 1) + (d & 1)
        ok = jnp.sum(keys >= mid[:, None], axis=-1) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    s = keys.shape[0]
    start = (jnp.zeros(s, jnp.uint32), jnp.full(s, 0xFFFFFFFF, jnp.uint32))
    return jax.lax.fori_loop(0, 32, halve, start)[0]


def _top_p_floor(probs: Array, top_p: Array) -> Array:
    """The least probability a top-p filter keeps: the smallest t among the float values
    with mass(probs > t) < top_p, as uint32 bits. probs [S, V] >= 0, top_p [S] → [S].

    A token is kept iff the mass strictly above it is below ``top_p``, which is the token
    being >= that t: the same set as sorting and cutting the cumulative sum (ties kept).
    """
    bits = jax.lax.bitcast_convert_type(probs, jnp.uint32)  # non-negative floats sort as ints

    def halve(_, bounds):  # invariant: mass(probs > hi) < top_p <= mass(probs > lo - 1)
        lo, hi = bounds
        mid = lo + ((hi - lo) >> 1)
        ok = jnp.sum(jnp.where(bits > mid[:, None], probs, 0.0), axis=-1) < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    s = probs.shape[0]
    start = (jnp.zeros(s, jnp.uint32), jnp.full(s, 0x7F800000, jnp.uint32))  # [0, +inf]
    return jax.lax.fori_loop(0, 31, halve, start)[1]


FEW = 64  # top-k up to this many, and top-p within the top this many, take a partial sort


def top_k_top_p_mask(scaled: Array, top_k: Array, top_p: Array) -> Array:
    """True where a token survives top-k and then top-p filtering (top-p over the top-k
    renormalised distribution, as vLLM applies them). scaled [S, V] f32, top_k [S] int32
    (<= 0: off), top_p [S] f32 (1: off) → [S, V] bool; ties at a cut are kept.

    No full sort. A row whose cut lies within its ``FEW`` largest values takes it from one
    partial sort (``lax.top_k``); any other row by an exact bisection over all V values, run
    only when some row needs it. Which way a row goes depends on that row alone, so a row's
    tokens never depend on what else is in the batch.
    """
    s, v = scaled.shape
    few = min(FEW, v)
    keep = jnp.ones((s, v), bool)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)  # [S]

    def by_top_k() -> Array:
        top = jax.lax.top_k(scaled, few)[0]  # [S, few] descending
        kth_few = jnp.take_along_axis(top, jnp.minimum(k, few)[:, None] - 1, axis=-1)[:, 0]
        kth = jax.lax.cond(
            jnp.any(k > few),
            lambda: jnp.where(k > few, _kth_value(scaled, k), kth_few),
            lambda: kth_few,
        )
        return scaled >= kth[:, None]

    keep = jax.lax.cond(jnp.any(top_k > 0), by_top_k, lambda: keep)

    def by_top_p() -> Array:
        probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
        top = jax.lax.top_k(probs, few)[0]  # [S, few] descending
        above = jnp.sum(jnp.where(top[:, None, :] > top[:, :, None], top[:, None, :], 0), -1)
        inside = jnp.sum(jnp.where(above < top_p[:, None], top, 0), -1) >= top_p  # cut found
        last = jnp.sum(above < top_p[:, None], axis=-1) - 1
        floor_few = jnp.take_along_axis(top, jnp.maximum(last, 0)[:, None], axis=-1)[:, 0]
        floor_bits = jax.lax.bitcast_convert_type(floor_few, jnp.uint32)
        floor_bits = jax.lax.cond(
            jnp.any(~inside & (top_p < 1)),
            lambda: jnp.where(inside, floor_bits, _top_p_floor(probs, top_p)),
            lambda: floor_bits,
        )
        kept = jax.lax.bitcast_convert_type(probs, jnp.uint32) >= floor_bits[:, None]
        return keep & (kept | (top_p >= 1)[:, None])

    return jax.lax.cond(jnp.any(top_p < 1), by_top_p, lambda: keep)


def _kth_value(scaled: Array, k: Array) -> Array:
    """The k-th largest value of each row, exactly, by bisection: [S, V], [S] → [S]."""
    keys = _ordered_keys(scaled)
    kth = _kth_largest(keys, k)
    return jnp.min(jnp.where(keys >= kth[:, None], scaled, jnp.inf), axis=-1)


def argmax(x: Array) -> Array:
    """The first index of each row's maximum, [S, V] → [S] int32: ``jnp.argmax``'s answer from
    two plain reductions, which XLA:CPU runs about 3x faster than its variadic argmax."""
    top = x.max(axis=-1, keepdims=True)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1).astype(jnp.int32)


def split_seeds(seeds) -> np.ndarray:
    """Host 64-bit seeds [S] → [S, 2] uint32 (low, high words), as ``sample`` takes them."""
    s = np.asarray(seeds, dtype=np.uint64)
    return np.stack([s & 0xFFFFFFFF, s >> 32], axis=-1).astype(np.uint32)


def _row_key(seed: Array, step: Array) -> Array:
    """The PRNG key of one sampled token: a function of the request's seed and the step only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed[0]), seed[1]), step)


BLOCK = 256  # tokens per block of the two-level inverse CDF


def _invert_cdf(probs: Array, u: Array) -> Array:
    """The token where each row's CDF first exceeds ``u`` times its total mass, found in two
    levels (a block, then a token inside it) instead of one cumulative sum over V, which is
    slow on CPU. Never a token of zero probability. probs [S, V] >= 0, u [S] → [S] int32."""
    s, v = probs.shape
    nb = -(-v // BLOCK)
    blocks = jnp.pad(probs, ((0, 0), (0, nb * BLOCK - v))).reshape(s, nb, BLOCK)
    mass = blocks.sum(-1)  # [S, nb]
    cdf = jnp.cumsum(mass, axis=-1)
    target = u * cdf[:, -1]
    last = nb - 1 - jnp.argmax(mass[:, ::-1] > 0, axis=-1)  # rounding guards, here and below
    b = jnp.minimum(jnp.sum(cdf <= target[:, None], axis=-1), last)  # [S]
    row = jnp.take_along_axis(blocks, b[:, None, None], axis=1)[:, 0]  # [S, BLOCK]
    inner = jnp.cumsum(row, axis=-1)
    rest = target - (jnp.take_along_axis(cdf, b[:, None], axis=-1)[:, 0] - mass[jnp.arange(s), b])
    last_in = BLOCK - 1 - jnp.argmax(row[:, ::-1] > 0, axis=-1)
    j = jnp.minimum(jnp.sum(inner <= rest[:, None], axis=-1), last_in)
    return (b * BLOCK + j).astype(jnp.int32)


def sample(
    logits: Array,
    temperature: Array,
    top_k: Array,
    top_p: Array,
    seeds: Array,
    steps: Array,
) -> Array:
    """logits [S, V] f32; temperature/top_p [S] f32; top_k/steps [S] int32; seeds [S, 2] uint32
    (the low and high words of a 64-bit seed) → tokens [S] int32. Rows with temperature 0
    take the argmax.

    A sampled row draws one uniform number, keyed by (seed, step), and inverts the CDF of its
    filtered distribution: one random draw per row instead of V Gumbel draws. Top-k and top-p
    need no sort (``top_k_top_p_mask``); each, and all sampling work, is skipped when no row
    asks for it.
    """
    greedy = argmax(logits)

    def sampled() -> Array:
        t = jnp.where(temperature > 0, temperature, 1.0)
        scaled = logits / t[:, None]
        filtered = jnp.where(top_k_top_p_mask(scaled, top_k, top_p), scaled, -jnp.inf)
        probs = jax.nn.softmax(filtered, axis=-1)
        u = jax.vmap(jax.random.uniform)(jax.vmap(_row_key)(seeds, steps))  # [S] in [0, 1)
        token = _invert_cdf(probs, u)
        return jnp.where(temperature > 0, token, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
