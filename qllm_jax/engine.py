"""The engine: tokenizer + scheduler + executor, one synchronous host loop.

``Engine.step()`` is three calls: ``plan = scheduler.schedule()``, ``result =
executor.execute(plan)``, ``scheduler.update(plan, result)``; it reports the requests that
advanced or ended. Inputs are validated at the door (``add_request``), so a bad request is
refused before it reaches the scheduler, and a fault while executing fails only the requests it
touched (``finish_reason="error"``). ``LLM`` (offline, vLLM-shaped) drives the same engine.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh

from qllm_jax import compile_log
from qllm_jax import mesh as mesh_lib
from qllm_jax.eplb import check_eplb_options
from qllm_jax.executor import SEGMENT_KERNELS, SWAP_KERNELS, Executor
from qllm_jax.kv_cache import page_bytes, pages_for_budget
from qllm_jax.models import Model, check_quantize, load
from qllm_jax.models.config import read_config
from qllm_jax.scheduler import Request, SamplingParams, Scheduler, SchedulerConfig
from qllm_jax.scheduler.plan import default_group_size
from qllm_jax.scheduler.sampling_params import is_int

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
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    metrics: RequestMetrics
    priority: int = 0
    error: str | None = None  # what went wrong, with finish_reason "error"
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (vLLM's)


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
    """Serve requests on one model. See the README for the knobs.

    ``scheduler_options`` are ``SchedulerConfig`` fields (``policy``, ``granularity``,
    ``max_batch_size``, ``max_num_batched_tokens``, ``prefill_chunk``, ``aging_s``,
    ``max_park_s``, ``absorb_be``, ``preempt_prefill``, ``mix_classes``, ``mix_decodes``,
    ``rejoin_parked``, ``split_mixed``, ``prefill_first``, ``enable_prefix_caching``,
    ``queue_order``, ``age_after_s``, ``grow_pages``, ``swap_pages``) plus ``preset`` (a named
    set of them; explicit options win); their defaults are ``SchedulerConfig``'s.
    ``swap_space``: GiB of host memory for the KV pages of evicted requests (vLLM's name; sets
    ``swap_pages``): they are copied back when the request is readmitted instead of
    recomputed.

    Expert load (``qllm_jax.eplb``): routed-token counts per layer and expert are kept on the
    device and read back every ``expert_stats_every`` steps (0: never; ``stats()["expert_load"]``).
    ``redundant_experts`` extra slots per layer hold copies of hot experts, and the experts are
    re-placed over ``eplb_ranks`` ranks every ``rebalance_every`` steps (0: never) from the
    counts since the last re-placement.

    ``expert_parallel`` / ``tensor_parallel``: shard the model over that many devices on the
    mesh's ``"expert"`` and ``"tensor"`` axes (``qllm_jax.mesh``), or pass ``mesh=`` (a
    ``jax.sharding.Mesh`` with those axis names). 1 and 1 is the single-device path. int8
    weights and expert placement work on a mesh too; there the placement's ranks are the
    ``"expert"`` axis's devices, which must divide ``num_experts + redundant_experts``.
    """

    def __init__(
        self,
        model: str | os.PathLike | Model,
        *,
        dtype: str = "auto",
        quantize: str | None = None,
        mode: Mode | None = None,
        max_model_len: int | None = None,
        kv_pages: int | None = None,
        kv_bytes: int | None = None,
        page_size: int = 16,
        swap_space: float = 0,
        expert_group_size: int | None = None,
        lookahead: int = 2,
        redundant_experts: int = 0,
        rebalance_every: int = 0,
        eplb_ranks: int = 1,
        expert_stats_every: int = 100,
        expert_parallel: int = 1,
        tensor_parallel: int = 1,
        mesh: Mesh | None = None,
        seed: int = 0,
        compilation_cache_dir: str | os.PathLike | None | Literal["default"] = "default",
        clock=time.monotonic,
        **scheduler_options,
    ) -> None:
        _check_engine_args(max_model_len, kv_pages, kv_bytes, page_size, swap_space)
        if mode not in (None, "fused", "segmented"):
            raise ValueError(f"mode must be 'fused' or 'segmented', got {mode!r}")
        if compilation_cache_dir == "default":
            compilation_cache_dir = default_cache_dir()
        enable_compilation_cache(compilation_cache_dir)
        if not is_int(expert_stats_every) or expert_stats_every < 0:
            raise ValueError(f"expert_stats_every must be an int >= 0, got {expert_stats_every!r}")
        self.mesh = _engine_mesh(model, expert_parallel, tensor_parallel, mesh)
        self.model = _placed_model(model, dtype, quantize, self.mesh)
        cfg = self.model.config
        check_eplb_options(cfg.num_experts, redundant_experts, rebalance_every, eplb_ranks)
        self.rebalance_every = rebalance_every
        self.expert_stats_every = expert_stats_every
        if max_model_len is not None and max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_model_len} exceeds the model's "
                f"max_position_embeddings={cfg.max_position_embeddings}"
            )
        max_len = max_model_len or cfg.max_position_embeddings
        if kv_pages is None:
            if kv_bytes is None and jax.devices()[0].memory_stats() is None:
                kv_bytes = _CPU_DEFAULT_KV_BYTES
            kv_pages = pages_for_budget(
                cfg, page_size, self.model.dtype, kv_bytes, shards=mesh_lib.kv_shards(self.mesh)
            )
        if swap_space:
            if "swap_pages" in scheduler_options:
                raise ValueError("give swap_space (GiB) or swap_pages, not both")
            per_page = page_bytes(cfg, page_size, self.model.dtype)  # host copies are whole
            scheduler_options["swap_pages"] = int(swap_space * 2**30) // per_page
        config = SchedulerConfig.from_options(
            page_size=page_size,
            num_pages=kv_pages,
            max_model_len=max_len,
            eos_token_ids=cfg.eos_token_ids,
            **scheduler_options,
        )
        self.mode: Mode = mode or ("segmented" if config.policy == "qllm" else "fused")
        if self.mode == "fused" and config.policy == "qllm":
            raise ValueError("the qllm policy preempts between segments: use mode='segmented'")
        if self.mesh is not None:
            ep = self.mesh.shape[mesh_lib.EXPERT]
            expert_group_size = mesh_lib.group_size(
                cfg.num_experts, config.granularity, ep, expert_group_size
            )
        elif expert_group_size is None:
            expert_group_size = default_group_size(cfg.num_experts, config.granularity)
        self.executor = Executor(
            self.model,
            kv_pages,
            page_size,
            max_batch_size=config.max_batch_size,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=max_len,
            expert_group_size=expert_group_size,
            lookahead=lookahead,
            mode=self.mode,
            swap_pages=config.swap_pages,
            eplb=bool(redundant_experts or rebalance_every),
            redundant_experts=redundant_experts,
            eplb_ranks=eplb_ranks,
            mesh=self.mesh,
        )
        self.scheduler = Scheduler(config, self.executor.segments, clock=clock)
        self.clock = clock
        self._rng = random.Random(seed)
        self._seq_ids = itertools.count()
        self._ids = itertools.count()
        self._ended: list[RequestOutput] = []  # aborted requests, reported by the next step
        self._owners: dict[str, Callable[[RequestOutput], None]] = {}  # request id -> on_output
        self._step_hooks: list[Callable[[], None]] = []
        self._compiles_at_warmup: int | None = None
        self.num_steps = 0
        compile_log.count()  # count compilations from here on

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def config(self) -> SchedulerConfig:
        return self.scheduler.config

    # -- requests -------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (a string, or a flat sequence of int token ids)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token id lists")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (bytes, bytearray, dict)) or not isinstance(
            prompt, (Sequence, np.ndarray)
        ):
            raise TypeError(
                f"a prompt is a string or a sequence of int token ids, got {type(prompt).__name__}"
            )
        else:
            ids = _token_ids(prompt)
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("empty prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        return ids

    def make_request(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        request_id: str | None = None,
    ) -> Request:
        """A validated request, not yet queued (``ValueError``/``TypeError`` if it is bad)."""
        if sampling is None:
            sampling = SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams or None, got {sampling!r}")
        vocab = self.model.config.vocab_size
        if any(t >= vocab for t in sampling.stop_token_ids):
            raise ValueError(f"stop_token_ids must lie in [0, {vocab})")
        if sampling.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this model has none")
        if isinstance(priority, bool) or not isinstance(priority, numbers.Integral):
            raise TypeError(f"priority must be an int, got {priority!r}")
        if arrival_time is not None and not (
            isinstance(arrival_time, numbers.Real) and math.isfinite(arrival_time)
        ):
            raise ValueError(f"arrival_time must be a finite number, got {arrival_time!r}")
        if request_id is not None and not isinstance(request_id, str):
            raise TypeError(f"request_id must be a string or None, got {request_id!r}")
        req = Request(
            request_id=request_id if request_id is not None else self._auto_id(),
            seq_id=next(self._seq_ids),
            prompt_token_ids=self.encode(prompt),
            sampling=sampling,
            seed=sampling.seed if sampling.seed is not None else self._rng.getrandbits(64),
            priority=int(priority),
            arrival_time=self.clock() if arrival_time is None else float(arrival_time),
        )
        self.scheduler.check(req)
        return req

    def add_request(
        self,
        prompt: Prompt,
        sampling: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue a request; returns its id. ``priority``: lower is more urgent (0 = LS)."""
        return self.add(self.make_request(prompt, sampling, priority, arrival_time, request_id))

    def add(self, req: Request, on_output: Callable[[RequestOutput], None] | None = None) -> str:
        """Queue a request from ``make_request``. With ``on_output``, its outputs go to that
        callback instead of ``step()``'s list (a durable job collects its requests so)."""
        self.scheduler.add(req)
        if on_output is not None:
            self._owners[req.request_id] = on_output
        return req.request_id

    def restore_requests(self, states: list[dict], keep_kv: bool = True) -> list[Request]:
        """Bring back requests saved by ``Scheduler.snapshot`` (a job's checkpoint) with fresh
        sequence ids; ``qllm_jax.checkpoint.restore`` then fills their pages and rows."""
        return self.scheduler.restore(states, lambda: next(self._seq_ids), keep_kv)

    def route_outputs(self, request_id: str, on_output: Callable[[RequestOutput], None]) -> None:
        """Send the outputs of live request ``request_id`` to ``on_output`` (as ``add`` does)."""
        if request_id not in self.scheduler.requests:
            raise ValueError(f"no live request {request_id!r}")
        self._owners[request_id] = on_output

    def _auto_id(self) -> str:
        """The next counter value that no live request uses (callers may pick ids too)."""
        rid = str(next(self._ids))
        while rid in self.scheduler.requests:
            rid = str(next(self._ids))
        return rid

    def abort(self, request_id: str) -> bool:
        """Abort a request: its KV pages are freed now, its rows leave any pass (parked or not)
        with the next plan, and the next ``step()`` reports it with ``finish_reason="abort"``.
        False if it was unknown or already done."""
        req = self.scheduler.abort(str(request_id))
        if req is None:
            return False
        self._ended.append(self.output(req))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._ended)

    def match_length(self, prompt: Prompt) -> int:
        """Leading tokens of ``prompt`` whose K/V this engine's prefix cache holds now (what a
        request with it would not recompute); changes nothing. For dispatchers."""
        return self.scheduler.match_length(self.encode(prompt))

    # -- stepping -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one plan; return the requests that advanced or ended (tokens so far).

        Outputs of requests added with an ``on_output`` callback go to it instead of the list;
        then every step hook runs (``add_step_hook``), still between two plans."""
        ended, self._ended = self._ended, []
        outs: list[RequestOutput] = []
        plan = self.scheduler.schedule()
        if plan is not None:
            result = self.executor.execute(plan)
            self.num_steps += plan.runs
            for req in self.scheduler.update(plan, result):
                # routed one by one: a streamed request's tokens leave before the next
                # request of the step is detokenised
                outs += self._route([self._advanced(req)])
            if plan.runs:
                self._expert_upkeep()
        outs = self._route(ended) + outs
        for hook in list(self._step_hooks):
            hook()
        return outs

    def _expert_upkeep(self) -> None:
        """Between plans: read the expert counts back (asynchronously: ``ExpertLoad.poll``)
        and re-place the experts when due."""
        n = self.num_steps
        if self.expert_stats_every:
            self.executor.expert_load.poll(start=n % self.expert_stats_every == 0)
        if self.rebalance_every and n % self.rebalance_every == 0:
            self.executor.rebalance()

    def _advanced(self, req: Request) -> RequestOutput:
        """The output of a request the last plan advanced, after its stop strings: a match in
        the detokenised text ends it with ``"stop"`` and the text is cut there (OpenAI's
        rule). Checked here because only the engine has the tokenizer; one decode per
        request per step, which ``output`` needs anyway."""
        text = self._text(req)
        stops = req.sampling.stop
        if stops and text and req.finish_reason in (None, "stop", "length"):
            cut = stop_string_cut(text, stops)
            if cut is not None:
                if not req.status.done:
                    self.scheduler.stop(req.request_id)
                req.finish_reason, text = "stop", text[:cut]
        return self.output(req, text)

    def _route(self, outs: list[RequestOutput]) -> list[RequestOutput]:
        """Hand outputs of requests added with ``on_output`` to their callback."""
        if not self._owners:
            return outs
        mine = []
        for out in outs:
            owner = self._owners.get(out.request_id)
            if owner is None:
                mine.append(out)
                continue
            if out.finished:
                del self._owners[out.request_id]
            owner(out)
        return mine

    def add_step_hook(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` at the end of every ``step()``, between two plans: where durable
        jobs submit more requests and take checkpoints (no pass is mid-segment there)."""
        self._step_hooks.append(hook)

    def remove_step_hook(self, hook: Callable[[], None]) -> None:
        self._step_hooks.remove(hook)

    def warmup(
        self, max_rows: int | None = None, max_context: int | None = None, min_context: int = 1
    ) -> int:
        """Compile every executable this engine can use (``Executor.signatures``; tighter with
        a workload's ``max_rows`` per pass and ``max_context`` tokens per request, and
        ``min_context``, the fewest tokens the longest request of any pass holds), so that
        serving compiles nothing; ``stats()["compiles_since_warmup"]`` counts any that still
        happen. Returns the number of executables run."""
        compile_log.count()  # start counting before the warm-up's own compilations
        n = self.executor.warmup(max_rows, max_context, self._kernels(), min_context)
        self._compiles_at_warmup = compile_log.count()
        return n

    def _kernels(self) -> tuple[str, ...]:
        """The kernels this engine's mode calls (the swaps' only with host slots)."""
        return (("fused",) if self.mode == "fused" else SEGMENT_KERNELS) + SWAP_KERNELS

    def _text(self, req: Request) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(req.output_token_ids, skip_special_tokens=True)

    def output(self, req: Request, text: str | None = None) -> RequestOutput:
        """What a request has produced so far (``text``: its detokenised output, if known)."""
        if text is None:
            text = self._text(req)
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
            priority=req.priority,
            error=req.error,
            num_cached_tokens=req.num_cached_tokens,
        )

    def stats(self) -> dict:
        """The scheduler's counters (KV pages, queues, preemptions, prefix cache hit rate and
        cached pages, ...) plus the executor's: steps and segments run, carries held, KV
        resets, executables and compilations."""
        ex = self.executor
        since = self._compiles_at_warmup
        return (
            self.scheduler.stats()
            | {
                "steps": self.num_steps,
                "segments_run": ex.segments_run,
                "carries": ex.num_carries,
                "kv_resets": ex.num_resets,
                "executables": len(ex.signatures(kernels=self._kernels())),
                "executables_compiled": ex.num_compiled(),
                "compiles": compile_log.count(),
                "compiles_since_warmup": None if since is None else compile_log.count() - since,
            }
            | self._expert_stats()
        )

    def _expert_stats(self) -> dict:
        """Routed-token counts as last read back (``expert_load`` [layer][expert]: (row, pick)
        pairs of real rows, recomputed rows included) and the expert placement's counters."""
        load, slots = self.executor.expert_load, self.executor.expert_slots
        out: dict = {"expert_load": load.host.tolist()} if self.expert_stats_every else {}
        if slots is not None:
            out |= {
                "expert_rebalances": slots.num_rebalances,
                "expert_slots_moved": slots.moved_slots,
                "expert_placement": [list(x) for x in slots.slot_expert],
                "expert_last_rebalance": slots.last and dataclasses.asdict(slots.last),
            }
        return out


