"""The executor: the only interpreter of plans, and the only code that touches device arrays.

``Executor.execute(plan) -> StepResult`` carries out one ``Plan`` of the scheduler. The executor
owns the params, the paged KV cache and every live and parked carry, and keeps a host-side
record of each carry's rows (``scheduler.ledger.Ledger``: sequence, positions, pages, sampling
knobs, cursor) from which it builds each carry's metadata, moves rows between carries (drop,
merge, split: one jitted scatter per source carry), and picks the rows that sample. Nothing on
the step path reads a device array back but the sampled tokens at the head.

Shapes are bucketed (rows, key pages, sampled rows: powers of two), so the set of executables
is finite and known from the configuration (``signatures``); ``warmup`` compiles all of them
(or those a workload can reach) so that a steady workload compiles nothing.

Faults are isolated: an exception while carrying out a plan fails the requests whose rows the
plan touched (and those of any carry the error poisoned), drops their carries and returns them in
``StepResult.failed``; if the KV cache itself was lost (a donated buffer consumed by a failed
call), it is rebuilt and ``StepResult.reset`` tells the scheduler to recompute everyone else.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from qllm_jax.carry import (
    PAGE_BUCKET_MIN,
    ROW_BUCKET_MIN,
    SAMPLE_BUCKET_MIN,
    STATE_FIELDS,
    Carry,
    bucket,
    buckets,
    pass_meta,
    scatter_rows,
    token_ids,
)
from qllm_jax.eplb import ExpertLoad, ExpertSlots, Rebalance, check_eplb_options
from qllm_jax.kv_cache import PAGE_IO_BUCKET_MIN, KVCache
from qllm_jax.mesh import EXPERT, KV_SPEC, replicated, slot_ranks
from qllm_jax.models import Model
from qllm_jax.models.params import ExpertParams, Params, SlotMap
from qllm_jax.sampling import split_seeds
from qllm_jax.scheduler.ledger import Applied, CarryRecord, Ledger, Move
from qllm_jax.scheduler.plan import Chunk, Plan, Segment, StepResult, segment_layout
from qllm_jax.segments import (
    SampleInputs,
    attention_segment,
    embed_segment,
    empty_state_segment,
    experts_segment,
    fused_step,
    head_logits_segment,
    head_params,
    head_segment,
    shared_segment,
)
from qllm_jax.sharded import MeshSegments


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The jitted functions the executor calls: a table, so a test can wrap one (to inject a
    fault) without touching the module."""

    embed: Callable = embed_segment
    empty_state: Callable = empty_state_segment
    attention: Callable = attention_segment
    experts: Callable = experts_segment
    shared: Callable = shared_segment
    head: Callable = head_segment
    head_logits: Callable = head_logits_segment
    fused: Callable = fused_step
    scatter: Callable = scatter_rows


# What a segmented pass calls (a fused pass calls only "fused").
SEGMENT_KERNELS = ("embed", "empty_state", "attention", "experts", "shared", "head", "scatter")
SWAP_KERNELS = ("swap_out", "swap_in")  # KV page copies to and from host slots (swap_pages > 0)


@dataclasses.dataclass(frozen=True)
class Signature:
    """One executable: a kernel at one shape (``rows``, ``pages``, ``samples`` buckets;
    ``src_rows`` for a scatter's source; ``window`` for attention)."""

    kernel: str
    rows: int
    pages: int = 0
    samples: int = 0
    src_rows: int = 0
    window: int | None = None


