"""Pure model functions over the params pytree, cut the way the runtime chains them.

A forward pass is ``embed`` → per layer ``qkv`` / ``attend`` / ``attention_output`` (which also
routes) → per expert group ``expert_group`` (plus ``shared_expert``) → ``logits``. The runtime
jits each piece as its own segment over a paged KV cache; ``reference_forward`` chains the same
pieces over one contiguous sequence with no cache, as the oracle the runtime is checked against.

Numerics follow HF transformers for the same dtype: norms, softmax and router probabilities in
float32, matmuls in the parameter dtype.

Shapes: N rows (tokens of a pass), M keys, D hidden, Hq/Hkv heads, hd head dim, E experts,
k experts per token, F expert FFN width, G experts in a group, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .params import (
    AttentionParams,
    ExpertParams,
    NormParams,
    Params,
    QuantizedWeight,
    SharedExpertParams,
    SlotMap,
    Weight,
)

Array = jax.Array


# ----------------------------------------------------------------------------------------------
# Norms and RoPE


def norm(x: Array, p: NormParams, cfg: ModelConfig) -> Array:
    """RMSNorm (most families) or LayerNorm with bias (PhiMoE) over the last axis, in f32.

    The means are ``row_mean``'s, not ``jnp.mean``'s: a row's norm must not depend on how many
    rows its pass holds (see ``row_sum``)."""
    xf = x.astype(jnp.float32)
    if cfg.norm == "layer":
        mean = row_mean(xf)
        var = row_mean(jnp.square(xf - mean))
        y = (xf - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        y = y * p.weight.astype(jnp.float32) + p.bias.astype(jnp.float32)
        return y.astype(x.dtype)
    y = xf * jax.lax.rsqrt(row_mean(jnp.square(xf)) + cfg.norm_eps)
    return p.weight * y.astype(x.dtype)


def row_mean(x: Array) -> Array:
    """Mean over the last axis, kept (size 1), in ``row_sum``'s order. x [..., D] → [..., 1]."""
    return row_sum(x)[..., None] / jnp.asarray(x.shape[-1], x.dtype)


