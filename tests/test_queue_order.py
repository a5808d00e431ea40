"""Ordering inside a priority class (``queue_order``, ``age_after_s``) against the fake executor:
exact hand-computed timelines and a property bounding how long aging lets a long request wait.

Unit cost model as in test_scheduler.py: 8 layers, layer granularity, a pass costs 17 whatever
its rows (16 segments + head); at most 64 rows a pass, so a 200-token prompt takes 4 passes.
Requests arriving during a plan are seen when it ends. No jax.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scheduler import Scheduler, SchedulerConfig, segment_layout
from scheduler.plan import Plan
from scheduler.simulator import CostModel, Simulator, VirtualClock, make_request

LS, BE = 0, 1
PASS = 17.0


def run(events, **knobs):
    """Run to the end; returns (first-token time by request id, scheduler)."""
    config = dict(
        page_size=4,
        num_pages=512,
        max_model_len=256,
        max_batch_size=1,
        max_num_batched_tokens=64,
        policy="priority",
        granularity="layer",
        aging_s=None,
        max_park_s=None,
        age_after_s=None,
        be_share=None,  # (anti-starvation across classes is tested in test_scheduler.py)
    )
    clock = VirtualClock()
    sched = Scheduler(
        SchedulerConfig(**(config | knobs)), segment_layout(8, 4, 4, False), clock=clock
    )
    cost = CostModel(attn_base=1.0, expert_base=1.0, head_base=1.0)
    result = Simulator(sched, cost, clock).run(events)
    assert sched.allocator.num_used == 0 and not sched.requests
    return {rid: rec.first_token for rid, rec in result.records.items()}, sched


def req(rid, seq, prompt, at=0.0, priority=LS, tokens=1):
    return (at, make_request(rid, seq, prompt, tokens, priority, at))


def three():
    """Prompts of 200, 10 and 50 tokens arriving together (in that order), 1 token each."""
    return [req("p200", 0, 200), req("p10", 1, 10), req("p50", 2, 50)]


@pytest.mark.parametrize("policy", ["priority", "qllm"])
@pytest.mark.parametrize(
    "order, age, first_tokens",
    [
        # arrival order: 200 takes 4 passes (0 -> 68), then 10 (-> 85), then 50 (-> 102)
        ("fcfs", None, {"p200": 68.0, "p10": 85.0, "p50": 102.0}),
        # least work first: 10 (0 -> 17), 50 (-> 34), 200 (-> 102)
        ("sjf", None, {"p10": 17.0, "p50": 34.0, "p200": 102.0}),
        # all three ratios are 1 at first (nobody has waited): ties go to the least work, and
        # from then on the three have waited the same, so the shortest has the highest ratio
        ("hrrn", None, {"p10": 17.0, "p50": 34.0, "p200": 102.0}),
        # aging at 10: at t=17 all have waited 17 >= 10, so the oldest (p200, first in arrival
        # order) goes next: 17 -> 85, then p50: 85 -> 102
        ("sjf", 10.0, {"p10": 17.0, "p200": 85.0, "p50": 102.0}),
        # aging at 20: at t=17 nobody has aged yet, so p50 still goes before p200
        ("sjf", 20.0, {"p10": 17.0, "p50": 34.0, "p200": 102.0}),
    ],
)
def test_order_of_three_prompts_arriving_together(policy, order, age, first_tokens):
    got, _ = run(three(), policy=policy, queue_order=order, age_after_s=age)
    assert got == first_tokens


def test_hrrn_lets_a_long_request_that_waited_go_before_a_fresh_short_one():
    """X1 (64 tokens) runs 0 -> 17; L (60) arrives at 1 and X2 (8) at 2, both while nothing
    has been computed. At 17 X2's ratio (64 + 8) / 8 = 9 beats L's (64 + 60) / 60: X2 runs
    17 -> 34. S (10) arrived during X2's pass and is seen at 34, when 72 rows have been
    computed: L's ratio (72 + 60) / 60 = 2.2 beats S's (0 + 10) / 10 = 1, so L runs 34 -> 51
    and S 51 -> 68. sjf takes S (10 < 60) at 34; fcfs takes L at 17."""

    def events():
        return [req("x1", 0, 64), req("l", 1, 60, 1.0), req("x2", 2, 8, 2.0), req("s", 3, 10, 20.0)]

    hrrn, _ = run(events(), queue_order="hrrn")
    assert hrrn == {"x1": 17.0, "x2": 34.0, "l": 51.0, "s": 68.0}
    sjf, _ = run(events(), queue_order="sjf")
    assert sjf == {"x1": 17.0, "x2": 34.0, "s": 51.0, "l": 68.0}
    fcfs, _ = run(events(), queue_order="fcfs")
    assert fcfs == {"x1": 17.0, "l": 34.0, "x2": 51.0, "s": 68.0}


def test_ls_goes_before_be_whatever_their_sizes_and_ages():
    """An LS prompt of 60 and a BE prompt of 4 arrive together, and more LS prompts every pass:
    under sjf with aging after 1 s the BE request ages at once, but aging orders only inside
    a class, so it waits for every LS request (5 passes) and runs 85 -> 102."""
    events = [req("ls0", 0, 60), req("be", 1, 4, priority=BE)]
    events += [req(f"ls{i}", i + 1, 4, at=PASS * i) for i in range(1, 5)]
    got, _ = run(events, queue_order="sjf", age_after_s=1.0)
    assert got["ls0"] == 17.0 and got["be"] == 102.0
    assert max(v for k, v in got.items() if k != "be") == 85.0


def stream(n: int = 8):
    """A long prompt (40 tokens) and a short one (4) at t=0, then one short prompt every pass:
    whenever a pass ends a fresh short request is waiting."""
    events = [req("s0", 0, 4), req("long", 1, 40)]
    return events + [req(f"s{i}", i + 1, 4, at=PASS * i) for i in range(1, n)]


@pytest.mark.parametrize(
    "order, age, long_first",
    [
        # sjf without aging: every pass goes to a short request; the long one waits for the
        # stream to end (8 shorts: 0 -> 136) and runs 136 -> 153
        ("sjf", None, 153.0),
        # aging after 20: at t=34 the long request has waited 34 >= 20 and goes first: -> 51
        ("sjf", 20.0, 51.0),
        # hrrn: at t=0 both ratios are 1 and s0 (less work) runs; at 17 the long request has
        # waited s0's 4 rows, (4 + 40) / 40 = 1.1, while s1, seen at 17, has waited none: 1.0
        ("hrrn", None, 34.0),
        ("fcfs", None, 34.0),  # arrival order: after s0
    ],
)
def test_aging_bounds_the_wait_of_a_long_request_behind_a_stream(order, age, long_first):
    got, _ = run(stream(), queue_order=order, age_after_s=age)
    assert got["long"] == long_first


# -- property: aging bounds the wait -----------------------------------------------------------


class AgingProbe(Simulator):
    """Records when the long request first runs, and at the first plan boundary where it has
    waited ``age_after_s``, a bound on when it must start: that boundary, plus the pass then in
    progress, plus one pass per step of work of every request ahead of it in arrival order (a
    step: one prefill chunk or one decode token; the most urgent request ahead always gets a
    full step in the next pass)."""

    def __init__(self, *args, long_id: str, step_tokens: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.long_id, self.step_tokens = long_id, step_tokens
        self.start: float | None = None
        self.bound: float | None = None
        self.ahead = 0

    def step(self, plan: Plan) -> None:
        sched, now = self.scheduler, self.clock.now
        long = next((r for r in self.requests.values() if r.request_id == self.long_id), None)
        if long is None:  # not arrived yet
            return super().step(plan)
        if self.bound is None and now - long.arrival_time >= sched.config.age_after_s:
            mine = (long.arrival_time, long.seq_id)
            steps = [
                math.ceil((r.num_tokens - r.num_computed) / self.step_tokens)
                + r.sampling.max_tokens
                - len(r.output_token_ids)
                - 1
                for r in sched.requests.values()
                if (r.arrival_time, r.seq_id) < mine
            ]
            self.ahead = len(steps)
            self.bound = now + PASS * (1 + sum(steps))
        if self.start is None and any(c.seq_id == long.seq_id for c in plan.chunks):
            self.start = now
        super().step(plan)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(["priority", "qllm"]),
    order=st.sampled_from(["sjf", "hrrn"]),
    batch=st.integers(1, 3),
    chunk=st.sampled_from([4, 8, 16]),
    age=st.sampled_from([20.0, 40.0, 80.0]),
    long_at=st.integers(0, 60),
    long_prompt=st.integers(20, 120),
    shorts=st.lists(
        st.tuples(st.integers(1, 20), st.integers(1, 8), st.integers(1, 3)),  # gap, prompt, out
        min_size=5,
        max_size=40,
    ),
)
def test_a_long_request_starts_within_age_after_s_plus_the_work_ahead_of_it(
    policy, order, batch, chunk, age, long_at, long_prompt, shorts
):
    events, t = [req("long", 0, long_prompt, float(long_at))], 0.0
    for i, (gap, prompt, out) in enumerate(shorts):
        events.append(req(f"s{i}", i + 1, prompt, t, tokens=out))
        t += gap
    config = dict(
        page_size=4,
        num_pages=1024,
        max_model_len=256,
        max_batch_size=batch,
        max_num_batched_tokens=16,
        prefill_chunk=chunk,
        policy=policy,
        granularity="layer",
        aging_s=None,
        max_park_s=None,
        queue_order=order,
        age_after_s=age,
    )
    clock = VirtualClock()
    sched = Scheduler(SchedulerConfig(**config), segment_layout(8, 4, 4, False), clock=clock)
    cost = CostModel(attn_base=1.0, expert_base=1.0, head_base=1.0)
    sim = AgingProbe(sched, cost, clock, long_id="long", step_tokens=min(chunk, 16))
    sim.run(events)
    assert sim.start is not None
    if sim.bound is not None:  # it had not started before it aged
        assert sim.start <= sim.bound, (sim.start, sim.bound, sim.ahead)
        event("aged before it started")
        if sim.ahead:
            event("requests ahead of it when it aged")
        if sim.start == sim.bound:
            event("the bound is tight")
    else:
        assert sim.start - long_at < age + PASS  # started before aging could matter