class Executor:
    """Runs plans of one model over its paged KV cache.

    ``max_batch_size``, ``max_num_batched_tokens`` and ``max_model_len`` bound the shapes a
    plan can produce (the scheduler enforces them); they only serve to enumerate executables.
    ``mode``: a plan that runs a whole pass (``plan.fused``) runs as one jit (``"fused"``) or
    segment by segment (``"segmented"``, what preemptive plans always do). ``swap_pages``: the
    host slots the scheduler may swap KV pages into (only to warm the page copies up).
    ``eplb``: hold each layer's experts in ``num_experts + redundant_experts`` physical slots
    over ``eplb_ranks`` ranks, re-placed by ``rebalance`` (``qllm_jax.eplb``); routed-token
    counts are kept either way (``expert_load``).
    ``mesh``: the params are sharded on it (``qllm_jax.mesh``) and the kernels are
    ``qllm_jax.sharded``'s; None is one device. On a mesh the placement's ranks are the
    devices of its 'expert' axis (``eplb_ranks`` 1 or that size).
    """

    def __init__(
        self,
        model: Model,
        num_pages: int,
        page_size: int,
        *,
        max_batch_size: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        expert_group_size: int | None = None,
        lookahead: int = 2,
        mode: str = "fused",
        swap_pages: int = 0,
        eplb: bool = False,
        redundant_experts: int = 0,
        eplb_ranks: int = 1,
        mesh: Mesh | None = None,
    ) -> None:
        cfg = model.config
        check_eplb_options(cfg.num_experts, redundant_experts, 0, eplb_ranks)
        if mesh is not None and (eplb or redundant_experts):  # the ranks: the 'expert' axis
            ep = mesh.shape[EXPERT]
            eplb_ranks = slot_ranks(cfg.num_experts, redundant_experts, eplb_ranks, ep)
        if mode not in ("fused", "segmented"):
            raise ValueError(f"mode must be 'fused' or 'segmented', got {mode!r}")
        group = cfg.num_experts if expert_group_size is None else expert_group_size
        if not isinstance(page_size, int) or page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size!r}")
        if not isinstance(lookahead, int) or lookahead < 1:
            raise ValueError(f"lookahead must be an int >= 1, got {lookahead!r}")
        self.model = model
        self.cfg = cfg
        self.page_size = page_size
        self.num_pages = num_pages
        self.group_size = group
        self.lookahead = lookahead
        self.mode = mode  # how a plan that runs a whole pass runs it: one jit, or segments
        self.max_batch_size = max_batch_size
        self.max_rows = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.dtype = np.dtype(model.dtype)
        self.mesh = mesh
        self._replicated = replicated(mesh)  # where host row state goes (None: the device)
        self._kv_sharding = None if mesh is None else NamedSharding(mesh, KV_SPEC)
        self.kv = KVCache.create(cfg, num_pages, page_size, self.dtype, self._kv_sharding)
        self.swap_pages = swap_pages
        # swapped-out KV pages by host slot: k, v [L, page_size, Hkv, hd]
        self.host_kv: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.segments: list[Segment] = segment_layout(
            cfg.num_layers, cfg.num_experts, group, bool(cfg.shared_intermediate_size)
        )
        self.head = len(self.segments) - 1
        self.ledger = Ledger(self.head, page_size)
        self.expert_load = ExpertLoad(cfg.num_layers, cfg.num_experts)
        self.expert_slots: ExpertSlots | None = None
        if eplb or redundant_experts:
            experts = [lp.experts for lp in model.params.layers]
            self.expert_slots = ExpertSlots(experts, redundant_experts, eplb_ranks, mesh)
        self._params, self._slot_maps = self._placed_params()
        self.carries: dict[int, Carry] = {}  # device state of every pass in the ledger
        mesh_segments = None if mesh is None else MeshSegments(mesh)
        self.kernels = Kernels() if mesh is None else Kernels(**mesh_segments.kernels())
        self.segments_run = 0
        self.num_resets = 0
        self.wait_s = 0.0  # host time spent waiting on the device (lookahead bound, tokens)
        # on a CPU the LM head multiplies faster as [D, V]: one copy of it, made once
        self._head_params = head_params(model.params, jax.default_backend() == "cpu")
        if mesh_segments is not None:
            self._head_params = mesh_segments.place_head(self._head_params)
        self._empty: dict[int, tuple[jax.Array, ...]] = {}  # padding row state per bucket
        self._inflight: collections.deque[jax.Array] = collections.deque()

    # -- the contract -----------------------------------------------------------------------------

    def execute(self, plan: Plan) -> StepResult:
        """Carry out ``plan``. An invalid plan raises ``PlanError`` before anything changes; an
        error while running it fails only what it touched (see the module docstring)."""
        applied = self.ledger.apply(plan)
        for slot in applied.freed_slots:
            del self.host_kv[slot]
        try:
            self._swap(plan)
        except Exception as err:  # noqa: BLE001 -- the swapped sequences' K/V is unknown now
            result = self._recover(plan, applied.finished, err)
            lost = {sw.seq_id: result_message(err) for sw in (*plan.swap_out, *plan.swap_in)}
            return dataclasses.replace(result, failed=result.failed | lost)
        try:
            return StepResult(self._carry_out(plan, applied))
        except Exception as err:  # noqa: BLE001 -- isolate the fault; see _recover
            return self._recover(plan, applied.finished, err)

    def _swap(self, plan: Plan) -> None:
        """Copy the plan's swapped-out pages to host slots, then swapped-in slots to pages:
        one gather and one scatter for all of them (a waiting device-to-host copy: swaps
        happen only when the scheduler evicts for lack of pages)."""
        if plan.swap_out:
            k, v = self.export_kv([p for sw in plan.swap_out for p in sw.pages])
            slots = [slot for sw in plan.swap_out for slot in sw.slots]
            for i, slot in enumerate(slots):
                self.host_kv[slot] = (k[:, i].copy(), v[:, i].copy())
        if plan.swap_in:
            saved = [self.host_kv.pop(slot) for sw in plan.swap_in for slot in sw.slots]
            k, v = (np.stack([kv[i] for kv in saved], axis=1) for i in (0, 1))
            self.import_kv([p for sw in plan.swap_in for p in sw.pages], k, v)
        for slot in plan.drop_slots:
            del self.host_kv[slot]

    def _carry_out(self, plan: Plan, applied: Applied) -> dict[int, int]:
        for pid in applied.gone:
            del self.carries[pid]
        for move in applied.moves:
            self.carries[move.dst] = self._moved(move)
        for pid in plan.absorb:
            del self.carries[pid]
        if not plan.runs:
            return {}
        if plan.fused and self.mode == "fused":
            return self._tokens(applied.finished, self._fused(applied.finished))
        if plan.new:
            carry = self.start(applied.record or applied.finished)
        else:
            carry = self.carries.pop(plan.pass_id)
        carry = self.advance(carry, plan.cursor, plan.cursor + plan.num_segments)
        if not plan.finishes:
            self.carries[plan.pass_id] = carry
            return {}
        return self._tokens(applied.finished, self.head_tokens(carry, applied.finished))

    @property
    def num_carries(self) -> int:
        return len(self.carries)

    def num_compiled(self) -> int | None:
        """Executables the process holds for the kernels (all executors share them), or None
        where this jax cannot tell."""
        sizes = [getattr(f, "_cache_size", None) for f in dataclasses.astuple(self.kernels)]
        return sum(size() for size in sizes) if all(sizes) else None

    # -- running pieces of a pass -----------------------------------------------------------------

    def advance(self, carry: Carry, start: int, end: int) -> Carry:
        """Run segments ``start .. end`` (exclusive; the head is not one of them)."""
        if not 0 <= start <= end <= self.head:
            raise ValueError(f"cannot run segments {start}..{end}; the head is {self.head}")
        for step in self._steps[start:end]:
            carry = step(carry)
            self._bound_lookahead(carry.h)
        self.segments_run += end - start
        return carry

    def forward(
        self, chunks: Iterable[Chunk], fused: bool = True, want_logits: bool = False
    ) -> np.ndarray:
        """One whole pass over ``chunks`` outside any plan (tests, profiling): writes their K/V
        into their pages and returns the sampled tokens [S] (or logits [S, V]) of their sampling
        rows, in chunk order. The scheduler's ledger is not involved."""
        rec = CarryRecord(0, tuple(chunks))
        if fused:
            out = self._fused(rec, want_logits)
        else:
            carry = self.advance(self.start(rec), 0, self.head)
            out = self.head_tokens(carry, rec, want_logits)
        with jax.transfer_guard_device_to_host("allow"):
            return np.asarray(out)[: len(rec.sample_rows())]

    def start(self, rec: CarryRecord) -> Carry:
        """The embed segment: a fresh carry at cursor 0."""
        h = self.kernels.embed(self.model.params.embed, token_ids(rec))
        state = dict(zip(STATE_FIELDS, self._padding(bucket(rec.num_rows)), strict=True))
        return Carry(**(state | {"h": h}), **self._meta(rec))

    @property
    def kernels(self) -> Kernels:
        return self._kernels

    @kernels.setter
    def kernels(self, kernels: Kernels) -> None:
        """Swap the kernel table (tests wrap one to inject a fault); rebinds every segment."""
        self._kernels = kernels
        self._steps = [self._bind(seg) for seg in self.segments[:-1]]

    def _bind(self, seg: Segment) -> Callable[[Carry], Carry]:
        """The host work of one segment, with everything but the carry looked up once."""
        k, lp = self._kernels, self.model.params.layers[seg.layer]
        if seg.kind == "attention":
            layer = seg.layer
            kw = dict(
                cfg=self.cfg, window=self.cfg.sliding_windows[layer], page_size=self.page_size
            )

            def attention(c: Carry) -> Carry:
                kv = self.kv  # not bound: a reset replaces the cache
                h, moe_in, weights, ids, kv.k[layer], kv.v[layer] = k.attention(
                    lp.attn, kv.k[layer], kv.v[layer], c, **kw
                )
                acc = self._padding(c.num_rows)[4]  # zeros: the new layer's accumulator
                return c.replace(h=h, moe_in=moe_in, weights=weights, ids=ids, acc=acc)

            return attention
        if seg.kind == "experts":
            ep, slots = self._layer_experts(seg.layer)
            if slots is None:
                ep = ep.group(seg.group_start, seg.group_size)  # no copy
            start, size = np.int32(seg.group_start), seg.group_size
            layer, load = np.int32(seg.layer), self.expert_load

            def experts(c: Carry) -> Carry:
                acc, load.counts = k.experts(
                    ep, c.moe_in, c.weights, c.ids, c.acc, start, size, load.counts, layer, slots
                )
                return c.replace(acc=acc)

            return experts
        if seg.kind == "shared":
            return lambda c: c.replace(acc=k.shared(lp.shared, c.moe_in, c.acc))
        raise ValueError(f"cannot advance through a {seg.kind} segment")

    def head_tokens(self, carry: Carry, rec: CarryRecord, want_logits: bool = False) -> jax.Array:
        """The head segment: sampled tokens [S] (or logits [S, V]) of a pass at the last cursor."""
        s = self._sample_inputs(rec, self._head_bucket(rec))
        if want_logits:
            return self.kernels.head_logits(self._head_params, carry.h, carry.acc, s.rows, self.cfg)
        return self.kernels.head(self._head_params, carry.h, carry.acc, s, self.cfg)

    def _fused(self, rec: CarryRecord, want_logits: bool = False) -> jax.Array:
        """A whole pass in one jit."""
        meta = pass_meta(rec, self.page_size)
        out, k, v, self.expert_load.counts = self.kernels.fused(
            self._params,
            self._head_params,
            tuple(self.kv.k),
            tuple(self.kv.v),
            token_ids(rec),
            meta,
            self._sample_inputs(rec, self._sample_bucket(rec.num_rows)),
            self.expert_load.counts,
            self._slot_maps,
            cfg=self.cfg,
            page_size=self.page_size,
            dtype=self.dtype,
            want_logits=want_logits,
        )
        self.kv.k, self.kv.v = list(k), list(v)
        return out

    def _tokens(self, rec: CarryRecord, out: jax.Array) -> dict[int, int]:
        """The one device-to-host read of the step path: the sampled tokens, by sequence."""
        t0 = time.perf_counter()
        host = jax.device_get(out)
        self.wait_s += time.perf_counter() - t0
        return {c.seq_id: int(host[i]) for i, (_, c) in enumerate(rec.sample_rows())}

    # -- expert slots ---------------------------------------------------------------------------

    def _layer_experts(self, layer: int) -> tuple[ExpertParams, SlotMap | None]:
        """What a layer's expert kernels take: the model's experts, or their physical slots."""
        if self.expert_slots is None:
            return self.model.params.layers[layer].experts, None
        return self.expert_slots.params(layer)

    def _placed_params(self) -> tuple[Params, tuple[SlotMap, ...] | None]:
        """The params and slot maps a fused pass takes (the model's own without slots)."""
        params = self.model.params
        if self.expert_slots is None:
            return params, None
        placed = [self._layer_experts(i) for i in range(len(params.layers))]
        layers = tuple(
            lp.replace(experts=ep) for lp, (ep, _) in zip(params.layers, placed, strict=True)
        )
        maps = tuple(m for _, m in placed)
        return params.replace(layers=layers), None if maps[0] is None else maps

    def rebalance(self) -> Rebalance | None:
        """Re-place the experts from the counts routed since the last re-placement and move
        their weights (between plans: reads the counts, waiting for the device). None without
        expert slots or without new counts."""
        if self.expert_slots is None:
            return None
        out = self.expert_slots.rebalance(self.expert_load.read())
        if out is not None and out.moved_slots:
            self._params, self._slot_maps = self._placed_params()
            self.kernels = self.kernels  # rebind the expert segments to the moved slots
        return out

    # -- host-built inputs ------------------------------------------------------------------------

    def _meta(self, rec: CarryRecord) -> dict[str, np.ndarray]:
        """Host arrays: handing numpy to a jitted call costs ~1 us a leaf, ``device_put`` ~20."""
        return pass_meta(rec, self.page_size)

    def _padding(self, rows: int) -> tuple[jax.Array, ...]:
        """Row state of ``rows`` padding rows (cached per bucket, never modified)."""
        if rows not in self._empty:
            self._empty[rows] = self.kernels.empty_state(n=rows, cfg=self.cfg, dtype=self.dtype)
        return self._empty[rows]

    def _sample_inputs(self, rec: CarryRecord, sb: int) -> SampleInputs:
        """The sampling knobs of ``rec``'s sampled rows, padded to ``sb`` rows."""
        samples = rec.sample_rows()
        rows, temp = np.zeros(sb, np.int32), np.zeros(sb, np.float32)
        top_k, top_p = np.zeros(sb, np.int32), np.ones(sb, np.float32)
        seeds, steps = np.zeros(sb, np.uint64), np.zeros(sb, np.int32)
        for i, (row, c) in enumerate(samples):
            s = c.sample
            rows[i], temp[i], top_k[i], top_p[i] = row, s.temperature, s.top_k, s.top_p
            seeds[i], steps[i] = s.seed, s.step
        return SampleInputs(rows, temp, top_k, top_p, split_seeds(seeds), steps)

    def _sample_bucket(self, rows: int) -> int:
        """Sampled rows a pass of ``rows`` rows is padded to: its row bucket, up to the batch
        size. Tied to the rows so the fused step does not compile once more per sample count
        (a prefill pass of few prompts projects a few padding rows through the LM head)."""
        return min(bucket(rows), bucket(self.max_batch_size, SAMPLE_BUCKET_MIN))

    def _head_bucket(self, rec: CarryRecord) -> int:
        """Sampled rows the head segment pads to: their own bucket (a prefill pass of one
        prompt projects 8 rows through the LM head, not its whole row bucket), at most the
        fused step's. Its own executable, so this costs a few more head compilations only."""
        return min(
            bucket(len(rec.sample_rows()), SAMPLE_BUCKET_MIN), self._sample_bucket(rec.num_rows)
        )

    def _head_buckets(self, rows: int) -> list[int]:
        return buckets(self._sample_bucket(rows), SAMPLE_BUCKET_MIN)

    def _moved(self, move: Move) -> Carry:
        """A carry holding ``move.record``'s rows, gathered from the carries they are in."""
        nb = bucket(move.record.num_rows)
        to: dict[int, np.ndarray] = {}
        for src, first, dst_first, n in move.parts:
            if src not in to:  # rows not listed are dropped (their index is out of range)
                to[src] = np.full(self.carries[src].num_rows, nb, np.int32)
            to[src][first : first + n] = np.arange(dst_first, dst_first + n, dtype=np.int32)
        state = self._padding(nb)
        for src, index in to.items():
            state = self.kernels.scatter(state, self.carries[src].state, index)
        return Carry(**dict(zip(STATE_FIELDS, state, strict=True)), **self._meta(move.record))

    def _bound_lookahead(self, marker: jax.Array) -> None:
        """JAX dispatch is asynchronous; never run more than ``lookahead`` segments ahead of
        the device, so a preemption decided now takes effect within that many segments."""
        self._inflight.append(marker)
        if len(self._inflight) > self.lookahead:
            t0 = time.perf_counter()
            while len(self._inflight) > self.lookahead:
                self._inflight.popleft().block_until_ready()
            self.wait_s += time.perf_counter() - t0

    # -- saving and restoring requests (durable jobs) ---------------------------------------------
    # Called between plans, off the step path: each export is one explicit device-to-host copy.

    def export_kv(self, pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of KV pages, every layer: k, v [L, len(pages), page_size, Hkv, hd]."""
        self._inflight.clear()  # the copy waits for the device anyway
        return self.kv.read_pages(pages)

    def import_kv(self, pages: Sequence[int], k: np.ndarray, v: np.ndarray) -> None:
        """Write saved pages (``export_kv``'s arrays) into ``pages``, which may differ from the
        pages they came from: restored requests get fresh page ids."""
        self.kv.write_pages(pages, k, v)

    def export_rows(
        self, seq_ids: Iterable[int]
    ) -> list[tuple[CarryRecord, dict[str, np.ndarray]]]:
        """The rows of ``seq_ids`` in every carry holding any of them, as if they had been
        split off into a pass of their own at the carry's cursor: its record (chunks in row
        order) and the row state of just those rows (host arrays [rows, ...] per field).
        The carries themselves are left as they are."""
        wanted, out = set(seq_ids), []
        for pid, rec in self.ledger.carries.items():
            mine = [(off, c) for off, c in zip(rec.offsets, rec.chunks) if c.seq_id in wanted]
            if not mine:
                continue
            rows = np.concatenate([np.arange(off, off + c.num_tokens) for off, c in mine])
            state = jax.device_get(self.carries[pid].state)
            arrays = {f: np.asarray(x)[rows] for f, x in zip(STATE_FIELDS, state, strict=True)}
            out.append((CarryRecord(rec.cursor, tuple(c for _, c in mine)), arrays))
        return out

    def check_rows(self, num_rows: int, state: dict[str, np.ndarray]) -> None:
        """Raise ``ValueError`` unless ``state`` holds ``num_rows`` rows of this model's row
        state (fields, shapes and dtypes), as ``import_rows`` needs."""
        for name, pad in zip(STATE_FIELDS, self._padding(bucket(num_rows)), strict=True):
            x = state.get(name)
            want = (num_rows, *pad.shape[1:])
            if x is None or x.shape != want or x.dtype != pad.dtype:
                got = "nothing" if x is None else f"{x.dtype}{list(x.shape)}"
                need = f"{pad.dtype}{list(want)}"
                raise ValueError(f"carry field {name}: saved {got}, this model needs {need}")

    def import_rows(self, pass_id: int, rec: CarryRecord, state: dict[str, np.ndarray]) -> None:
        """Hold a parked pass ``pass_id`` at ``rec.cursor`` with ``rec``'s rows and their saved
        row state (``export_rows``' arrays; its chunks may name new sequences and pages)."""
        self.check_rows(rec.num_rows, state)
        fields = {}
        for name, pad in zip(STATE_FIELDS, self._padding(bucket(rec.num_rows)), strict=True):
            full = np.array(jax.device_get(pad))  # padding rows exactly as a new carry has them
            full[: rec.num_rows] = state[name]
            fields[name] = jax.device_put(full, self._replicated)
        self.ledger.restore(pass_id, rec)
        self.carries[pass_id] = Carry(**fields, **self._meta(rec))

    # -- faults -----------------------------------------------------------------------------------

    def _recover(self, plan: Plan, finished: CarryRecord | None, err: Exception) -> StepResult:
        """Fail the rows ``plan`` touched and any carry the error poisoned; rebuild the KV cache
        if it was lost. Off the step path, so it may wait on the device."""
        message = result_message(err)
        self._inflight.clear()
        failed: dict[int, str] = {}

        def fail(rec: CarryRecord | None) -> None:
            failed.update({c.seq_id: message for c in rec.chunks} if rec else {})

        if plan.runs:
            for pid in (plan.pass_id, *plan.absorb):
                self.carries.pop(pid, None)
            fail(self.ledger.drop(plan.pass_id) or finished)
        for pid in list(self.ledger.carries):
            if not _healthy(self.carries.get(pid)):
                self.carries.pop(pid, None)
                fail(self.ledger.drop(pid))
        if not _healthy(self.expert_load.counts):
            self.expert_load.reset()  # poisoned with the failed call: the device counts restart
        if all(_healthy(x) for x in (*self.kv.k, *self.kv.v)):
            return StepResult(failed=failed)
        self.ledger.clear()
        self.carries.clear()
        self.kv = KVCache.create(
            self.cfg, self.num_pages, self.page_size, self.dtype, self._kv_sharding
        )
        self.num_resets += 1
        return StepResult(failed=failed, reset=True)

    # -- the set of executables -------------------------------------------------------------------

    def signatures(
        self,
        max_rows: int | None = None,
        max_context: int | None = None,
        kernels: Iterable[str] | None = None,
        min_context: int = 1,
    ) -> list[Signature]:
        """Every executable a plan can need, given the configured bounds (or the tighter
        ``max_rows`` per pass and ``max_context`` tokens per sequence of a known workload, and
        ``min_context``: the fewest tokens the longest sequence of any pass holds up to its
        chunk's end), of every kernel or of the named ``kernels``. Rows read only their own
        sequence's pages, so the page bucket follows the longest sequence of a pass, not how
        many it holds."""
        rows = buckets(min(max_rows or self.max_rows, self.max_rows), ROW_BUCKET_MIN)
        ctx = min(max_context or self.max_model_len, self.max_model_len)
        # a row reads its sequence's keys up to its own position: at most ctx of them
        most_pages = min(self.num_pages - 1, max(1, math.ceil(ctx / self.page_size)))
        least = bucket(math.ceil(max(min_context, 1) / self.page_size), PAGE_BUCKET_MIN)
        pages = [p for p in buckets(most_pages, PAGE_BUCKET_MIN) if p >= least]
        windows = sorted(set(self.cfg.sliding_windows), key=lambda w: (w is not None, w or 0))
        kinds = {s.kind for s in self.segments}
        out = []
        for n in rows:
            out += [Signature("embed", n), Signature("empty_state", n), Signature("experts", n)]
            out += [Signature("shared", n)] if "shared" in kinds else []
            out += [Signature("scatter", n, src_rows=m) for m in rows]
            out += [Signature("head", n, samples=sb) for sb in self._head_buckets(n)]
            for p in pages:
                out += [Signature("attention", n, p, window=w) for w in windows]
                out += [Signature("fused", n, p, self._sample_bucket(n))]
        if self.swap_pages:  # one gather (out) and one scatter (in) per bucket of pages
            most = min(self.num_pages - 1, self.swap_pages)
            for n in buckets(most, PAGE_IO_BUCKET_MIN):
                out += [Signature("swap_out", n), Signature("swap_in", n)]
        wanted = set(kernels) if kernels is not None else None
        return [s for s in out if wanted is None or s.kernel in wanted]

    def warmup(
        self,
        max_rows: int | None = None,
        max_context: int | None = None,
        kernels: Iterable[str] | None = None,
        min_context: int = 1,
    ) -> int:
        """Compile (by running once on padding rows) every executable of ``signatures``,
        or those of the named ``kernels``. Returns how many were run. Padding rows write only
        the scratch page, so no request's KV changes."""
        sigs = self.signatures(max_rows, max_context, kernels, min_context)
        _check_map_room(sum(s.kernel == "fused" for s in sigs))
        for sig in sigs:
            self._warm(sig)
        if self.expert_slots is not None:
            self.expert_slots.warmup()
        jax.block_until_ready((self.kv.k, self.kv.v))
        return len(sigs)

    def _warm(self, sig: Signature) -> None:
        k, n, cfg = self.kernels, sig.rows, self.cfg
        if sig.kernel in ("swap_out", "swap_in"):  # n pages: the scratch page, unchanged
            saved = self.kv.read_pages([0] * n)
            if sig.kernel == "swap_in":
                self.kv.write_pages([0] * n, *saved)
            return
        state = self._padding(n)
        if sig.kernel == "embed":
            k.embed(self.model.params.embed, np.zeros(n, np.int32))
        elif sig.kernel == "experts":
            ep, slots = self._layer_experts(0)
            if slots is None:
                ep = ep.group(0, self.group_size)
            counts = self.expert_load.counts  # padding rows count nothing: left as it is
            k.experts(
                ep, *state[1:4], state[4], np.int32(0), self.group_size, counts, np.int32(0), slots
            )
        elif sig.kernel == "shared":
            k.shared(self.model.params.layers[0].shared, state[1], state[4])
        elif sig.kernel == "scatter":
            k.scatter(state, self._padding(sig.src_rows), np.full(sig.src_rows, n, np.int32))
        elif sig.kernel == "head":
            k.head(self._head_params, state[0], state[4], _dummy_samples(sig.samples), cfg)
        elif sig.kernel == "attention":
            fields = dict(zip(STATE_FIELDS, state, strict=True)) | _dummy_meta(n, sig.pages)
            carry = Carry(**fields)
            layer = cfg.sliding_windows.index(sig.window)
            out = k.attention(
                self.model.params.layers[layer].attn,
                self.kv.k[layer],
                self.kv.v[layer],
                carry,
                cfg=cfg,
                window=sig.window,
                page_size=self.page_size,
            )
            self.kv.k[layer], self.kv.v[layer] = out[-2:]
        elif sig.kernel == "fused":
            out, kk, vv, _ = k.fused(
                self._params,
                self._head_params,
                tuple(self.kv.k),
                tuple(self.kv.v),
                np.zeros(n, np.int32),
                _dummy_meta(n, sig.pages),
                _dummy_samples(sig.samples),
                self.expert_load.counts,
                self._slot_maps,
                cfg=cfg,
                page_size=self.page_size,
                dtype=self.dtype,
                want_logits=False,  # as _fused passes it: jit keys on the keywords given
            )
            self.kv.k, self.kv.v = list(kk), list(vv)


# XLA:CPU maps each kernel of an executable into its own memory regions: a fused pass of a
# small 4-layer model took ~400 (measured); Linux allows vm.max_map_count (65530) a process.
_MAPS_PER_FUSED = 400


def _check_map_room(fused: int) -> None:
    """Refuse a warm-up whose fused executables would exhaust the process's memory maps (an
    LLVM "Cannot allocate memory" and a crash), with what to do instead."""
    if jax.default_backend() != "cpu" or not fused:
        return
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        used = Path("/proc/self/maps").read_text().count("\n")
    except OSError:  # not Linux
        return
    if used + fused * _MAPS_PER_FUSED > limit:
        raise ValueError(
            f"warming {fused} fused executables needs about {fused * _MAPS_PER_FUSED} memory "
            f"maps; this process has {limit - used} left (vm.max_map_count={limit}). Narrow "
            "the warm-up (max_rows=, max_context=), use mode='segmented', or raise "
            "vm.max_map_count"
        )


def result_message(err: Exception) -> str:
    """How a failed request's error reads."""
    return f"{type(err).__name__}: {err}"


def _healthy(x) -> bool:
    """Whether device value ``x`` (a pytree) exists and computed without error."""
    if x is None:
        return False
    try:
        leaves = jax.tree_util.tree_leaves(x)
        if any(leaf.is_deleted() for leaf in leaves if isinstance(leaf, jax.Array)):
            return False
        jax.block_until_ready(leaves)
    except Exception:  # noqa: BLE001 -- any error means the value is lost
        return False
    return True


def _dummy_meta(rows: int, pages: int) -> dict[str, np.ndarray]:
    """Metadata of a carry of padding rows over padding pages."""
    return dict(
        positions=np.zeros(rows, np.int32),
        valid=np.zeros(rows, bool),
        write_slot=np.zeros(rows, np.int32),
        pages=np.zeros((rows, pages), np.int32),
    )


def _dummy_samples(n: int) -> SampleInputs:
    return SampleInputs(
        np.zeros(n, np.int32),
        np.zeros(n, np.float32),
        np.zeros(n, np.int32),
        np.ones(n, np.float32),
        np.zeros((n, 2), np.uint32),
        np.zeros(n, np.int32),
    )
