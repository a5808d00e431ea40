"""Unit tests of pieces whose alternatives the end-to-end tests do not reach on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qllm_jax.models.model import expert_group
from qllm_jax.models.params import ExpertParams
from qllm_jax.sampling import sample, split_seeds


@pytest.mark.parametrize("group_size,start", [(8, 0), (2, 4), (1, 7)])
def test_ragged_and_dense_expert_groups_agree(group_size, start):
    """On CPU the dense path runs; accelerators run the ragged one: both must be the same math."""
    rng = np.random.default_rng(0)
    n, d, f, e, k = 13, 32, 24, 8, 2
    ep = ExpertParams(
        jnp.asarray(rng.normal(size=(e, d, 2 * f)), jnp.float32),
        jnp.asarray(rng.normal(size=(e, f, d)), jnp.float32),
    )
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    ids = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(n)]), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    dense = expert_group(ep, x, weights, ids, start, group_size, impl="dense")
    ragged = expert_group(ep, x, weights, ids, start, group_size, impl="ragged")
    np.testing.assert_allclose(np.asarray(dense), np.asarray(ragged), rtol=1e-5, atol=1e-4)
    assert np.abs(np.asarray(dense)).sum() > 0


def _sample(logits, temperature=1.0, top_k=0, top_p=1.0, seeds=None, steps=None):
    s = logits.shape[0]
    full = lambda v, dt: jnp.full((s,), v, dt)  # noqa: E731
    return np.asarray(
        jax.jit(sample)(
            jnp.asarray(logits, jnp.float32),
            full(temperature, jnp.float32),
            full(top_k, jnp.int32),
            full(top_p, jnp.float32),
            jnp.asarray(split_seeds(np.arange(s) if seeds is None else seeds)),
            jnp.asarray(np.zeros(s) if steps is None else steps, jnp.int32),
        )
    )


def test_sampler_follows_the_distribution_and_filters():
    probs = np.array([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = np.log(np.maximum(probs, 1e-30))[None].repeat(4000, 0)
    logits[:, 4] = -np.inf  # zero probability: must never be drawn
    draws = _sample(logits)
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.03)
    assert freq[4] == 0
    assert set(_sample(logits, top_k=2)) <= {0, 1}
    assert set(_sample(logits, top_p=0.6)) <= {0, 1}  # 0.5 < 0.6: token 1 is still needed
    assert set(_sample(logits, top_p=0.5)) == {0}
    assert set(_sample(logits, temperature=0.0)) == {0}


def test_sampler_is_a_function_of_seed_and_step():
    logits = np.zeros((6, 50))
    a = _sample(logits, seeds=[1, 2, 3, 1, 2, 3], steps=[0, 0, 0, 0, 0, 0])
    assert list(a[:3]) == list(a[3:])
    b = _sample(logits, seeds=[1, 1, 1, 1, 1, 1], steps=[0, 1, 2, 3, 4, 5])
    assert len(set(b)) > 1
