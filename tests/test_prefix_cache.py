"""Prefix caching in the page allocator and the scheduler, against the fake executor: exact and
fast, no jax.

The fake executor models K/V by content (slot -> hash of the sequence's tokens up to that
position, position) and checks every chunk's reads against the sequence's true tokens, so a
request reading a page that holds someone else's K/V, or one that was reused, fails loudly.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scheduler import Scheduler, SchedulerConfig, segment_layout
from scheduler.pages import (
    ROOT_HASH,
    OutOfPages,
    PageAllocator,
    extend_hashes,
    hash_page,
    reusable_pages,
)
from scheduler.plan import Plan, StepResult
from scheduler.request import Status
from scheduler.simulator import CostModel, Simulator, VirtualClock, content_hash, make_request

LS, BE = 0, 1
SYSTEM = list(range(1000, 1016))  # a 16-token "system prompt": 4 pages of 4


def unit_cost() -> CostModel:
    return CostModel(attn_base=1.0, expert_base=1.0, head_base=1.0)


def scheduler(**knobs) -> tuple[Scheduler, Simulator]:
    """8 layers, layer granularity: a pass costs 17 (16 segments + head), as in
    test_scheduler.py; iteration-level priority policy unless given."""
    config = dict(
        page_size=4,
        num_pages=64,
        max_model_len=128,
        max_batch_size=8,
        max_num_batched_tokens=64,
        policy="priority",
        granularity="layer",
        aging_s=None,
        max_park_s=None,
        age_after_s=None,
    )
    clock = VirtualClock()
    sched = Scheduler(
        SchedulerConfig(**(config | knobs)), segment_layout(8, 4, 4, False), clock=clock
    )
    return sched, Simulator(sched, unit_cost(), clock, vary_tokens=True)


def req(rid, seq, prompt, tokens, priority=LS, at=0.0, seed=0):
    return (at, make_request(rid, seq, len(prompt), tokens, priority, at, list(prompt), seed))


# -- the allocator -------------------------------------------------------------------------------


def test_hash_chain_names_the_whole_prefix_and_is_deterministic():
    a = extend_hashes([], [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, 10)
    assert len(a) == 2  # full pages only
    assert a[0] == hash_page(ROOT_HASH, [1, 2, 3, 4]) and a[1] == hash_page(a[0], [5, 6, 7, 8])
    # the same page content after a different prefix is a different key
    b = extend_hashes([], [9, 2, 3, 4, 5, 6, 7, 8], 4, 2)
    assert b[0] != a[0] and b[1] != a[1]
    assert hash_page(ROOT_HASH, [1, 2, 3, 4]) == a[0]  # no per-process salt
    assert [reusable_pages(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 0, 0, 1, 1, 2]


def test_refcounts_lru_reuse_and_invariants():
    al = PageAllocator(6, page_size=4, enable_caching=True)  # pages 1..5
    a = al.allocate(3)
    assert a == [1, 2, 3] and al.num_free == 2 and al.num_used == 3
    keys = extend_hashes([], list(range(12)), 4, 3)
    for page, key in zip(a, keys, strict=True):
        assert al.register(page, key)
    assert not al.register(a[0], keys[0])  # already cached
    b = al.allocate(1)
    assert not al.register(b[0], keys[0])  # another page holds that content: stays private
    assert al.contents_version == 3  # moved by each content registered, not by the refusals
    assert al.lookup(keys) == a and al.match_length(list(range(13))) == 12
    assert al.match_length(list(range(12))) == 8  # the last token is always computed
    al.acquire(a[:2])  # a second holder of the first two pages
    assert [al.refcount(p) for p in a] == [2, 2, 1]
    al.free(a)
    assert [al.refcount(p) for p in a] == [1, 1, 0] and al.num_evictable == 1
    al.free(a[:2])
    al.check()
    # unheld cached pages stay cached and count as free; reuse takes the free list first,
    # then the cached pages released last-in-list first (a sequence's tail before its head)
    assert al.num_cached == 3 and al.num_evictable == 3 and al.num_free == 4
    assert al.allocate(1) == [5] and al.contents_version == 3  # a free page: no content lost
    assert al.allocate(1) == [3] and al.num_cached == 2 and al.cache_evictions == 1
    assert al.contents_version == 4  # a cached content forgotten: lookups may change
    assert al.lookup(keys) == [1, 2]  # the chain's head is still cached
    with pytest.raises(ValueError, match="nobody holds"):
        al.free([1])  # cached but unheld: a double free
    with pytest.raises(OutOfPages):
        al.allocate(3)
    al.acquire([1])  # re-map a cached, unheld page
    assert al.num_evictable == 1 and al.refcount(1) == 1
    al.free(b)  # private (its content was cached elsewhere): back to the free list
    with pytest.raises(ValueError, match="neither held nor cached"):
        al.acquire(b)  # free pages cannot be acquired, only allocated
    al.check()
    al.clear_cache()
    assert al.num_cached == 0 and al.lookup(keys) == [] and al.num_free == 2
    assert al.contents_version == 5
    al.check()


def test_caching_off_looks_nothing_up():
    al = PageAllocator(4, page_size=2)
    page = al.allocate(1)[0]
    assert not al.register(page, 7) and al.lookup([7]) == [] and al.match_length([1, 2, 3]) == 0
    al.free([page])
    assert al.num_free == 3 and al.num_cached == 0


# -- the scheduler -------------------------------------------------------------------------------


def test_a_later_request_maps_the_shared_system_prompt():
    # A: 16-token system prompt + 4 tokens (5 pages), 2 outputs: prefill 0 -> 17, decode -> 34.
    # B arrives at 40 with the same system prompt and its own 4 tokens: it maps A's 4 system
    # pages (cached after A's prefill, unheld since A finished) and prefills 4 rows: 40 -> 57.
    a = SYSTEM + [1, 2, 3, 4]
    b = SYSTEM + [5, 6, 7, 8]
    sched, sim = scheduler()
    result = sim.run([req("a", 0, a, 2), req("b", 1, b, 1, at=40.0)])
    assert result.records["b"].first_token == 57.0
    assert result.records["b"].computed_tokens == 4  # 16 of 20 prompt tokens from the cache
    assert sim.requests[1].num_cached_tokens == 16 and sim.requests[0].num_cached_tokens == 0
    stats = result.stats
    assert stats["prefix_cache_hits"] == 16 and stats["prefix_cache_queries"] == 40
    assert stats["prefix_cache_hit_rate"] == pytest.approx(16 / 40)
    # A's 5 full computed pages (4 system + 1 own) and B's own one stay cached, unheld
    assert stats["kv_pages_cached"] == stats["kv_pages_evictable"] == 6
    assert stats["kv_pages_used"] == 0 and sched.allocator.num_free == 63


def test_a_request_admitted_before_the_prefix_was_computed_maps_it_before_it_runs():
    # One request per pass: B is admitted at once (no cached pages yet) but waits for A's
    # pass; when A's prefill ends its pages are cached, and B, not started yet, maps them.
    a, b = SYSTEM + [1], SYSTEM + [2]
    sched, sim = scheduler(max_batch_size=1)
    result = sim.run([req("a", 0, a, 1), req("b", 1, b, 1, at=1.0)])
    assert result.records["b"].first_token == 34.0
    assert result.records["b"].computed_tokens == 1
    assert sim.requests[1].num_cached_tokens == 16


def test_identical_prompts_in_one_pass_share_nothing_yet():
    # Nothing is cached until a pass computes it: two identical prompts in the same pass both
    # compute it (the second one's copy of a page stays private).
    sched, sim = scheduler()
    result = sim.run([req("a", 0, SYSTEM, 1), req("b", 1, SYSTEM, 1)])
    assert [result.records[r].computed_tokens for r in "ab"] == [16, 16]
    assert result.stats["prefix_cache_hits"] == 0


def test_multi_turn_chat_reuses_the_previous_turns_output():
    # Turn 2's prompt is turn 1's prompt, its 4-token answer and 3 new tokens (23 tokens). Turn
    # 1 computed its 16 prompt tokens and its first 3 outputs (the last one is never fed), so
    # the pages of positions 0..19 are full and computed only up to 19: 4 pages map; turn 2
    # computes 7 tokens.
    sched, sim = scheduler()
    turn1 = make_request("t1", 0, 16, 4, LS, 0.0, SYSTEM)
    sim.run([(0.0, turn1)])
    prompt2 = turn1.all_token_ids + [7, 8, 9]
    assert len(prompt2) == 23
    sim.run([(sim.clock.now, make_request("t2", 1, 23, 2, LS, sim.clock.now, prompt2))])
    assert sim.requests[1].num_cached_tokens == 16
    sim2_req = make_request("t3", 2, 24, 1, LS, sim.clock.now, prompt2 + [1])
    sim.run([(sim.clock.now, sim2_req)])
    # t2 computed 7 prompt tokens + its first output: positions 16..23 full now -> 20 tokens
    assert sim2_req.num_cached_tokens == 20


def test_reset_requeues_everyone_and_forgets_the_cache():
    """A KV reset (the executor lost the cache) with shared pages: recomputing in place would
    write into shared pages, so every admitted request goes back to the queue, holding
    nothing, and the cache forgets its contents."""
    sched, sim = scheduler()
    sim.run([req("a", 0, SYSTEM + [1], 1)])
    b = make_request("b", 1, 17, 3, LS, sim.clock.now, SYSTEM + [2])
    c = make_request("c", 2, 17, 3, LS, sim.clock.now, SYSTEM + [3])
    for r in (b, c):
        sched.add(r)
        sim.requests[r.seq_id] = r
    plan = sched.schedule()
    sim.step(plan)  # b and c mapped the system pages and prefilled
    assert b.num_cached_tokens == c.num_cached_tokens == 16
    assert sched.allocator.refcount(b.pages[0]) == 2
    sched.update(Plan(None), StepResult(reset=True))
    assert b.status == c.status == Status.WAITING and not b.pages and not c.pages
    assert sched.allocator.num_cached == 0 and sched.allocator.num_used == 0
    sched.allocator.check()


# -- property: shared pages under every policy, tiny KV budgets ---------------------------------


class PageCheckingSimulator(Simulator):
    """After every scheduling decision and every executed plan, checks the page invariants:
    every page in exactly one state; reference counts equal to the holders (admitted requests'
    page tables plus the test's own "checkpoint" pins); nothing written into a shared or
    cached page; every cached page holding the K/V of the prefix its key names (as a
    recompute from the tokens gives it). Also pins and unpins pages now and then, the way a
    job checkpoint holds K/V it is writing."""

    def __init__(self, *args, pins: list[tuple[int, int]] = (), **kw) -> None:
        super().__init__(*args, **kw)
        self.pins = list(pins)  # (plan number, hold for this many plans)
        self.held: list[tuple[int, list[int]]] = []  # (release at plan, pages)
        self.prefix_of: dict[int, list[int]] = {}  # page key -> the tokens it names
        self.plans = 0
        self.shared_reads = 0
        self.parked_shared = False
        self.computed: dict[int, int] = {}
        self.evictions = 0
        self._schedule, self.scheduler.schedule = self.scheduler.schedule, self._schedule_or_unpin

    def _schedule_or_unpin(self) -> Plan | None:
        """A checkpoint ends eventually: if pins are what blocks every request, end them."""
        plan = self._schedule()
        if plan is None and self.held:
            self.release_pins()
            plan = self._schedule()
        return plan

    def step(self, plan: Plan) -> None:
        self.check_pages()
        self.check_progress()
        if plan.new:
            self.check_writes(plan)
        for ps in self.scheduler.passes.values():
            if ps.parked_since is not None and any(
                self.scheduler.seqs[c.seq_id].prefix_pages for c in ps.chunks
            ):
                self.parked_shared = True
        super().step(plan)
        self.plans += 1
        self.pin_and_unpin()
        self.check_pages()
        self.computed = {r.seq_id: r.num_computed for r in self.scheduler.requests.values()}
        self.evictions = self.scheduler.counters["evictions"]

    def check_progress(self) -> None:
        """``schedule()`` lowers a request's computed tokens only by evicting it (mapping a
        cached prefix only ever raises them)."""
        if self.scheduler.counters["evictions"] == self.evictions:
            for r in self.scheduler.requests.values():
                assert r.num_computed >= self.computed.get(r.seq_id, 0), r

    def check_writes(self, plan: Plan) -> None:
        al, ps = self.scheduler.allocator, self.scheduler.config.page_size
        for c in plan.chunks:
            req = self.scheduler.seqs[c.seq_id]
            assert c.start >= req.prefix_pages * ps
            self.shared_reads += req.prefix_pages > 0
            for i in range(c.start // ps, (c.end - 1) // ps + 1):
                page = c.pages[i]
                assert al.refcount(page) - self.pinned(page) == 1, "a write into a shared page"
                assert al.page_hash(page) is None, "a write into a cached page"

    def pinned(self, page: int) -> int:
        return sum(pages.count(page) for _, pages in self.held)

    def pin_and_unpin(self) -> None:
        al = self.scheduler.allocator
        for release, pages in [h for h in self.held if h[0] <= self.plans]:
            al.free(pages)
            self.held.remove((release, pages))
        for _, hold in [p for p in self.pins if p[0] == self.plans]:
            victim = next((r for r in self.scheduler.admitted if r.pages), None)
            if victim is not None:
                al.acquire(victim.pages)
                self.held.append((self.plans + hold, list(victim.pages)))

    def release_pins(self) -> None:
        for _, pages in self.held:
            self.scheduler.allocator.free(pages)
        self.held.clear()

    def check_pages(self) -> None:
        sched = self.scheduler
        al, ps = sched.allocator, sched.config.page_size
        al.check()
        holders = Counter(p for r in sched.admitted for p in r.pages)
        holders.update(p for _, pages in self.held for p in pages)
        assert {p: al.refcount(p) for p in holders} == dict(holders)
        assert al.num_used == len(holders)  # no page is held by nobody
        for r in sched.waiting:
            assert not r.pages and r.num_computed == 0
        for ps_ in sched.passes.values():  # rows in flight or parked keep their page tables
            for c in ps_.chunks:
                assert c.pages == tuple(sched.seqs[c.seq_id].pages)
        for r in sched.admitted:
            assert len(r.pages) == sched.pages_needed(r) == len(set(r.pages))
            assert r.num_computed >= r.prefix_pages * ps
            for i, page in enumerate(r.pages[: r.prefix_pages]):
                assert al.page_hash(page) == r.page_hashes[i]  # mapped pages stay cached
        for r in self.requests.values():  # every key any request's tokens name
            hashes = extend_hashes([], r.all_token_ids, ps, len(r.all_token_ids) // ps)
            for i, key in enumerate(hashes):
                self.prefix_of.setdefault(key, r.all_token_ids[: (i + 1) * ps])
        kv = self.executor.kv
        for page, key in al._hash_of.items():
            tokens = self.prefix_of[key]
            chain = ROOT_HASH
            for pos, token in enumerate(tokens):
                chain = content_hash(chain, token)
                if pos >= len(tokens) - ps:
                    slot = page * ps + pos % ps
                    assert kv.get(slot) == (chain, pos), "cached content differs from a recompute"


@st.composite
def shared_prefix_scenarios(draw):
    config = dict(
        policy=draw(st.sampled_from(["fcfs", "priority", "qllm", "qllm", "qllm"])),
        granularity=draw(st.sampled_from(["layer", "expert"])),
        page_size=draw(st.sampled_from([1, 2, 4])),
        max_batch_size=draw(st.integers(1, 4)),
        prefill_chunk=draw(st.none() | st.integers(1, 8)),
        aging_s=None,
        max_park_s=draw(st.none() | st.sampled_from([2.0, 20.0])),
        absorb_be=draw(st.booleans()),
        queue_order=draw(st.sampled_from(["fcfs", "sjf", "hrrn"])),
        age_after_s=draw(st.sampled_from([None, 3.0])),
        swap_pages=draw(st.sampled_from([0, 4, 64])),
        max_model_len=64,
    )
    config["max_num_batched_tokens"] = draw(st.integers(config["max_batch_size"], 16))
    bases = [list(range(100 * (i + 1), 100 * (i + 1) + 12)) for i in range(3)]
    request = st.tuples(
        st.integers(0, 30),  # arrival
        st.sampled_from([0, 1, 2]),  # priority
        st.integers(0, 2),  # which shared prefix
        st.integers(1, 12),  # how much of it
        st.lists(st.integers(1, 50), max_size=5),  # own tokens
        st.integers(1, 6),  # max tokens
        st.none() | st.integers(0, 80),  # abort time
        st.integers(0, 3),  # seed
    )
    # a BE request at t=0 and often an LS one soon after, on the same prefix: preemption
    # (parking) of passes whose rows read shared pages
    # (parking) of passes whose rows read shared pages; a second BE request once the first
    # one's prefix is cached, and an LS one landing inside its pass
    lead = (0, BE, 0, draw(st.integers(4, 12)), [1], draw(st.integers(1, 6)), None, 0)
    follow = draw(st.integers(3, 15))
    second = (follow, BE, 0, 12, [3], draw(st.integers(1, 4)), None, 2)
    probe = (follow + draw(st.integers(0, 4)), LS, 0, draw(st.integers(1, 12)), [2], 2, None, 1)
    requests = [
        lead,
        *([second, probe] if draw(st.integers(0, 3)) else []),
        *draw(st.lists(request, max_size=5)),
    ]
    prompts = [bases[b][:n] + own for _, _, b, n, own, _, _, _ in requests]
    most = max(-(-(len(p) + r[5]) // config["page_size"]) for p, r in zip(prompts, requests))
    # tiny: requests wait, get evicted, cached pages get reused
    config["num_pages"] = 1 + most * draw(st.sampled_from([1, 2, 3, 4]))
    shape = dict(
        num_layers=draw(st.integers(1, 3)),
        num_experts=2,
        group_size=draw(st.sampled_from([1, 2])),
        shared_expert=False,
    )
    pins = draw(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)), max_size=3))
    return config, shape, requests, prompts, pins


def run_scenario(config, shape, requests, prompts, pins=(), caching=True):
    clock = VirtualClock()
    config = config | dict(enable_prefix_caching=caching)
    sched = Scheduler(SchedulerConfig(**config), segment_layout(**shape), clock=clock)
    cost = CostModel(attn_base=1.0, expert_base=1.0, head_base=0.5)
    sim = PageCheckingSimulator(sched, cost, clock, pins=pins, vary_tokens=True)
    events = []
    for i, ((at, prio, _, _, _, tokens, abort_at, seed), prompt) in enumerate(
        zip(requests, prompts, strict=True)
    ):
        r = make_request(f"r{i}", i, len(prompt), tokens, prio, float(at), prompt, seed)
        events.append((float(at), r))
        if abort_at is not None:
            events.append((float(abort_at), "abort", f"r{i}"))
    result = sim.run(events, max_plans=100_000)
    sim.release_pins()
    sim.check_pages()
    assert sched.allocator.num_used == 0 and not sched.requests
    outputs = {r.request_id: r.output_token_ids for r in sim.requests.values()}
    return result, outputs, sim


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shared_prefix_scenarios())
def test_shared_pages_are_never_freed_leaked_or_overwritten(scenario):
    config, shape, requests, prompts, pins = scenario
    result, outputs, sim = run_scenario(config, shape, requests, prompts, pins)
    stats = result.stats
    for what in (
        "evictions",
        "preemptions_layer",
        "preemptions_expert",
        "prefix_cache_hits",
        "swapped_in_pages",
    ):
        if stats.get(what):
            event(what)
    if sim.shared_reads:
        event("a chunk read a shared prefix")
    if sim.parked_shared:
        event("a parked pass held rows on shared pages")
    if stats["prefix_cache_evictions"]:
        event("cached pages reused")
    # the same tokens and outcomes without the cache (the fake's tokens depend on the K/V a
    # sequence's tokens name, its seed and the step; aborts land at the same times only if
    # the timelines agree, so compare requests that were not aborted)
    _, plain, _ = run_scenario(config, shape, requests, prompts, caching=False)
    for i, (*_, tokens, abort_at, _) in enumerate(requests):
        if abort_at is None:
            assert outputs[f"r{i}"] == plain[f"r{i}"] and len(outputs[f"r{i}"]) == tokens
