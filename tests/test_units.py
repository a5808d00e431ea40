"""Unit tests of pieces whose alternatives the end-to-end tests do not reach on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qllm_jax.models.model import expert_group
from qllm_jax.models.params import ExpertParams
from qllm_jax.sampling import sample, split_seeds, top_k_top_p_mask


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


@pytest.mark.parametrize("group_size,start", [(8, 0), (1, 5)])
def test_large_passes_run_each_expert_on_its_routed_rows(group_size, start):
    """From GATHER_MIN_ROWS rows on, the dense path computes each expert on the rows routed to
    it, in tiles: the same math as every expert on every row, padding rows (id E) untouched,
    and bitwise a row's output does not depend on the other rows of its pass nor on where it
    sits (any pass of >= GATHER_MIN_ROWS rows)."""
    from qllm_jax.models import model as M

    rng = np.random.default_rng(1)
    n, d, f, e, k = 200, 32, 24, 8, 2
    ep = ExpertParams(
        jnp.asarray(rng.normal(size=(e, d, 2 * f)), jnp.float32),
        jnp.asarray(rng.normal(size=(e, f, d)), jnp.float32),
    )
    x = rng.normal(size=(n, d)).astype(np.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    ids[-5:] = e  # padding rows
    weights = rng.random((n, k)).astype(np.float32)
    run = jax.jit(lambda x, w, i: expert_group(ep, x, w, i, start, group_size, impl="dense"))
    full = np.asarray(run(x, weights, ids))
    every_row = [  # every expert of the group on every row, in passes below GATHER_MIN_ROWS
        np.asarray(run(x[r : r + 8], weights[r : r + 8], ids[r : r + 8])) for r in range(0, n, 8)
    ]
    np.testing.assert_allclose(full, np.concatenate(every_row), rtol=1e-5, atol=1e-4)
    assert (full[-5:] == 0).all() and np.abs(full).sum() > 0
    assert n >= M.GATHER_MIN_ROWS
    for rows, at in [(64, 10), (128, 0), (64, 63)]:  # row 120 at ``at`` of another pass
        xo = rng.normal(size=(rows, d)).astype(np.float32)
        io = np.stack([rng.choice(e, k, replace=False) for _ in range(rows)]).astype(np.int32)
        wo = rng.random((rows, k)).astype(np.float32)
        xo[at], io[at], wo[at] = x[120], ids[120], weights[120]
        np.testing.assert_array_equal(np.asarray(run(xo, wo, io))[at], full[120])


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
    # top-p by rejection (and, for the rows that reject every draw, by the exact search):
    # the renormalised top-p distribution
    kept = np.bincount(_sample(logits, top_p=0.9), minlength=5) / len(draws)
    np.testing.assert_allclose(kept, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0, 0], atol=0.03)
    flat = np.log(np.array([0.2, 0.2] + [0.1] * 6))[None].repeat(4000, 0)
    low = np.bincount(_sample(flat, top_p=0.35), minlength=8) / len(flat)  # 13 % of rows search
    np.testing.assert_allclose(low, [0.5, 0.5] + [0] * 6, atol=0.03)


def test_sampler_is_a_function_of_seed_and_step():
    logits = np.zeros((6, 50))
    a = _sample(logits, seeds=[1, 2, 3, 1, 2, 3], steps=[0, 0, 0, 0, 0, 0])
    assert list(a[:3]) == list(a[3:])
    b = _sample(logits, seeds=[1, 1, 1, 1, 1, 1], steps=[0, 1, 2, 3, 4, 5])
    assert len(set(b)) > 1


def _mask_oracle(scaled: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Sort-based top-k then top-p (ties at either cut kept), in float64."""
    v = scaled.shape[-1]
    out = np.zeros_like(scaled, bool)
    for i, row in enumerate(scaled):
        k = min(top_k, v) if top_k > 0 else v
        kth = np.sort(row)[::-1][k - 1]
        keep = row >= kth
        p = np.where(keep, np.exp(row - row.max()), 0.0)
        p /= p.sum()
        if top_p < 1:
            above = np.array([p[p > x].sum() for x in p])  # mass strictly above each token
            keep &= above < top_p
        out[i] = keep
    return out


