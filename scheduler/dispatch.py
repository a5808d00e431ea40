"""Dispatch over replicas: which engine replica serves a new request. Plain Python, no jax.

A policy is ``choose(request, snapshots) -> replica index``: ``request`` is a ``DispatchRequest``
(its size, class, user and the prefix-cache match it would get on each replica) and
``snapshots`` one ``Snapshot`` of load signals per replica, possibly stale (``LoadBoard``). The
N-engine simulator (``multisim.py``) and a real router call the same function.

Policies (``POLICIES``; every threshold is a named, documented constant below):

- ``round_robin``: the multi-level paper's baseline (stock vLLM data parallelism as it ran it).
- ``vllm_balancer``: vLLM's internal data-parallel balancer, least ``waiting * 4 + running``
  over stats refreshed every 100 ms with optimistic local increments in between.
- ``power_of_two``: Ray Serve's default, two replicas drawn at random, the shorter queue wins.
- ``cache_aware``: vLLM router / SGLang gateway: longest prefix match when its ratio is above
  0.3, else least loaded; least loaded regardless when the busiest replica has > 64 requests
  more than, and > 1.5x, the idlest's.
- ``llmd``: llm-d's weighted scorer, prefix 3, queue 2, KV-cache 2.
- ``dplb``: the multi-level paper's load-aware dispatcher (its exact rule order is unpublished:
  ``PaperDispatcher`` documents the reading used here).
- ``ours``: ``dplb`` plus the priority classes: an LS request goes where its expected wait is
  least (under ``qllm``, in-pass preemption: one segment of the running pass; under
  ``priority``: the rest of that pass), a BE request where KV room and prefix affinity are best.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Collection, Iterable, Sequence

# -- the signals -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One replica's load signals at ``time``. Pairs are (LS, BE)."""

    replica: int
    time: float = 0.0
    waiting: tuple[int, int] = (0, 0)  # requests queued, without KV pages yet
    running: tuple[int, int] = (0, 0)  # requests admitted (holding KV pages)
    waiting_tokens: tuple[int, int] = (0, 0)  # prompt tokens of the waiting requests
    running_tokens: tuple[int, int] = (0, 0)  # KV tokens (context) of the running requests
    prefill_left: int = 0  # tokens still to prefill on this replica, all requests
    kv_used: int = 0  # KV pages held
    kv_total: int = 1  # KV pages in all
    pass_left_s: float = 0.0  # estimated time left of the pass running now (0: idle)
    segment_s: float = 0.0  # estimated time of one segment of that pass
    token_s: float = 0.0  # estimated seconds per prefill token here
    preemptive: bool = False  # the replica preempts inside passes (policy qllm)
    expert_pressure: float | None = None  # busiest expert rank / mean, when known

    @property
    def num_waiting(self) -> int:
        return self.waiting[0] + self.waiting[1]

    @property
    def num_running(self) -> int:
        return self.running[0] + self.running[1]

    @property
    def num_requests(self) -> int:
        return self.num_waiting + self.num_running

    @property
    def kv_use(self) -> float:
        return self.kv_used / self.kv_total

    @property
    def token_load(self) -> int:
        """Tokens of work held: context of the running requests plus waiting prompts."""
        return sum(self.running_tokens) + sum(self.waiting_tokens)


@dataclasses.dataclass(frozen=True)
class DispatchRequest:
    """What a dispatcher knows of a new request. ``match[r]``: leading prompt tokens replica
    ``r``'s prefix cache holds for it (read when the request arrives: a router with KV-cache
    events, or its own approximate index, knows this much)."""

    request_id: str
    prompt_len: int
    max_tokens: int
    priority: int = 0
    user: str | None = None
    match: tuple[int, ...] = ()
    kv_pages: int = 0  # KV pages it reserves at admission (0: unknown)

    def match_ratio(self, r: int) -> float:
        return self.match[r] / self.prompt_len if self.match and self.prompt_len else 0.0


