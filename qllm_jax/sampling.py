"""The on-device sampler (``SamplingParams`` itself is plain Python, in the scheduler).

Every sampling parameter is a per-row array, not a static jit argument, so a batch mixing greedy and
sampled requests compiles once. Randomness is a pure function of ``(seed, output index)``, so
a seeded request yields the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

Array = jax.Array


def _ordered_keys(x: Array) -> Array:
    """float32 [S, V] → uint32 keys in the same order (-inf lowest), for an exact search."""
    i = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _key_values(k: Array) -> Array:
    """The inverse of ``_ordered_keys``: uint32 keys → the float32 values they order."""
    i = jnp.where(k >> 31 == 1, k & jnp.uint32(0x7FFFFFFF), ~k)
    return jax.lax.bitcast_convert_type(i, jnp.float32)


BRACKET_ROUNDS = 3  # first rounds: two probes bracketing a modelled estimate of the cut
SECANT_ROUNDS = 16  # rounds that may probe by the secant; then halving the keys (<= 33)
BRACKET_SPREAD = 0.05  # the first bracket: the estimate +- this many standard deviations


def _threshold(values: Array, target: Array, active: Array, mass: bool) -> Array:
    """Per row, the least of its values t with weight(values > t) < target, exactly: the
    weight of a value is the value (``mass``: probabilities, ``target`` = top_p, and t is the
    least probability the top-p filter keeps) or 1 (t is the target-th largest value).
    values [S, V] f32 (>= 0 if ``mass``), target [S] f32 (> 0), active [S] bool → [S] f32;
    -inf where not ``active`` or where every value is kept.

    A search over the window [lo, hi] of uint32 keys (``_ordered_keys``) that holds t: each
    probe m costs one masked sum over the row, W(m) = weight(keys > m), and moves hi to m
    (W(m) < target) or lo above it. Bisecting the 2**32 keys takes 32 such sums; probing where
    the cut likely is took 12-20 reductions on the rows tried (Gaussian, Zipf, tied and bf16
    logits; the top-p cut of the built-in model's near-flat rows lies near their median).
    First (``BRACKET_ROUNDS``, unrolled) two probes a round around an estimate: from the
    row's weighted mean and deviation of the values (log-probabilities for ``mass``), as if
    Gaussian, then by the secant of the Gaussian quantile of W through the window's ends.
    Then (``SECANT_ROUNDS``) one probe a round at the secant of W in the window, and one more
    reduction moves the end that moved onto the nearest value, so the window's ends are values
    and it ends at lo == hi, ties included (Illinois' halving made no round fewer there).
    Then, in case a strange row is left, plain halving of the keys (snapped the same way),
    which ends within 33 rounds. Any probe inside the window keeps the answer exact; the
    estimates only decide how soon it ends. W is the same masked sum, in the same order,
    whichever probe or round evaluates it, so t depends on the row alone, not on the path the
    batch took, and equals what 31 rounds of bisection of the same sum find.
    """
    s, v = values.shape
    keys = _ordered_keys(values)
    to_y, from_y = (jnp.log, jnp.exp) if mass else ((lambda x: x), (lambda y: y))
    weights = values if mass else jnp.ones_like(values)
    total = jnp.ones(s, jnp.float32) if mass else jnp.full(s, float(v), jnp.float32)
    y = to_y(values)
    y = jnp.where((weights > 0) & jnp.isfinite(y), y, 0.0)
    mean = jnp.sum(weights * y, -1) / total  # the model only aims probes: rounding is harmless
    sigma = jnp.sqrt(jnp.maximum(jnp.sum(weights * y * y, -1) / total - mean * mean, 1e-12))
    quantile = lambda w: ndtri(jnp.clip(w / total, 1e-30, 1 - 1e-7))  # noqa: E731
    q_t = quantile(target)

    def weight_above(m: Array) -> Array:  # [S] → [S]: one pass over the row
        return jnp.sum(jnp.where(keys > m[:, None], weights, 0.0), -1)

    def settle(bounds, m, w):  # the window after probe m, W(m) = w (ends not snapped)
        lo, hi, w_lo, w_hi = bounds
        down = w < target
        return (
            jnp.where(down, lo, m + 1), jnp.where(down, m, hi),
            jnp.where(down, w_lo, w), jnp.where(down, w, w_hi),
        )  # fmt: skip

    def step(state, first: bool):
        r, lo, hi, w_lo, w_hi = state  # w_lo = weight(keys >= lo), w_hi = W(hi)
        live = lo < hi
        v_lo, v_hi = _key_values(lo), _key_values(hi)
        y_lo, y_hi = to_y(v_lo), to_y(v_hi)
        lo_known = jnp.isfinite(y_lo) & (w_lo < total)  # an end a probe has set
        hi_known = jnp.isfinite(y_hi) & (w_hi > 0)
        both = lo_known & hi_known
        per_value = jnp.where(v_lo > 0, v_lo, 1e-30) if mass else 1.0
        likely = (w_lo - w_hi) / per_value  # values the window likely holds
        mid = lo + ((hi - lo) >> 1)
        inside = lambda m: (m >= lo) & (m < hi)  # noqa: E731

        def bracket():
            q_lo, q_hi = quantile(w_lo), quantile(w_hi)
            slope = jnp.where(both, (q_lo - q_hi) / (y_hi - y_lo), 1.0 / sigma)
            y_e = jnp.where(
                lo_known, y_lo + (q_lo - q_t) / slope,
                jnp.where(hi_known, y_hi - (q_t - q_hi) / slope, mean - q_t * sigma),
            )  # fmt: skip
            spread = jnp.where(
                both,
                (y_hi - y_lo) * jnp.minimum(2 / jnp.sqrt(jnp.maximum(likely, 1.0)), 0.25),
                BRACKET_SPREAD * sigma,
            )
            m1 = _ordered_keys(from_y(y_e - spread))
            m1 = jnp.where(inside(m1), m1, mid)
            m2 = _ordered_keys(from_y(y_e + spread))
            once = settle((lo, hi, w_lo, w_hi), m1, weight_above(m1))
            twice = settle(once, m2, weight_above(m2))
            ok = (m2 >= once[0]) & (m2 < once[1])  # m2 still inside the narrowed window
            return tuple(jnp.where(ok, b, a) for a, b in zip(once, twice, strict=True))

        def secant():
            f = (w_lo - target) / (w_lo - w_hi)  # where W, linear in the window, hits target
            m = _ordered_keys(v_lo + f * (v_hi - v_lo))
            m = jnp.where(both & (r < BRACKET_ROUNDS + SECANT_ROUNDS) & inside(m), m, mid)
            w = weight_above(m)
            down = w < target
            # the nearest value at or below m (down) or above it (up), in one reduction
            near = jnp.where(
                down[:, None],
                jnp.where(keys <= m[:, None], values, -jnp.inf),
                jnp.where(keys > m[:, None], -values, -jnp.inf),
            ).max(-1)
            edge = _ordered_keys(jnp.where(down, near, -near))
            edge = jnp.where(down & (near == -jnp.inf), lo, edge)  # nothing below: keep all
            return (
                jnp.where(down, lo, edge), jnp.where(down, edge, hi),
                jnp.where(down, w_lo, w), jnp.where(down, w, w_hi),
            )  # fmt: skip

        new = bracket() if first else secant()
        return (r + 1, *(jnp.where(live, a, b) for a, b in zip(new, state[1:], strict=True)))

    lo = jnp.zeros(s, jnp.uint32)
    hi = jnp.where(active, jnp.uint32(0xFFFFFFFF), jnp.uint32(0))
    state = (jnp.int32(0), lo, hi, total, jnp.zeros(s, jnp.float32))
    for _ in range(BRACKET_ROUNDS):  # unrolled: XLA fuses the per-row arithmetic between sums
        state = step(state, first=True)
    rounds = BRACKET_ROUNDS + SECANT_ROUNDS + 34  # never reached: the halving ends before
    going = lambda st: (st[0] < rounds) & jnp.any(st[1] < st[2])  # noqa: E731
    lo = jax.lax.while_loop(going, functools.partial(step, first=False), state)[1]
    return jnp.where(lo == 0, -jnp.inf, _key_values(lo))


FEW = 64  # top-k up to this many, and top-p within the top this many, take a partial sort


def top_k_top_p_mask(scaled: Array, top_k: Array, top_p: Array) -> Array:
    """True where a token survives top-k and then top-p filtering (top-p over the top-k
    renormalised distribution, as vLLM applies them). scaled [S, V] f32, top_k [S] int32
    (<= 0: off), top_p [S] f32 (1: off) → [S, V] bool; ties at a cut are kept.

    No full sort (``_top_k_keep``, ``_top_p_keep``). Which way a row goes depends on that row
    alone, so a row's tokens never depend on what else is in the batch.
    """
    keep, top_idx = _top_k_keep(scaled, top_k)
    probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
    return _top_p_keep(probs, top_p, keep, top_idx)


def _top_k_keep(scaled: Array, top_k: Array) -> tuple[Array, Array]:
    """The top-k survivors [S, V] bool (ties at the cut kept), and the indices [S, FEW] of each
    row's ``FEW`` largest values, descending, where the partial sort ran (all -1 where no row
    has a top-k, and it did not).

    A cut within the ``FEW`` largest values comes from one partial sort (``lax.top_k``); a
    deeper one from an exact search over all V values (``_threshold``), run only when some row
    needs it.
    """
    s, v = scaled.shape
    few = min(FEW, v)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)  # [S]

    def by_top_k() -> tuple[Array, Array]:
        top, idx = jax.lax.top_k(scaled, few)  # [S, few] descending
        kth_few = jnp.take_along_axis(top, jnp.minimum(k, few)[:, None] - 1, axis=-1)[:, 0]
        kth = jax.lax.cond(
            jnp.any(k > few),
            lambda: jnp.where(
                k > few, _threshold(scaled, k.astype(jnp.float32), k > few, False), kth_few
            ),
            lambda: kth_few,
        )
        return scaled >= kth[:, None], idx.astype(jnp.int32)

    def off() -> tuple[Array, Array]:
        return jnp.ones((s, v), bool), jnp.full((s, few), -1, jnp.int32)

    return jax.lax.cond(jnp.any(top_k > 0), by_top_k, off)


def _top_p_keep(probs: Array, top_p: Array, keep: Array, top_idx: Array) -> Array:
    """``keep`` [S, V] narrowed to each row's top-p set of ``probs`` [S, V] (the top-k
    renormalised distribution, zero off ``keep``); ties at the cut kept. ``top_idx``: as
    ``_top_k_keep`` returns it.

    A row whose cut lies within its ``FEW`` largest probabilities takes it from those; any
    other row from an exact search over all V values (``_threshold``), run only when some
    row needs it. The ``FEW`` largest are needed only where the largest probability times
    ``FEW`` reaches ``top_p`` (else they cannot hold the cut: every row of a flat
    distribution), and then come from the top-k pass's partial sort where it ran (``probs``
    is a monotone function of the values it ranked on the tokens it kept, zero on the rest,
    which rank below), else from a partial sort of ``probs``: the same values either way, so
    a row takes the same path, with the same numbers, whatever shares its batch.
    """
    s, v = probs.shape
    few = min(FEW, v)
    on = top_p < 1

    def few_largest() -> Array:  # [S, few] descending
        return jax.lax.cond(
            top_idx[0, 0] >= 0,
            lambda: jnp.take_along_axis(probs, top_idx, axis=-1),
            lambda: jax.lax.top_k(probs, few)[0],
        )

    def by_top_p() -> Array:
        # the largest ``few`` sum to at most few * max (1 + 1e-4 covers their rounding)
        may = on & (jnp.max(probs, axis=-1) * (few * (1 + 1e-4)) >= top_p)  # [S]
        top = jax.lax.cond(jnp.any(may), few_largest, lambda: jnp.zeros((s, few), probs.dtype))
        above = jnp.sum(jnp.where(top[:, None, :] > top[:, :, None], top[:, None, :], 0), -1)
        inside = may & (jnp.sum(jnp.where(above < top_p[:, None], top, 0), -1) >= top_p)
        last = jnp.sum(above < top_p[:, None], axis=-1) - 1
        floor_few = jnp.take_along_axis(top, jnp.maximum(last, 0)[:, None], axis=-1)[:, 0]
        floor = jax.lax.cond(
            jnp.any(~inside & on),
            lambda: jnp.where(inside, floor_few, _threshold(probs, top_p, ~inside & on, True)),
            lambda: floor_few,
        )
        kept = probs >= floor[:, None]
        return keep & (kept | ~on[:, None])

    return jax.lax.cond(jnp.any(on), by_top_p, lambda: keep)


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


TOP_P_DRAWS = 4  # draws per row tried against the top-p set before the exact search


def _uniforms(seeds: Array, steps: Array, n: int) -> Array:
    """[S, n] uniforms in [0, 1), keyed by (seed, step) and the draw's index: draw 0 is the
    one a row without top-p uses, so its tokens do not depend on ``TOP_P_DRAWS``."""

    def row(seed: Array, step: Array) -> Array:
        key = _row_key(seed, step)
        later = [jax.random.uniform(jax.random.fold_in(key, i)) for i in range(1, n)]
        return jnp.stack([jax.random.uniform(key), *later])

    return jax.vmap(row)(seeds, steps)


def _draw_in_top_p(probs: Array, top_p: Array, u: Array) -> tuple[Array, Array]:
    """Rejection sampling from the top-p set: draw from ``probs`` (the top-k renormalised
    distribution), keep the first draw the top-p filter keeps. probs [S, V], top_p [S],
    u [S, n] → (token [S] int32, found [S] bool); rows without top-p take draw 0.

    A token x survives top-p exactly when the probabilities above its own sum below top_p
    (``_threshold``'s cut t is the least value with that property, so probs[x] >= t), so
    one masked sum per draw decides it, against about 18 for the search of the cut. A draw
    is kept with probability the mass of the top-p set (>= top_p), and an accepted draw is
    distributed as the renormalised top-p distribution, so rejection is exact; rows left
    without a kept draw (probability <= (1 - top_p) ** n) take ``_top_p_keep``'s exact
    search with a fresh uniform, which keeps the mixture exact too. Draws stop as soon as
    every row has one: at top_p 0.95 a batch of 8 takes one draw in about 2 steps of 3.
    """
    s, n = u.shape
    on = top_p < 1
    rows = jnp.arange(s)

    def attempt(state):
        i, token, found = state
        x = _invert_cdf(probs, u[:, i])
        px = probs[rows, x]
        above = jnp.sum(jnp.where(probs > px[:, None], probs, 0.0), -1)  # as _threshold sums
        ok = ~found & (~on | (above < top_p))
        return i + 1, jnp.where(ok, x, token), found | ok

    def by_rejection() -> tuple[Array, Array]:
        start = (jnp.int32(0), jnp.zeros(s, jnp.int32), jnp.zeros(s, bool))
        more = lambda st: (st[0] < n) & ~jnp.all(st[2])  # noqa: E731
        return jax.lax.while_loop(more, attempt, start)[1:]

    def plain() -> tuple[Array, Array]:  # no row has top-p: draw 0 for all
        return _invert_cdf(probs, u[:, 0]), jnp.ones(s, bool)

    return jax.lax.cond(jnp.any(on), by_rejection, plain)


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

    A sampled row draws uniform numbers keyed by (seed, step) and inverts the CDF of its
    top-k distribution: one random draw per row instead of V Gumbel draws. Top-k needs no
    sort (``_top_k_keep``); top-p rejects draws outside its set (``_draw_in_top_p``) and
    searches for its cut (``_top_p_keep``) only for a row that rejected every draw. Each
    of these, all sampling work, and the argmax, is skipped when no row asks for it.
    """

    def greedy() -> Array:
        return argmax(logits)

    def sampled() -> Array:
        t = jnp.where(temperature > 0, temperature, 1.0)
        scaled = logits / t[:, None]
        keep, top_idx = _top_k_keep(scaled, top_k)
        probs = jax.nn.softmax(jnp.where(keep, scaled, -jnp.inf), axis=-1)
        u = _uniforms(seeds, steps, TOP_P_DRAWS + 1)  # the last: the exact search's draw
        token, found = _draw_in_top_p(probs, top_p, u[:, :-1])

        def searched() -> Array:  # rows that rejected every draw: the exact top-p set
            kept = _top_p_keep(probs, top_p, keep, top_idx)
            exact = _invert_cdf(jnp.where(kept, probs, 0.0), u[:, -1])  # unnormalised: it scales u
            return jnp.where(found, token, exact)

        token = jax.lax.cond(jnp.all(found), lambda: token, searched)
        none = lambda: jnp.zeros_like(token)  # noqa: E731 (no greedy row: no argmax)
        return jnp.where(
            temperature > 0, token, jax.lax.cond(jnp.any(temperature <= 0), greedy, none)
        )

    return jax.lax.cond(jnp.any(temperature > 0), sampled, greedy)
