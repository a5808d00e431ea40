"""The executor: the only code that touches device arrays.

It owns the params, the paged KV cache and the segment schedule of one model, and advances a
pass one segment at a time (``advance``) or runs it whole in one jit (``run_fused``). A pass's
cursor is an index into ``schedule``; ``cursor_of`` turns it into the (layer, stage) pair of the
design (stage 0 = attention, 1.. = expert groups, then the shared expert). Host inputs are built
from plain-Python descriptions of the rows (``RowChunk``), so the scheduler never sees JAX.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qllm_jax.carry import PAGE_BUCKET_MIN, SAMPLE_BUCKET_MIN, Carry, bucket
from qllm_jax.kv_cache import KVCache
from qllm_jax.models import Model
from qllm_jax.scheduler.plan import Segment, segment_schedule
from qllm_jax.segments import (
    PassInputs,
    SampleInputs,
    attention_segment,
    embed_segment,
    experts_segment,
    fused_step,
    head_logits_segment,
    head_params,
    head_segment,
    shared_segment,
)


@dataclasses.dataclass(frozen=True)
class RowChunk:
    """Consecutive tokens of one sequence fed in a pass (a prefill chunk, or one decode token).

    ``sample`` carries the sampling knobs when the chunk's last row produces a new token.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start: int  # position of the first token
    pages: tuple[int, ...]  # the sequence's KV pages (enough for start + len(token_ids))
    sample: SampleSpec | None = None


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    temperature: float
    top_k: int
    top_p: float
    seed: int
    step: int  # index of the token being sampled in the request's output