class LoadBoard:
    """The snapshots a dispatcher sees: each replica's signals read at most every
    ``staleness_s`` seconds (0: read at every dispatch), with optimistic increments between
    reads, as vLLM's balancer keeps (a request dispatched counts as waiting on its replica until
    the next read). ``read(r)`` takes a fresh snapshot of replica ``r``."""

    def __init__(
        self,
        num_replicas: int,
        read: Callable[[int], Snapshot],
        staleness_s: float = 0.0,
        optimistic: bool = True,
    ) -> None:
        if staleness_s < 0:
            raise ValueError(f"staleness_s must be >= 0, got {staleness_s}")
        self.n, self.read, self.staleness_s, self.optimistic = (
            num_replicas,
            read,
            staleness_s,
            optimistic,
        )
        self._snaps: list[Snapshot | None] = [None] * num_replicas
        self.reads = 0

    def view(self, now: float) -> Sequence[Snapshot]:
        """Snapshots as of ``now``: re-read those older than the staleness bound. With
        ``staleness_s`` 0 every snapshot is read afresh, but only when the policy first looks
        at it (``_FreshView``: round-robin looks at none, power-of-two at two), as of now:
        the policy chooses before anything changes."""
        if self.staleness_s == 0:
            self.reads += self.n
            return _FreshView(self, now)
        out = []
        for r in range(self.n):
            s = self._snaps[r]
            if s is None or now - s.time >= self.staleness_s:
                s = self._read(r, now)
                self.reads += 1
            out.append(s)
        return out

    def _read(self, r: int, now: float) -> Snapshot:
        """A fresh snapshot of replica ``r``, stamped ``now``, kept for the next view."""
        s = self.read(r)
        if s.time != now:
            s = dataclasses.replace(s, time=now)
        self._snaps[r] = s
        return s

    def dispatched(self, r: int, req: DispatchRequest) -> None:
        """Count ``req`` as waiting on replica ``r`` until its next read (optimistic)."""
        s = self._snaps[r]
        if not self.optimistic or s is None:
            return
        c = 0 if req.priority <= 0 else 1
        waiting = tuple(w + (i == c) for i, w in enumerate(s.waiting))
        tokens = tuple(w + req.prompt_len * (i == c) for i, w in enumerate(s.waiting_tokens))
        self._snaps[r] = dataclasses.replace(
            s,
            waiting=waiting,
            waiting_tokens=tokens,
            prefill_left=s.prefill_left + req.prompt_len - (req.match[r] if req.match else 0),
            kv_used=s.kv_used + req.kv_pages,
        )


class _FreshView(Sequence):
    """A ``LoadBoard``'s snapshots at staleness 0: replica ``r``'s is read when first indexed."""

    def __init__(self, board: LoadBoard, now: float) -> None:
        self.board, self.now = board, now
        self.snaps: list[Snapshot | None] = [None] * board.n

    def __len__(self) -> int:
        return self.board.n

    def __getitem__(self, r: int) -> Snapshot:
        if r < 0:
            r += self.board.n
        if not 0 <= r < self.board.n:
            raise IndexError(r)  # (ends iteration, as a list's)
        s = self.snaps[r]
        if s is None:
            s = self.snaps[r] = self.board._read(r, self.now)
        return s


def queue_signals(waiting: Iterable, admitted: Iterable) -> dict:
    """The queue part of a ``Snapshot`` (its keyword arguments) from a scheduler's waiting and
    admitted requests: counts and tokens by class and the prefill left. The N-engine simulator
    and a real replica (``qllm_jax.ray_serve``) publish the same numbers."""
    w, wtok, run, rtok = [0, 0], [0, 0], [0, 0], [0, 0]
    prefill = 0
    # (a router reads this for every replica at every dispatch: one pass, no property calls)
    for req in waiting:
        c = req.priority > 0
        prompt_left = len(req.prompt_token_ids) - req.num_computed
        w[c] += 1
        wtok[c] += prompt_left + len(req.output_token_ids)
        prefill += prompt_left
    for req in admitted:
        c = req.priority > 0
        prompt = len(req.prompt_token_ids)
        run[c] += 1
        rtok[c] += prompt + len(req.output_token_ids)
        if prompt > req.num_computed:
            prefill += prompt - req.num_computed
    return dict(
        waiting=tuple(w),
        running=tuple(run),
        waiting_tokens=tuple(wtok),
        running_tokens=tuple(rtok),
        prefill_left=prefill,
    )


def cached_match(chain: Sequence[int], cached: Collection[int], page_size: int) -> int:
    """Leading tokens a replica's prefix cache holds for a prompt, from the prompt's page hash
    chain (``pages.extend_hashes`` over its reusable pages) and the set of page hashes the
    replica published: what ``Engine.match_length`` answers there, as of the publication."""
    n = 0
    for h in chain:
        if h not in cached:
            break
        n += 1
    return n * page_size