def stop_string_cut(text: str, stops: Sequence[str]) -> int | None:
    """Where ``text`` must be cut for the earliest match of any of ``stops`` (None: none)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits, default=None)


def _engine_mesh(model, expert_parallel: int, tensor_parallel: int, mesh: Mesh | None):
    """The engine's mesh (None: one device), after checking that its axes divide what they
    shard (before counting devices, so the error names the axis the model cannot use)."""
    ep, tp = mesh_lib.mesh_shape(expert_parallel, tensor_parallel, mesh)
    if ep * tp == 1:
        return None
    cfg = model.config if isinstance(model, Model) else read_config(Path(model))
    mesh_lib.check_divides(cfg, ep, tp)
    return mesh_lib.make_mesh(ep, tp, mesh)


def _placed_model(model, dtype: str, quantize: str | None, mesh: Mesh | None) -> Model:
    """The model loaded (``dtype``, ``quantize``: see ``load``; a checkpoint on a mesh: shard
    by shard) or, given in memory, resharded onto the mesh. A loaded float model is not
    quantized here: its float params would stay alive beside the int8 ones, which is what
    ``load(..., quantize=)`` exists to avoid."""
    check_quantize(quantize)
    if isinstance(model, Model):
        if quantize is not None and model.quantize != quantize:
            raise ValueError(
                f"quantize={quantize!r} but the Model passed was loaded with "
                f"quantize={model.quantize!r}: pass quantize to qllm_jax.load or random_model"
            )
        return model if mesh is None else mesh_lib.shard_model(model, mesh)
    if mesh is None:
        return load(model, dtype=dtype, quantize=quantize)
    return load(model, dtype=dtype, quantize=quantize, place=mesh_lib.placer(mesh))


def _check_engine_args(max_model_len, kv_pages, kv_bytes, page_size, swap_space) -> None:
    if not (isinstance(swap_space, (int, float)) and math.isfinite(swap_space) and swap_space >= 0):
        raise ValueError(f"swap_space must be a number of GiB >= 0, got {swap_space!r}")
    for name, value, least in (
        ("max_model_len", max_model_len, 1),
        ("kv_pages", kv_pages, 2),
        ("kv_bytes", kv_bytes, 1),
    ):
        if value is not None and (not is_int(value) or value < least):
            raise ValueError(f"{name} must be an int >= {least} or None, got {value!r}")
    if not is_int(page_size) or page_size < 1 or page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size!r}")


def _token_ids(prompt) -> list[int]:
    """A flat sequence of integer token ids as ints; anything else is a ``TypeError``."""
    if isinstance(prompt, np.ndarray):
        if prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer):
            raise TypeError(f"token ids must be a 1-D integer array, got {prompt.dtype}")
        return [int(t) for t in prompt]
    if not all(is_int(t) for t in prompt):
        bad = next(t for t in prompt if not is_int(t))
        raise TypeError(f"token ids must be ints, got {bad!r} ({type(bad).__name__})")
    return [int(t) for t in prompt]
