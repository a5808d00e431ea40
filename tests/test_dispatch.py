"""Dispatch policies against hand-built snapshots, the load board's staleness, expert
placement, and the N-engine simulator's invariants (exact, fast, no jax in the policies)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qllm_jax.scheduler import Scheduler, SchedulerConfig, segment_layout
from qllm_jax.scheduler import dispatch as d
from qllm_jax.scheduler import experts as ex
from qllm_jax.scheduler.multisim import MultiSimulator
from qllm_jax.scheduler.simulator import Simulator, VirtualClock, load_profile, make_request


def snap(r, waiting=(0, 0), running=(0, 0), kv=0, total=100, **kw) -> d.Snapshot:
    return d.Snapshot(replica=r, waiting=waiting, running=running, kv_used=kv, kv_total=total, **kw)


def req(prompt=100, match=(0, 0), user=None, priority=0, **kw) -> d.DispatchRequest:
    return d.DispatchRequest("q", prompt, 10, priority, user, tuple(match), **kw)


# -- production anchors ------------------------------------------------------------------------


def test_round_robin_cycles():
    p = d.RoundRobin()
    snaps = [snap(r) for r in range(3)]
    assert [p.choose(req(match=(0, 0, 0)), snaps) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_vllm_balancer_weighs_waiting_four_times():
    p = d.VllmBalancer()
    # replica 0: 1 waiting + 0 running = 4; replica 1: 0 waiting + 3 running = 3
    assert p.choose(req(), [snap(0, waiting=(1, 0)), snap(1, running=(2, 1))]) == 1
    # 4 vs 5: replica 0
    assert p.choose(req(), [snap(0, waiting=(1, 0)), snap(1, running=(5, 0))]) == 0
    assert p.choose(req(), [snap(0), snap(1)]) == 0  # ties: the lowest index


def test_power_of_two_picks_the_shorter_of_two():
    p = d.PowerOfTwo(seed=3)
    snaps = [snap(0, running=(9, 0)), snap(1, running=(1, 0)), snap(2, running=(5, 0))]
    picks = {p.choose(req(), snaps) for _ in range(200)}
    assert picks == {1, 2}  # replica 0 is never the shorter of any pair
    assert d.PowerOfTwo().choose(req(match=(0,)), [snap(0)]) == 0


def test_cache_aware_follows_the_match_above_the_threshold():
    p = d.CacheAware()
    snaps = [snap(0, running=(5, 0)), snap(1, running=(1, 0))]
    assert p.choose(req(prompt=100, match=(31, 0)), snaps) == 0  # 0.31 > 0.3: the match
    assert p.choose(req(prompt=100, match=(30, 0)), snaps) == 1  # 0.30: least loaded


def test_cache_aware_switches_to_least_loaded_exactly_when_both_thresholds_trip():
    p = d.CacheAware()
    r = req(prompt=100, match=(100, 0))

    def pick(busy, idle):
        return p.choose(r, [snap(0, running=(busy, 0)), snap(1, running=(idle, 0))])

    assert pick(64, 0) == 0  # difference 64: not > 64
    assert pick(65, 0) == 1  # 65 > 64 and 65 > 1.5 * 0
    assert pick(200, 134) == 0  # difference 66 but 200 < 1.5 * 134 = 201
    assert pick(202, 134) == 1  # 68 > 64 and 202 > 201


def test_llmd_weighted_score():
    p = d.LlmdScorer()
    snaps = [snap(0, waiting=(4, 0), kv=50), snap(1, waiting=(0, 0), kv=90)]
    # replica 0: 3 * 0.5 + 2 * 0 + 2 * 0.5 = 2.5; replica 1: 0 + 2 * 1 + 2 * 0.1 = 2.2
    assert p.scores(req(match=(50, 0)), snaps) == pytest.approx([2.5, 2.2])
    assert p.choose(req(match=(50, 0)), snaps) == 0
    assert p.choose(req(match=(30, 0)), snaps) == 1  # 1.9 + 1 = 1.9 vs 2.2


# -- the paper's dispatcher and ours -------------------------------------------------------------


def test_dplb_drops_saturated_and_balances_kv_first():
    p = d.PaperDispatcher()
    # replica 0 saturated (KV 0.95) though idle: never chosen while another is not
    snaps = [snap(0, kv=95), snap(1, kv=50, running_tokens=(5000, 0)), snap(2, kv=30)]
    assert p.choose(req(match=(0, 0, 0)), snaps) == 2  # KV 0.5 vs 0.3: unbalanced: least KV
    all_sat = [
        snap(0, kv=99, running_tokens=(20, 0)),
        snap(1, kv=91, running_tokens=(10, 0)),
        snap(2, kv=95),
    ]
    assert d.PaperDispatcher().choose(req(match=(0, 0, 0)), all_sat) == 2  # all saturated:
    # all are candidates; KV within 0.1 of the least: balanced, least token load


def test_dplb_least_token_load_when_kv_is_balanced():
    p = d.PaperDispatcher()
    snaps = [snap(0, kv=30, running_tokens=(4000, 0)), snap(1, kv=35, waiting_tokens=(0, 100))]
    assert p.choose(req(match=(0, 0)), snaps) == 1
    # a prefix match lowers the request's own prefill on replica 0 (count_own_prefill)
    snaps = [snap(0, kv=30, running_tokens=(100, 0)), snap(1, kv=35, running_tokens=(150, 0))]
    assert p.choose(req(prompt=1000, match=(0, 0)), snaps) == 0
    assert p.choose(req(prompt=1000, match=(0, 900)), snaps) == 1


def test_dplb_stickiness_within_both_tolerances():
    p = d.PaperDispatcher()
    idle = [snap(0), snap(1)]
    assert p.choose(req(user="u", match=(0, 0)), idle) == 0
    # sticky replica 0 is 2999 tokens busier: within 3000, kept
    s = [snap(0, running_tokens=(2999, 0)), snap(1)]
    assert p.choose(req(user="u", prompt=1, match=(0, 0)), s) == 0
    s = [snap(0, running_tokens=(3001, 0)), snap(1)]  # beyond: least load, and it sticks there
    assert p.choose(req(user="u", prompt=1, match=(0, 0)), s) == 1
    assert p.users["u"] == 1
    s = [snap(0), snap(1, kv=11)]  # KV use 0.11 above the least: not balanced
    assert p.choose(req(user="u", prompt=1, match=(0, 0)), s) == 0


def test_dplb_ties_rotate():
    p = d.PaperDispatcher()
    idle = [snap(r) for r in range(3)]
    assert [p.choose(req(match=(0, 0, 0)), idle) for _ in range(4)] == [0, 1, 2, 0]


def test_ours_sends_ls_where_the_wait_is_least():
    p = d.OursDispatcher()
    # replica 0 preempts inside passes: LS waits one segment (10 ms); replica 1 runs passes
    # whole: the rest of its pass (50 ms) although its pass is the same
    snaps = [
        snap(0, pass_left_s=0.05, segment_s=0.01, preemptive=True, token_s=1e-5),
        snap(1, pass_left_s=0.05, segment_s=0.01, preemptive=False, token_s=1e-5),
    ]
    assert p.ls_wait(req(prompt=100, match=(0, 0)), snaps[0]) == pytest.approx(0.011)
    assert p.choose(req(prompt=100, match=(0, 0)), snaps) == 0
    # LS prefill queued ahead counts, BE does not
    snaps = [
        snap(0, waiting_tokens=(2000, 0), token_s=1e-5),
        snap(1, waiting_tokens=(0, 50_000), token_s=1e-5),
    ]
    assert p.choose(req(prompt=100, match=(0, 0)), snaps) == 1
    # no KV room for it: the penalty
    snaps = [snap(0, kv=99, token_s=1e-5), snap(1, waiting_tokens=(2000, 0), token_s=1e-5)]
    assert p.choose(req(prompt=100, match=(0, 0), kv_pages=5), snaps) == 1


def test_ours_sends_be_to_kv_room_and_prefix_affinity():
    p = d.OursDispatcher()
    be = req(prompt=100, priority=1, match=(0, 80))
    snaps = [snap(0, kv=10), snap(1, kv=20)]
    # replica 1: 3 * 0.8 + 2 * 0.8 + 2 = 6.0 vs replica 0: 0 + 1.8 + 2 = 3.8
    assert p.choose(be, snaps) == 1
    snaps = [snap(0, kv=10), snap(1, kv=95)]  # replica 1 saturated: dropped
    assert p.choose(be, snaps) == 0


def test_make_policy_and_staleness_table():
    for name in d.POLICIES:
        assert d.make_policy(name).name == name
        assert name in d.DEFAULT_STALENESS_S
    with pytest.raises(ValueError, match="unknown dispatch policy"):
        d.make_policy("nope")


# -- the load board --------------------------------------------------------------------------------


def test_board_staleness_and_optimistic_increments():
    reads = []
    state = {"waiting": 0}

    def read(r):
        reads.append(r)
        return snap(r, waiting=(state["waiting"], 0))

    b = d.LoadBoard(2, read, staleness_s=0.1)
    assert [s.num_waiting for s in b.view(0.0)] == [0, 0]
    state["waiting"] = 7
    b.dispatched(1, req(match=(0, 0)))
    assert [s.num_waiting for s in b.view(0.05)] == [0, 1]  # stale, plus the one we sent
    assert len(reads) == 2
    assert [s.num_waiting for s in b.view(0.1)] == [7, 7]  # 0.1 s old: read again
    assert len(reads) == 4
    fresh = d.LoadBoard(1, read, staleness_s=0.0)
    fresh.view(0.0), fresh.view(0.0)
    assert fresh.reads == 2
    # at staleness 0 a replica is read when the policy first looks at it, as of the view
    reads.clear()
    state["waiting"] = 3
    view = d.LoadBoard(3, read, staleness_s=0.0).view(0.5)
    assert len(view) == 3 and reads == []
    assert view[2].num_waiting == 3 and view[2] is view[2] and reads == [2]
    assert [s.replica for s in view] == [0, 1, 2] and reads == [2, 0, 1]
    assert all(s.time == 0.5 for s in view) and view[-1] is view[2]
    with pytest.raises(IndexError):
        view[3]
    with pytest.raises(ValueError):
        d.LoadBoard(1, read, staleness_s=-1)


# -- expert placement ------------------------------------------------------------------------------


def test_static_and_eplb_placement():
    assert ex.static_placement(8, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    loads = [8.0, 1, 1, 1, 1, 1, 1, 2]
    pl = ex.eplb_placement(loads, 2, 5)  # 10 slots, 8 experts: 2 copies to the hottest
    assert sorted(e for r in pl for e in r).count(0) == 3  # 8/2 = 4 > 2: a third copy
    assert all(len(r) == 5 for r in pl)
    assert sorted(r.count(0) for r in pl) == [1, 2]  # 3 copies spread over the 2 ranks
    p = [x / sum(loads) for x in loads]
    assert max(ex.rank_shares(pl, p)) < max(ex.rank_shares(ex.static_placement(8, 2), p))
    assert sum(ex.rank_shares(pl, p)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ex.eplb_placement(loads, 2, 3)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0.01, 10), min_size=4, max_size=16),
    st.integers(1, 4),
    st.integers(0, 2),
)
def test_eplb_places_every_expert_and_beats_static(loads, ranks, extra):
    n = len(loads) - len(loads) % ranks or ranks
    loads = (loads * 4)[:n]
    slots = n // ranks + extra
    pl = ex.eplb_placement(loads, ranks, slots)
    held = [e for r in pl for e in r]
    assert set(held) == set(range(n)) and len(held) == ranks * slots
    p = [x / sum(loads) for x in loads]
    shares = ex.rank_shares(pl, p)
    assert sum(shares) == pytest.approx(1.0)
    # greedy with copies is never worse than the largest single copy forces, and it never
    # loses to the static placement by more than one expert's load
    static = max(ex.rank_shares(ex.static_placement(n, ranks), p))
    assert max(shares) <= static + max(p) + 1e-9


def test_expert_state_drifts_and_rebalances():
    ep = ex.ExpertParallel(
        num_layers=2, num_experts=16, top_k=2, hidden=64, ranks=4, eplb=True, drift_s=1.0,
        rebalance_steps=5, window_steps=5, migration_s=2.0,
    )  # fmt: skip
    s = ex.ExpertState(ep, 1)
    first = [list(map(list, pl)) for pl in s.placement]
    stalls = [s.tick(t * 0.5) for t in range(1, 11)]
    assert s.migrations == 2 and stalls[4] >= 0 and stalls[9] > 0  # drift moved experts
    assert stalls[9] <= 2.0 and s.placement != first
    static = ex.ExpertState(ex.ExpertParallel(2, 16, 2, 64, 4, eplb=False), 1)
    assert all(static.tick(t) == 0 for t in range(10)) and static.migrations == 0


# -- the N-engine simulator ------------------------------------------------------------------------

COST = load_profile("mixtral-a100-efficient")
SEGMENTS = segment_layout(4, 8, 8, False)


def config(**kw) -> SchedulerConfig:
    base = dict(page_size=16, num_pages=300, max_model_len=2048, policy="priority",
                queue_order="fcfs", age_after_s=None)  # fmt: skip
    return SchedulerConfig(**(base | kw))


def workload(seed, n=40, shared=False):
    rng = random.Random(seed)
    t, out = 0.0, []
    system = [7] * 64
    for i in range(n):
        t += rng.expovariate(30)
        p = rng.randint(20, 200)
        ids = system + [1000 + i] * (p - 64) if shared and p > 64 else None
        r = make_request(f"r{i}", i, p, rng.randint(2, 40), rng.randint(0, 1), t, ids)
        out.append((t, r, f"u{i % 3}"))
    return out


def plain(events, cfg):
    clock = VirtualClock()
    sim = Simulator(Scheduler(cfg, SEGMENTS, clock), COST, clock)
    return sim.run([(t, r) for t, r, _ in events]).records


@pytest.mark.parametrize("policy", ["round_robin", "ours", "qllm"])
def test_one_replica_equals_the_plain_simulator(policy):
    cfg = config(policy="qllm", granularity="layer") if policy == "qllm" else config()
    want = plain(workload(1), cfg)
    for ep in (None, ex.ExpertParallel(4, 8, 2, 4096, ranks=1)):
        name = "round_robin" if policy == "qllm" else policy
        m = MultiSimulator(1, cfg, SEGMENTS, COST, d.make_policy(name), 0.1, ep=ep)
        got = m.run(workload(1)).records
        times = {k: (r.first_token, r.finish) for k, r in got.items()}
        expect = {k: (r.first_token, r.finish) for k, r in want.items()}
        if ep is None:  # the same arithmetic: bitwise
            assert times == expect
        else:  # lockstep sums a plan's segments in another order: equal up to rounding
            assert times.keys() == expect.keys()
            for k, v in times.items():
                assert v == pytest.approx(expect[k], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("lockstep", [False, True])
@pytest.mark.parametrize("policy", sorted(d.POLICIES))
def test_every_request_served_once_and_no_page_leaks(policy, lockstep):
    ep = (
        ex.ExpertParallel(4, 8, 2, 4096, ranks=3, eplb=True, rebalance_steps=20)
        if lockstep
        else None
    )
    cfg = (
        config(policy="qllm", granularity="layer", mix_classes=True)
        if policy == "ours"
        else config()
    )
    events = workload(2, 60, shared=True)
    m = MultiSimulator(3, cfg, SEGMENTS, COST, d.make_policy(policy, seed=1), 0.05, ep=ep)
    res = m.run(events)
    assert sorted(res.records) == sorted(r.request_id for _, r, _ in events)
    assert all(rec.finish_reason == "length" for rec in res.records.values())
    assert all(rec.output_tokens == r.sampling.max_tokens
               for _, r, _ in events for rec in [res.records[r.request_id]])  # fmt: skip
    assert sum(res.stats["dispatched"]) == len(events)
    for rep in m.replicas:  # no page held once all is done; the allocator is consistent
        assert rep.sched.allocator.num_used == 0
        rep.sched.allocator.check()
        assert not rep.sched.has_unfinished()
    assert res.stats["prefix_cache_hit_rate"] > 0
    if lockstep:
        assert res.stats["expert_rank_balance"] >= 1.0 - 1e-9


def test_token_slice_is_the_slice_of_all_tokens():
    r = make_request("a", 0, 5, 10)
    r.output_token_ids = [7, 8, 9]
    for start in range(9):
        for end in range(start, 10):
            assert r.token_slice(start, end) == tuple(r.all_token_ids[start:end])


@pytest.mark.parametrize("lockstep", [False, True])
def test_ttft_splits_into_queueing_and_prefill(lockstep):
    # two seats a pass, six requests at once: four wait for seats, and only they queue
    ep = ex.ExpertParallel(4, 8, 2, 4096, ranks=1) if lockstep else None
    events = [(0.0, make_request(f"r{i}", i, 50, 5), None) for i in range(6)]
    m = MultiSimulator(1, config(max_batch_size=2), SEGMENTS, COST, d.RoundRobin(), ep=ep)
    res = m.run(events)
    assert sorted(res.started) == sorted(res.records)
    queue = {k: res.started[k] - r.arrival for k, r in res.records.items()}
    assert all(0 <= queue[k] < r.ttft for k, r in res.records.items())
    assert sorted(k for k, q in queue.items() if q > 0) == ["r2", "r3", "r4", "r5"]


def test_lockstep_prices_the_busiest_rank_and_the_all_to_all():
    cfg = config()
    fast = ex.ExpertParallel(4, 8, 2, 4096, ranks=2, a2a_gbps=1e6, skew=0.0)
    slow = ex.ExpertParallel(4, 8, 2, 4096, ranks=2, a2a_gbps=1.0, skew=0.0)
    ends = []
    for ep in (fast, slow):
        m = MultiSimulator(2, cfg, SEGMENTS, COST, d.RoundRobin(), ep=ep)
        res = m.run(workload(3, 20))
        ends.append(res.stats["end_time"])
        assert res.stats["expert_rank_balance"] == pytest.approx(1.0)  # uniform routing
    assert ends[1] > ends[0]


def test_scheduler_package_never_imports_jax():
    import subprocess
    import sys

    code = (
        "import sys, importlib.util, pathlib\n"
        "root = pathlib.Path('scheduler')\n"
        "sys.path.insert(0, '.')\n"
        "import importlib\n"
        "spec = importlib.util.spec_from_file_location('scheduler', root / '__init__.py',"
        " submodule_search_locations=[str(root)])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['scheduler'] = m\n"
        "spec.loader.exec_module(m)\n"
        "import scheduler.dispatch, scheduler.multisim, scheduler.experts\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
    )
    from pathlib import Path

    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 50), st.integers(0, 50), st.integers(0, 100), st.integers(0, 9)),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 500),
    st.integers(0, 1),
    st.sampled_from(sorted(d.POLICIES)),
)
def test_every_policy_returns_a_replica_and_never_a_saturated_one_if_avoidable(
    rows, prompt, prio, name
):
    snaps = [
        snap(r, waiting=(w, 0), running=(0, run), kv=kv, waiting_tokens=(w * 10, 0),
             pass_left_s=0.01 * run, token_s=1e-5)
        for r, (w, run, kv, _) in enumerate(rows)
    ]  # fmt: skip
    match = tuple(min(prompt, 16 * m) for *_, m in rows)
    p = d.make_policy(name, seed=0)
    r = p.choose(req(prompt=prompt, match=match, priority=prio, user="u"), snaps)
    assert 0 <= r < len(snaps)
    avoidable = any(s.kv_use <= d.DPLB_KV_SATURATED for s in snaps)
    if avoidable and (name == "dplb" or (name == "ours" and prio)):
        assert snaps[r].kv_use <= d.DPLB_KV_SATURATED


def test_cached_match_over_published_hashes_equals_the_allocators_match_length():
    """A router's prefix match from a replica's published page hashes is what the replica's
    own ``match_length`` answers (whole pages, never the last token's)."""
    from qllm_jax.scheduler.pages import PageAllocator, extend_hashes, reusable_pages

    ps = 4
    alloc = PageAllocator(16, ps, enable_caching=True)
    tokens = list(range(23))
    chain = extend_hashes([], tokens, ps, 5)
    for page, h in zip(alloc.allocate(3), chain[:3]):
        alloc.register(page, h)
    published = set(alloc.cached_keys())
    for probe in (tokens, tokens[:13], tokens[:12], tokens[:9], [99, *tokens[1:]], tokens[:4]):
        mine = extend_hashes([], probe, ps, reusable_pages(len(probe), ps))
        assert d.cached_match(mine, published, ps) == alloc.match_length(probe), probe
    assert alloc.match_length(tokens) == 12  # (the probes reach the cached run's end)
