"""The engine: tokenizer + scheduler + executor, one synchronous host loop.

``Engine.step()`` asks the scheduler for a plan, runs it on the executor (fused in one jit, or
segment by segment), hands the sampled tokens back to the scheduler and reports the requests
that advanced. ``LLM`` (offline, vLLM-shaped) drives the same engine to completion.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import jax
import numpy as np

from qllm_jax.carry import PAGE_BUCKET_MIN, Carry, bucket, split_rows
from qllm_jax.carry import merge as merge_carries
from qllm_jax.executor import Executor, RowChunk, SampleSpec
from qllm_jax.kv_cache import pages_for_budget
from qllm_jax.models import Model, load
from qllm_jax.scheduler import Plan, Request, SamplingParams, Scheduler, SchedulerConfig
from qllm_jax.scheduler.core import PRESETS, Granularity, Policy
from qllm_jax.scheduler.plan import Chunk, default_group_size

Prompt = str | Sequence[int]
Mode = Literal["fused", "segmented"]
_CPU_DEFAULT_KV_BYTES = 256 << 20  # when the device cannot report its free memory


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (the engine's clock, seconds) and preemption counters of a request."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_preemptions: int = 0
    parked_time: float = 0.0


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every token generated so far
    text: str | None  # detokenized ``token_ids`` when the model has a tokenizer
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    metrics: RequestMetrics


def enable_compilation_cache(cache_dir: str | os.PathLike | None) -> None:
    """Persist compiled executables across processes (JAX's persistent compilation cache)."""
    if cache_dir is None:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def default_cache_dir() -> Path:
    root = os.environ.get("QLLM_JAX_CACHE") or Path.home() / ".cache" / "qllm-jax"
    return Path(root) / "jax-compilation-cache"


class Engine:
    """Serve requests on one model. See the README for the knobs."""

    def __init__(
        self,
        model: str | os.PathLike | Model,
        *,
        dtype: str = "auto",
        policy: Policy = "qllm",
        granularity: Granularity = "expert",
        preset: str | None = None,
        mode: Mode | None = None,
        max_batch_size: int = 32,
        max_num_batched_tokens: int = 512,
        max_model_len: int | None = None,
        kv_pages: int | None = None,
        kv_bytes: int | None = None,
        page_size: int = 16,
        expert_group_size: int | None = None,
        prefill_chunk: int | None = None,
        aging_s: float | None = 10.0,
        max_park_s: float | None = 5.0,
        absorb_be: bool = False,
        preempt_prefill: bool = True,
        lookahead: int = 2,
        seed: int = 0,
        compilation_cache_dir: str | os.PathLike | None | Literal["default"] = "default",
        clock=time.monotonic,
        **scheduler_options,
    ) -> None:
        """``scheduler_options``: any further ``SchedulerConfig`` field (``mix_classes``,
        ``rejoin_parked``, ``split_mixed``)."""
        unknown = set(scheduler_options) - {f.name for f in dataclasses.fields(SchedulerConfig)}
        if unknown:
            raise TypeError(f"unknown Engine option(s): {', '.join(sorted(unknown))}")
        knobs = dict(
            policy=policy,
            granularity=granularity,
            aging_s=aging_s,
            max_park_s=max_park_s,
            absorb_be=absorb_be,
            preempt_prefill=preempt_prefill,
            **scheduler_options,
        )
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
            knobs |= PRESETS[preset]
        if mode is None:
            mode = "segmented" if knobs["policy"] == "qllm" else "fused"
        if mode not in ("fused", "segmented"):
            raise ValueError(f"mode must be 'fused' or 'segmented', got {mode!r}")
        if mode == "fused" and knobs["policy"] == "qllm":
            raise ValueError("the qllm policy preempts between segments: use mode='segmented'")
        if compilation_cache_dir == "default":
            compilation_cache_dir = default_cache_dir()
        enable_compilation_cache(compilation_cache_dir)
        self.model = model if isinstance(model, Model) else load(model, dtype=dtype)
        cfg = self.model.config
        self.mode = mode
        max_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if kv_pages is None:
            if kv_bytes is None and jax.devices()[0].memory_stats() is None:
                kv_bytes = _CPU_DEFAULT_KV_BYTES
            kv_pages = pages_for_budget(cfg, page_size, self.model.dtype, kv_bytes)
        if expert_group_size is None:
            expert_group_size = default_group_size(cfg.num_experts, knobs["granularity"])
        self.executor = Executor(self.model, kv_pages, page_size, expert_group_size, lookahead)
        self.scheduler = Scheduler(
            SchedulerConfig(
                page_size=page_size,
                num_pages=kv_pages,
                max_model_len=max_len,
                max_batch_size=max_batch_size,
                max_num_batched_tokens=max_num_batched_tokens,
                prefill_chunk=prefill_chunk,
                eos_token_ids=cfg.eos_token_ids,
                **knobs,
            ),
            self.executor.schedule,
            clock=clock,
        )
        self.carries: dict[int, Carry] = {}  # live passes' carries, parked ones included
        self.clock = clock
        self._rng = random.Random(seed)
        self._seq_ids = itertools.count()
        self._ids = itertools.count()
        self.num_steps = 0

    @property
    def tokenizer(self):
        return self.model.tokenizer

    # -- requests -------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token id lists")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("empty prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        return ids

    def add_request(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. ``priority``: lower is more urgent (0 = LS)."""
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if not isinstance(priority, int):
            raise TypeError(f"priority must be an int, got {priority!r}")
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        req = Request(
            request_id=rid,
            seq_id=next(self._seq_ids),
            prompt_token_ids=self.encode(prompt),
            sampling=sampling,
            seed=sampling.seed if sampling.seed is not None else self._rng.getrandbits(32),
            priority=priority,
            arrival_time=self.clock() if arrival_time is None else arrival_time,
        )
        self.scheduler.add(req)
        return rid

    def abort(self, request_id: str) -> bool:
        """Abort a request, drop its rows from any pass (parked or not) and free its KV pages.
        False if it was unknown or already done."""
        result = self.scheduler.abort(str(request_id))
        if result is None:
            return False
        req, pass_id, gone = result
        if pass_id in self.carries:
            if gone:
                del self.carries[pass_id]
            else:
                carry = self.carries[pass_id]
                seq = np.asarray(carry.seq)
                self.carries[pass_id] = _select(carry, (seq >= 0) & (seq != req.seq_id))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one pass; return the requests that advanced (tokens so far, finished or not)."""
        plan = self.scheduler.schedule()
        if plan is None:
            return []
        tokens = self._execute(plan)
        self.num_steps += 1
        return [self.output(r) for r in self.scheduler.update(plan, tokens)]

    def _execute(self, plan: Plan) -> dict[str, int]:
        """Carry out a plan on the executor; the tokens of a pass that reached the head."""
        ex = self.executor
        if plan.fused and self.mode == "fused":
            inputs, samples = ex.build_inputs([_row_chunk(c) for c in plan.new])
            return _tokens(plan, np.asarray(ex.run_fused(inputs, samples)))
        if plan.new is not None:
            inputs, _ = ex.build_inputs([_row_chunk(c) for c in plan.new])
            self.carries[plan.pass_id] = ex.start(inputs)
        carry = self.carries.pop(plan.pass_id)
        if plan.absorb:
            carry = _merge([carry, *(self.carries.pop(a) for a in plan.absorb)])
        if plan.split_seq_ids:
            seq = np.asarray(carry.seq)
            moved = np.isin(seq, plan.split_seq_ids)
            self.carries[plan.split_pass_id] = _select(carry, moved)
            carry = _select(carry, (seq >= 0) & ~moved)
        carry, _ = ex.advance(carry, plan.cursor, plan.num_segments)
        if not plan.finishes:
            self.carries[plan.pass_id] = carry
            return {}
        chunks = [_row_chunk(c) for c in plan.chunks]
        return _tokens(plan, np.asarray(ex.finish(carry, ex.sample_inputs_for(carry, chunks))))

    def output(self, req: Request) -> RequestOutput:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)
        return RequestOutput(
            request_id=req.request_id,
            prompt_token_ids=list(req.prompt_token_ids),
            token_ids=list(req.output_token_ids),
            text=text,
            finished=req.status.done,
            finish_reason=req.finish_reason,
            metrics=RequestMetrics(
                req.arrival_time,
                req.first_token_time,
                req.finish_time,
                req.num_preemptions,
                req.parked_time,
            ),
        )

    def stats(self) -> dict:
        """Engine counters: KV pages, queue sizes, preemptions by granularity, parked rows."""
        sched = self.scheduler
        alloc = sched.allocator
        waits = sorted(sched.preempt_waits)
        return {
            "kv_pages_total": alloc.num_pages - 1,
            "kv_pages_used": alloc.num_used,
            "kv_pages_free": alloc.num_free,
            "waiting": len(sched.waiting),
            "running": len(sched.admitted),
            "passes_live": len(sched.passes),
            "parked_rows": sched.parked_rows(),
            "steps": self.num_steps,
            "segments_run": self.executor.segments_run,
            "preemptions_layer": sched.stats["preemptions_layer"],
            "preemptions_expert": sched.stats["preemptions_expert"],
            "splits": sched.stats["splits"],
            "absorbed_passes": sched.stats["absorbed_passes"],
            "evictions": sched.stats["evictions"],
            "preempt_wait_s_max": waits[-1] if waits else None,
        }


def _row_chunk(chunk: Chunk) -> RowChunk:
    req, spec = chunk.request, None
    if chunk.samples:
        sp = req.sampling
        spec = SampleSpec(sp.temperature, sp.top_k, sp.top_p, req.seed, len(req.output_token_ids))
    tokens = tuple(req.all_token_ids[chunk.start : chunk.end])
    return RowChunk(req.seq_id, tokens, chunk.start, tuple(req.pages), spec)


def _tokens(plan: Plan, out: np.ndarray) -> dict[str, int]:
    """Map the head's outputs (in sampling-chunk order) to request ids."""
    sampling = [c.request.request_id for c in plan.chunks if c.samples]
    return {rid: int(t) for rid, t in zip(sampling, out, strict=False)}


def _select(carry: Carry, rows: np.ndarray) -> Carry:
    """The carry restricted to some rows (a bool mask) and their sequences' key pages."""
    idx = np.nonzero(rows)[0]
    n_keys = int(np.isin(np.asarray(carry.key_seq), np.asarray(carry.seq)[idx]).sum())
    return split_rows(carry, idx, bucket(len(idx)), bucket(n_keys, PAGE_BUCKET_MIN))


def _merge(carries: list[Carry]) -> Carry:
    rows = sum(int(np.asarray(c.valid).sum()) for c in carries)
    keys = sum(int((np.asarray(c.key_seq) >= 0).sum()) for c in carries)
    return merge_carries(carries, bucket(rows), bucket(keys, PAGE_BUCKET_MIN))