class Executor:
    """Runs passes of one model over its paged KV cache."""

    def __init__(
        self,
        model: Model,
        num_pages: int,
        page_size: int,
        expert_group_size: int | None = None,
        lookahead: int = 2,
    ) -> None:
        cfg = model.config
        group = cfg.num_experts if expert_group_size is None else expert_group_size
        if page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size}")
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        self.model = model
        self.cfg = cfg
        self.page_size = page_size
        self.group_size = group
        self.lookahead = lookahead
        self.dtype = jnp.dtype(model.dtype)
        self.kv = KVCache.create(cfg, num_pages, page_size, self.dtype)
        self.schedule: list[Segment] = segment_schedule(
            cfg.num_layers, cfg.num_experts, group, bool(cfg.shared_intermediate_size)
        )
        self._head = head_params(model.params)
        self._inflight: collections.deque[jax.Array] = collections.deque()
        self.segments_run = 0

    # -- host inputs ----------------------------------------------------------------------------

    def build_inputs(self, chunks: list[RowChunk]) -> tuple[PassInputs, SampleInputs]:
        """Pad a pass's rows and key pages to buckets; pick the rows that sample."""
        ps = self.page_size
        n = sum(len(c.token_ids) for c in chunks)
        key_counts = [math.ceil((c.start + len(c.token_ids)) / ps) for c in chunks]
        nb, pb = bucket(n), bucket(sum(key_counts), PAGE_BUCKET_MIN)
        tok, pos, seq = np.zeros(nb, np.int32), np.zeros(nb, np.int32), np.full(nb, -1, np.int32)
        valid, slot = np.zeros(nb, bool), np.zeros(nb, np.int32)
        kp, kseq, kbase = np.zeros(pb, np.int32), np.full(pb, -1, np.int32), np.zeros(pb, np.int32)
        samples: list[tuple[int, SampleSpec]] = []
        r = k = 0
        for c, nk in zip(chunks, key_counts, strict=True):
            m = len(c.token_ids)
            if len(c.pages) < nk:
                raise ValueError(f"sequence {c.seq_id} has {len(c.pages)} pages, needs {nk}")
            p = np.arange(c.start, c.start + m, dtype=np.int32)
            pages = np.asarray(c.pages, np.int32)
            tok[r : r + m], pos[r : r + m], seq[r : r + m] = c.token_ids, p, c.seq_id
            valid[r : r + m] = True
            slot[r : r + m] = pages[p // ps] * ps + p % ps
            kp[k : k + nk], kseq[k : k + nk] = pages[:nk], c.seq_id
            kbase[k : k + nk] = np.arange(nk, dtype=np.int32) * ps
            if c.sample is not None:
                samples.append((r + m - 1, c.sample))
            r, k = r + m, k + nk
        inputs = PassInputs(tok, pos, seq, valid, slot, kp, kseq, kbase)
        return inputs, self._sample_inputs(samples)

    @staticmethod
    def _sample_inputs(samples: list[tuple[int, SampleSpec]]) -> SampleInputs:
        sb = bucket(len(samples), SAMPLE_BUCKET_MIN)
        rows, temp = np.zeros(sb, np.int32), np.zeros(sb, np.float32)
        top_k, top_p = np.zeros(sb, np.int32), np.ones(sb, np.float32)
        seeds, steps = np.zeros(sb, np.uint32), np.zeros(sb, np.int32)
        for i, (row, s) in enumerate(samples):
            rows[i], temp[i], top_k[i], top_p[i] = row, s.temperature, s.top_k, s.top_p
            seeds[i], steps[i] = s.seed % (1 << 32), s.step
        return SampleInputs(rows, temp, top_k, top_p, seeds, steps)

    def sample_inputs_for(self, carry: Carry, chunks: list[RowChunk]) -> SampleInputs:
        """Sampling inputs for a carry whose rows were reordered by merges and splits: each
        sampling chunk's row is found by (sequence, position)."""
        seq, pos = np.asarray(carry.seq), np.asarray(carry.positions)
        row_of = {(int(s), int(p)): i for i, (s, p) in enumerate(zip(seq, pos)) if s >= 0}
        samples = [
            (row_of[(c.seq_id, c.start + len(c.token_ids) - 1)], c.sample)
            for c in chunks
            if c.sample is not None
        ]
        return self._sample_inputs(samples)

    # -- running --------------------------------------------------------------------------------

    def run_fused(self, inputs: PassInputs, samples: SampleInputs, want_logits: bool = False):
        """A whole pass in one jit. Returns tokens [S] (or logits [S, V]) as a device array."""
        out, k, v = fused_step(
            self.model.params,
            tuple(self.kv.k),
            tuple(self.kv.v),
            inputs,
            samples,
            cfg=self.cfg,
            page_size=self.page_size,
            dtype=self.dtype,
            want_logits=want_logits,
        )
        self.kv.k, self.kv.v = list(k), list(v)
        return out

    def start(self, inputs: PassInputs) -> Carry:
        """The embed segment: a fresh carry at cursor 0."""
        return embed_segment(self.model.params.embed, self.cfg, inputs, self.dtype)

    def advance(self, carry: Carry, cursor: int, num_segments: int) -> tuple[Carry, int]:
        """Run up to ``num_segments`` segments from ``cursor``, stopping before the head."""
        end = min(cursor + num_segments, len(self.schedule) - 1)
        while cursor < end:
            carry = self._run(self.schedule[cursor], carry)
            cursor += 1
        return carry, cursor

    def finish(self, carry: Carry, samples: SampleInputs, want_logits: bool = False) -> jax.Array:
        """The head segment: sampled tokens [S] (or logits [S, V]) of a pass at the last cursor."""
        if want_logits:
            return head_logits_segment(self._head, carry, samples.rows, self.cfg)
        return head_segment(self._head, carry, samples, self.cfg)

    def run_segmented(self, inputs: PassInputs, samples: SampleInputs, want_logits=False):
        """A whole pass, one segment at a time (what the preemptive scheduler interleaves)."""
        carry, _ = self.advance(self.start(inputs), 0, len(self.schedule))
        return self.finish(carry, samples, want_logits)

    def _run(self, seg: Segment, carry: Carry) -> Carry:
        lp = self.model.params.layers[seg.layer]
        if seg.kind == "attention":
            window = self.cfg.sliding_windows[seg.layer]
            carry, self.kv.k[seg.layer], self.kv.v[seg.layer] = attention_segment(
                lp.attn,
                self.kv.k[seg.layer],
                self.kv.v[seg.layer],
                carry,
                cfg=self.cfg,
                window=window,
                page_size=self.page_size,
            )
        elif seg.kind == "experts":
            start = np.int32(seg.group_start)
            carry = experts_segment(lp.experts, carry, start, group_size=seg.group_size)
        elif seg.kind == "shared":
            carry = shared_segment(lp.shared, carry)
        else:
            raise ValueError(f"cannot advance through a {seg.kind} segment")
        self.segments_run += 1
        self._bound_lookahead(carry.h)
        return carry

    def _bound_lookahead(self, marker: jax.Array) -> None:
        """JAX dispatch is asynchronous; never run more than ``lookahead`` segments ahead of
        the device, so a preemption decided now takes effect within that many segments."""
        self._inflight.append(marker)
        while len(self._inflight) > self.lookahead:
            self._inflight.popleft().block_until_ready()

    def cursor_of(self, cursor: int) -> tuple[int, int]:
        seg = self.schedule[cursor]
        return seg.layer, seg.stage