def _least(
    snaps: Sequence[Snapshot], key: Callable[[Snapshot], float], after: int | None = None
) -> int:
    """The replica with the least ``key``; ties go to the lowest index, or (``after``) to the
    first one after replica ``after`` in cyclic order (so ties rotate, as round-robin)."""
    n = max(s.replica for s in snaps) + 1
    tie = (lambda r: r) if after is None else (lambda r: (r - after - 1) % n)
    return min(snaps, key=lambda s: (key(s), tie(s.replica))).replica


# -- production anchors --------------------------------------------------------------------------

VLLM_WAITING_WEIGHT = 4  # vLLM DPLBAsyncMPClient: score = waiting * 4 + running
VLLM_STATS_INTERVAL_S = 0.1  # its coordinator publishes engine stats every 100 ms
CACHE_AWARE_MATCH_THRESHOLD = 0.3  # SGLang gateway / vLLM router cache_threshold
CACHE_AWARE_BALANCE_ABS = 64  # balance_abs_threshold (requests)
CACHE_AWARE_BALANCE_REL = 1.5  # balance_rel_threshold
LLMD_WEIGHTS = dict(prefix=3.0, queue=2.0, kv=2.0)  # llm-d's default scorer weights
RAY_ROUTING_STATS_PERIOD_S = 10.0  # Ray Serve polls record_routing_stats every 10 s


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self.next = 0

    def choose(self, req: DispatchRequest, snaps: Sequence[Snapshot]) -> int:
        r = self.next % len(snaps)
        self.next += 1
        return r


class VllmBalancer:
    """Least ``waiting * 4 + running`` (requests, both classes)."""

    name = "vllm_balancer"

    def choose(self, req: DispatchRequest, snaps: Sequence[Snapshot]) -> int:
        return _least(snaps, lambda s: VLLM_WAITING_WEIGHT * s.num_waiting + s.num_running)


class PowerOfTwo:
    """Two distinct replicas at random; the one with fewer requests (ties: the first drawn)."""

    name = "power_of_two"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def choose(self, req: DispatchRequest, snaps: Sequence[Snapshot]) -> int:
        if len(snaps) == 1:
            return 0
        a, b = self.rng.sample(range(len(snaps)), 2)
        return b if snaps[b].num_requests < snaps[a].num_requests else a


class CacheAware:
    """vLLM router / SGLang gateway ``cache_aware`` over the replicas' request counts."""

    name = "cache_aware"

    def __init__(
        self,
        match_threshold: float = CACHE_AWARE_MATCH_THRESHOLD,
        balance_abs: int = CACHE_AWARE_BALANCE_ABS,
        balance_rel: float = CACHE_AWARE_BALANCE_REL,
    ) -> None:
        self.match_threshold, self.balance_abs, self.balance_rel = (
            match_threshold,
            balance_abs,
            balance_rel,
        )

    def imbalanced(self, snaps: Sequence[Snapshot]) -> bool:
        loads = [s.num_requests for s in snaps]
        hi, lo = max(loads), min(loads)
        return hi - lo > self.balance_abs and hi > self.balance_rel * lo

    def choose(self, req: DispatchRequest, snaps: Sequence[Snapshot]) -> int:
        least = _least(snaps, lambda s: s.num_requests)
        if self.imbalanced(snaps):
            return least
        best = min(snaps, key=lambda s: (-req.match_ratio(s.replica), s.num_requests, s.replica))
        if req.match_ratio(best.replica) > self.match_threshold:
            return best.replica
        return least


class LlmdScorer:
    """llm-d's endpoint picker: the highest weighted sum of a prefix score (match ratio), a
    queue score (waiting requests, min-max normalised: the shortest queue scores 1) and a
    KV-cache score (1 - KV use)."""

    name = "llmd"

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        self.w = dict(LLMD_WEIGHTS) | (weights or {})

    def scores(self, req: DispatchRequest, snaps: Sequence[Snapshot]) -> list[float]:
        q = [s.num_waiting for s in snaps]
        lo, hi = min(q), max(q)
        out = []
        for s in snaps:
            queue = 1.0 if hi == lo else (hi - s.num_waiting) / (hi - lo)
            out.append(
                self.w["prefix"] * req.match_ratio(s.replica)
                + self.w["queue"] * queue
                + self.w["kv"] * (1.0 - s.kv_use)
            )
        return out

    def choose(self, req: DispatchRequest, snaps: Sequence[Snapshot]) -> int:
        sc = self.scores(req, snaps)
        return max(range(len(snaps)), key=lambda r: (sc[r], -r))