@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_top_k_top_p_mask_is_the_sort_based_one(scale):
    """The bisection filters keep exactly what sorting and cutting keeps, ties included."""
    rng = np.random.default_rng(1)
    v = 300
    x = (rng.normal(size=(6, v)) * scale).astype(np.float32)
    x[0, :40] = x[0, 0]  # a tie that straddles the cuts
    x[1, 5] = -np.inf
    top_k = np.array([0, 7, 40, 1, v + 3, 20], np.int32)
    top_p = np.array([0.9, 1.0, 0.5, 0.3, 0.97, 0.01], np.float32)
    got = np.asarray(jax.jit(top_k_top_p_mask)(jnp.asarray(x), top_k, top_p))
    want = np.stack([_mask_oracle(x[i : i + 1], top_k[i], top_p[i])[0] for i in range(6)])
    np.testing.assert_array_equal(got, want)
    assert got.sum(1).min() >= 1


def test_top_k_top_p_mask_of_a_row_does_not_depend_on_the_batch():
    """A row whose cut needs the bisection must not change the others' path, and vice versa."""
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(size=(1, 2000)) * 0.1, rng.normal(size=(1, 2000)) * 8])
    x = x.astype(np.float32)
    top_k, top_p = np.array([0, 100], np.int32), np.array([0.95, 0.9], np.float32)
    mask = jax.jit(top_k_top_p_mask)
    both = np.asarray(mask(jnp.asarray(x), top_k, top_p))
    for i in range(2):
        alone = np.asarray(mask(jnp.asarray(x[i : i + 1]), top_k[i : i + 1], top_p[i : i + 1]))
        np.testing.assert_array_equal(alone[0], both[i])
        np.testing.assert_array_equal(both[i], _mask_oracle(x[i : i + 1], top_k[i], top_p[i])[0])
    assert both[0].sum() > 64 and both[1].sum() <= 64  # one row each way


def _top_p_bisection(probs: np.ndarray, top_p: np.ndarray) -> np.ndarray:
    """The top-p floor by plain bisection over the float bits (31 rounds of the masked sum the
    sampler's search evaluates): what the sampler kept before its probes were aimed."""
    probs, top_p = jnp.asarray(probs), jnp.asarray(top_p)
    bits = jax.lax.bitcast_convert_type(probs, jnp.uint32)

    def halve(_, bounds):  # invariant: mass(probs > hi) < top_p <= mass(probs > lo - 1)
        lo, hi = bounds
        mid = lo + ((hi - lo) >> 1)
        ok = jnp.sum(jnp.where(bits > mid[:, None], probs, 0.0), axis=-1) < top_p
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    s = probs.shape[0]
    start = (jnp.zeros(s, jnp.uint32), jnp.full(s, 0x7F800000, jnp.uint32))
    hi = jax.jit(lambda b: jax.lax.fori_loop(0, 31, halve, b))(start)[1]
    return np.asarray(bits >= hi[:, None])