def row_sum(x: Array) -> Array:
    """Sum over the last axis in a fixed pairwise order: x [..., D] → [...].

    Elementwise adds of the two halves, then of their halves, ...: the order is fixed by D
    alone, so a row's sum never depends on the other rows. A ``reduce`` does: XLA:CPU sums an
    array of fewer than 4096 elements in windows of 32, a larger one with YNNPACK, in another
    order. With ``jnp.mean`` a row's RMSNorm (hence its K/V, logits and tokens) changed in the
    last bit between a pass of 8 rows and one of 16 (hidden size 256), and so did the softmax
    sum of paged attention with small pages. On accelerators it stays a reduce: only XLA:CPU's
    switch is known, and there a pairwise sum may well cost a thread per row (unmeasured; the
    CPU cost is in ``experiments/row_sum_order.py``).
    """
    if jax.default_backend() != "cpu":
        return x.sum(-1)
    while x.shape[-1] > 1:
        w = x.shape[-1]
        half = x[..., : w // 2] + x[..., w // 2 : w // 2 * 2]
        x = half if w % 2 == 0 else jnp.concatenate([half, x[..., w - 1 :]], axis=-1)
    return x[..., 0]


@functools.lru_cache(maxsize=32)
def _inv_freq(head_dim: int, theta: float) -> np.ndarray:
    # Computed in float32 exactly as HF does, so cos/sin agree bit for bit in the inputs.
    return (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(
        np.float32
    )


def rope(x: Array, positions: Array, cfg: ModelConfig) -> Array:
    """Rotary embedding (rotate-half convention) at each row's own position.

    x [N, H, hd], positions [N] int32 → [N, H, hd]
    """
    inv_freq = jnp.asarray(_inv_freq(cfg.head_dim, cfg.rope_theta))  # [hd/2]
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [N, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [N, hd]
    cos = jnp.cos(emb).astype(x.dtype)[:, None, :]
    sin = jnp.sin(emb).astype(x.dtype)[:, None, :]
    half = cfg.head_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# Embedding, attention, routing


def embed(embedding: Array, token_ids: Array) -> Array:
    """embedding [V, D], token_ids [N] → residual stream [N, D]."""
    return embedding[token_ids]


def matmul(x: Array, w: Weight) -> Array:
    """x [N, in] @ w [in, out] → [N, out] in x's dtype, for a float or an int8 weight.

    An int8 weight is widened to x's dtype (exact: |q| <= 127) and its per-channel scales are
    applied to the [N, out] result, not to the weight. XLA:CPU does not fuse the widening into
    its dot: it writes the widened weight out first, then multiplies (measured in
    experiments/int8_bench.py), so on a CPU int8 saves memory, not time. XLA:GPU can fuse such
    a convert into the matmul's operand load (not measured here: no GPU in this session).
    """
    if isinstance(w, QuantizedWeight):
        return ((x @ _widen(w.q, x)) * w.scale).astype(x.dtype)
    return x @ w


def _widen(q: Array, x: Array) -> Array:
    """q as x's dtype. On a CPU, made to depend on x (plus an exact zero computed from it):
    XLA:CPU's scheduler otherwise widens every weight of an executable before its first
    matmul, all widened copies live at once (50 MB for the built-in model's fused step, past
    glibc's 32 MB mmap threshold, so mapped and page-faulted afresh on every call: fused int8
    steps were 7x slower than float; see int8_bench.py's schedule_probe). Tied to x, each is
    widened just before its matmul (1 MB live)."""
    w = q.astype(x.dtype)
    if jax.default_backend() != "cpu":
        return w
    x0 = x.reshape(-1)[0]
    return w + jnp.where(jnp.isfinite(x0), x0, 0) * 0  # +0 or -0: w exactly


def _linear(x: Array, w: Weight, b: Array | None) -> Array:
    y = matmul(x, w)
    return y if b is None else y + b


def qkv(p: AttentionParams, cfg: ModelConfig, x: Array, positions: Array, full_norm=norm):
    """Input norm, projections, q/k norm, clipping and RoPE.

    x [N, D], positions [N] → q [N, Hq, hd], k [N, Hkv, hd], v [N, Hkv, hd]. ``full_norm`` is
    the norm OLMoE applies over all heads at once; a tensor-parallel caller, whose ``cfg``
    counts only its own heads, passes one that gathers the other heads first.
    """
    n = x.shape[0]
    h = norm(x, p.input_norm, cfg)
    q = _linear(h, p.wq, p.bq)  # [N, Hq*hd]
    k = _linear(h, p.wk, p.bk)  # [N, Hkv*hd]
    v = _linear(h, p.wv, p.bv)  # [N, Hkv*hd]
    if cfg.qk_norm == "full":  # OLMoE: one norm over all heads, before the head split
        q, k = full_norm(q, p.q_norm, cfg), full_norm(k, p.k_norm, cfg)
    if cfg.clip_qkv is not None:
        c = cfg.clip_qkv
        q, k, v = jnp.clip(q, -c, c), jnp.clip(k, -c, c), jnp.clip(v, -c, c)
    q = q.reshape(n, cfg.num_heads, cfg.head_dim)
    k = k.reshape(n, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(n, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "head":  # Qwen3-MoE: per-head norm over hd
        q, k = norm(q, p.q_norm, cfg), norm(k, p.k_norm, cfg)
    return rope(q, positions, cfg), rope(k, positions, cfg), v


def attention_mask(
    q_pos: Array,
    q_seq: Array,
    k_pos: Array,
    k_seq: Array,
    k_valid: Array,
    window: int | None,
) -> Array:
    """Which keys each query row may see: its own sequence, causal, optional sliding window.

    q_pos/q_seq [N], k_pos/k_seq/k_valid [M] → [N, M] bool
    """
    same = q_seq[:, None] == k_seq[None, :]
    causal = k_pos[None, :] <= q_pos[:, None]
    mask = same & causal & k_valid[None, :]
    if window is not None:
        mask &= (q_pos[:, None] - k_pos[None, :]) < window
    return mask


def attend(q: Array, k: Array, v: Array, mask: Array, cfg: ModelConfig) -> Array:
    """Grouped-query attention with a float32 softmax, as HF's eager attention computes it.

    q [N, Hq, hd], k/v [M, Hkv, hd], mask [N, M] → [N, Hq*hd]. A row whose mask is all false
    (a padding row) gets a harmless uniform average instead of NaN.
    """
    n, m = q.shape[0], k.shape[0]
    groups = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(n, cfg.num_kv_heads, groups, cfg.head_dim)  # [N, Hkv, G, hd]
    scores = jnp.einsum("nhgd,mhd->hgnm", qg, k) * jnp.asarray(cfg.head_dim**-0.5, q.dtype)
    scores = jnp.where(mask[None, None], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [Hkv, G, N, M]
    out = jnp.einsum("hgnm,mhd->nhgd", probs, v)  # [N, Hkv, G, hd]
    del m
    return out.reshape(n, cfg.q_size)


# Pages per block of the paged attention's online softmax. Fixed, not sized to the pass, so a
# row's arithmetic never depends on how many rows or pages its pass holds: XLA reduces a longer
# block of masked keys in another order. The runtime's smallest page bucket, so every bucket is
# a whole number of blocks.
ATTENTION_BLOCK_PAGES = 4
# Rows per tile of the paged attention on XLA:CPU: each tile of a pass runs only the blocks its
# furthest row reaches, so a prefill chunk at positions 0..121 in a pass bucketed to 512 keys
# (for one long decode row) reads 128 keys a row, not 512. Fixed, like the block, so a row's
# arithmetic does not depend on its pass (a pass of fewer rows is one tile).
ATTENTION_ROW_TILE = 32


def paged_attention(
    q: Array,
    k_cache: Array,
    v_cache: Array,
    pages: Array,
    positions: Array,
    valid: Array,
    window: int | None,
    cfg: ModelConfig,
    page_size: int,
) -> Array:
    """Each row attends over its own sequence's keys at positions 0 .. its own, all read from
    the paged cache (the pass writes its rows' K/V there first).

    q [N, Hq, hd]; k_cache/v_cache [slots, Hkv, hd]; pages [N, P] int32: the pages of each
    row's sequence up to its position (page j holds positions j*ps .. (j+1)*ps; 0: scratch
    padding); positions, valid [N]. → [N, Hq*hd].

    Batch invariant: a key sits at its position in fixed blocks of ``ATTENTION_BLOCK_PAGES``
    pages, folded into an online softmax in order, and a block past a row's position leaves
    its state exactly as it was. So a row's result depends on its sequence's keys and its
    position alone, not on the other rows of its pass, the row and page buckets, or how its
    prompt was cut into chunks: a request gets the same tokens however it is scheduled
    (preempted, resumed from a checkpoint, batched with anyone). Work and memory are rows x
    P*ps per layer, never rows x all keys of the pass. On XLA:CPU rows go in tiles of
    ``ATTENTION_ROW_TILE`` that stop after the last block their furthest row reaches (the
    blocks skipped would have left every row's state as it was: the same bits, less work).
    Elsewhere one tile runs every block: a loop of data-dependent length reads its condition
    back to the host each iteration on XLA:GPU (a ragged Pallas kernel is the way there; not
    built).
    """
    n, p = pages.shape
    block = min(p, ATTENTION_BLOCK_PAGES)
    while p % block:
        block -= 1  # P is a power of two in practice, so this ends on one
    cpu = jax.default_backend() == "cpu"
    tile = attention_row_tile(n) if cpu else n
    tiles = n // tile
    shape = (tiles, tile, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim)
    qg = q.reshape(shape)  # [tiles, T, Hkv, G, hd]
    if not cpu:  # one tile, every block: a loop of static trip count
        out = _attend_blocks(
            qg[0], k_cache, v_cache, pages, positions, valid, p // block, block, window, page_size
        )
        return out.reshape(n, cfg.q_size)
    # the blocks each tile's furthest row reaches (padding rows sit at position 0)
    reach = (positions // (block * page_size) + 1).reshape(tiles, tile).max(axis=1)

    def one_tile(xs) -> Array:
        qt, pg, pos, ok, blocks = xs
        return _attend_blocks(qt, k_cache, v_cache, pg, pos, ok, blocks, block, window, page_size)

    split = lambda a: a.reshape(tiles, tile, *a.shape[1:])  # noqa: E731
    out = jax.lax.map(one_tile, (qg, split(pages), split(positions), split(valid), reach))
    return out.reshape(n, cfg.q_size)


def attention_row_tile(rows: int) -> int:
    """Rows per tile of ``paged_attention`` on XLA:CPU for a pass of ``rows`` rows: the fixed
    tile, or the whole pass when it is not a whole number of tiles (fewer rows, or an odd
    caller's N)."""
    return ATTENTION_ROW_TILE if rows % ATTENTION_ROW_TILE == 0 else rows


def _attend_blocks(
    qg: Array,
    k_cache: Array,
    v_cache: Array,
    pages: Array,
    positions: Array,
    valid: Array,
    num_blocks: Array | int,
    block: int,
    window: int | None,
    page_size: int,
) -> Array:
    """One tile of ``paged_attention``: qg [T, Hkv, G, hd], pages [T, P], positions/valid [T],
    over its first ``num_blocks`` blocks of ``block`` pages (an int, or traced: a loop of
    data-dependent length) → [T, Hkv, G, hd] in q's dtype."""
    t, hkv, groups, hd = qg.shape
    scale = jnp.asarray(hd**-0.5, qg.dtype)
    masked = jnp.finfo(jnp.float32).min
    offsets = jnp.arange(block * page_size, dtype=jnp.int32)

    def step(j, carry):
        mx, total, acc = carry  # running max, sum of exp, weighted values (f32)
        blk = jax.lax.dynamic_slice_in_dim(pages, j * block, block, axis=1)  # [T, B]
        slots = (blk[:, :, None] * page_size + jnp.arange(page_size)).reshape(t, -1)  # [T, M]
        k_pos = j * block * page_size + offsets  # [M]
        mask = (k_pos[None, :] <= positions[:, None]) & valid[:, None]
        if window is not None:
            mask &= (positions[:, None] - k_pos[None, :]) < window
        s = jnp.einsum("nhgd,nmhd->nhgm", qg, k_cache[slots]) * scale
        s = jnp.where(mask[:, None, None, :], s.astype(jnp.float32), masked)
        mx_new = jnp.maximum(mx, s.max(-1))
        r, e = jnp.exp(mx - mx_new), jnp.exp(s - mx_new[..., None])
        vals = v_cache[slots]  # [T, M, Hkv, hd]
        acc = acc * r[..., None] + jnp.einsum("nhgm,nmhd->nhgd", e.astype(qg.dtype), vals)
        return mx_new, total * r + row_sum(e), acc  # not e.sum: see row_sum

    shape = (t, hkv, groups)
    init = (
        jnp.full(shape, masked),
        jnp.zeros(shape, jnp.float32),
        jnp.zeros((*shape, hd), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(0, num_blocks, step, init)
    return (acc / total[..., None]).astype(qg.dtype)


def route(router: Array, cfg: ModelConfig, x: Array) -> tuple[Array, Array]:
    """Router top-k: x [N, D] → weights [N, k], expert ids [N, k] int32."""
    logits = x @ router  # [N, E]
    if cfg.router == "sparsemixer":
        return _sparsemixer(logits, cfg.router_jitter_eps)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, cfg.top_k)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    if not cfg.routing_weights_f32:
        weights = weights.astype(x.dtype)
    return weights, ids.astype(jnp.int32)


def _sparsemixer_pick(scores: Array, candidates: Array, eps: float) -> tuple[Array, Array]:
    """One sparsemixer step (PhiMoE at inference): the best candidate and its masked-softmax gate.

    scores, candidates [N, E] (candidates = scores with earlier picks set to -inf).
    """
    top = candidates.max(-1, keepdims=True)  # [N, 1]
    idx = jnp.argmax(candidates, axis=-1)[:, None]  # [N, 1]
    factor = jnp.maximum(jnp.abs(scores), top)
    masked = jnp.where((top - scores) / factor > 2 * eps, -jnp.inf, candidates)
    gates = jax.nn.softmax(masked.astype(jnp.float32), axis=-1).astype(scores.dtype)
    return jnp.take_along_axis(gates, idx, axis=-1), idx


def _sparsemixer(scores: Array, eps: float) -> tuple[Array, Array]:
    w1, i1 = _sparsemixer_pick(scores, scores, eps)
    rest = jnp.where(jnp.arange(scores.shape[-1])[None, :] == i1, -jnp.inf, scores)
    w2, i2 = _sparsemixer_pick(scores, rest, eps)
    return jnp.concatenate([w1, w2], -1), jnp.concatenate([i1, i2], -1).astype(jnp.int32)


def attention_output(p: AttentionParams, cfg: ModelConfig, residual: Array, attn: Array):
    """Output projection, residual add, MoE input norm and routing.

    residual [N, D], attn [N, Hq*hd] → h [N, D] (new residual), moe_in [N, D],
    weights [N, k], ids [N, k]
    """
    return moe_input(p, cfg, residual + _linear(attn, p.wo, p.bo))


def moe_input(p: AttentionParams, cfg: ModelConfig, h: Array):
    """MoE input norm and routing of the new residual h [N, D] → h, moe_in [N, D], weights
    [N, k], ids [N, k]."""
    moe_in = norm(h, p.post_norm, cfg)
    weights, ids = route(p.router, cfg, moe_in)
    return h, moe_in, weights, ids


# ----------------------------------------------------------------------------------------------
# Experts: dispatch rows to a group of experts, run their FFNs, combine weighted outputs


def dispatch(ids: Array, group_start: Array | int, group_size: int):
    """Sort the (row, slot) assignments that fall in experts [start, start+G) by expert.

    ids [N, k] → order [N*k] (assignment index, in-group ones first, by expert), group_sizes [G],
    in_group [N*k] (for the sorted assignments).
    """
    local = ids.reshape(-1) - group_start  # [N*k]
    in_group = (local >= 0) & (local < group_size)
    key = jnp.where(in_group, local, group_size)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=group_size + 1)[:group_size].astype(jnp.int32)
    return order, group_sizes, in_group[order]


def slice_experts(w: Weight, start: Array | int, size: int) -> Weight:
    """Experts [start, start + size) of a stacked [E, ...] weight (both leaves of an int8 one)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=0), w)


def expert_at(w: Weight | tuple[Weight, ...], g: int) -> Weight:
    """Expert ``g`` of a group: a tuple entry (split) or index ``g`` of a stacked weight."""
    return w[g] if isinstance(w, tuple) else jax.tree.map(lambda a: a[g], w)


def _stack_experts(ws: tuple[Weight, ...]) -> Weight:
    """A tuple of G per-expert weights → one stacked [G, ...] weight."""
    return jax.tree.map(lambda *a: jnp.stack(a), *ws)


def ragged_matmul(x: Array, w: Weight, group_sizes: Array) -> Array:
    """Grouped matmul over rows sorted by expert: x [M, in], w [G, in, out] → [M, out]. An
    int8 weight's scales [G, out] are gathered per row from the row's expert."""
    if not isinstance(w, QuantizedWeight):
        return jax.lax.ragged_dot(x, w, group_sizes)
    y = jax.lax.ragged_dot(x, w.q.astype(x.dtype), group_sizes)  # [M, out]
    rows = jnp.arange(x.shape[0])
    expert = jnp.searchsorted(jnp.cumsum(group_sizes), rows, side="right")  # [M]
    scale = w.scale[jnp.minimum(expert, group_sizes.shape[0] - 1)]  # [M, out]; rows past: y = 0
    return (y * scale).astype(x.dtype)


def expert_ffn(x: Array, w_gate_up: Weight, w_down: Weight, group_sizes: Array) -> Array:
    """SwiGLU FFNs of G experts over rows sorted by expert.

    x [M, D] (rows of expert 0, then 1, ...), w_gate_up [G, D, 2F], w_down [G, F, D],
    group_sizes [G] → [M, D]; rows past sum(group_sizes) come out zero.
    """
    f = w_down.shape[1]
    h = ragged_matmul(x, w_gate_up, group_sizes)  # [M, 2F]
    h = jax.nn.silu(h[:, :f]) * h[:, f:]
    return ragged_matmul(h, w_down, group_sizes)  # [M, D]


def combine(y: Array, order: Array, in_group: Array, weights: Array, num_rows: int) -> Array:
    """Weight each sorted expert output and add it back to its row.

    y [N*k, D] sorted outputs, weights [N, k] → [N, D]
    """
    k = weights.shape[1]
    w = weights.reshape(-1)[order]  # [N*k]
    contrib = (y * w[:, None]).astype(y.dtype)
    contrib = jnp.where(in_group[:, None], contrib, 0)
    return jnp.zeros((num_rows, y.shape[1]), y.dtype).at[order // k].add(contrib)


def expert_group(
    ep: ExpertParams,
    x: Array,
    weights: Array,
    ids: Array,
    group_start: Array | int,
    group_size: int,
    impl: str = "auto",
    slots: SlotMap | None = None,
) -> Array:
    """Contribution of experts [group_start, group_start + group_size) to each row.

    x [N, D] (normed MoE input), weights/ids [N, k] → [N, D]. ``ep`` holds every expert
    (stacked layout: the group is sliced out at ``group_start``) or exactly the group's experts
    (split layout: ``ep.group(start, size)``). ``group_start`` may be traced, so one compiled
    function serves every group of every layer. ``impl``: "ragged" (sort rows by expert, grouped
    matmuls: work ∝ N*k, the right choice on accelerators), "dense" (every expert of the group
    on every row, unrouted rows weighted 0: XLA:CPU lowers ragged_dot densely over N*k rows
    anyway, so N*G rows is less work there; on XLA:CPU from ``GATHER_MIN_ROWS`` rows on, each
    expert on its routed rows in fixed tiles, work ∝ N*k + G*tile), or "auto" (by backend).

    ``slots`` (stacked layout only): ``ep`` holds physical expert slots, some of them copies of
    hot experts (expert load balancing), and ``slots`` says which hold which expert; ``ids``
    stay logical. See ``_expert_group_slots``.
    """
    if impl == "auto":
        impl = "dense" if jax.default_backend() == "cpu" else "ragged"
    if slots is not None:
        if ep.layout != "stacked":
            raise ValueError("physical expert slots need the stacked expert layout")
        return _expert_group_slots(ep, x, weights, ids, group_start, group_size, impl, slots)
    if ep.layout == "split":
        if len(ep.w_gate_up) != group_size:
            raise ValueError(f"split experts: got {len(ep.w_gate_up)} for a group of {group_size}")
        w_gu, w_d = ep.w_gate_up, ep.w_down
    else:
        w_gu = slice_experts(ep.w_gate_up, group_start, group_size)
        w_d = slice_experts(ep.w_down, group_start, group_size)
    if impl == "dense":
        return _expert_group_dense(x, weights, ids, group_start, group_size, w_gu, w_d)
    if ep.layout == "split":  # grouped matmuls want one [G, ...] array: a copy per call
        w_gu, w_d = _stack_experts(w_gu), _stack_experts(w_d)
    n, k = ids.shape
    order, group_sizes, in_group = dispatch(ids, group_start, group_size)
    y = expert_ffn(x[order // k], w_gu, w_d, group_sizes)  # [N*k, D]
    return combine(y, order, in_group, weights, n)


# On XLA:CPU passes of at least this many rows run each expert on its routed rows only, in tiles
# of EXPERT_ROW_TILE (``_expert_group_gathered``); smaller ones on every row
GATHER_MIN_ROWS = 64
EXPERT_ROW_TILE = 32


def _expert_group_dense(x, weights, ids, group_start, group_size, w_gate_up, w_down) -> Array:
    """x [N, D], each expert's w_gate_up [D, 2F] and w_down [F, D] (G of them, stacked or a
    tuple) → [N, D], experts added in id order as HF accumulates them. One 2-D matmul pair per
    expert: XLA:CPU runs a single einsum over stacked experts with a transposing copy of the
    weights, about 2x slower. On XLA:CPU from ``GATHER_MIN_ROWS`` rows on, each expert runs
    on the rows routed to it (``_expert_group_gathered``: its loops have data-dependent trip
    counts, which cost a read back to the host per iteration on XLA:GPU)."""
    if x.shape[0] >= GATHER_MIN_ROWS and jax.default_backend() == "cpu":
        return _expert_group_gathered(x, weights, ids, group_start, group_size, w_gate_up, w_down)
    local = ids - group_start  # [N, k]
    out = jnp.zeros_like(x)
    for g in range(group_size):  # static
        y = dense_expert(x, expert_at(w_gate_up, g), expert_at(w_down, g))
        out = add_weighted(out, y, weights, local == g)
    return out


def _expert_group_gathered(
    x, weights, ids, group_start, group_size, w_gate_up, w_down, tile: int = EXPERT_ROW_TILE
) -> Array:
    """``_expert_group_dense``'s result, each expert computed on its routed rows only: expert
    by expert in id order, its rows gathered ``tile`` at a time (a loop of data-dependent
    length: work ∝ N*k + G*tile, not N*G), its weighted outputs added to theirs, so a row's
    picks are added from zero in ascending expert id, as on the dense path. A row's expert
    output comes from a ``tile``-row matmul whatever the pass's size, as in a pass of at most
    ``tile`` rows on the dense path. x [N, D], weights/ids [N, k] → [N, D]."""
    n = x.shape[0]
    local = ids - group_start  # [N, k]
    out = jnp.zeros_like(x)
    for g in range(group_size):  # static
        w_gu, w_d = expert_at(w_gate_up, g), expert_at(w_down, g)
        chosen = local == g  # [N, k]
        hit = chosen.any(-1)  # [N] rows routed to expert g
        # their indices first, then n (no row) up to a whole last tile
        rows = jnp.nonzero(hit, size=n + tile - 1, fill_value=n)[0]
        weight = routing_weight(weights, chosen)  # [N]

        def one_tile(i, out, rows=rows, weight=weight, w_gu=w_gu, w_d=w_d):
            r = jax.lax.dynamic_slice_in_dim(rows, i * tile, tile)  # [T]
            y = dense_expert(x.at[r].get(mode="fill", fill_value=0), w_gu, w_d)  # [T, D]
            w = weight.at[r].get(mode="fill", fill_value=0)
            return out.at[r].add(_weighted(y, w, out.dtype), mode="drop")

        out = jax.lax.fori_loop(0, (hit.sum() + tile - 1) // tile, one_tile, out)
    return out


def _expert_group_slots(
    ep: ExpertParams,
    x: Array,
    weights: Array,
    ids: Array,
    group_start: Array | int,
    group_size: int,
    impl: str,
    slots: SlotMap,
) -> Array:
    """``expert_group`` over physical slots: ep.w_gate_up [S, D, 2F], ep.w_down [S, F, D].

    Placement-invariant: the copies of an expert hold the same bits, and a row's contributions
    are added in logical-expert order (``_sum_by_expert``), so moving or copying an expert
    changes no output bit (with top_k > 2 the order of a sum matters). "ragged": every routed
    (row, expert) goes to one copy, ``row % copies`` (deterministic), and the grouped matmuls
    run over all S slots (work ∝ N*k; the slot axis is what an expert mesh axis shards).
    "dense" (one device): each logical expert runs on every row from its first copy (the
    copies are bit-identical, so which copy computes a row changes nothing), in id order,
    exactly as without slots.
    """
    if impl == "dense":
        first = jax.lax.dynamic_slice_in_dim(slots.slot[:, 0], group_start, group_size)  # [G]
        w_gu, w_d = (jax.tree.map(lambda a: a[first], w) for w in (ep.w_gate_up, ep.w_down))
        return _expert_group_dense(x, weights, ids, group_start, group_size, w_gu, w_d)
    n, k = ids.shape
    num_slots = jax.tree.leaves(ep.w_down)[0].shape[0]  # S (both leaves of an int8 weight)
    local = ids - group_start  # [N, k]
    in_group = (local >= 0) & (local < group_size)
    e = jnp.clip(ids, 0, slots.copies.shape[0] - 1)  # padding rows' id E -> any; masked below
    copy = jnp.arange(n, dtype=jnp.int32)[:, None] % slots.copies[e]  # [N, k]
    phys = jnp.where(in_group, slots.slot[e, copy], num_slots).reshape(-1)  # [N*k]
    order = jnp.argsort(phys, stable=True)
    sizes = jnp.bincount(phys, length=num_slots + 1)[:num_slots].astype(jnp.int32)  # [S]
    y = expert_ffn(x[order // k], ep.w_gate_up, ep.w_down, sizes)  # [N*k, D] sorted by slot
    w = weights.reshape(-1)[order]
    contrib = jnp.where(in_group.reshape(-1)[order][:, None], (y * w[:, None]).astype(y.dtype), 0)
    per = jnp.zeros_like(contrib).at[order].set(contrib)  # back to (row, k) order: a permutation
    return _sum_by_expert(per.reshape(n, k, -1), ids)


def _sum_by_expert(per: Array, ids: Array) -> Array:
    """per [N, k, D] contributions of each row's k picks → [N, D], added from zero in ascending
    expert id (the order the dense path adds experts in), whatever slot computed them."""
    perm = jnp.argsort(ids, axis=1)  # [N, k]
    per = jnp.take_along_axis(per, perm[:, :, None], axis=1)
    out = jnp.zeros_like(per[:, 0])
    for j in range(per.shape[1]):  # static: k
        out = out + per[:, j]
    return out


def dense_expert(x: Array, w_gate_up: Weight, w_down: Weight) -> Array:
    """One expert's SwiGLU on every row: x [N, D], w_gate_up [D, 2F], w_down [F, D] → [N, D]."""
    f = w_down.shape[0]
    h = matmul(x, w_gate_up)  # [N, 2F]
    return matmul(jax.nn.silu(h[:, :f]) * h[:, f:], w_down)


def add_weighted(out: Array, y: Array, weights: Array, chosen: Array) -> Array:
    """out [N, D] plus one expert's output y [N, D] weighted by its routing weight on each
    row: weights [N, k], chosen [N, k] (which of a row's k picks are this expert; zero weight
    on rows that did not pick it)."""
    return out + _weighted(y, routing_weight(weights, chosen), out.dtype)


def routing_weight(weights: Array, chosen: Array) -> Array:
    """weights/chosen [N, k] → [N]: each row's routing weight of one expert (0 where the row
    did not pick it)."""
    return jnp.where(chosen, weights, 0).sum(-1)


def _weighted(y: Array, w: Array, dtype) -> Array:
    """One expert's output y [N, D] times its routing weight w [N], in ``dtype``."""
    return (y * w[:, None]).astype(dtype)


def shared_expert(sp: SharedExpertParams, x: Array) -> Array:
    """Qwen2-MoE's always-on expert behind a sigmoid gate: x [N, D] → [N, D]."""
    f = sp.w_down.shape[0]
    h = matmul(x, sp.w_gate_up)  # [N, 2Fs]
    out = matmul(jax.nn.silu(h[:, :f]) * h[:, f:], sp.w_down)
    return jax.nn.sigmoid(x @ sp.gate) * out


def logits(
    final_norm: NormParams,
    lm_head: Array,
    lm_head_bias: Array | None,
    cfg: ModelConfig,
    h: Array,
    transposed: bool = False,
) -> Array:
    """Final norm and LM head: h [N, D], lm_head [V, D] (HF layout; [D, V] if ``transposed``,
    which XLA:CPU multiplies about 1.5x faster) → logits [N, V] float32."""
    out = norm(h, final_norm, cfg) @ (lm_head if transposed else lm_head.T)
    if lm_head_bias is not None:
        out = out + lm_head_bias
    return out.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# The oracle: a full-sequence forward without a cache, chaining the pieces above


def _full_sequences(params: Params, cfg: ModelConfig, token_ids: Array) -> tuple[Array, Array]:
    """token_ids [B, S] → the last layer's residual [B*S, D] and every layer's expert picks
    [L, B*S, k]: each sequence whole, no cache."""
    b, s = token_ids.shape
    positions = jnp.tile(jnp.arange(s, dtype=jnp.int32), b)  # [B*S]
    seq = jnp.repeat(jnp.arange(b, dtype=jnp.int32), s)  # [B*S]
    valid = jnp.ones((b * s,), bool)
    h = embed(params.embed, token_ids.reshape(-1))  # [B*S, D]
    picks = []
    for layer, lp in enumerate(params.layers):
        q, k, v = qkv(lp.attn, cfg, h, positions)
        window = cfg.sliding_windows[layer]
        mask = attention_mask(positions, seq, positions, seq, valid, window)
        h, moe_in, weights, ids = attention_output(lp.attn, cfg, h, attend(q, k, v, mask, cfg))
        moe = expert_group(lp.experts, moe_in, weights, ids, 0, cfg.num_experts)
        if lp.shared is not None:
            moe = moe + shared_expert(lp.shared, moe_in)
        h = h + moe
        picks.append(ids)
    return h, jnp.stack(picks)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _reference_forward(params: Params, cfg: ModelConfig, token_ids: Array) -> Array:
    b, s = token_ids.shape
    h, _ = _full_sequences(params, cfg, token_ids)
    out = logits(params.final_norm, params.lm_head, params.lm_head_bias, cfg, h)
    return out.reshape(b, s, cfg.vocab_size)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _reference_routing(params: Params, cfg: ModelConfig, token_ids: Array) -> Array:
    return _full_sequences(params, cfg, token_ids[None])[1]


def reference_forward(model, token_ids) -> Array:
    """Full-sequence logits with no cache: token_ids [B, S] → logits [B, S, V] float32.

    A readable oracle built from the same functions the runtime's segments use.
    """
    ids = jnp.asarray(np.asarray(token_ids, dtype=np.int32))
    if ids.ndim != 2:
        raise ValueError(f"token_ids must be [batch, seq], got shape {ids.shape}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= model.config.vocab_size):
        raise ValueError(f"token ids must lie in [0, {model.config.vocab_size})")
    return _reference_forward(model.params, model.config, ids)


def reference_routing(model, token_ids) -> Array:
    """The experts each token of one sequence picks at each layer, from the oracle's pass:
    token_ids [T] → ids [L, T, k] int32 (for studies of expert placement)."""
    return _reference_routing(model.params, model.config, jnp.asarray(token_ids, jnp.int32))