# -- the multi-level paper's dispatcher, and ours --------------------------------------------------

# Paper A's thresholds ((s) in ../shared/multilevel-paper.md)
DPLB_KV_SATURATED = 0.9  # KV use above this: the replica is saturated
DPLB_KV_BALANCED = 0.10  # KV use within this of the least: balanced
DPLB_LOAD_IMBALANCE = 3000  # running-load difference (tokens) above this: imbalanced
# Unknown: what "prefix token load" counts. Our choice: the replica's token load (context of its
# running requests + waiting prompts) plus the part of this request's prompt it does not cache.
DPLB_COUNT_OWN_PREFILL = True


class PaperDispatcher:
    """Paper A's load-aware dispatcher ("DPLB"). The order of its tests is unpublished; the
    reading used (``multilevel-paper.md``): drop saturated replicas (all of them saturated: keep
    all); keep the user's sticky replica if its KV use is within ``kv_balanced`` of the least
    and its load within ``load_imbalance`` of the least; else the least KV use if KV use is
    unbalanced; else the least load. The chosen replica becomes the user's sticky one."""

    name = "dplb"

    def __init__(
        self,
        kv_saturated: float = DPLB_KV_SATURATED,
        kv_balanced: float = DPLB_KV_BALANCED,
        load_imbalance: float = DPLB_LOAD_IMBALANCE,
        count_own_prefill: bool = DPLB_COUNT_OWN_PREFILL,
        sticky: bool = True,
    ) -> None:
        self.kv_saturated, self.kv_balanced, self.load_imbalance = (
            kv_saturated,
            kv_balanced,
            load_imbalance,
        )
        self.count_own_prefill, self.sticky = count_own_prefill, sticky
        self.users: dict[str, int] = {}
        self.last: int | None = None  # the last replica chosen: ties rotate after it (our choice)

    def load(self, req: DispatchRequest, s: Snapshot) -> float:
        own = req.prompt_len - (req.match[s.replica] if req.match else 0)
        return s.token_load + (own if self.count_own_prefill else 0)

    def candidates(self, snaps: Sequence[Snapshot]) -> list[Snapshot]:
        return [s for s in snaps if s.kv_use <= self.kv_saturated] or list(snaps)

    def _sticky_ok(self, req: DispatchRequest, ok: list[Snapshot]) -> int | None:
        r = self.users.get(req.user) if self.sticky and req.user is not None else None
        mine = next((s for s in ok if s.replica == r), None)
        if mine is None:
            return None
        least_kv = min(s.kv_use for s in ok)
        least_load = min(self.load(req, s) for s in ok)
        if (
            mine.kv_use - least_kv <= self.kv_balanced
            and self.load(req, mine) - least_load <= self.load_imbalance
        ):
            return r
        return None

    def pick(self, req: DispatchRequest, snaps: Sequence[Snapshot]) -> int:
        ok = self.candidates(snaps)
        r = self._sticky_ok(req, ok)
        if r is not None:
            return r
        kv = [s.kv_use for s in ok]
        if max(kv) - min(kv) > self.kv_balanced:
            return _least(ok, lambda s: s.kv_use, self.last)
        return _least(ok, lambda s: self.load(req, s), self.last)

    def choose(self, req: DispatchRequest, snaps: Sequence[Snapshot]) -> int:
        r = self.pick(req, snaps)
        if req.user is not None:
            self.users[req.user] = r
        self.last = r
        return r