def _sorted_oracle(row: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """``_mask_oracle`` for one long row in O(V log V): the kept set [V] and, per distinct
    probability, the mass strictly above it (float64)."""
    v = row.shape[-1]
    keep = row >= np.sort(row)[::-1][(min(top_k, v) if top_k > 0 else v) - 1]
    p = np.where(keep, np.exp(row.astype(np.float64) - row.max()), 0.0)
    p /= p.sum()
    values, inverse = np.unique(p, return_inverse=True)  # ascending
    mass = np.bincount(inverse, weights=p)
    above = np.cumsum(mass[::-1])[::-1] - mass
    if top_p < 1:
        keep &= above[inverse] < top_p
    return keep, above


def _random_rows(kind: str, rng: np.random.Generator, s: int, v: int) -> np.ndarray:
    """Logits [s, v] of one shape of distribution."""
    x = rng.normal(size=(s, v))
    if kind == "flat":  # the built-in model's: N(0, 1.6) logits, the cut near the median
        x *= 1.6
    elif kind == "peaked":
        x *= 8
    elif kind == "zipf":
        x = -1.1 * np.log(rng.permuted(np.tile(np.arange(1, v + 1), (s, 1)), axis=1)) + 0.1 * x
    elif kind == "tied":  # few distinct values: ties at every cut
        x = np.round(2 * x)
    elif kind == "bf16":
        x = np.asarray(jnp.asarray(2 * x, jnp.bfloat16).astype(jnp.float32))
    elif kind == "masked":  # -inf logits (zero probabilities) and one huge winner per row
        x[:, : v // 3] = -np.inf
        x[np.arange(s), rng.integers(v // 3, v, s)] = 12.0
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["flat", "peaked", "zipf", "tied", "bf16", "masked"])
def test_top_k_top_p_mask_equals_sort_and_bisection_on_random_rows(kind):
    """On random rows of each shape, with random top-k (around the 64 a partial sort holds, and
    past them) and top-p: the mask is, bit for bit, the bisection's top-p set of the top-k
    set (the ranking by a sort, ties kept), and the float64 sort-based oracle's wherever the
    mass above no token lies within float32 rounding of top_p."""
    rng = np.random.default_rng(["flat", "peaked", "zipf", "tied", "bf16", "masked"].index(kind))
    s, v = 8, 32000
    x = _random_rows(kind, rng, s, v)
    top_k = rng.choice([0, 0, 1, 7, 50, 64, 65, 300, v + 5], s).astype(np.int32)
    top_p = rng.choice([1.0, 0.05, 0.5, 0.9, 0.95, 0.999], s).astype(np.float32)
    got = np.asarray(jax.jit(top_k_top_p_mask)(jnp.asarray(x), top_k, top_p))
    kth = np.sort(x, axis=-1)[:, ::-1][
        np.arange(s), np.where(top_k > 0, np.minimum(top_k, v), v) - 1
    ]
    by_k = x >= kth[:, None]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(np.where(by_k, x, -np.inf)), axis=-1))
    want = by_k & (_top_p_bisection(probs, top_p) | (top_p >= 1)[:, None])
    np.testing.assert_array_equal(got, want)
    for i in range(s):  # the float64 oracle, where float32 rounding cannot decide the cut
        keep, above = _sorted_oracle(x[i], top_k[i], top_p[i])
        if top_p[i] < 1 and np.abs(above - top_p[i]).min() < 1e-5:
            continue
        np.testing.assert_array_equal(got[i], keep)
    assert got.sum(1).min() >= 1


def test_sampled_rows_do_not_depend_on_the_batch_at_full_vocabulary():
    """Rows of every kind, sampled in one batch of 8 and each alone: the same mask and the same
    token (the batch-level branches the batch takes differ from a row's own)."""
    rng = np.random.default_rng(7)
    kinds = ["flat", "peaked", "zipf", "tied", "bf16", "masked", "flat", "peaked"]
    x = np.concatenate([_random_rows(k, rng, 1, 32000) for k in kinds])
    temperature = np.array([1.0, 0.7, 1.0, 1.3, 1.0, 1.0, 0.0, 1.0], np.float32)
    top_k = np.array([0, 0, 50, 0, 300, 0, 0, 20], np.int32)
    top_p = np.array([0.95, 0.9, 0.8, 0.95, 1.0, 0.5, 1.0, 1.0], np.float32)
    seeds = split_seeds(np.arange(8) + 100)
    steps = np.arange(8, dtype=np.int32)
    mask, draw = jax.jit(top_k_top_p_mask), jax.jit(sample)
    scaled = x / np.where(temperature > 0, temperature, 1.0)[:, None]
    both_mask = np.asarray(mask(jnp.asarray(scaled), top_k, top_p))
    both = np.asarray(draw(jnp.asarray(x), temperature, top_k, top_p, seeds, steps))
    for i in range(8):
        one = slice(i, i + 1)
        alone = np.asarray(mask(jnp.asarray(scaled[one]), top_k[one], top_p[one]))[0]
        np.testing.assert_array_equal(alone, both_mask[i])
        args = (temperature[one], top_k[one], top_p[one], seeds[one], steps[one])
        assert int(draw(jnp.asarray(x[one]), *args)[0]) == both[i]
        assert both_mask[i, both[i]] or temperature[i] == 0


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_equals_dense_attention(monkeypatch, window):
    """Each row over its own sequence's keys up to its position, read from the paged cache,
    in one block or several (an online softmax), equals dense attention over those keys."""
    from qllm_jax.models import model as M

    cfg = _tiny_attention_config()
    rng = np.random.default_rng(3)
    ps, num_pages, hkv, hd = 4, 12, cfg.num_kv_heads, cfg.head_dim
    k_cache = jnp.asarray(rng.normal(size=(num_pages * ps, hkv, hd)), jnp.float32)
    v_cache = jnp.asarray(rng.normal(size=(num_pages * ps, hkv, hd)), jnp.float32)
    # rows: a 3-row chunk at positions 7..9 of a sequence on pages (5, 2, 7); a decode row at
    # position 6 of another on pages (3, 9); a padding row
    pages = np.array([[5, 2, 7, 0]] * 3 + [[3, 9, 0, 0], [0, 0, 0, 0]], np.int32)
    positions = np.array([7, 8, 9, 6, 0], np.int32)
    valid = np.array([1, 1, 1, 1, 0], bool)
    q = jnp.asarray(rng.normal(size=(5, cfg.num_heads, hd)), jnp.float32)
    args = (q, k_cache, v_cache, jnp.asarray(pages), positions, valid, window, cfg, ps)
    whole = np.asarray(M.paged_attention(*args))
    monkeypatch.setattr(M, "ATTENTION_BLOCK_PAGES", 1)
    blocked = np.asarray(M.paged_attention(*args))
    np.testing.assert_allclose(blocked[:4], whole[:4], rtol=1e-5, atol=1e-5)
    for r in range(4):  # dense reference over the row's keys 0 .. its position
        slots = (pages[r][:, None] * ps + np.arange(ps)).reshape(-1)[: positions[r] + 1]
        k_pos = np.arange(positions[r] + 1)
        mask = np.ones(len(k_pos), bool)
        if window is not None:
            mask &= positions[r] - k_pos < window
        ref = M.attend(q[r : r + 1], k_cache[slots], v_cache[slots], jnp.asarray(mask[None]), cfg)
        np.testing.assert_allclose(whole[r], np.asarray(ref)[0], rtol=1e-5, atol=1e-5)
    assert np.isfinite(whole).all()


def test_paged_attention_of_a_row_does_not_depend_on_its_pass():
    """Bitwise: a row's output is the same whatever else its pass holds, however many rows and
    pages the pass is bucketed to, wherever the row sits in it (in which tile of rows, beside a
    row that reaches further blocks or not), and however its prompt was cut into chunks. What
    makes a resumed or preempted request's tokens identical. (Any number of rows: attention
    runs in tiles of ``ATTENTION_ROW_TILE`` rows; from 64 rows on, XLA:CPU multiplies plain
    matrices in another order, as every matmul does.)"""
    import functools

    from qllm_jax.models import model as M

    cfg = _tiny_attention_config()
    rng = np.random.default_rng(4)
    ps, hkv, hd = 4, cfg.num_kv_heads, cfg.head_dim
    k_cache = jnp.asarray(rng.normal(size=(80 * ps, hkv, hd)), jnp.float32)
    v_cache = jnp.asarray(rng.normal(size=(80 * ps, hkv, hd)), jnp.float32)
    q_seq = rng.normal(size=(12, cfg.num_heads, hd)).astype(np.float32)
    own = np.array([3, 8, 5], np.int32)  # the sequence's pages: positions 0..11
    attend = jax.jit(functools.partial(M.paged_attention, window=None, cfg=cfg, page_size=ps))

    def out(rows: int, num_pages: int, offset: int, start: int, far: int | None = None):
        """The sequence's rows start..11 at ``offset`` of a pass of ``rows`` rows whose page
        bucket is ``num_pages``; the other rows are another sequence's decode rows, and row
        ``far`` one at position 4 * num_pages - 1 (on pages 40.. of its own)."""
        q = rng.normal(size=(rows, cfg.num_heads, hd)).astype(np.float32)
        pages = np.zeros((rows, num_pages), np.int32)
        pages[:, 0] = 20  # the other rows: one page of another sequence
        positions = np.full(rows, 2, np.int32)
        valid = np.ones(rows, bool)
        if far is not None:
            pages[far] = 40 + np.arange(num_pages) % 40
            positions[far] = ps * num_pages - 1
        mine = slice(offset, offset + 12 - start)
        q[mine], pages[mine, :3], positions[mine] = q_seq[start:], own, np.arange(start, 12)
        return np.asarray(attend(jnp.asarray(q), k_cache, v_cache, pages, positions, valid))[mine][
            -1
        ]

    base = out(16, 4, 0, 0)
    for case in [
        (16, 4, 3, 0), (16, 8, 1, 4), (32, 16, 8, 11), (16, 32, 2, 6), (32, 64, 5, 9), (8, 4, 0, 6),
        (32, 16, 8, 0, 30), (64, 16, 40, 3, 33), (64, 32, 40, 3, 60), (128, 16, 100, 0, 1),
        (256, 64, 180, 7, 185),
    ]:  # fmt: skip
        np.testing.assert_array_equal(out(*case), base, err_msg=str(case))


def test_a_rows_logits_and_kv_do_not_depend_on_its_pass():
    """Bitwise, through the whole model (the fused step: every model function the segments
    run): 32 decode rows of 32 sequences give the same logits and write the same K/V in every
    layer in one pass of 32 rows, two of 16 or four of 8. XLA:CPU reduces arrays of under and
    over 4096 elements in different orders; RMSNorm's mean (hidden size 128) and, with pages
    of 8, the attention softmax's sum (2 KV heads x 2 groups x 32 keys a row) cross that size
    at 32 rows. Either, as a reduce, made a row's tokens depend on its pass
    (``models.model.row_sum``)."""
    import dataclasses

    if jax.default_backend() != "cpu":
        pytest.skip("row_sum's fixed order is XLA:CPU's (a reduce elsewhere)")

    from qllm_jax.models.random_init import MODEL_PRESETS, random_model
    from qllm_jax.segments import SampleInputs, fused_step, head_params

    cfg = dataclasses.replace(MODEL_PRESETS["mixtral-tiny"], hidden_size=128)
    model = random_model(cfg, dtype="float32", seed=3)
    rng = np.random.default_rng(5)
    n, ps, pb = 32, 8, 4  # rows (one per sequence), page size, pages per row
    slots = (1 + n * pb) * ps
    kv_shape = (slots, cfg.num_kv_heads, cfg.head_dim)
    k0 = [rng.normal(size=kv_shape).astype(np.float32) for _ in range(cfg.num_layers)]
    v0 = [rng.normal(size=kv_shape).astype(np.float32) for _ in range(cfg.num_layers)]
    tokens = rng.integers(0, cfg.vocab_size, n).astype(np.int32)
    positions = rng.integers(0, pb * ps, n).astype(np.int32)
    pages = (1 + np.arange(n * pb, dtype=np.int32)).reshape(n, pb)  # each row its own pages
    write_slot = pages[np.arange(n), positions // ps] * ps + positions % ps
    head = head_params(model.params)

    def run(rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Logits [n, V] and the written K, V [layers, n, Hkv, hd], in passes of ``rows``."""
        lg, ks, vs = [], [], []
        for r in range(0, n, rows):
            mine = slice(r, r + rows)
            meta = dict(
                positions=positions[mine],
                valid=np.ones(rows, bool),
                write_slot=write_slot[mine],
                pages=pages[mine],
            )
            s = SampleInputs(
                np.arange(rows, dtype=np.int32),
                np.zeros(rows, np.float32),
                np.zeros(rows, np.int32),
                np.ones(rows, np.float32),
                np.zeros((rows, 2), np.uint32),
                np.zeros(rows, np.int32),
            )
            out, k, v, _ = fused_step(
                model.params,
                head,
                tuple(jnp.asarray(x) for x in k0),  # fresh copies: the step donates them
                tuple(jnp.asarray(x) for x in v0),
                tokens[mine],
                meta,
                s,
                jnp.zeros((cfg.num_layers, cfg.num_experts), jnp.int32),  # routed-token counts
                None,  # no expert slots
                cfg=cfg,
                page_size=ps,
                dtype=jnp.float32,
                want_logits=True,
            )
            lg.append(np.asarray(out))
            ks.append(np.stack([np.asarray(x)[write_slot[mine]] for x in k]))
            vs.append(np.stack([np.asarray(x)[write_slot[mine]] for x in v]))
        return np.concatenate(lg), np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)

    base = run(8)
    assert np.isfinite(base[0]).all() and np.abs(base[1]).max() > 0
    for rows in (16, 32):
        for got, want in zip(run(rows), base, strict=True):
            np.testing.assert_array_equal(got, want)


def _tiny_attention_config():
    from qllm_jax.models.config import ModelConfig

    return ModelConfig(
        model_type="mixtral",
        vocab_size=32,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        num_experts=2,
        top_k=1,
        expert_intermediate_size=8,
        norm_eps=1e-5,
        rope_theta=1e4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_ids=(2,),
    )
