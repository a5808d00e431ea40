"""Priority-aware scheduling, including preemption inside a forward pass. Plain Python.

Contract (see ``plan.py``): ``schedule() -> Plan | None`` picks the next piece of work and
``update(plan, result)`` records what the executor did with it. Only the executor touches device
arrays.

Policies, all over the same segments:

- ``fcfs``: the paper's baseline. Iteration level, first come first served, decode-first: while
  any admitted request is decoding, passes hold only decode rows and new requests wait.
- ``priority``: a stronger baseline. Iteration level; each pass takes rows in priority order
  (lower is more urgent), so LS work goes first at every iteration boundary and a waiting LS
  request displaces BE requests from the pass (and, if KV pages are short, evicts an idle BE
  request, which later recomputes its KV).
- ``qllm``: preemptive. Passes advance one segment (``granularity="expert"``) or one layer
  (``"layer"``) per plan. When more urgent work is runnable, the active pass is parked at its
  cursor and the urgent work runs. Parked passes wait in per-cursor queues; a later pass that
  reaches a parked pass's cursor absorbs its rows (LS rows always, BE rows when that pass
  carries or was started to take BE rows, or with ``absorb_be``). A new pass holds one
  priority class, except that LS decode rows with no LS prompt among them are topped up with
  BE rows (``mix_decodes``; every pass with ``mix_classes``). A mixed pass is split when an LS
  request waits: its LS rows continue, its BE rows park. Aging and a maximum park time bound
  how long BE work can be held back.

Priority keys are ``(effective priority, arrival time, seq_id)``; lower sorts first. Inside a
priority class, requests fill passes (and get admitted) in ``queue_order``: ``fcfs`` (arrival),
``sjf`` (least prefill work left first) or ``hrrn`` (highest response ratio first), with
in-class aging (``age_after_s``); no ordering or aging rule of ``queue_order`` crosses classes.
KV pages are reserved at admission for the whole prompt plus ``max_tokens`` (pages mapped from
the prefix cache counted once), so an admitted request never runs out of pages; when pages are
short, new work waits.

Requests are forgotten once their end has been reported (``update`` returns them, ``abort``
returns the aborted one), so a long-running scheduler holds only live requests.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator
import time
from collections.abc import Callable, Iterable
from typing import Literal

from . import snapshot
from .pages import PageAllocator, extend_hashes, reusable_pages
from .plan import Chunk, Plan, SampleSpec, Segment, StepResult, Swap
from .request import Request, Status
from .sampling_params import is_int

Policy = Literal["fcfs", "priority", "qllm"]
Granularity = Literal["layer", "expert"]
QueueOrder = Literal["fcfs", "sjf", "hrrn"]
POLICIES: tuple[str, ...] = ("fcfs", "priority", "qllm")
QUEUE_ORDERS: tuple[str, ...] = ("fcfs", "sjf", "hrrn")

PRESETS: dict[str, dict] = {
    # The reference code's behaviour: its pass order (prefill and decode never in one pass, LS
    # batches topped up with BE rows), parked rows ride along with any later pass, prefill
    # never preempted, preemption between layers only, no aging or park timeout.
    "paper": dict(
        policy="qllm",
        granularity="layer",
        aging_s=None,
        max_park_s=None,
        absorb_be=True,
        preempt_prefill=False,
        prefill_first=True,
        paper_order=True,
        mix_classes=True,
        mix_prefill_decode=False,
        be_share=None,
        queue_order="fcfs",
        age_after_s=None,
    ),
}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    num_pages: int
    max_model_len: int
    policy: Policy = "qllm"
    granularity: Granularity = "expert"
    max_batch_size: int = 32  # requests in one pass
    max_num_batched_tokens: int = 512  # rows in one pass
    prefill_chunk: int | None = None  # tokens of one prompt per pass (None: the row budget)
    # Anti-starvation that never puts BE above LS: once a BE request has made no progress for
    # be_starve_s, BE work gets at least be_share of the engine's work (row-segments, over a
    # window of ~1000 segments) until it is back above that share. None: off.
    be_share: float | None = 0.1
    be_starve_s: float = 5.0
    # Class-inverting anti-starvation, off by default: a BE request gains one priority level per
    # aging_s waited (under overload, waiting BE work then outranks new LS work), and a pass
    # parked longer than max_park_s resumes first and runs to its end.
    aging_s: float | None = None
    max_park_s: float | None = None
    absorb_be: bool = False  # LS passes also absorb parked BE passes (the paper does)
    preempt_prefill: bool = True  # the paper never preempts a prefill pass
    # New passes top LS rows up with BE rows (split off again when another LS request waits);
    # False: one priority class per pass (but see mix_decodes)
    mix_classes: bool = False
    # A new pass whose most urgent class has only decode rows free (no prompt of that class to
    # protect) is topped up with less urgent rows, as an iteration-level batch is: a pass of a
    # few LS decode rows costs nearly what a full BE pass does (the same weight reads, segment
    # calls and head), so running it alone loses most of a pass of BE work per LS token. The
    # first token of an LS request (its prompt) still runs in a pass of its class; when an LS
    # prompt arrives, the mixed pass splits (split_mixed) or, without preemption, ends first.
    mix_decodes: bool = True
    # A parked pass whose class has free requests waiting is rejoined by a new pass of them
    # (absorbed at its cursor) rather than resumed alone
    rejoin_parked: bool = True
    # A mixed pass sheds its BE rows (they park) when an LS request waits for the executor
    split_mixed: bool = True
    # Within a priority class, prompts fill a pass before decodes (better TTFT, worse TPOT)
    prefill_first: bool = False
    # A pass may hold prefill chunks and decode rows together (the reference code never mixes)
    mix_prefill_decode: bool = True
    # qllm: preempt inside passes (False: every pass runs whole; the ablation of in-pass
    # preemption, all else equal)
    preempt: bool = True
    # qllm: the reference code's pass order: a full LS decode batch; else LS prompts topped up
    # with BE prompts; else LS decodes topped up with BE decodes; else BE decodes; else BE
    # prompts (with mix_prefill_decode=False and mix_classes=True, as its preset sets)
    paper_order: bool = False
    # KV pages as sequences grow: admission gives a request the pages its tokens need now, and
    # each new chunk takes the pages it writes; when none are free, idle less urgent requests
    # are evicted (they recompute their KV when readmitted). False: a request reserves pages
    # for prompt + max_tokens at admission (clients that omit max_tokens reserve the context).
    grow_pages: bool = False
    # Host slots (KV pages' worth of host memory) for the KV of evicted requests: an evicted
    # request's computed pages are copied out and back in when it is readmitted, instead of
    # being recomputed (vLLM's swap space). 0: evicted requests recompute. A request whose pages
    # do not fit the free slots recomputes too.
    swap_pages: int = 0
    # Automatic prefix caching (vLLM's name): full computed KV pages are shared by content
    enable_prefix_caching: bool = True
    # Order inside a priority class (policies priority and qllm; fcfs is arrival order by
    # definition): "fcfs" by arrival, "sjf" least prefill work left first (uncached tokens),
    # "hrrn" highest (wait + work) / work first. A request waiting age_after_s or longer goes
    # ahead of unaged ones of its class, in arrival order (None: never)
    queue_order: QueueOrder = "sjf"
    age_after_s: float | None = 5.0
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("page_size", "num_pages", "max_model_len", "max_batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not is_int(self.swap_pages) or self.swap_pages < 0:
            raise ValueError(f"swap_pages must be an int >= 0, got {self.swap_pages!r}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {self.page_size}")
        if self.num_pages < 2:
            raise ValueError(f"need at least 2 KV pages (one is scratch), got {self.num_pages}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.granularity not in ("layer", "expert"):
            raise ValueError(f"granularity must be 'layer' or 'expert', got {self.granularity!r}")
        if (
            not is_int(self.max_num_batched_tokens)
            or self.max_num_batched_tokens < self.max_batch_size
        ):
            raise ValueError(
                "need max_num_batched_tokens >= max_batch_size, got "
                f"{self.max_num_batched_tokens!r} and {self.max_batch_size}"
            )
        if self.prefill_chunk is not None and (
            not is_int(self.prefill_chunk) or self.prefill_chunk < 1
        ):
            raise ValueError(f"prefill_chunk must be an int >= 1 or None, got {self.prefill_chunk}")
        if self.queue_order not in QUEUE_ORDERS:
            raise ValueError(f"queue_order must be one of {QUEUE_ORDERS}, got {self.queue_order!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}"
            )
        for name in ("aging_s", "max_park_s", "be_share", "age_after_s"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be > 0 or None (off), got {value!r}")
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite or None (off), got {value!r}")
        if self.be_share is not None and self.be_share >= 1:
            raise ValueError(f"be_share must be below 1, got {self.be_share}")
        if not (isinstance(self.be_starve_s, (int, float)) and self.be_starve_s >= 0):
            raise ValueError(f"be_starve_s must be >= 0, got {self.be_starve_s!r}")

    @property
    def chunk_size(self) -> int:
        return self.prefill_chunk or self.max_num_batched_tokens

    @classmethod
    def from_options(cls, preset: str | None = None, **options) -> SchedulerConfig:
        """A config from keyword options over a named preset's values (explicit options win).
        Unknown option names raise ``TypeError``, an unknown preset ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown scheduler option(s): {', '.join(sorted(unknown))}")
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        return cls(**(PRESETS.get(preset, {}) | options))