# Ours. An LS request's expected wait on a replica: what blocks it (one segment of the running
# pass where passes are preempted, else the rest of that pass) + the LS prefill queued ahead of
# it and its own uncached prompt, at the replica's per-token cost; a replica whose KV cannot
# take it pays OURS_KV_FULL_PENALTY_S (it waits for pages or evicts BE work). The sticky replica
# is kept when its wait is within OURS_LS_STICKY_S of the least (a cache hit later is worth that).
OURS_KV_FULL_PENALTY_S = 1.0
OURS_LS_STICKY_S = 0.005
# A BE request: among unsaturated replicas, the user's sticky one within the paper's
# tolerances, else the best weighted score of prefix affinity, KV room and BE queue (llm-d's
# weights; the BE queue counted in tokens, min-max normalised).
OURS_BE_WEIGHTS = dict(prefix=3.0, kv=2.0, queue=2.0)


class OursDispatcher(PaperDispatcher):
    """``dplb`` with the priority classes (module docstring)."""

    name = "ours"

    def __init__(
        self,
        kv_full_penalty_s: float = OURS_KV_FULL_PENALTY_S,
        ls_sticky_s: float = OURS_LS_STICKY_S,
        be_weights: dict[str, float] | None = None,
        **dplb,
    ) -> None:
        super().__init__(**dplb)
        self.kv_full_penalty_s, self.ls_sticky_s = kv_full_penalty_s, ls_sticky_s
        self.be_w = dict(OURS_BE_WEIGHTS) | (be_weights or {})

    def ls_wait(self, req: DispatchRequest, s: Snapshot) -> float:
        """Expected seconds before ``req``'s first token on replica ``s`` (a lower bound)."""
        block = s.segment_s if s.preemptive else s.pass_left_s
        own = req.prompt_len - (req.match[s.replica] if req.match else 0)
        wait = block + s.token_s * (s.waiting_tokens[0] + s.running[0] + own)
        if req.kv_pages and s.kv_total - s.kv_used < req.kv_pages:
            wait += self.kv_full_penalty_s
        return wait

    def be_scores(self, req: DispatchRequest, snaps: Sequence[Snapshot]) -> list[float]:
        q = [s.waiting_tokens[1] + s.running_tokens[1] for s in snaps]
        lo, hi = min(q), max(q)
        return [
            self.be_w["prefix"] * req.match_ratio(s.replica)
            + self.be_w["kv"] * (1.0 - s.kv_use)
            + self.be_w["queue"] * (1.0 if hi == lo else (hi - qs) / (hi - lo))
            for s, qs in zip(snaps, q, strict=True)
        ]

    def pick(self, req: DispatchRequest, snaps: Sequence[Snapshot]) -> int:
        if req.priority <= 0:
            waits = {s.replica: self.ls_wait(req, s) for s in snaps}
            best = _least(snaps, lambda s: waits[s.replica], self.last)
            r = self.users.get(req.user) if self.sticky and req.user is not None else None
            if r in waits and waits[r] - waits[best] <= self.ls_sticky_s:
                return r
            return best
        ok = self.candidates(snaps)
        r = self._sticky_ok(req, ok)
        if r is not None:
            return r
        sc = dict(zip((s.replica for s in ok), self.be_scores(req, ok), strict=True))
        return _least(ok, lambda s: -sc[s.replica], self.last)


POLICIES: dict[str, Callable[..., object]] = {
    "round_robin": RoundRobin,
    "vllm_balancer": VllmBalancer,
    "power_of_two": PowerOfTwo,
    "cache_aware": CacheAware,
    "llmd": LlmdScorer,
    "dplb": PaperDispatcher,
    "ours": OursDispatcher,
}
# Each policy's staleness of the load signals, as its system has it. Unknowns: the paper's
# dispatcher and ours read vLLM's stats (100 ms); the routers that count their own in-flight
# requests (cache_aware, power_of_two's probes) see them fresh; llm-d scrapes metrics (about
# 50 ms is our choice).
DEFAULT_STALENESS_S: dict[str, float] = {
    "round_robin": 0.0,
    "vllm_balancer": VLLM_STATS_INTERVAL_S,
    "power_of_two": 0.0,
    "cache_aware": 0.0,
    "llmd": 0.05,
    "dplb": VLLM_STATS_INTERVAL_S,
    "ours": VLLM_STATS_INTERVAL_S,
}


def make_policy(name: str, seed: int = 0, **options):
    """A policy by name (``POLICIES``); ``options`` go to its constructor."""
    if name not in POLICIES:
        raise ValueError(f"unknown dispatch policy {name!r}; known: {sorted(POLICIES)}")
    if name == "power_of_two":
        return PowerOfTwo(seed=seed, **options)
    return POLICIES[name](**options)
