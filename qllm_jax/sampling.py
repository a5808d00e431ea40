"""The on-device sampler (``SamplingParams`` itself is plain Python, in the scheduler).

Every sampling parameter is a per-row array, not a static jit argument, so a batch mixing greedy and
sampled requests compiles once. Randomness is a pure function of ``(seed, output index)``, so
a seeded request yields the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def sample(
    logits: Array,
    temperature: Array,
    top_k: Array,
    top_p: Array,
    seeds: Array,
    steps: Array,
) -> Array:
    """logits [S, V] f32; temperature/top_p [S] f32; top_k/steps [S] int32; seeds [S] uint32
    → tokens [S] int32. Rows with temperature 0 take the argmax."""
    greedy = jnp.argmax(logits, axis=-1)
    t = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / t[:, None]
    masked = jnp.where(_top_k_top_p_mask(scaled, top_k, top_p), scaled, -jnp.inf)

    def draw(seed, step, row):
        key = jax.random.fold_in(jax.random.key(seed), step)
        return jax.random.categorical(key, row)

    sampled = jax.vmap(draw)(seeds, steps, masked)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
