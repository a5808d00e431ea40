"""Segments: the separately jitted pieces of a forward pass, and the fused step that chains them.

Kinds: ``embed`` (build a carry), ``attention`` (one layer: add the pending MoE output, QKV,
RoPE, paged KV write + read, output projection, MoE input norm, router), ``experts`` (one group
of one layer's routed experts, accumulated into ``carry.acc``), ``shared`` (a shared expert) and
``head`` (final norm, LM head, sampling). Layers take their params as arguments, so each kind
compiles once per row/page bucket, not once per layer. The MoE output of layer ``l`` is added to
the residual at the start of layer ``l+1`` (or the head), so expert segments only accumulate.

``fused_step`` chains the very same functions in one jit for iteration-level scheduling.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from qllm_jax.carry import STATE_FIELDS, Carry
from qllm_jax.models import ModelConfig
from qllm_jax.models.model import (
    attention_output,
    embed,
    expert_group,
    logits,
    paged_attention,
    qkv,
    shared_expert,
)
from qllm_jax.models.params import (
    AttentionParams,
    ExpertParams,
    NormParams,
    Params,
    SharedExpertParams,
    SlotMap,
    pytree_dataclass,
)
from qllm_jax.sampling import sample

Array = jax.Array


@pytree_dataclass
class SampleInputs:
    """Which rows of a pass sample a token, and how. S sampled rows (a bucket)."""

    rows: Array  # [S] int32 indices into the pass's rows
    temperature: Array  # [S] float32 (0: greedy)
    top_k: Array  # [S] int32 (<= 0: off)
    top_p: Array  # [S] float32 (1: off)
    seeds: Array  # [S, 2] uint32 low and high words of each request's 64-bit seed
    steps: Array  # [S] int32 index of the token being sampled in its request's output


@pytree_dataclass
class HeadParams:
    final_norm: NormParams
    lm_head: Array  # [V, D], or [D, V] when ``transposed``
    lm_head_bias: Array | None  # [V]
    transposed: bool = struct.field(pytree_node=False, default=False)


def head_params(params: Params, transposed: bool = False) -> HeadParams:
    """The head's params; ``transposed`` keeps a [D, V] copy of the LM head (on a CPU the
    matmul is faster that way; the executor makes the copy once)."""
    lm_head = transpose_segment(params.lm_head) if transposed else params.lm_head
    return HeadParams(params.final_norm, lm_head, params.lm_head_bias, transposed)


transpose_segment = jax.jit(lambda w: w.T)


# ----------------------------------------------------------------------------------------------
# The pure segment functions. Each takes only the carry fields it reads and returns only what it
# changes, so a call moves as few arrays through dispatch as it can, and a kind compiles once
# per bucket of the shapes it actually sees.


def empty_state(n: int, cfg: ModelConfig, dtype) -> tuple[Array, ...]:
    """Row state (``carry.STATE_FIELDS``) of ``n`` padding rows: zeros, routed to no expert."""
    weights_dtype = jnp.float32 if cfg.routing_weights_f32 else dtype
    zeros = jnp.zeros((n, cfg.hidden_size), dtype)
    weights = jnp.zeros((n, cfg.top_k), weights_dtype)
    return zeros, zeros, weights, jnp.full((n, cfg.top_k), cfg.num_experts, jnp.int32), zeros


def attention_fn(
    p: AttentionParams,
    k_cache: Array,
    v_cache: Array,
    c: Carry,
    cfg: ModelConfig,
    window: int | None,
    page_size: int,
) -> tuple[Array, Array, Array, Array, Array, Array]:
    """One layer's attention over the paged cache. k_cache/v_cache [slots, Hkv, hd].

    Returns the new h, moe_in, weights, ids (the MoE accumulator restarts at zero) and the
    updated caches.
    """
    h = c.h + c.acc  # the previous layer's MoE output joins the residual here
    q, k, v = qkv(p, cfg, h, c.positions)
    k_cache = k_cache.at[c.write_slot].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[c.write_slot].set(v.astype(v_cache.dtype))
    out = paged_attention(
        q, k_cache, v_cache, c.pages, c.positions, c.valid, window, cfg, page_size
    )
    h, moe_in, weights, ids = attention_output(p, cfg, h, out)
    ids = jnp.where(c.valid[:, None], ids, cfg.num_experts)  # padding rows visit no expert
    return h, moe_in, weights, ids, k_cache, v_cache


def experts_fn(
    ep: ExpertParams,
    moe_in: Array,
    weights: Array,
    ids: Array,
    acc: Array,
    group_start: Array,
    group_size: int,
    counts: Array,
    layer: Array,
    slots: SlotMap | None = None,
) -> tuple[Array, Array]:
    """The accumulator [N, D] plus experts [group_start, group_start + group_size), and the
    routed-token counts [L, E] plus this group's (``count_routed``). ``slots``: ``ep`` holds
    physical expert slots (expert load balancing; ``expert_group``)."""
    out = expert_group(ep, moe_in, weights, ids, group_start, group_size, slots=slots)
    return acc + out, count_routed(counts, ids, layer, group_start, group_size)


def count_routed(
    counts: Array, ids: Array, layer: Array | int, group_start: Array | int, group_size: int
) -> Array:
    """counts [L, E] int32 plus, at ``layer``, how many (row, pick) of ``ids`` [N, k] chose each
    expert of the group: logical experts, real rows only (padding rows carry id E)."""
    num_experts = counts.shape[1]
    local = ids.reshape(-1) - group_start
    hit = jnp.where((local >= 0) & (local < group_size), ids.reshape(-1), num_experts)
    return counts.at[layer].add(jnp.bincount(hit, length=num_experts + 1)[:num_experts])


def shared_fn(sp: SharedExpertParams, moe_in: Array, acc: Array) -> Array:
    return acc + shared_expert(sp, moe_in)


def head_fn(hp: HeadParams, h: Array, acc: Array, s: SampleInputs, cfg: ModelConfig) -> Array:
    """Sampled tokens [S] int32 for the rows ``s.rows``."""
    lg = logits(hp.final_norm, hp.lm_head, hp.lm_head_bias, cfg, (h + acc)[s.rows], hp.transposed)
    return sample(lg, s.temperature, s.top_k, s.top_p, s.seeds, s.steps)


def head_logits_fn(hp: HeadParams, h: Array, acc: Array, rows: Array, cfg: ModelConfig) -> Array:
    """Logits [S, V] of some rows (for tests and scoring)."""
    return logits(hp.final_norm, hp.lm_head, hp.lm_head_bias, cfg, (h + acc)[rows], hp.transposed)


# ----------------------------------------------------------------------------------------------
# Jitted segments. KV arrays are donated: updated in place, never copied. Carries are not
# donated, so the host can wait on an earlier segment's output to bound its lookahead.

embed_segment = jax.jit(embed)
empty_state_segment = jax.jit(empty_state, static_argnames=("n", "cfg", "dtype"))
attention_segment = jax.jit(
    attention_fn,
    static_argnames=("cfg", "window", "page_size"),
    donate_argnames=("k_cache", "v_cache"),
)
experts_segment = jax.jit(experts_fn, static_argnames=("group_size",))
shared_segment = jax.jit(shared_fn)
head_segment = jax.jit(head_fn, static_argnames=("cfg",))
head_logits_segment = jax.jit(head_logits_fn, static_argnames=("cfg",))


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "page_size", "dtype", "want_logits"),
    donate_argnames=("k_caches", "v_caches"),
)
def fused_step(
    params: Params,
    head: HeadParams,
    k_caches: tuple[Array, ...],
    v_caches: tuple[Array, ...],
    tokens: Array,
    meta: dict[str, Array],
    s: SampleInputs,
    counts: Array,
    slots: tuple[SlotMap, ...] | None,
    cfg: ModelConfig,
    page_size: int,
    dtype,
    want_logits: bool = False,
):
    """A whole forward pass in one jit: the same functions as the segments, chained.

    head: the head's params (``head_params``); tokens [N] int32, meta the carry's metadata
    fields; counts [L, E] routed-token counts; slots: each layer's ``SlotMap`` when
    ``params`` hold physical expert slots. Returns (tokens [S] or logits [S, V], k_caches,
    v_caches, counts).
    """
    state = dict(zip(STATE_FIELDS, empty_state(tokens.shape[0], cfg, dtype), strict=True))
    c = Carry(**(state | {"h": embed(params.embed, tokens)}), **meta)
    ks, vs = list(k_caches), list(v_caches)
    for layer, lp in enumerate(params.layers):
        window = cfg.sliding_windows[layer]
        h, moe_in, weights, ids, ks[layer], vs[layer] = attention_fn(
            lp.attn, ks[layer], vs[layer], c, cfg, window, page_size
        )
        sm = None if slots is None else slots[layer]
        zero = jnp.zeros_like(h)
        acc, counts = experts_fn(
            lp.experts, moe_in, weights, ids, zero, 0, cfg.num_experts, counts, layer, sm
        )
        if lp.shared is not None:
            acc = shared_fn(lp.shared, moe_in, acc)
        c = dataclasses.replace(c, h=h, moe_in=moe_in, weights=weights, ids=ids, acc=acc)
    if want_logits:
        out = head_logits_fn(head, c.h, c.acc, s.rows, cfg)
    else:
        out = head_fn(head, c.h, c.acc, s, cfg)
    return out, tuple(ks), tuple(vs), counts