@dataclasses.dataclass
class PassState:
    pass_id: int
    chunks: list[Chunk]
    cursor: int = 0  # next segment to run
    parked_since: float | None = None  # None while not parked
    # runs to its end, never parked again: it holds rows parked past max_park_s, or it is a
    # pass of BE work on its turn (be_share)
    held: bool = False
    # the least urgent class the pass was started to carry (mix_classes, mix_decodes), so that
    # it absorbs parked rows of that class on its way even while its own rows are all more
    # urgent; None: the classes of its rows
    accepts: int | None = None

    _snapshot: tuple[Chunk, ...] = ()

    def snapshot(self) -> tuple[Chunk, ...]:
        """``chunks`` as a tuple, the same object while they do not change (cheap to compare)."""
        if len(self._snapshot) != len(self.chunks) or any(
            map(operator.is_not, self._snapshot, self.chunks)
        ):
            self._snapshot = tuple(self.chunks)
        return self._snapshot

    @property
    def seq_ids(self) -> list[int]:
        return [c.seq_id for c in self.chunks]

    @property
    def has_prefill(self) -> bool:
        return any(c.num_tokens > 1 or not c.samples for c in self.chunks)


class _TokenView:
    """A request's prompt and output tokens as one sequence for ``extend_hashes`` (its length
    and slices), without building ``all_token_ids``: a decoding request fills a page every
    ``page_size`` tokens, and copying its whole context each time cost more than the hash."""

    def __init__(self, req: Request) -> None:
        self.req = req

    def __len__(self) -> int:
        return self.req.num_tokens

    def __getitem__(self, s: slice) -> tuple[int, ...]:
        return self.req.token_slice(s.start, s.stop)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        segments: list[Segment],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not segments or segments[-1].kind != "head":
            raise ValueError("the segment layout must end with the head")
        self.config = config
        self.segments = segments
        self.head = len(segments) - 1  # cursor of the head segment
        self.clock = clock
        self.allocator = PageAllocator(
            config.num_pages, config.page_size, config.enable_prefix_caching
        )
        self.rows_done = 0  # rows computed in finished passes: hrrn's measure of waiting
        self._remapped = 0  # allocator.version when prefixes were last remapped
        self.requests: dict[str, Request] = {}  # live requests by id
        self.seqs: dict[int, Request] = {}  # live requests by sequence id
        self.waiting: list[Request] = []  # not admitted: no pages yet
        self.admitted: list[Request] = []  # hold pages (running, or parked inside a pass)
        self.passes: dict[int, PassState] = {}
        self.active: int | None = None  # the pass being advanced (qllm)
        self.in_pass: dict[int, int] = {}  # seq_id -> pass_id
        self.counters: collections.Counter[str] = collections.Counter()
        # urgent arrival -> its pass starts (qllm), the most recent ones
        self.preempt_waits: collections.deque[float] = collections.deque(maxlen=10_000)
        self._ended: list[int] = []  # sequences ended since the last plan (go in the next one)
        self._next_pass = 0
        # decayed row-segments of work done per class (0: LS, 1: BE), for be_share
        self._work = [0.0, 0.0]
        self._counted: tuple[tuple[Chunk, ...] | None, list[int]] = (None, [0, 0])
        self.longest_be_stall = 0.0  # longest a BE request went without progress (s)
        # the active pass, when its next plan needs no decision: nothing more urgent waits and
        # nothing changed since (add, abort, a finished pass, a failure invalidate it)
        self._quiet: int | None = None
        self._starved: list[Request] = []  # rows the last decision skipped for lack of pages
        # host slots for swapped-out KV pages; the swaps the next plan carries; slots emptied
        # by a plan's swap-in, free again once that plan ran
        self._host_free: list[int] = list(range(config.swap_pages))
        self._swap_outs: list[Swap] = []
        # readmitted with swapped pages since the last plan: seq_id -> (request, its slots,
        # its swapped tokens, pages the prefix cache mapped instead); the next plan swaps them in
        self._readmitted: dict[int, tuple[Request, list[int], int, int]] = {}
        self._swapped_in_slots: list[int] = []
        # seq_id -> ((allocator.contents_version, num_tokens), cached prefix pages)
        self._prefix_len: dict[int, tuple[tuple[int, int], int]] = {}
        self._page_tuples: dict[int, tuple[list[int], tuple[int, ...]]] = {}  # _page_tuple's
        self._live_be = 0  # BE requests waiting or admitted (none: _be_due needs no scan)

    # -- requests -------------------------------------------------------------------------------

    def pages_needed(self, req: Request) -> int:
        """Pages a request takes at admission: its whole reservation, or with ``grow_pages``
        those its tokens so far need."""
        if self.config.grow_pages:
            return math.ceil(min(req.num_tokens, req.max_len) / self.config.page_size)
        return math.ceil(req.max_len / self.config.page_size)

    def _admission_room(self) -> int:
        """Pages kept free at admission with ``grow_pages``, so admitted requests can grow a
        while before anyone is evicted (vLLM's watermark: 1 % of the cache); none when no
        request is admitted, so that any request that fits the cache alone gets in."""
        if not self.config.grow_pages or not self.admitted:
            return 0
        return max(1, (self.config.num_pages - 1) // 100)

    def check(self, req: Request) -> None:
        """Raise ``ValueError`` if ``req`` can never be served here (nothing is changed)."""
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if req.seq_id in self.seqs:
            raise ValueError(f"sequence id {req.seq_id} is already in use")
        if len(req.prompt_token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"prompt of {len(req.prompt_token_ids)} tokens leaves no room to generate "
                f"(max_model_len={self.config.max_model_len})"
            )
        need = math.ceil(self._max_len(req) / self.config.page_size)
        if need > self.config.num_pages - 1:
            raise ValueError(
                f"request needs {need} KV pages but the cache has "
                f"{self.config.num_pages - 1}; lower max_tokens or give the cache more pages"
            )

    def add(self, req: Request) -> None:
        self.check(req)
        self.enter(req, req.arrival_time)
        self.waiting.append(req)

    def enter(self, req: Request, progress_at: float) -> None:
        """Register a checked request (new, or restored from a snapshot: ``progress_at`` is
        when it last progressed, for anti-starvation); the caller queues or admits it."""
        req.max_len = self._max_len(req)
        req.last_progress = progress_at
        req.arrival_work = self.rows_done
        self._live_be += req.priority > 0
        self._quiet = None
        self.requests[req.request_id] = req
        self.seqs[req.seq_id] = req

    def _max_len(self, req: Request) -> int:
        return min(len(req.prompt_token_ids) + req.sampling.max_tokens, self.config.max_model_len)

    def abort(self, request_id: str) -> Request | None:
        """Stop a request and free what it holds; its rows leave their carry with the next plan.
        Returns the aborted request (now forgotten), or None for unknown or finished ids."""
        req = self.requests.get(request_id)
        if req is None or req.status.done:
            return None
        self._quiet = None
        self._leave_pass(req)
        self._finish(req, "abort", Status.ABORTED)
        self._forget(req)
        return req

    def stop(self, request_id: str) -> Request | None:
        """End a live request now with ``finish_reason="stop"``: the engine matched one of its
        stop strings in the detokenised text, which the scheduler cannot see. Frees what it
        holds, like ``abort``. Returns the request (now forgotten), or None."""
        req = self.requests.get(request_id)
        if req is None or req.status.done:
            return None
        self._leave_pass(req)
        self._finish(req, "stop", Status.FINISHED)
        self._forget(req)
        return req

    # -- durable jobs: requests as plain data, and back (the logic is in snapshot.py) ----------

    def snapshot(self, request_ids: Iterable[str]) -> list[dict]:
        """JSON-ready states of the live requests among ``request_ids``, for a checkpoint."""
        return snapshot.take(self, request_ids, self.clock())

    def restore(
        self, states: list[dict], new_seq_id: Callable[[], int], keep_kv: bool = True
    ) -> list[Request]:
        """Bring back requests saved by ``snapshot`` (see ``snapshot.restore``)."""
        return snapshot.restore(self, states, self.clock(), new_seq_id, keep_kv)

    def restore_pass(self, rows: list[tuple[Request, int]], cursor: int) -> int:
        """Park restored rows as one pass at ``cursor`` (see ``snapshot.restore_pass``)."""
        return snapshot.restore_pass(self, rows, cursor, self.clock())

    @property
    def swap_pages_free(self) -> int:
        """Host slots free for swapped-out KV pages."""
        return len(self._host_free)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.admitted)

    def key(self, req: Request, now: float) -> tuple[float, float, int]:
        return (self.effective_priority(req, now), req.arrival_time, req.seq_id)

    def _row_order_key(self, now: float) -> Callable[[Request], tuple]:
        """``_row_order`` at ``now`` as a sort key. Without aging, ``prefill_first`` or a
        work-based queue order the key is plain request fields, built without the method
        calls (the same tuples: sorting once per decision over every free row is the
        scheduler's hottest loop)."""
        cfg = self.config
        if cfg.aging_s is None and not cfg.prefill_first and cfg.queue_order == "fcfs":
            return lambda r: (r.priority, 0, r.arrival_time, r.seq_id)
        return lambda r: self._row_order(r, now)

    def _row_order(self, req: Request, now: float) -> tuple:
        """Order in which requests fill a new pass: by key, or with ``prefill_first`` prompts
        of a class ahead of that class's decodes (the reference code's order: a new LS prompt
        never queues behind running LS decodes)."""
        prio = self.effective_priority(req, now)
        first = not req.in_prefill if self.config.prefill_first else 0
        return (prio, first, *self._queue_key(req, now))

    def _queue_key(self, req: Request, now: float) -> tuple:
        """Order inside a priority class, lower first (``queue_order``). ``sjf``: by the tokens
        a request must still feed before its next sample (uncached prompt tokens; 1 for a
        decode, so running requests keep their seats); ``hrrn``: by the response ratio
        (wait + work) / work, wait counted in rows the engine computed since the request
        arrived, so both terms are tokens and no clock or cost estimate is needed (on a busy
        engine that is proportional to time), ties to the smaller work. Both age: a request
        that has waited ``age_after_s`` goes ahead of every unaged one, in arrival order, so
        a stream of short requests cannot starve a long one."""
        order = self.config.queue_order
        if order == "fcfs":
            return (req.arrival_time, req.seq_id)
        age = self.config.age_after_s
        if age is not None and now - req.arrival_time >= age:
            return (0, req.arrival_time, req.seq_id)
        work = self._work_left(req)
        if order == "sjf":
            return (1, work, req.arrival_time, req.seq_id)
        ratio = (self.rows_done - req.arrival_work + work) / work
        return (1, -ratio, work, req.arrival_time, req.seq_id)

    def _work_left(self, req: Request) -> int:
        """Tokens ``req`` must still feed before it samples again (at least 1): for a waiting
        request, those the prefix cache does not hold now."""
        if req.status == Status.WAITING:
            held = max(self._cached_prefix_len(req) * self.config.page_size, req.swapped_tokens)
            return max(1, req.num_tokens - held)
        return max(1, req.num_tokens - req.num_computed)

    def effective_priority(self, req: Request, now: float) -> int:
        """Priority after aging: BE work gains one level per ``aging_s`` waited, down to 0."""
        if req.priority <= 0 or self.config.aging_s is None:
            return req.priority
        return max(0, req.priority - int((now - req.arrival_time) / self.config.aging_s))

    # -- the two calls of the contract ----------------------------------------------------------

    def schedule(self) -> Plan | None:
        """The next plan, or None when there is nothing to do (not even rows to drop)."""
        now = self.clock()
        quiet = self._quiet is not None and self._quiet == self.active and not self._ended
        if quiet and self.config.aging_s is None:  # (aging changes priorities with time)
            plan = self._advance(self.passes[self.active], now)  # nothing to decide
            if plan.finishes or plan.absorb or plan.split_seq_ids:
                self._quiet = None
        else:
            self._quiet = None
            plan = self._decide(now)
            # (a row skipped early may have been evicted since, for a more urgent one)
            starved = [r for r in self._starved if r.status is Status.RUNNING]
            if plan is None and starved:
                # every row that could go first had no pages and could evict no one: the least
                # urgent of them steps back (it recomputes later), so that the others can run
                self._evict(max(starved, key=self._growth_rank(now)), growth=True)
                plan = self._decide(now)
        if plan is not None:
            self._count_work(plan)
        swapping = self._swap_outs or self._readmitted
        if plan is None and (self._ended or swapping):
            plan = Plan(None)
        if plan is not None and (self._ended or swapping):
            swap_in, drop = self._swap_ins()
            plan = dataclasses.replace(
                plan,
                finished_seq_ids=tuple(self._ended),
                swap_out=tuple(self._swap_outs),
                swap_in=swap_in,
                drop_slots=drop,
            )
            self._ended.clear()
            self._swap_outs = []
        return plan

    def _decide(self, now: float) -> Plan | None:
        self._starved = []
        self._admit(now)
        self._remap_prefixes()
        if self.config.policy == "qllm":
            return self._schedule_preemptive(now)
        return self._schedule_iteration(now)

    def update(self, plan: Plan, result: StepResult) -> list[Request]:
        """Record what the executor did with ``plan``. Returns the requests that advanced or
        ended (finished, or failed with ``finish_reason="error"``); ended ones are forgotten."""
        self._host_free += self._swapped_in_slots
        self._swapped_in_slots = []
        out = self._fail(result.failed)
        if result.reset:
            self._recompute_all()
        if result.failed or result.reset or plan.finishes:
            self._quiet = None
        if plan.finishes and plan.pass_id in self.passes:
            ps = self.passes.pop(plan.pass_id)
            if self.active == plan.pass_id:
                self.active = None
            now = self.clock()
            self._count_pass(ps)
            page_size = self.config.page_size
            for chunk in ps.chunks:  # (every row of every pass: Chunk's properties inlined)
                req = self.seqs[chunk.seq_id]
                del self.in_pass[chunk.seq_id]
                n = len(chunk.token_ids)
                req.num_computed = chunk.start + n
                req.status = Status.RUNNING
                self._progress(req, now)
                self.rows_done += n
                if req.num_computed // page_size > req.cached_pages:
                    self._cache_pages(req)  # (it filled a page)
                if chunk.sample is not None:
                    self._append(req, result.tokens[chunk.seq_id], now)
                out.append(req)
        for req in out:
            if req.status.done:
                self._forget(req)
        return out

    def stats(self) -> dict:
        """Counters and queue sizes: KV pages, waiting / running requests, live and parked
        passes, preemptions by granularity, splits, absorbs, evictions, preemption waits."""
        waits = sorted(self.preempt_waits)
        pct = lambda q: waits[min(len(waits) - 1, int(q * len(waits)))] if waits else None  # noqa: E731
        return {
            "kv_pages_total": self.allocator.num_pages - 1,
            "kv_pages_used": self.allocator.num_used,
            "kv_pages_free": self.allocator.num_free,
            "waiting": len(self.waiting),
            "running": len(self.admitted),
            "passes_live": len(self.passes),
            "parked_rows": self.parked_rows(),
            "swap_pages_free": self.swap_pages_free,
            **{
                name: self.counters[name]
                for name in (
                    "preemptions_layer",
                    "preemptions_expert",
                    "splits",
                    "absorbed_passes",
                    "partial_absorbs",
                    "evictions",
                    "growth_evictions",
                    "swapped_out_pages",
                    "swapped_in_pages",
                    "swap_misses",
                    "failed",
                    "resets",
                    "passes_ls",
                    "passes_be",
                    "rows_ls",
                    "rows_be",
                    "be_turns",
                )
            },
            **self._prefix_stats(),
            "preempt_wait_s_p50": pct(0.5),
            "preempt_wait_s_p99": pct(0.99),
            "preempt_wait_s_max": waits[-1] if waits else None,
            "be_work_share": self._work[1] / sum(self._work) if sum(self._work) else None,
            "be_longest_wait_s": self.be_longest_wait(self.clock()),
        }

    def be_longest_wait(self, now: float) -> float:
        """The longest a BE request has gone without progress, so far or still waiting."""
        live = (now - r.last_progress for r in (*self.waiting, *self.admitted) if r.priority > 0)
        return max(self.longest_be_stall, max(live, default=0.0))

    # -- iteration-level policies ---------------------------------------------------------------

    def _schedule_iteration(self, now: float) -> Plan | None:
        free = self._free()
        if self.config.policy == "fcfs":
            free.sort(key=lambda r: (r.arrival_time, r.seq_id))
            decoding = [r for r in free if not r.in_prefill]
            if decoding:  # decode-first: prefills wait until every decode is done
                free = decoding
        else:
            free.sort(key=self._row_order_key(now))
            if self._be_due(now):  # starving BE rows take their share of the seats first
                free = self._starving_first(free, now)
                self.counters["be_turns"] += 1
        chunks = self._chunks(self._one_kind(free))
        if not chunks:
            return None
        ps = self._new_pass(chunks)
        ps.cursor = self.head
        return Plan(ps.pass_id, 0, self.head, tuple(chunks), new=True, finishes=True, fused=True)

    # -- the preemptive policy ------------------------------------------------------------------

    def _schedule_preemptive(self, now: float) -> Plan | None:
        active = self.passes.get(self.active) if self.active is not None else None
        quiet = active is not None  # nothing could park or split it later, absent news
        if active is not None and not active.held:
            urgent = self._most_urgent_free(now)
            if urgent is not None:
                best, mine = self.key(urgent, now)[0], self._pass_priority(active, now)
                splits = self.config.split_mixed and self.config.preempt
                splits = splits and best <= mine and self._is_mixed(active, now)
                quiet = best >= mine and not splits
                if best < mine and self._may_park(active):
                    self._park(active, now)
                    self.preempt_waits.append(now - urgent.arrival_time)
                    active = None
                elif splits:
                    return self._split(active, now)
        if active is None:
            active, quiet = self._pick_pass(now), False
            if active is None:
                return None
        plan = self._advance(active, now)
        if quiet and not (plan.finishes or plan.absorb or plan.split_seq_ids):
            self._quiet = active.pass_id
        return plan

    def _pick_pass(self, now: float) -> PassState | None:
        """The next pass to run: a parked one, or a new one from free requests, by urgency."""
        parked = [p for p in self.passes.values() if p.parked_since is not None]
        free = sorted(self._free(), key=self._row_order_key(now))
        turn = False
        if self._be_due(now):  # BE's turn: one whole pass of its parked or free work
            be_parked = [p for p in parked if self._pass_priority(p, now) > 0]
            be_free = [r for r in free if self.effective_priority(r, now) > 0]
            if be_parked or be_free:
                parked, free = be_parked, self._starving_first(be_free, now)
                self.counters["be_turns"] += 1
                turn = True
        best_parked = min(parked, key=lambda p: self._parked_key(p, now), default=None)
        top = self.effective_priority(free[0], now) if free else 0
        least = top  # the least urgent class the new pass takes, from free or parked rows
        if self.config.paper_order:
            free = self._paper_order(free, now)
        elif free and not self._mixes(free, top, now):
            # one priority class per new pass: BE rows never slow down an LS prompt
            free = [r for r in free if self.effective_priority(r, now) == top]
        elif free:
            least = max(self._pass_priority(p, now) for p in parked) if parked else top
            least = max(least, self.effective_priority(free[-1], now))
        free = self._one_kind(free)
        # parked rows this pass will absorb on its way keep their seats ahead of younger rows
        on_the_way = [p for p in parked if free and self._welcome(top, least, p, now)]
        chunks = self._chunks(free, now, on_the_way)
        resume = best_parked is not None and (
            not chunks or self._parked_key(best_parked, now) <= self.key(free[0], now)
        )
        if resume and chunks and self._rejoin(best_parked, free[0], chunks, now):
            resume = False  # a new pass of its class will absorb it at its cursor
        if resume:
            best_parked.held = turn or self._expired(best_parked, now)
            self._unpark(best_parked, now)
            self.active = best_parked.pass_id
            return best_parked
        if not chunks:
            return None
        ps = self._new_pass(chunks)
        ps.held, ps.accepts = turn, least
        self.active = ps.pass_id
        return ps

    def _mixes(self, free: list[Request], top: int, now: float) -> bool:
        """Whether a new pass from ``free`` (in row order; ``top`` its most urgent class) takes
        less urgent rows after that class's: always with ``mix_classes``; with ``mix_decodes``
        when every free row of class ``top`` is a decode (one token to feed: no prompt, and no
        output being recomputed after an eviction)."""
        if self.config.mix_classes:
            return True
        if not self.config.mix_decodes:
            return False
        urgent = (r for r in free if self.effective_priority(r, now) == top)
        return all(r.num_tokens - r.num_computed == 1 for r in urgent)

    def _rejoin(
        self, parked: PassState, free_head: Request, chunks: list[Chunk], now: float
    ) -> bool:
        """Start a new pass (``chunks``) instead of resuming ``parked`` alone when both are the
        same class and the new pass has room for it: it absorbs ``parked`` on reaching its
        cursor, so the rows share one weight read per segment instead of two half-empty
        passes (the paper's per-expert queues). Without room, ``parked`` resumes, so it can
        never be passed over forever."""
        if not self.config.rejoin_parked or self._expired(parked, now):
            return False
        same = self._pass_priority(parked, now) == self.effective_priority(free_head, now)
        rows = sum(c.num_tokens for c in chunks + parked.chunks)
        seqs = len(chunks) + len(parked.chunks)
        return (
            same
            and rows <= self.config.max_num_batched_tokens
            and seqs <= self.config.max_batch_size
        )

    def _advance(self, ps: PassState, now: float, partial: bool = True) -> Plan:
        """Advance ``ps`` to its next preemption point, absorbing the parked passes waiting at
        its cursor that fit. With ``partial`` a parked pass that only partly fits is taken in
        part: its most urgent rows join, the rest stay parked as a new pass (one plan merges
        and splits the carries)."""
        new = ps.cursor == 0
        absorb, left = self._absorbable(ps, now, partial) if ps.cursor > 0 else ([], [])
        ps.held |= any(self._expired(other, now) for other in absorb)
        rest = self._leave_parked(absorb, left) if left else None
        for other in absorb:
            self._unpark(other, now)
            del self.passes[other.pass_id]
            for c in other.chunks:
                self.in_pass[c.seq_id] = ps.pass_id
            ps.chunks += other.chunks
            self.counters["absorbed_passes"] += 1
        start = end = ps.cursor
        if not self._may_park(ps):
            end = self.head  # not preemptible: run to the end
        elif self.config.granularity == "expert":
            end = start + 1
        else:
            end = start + 1
            while not self.segments[end].layer_boundary:
                end += 1
        ps.cursor = min(end, self.head)
        return Plan(
            ps.pass_id,
            start,
            ps.cursor - start,
            ps.snapshot(),
            new=new,
            absorb=tuple(o.pass_id for o in absorb),
            finishes=ps.cursor == self.head,
            split_seq_ids=tuple(c.seq_id for c in left),
            split_pass_id=rest.pass_id if rest is not None else None,
        )

    def _leave_parked(self, absorb: list[PassState], left: list[Chunk]) -> PassState:
        """Rows ``left`` of the passes being absorbed stay parked, as one new pass at the same
        cursor (parked since the earliest of their passes)."""
        seqs = {c.seq_id for c in left}
        since = min(o.parked_since for o in absorb if any(s in seqs for s in o.seq_ids))
        for other in absorb:
            other.chunks = [c for c in other.chunks if c.seq_id not in seqs]
        rest = self._new_pass(left)
        rest.cursor, rest.parked_since = absorb[0].cursor, since
        self.counters["partial_absorbs"] += 1
        return rest

    def _split(self, ps: PassState, now: float) -> Plan:
        """LS rows of a mixed pass continue; its BE rows park at the same cursor."""
        best = min(self.effective_priority(self.seqs[s], now) for s in ps.seq_ids)
        keep = [c for c in ps.chunks if self.effective_priority(self.seqs[c.seq_id], now) == best]
        moved = [c for c in ps.chunks if self.effective_priority(self.seqs[c.seq_id], now) != best]
        cursor, ps.chunks, ps.accepts = ps.cursor, keep, best  # it sheds the rest on its way too
        # before the split-off pass exists (it must not absorb it); one split per plan
        plan = self._advance(ps, now, partial=False)
        parked = self._new_pass(moved)
        parked.cursor = cursor
        self._park(parked, now, count=True)
        self.counters["splits"] += 1
        return dataclasses.replace(
            plan, split_seq_ids=tuple(c.seq_id for c in moved), split_pass_id=parked.pass_id
        )

    # -- anti-starvation and pass composition ----------------------------------------------------

    def _be_due(self, now: float) -> bool:
        """Whether BE work is owed its share: a BE request has made no progress for
        ``be_starve_s`` and BE's share of recent work is below ``be_share``."""
        share = self.config.be_share
        total = sum(self._work)
        if share is None or (total and self._work[1] / total >= share) or not self._live_be:
            return False
        limit = now - self.config.be_starve_s
        return any(r.priority > 0 and r.last_progress <= limit for r in self._live())

    def _starving_first(self, ordered: list[Request], now: float) -> list[Request]:
        """``ordered`` with the starving BE requests, longest waiting first, moved ahead (up to
        the share of a pass's seats)."""
        limit = now - self.config.be_starve_s
        starving = [r for r in ordered if r.priority > 0 and r.last_progress <= limit]
        starving.sort(key=lambda r: (r.last_progress, r.seq_id))
        quota = max(1, math.ceil((self.config.be_share or 0) * self.config.max_batch_size))
        first = {id(r) for r in starving[:quota]}
        return starving[:quota] + [r for r in ordered if id(r) not in first]

    def _one_kind(self, ordered: list[Request]) -> list[Request]:
        """Without ``mix_prefill_decode``, only the requests of the first one's kind."""
        if self.config.mix_prefill_decode or not ordered:
            return ordered
        kind = ordered[0].in_prefill
        return [r for r in ordered if r.in_prefill == kind]

    def _paper_order(self, free: list[Request], now: float) -> list[Request]:
        """The reference code's next batch, in order (see ``SchedulerConfig.paper_order``)."""
        urgent = lambda r: self.effective_priority(r, now) <= 0  # noqa: E731
        ls_dec = [r for r in free if urgent(r) and not r.in_prefill]
        ls_pre = [r for r in free if urgent(r) and r.in_prefill]
        be_dec = [r for r in free if not urgent(r) and not r.in_prefill]
        be_pre = [r for r in free if not urgent(r) and r.in_prefill]
        if len(ls_dec) >= self.config.max_batch_size:
            return ls_dec
        if ls_pre:
            return ls_pre + be_pre
        return ls_dec + be_dec if ls_dec else be_dec or be_pre

    def _count_work(self, plan: Plan) -> None:
        """Decayed row-segments of work per class (a window of ~1000 segments)."""
        if not plan.runs:
            return
        if plan.chunks is not self._counted[0]:  # a pass's plans share their chunks
            rows = [0, 0]
            for c in plan.chunks:
                req = self.seqs.get(c.seq_id)
                if req is not None:
                    rows[req.priority > 0] += c.num_tokens
            self._counted = (plan.chunks, rows)
        k = max(plan.num_segments, 1)
        decay = 0.999**k
        ls, be = self._counted[1]
        self._work = [self._work[0] * decay + ls * k, self._work[1] * decay + be * k]

    def _count_pass(self, ps: PassState) -> None:
        """Attribution: passes holding each class, and that class's rows in them."""
        rows = [0, 0]  # LS, BE
        held = [False, False]
        for c in ps.chunks:
            be = self.seqs[c.seq_id].priority > 0
            rows[be] += c.num_tokens
            held[be] = True
        for be, name in ((False, "ls"), (True, "be")):
            if held[be]:
                self.counters[f"passes_{name}"] += 1
                self.counters[f"rows_{name}"] += rows[be]

    def _progress(self, req: Request, now: float) -> None:
        if req.priority > 0:
            self.longest_be_stall = max(self.longest_be_stall, now - req.last_progress)
        req.last_progress = now

    def _live(self):
        yield from self.waiting
        yield from self.admitted

    # -- helpers --------------------------------------------------------------------------------

    def _free(self) -> list[Request]:
        return [r for r in self.admitted if r.seq_id not in self.in_pass]

    def _most_urgent_free(self, now: float) -> Request | None:
        return min(self._free(), key=lambda r: self.key(r, now), default=None)

    def _pass_priority(self, ps: PassState, now: float) -> float:
        """A pass is as urgent as its most urgent row."""
        return min(self.effective_priority(self.seqs[s], now) for s in ps.seq_ids)

    def _is_mixed(self, ps: PassState, now: float) -> bool:
        return len({self.effective_priority(self.seqs[s], now) for s in ps.seq_ids}) > 1

    def _may_park(self, ps: PassState) -> bool:
        return self.config.preempt and (self.config.preempt_prefill or not ps.has_prefill)

    def _expired(self, ps: PassState, now: float) -> bool:
        limit = self.config.max_park_s
        return ps.parked_since is not None and limit is not None and now - ps.parked_since > limit

    def _parked_key(self, ps: PassState, now: float) -> tuple[float, float, int]:
        best = min(self.key(self.seqs[s], now) for s in ps.seq_ids)
        return (-1, *best[1:]) if self._expired(ps, now) else best

    def _welcome(self, mine: int, least: int, other: PassState, now: float) -> bool:
        """Whether a pass whose rows span classes ``mine`` (most urgent) to ``least`` may take
        the rows of the parked pass ``other``: rows of a class it already carries or a more
        urgent one, anything with ``absorb_be`` or ``mix_classes``, and overdue rows."""
        theirs = self._pass_priority(other, now)
        return (
            theirs <= max(mine, least)
            or self.config.absorb_be
            or self.config.mix_classes
            or self._expired(other, now)
        )

    def _absorbable(
        self, ps: PassState, now: float, partial: bool
    ) -> tuple[list[PassState], list[Chunk]]:
        """Parked passes waiting at ``ps``'s cursor that may ride along with it, most urgent
        first, and (with ``partial``) the rows of them that do not fit and stay parked."""
        waiting = [
            p
            for p in self.passes.values()
            if p.parked_since is not None and p.cursor == ps.cursor and p is not ps
        ]
        if not waiting:
            return [], []
        mine = self._pass_priority(ps, now)
        least = max(self.effective_priority(self.seqs[s], now) for s in ps.seq_ids)
        least = max(least, ps.accepts) if ps.accepts is not None else least
        rows, seqs = sum(c.num_tokens for c in ps.chunks), len(ps.chunks)
        out, left = [], []
        for other in sorted(waiting, key=lambda p: self._parked_key(p, now)):
            if not self._welcome(mine, least, other, now):
                continue
            ordered = sorted(other.chunks, key=lambda c: self._row_order(self.seqs[c.seq_id], now))
            take = 0
            for c in ordered:
                if seqs + take + 1 > self.config.max_batch_size:
                    break
                if rows + c.num_tokens > self.config.max_num_batched_tokens:
                    break
                rows, take = rows + c.num_tokens, take + 1
            if take == len(ordered) or (take and partial):
                out.append(other)
                left += ordered[take:]
                seqs += take
            else:
                rows -= sum(c.num_tokens for c in ordered[:take])
        return out, left

    def _park(self, ps: PassState, now: float, count: bool = True) -> None:
        ps.parked_since = now
        if self.active == ps.pass_id:
            self.active = None
        boundary = "layer" if self.segments[ps.cursor].layer_boundary else "expert"
        self.counters[f"preemptions_{boundary}"] += 1
        for s in ps.seq_ids:
            r = self.seqs[s]
            r.status = Status.PARKED
            if count:
                r.num_preemptions += 1

    def _unpark(self, ps: PassState, now: float) -> None:
        for s in ps.seq_ids:
            r = self.seqs[s]
            r.parked_time += now - ps.parked_since
            r.status = Status.RUNNING
        ps.parked_since = None

    def _new_pass(self, chunks: list[Chunk]) -> PassState:
        ps = PassState(self._next_pass, chunks)
        self._next_pass += 1
        self.passes[ps.pass_id] = ps
        for c in chunks:
            self.in_pass[c.seq_id] = ps.pass_id
        return ps

    def _chunks(
        self,
        ordered: list[Request],
        now: float = 0.0,
        on_the_way: list[PassState] | None = None,
    ) -> list[Chunk]:
        """Rows for a new pass from requests in order: one decode row, or a prefill chunk.
        The rows of the parked passes ``on_the_way`` (which the pass absorbs at their cursors)
        keep their seats ahead of any request they precede in row order."""
        budget, seats = self.config.max_num_batched_tokens, self.config.max_batch_size
        held = sorted(
            (
                (self._row_order(self.seqs[c.seq_id], now), c.num_tokens)
                for p in on_the_way or []
                for c in p.chunks
            ),
        )
        chunks, i = [], 0
        chosen: set[int] = set()
        chunk_size, page_size = self.config.chunk_size, self.config.page_size
        for req in ordered:
            if req.status is not Status.RUNNING:
                continue  # evicted for a row chosen before it
            key = self._row_order(req, now) if held else None
            while i < len(held) and held[i][0] < key:
                if held[i][1] > budget or seats == 0:
                    return chunks  # an earlier parked row takes the last room
                budget, seats, i = budget - held[i][1], seats - 1, i + 1
            if budget == 0 or seats == 0:
                break
            remaining = req.num_tokens - req.num_computed
            n = min(remaining, budget, chunk_size if remaining > 1 else 1)
            end = req.num_computed + n
            # (_grow has nothing to do while the pages held cover the row: the usual case)
            if end > len(req.pages) * page_size and not self._grow(req, end, now, chosen):
                self._starved.append(req)
                continue  # no pages for it now: it waits for a pass to free some
            chunks.append(self._chunk(req, n, self._page_tuple(req)))
            chosen.add(req.seq_id)
            budget, seats = budget - n, seats - 1
        return chunks

    def _growth_rank(self, now: float) -> Callable[[Request], tuple]:
        """Urgency for page growth: arrival order for fcfs, the priority key otherwise."""
        if self.config.policy == "fcfs":
            return lambda r: (r.arrival_time, r.seq_id)
        return lambda r: self.key(r, now)

    def _grow(self, req: Request, end: int, now: float, keep: set[int]) -> bool:
        """With ``grow_pages``: give ``req`` the pages for its tokens up to ``end``, evicting
        idle requests less urgent than it (least urgent first; not those in ``keep``, rows
        already chosen) if none are free. False if it cannot have them now."""
        need = math.ceil(end / self.config.page_size) - len(req.pages)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            rank = self._growth_rank(now)
            mine = rank(req)
            victims = sorted(
                (r for r in self._free() if r.seq_id not in keep and rank(r) > mine),
                key=rank,
                reverse=True,
            )
            for victim in victims:
                if self.allocator.can_allocate(need):
                    break
                self._evict(victim, growth=True)
            if not self.allocator.can_allocate(need):
                return False
        req.pages = req.pages + self.allocator.allocate(need)
        return True

    def _page_tuple(self, req: Request) -> tuple[int, ...]:
        """``tuple(req.pages)``, memoised while ``req.pages`` is the same list of the same
        length: every row of a request carries its whole page table, and copying a long
        one at every decode step was the simulator's costliest line. (The scheduler replaces
        a page table with a new list whenever it changes it.)"""
        memo = self._page_tuples.get(req.seq_id)
        if memo is None or memo[0] is not req.pages or len(memo[1]) != len(req.pages):
            memo = (req.pages, tuple(req.pages))
            self._page_tuples[req.seq_id] = memo
        return memo[1]

    @staticmethod
    def _chunk(req: Request, n: int, pages: tuple[int, ...] | None = None) -> Chunk:
        """The next ``n`` tokens of ``req`` to compute, as a snapshot row chunk (``pages``:
        ``tuple(req.pages)``, when the caller has it)."""
        start, sample = req.num_computed, None
        if start + n == req.num_tokens:
            sp = req.sampling
            sample = SampleSpec(
                sp.temperature, sp.top_k, sp.top_p, req.seed, len(req.output_token_ids)
            )
        if pages is None:
            pages = tuple(req.pages)
        return Chunk(req.seq_id, start, req.token_slice(start, start + n), pages, sample)

    def _admit(self, now: float) -> None:
        """Give waiting requests their KV pages, most urgent first (arrival order for fcfs).
        The preemptive and priority policies may evict idle, less urgent requests for pages."""
        if self.config.policy == "fcfs":
            order = sorted(self.waiting, key=lambda r: (r.arrival_time, r.seq_id))
        else:
            order = sorted(
                self.waiting,
                key=lambda r: (self.effective_priority(r, now), *self._queue_key(r, now)),
            )
            if self._be_due(now):
                order = self._starving_first(order, now)
        for req in order:
            if self.config.policy == "fcfs" and len(self.admitted) >= self.config.max_batch_size:
                break
            if not self._reserve(req, now):
                break  # later requests wait behind this one
            self.waiting.remove(req)
            req.status = Status.RUNNING
            self.admitted.append(req)

    def _reserve(self, req: Request, now: float) -> bool:
        """Give ``req`` its KV pages: its cached prefix (shared, counted once) plus fresh pages
        for the rest of ``pages_needed``; the preemptive and priority policies may evict idle,
        less urgent requests for room. False, holding nothing, if they do not fit."""
        cached = self._cached_prefix(req)
        self.allocator.acquire(cached)  # held first: making room must not reuse them
        need = self.pages_needed(req) - len(cached)
        room = need + self._admission_room()
        if not self.allocator.can_allocate(room) and self.config.policy != "fcfs":
            self._evict_for(req, room, now)
            room = need + self._admission_room()  # (none if it evicted every admitted one)
        if not self.allocator.can_allocate(room):
            self.allocator.free(cached)
            return False
        req.pages = cached + self.allocator.allocate(need)
        req.prefix_pages = req.cached_pages = 0
        self.counters["prefix_query_tokens"] += req.num_tokens
        self._map_prefix(req, len(cached))
        if req.swap_slots:
            self._swap_in(req)
        return True

    # -- prefix caching (the pages live in ``self.allocator``) -----------------------------------

    def match_length(self, token_ids: list[int]) -> int:
        """Leading tokens of a prompt the prefix cache holds now (what a request with it would
        not recompute). Plain Python and side-effect free: for a dispatcher choosing a
        replica."""
        return self.allocator.match_length(token_ids)

    def _page_hashes(self, req: Request, n: int) -> list[int]:
        """``req``'s page hash chain, grown to ``n`` pages (``n`` full pages of its tokens)."""
        if len(req.page_hashes) < n:
            extend_hashes(req.page_hashes, _TokenView(req), self.config.page_size, n)
        return req.page_hashes

    def _cached_prefix(self, req: Request) -> list[int]:
        """The cached pages ``req`` may map now: the longest cached run of its full pages
        before its last token (changes nothing)."""
        if not self.config.enable_prefix_caching:
            return []
        n = reusable_pages(req.num_tokens, self.config.page_size)
        return self.allocator.lookup(self._page_hashes(req, n)[:n])

    def _cached_prefix_len(self, req: Request) -> int:
        """``len(self._cached_prefix(req))``, memoised per request on the cache's contents
        (``allocator.contents_version``) and the request's length: sjf orders the waiting
        queue by it at every decision, and it only changes when the cache does."""
        key = (self.allocator.contents_version, req.num_tokens)
        memo = self._prefix_len.get(req.seq_id)
        if memo is None or memo[0] != key:
            memo = (key, len(self._cached_prefix(req)))
            self._prefix_len[req.seq_id] = memo
        return memo[1]

    def _map_prefix(self, req: Request, n: int) -> None:
        """``req``'s first ``n`` pages are now cached ones: their tokens count as computed."""
        ps = self.config.page_size
        self.counters["prefix_hit_tokens"] += (n - req.prefix_pages) * ps
        req.prefix_pages = req.cached_pages = n
        req.num_computed = n * ps
        if not req.output_token_ids:
            req.num_cached_tokens = req.num_computed

    def _remap_prefixes(self) -> None:
        """Admission reserves pages early, often before another request sharing the prompt
        has computed it; until a request first runs, map whatever more of its prefix has been
        cached since (its own pages there were never written: they return to the free list).
        Only after the cache gained content: the check costs a lookup per waiting request."""
        if not self.config.enable_prefix_caching or self.allocator.version == self._remapped:
            return
        self._remapped = self.allocator.version
        ps = self.config.page_size
        for req in self.admitted:
            if req.num_computed != req.prefix_pages * ps or req.seq_id in self.in_pass:
                continue  # started: its pages hold its own K/V now
            cached = self._cached_prefix(req)
            if len(cached) <= req.prefix_pages:
                continue
            fresh = cached[req.prefix_pages :]
            own = req.pages[req.prefix_pages : len(cached)]
            self.allocator.acquire(fresh)
            self.allocator.free(own)
            # a new list, not a slice assignment: _page_tuple knows a page table by identity
            req.pages = req.pages[: req.prefix_pages] + fresh + req.pages[len(cached) :]
            self._map_prefix(req, len(cached))

    def _cache_pages(self, req: Request) -> None:
        """Offer ``req``'s pages that a finished pass has just filled with computed K/V to the
        prefix cache (a page whose content is already cached elsewhere stays private)."""
        full = req.num_computed // self.config.page_size
        if not self.config.enable_prefix_caching or full <= req.cached_pages:
            return
        hashes = self._page_hashes(req, full)
        for i in range(req.cached_pages, full):
            self.allocator.register(req.pages[i], hashes[i])
        req.cached_pages = full

    def _prefix_stats(self) -> dict:
        q, h = self.counters["prefix_query_tokens"], self.counters["prefix_hit_tokens"]
        return {
            "kv_pages_cached": self.allocator.num_cached,
            "kv_pages_evictable": self.allocator.num_evictable,
            "prefix_cache_queries": q,  # tokens of admitted requests looked up
            "prefix_cache_hits": h,  # of those, tokens mapped from the cache
            "prefix_cache_hit_rate": h / q if q else 0.0,
            "prefix_cache_evictions": self.allocator.cache_evictions,
        }

    def _evict_for(self, req: Request, need: int, now: float) -> None:
        """Free the pages of idle admitted requests less urgent than ``req`` (worst first).
        An evicted request returns to the queue and recomputes its KV when readmitted."""
        mine = self.key(req, now)
        victims = sorted(
            (r for r in self._free() if self.key(r, now)[0] > mine[0]),
            key=lambda r: self.key(r, now),
            reverse=True,
        )
        for victim in victims:
            if self.allocator.can_allocate(need):
                return
            self._evict(victim)

    def _evict(self, req: Request, growth: bool = False) -> None:
        """Back to the queue without pages; its KV is swapped to host slots (``swap_pages``)
        or recomputed when it is readmitted. ``growth``: for pages a running sequence grows
        into (``grow_pages``)."""
        self._swap_out(req)
        self._requeue(req)
        req.num_preemptions += 1
        self.counters["evictions"] += 1
        self.counters["growth_evictions"] += growth

    def _swap_out(self, req: Request) -> None:
        """Copy the pages holding ``req``'s computed K/V to free host slots, if they fit. A
        request readmitted since the last plan keeps the host copies it has not got back yet."""
        if req.seq_id in self._readmitted:
            _, req.swap_slots, req.swapped_tokens, _ = self._readmitted.pop(req.seq_id)
            return
        n = min(len(req.pages), math.ceil(req.num_computed / self.config.page_size))
        if n == 0 or n > len(self._host_free):
            self.counters["swap_misses"] += n > 0 and self.config.swap_pages > 0
            return
        slots, self._host_free = self._host_free[:n], self._host_free[n:]
        self._swap_outs.append(Swap(req.seq_id, tuple(req.pages[:n]), tuple(slots)))
        req.swap_slots, req.swapped_tokens = slots, req.num_computed
        self.counters["swapped_out_pages"] += n

    def _swap_in(self, req: Request) -> None:
        """At readmission: ``req`` resumes where it was evicted, its swapped pages to come back
        with the next plan (but those the prefix cache just mapped: its first ``prefix_pages``)."""
        mapped = req.num_computed
        req.num_computed = max(mapped, req.swapped_tokens)
        self._readmitted[req.seq_id] = (req, req.swap_slots, req.swapped_tokens, mapped)
        req.swap_slots, req.swapped_tokens = [], 0

    def _swap_ins(self) -> tuple[tuple[Swap, ...], tuple[int, ...]]:
        """The next plan's swap-ins and the host slots it drops unread (the prefix cache
        held those pages); all of them are free once the plan has run."""
        swaps, drop = [], []
        for req, slots, tokens, mapped in self._readmitted.values():
            start = len(slots) if tokens <= mapped else mapped // self.config.page_size
            if start < len(slots):
                pages = tuple(req.pages[start : len(slots)])
                swaps.append(Swap(req.seq_id, pages, tuple(slots[start:])))
                self.counters["swapped_in_pages"] += len(pages)
            drop += slots[:start]
            self._swapped_in_slots += slots
        self._readmitted.clear()
        return tuple(swaps), tuple(drop)

    def _release_slots(self, req: Request) -> None:
        """An ended request's host slots are free (the next plan lists it as finished, which
        frees them in the executor before any swap of that plan)."""
        self._host_free += req.swap_slots
        req.swap_slots, req.swapped_tokens = [], 0

    def _requeue(self, req: Request) -> None:
        """Back to the waiting queue holding no pages; the computed ones it held stay cached
        (unless room is needed), so readmission maps them again instead of recomputing."""
        self.admitted.remove(req)
        self.allocator.free(req.pages)
        req.pages, req.num_computed = [], 0
        req.prefix_pages = req.cached_pages = 0
        req.status = Status.WAITING
        self.waiting.append(req)

    def _append(self, req: Request, token: int, now: float) -> None:
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        sp = req.sampling
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.config.eos_token_ids):
            self._finish(req, "stop", Status.FINISHED)
        elif len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= req.max_len:
            self._finish(req, "length", Status.FINISHED)

    def _leave_pass(self, req: Request) -> None:
        """Take ``req``'s rows out of the pass holding them (the pass ends if it empties)."""
        pass_id = self.in_pass.pop(req.seq_id, None)
        if pass_id is None:
            return
        ps = self.passes[pass_id]
        ps.chunks = [c for c in ps.chunks if c.seq_id != req.seq_id]
        if not ps.chunks:
            del self.passes[pass_id]
            if self.active == pass_id:
                self.active = None

    def _fail(self, failed: dict[int, str]) -> list[Request]:
        """End requests whose rows the executor lost (it already dropped their carries)."""
        out = []
        for seq_id, message in failed.items():
            req = self.seqs.get(seq_id)
            if req is None or req.status.done:
                continue
            self._leave_pass(req)
            self._finish(req, "error", Status.FINISHED)
            req.error = message
            self.counters["failed"] += 1
            out.append(req)
        return out

    def _recompute_all(self) -> None:
        """The executor lost its KV cache and every carry: every pass is gone, and admitted
        requests recompute their KV from their tokens (in the pages they hold; with prefix
        caching, from the queue: see below)."""
        self.passes.clear()
        self.in_pass.clear()
        self.active = None
        if self.config.enable_prefix_caching:
            # pages may be shared: recomputing in place would write into them. Every request
            # starts over from the queue, and the cache forgets the contents it lost.
            for req in list(self.admitted):
                self._requeue(req)
            self.allocator.clear_cache()
        for req in self.admitted:
            req.num_computed = 0
            req.status = Status.RUNNING
        self.counters["resets"] += 1

    def _finish(self, req: Request, reason: str, status: Status) -> None:
        live = False
        if req in self.waiting:
            self.waiting.remove(req)
            live = True
        if req in self.admitted:
            self.admitted.remove(req)
            live = True
        self._live_be -= live and req.priority > 0
        if req.pages:
            self.allocator.free(req.pages)
            req.pages = []
        if req.swap_slots:
            self._release_slots(req)
        req.status, req.finish_reason, req.finish_time = status, reason, self.clock()

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)
        self.seqs.pop(req.seq_id, None)
        self._prefix_len.pop(req.seq_id, None)
        self._page_tuples.pop(req.seq_id, None)
        self._ended.append(req.seq_id)

    def parked_rows(self) -> int:
        return sum(
            c.num_tokens
            for p in self.passes.values()
            if p.parked_since is not None
            for c in p.chunks
        )
