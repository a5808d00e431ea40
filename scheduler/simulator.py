"""A fake executor: a cost model and a virtual clock drive the *same* ``Scheduler`` as the engine.

Why: scheduler tests need exact, hand-computable timelines, and the paper-scale experiments need
Mixtral-8x7B on an A100, which a laptop cannot run. ``FakeExecutor.execute(plan)`` has the real
executor's interface and keeps the same host-side record of its carries (``Ledger``), so both
reject a bad plan with the same ``PlanError`` (an unknown carry, a cursor mismatch, a row in two
passes, rows that differ from the plan's); a carry here is just that record, and time advances by
``CostModel.plan_time``. It also models the KV cache by content: each slot holds (a hash of the
sequence's tokens up to and including that position, the position), which is what real K/V
depend on, so pages shared by prefix caching check out for every sequence that reads them. It
rejects a chunk whose earlier K/V are not in its pages (it checks the first slot of every page
of its context and its last position): a real device would silently compute garbage
instead. ``Simulator`` is the engine's loop (schedule → execute → update) on the virtual clock.
Plain Python; never imports jax.

    clock = VirtualClock()
    sched = Scheduler(SchedulerConfig(...), segment_layout(32, 8, 1, False), clock=clock)
    result = Simulator(sched, load_profile("mixtral-a100-efficient"), clock).run(
        [(0.0, make_request("a", 0, 100, 20, priority=1)), (0.5, "abort", "a")]
    )
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from .core import Scheduler
from .ledger import Ledger
from .metrics import RequestRecord, record_of
from .plan import Chunk, Plan, PlanError, Segment, StepResult
from .request import Request
from .sampling_params import SamplingParams

FAKE_TOKEN = 3  # every sampled token; not an EOS id of any test config (ignore_eos anyway)
ROOT = 0  # the content hash "before" position 0


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Seconds per segment, linear in the pass's size.

    ``rows``: token rows of the pass; ``ctx``: the KV tokens its sequences hold (the sum of
    ``chunk.end`` over its chunks: what attention must read); ``sampled``: rows that reach the
    LM head (our head projects only the sampling rows). ``attn_per_row_ctx``: each row of this
    engine's attention reads its own sequence's cached prefix, padded to the longest prefix
    (``chunk.start``) of the pass, so the work also grows with rows * that (``span``);
    ``attn_per_row_sq``: and it attends within its own chunk over a rows x rows mask.
    ``expert_*`` are for all experts of a layer; a group of ``g`` of ``E`` experts pays ``g/E``
    of it (weights read and routed rows both scale so). Every segment
    also pays ``segment_overhead`` (one jitted call's fixed cost: what makes fine granularity
    dearer). A plan pays ``host_overhead`` once (scheduler work, added serially: an upper bound,
    the engine overlaps it with the device), and ``embed_base`` when it creates a pass.
    """

    name: str = "custom"
    attn_base: float = 0.0
    attn_per_row: float = 0.0
    attn_per_ctx: float = 0.0
    attn_per_row_ctx: float = 0.0
    attn_per_row_sq: float = 0.0
    expert_base: float = 0.0
    expert_per_row: float = 0.0
    shared_base: float = 0.0
    shared_per_row: float = 0.0
    head_base: float = 0.0
    head_per_row: float = 0.0  # per sampled row
    segment_overhead: float = 0.0
    embed_base: float = 0.0
    host_overhead: float = 0.0

    def segment_time(
        self, seg: Segment, rows: int, ctx: int, num_experts: int, span: int = 0
    ) -> float:
        """``rows``: the pass's rows, or its sampled rows for the head; ``span``: its longest
        cached prefix."""
        if seg.kind == "attention":
            t = self.attn_base + self.attn_per_row * rows + self.attn_per_ctx * ctx
            t += self.attn_per_row_ctx * rows * span + self.attn_per_row_sq * rows * rows
        elif seg.kind == "experts":
            t = (self.expert_base + self.expert_per_row * rows) * seg.group_size / num_experts
        elif seg.kind == "shared":
            t = self.shared_base + self.shared_per_row * rows
        elif seg.kind == "head":
            t = self.head_base + self.head_per_row * rows
        else:
            raise ValueError(f"unknown segment kind {seg.kind!r}")
        return self.segment_overhead + t

    def plan_time(
        self,
        plan: Plan,
        segments: list[Segment],
        num_experts: int | None = None,
        shape: tuple[int, int, int, int] | None = None,
    ) -> float:
        """Time to carry out ``plan``: its segments, plus the head when it finishes the pass.
        ``shape``: ``pass_shape(plan.chunks)``, when the caller has it already."""
        if not plan.runs:
            return 0.0
        if num_experts is None:
            num_experts = count_experts(segments)
        rows, ctx, span, sampled = shape or pass_shape(plan.chunks)
        t = self.host_overhead + (self.embed_base if plan.new else 0.0)
        for seg in segments[plan.cursor : plan.cursor + plan.num_segments]:
            t += self.segment_time(seg, rows, ctx, num_experts, span)
        if plan.finishes:
            t += self.segment_time(segments[-1], sampled, ctx, num_experts)
        return t

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CostModel:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"meta"}  # "meta": free-form provenance, ignored
        if unknown:
            raise ValueError(f"unknown cost model fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self, meta: dict | None = None) -> str:
        d = self.to_dict() | ({"meta": meta} if meta else {})
        return json.dumps(d, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        return cls.from_dict(json.loads(text))


def pass_shape(chunks: tuple[Chunk, ...]) -> tuple[int, int, int, int]:
    """rows, ctx, span and sampled rows of a pass, as ``CostModel.plan_time`` uses them (one
    loop: the lockstep simulator prices every new pass with it)."""
    if not chunks:
        raise ValueError("pass_shape of a pass without rows")
    rows = ctx = sampled = 0
    span = chunks[0].start
    for c in chunks:
        n = len(c.token_ids)
        rows += n
        ctx += c.start + n
        if c.start > span:
            span = c.start
        if c.sample is not None:
            sampled += 1
    return rows, ctx, span, sampled


def count_experts(segments: list[Segment]) -> int:
    return max((s.group_start + s.group_size for s in segments if s.kind == "experts"), default=1)


# -- profiles ------------------------------------------------------------------------------------
#
# Mixtral-8x7B: 32 layers, 8 experts (top-2), hidden 4096, FFN 14336, 32 query / 8 KV heads of
# 128, vocab 32000. Per layer: attention weights 4096*(4096+2*1024) + 4096*4096 = 41.9M params;
# experts 8 * 3 * 4096*14336 = 1.41G params, of which a token uses 2/8. Active params per token
# ~13e9, so a token costs 2*13e9 = 26 GFLOP. A100-80GB: 312 TFLOP/s bf16, 2.04 TB/s HBM.

MIXTRAL_A100_PAPER = CostModel(
    # The reference code (HF transformers, bitsandbytes NF4, a Python loop over the 8 experts of
    # every layer, per-sequence KV caches padded and concatenated at every layer). Its decode
    # step of a batch of 32 takes ~1.25 s, almost all fixed cost: 32 layers * ~38 ms (7 ms
    # attention: 4-bit dequantising projections and the per-layer Python cache concat; 31 ms for
    # 8 experts * 3 dequantise-then-matmul calls each, Python-driven) + ~15 ms head and per-step
    # Python.
    # Prefill grows with the prompt: ~0.48 ms per token (5 us attention + 10 us experts per
    # layer), i.e. 26 GFLOP/token at ~54 TFLOP/s, 17% of peak -- eager HF attention, fp16
    # matmuls on freshly dequantised weights, prompts padded to the batch's longest. A 160-token
    # prompt (ShareGPT mean) prefills in ~1.3 s, 32 of them in ~3.7 s. The KV concat copies
    # ~4 KB per context token per layer and pads: 20 ns per context token per layer.
    name="mixtral-a100-paper",
    attn_base=7e-3,
    attn_per_row=5e-6,
    attn_per_ctx=2e-8,
    expert_base=31e-3,
    expert_per_row=10e-6,
    # once per pass: fp16 LM head (bnb leaves it unquantised), sampling, and ~10 ms of per-step
    # Python (the reference's scheduler loop, HF logits processors and stopping criteria, cache
    # bookkeeping); charged per pass, not per plan, so fine-grained plans are not taxed with it
    head_base=14e-3,
    head_per_row=1e-6,
    embed_base=5e-4,
    host_overhead=50e-6,  # our scheduler's decision per plan (a preemption check)
)

# The same code at the step time the reference README's own throughput implies: 50 tokens/s at
# batch 16, about 0.32 s a decode step. Which of 1.25 s and 0.32 s the paper ran at is unknown;
# at 1.25 s every tested rate overloads the system, so the two bracket the paper's regime. The
# fixed per-layer costs shrink by 0.32 / 1.25; the per-token prefill cost stays.
MIXTRAL_A100_PAPER_FAST = dataclasses.replace(
    MIXTRAL_A100_PAPER,
    name="mixtral-a100-paper-fast",
    attn_base=7e-3 * 0.256,
    expert_base=31e-3 * 0.256,
    head_base=14e-3 * 0.256,
)

MIXTRAL_A100_EFFICIENT = CostModel(
    # An efficient engine on the same GPU. Bf16 weights (93 GB) do not fit in 80 GB, so int8
    # weight-only (47 GB). Decode is memory-bound: at batch 32 with top-2 routing every expert is
    # hit (P(an expert is idle) = (6/8)^32 ~ 1e-4), so a step reads all 47 GB at ~1.8 TB/s
    # (88% of peak): 0.78 ms of experts + 23 us of attention weights per layer. Compute at ~50%
    # of peak (156 TFLOP/s): attention projections 2*41.9M FLOP = 0.54 us per row per layer,
    # experts 2*2*3*4096*14336 FLOP = 4.5 us per row per layer, so prefill costs
    # 32*(0.54+4.5) us = 0.16 ms per token. Decode attention reads K and V, 2*1024 bf16 = 4 KB
    # per context token per layer: 2.3 ns each. Decode batch 32 at 200 context tokens each:
    # 32 * (67 + 928) us + 0.2 ms head ~ 32 ms. (Adding memory and compute time instead of taking
    # the max overstates that by ~15%; the linear form keeps the model simple.)
    name="mixtral-a100-efficient",
    attn_base=30e-6,  # 23 us weight reads + a few kernels
    attn_per_row=0.54e-6,
    attn_per_ctx=2.3e-9,
    expert_base=0.78e-3,
    expert_per_row=4.5e-6,
    head_base=0.17e-3,  # bf16 LM head, 262 MB at 1.8 TB/s, + sampling
    head_per_row=1.7e-6,  # 2*4096*32000 FLOP per sampled row
    segment_overhead=5e-6,  # launch gap between jitted calls (host dispatch runs ahead)
    embed_base=10e-6,
    # The host time per plan that the device does not hide. One schedule() + update() of this
    # scheduler plus a dispatch takes ~50-80 us in CPython (measured with the simulator, 32
    # running requests), but the engine dispatches up to `lookahead` segments ahead, so it
    # overlaps with segments of >= ~70 us (an expert segment here: ~100 us at batch 32).
    host_overhead=10e-6,
)

# Fitted on the built-in model (4 layers, 8 experts, hidden 256, float32) on a 2-core CPU by
# experiments/profile_cost.py; a copy of experiments/results/profile-builtin-cpu.json, whose
# "meta" holds the measured points and the fit's largest relative error per kind (46-51%). A
# jitted segment costs ~50 us however small; attention reads each row's own cached prefix, so a
# prefill chunk after a long prefix pays rows * prefix.
BUILTIN_CPU = CostModel(
    name="builtin-cpu",
    attn_base=0.0001664,
    attn_per_row_ctx=3.666e-08,
    attn_per_row_sq=5.716e-08,
    expert_base=0.0003286,
    expert_per_row=3.138e-05,
    head_base=0.001952,
    head_per_row=0.000107,
    segment_overhead=2.865e-05,
    embed_base=0.000136,
    host_overhead=3.64e-05,
)

PROFILES: dict[str, CostModel] = {
    p.name: p
    for p in (MIXTRAL_A100_PAPER, MIXTRAL_A100_PAPER_FAST, MIXTRAL_A100_EFFICIENT, BUILTIN_CPU)
}


def load_profile(name_or_path: str | Path) -> CostModel:
    """A built-in profile by name (``PROFILES``), or a cost model JSON file."""
    if str(name_or_path) in PROFILES:
        return PROFILES[str(name_or_path)]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"unknown profile {name_or_path!r}: not one of {sorted(PROFILES)}")
    return CostModel.from_json(path.read_text())


# -- the simulator -------------------------------------------------------------------------------


class VirtualClock:
    """The scheduler's clock: time moves only when the simulator says so."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class SimulationError(RuntimeError):
    """The simulated engine stopped making progress."""


def make_request(
    request_id: str,
    seq_id: int,
    prompt_len: int,
    max_tokens: int,
    priority: int = 0,
    arrival_time: float = 0.0,
    prompt_token_ids: list[int] | None = None,
    seed: int = 0,
) -> Request:
    """A request with ``prompt_len`` prompt tokens that generates exactly ``max_tokens``. Its
    prompt starts with a token of its own (``100 + seq_id``), so requests share no prefix
    (and no cached page) unless ``prompt_token_ids`` is given."""
    if prompt_token_ids is None:
        prompt_token_ids = [100 + seq_id] + [5] * (prompt_len - 1)
    elif len(prompt_token_ids) != prompt_len:
        raise ValueError(f"{len(prompt_token_ids)} prompt token ids, prompt_len={prompt_len}")
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return Request(
        request_id=request_id,
        seq_id=seq_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling=sampling,
        seed=seed,
        priority=priority,
        arrival_time=arrival_time,
    )


@dataclasses.dataclass(frozen=True)
class SimRecord(RequestRecord):
    """One request's outcome: the metrics record plus what only the simulator knows."""

    finish_reason: str | None = None
    computed_tokens: int = 0  # rows run for it in finished passes (recomputation included)

    @property
    def prompt_len(self) -> int:
        return self.prompt_tokens

    @property
    def output_len(self) -> int:
        return self.output_tokens


@dataclasses.dataclass
class SimResult:
    records: dict[str, SimRecord]
    stats: dict[str, float]  # the scheduler's stats plus plans, busy time, end time


def content_hash(parent: int, token: int) -> int:
    """The fake K/V of a position: a hash of its sequence's tokens up to it (chained)."""
    return hash((parent, token))


class FakeExecutor:
    """The executor's contract without a device: ``execute(plan) -> StepResult``, the same
    ``Ledger`` and plan checks, a modelled KV cache, and every sampled token ``FAKE_TOKEN``
    (with ``vary_tokens``, a function of the sequence's tokens, seed and step instead, so
    sequences with a shared prefix still diverge, as seeded sampling does).

    ``tokens_of(seq_id)`` gives a sequence's true tokens (prompt and output so far), against
    which the K/V read by each chunk are checked; without it, or for a sequence it does not
    know, the truth is what the executor itself was fed for that sequence, and a prefix it was
    never fed (mapped from a cache) is taken from the slots it reads, checked for positions
    only."""

    def __init__(
        self,
        segments: list[Segment],
        page_size: int,
        cost: CostModel,
        tokens_of: Callable[[int], Sequence[int] | None] | None = None,
        vary_tokens: bool = False,
        check_kv: bool = True,
    ) -> None:
        self.segments, self.page_size, self.cost = segments, page_size, cost
        # check_kv=False skips modelling the KV content (about 40 % of a large simulation's
        # time); the ledger's plan checks still run. Tests keep it on.
        self.check_kv = check_kv
        if vary_tokens and not check_kv:
            raise ValueError("vary_tokens needs check_kv (tokens derive from the K/V content)")
        self.num_experts = count_experts(segments)
        self.ledger = Ledger(len(segments) - 1, page_size)
        self.tokens_of, self.vary_tokens = tokens_of, vary_tokens
        # KV slot -> (content hash of the tokens up to that position, position)
        self.kv: dict[int, tuple[int, int]] = {}
        self.host: dict[int, list[tuple[int, int] | None]] = {}  # host slot -> a page's KV
        self.computed: Counter[int] = Counter()  # rows run per sequence, in finished passes
        self._shape: tuple = (None, None)
        self._fed: dict[int, list[int]] = {}  # tokens fed per sequence (truth without tokens_of)
        self._chain: dict[int, list[int]] = {}  # content hashes per sequence, by position
        self._last: dict[int, int] = {}  # content hash at each chunk's end, by sequence

    def plan_time(self, plan: Plan) -> float:
        if plan.chunks is not self._shape[0]:  # the plans of a pass share one chunks tuple
            self._shape = (plan.chunks, pass_shape(plan.chunks) if plan.chunks else None)
        return self.cost.plan_time(plan, self.segments, self.num_experts, self._shape[1])

    def execute(self, plan: Plan) -> StepResult:
        """Check and record ``plan`` (``PlanError`` if it is invalid, nothing changed)."""
        self.ledger.check(plan)
        if self.check_kv:
            self._swap_kv(plan)
        new = plan.chunks if plan.new and self.check_kv else ()
        hashes = [self._check_kv(c) for c in new]
        done = self.ledger.apply(plan, checked=True).finished
        for seq in plan.finished_seq_ids:
            for memo in (self._fed, self._chain, self._last):
                memo.pop(seq, None)
        for c, h in zip(new, hashes, strict=True):
            self._write_kv(c, h)
        if done is None:
            return StepResult()
        for c in done.chunks:
            self.computed[c.seq_id] += c.num_tokens
        return StepResult(tokens={c.seq_id: self._token(c) for c in done.chunks if c.samples})

    def _swap_kv(self, plan: Plan) -> None:
        """Model the plan's page swaps (the cost model charges nothing for them)."""
        ps, finished = self.page_size, set(plan.finished_seq_ids)
        for slot in [s for s, seq in self.ledger.slots.items() if seq in finished]:
            del self.host[slot]
        for sw in plan.swap_out:
            for page, slot in zip(sw.pages, sw.slots, strict=True):
                self.host[slot] = [self.kv.get(page * ps + o) for o in range(ps)]
        for sw in plan.swap_in:
            for page, slot in zip(sw.pages, sw.slots, strict=True):
                for o, entry in enumerate(self.host.pop(slot)):
                    if entry is None:
                        self.kv.pop(page * ps + o, None)
                    else:
                        self.kv[page * ps + o] = entry
        for slot in plan.drop_slots:
            del self.host[slot]

    def _token(self, c: Chunk) -> int:
        if not self.vary_tokens:
            return FAKE_TOKEN
        return 10 + hash((self._last[c.seq_id], c.sample.seed, c.sample.step)) % 1000

    def _slot(self, chunk: Chunk, pos: int) -> int:
        return chunk.pages[pos // self.page_size] * self.page_size + pos % self.page_size

    def expected_kv(self, seq_id: int, end: int) -> list[int] | None:
        """The content hashes of (at least) positions ``0 .. end-1`` of a sequence, from its
        true tokens (None when the truth is not known that far). Memoised: not a copy."""
        truth = self.tokens_of(seq_id) if self.tokens_of is not None else None
        if truth is None:
            truth = self._fed.get(seq_id, [])
        if len(truth) < end:
            return None
        chain = self._chain.setdefault(seq_id, [])
        while len(chain) < end:
            chain.append(content_hash(chain[-1] if chain else ROOT, truth[len(chain)]))
        return chain

    def _check_kv(self, chunk: Chunk) -> list[int]:
        """Check the K/V ``chunk`` reads; returns the content hashes of its own positions."""
        ps, start, kv, pages = self.page_size, chunk.start, self.kv, chunk.pages
        want = self.expected_kv(chunk.seq_id, start)
        for pos in (*range(0, start, ps), start - 1) if start else ():
            got = kv.get(pages[pos // ps] * ps + pos % ps)
            if got is None or got[1] != pos or (want is not None and got[0] != want[pos]):
                raise PlanError(f"sequence {chunk.seq_id}: K/V of position {pos} is gone")
        parent = ROOT if not start else self.kv[self._slot(chunk, start - 1)][0]
        out = []
        for token in chunk.token_ids:
            parent = content_hash(parent, token)
            out.append(parent)
        return out

    def _write_kv(self, chunk: Chunk, hashes: list[int]) -> None:
        fed = self._fed.setdefault(chunk.seq_id, [])
        if len(fed) >= chunk.start:
            fed[chunk.start :] = chunk.token_ids
        chain = self._chain.get(chunk.seq_id)
        if chain is not None and len(chain) > chunk.start:
            del chain[chunk.start :]  # recomputed: from the truth again
        for pos, h in zip(range(chunk.start, chunk.end), hashes, strict=True):
            self.kv[self._slot(chunk, pos)] = (h, pos)
        self._last[chunk.seq_id] = hashes[-1]


class Simulator:
    """Runs a ``Scheduler`` against a ``FakeExecutor`` on a virtual clock (module docstring)."""

    def __init__(
        self,
        scheduler: Scheduler,
        cost: CostModel,
        clock: VirtualClock,
        vary_tokens: bool = False,
        check_kv: bool = True,
    ) -> None:
        if scheduler.clock is not clock:
            raise ValueError("construct the Scheduler with clock=<this simulator's clock>")
        self.scheduler, self.cost, self.clock = scheduler, cost, clock
        self.segments = scheduler.segments
        self.requests: dict[int, Request] = {}  # every request seen, by seq_id
        self.executor = FakeExecutor(
            self.segments, scheduler.config.page_size, cost, self._tokens_of, vary_tokens, check_kv
        )
        self.num_plans = 0
        self.busy_time = 0.0
        self.timeline: list[tuple[float, int, int]] = []  # (time, LS tokens, BE tokens) sampled

    def run(
        self, events: list[tuple], max_plans: int = 10_000_000, until: float | None = None
    ) -> SimResult:
        """Events: ``(time, Request)`` arrivals and ``(time, "abort", request_id)``. Runs until
        every request is done, or (``until``) to that time, leaving the rest unfinished."""
        events = sorted(events, key=lambda e: e[0])  # stable: same-time events keep their order
        i = 0
        while until is None or self.clock.now < until:
            while i < len(events) and events[i][0] <= self.clock.now:
                self._apply(events[i])
                i += 1
            plan = self.scheduler.schedule()
            if plan is None:
                if i < len(events):
                    self.clock.now = max(self.clock.now, events[i][0])
                    continue
                if self.scheduler.has_unfinished():
                    raise SimulationError(f"stuck at t={self.clock.now}: no plan, work left")
                break
            self.step(plan)
            if self.num_plans >= max_plans:
                raise SimulationError(f"gave up after {max_plans} plans")
        return self.result()

    def step(self, plan: Plan) -> None:
        """Carry out one plan: execute it, let its time pass, report its tokens."""
        dt, result = self.begin(plan)
        self.clock.now += dt
        self.finish(plan, result)

    def begin(self, plan: Plan, dt: float | None = None) -> tuple[float, StepResult]:
        """The first half of ``step``: execute ``plan``; returns its duration and result. (The
        N-engine simulator lets other replicas' time pass before ``finish``, and passes the
        duration ``dt`` it priced itself, as a lockstep step.)"""
        if dt is None:
            dt = self.executor.plan_time(plan)
        result = self.executor.execute(plan)
        self.busy_time += dt
        self.num_plans += plan.runs
        return dt, result

    def finish(self, plan: Plan, result: StepResult) -> None:
        """The second half of ``step``, at the plan's end time: report its tokens."""
        self.scheduler.update(plan, result)
        if result.tokens:
            be = sum(self.requests[s].priority > 0 for s in result.tokens)
            self.timeline.append((self.clock.now, len(result.tokens) - be, be))

    def _tokens_of(self, seq_id: int) -> list[int] | None:
        req = self.requests.get(seq_id)
        return None if req is None else req.all_token_ids

    def abort(self, request_id: str) -> bool:
        """Abort like ``Engine.abort``: its rows leave their carry with the next plan."""
        return self.scheduler.abort(request_id) is not None

    def result(self) -> SimResult:
        records = {
            r.request_id: SimRecord(
                # aborted requests keep their finish time here (metrics count them unfinished)
                **(dataclasses.asdict(record_of(r)) | {"finish": r.finish_time}),
                finish_reason=r.finish_reason,
                computed_tokens=self.executor.computed[r.seq_id],
            )
            for r in self.requests.values()
        }
        stats = self.scheduler.stats() | {
            "plans": self.num_plans,
            "busy_time": self.busy_time,
            "end_time": self.clock.now,
            "preempt_wait_max": self.scheduler.stats()["preempt_wait_s_max"] or 0.0,
        }
        return SimResult(records, stats)

    # -- helpers --------------------------------------------------------------------------------

    def _apply(self, event: tuple) -> None:
        if len(event) == 2 and isinstance(event[1], Request):
            req = event[1]
            if req.output_token_ids or req.num_computed:
                raise ValueError(f"request {req.request_id!r} already ran: build a new one")
            self.scheduler.add(req)
            self.requests[req.seq_id] = req
        elif len(event) == 3 and event[1] == "abort":
            self.abort(event[2])
        else:
            raise ValueError(f"unknown event {event!r}")
