"""The segments on a mesh: the same pure model functions, run per device under ``shard_map``.

Each kernel here has the signature of its single-device counterpart in ``qllm_jax.segments``,
so the executor swaps its kernel table and nothing else changes (carries, ledger, plans,
preemption). The carry's row state is replicated on every device; collectives are explicit.

Same results as one device:

- experts are exact by construction: each device runs whole experts, their unweighted outputs
  are gathered (not summed with a ``psum``, which would add them in another order), and every
  device weights and adds them in expert-id order with the very expressions one device
  evaluates (``models.model.add_weighted``), fused multiply-adds included. The expert
  segment is bitwise one device's (``tests/sharded_checks.py experts:``).
- nothing is split along a contraction, so there are no partial sums to reassociate: heads are
  whole per device (q/k/v projections by output column), the output projection and the LM
  head by output column, the embedding by hidden column; pieces are concatenated
  (``all_gather``), never added. That is still not bitwise on XLA:CPU: a column block of a
  matmul may run another kernel than the whole matmul (measured: [8, 256] x [256, 128] blocks
  of a [256, 1024] product differ in the last bits; 4000-column blocks of a [4096, 32000]
  head too). So the LM head (any mesh) and attention (tensor_parallel > 1) differ from one
  device by float rounding (~1e-5 of the logits' scale on the tested configurations), and
  greedy tokens are identical on every tested family and mesh shape: a property shown by the
  tests, not a guarantee.

int8 weights (``models/quant.py``) go through the same ``matmul`` helper as on one device, on
each device's own columns or experts. Expert placement (``qllm_jax.eplb``): each device holds its
rank's block of the physical slots, copies included; ``_experts_slots_body`` keeps the dense
path bitwise one device's without slots under any placement.

The ``ragged`` expert path (accelerators) adds the devices' partial sums with a ``psum``
instead: less traffic, not bitwise equal to one device.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qllm_jax.carry import STATE_FIELDS, Carry
from qllm_jax.mesh import AXES, EXPERT, KV_SPEC, TENSOR, param_spec
from qllm_jax.models import ModelConfig
from qllm_jax.models.model import (
    add_weighted,
    dense_expert,
    embed,
    expert_at,
    expert_group,
    logits,
    matmul,
    moe_input,
    norm,
    paged_attention,
    qkv,
    slice_experts,
)
from qllm_jax.models.params import AttentionParams, ExpertParams, Params, SlotMap
from qllm_jax.sampling import sample
from qllm_jax.segments import HeadParams, SampleInputs, count_routed, empty_state, shared_fn

Array = jax.Array
REP = P()


def _specs(tree, prefix: str):
    """A PartitionSpec tree for a params subtree at ``prefix`` (e.g. ``"layers.0.attn"``)."""

    def spec(keypath, x):
        rest = ".".join(str(getattr(k, "name", getattr(k, "idx", k))) for k in keypath)
        return param_spec(f"{prefix}.{rest}" if prefix else rest, x.ndim)

    return jax.tree_util.tree_map_with_path(spec, tree)


def _smap(mesh: Mesh, f, in_specs, out_specs):
    # check_vma off: replicated outputs come from all_gathers whose results every device holds
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _gather(x: Array, axes, axis: int) -> Array:
    return jax.lax.all_gather(x, axes, axis=axis, tiled=True)


def local_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """``cfg`` as one device of a ``tp``-wide tensor axis sees it: its own heads only."""
    return dataclasses.replace(
        cfg, num_heads=cfg.num_heads // tp, num_kv_heads=cfg.num_kv_heads // tp
    )


# ----------------------------------------------------------------------------------------------
# Per-device bodies


def _full_norm(x: Array, p, cfg: ModelConfig) -> Array:
    """OLMoE's norm over all heads, for a device holding x [N, local heads * hd]: gather the
    other heads, normalise the whole vector, keep the local columns."""
    n = x.shape[1]
    full = norm(_gather(x, TENSOR, 1), p, cfg)
    return jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index(TENSOR) * n, n, axis=1)


def _attention_body(p: AttentionParams, k_cache, v_cache, c: Carry, cfg, window, page_size, tp):
    """``segments.attention_fn`` on the local heads; k_cache/v_cache [slots, Hkv/tp, hd]."""
    lcfg = local_config(cfg, tp)
    h = c.h + c.acc
    q, k, v = qkv(p, lcfg, h, c.positions, full_norm=_full_norm)
    k_cache = k_cache.at[c.write_slot].set(k.astype(k_cache.dtype))
    v_cache = v_cache.at[c.write_slot].set(v.astype(v_cache.dtype))
    out = paged_attention(
        q, k_cache, v_cache, c.pages, c.positions, c.valid, window, lcfg, page_size
    )  # [N, Hq/tp * hd]
    y = _gather(matmul(_gather(out, TENSOR, 1), p.wo), TENSOR, 1)  # [N, D]: whole dot products
    h, moe_in, weights, ids = moe_input(p, cfg, h + (y if p.bo is None else y + p.bo))
    ids = jnp.where(c.valid[:, None], ids, cfg.num_experts)  # padding rows visit no expert
    return h, moe_in, weights, ids, k_cache, v_cache


def expert_home(ids: Array, ep: int) -> tuple[Array, Array]:
    """Where expert ``ids`` live on the expert axis: (device, local slot) (see
    ``mesh.expert_slots``)."""
    return ids % ep, ids // ep


def _experts_body(ep_local: ExpertParams, x, weights, ids, acc, group_start, group_size, ep, impl):
    """``segments.experts_fn`` for experts [start, start + G): on every device its G/ep local
    experts ``start/ep ..`` (the group's ids ``start .. start + G`` are strided over devices)."""
    per = group_size // ep
    first = group_start // ep  # the group's first local slot, the same on every device
    w_gu = slice_experts(ep_local.w_gate_up, first, per)  # float or int8 (both leaves)
    w_d = slice_experts(ep_local.w_down, first, per)
    if impl == "ragged":  # this device's rows only, its partial sum added over devices
        device, slot = expert_home(ids, ep)
        local = jnp.where(device == jax.lax.axis_index(EXPERT), slot - first, -1)  # [N, k]
        part = expert_group(ExpertParams(w_gu, w_d), x, weights, local, 0, per, "ragged")
        return acc + jax.lax.psum(part, EXPERT)
    mine = jnp.stack(
        [dense_expert(x, expert_at(w_gu, j), expert_at(w_d, j)) for j in range(per)]
    )  # [G/ep, N, D]
    every = jax.lax.all_gather(mine, EXPERT)  # [ep, G/ep, N, D]: expert start + j*ep + d
    # weighted and added in expert-id order on every device, the very expressions one device
    # evaluates (a psum of per-device sums would add in another order, and a weighted output
    # gathered after rounding would lose the fused multiply-add one device gets)
    rel = ids - group_start  # [N, k]
    out = jnp.zeros_like(acc)
    for j in range(per):
        for d in range(ep):
            out = add_weighted(out, every[d, j], weights, rel == j * ep + d)
    return acc + out


def _experts_slots_body(
    ep_local: ExpertParams, slots: SlotMap, x, weights, ids, acc, group_start, group_size, ep, impl
):
    """``_experts_body`` over physical expert slots (``qllm_jax.eplb``): this device holds slots
    [d*P, (d+1)*P) of the layer's S (its block on the 'expert' axis), some of them copies of hot
    experts; ``slots`` (replicated) says which, and ids stay logical. A row routed to expert e
    goes to copy ``row % copies[e]`` (as on one device), wherever the placement put it.

    "dense" (CPU): each local slot whose expert is in the group runs on every row; a row takes
    the output of its own copy (the copies are bit-identical, so the choice changes no bit) and
    every device adds the experts in id order with one device's expressions: bitwise one
    device's, under any placement. "ragged": a device runs only the rows sent to its slots,
    partial sums added with a ``psum`` (not bitwise)."""
    per = jax.tree.leaves(ep_local.w_down)[0].shape[0]  # P local slots
    me = jax.lax.axis_index(EXPERT)
    n = ids.shape[0]
    row = jnp.arange(n, dtype=jnp.int32)
    rel = ids - group_start  # [N, k]
    in_group = (rel >= 0) & (rel < group_size)
    if impl == "ragged":
        e = jnp.clip(ids, 0, slots.copies.shape[0] - 1)  # padding rows' id E: masked below
        phys = slots.slot[e, row[:, None] % slots.copies[e]]  # [N, k] each pick's slot
        local = jnp.where(in_group & (phys // per == me), phys % per, -1)
        part = expert_group(ep_local, x, weights, local, 0, per, "ragged")
        return acc + jax.lax.psum(part, EXPERT)
    holds = slot_holders(slots, per * ep)  # [S] slot -> expert

    def run(j):
        e = holds[me * per + j]
        wanted = (e >= group_start) & (e < group_start + group_size)
        w_gu, w_d = expert_at(ep_local.w_gate_up, j), expert_at(ep_local.w_down, j)
        return jax.lax.cond(wanted, lambda: dense_expert(x, w_gu, w_d), lambda: jnp.zeros_like(x))

    mine = jnp.stack([run(j) for j in range(per)])  # [P, N, D]
    every = _gather(mine, EXPERT, 0)  # [S, N, D] by slot
    out = jnp.zeros_like(acc)
    for g in range(group_size):  # static: the group's experts in id order
        e = group_start + g
        y = every[slots.slot[e, row % slots.copies[e]], row]  # [N, D] each row's own copy
        out = add_weighted(out, y, weights, rel == g)
    return acc + out


def slot_holders(slots: SlotMap, num_slots: int) -> Array:
    """[S] int32: the expert each physical slot holds (the inverse of ``slots.slot``; a row's
    padding entries repeat copy 0, so every write to a slot writes the same expert)."""
    experts = jnp.broadcast_to(
        jnp.arange(slots.slot.shape[0], dtype=jnp.int32)[:, None], slots.slot.shape
    )
    return jnp.zeros(num_slots, jnp.int32).at[slots.slot].set(experts)


def _head_logits_body(hp: HeadParams, h, acc, rows, cfg):
    """Logits [S, V] from the local vocabulary block [S, V/n], gathered."""
    lg = logits(hp.final_norm, hp.lm_head, hp.lm_head_bias, cfg, (h + acc)[rows], hp.transposed)
    return _gather(lg, AXES, 1)


# ----------------------------------------------------------------------------------------------
# The kernels (jitted, the single-device signatures)


class MeshSegments:
    """The kernel table of ``Executor`` for one mesh: ``kernels()`` gives its entries."""

    def __init__(self, mesh: Mesh, impl: str = "auto") -> None:
        self.mesh = mesh
        self.ep, self.tp = mesh.shape[EXPERT], mesh.shape[TENSOR]
        if impl == "auto":
            impl = "dense" if jax.default_backend() == "cpu" else "ragged"
        self.impl = impl

    # plain functions (traced inside the jits below, and chained by ``fused``)

    def embed_fn(self, table: Array, token_ids: Array) -> Array:
        body = lambda t, i: _gather(embed(t, i), AXES, 1)  # noqa: E731
        return _smap(self.mesh, body, (P(None, AXES), REP), REP)(table, token_ids)

    def attention_fn(self, p, k_cache, v_cache, c: Carry, cfg, window, page_size):
        body = functools.partial(
            _attention_body, cfg=cfg, window=window, page_size=page_size, tp=self.tp
        )
        specs = (_specs(p, "layers.0.attn"), KV_SPEC, KV_SPEC, REP)
        out = (REP, REP, REP, REP, KV_SPEC, KV_SPEC)
        return _smap(self.mesh, body, specs, out)(p, k_cache, v_cache, c)

    def experts_fn(
        self, ep_params, moe_in, weights, ids, acc, group_start, group_size, counts, layer, slots
    ):
        """``segments.experts_fn``: the accumulator and the routed-token counts (counted
        replicated, from the replicated ids). ``slots``: ``ep_params`` holds an expert
        placement's physical slots [S, ...], S / ep per device (``_experts_slots_body``)."""
        args = (moe_in, weights, ids, acc, group_start)
        if slots is None:
            body = functools.partial(
                _experts_body, group_size=group_size, ep=self.ep, impl=self.impl
            )
        else:
            body = functools.partial(
                _experts_slots_body, group_size=group_size, ep=self.ep, impl=self.impl
            )
            args = (slots, *args)
        specs = (_specs(ep_params, "layers.0.experts"), *(REP,) * len(args))
        acc = _smap(self.mesh, body, specs, REP)(ep_params, *args)
        return acc, count_routed(counts, ids, layer, group_start, group_size)

    def head_logits_fn(self, hp: HeadParams, h, acc, rows, cfg) -> Array:
        body = functools.partial(_head_logits_body, cfg=cfg)
        specs = (head_specs(hp), REP, REP, REP)
        return _smap(self.mesh, body, specs, REP)(hp, h, acc, rows)

    def head_fn(self, hp: HeadParams, h, acc, s: SampleInputs, cfg) -> Array:
        lg = self.head_logits_fn(hp, h, acc, s.rows, cfg)
        return sample(lg, s.temperature, s.top_k, s.top_p, s.seeds, s.steps)  # replicated

    def fused_fn(
        self,
        params: Params,
        head: HeadParams,
        k_caches,
        v_caches,
        tokens,
        meta,
        s: SampleInputs,
        counts,
        slots,
        cfg: ModelConfig,
        page_size: int,
        dtype,
        want_logits: bool = False,
    ):
        """``segments.fused_step`` on the mesh: the kernels above chained in one jit."""
        state = dict(zip(STATE_FIELDS, empty_state(tokens.shape[0], cfg, dtype), strict=True))
        c = Carry(**(state | {"h": self.embed_fn(params.embed, tokens)}), **meta)
        ks, vs = list(k_caches), list(v_caches)
        for layer, lp in enumerate(params.layers):
            window = cfg.sliding_windows[layer]
            h, moe_in, weights, ids, ks[layer], vs[layer] = self.attention_fn(
                lp.attn, ks[layer], vs[layer], c, cfg, window, page_size
            )
            sm = None if slots is None else slots[layer]
            zero = jnp.zeros_like(h)
            acc, counts = self.experts_fn(
                lp.experts, moe_in, weights, ids, zero, 0, cfg.num_experts, counts, layer, sm
            )
            if lp.shared is not None:
                acc = shared_fn(lp.shared, moe_in, acc)
            c = dataclasses.replace(c, h=h, moe_in=moe_in, weights=weights, ids=ids, acc=acc)
        if want_logits:
            out = self.head_logits_fn(head, c.h, c.acc, s.rows, cfg)
        else:
            out = self.head_fn(head, c.h, c.acc, s, cfg)
        return out, tuple(ks), tuple(vs), counts

    def kernels(self) -> dict:
        """Jitted kernels by ``executor.Kernels`` field name (the rest stay the defaults:
        the shared expert and row scatters run replicated as they are)."""
        rep = NamedSharding(self.mesh, REP)
        return dict(
            embed=jax.jit(self.embed_fn),
            empty_state=jax.jit(
                empty_state, static_argnames=("n", "cfg", "dtype"), out_shardings=rep
            ),
            attention=jax.jit(
                self.attention_fn,
                static_argnames=("cfg", "window", "page_size"),
                donate_argnames=("k_cache", "v_cache"),
            ),
            experts=jax.jit(self.experts_fn, static_argnames=("group_size",)),
            head=jax.jit(self.head_fn, static_argnames=("cfg",)),
            head_logits=jax.jit(self.head_logits_fn, static_argnames=("cfg",)),
            fused=jax.jit(
                self.fused_fn,
                static_argnames=("cfg", "page_size", "dtype", "want_logits"),
                donate_argnames=("k_caches", "v_caches"),
            ),
        )

    def place_head(self, hp: HeadParams) -> HeadParams:
        """The head's params (``segments.head_params``) with the LM head's vocabulary over
        every device (a tied head is resharded from the embedding's layout)."""
        put = lambda x, spec: jax.device_put(x, NamedSharding(self.mesh, spec))  # noqa: E731
        return jax.tree.map(put, hp, head_specs(hp))


def head_specs(hp: HeadParams) -> HeadParams:
    """PartitionSpecs of the head: the LM head's vocabulary axis over every device."""
    vocab = P(None, AXES) if hp.transposed else P(AXES, None)
    bias = None if hp.lm_head_bias is None else P(AXES)
    final = jax.tree.map(lambda _: REP, hp.final_norm)
    return HeadParams(final, vocab, bias, hp.transposed)
