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


def _top_k_top_p_mask(scaled: Array, top_k: Array, top_p: Array) -> Array:
    """True where a token survives top-k and then top-p filtering. scaled [S, V]."""
    v = scaled.shape[-1]
    desc = -jnp.sort(-scaled, axis=-1)  # [S, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)  # [S]
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # [S, 1]
    desc = jnp.where(jnp.arange(v)[None, :] < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
    last = jnp.sum(before < top_p[:, None], axis=-1) - 1  # index of the last kept token
    pth = jnp.take_along_axis(desc, jnp.maximum(last, 0)[:, None], axis=-1)  # [S, 1]
    return (scaled >= kth) & (scaled >= pth)


def split_seeds(seeds) -> np.ndarray:
    """Host 64-bit seeds [S] → [S, 2] uint32 (low, high words), as ``sample`` takes them."""
    s = np.asarray(seeds, dtype=np.uint64)
    return np.stack([s & 0xFFFFFFFF, s >> 32], axis=-1).astype(np.uint32)


def _row_key(seed: Array, step: Array) -> Array:
    """The PRNG key of one sampled token: a function of the request's seed and the step only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed[0]), seed[1]), step)


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
    filtered distribution: one random draw per row instead of V Gumbel draws. The sort that
    top-k/top-p need, and all sampling work, are skipped when no row asks for them.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled() -> Array:
        t = jnp.where(temperature > 0, temperature, 1.0)
        scaled = logits / t[:, None]
        filtered = jax.lax.cond(
            jnp.any((top_k > 0) | (top_p < 1)),
            lambda: jnp.where(_top_k_top_p_mask(scaled, top_k, top_p), scaled, -jnp.inf),
            lambda: scaled,
        )
        probs = jax.nn.softmax(filtered, axis=-1)
        cdf = jnp.cumsum(probs, axis=-1)  # [S, V]
        keys = jax.vmap(_row_key)(seeds, steps)
        u = jax.vmap(jax.random.uniform)(keys) * cdf[:, -1]  # [S], in [0, total mass)
        # the first token whose CDF exceeds u: never one of zero probability
        token = jnp.sum(cdf <= u[:, None], axis=-1)
        last = probs.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)  # rounding guard
        token = jnp.minimum(token, last).astype(jnp.int32)
        return jnp.where(temperature > 0, token, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda: greedy)
