"""N engine replicas on one virtual clock behind a dispatcher. Plain Python, no jax.

Each replica is the plain ``Simulator``'s pieces (the same ``Scheduler`` over a ``FakeExecutor``
and a cost model, with its own clock set to the global time before every call). A request is
dispatched at its arrival time by a ``dispatch`` policy reading a ``LoadBoard`` of the
replicas' (possibly stale) snapshots; it reaches its replica's scheduler before that replica's
next plan, exactly where the plain simulator would add it, so one replica under any policy gives
the plain ``Simulator``'s timings.

Two couplings:

- ``ep=None``: data parallelism only. Replicas run independently; a discrete-event loop picks
  the earliest of the next arrival and the replicas' plan ends (arrivals first at a tie).
- ``ep=ExpertParallel(...)``: vLLM's data-parallel + expert-parallel engines. Every replica is
  one expert rank and they step in lockstep (an idle one joins with an empty batch): a step
  costs the slowest replica's non-expert work (attention, head, overheads) plus, for every
  layer any replica's plan runs, the busiest rank's expert time for all replicas' tokens and
  the all-to-all of the busiest sender; ``experts.ExpertState`` prices that, moves the hot
  experts and, with EPLB, re-places them (all replicas stall for the migration). Its routing is
  a synthetic model or a trace recorded on the real engine (``ExpertParallel.trace``); a
  simulated layer stands for ``layers_per_block`` real ones.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import Counter

from .core import Scheduler, SchedulerConfig
from .dispatch import DispatchRequest, LoadBoard, Snapshot, queue_signals
from .experts import ExpertParallel, ExpertState
from .pages import extend_hashes, reusable_pages
from .plan import Plan, Segment, StepResult
from .request import Request, Status
from .simulator import CostModel, SimRecord, SimulationError, Simulator, VirtualClock, pass_shape


@dataclasses.dataclass
class Replica:
    index: int
    sim: Simulator
    inbox: list[Request] = dataclasses.field(default_factory=list)
    pending: tuple[Plan, StepResult] | None = None
    busy_until: float = 0.0
    awake: bool = False  # has a wake-up queued (independent mode)
    dispatched: int = 0
    dispatched_tokens: int = 0
    started: dict[int, float] = dataclasses.field(default_factory=dict)  # seq id -> first run
    # (chunks, pass_shape(chunks)) of its last priced plan: a pass's plans share one chunks
    # tuple, so a pass advanced block by block is measured once, not once per block
    shape: tuple = (None, None)

    def pass_shape(self, chunks: tuple) -> tuple[int, int, int, int]:
        """``pass_shape(chunks)``, memoised on the identity of ``chunks``."""
        if chunks is not self.shape[0]:
            self.shape = (chunks, pass_shape(chunks))
        return self.shape[1]

    @property
    def sched(self) -> Scheduler:
        return self.sim.scheduler

    @property
    def clock(self) -> VirtualClock:
        return self.sim.clock


@dataclasses.dataclass
class MultiResult:
    records: dict[str, SimRecord]
    replica_of: dict[str, int]
    stats: dict  # summed scheduler counters, prefix hit rate, imbalance, expert balance, ...
    started: dict[str, float] = dataclasses.field(default_factory=dict)  # first computed


class MultiSimulator:
    """``run(events)`` with ``events`` ``(time, Request, user)`` (user may be None)."""

    def __init__(
        self,
        num_replicas: int,
        config: SchedulerConfig,
        segments: list[Segment],
        cost: CostModel,
        policy,
        staleness_s: float = 0.0,
        ep: ExpertParallel | None = None,
        layers_per_block: int = 1,
        check_kv: bool = True,
    ) -> None:
        self.segments, self.cost, self.policy = segments, cost, policy
        self.replicas = []
        for i in range(num_replicas):
            clock = VirtualClock()
            sim = Simulator(Scheduler(config, segments, clock), cost, clock, check_kv=check_kv)
            self.replicas.append(Replica(i, sim))
        self.board = LoadBoard(num_replicas, self.snapshot, staleness_s)
        self.ep = ExpertState(ep, layers_per_block) if ep is not None else None
        if ep is not None and ep.ranks != num_replicas:
            raise ValueError("each replica is one expert rank: ep.ranks must equal num_replicas")
        self.num_experts = max(
            (s.group_start + s.group_size for s in segments if s.kind == "experts"), default=1
        )
        self.num_layers = 1 + max(s.layer for s in segments)
        self._spans: dict[tuple[int, int], tuple[list, list]] = {}  # _split_segments' memo
        # per prefill token, all segments: what ``Snapshot.token_s`` estimates
        self.token_s = self.num_layers * (
            cost.attn_per_row + cost.expert_per_row + cost.shared_per_row
        )
        self.replica_of: dict[str, int] = {}
        self.now = 0.0
        self.steps = 0
        self.stall_s = 0.0

    # -- signals ---------------------------------------------------------------------------------

    def snapshot(self, r: int) -> Snapshot:
        rep = self.replicas[r]
        s = rep.sched
        left, seg = self._pass_left(rep)
        return Snapshot(
            replica=r,
            time=self.now,
            **queue_signals((*s.waiting, *rep.inbox), s.admitted),
            kv_used=s.allocator.num_used,
            kv_total=s.allocator.num_pages - 1,
            pass_left_s=left,
            segment_s=seg,
            token_s=self.token_s,
            preemptive=s.config.policy == "qllm" and s.config.preempt,
            expert_pressure=self.ep.rank_balance if self.ep else None,
        )

    def _pass_left(self, rep: Replica) -> tuple[float, float]:
        """Estimated time left of the pass running on ``rep`` now, and of one of its
        segments (from the cost model: what the replica would publish)."""
        s = rep.sched
        ps = s.passes.get(s.active) if s.active is not None else None
        if ps is None and rep.pending is not None and rep.pending[0].pass_id in s.passes:
            ps = s.passes[rep.pending[0].pass_id]
        if ps is None or not ps.chunks:
            return max(0.0, rep.busy_until - self.now), 0.0
        rows, ctx, span, sampled = rep.pass_shape(ps.snapshot())
        segs = self.segments[ps.cursor : -1]
        t = sum(self.cost.segment_time(g, rows, ctx, self.num_experts, span) for g in segs)
        t += self.cost.segment_time(self.segments[-1], sampled, ctx, self.num_experts)
        left = t + max(0.0, rep.busy_until - self.now)
        return left, left / (len(segs) + 1)

    def dispatch_request(self, req: Request, user: str | None) -> DispatchRequest:
        ps = self.replicas[0].sched.config.page_size
        n = reusable_pages(len(req.prompt_token_ids), ps)
        hashes = extend_hashes([], req.prompt_token_ids, ps, n)
        if not req.page_hashes and not req.output_token_ids:
            # the chain the replica's scheduler computes at admission: hashed once, not twice
            req.page_hashes = list(hashes)
        match = tuple(
            len(rep.sched.allocator.lookup(hashes)) * ps
            if rep.sched.config.enable_prefix_caching
            else 0
            for rep in self.replicas
        )
        return DispatchRequest(
            request_id=req.request_id,
            prompt_len=len(req.prompt_token_ids),
            max_tokens=req.sampling.max_tokens,
            priority=req.priority,
            user=user,
            match=match,
            kv_pages=math.ceil((len(req.prompt_token_ids) + req.sampling.max_tokens) / ps),
        )

    def _dispatch(self, t: float, req: Request, user: str | None) -> Replica:
        self.now = t
        dreq = self.dispatch_request(req, user)
        snaps = self.board.view(t)
        r = self.policy.choose(dreq, snaps)
        self.board.dispatched(r, dreq)
        rep = self.replicas[r]
        rep.inbox.append(req)
        rep.dispatched += 1
        rep.dispatched_tokens += len(req.prompt_token_ids) + req.sampling.max_tokens
        self.replica_of[req.request_id] = r
        return rep

    def _drain(self, rep: Replica, t: float) -> None:
        rep.clock.now = t
        for req in rep.inbox:
            rep.sim._apply((t, req))
        rep.inbox.clear()

    # -- running ---------------------------------------------------------------------------------

    def run(self, events: list[tuple], max_steps: int = 10_000_000) -> MultiResult:
        events = sorted(events, key=lambda e: e[0])
        if self.ep is None:
            self._run_independent(events, max_steps)
        else:
            self._run_lockstep(events, max_steps)
        for rep in self.replicas:
            if rep.inbox or rep.sched.has_unfinished():
                raise SimulationError(f"replica {rep.index} stuck at t={self.now}: work left")
        return self.result()

    def _run_independent(self, events: list[tuple], max_steps: int) -> None:
        heap: list[tuple[float, int]] = []
        i = 0
        while i < len(events) or heap:
            if i < len(events) and (not heap or events[i][0] <= heap[0][0]):
                t, req, user = events[i]
                i += 1
                rep = self._dispatch(t, req, user)
                if not rep.awake:
                    rep.awake = True
                    heapq.heappush(heap, (max(t, rep.busy_until), rep.index))
                continue
            t, r = heapq.heappop(heap)
            rep = self.replicas[r]
            self.now = t
            rep.clock.now = t
            if rep.pending is not None:
                rep.sim.finish(*rep.pending)
                rep.pending = None
            self._drain(rep, t)
            plan = rep.sched.schedule()
            if plan is None:
                rep.awake = False
                continue
            self._note_starts(rep, plan, t)
            dt, result = rep.sim.begin(plan)
            rep.pending, rep.busy_until = (plan, result), t + dt
            heapq.heappush(heap, (t + dt, r))
            self.steps += 1
            if self.steps >= max_steps:
                raise SimulationError(f"gave up after {max_steps} plans")

    def _run_lockstep(self, events: list[tuple], max_steps: int) -> None:
        i, t = 0, 0.0
        while True:
            while i < len(events) and events[i][0] <= t:
                self._dispatch(events[i][0], events[i][1], events[i][2])
                i += 1
            self.now = t
            plans = []
            for rep in self.replicas:
                self._drain(rep, t)
                plans.append(rep.sched.schedule())
            if all(p is None for p in plans):
                if i < len(events):
                    t = events[i][0]
                    continue
                break
            dt = self.lockstep_time(plans)
            done = []
            for rep, plan in zip(self.replicas, plans, strict=True):
                if plan is not None:
                    self._note_starts(rep, plan, t)
                    _, result = rep.sim.begin(plan, dt)  # busy for the whole lockstep step
                    rep.busy_until = t + dt
                    done.append((rep, plan, result))
            t += dt
            for rep, plan, result in done:
                rep.clock.now = t
                rep.sim.finish(plan, result)
            stall = self.ep.tick(t)
            self.stall_s += stall
            t += stall
            self.steps += 1
            if self.steps >= max_steps:
                raise SimulationError(f"gave up after {max_steps} steps")
        self.now = t

    def _note_starts(self, rep: Replica, plan: Plan, t: float) -> None:
        """When each request is first computed (a pass's rows are all in its first plan):
        TTFT splits into queueing (arrival to here) and prefill (here to the first token)."""
        if plan.new:
            started = rep.started
            for c in plan.chunks:
                if c.seq_id not in started:
                    started[c.seq_id] = t

    def lockstep_time(self, plans: list[Plan | None]) -> float:
        """One lockstep step: the slowest replica's non-expert work + per layer any plan
        runs, the busiest rank's experts and the all-to-all (module docstring)."""
        non_expert = 0.0
        rows_at: dict[int, list[float]] = {}
        cost, E = self.cost, self.num_experts
        for r, plan in enumerate(plans):
            if plan is None or not plan.runs:
                continue
            rows, ctx, span, sampled = self.replicas[r].pass_shape(plan.chunks)
            others, experts = self._split_segments(plan.cursor, plan.num_segments)
            t = cost.host_overhead + (cost.embed_base if plan.new else 0.0)
            # a non-expert segment's time depends on its kind only: priced once per kind
            by_kind: dict[str, float] = {}
            for seg in others:  # in order (None: an expert segment's overhead)
                if seg is None:
                    t += cost.segment_overhead
                    continue
                dt = by_kind.get(seg.kind)
                if dt is None:
                    dt = by_kind[seg.kind] = cost.segment_time(seg, rows, ctx, E, span)
                t += dt
            for layer, size in experts:
                rows_at.setdefault(layer, [0.0] * len(plans))[r] += rows * size / E
            if plan.finishes:
                t += cost.segment_time(self.segments[-1], sampled, ctx, E)
            non_expert = max(non_expert, t)
        experts = sum(
            self.ep.block_time(layer, sum(rs), max(rs), cost.expert_base, cost.expert_per_row)
            for layer, rs in rows_at.items()
        )
        return non_expert + experts

    def _split_segments(
        self, cursor: int, n: int
    ) -> tuple[list[Segment | None], list[tuple[int, int]]]:
        """A plan's span as ``lockstep_time`` prices it (memoised per span): its segments in
        order with each expert segment as None (it pays only its overhead there), and its
        expert segments as (layer, experts in the segment)."""
        key = (cursor, n)
        parts = self._spans.get(key)
        if parts is None:
            segs = self.segments[cursor : cursor + n]
            parts = (
                [None if s.kind == "experts" else s for s in segs],
                [(s.layer, s.group_size) for s in segs if s.kind == "experts"],
            )
            self._spans[key] = parts
        return parts

    # -- results ---------------------------------------------------------------------------------

    def result(self) -> MultiResult:
        records: dict[str, SimRecord] = {}
        totals: Counter = Counter()
        for rep in self.replicas:
            res = rep.sim.result()
            records |= res.records
            for k, v in res.stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
                    totals[k] += v
        q, h = totals["prefix_cache_queries"], totals["prefix_cache_hits"]
        loads = [rep.dispatched_tokens for rep in self.replicas]
        mean_load = sum(loads) / len(loads)
        stats = dict(totals) | {
            "replicas": len(self.replicas),
            "prefix_cache_hit_rate": h / q if q else 0.0,
            "dispatch_imbalance": max(loads) / mean_load if mean_load else 1.0,
            "dispatched": [rep.dispatched for rep in self.replicas],
            "expert_rank_balance": self.ep.rank_balance if self.ep else None,
            "expert_stay_share": self.ep.stay_share if self.ep else None,
            "migrations": self.ep.migrations if self.ep else 0,
            "migration_stall_s": self.stall_s,
            "steps": self.steps,
            "end_time": self.now,
            "board_reads": self.board.reads,
        }
        started = {
            rep.sim.requests[seq].request_id: t
            for rep in self.replicas
            for seq, t in rep.started.items()
        }
        return MultiResult(records, dict(self.replica_of), stats, started)


def served_once(result: MultiResult, requests: list[Request]) -> bool:
    """Every request finished exactly once, on the replica it was dispatched to."""
    return all(
        r.request_id in result.replica_of
        and result.records[r.request_id].finish_reason == "length"
        and r.status == Status.FINISHED
        for r in requests
    ) and len(result.records) == len(requests)
