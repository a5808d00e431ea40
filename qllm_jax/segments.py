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

from qllm_jax.carry import Carry
from qllm_jax.models import ModelConfig
from qllm_jax.models.model import (
    attend,
    attention_mask,
    attention_output,
    embed,
    expert_group,
    logits,
    qkv,
    shared_expert,
)
from qllm_jax.models.params import (
    AttentionParams,
    ExpertParams,
    NormParams,
    Params,
    SharedExpertParams,
)
from qllm_jax.sampling import sample

Array = jax.Array


@dataclasses.dataclass
class PassInputs:
    """Host-built inputs of a pass (numpy or device arrays), padded to buckets.

    N rows, P key pages.
    """

    token_ids: Array  # [N] int32
    positions: Array  # [N] int32
    seq: Array  # [N] int32, -1 for padding
    valid: Array  # [N] bool
    write_slot: Array  # [N] int32
    key_pages: Array  # [P] int32
    key_seq: Array  # [P] int32, -1 for padding
    key_base: Array  # [P] int32


@dataclasses.dataclass
class SampleInputs:
    """Which rows of a pass sample a token, and how. S sampled rows (a bucket)."""

    rows: Array  # [S] int32 indices into the pass's rows
    temperature: Array  # [S] float32
    top_k: Array  # [S] int32
    top_p: Array  # [S] float32
    seeds: Array  # [S] uint32
    steps: Array  # [S] int32 index of the token being sampled in its request's output


for _cls in (PassInputs, SampleInputs):
    jax.tree_util.register_dataclass(
        _cls, data_fields=[f.name for f in dataclasses.fields(_cls)], meta_fields=[]
    )


@dataclasses.dataclass(frozen=True)
class HeadParams:
    final_norm: NormParams
    lm_head: Array  # [V, D]
    lm_head_bias: Array | None  # [V]


jax.tree_util.register_dataclass(
    HeadParams, data_fields=["final_norm", "lm_head", "lm_head_bias"], meta_fields=[]
)


def head_params(params: Params) -> HeadParams:
    return HeadParams(params.final_norm, params.lm_head, params.lm_head_bias)


# ----------------------------------------------------------------------------------------------
# The pure segment functions


def embed_fn(embedding: Array, cfg: ModelConfig, inp: PassInputs, dtype) -> Carry:
    n = inp.token_ids.shape[0]
    weights_dtype = jnp.float32 if cfg.routing_weights_f32 else dtype
    zeros = jnp.zeros((n, cfg.hidden_size), dtype)
    return Carry(
        h=embed(embedding, inp.token_ids),
        moe_in=zeros,
        weights=jnp.zeros((n, cfg.top_k), weights_dtype),
        ids=jnp.zeros((n, cfg.top_k), jnp.int32),
        acc=zeros,
        positions=inp.positions,
        seq=inp.seq,
        valid=inp.valid,
        write_slot=inp.write_slot,
        key_pages=inp.key_pages,
        key_seq=inp.key_seq,
        key_base=inp.key_base,
    )


def attention_fn(
    p: AttentionParams,
    k_cache: Array,
    v_cache: Array,
    c: Carry,
    cfg: ModelConfig,
    window: int | None,
    page_size: int,
) -> tuple[Carry, Array, Array]:
    """One layer's attention over the paged cache. k_cache/v_cache [slots, Hkv, hd]."""
    h = c.h + c.acc  # the previous layer's MoE output joins the residual here
    q, k, v = qkv(p, cfg, h, c.positions)
    k_cache = k_cache.at[c.write_slot].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[c.write_slot].set(v.astype(v_cache.dtype))
    offsets = jnp.arange(page_size, dtype=jnp.int32)
    slots = (c.key_pages[:, None] * page_size + offsets).reshape(-1)  # [P*ps]
    k_pos = (c.key_base[:, None] + offsets).reshape(-1)
    k_seq = jnp.repeat(c.key_seq, page_size)
    mask = attention_mask(c.positions, c.seq, k_pos, k_seq, k_seq >= 0, window)
    mask &= c.valid[:, None]
    out = attend(q, k_cache[slots], v_cache[slots], mask, cfg)
    h, moe_in, weights, ids = attention_output(p, cfg, h, out)
    ids = jnp.where(c.valid[:, None], ids, cfg.num_experts)  # padding rows visit no expert
    c = dataclasses.replace(c, h=h, moe_in=moe_in, weights=weights, ids=ids, acc=jnp.zeros_like(h))
    return c, k_cache, v_cache


def experts_fn(ep: ExpertParams, c: Carry, group_start: Array, group_size: int) -> Carry:
    contrib = expert_group(ep, c.moe_in, c.weights, c.ids, group_start, group_size)
    return dataclasses.replace(c, acc=c.acc + contrib)


def shared_fn(sp: SharedExpertParams, c: Carry) -> Carry:
    return dataclasses.replace(c, acc=c.acc + shared_expert(sp, c.moe_in))


def head_fn(hp: HeadParams, c: Carry, s: SampleInputs, cfg: ModelConfig) -> Array:
    """Sampled tokens [S] int32 for the rows ``s.rows``."""
    h = (c.h + c.acc)[s.rows]
    lg = logits(hp.final_norm, hp.lm_head, hp.lm_head_bias, cfg, h)
    return sample(lg, s.temperature, s.top_k, s.top_p, s.seeds, s.steps)


def head_logits_fn(hp: HeadParams, c: Carry, rows: Array, cfg: ModelConfig) -> Array:
    """Logits [S, V] of some rows (for tests and scoring)."""
    return logits(hp.final_norm, hp.lm_head, hp.lm_head_bias, cfg, (c.h + c.acc)[rows])


# ----------------------------------------------------------------------------------------------
# Jitted segments. KV arrays are donated: updated in place, never copied. Carries are not
# donated, so the host can wait on an earlier segment's output to bound its lookahead.

embed_segment = jax.jit(embed_fn, static_argnames=("cfg", "dtype"))
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
    k_caches: tuple[Array, ...],
    v_caches: tuple[Array, ...],
    inp: PassInputs,
    s: SampleInputs,
    cfg: ModelConfig,
    page_size: int,
    dtype,
    want_logits: bool = False,
):
    """A whole forward pass in one jit: the same functions as the segments, chained.

    Returns (tokens [S] or logits [S, V], k_caches, v_caches).
    """
    c = embed_fn(params.embed, cfg, inp, dtype)
    ks, vs = list(k_caches), list(v_caches)
    for layer, lp in enumerate(params.layers):
        window = cfg.sliding_windows[layer]
        c, ks[layer], vs[layer] = attention_fn(
            lp.attn, ks[layer], vs[layer], c, cfg, window, page_size
        )
        c = experts_fn(lp.experts, c, jnp.int32(0), cfg.num_experts)
        if lp.shared is not None:
            c = shared_fn(lp.shared, c)
    hp = head_params(params)
    out = head_logits_fn(hp, c, s.rows, cfg) if want_logits else head_fn(hp, c, s, cfg)
    return out, tuple(ks), tuple(vs)
