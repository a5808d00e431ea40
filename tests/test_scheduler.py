"""Scheduler tests against the fake executor (``scheduler.simulator``): exact and fast, no jax.

Timelines use a unit cost model: every attention and experts segment costs 1.0, the head 1.0,
nothing else costs anything. The model has 8 layers and 4 experts: with ``group_size=4`` a layer
is 2 segments (attention, experts), a pass 16 segments + head = 17; with ``group_size=1`` a layer
is 5 segments, a pass 40 + head = 41. Requests arriving during a plan are seen when it ends.

Imports the top-level ``scheduler`` package (installed as ``qllm_jax.scheduler``) directly, so
that this file never imports jax and runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from collections import Counter

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scheduler import Scheduler, SchedulerConfig, segment_layout
from scheduler.core import PRESETS
from scheduler.plan import Chunk, Plan, PlanError, SampleSpec, decode_plan, encode_plan
from scheduler.simulator import (
    PROFILES,
    CostModel,
    Simulator,
    VirtualClock,
    load_profile,
    make_request,
)

LS, BE = 0, 1


def unit_cost(group_size: int, num_experts: int = 4) -> CostModel:
    return CostModel(attn_base=1.0, expert_base=num_experts / group_size, head_base=1.0)


def simulate(events, group_size=4, **knobs):
    """Run ``events`` to the end (policy qllm, aging and park limit off unless given); check
    nothing is left behind. Returns (records, stats, scheduler)."""
    config = dict(
        page_size=4,
        num_pages=256,
        max_model_len=256,
        max_batch_size=8,
        max_num_batched_tokens=64,
        aging_s=None,
        max_park_s=None,
        be_share=None,  # the timelines below are of other mechanisms; be_share has its own
        granularity="layer" if group_size == 4 else "expert",
    )
    clock = VirtualClock()
    segments = segment_layout(8, 4, group_size, shared_expert=False)
    sched = Scheduler(SchedulerConfig(**(config | knobs)), segments, clock=clock)
    sim = Simulator(sched, unit_cost(group_size), clock)
    result = sim.run(events)
    assert_clean(sched, sim)
    return result.records, result.stats, sched


def assert_clean(sched: Scheduler, sim: Simulator) -> None:
    assert sched.allocator.num_used == 0  # no page leaks
    assert sched.swap_pages_free == sched.config.swap_pages  # no host slot leaks
    assert not sched.passes and not sched.in_pass and not len(sim.executor.ledger)
    assert not sched.waiting and not sched.admitted and not sched.requests


def chunk(seq, start, n, samples, pages=None):
    """A snapshot row chunk of ``n`` tokens of sequence ``seq`` from ``start``."""
    pages = pages if pages is not None else tuple(range(1, 2 + (start + n) // 4))
    sample = SampleSpec(0.0, 0, 1.0, 0, 0) if samples else None
    return Chunk(seq, start, (5,) * n, pages, sample)


def req(rid, seq, prompt, tokens, priority=LS, at=0.0):
    return (at, make_request(rid, seq, prompt, tokens, priority, at))


def be_then_ls(be_tokens=3, ls_tokens=1):
    """A BE request (8-token prompt) at t=0; an LS request (4-token prompt) at t=3."""
    return [req("be", 0, 8, be_tokens, BE), req("ls", 1, 4, ls_tokens, LS, at=3.0)]


# -- one timeline, every policy ----------------------------------------------------------------


@pytest.mark.parametrize(
    "policy, granularity, group, ls_first, be_tokens_at, preemptions",
    [
        # fcfs: the BE prefill runs whole (0 -> 17); decode-first, so the BE decodes (17 -> 34,
        # 34 -> 51) before the LS prefill may start: 51 -> 68.
        ("fcfs", "layer", 4, 68.0, [17.0, 34.0, 51.0], 0),
        # priority: the LS waits only for the current iteration: at t=17 one pass holds the LS
        # prefill and the BE decode (rows in priority order): 17 -> 34.
        ("priority", "layer", 4, 34.0, [17.0, 34.0, 51.0], 0),
        # qllm, layers: BE plans end at t=2, 4; at t=4 the BE pass parks at cursor 4 (a layer
        # boundary) and the LS pass runs 16 segments + head: 4 + 17 = 21. The BE pass resumes
        # at cursor 4: 12 segments + head, 21 -> 34; then two decodes 34 -> 51 -> 68.
        ("qllm", "layer", 4, 21.0, [34.0, 51.0, 68.0], 1),
        # qllm, experts: one segment per plan, so at t=3 the BE pass parks at cursor 3 (between
        # expert groups) and the LS pass runs 40 + 1: 3 + 41 = 44. BE: 37 + 1 more -> 82.
        ("qllm", "expert", 1, 44.0, [82.0, 123.0, 164.0], 1),
    ],
)
def test_ls_behind_be_prefill(policy, granularity, group, ls_first, be_tokens_at, preemptions):
    records, stats, _ = simulate(
        be_then_ls(), group_size=group, policy=policy, granularity=granularity
    )
    ls, be = records["ls"], records["be"]
    assert ls.first_token == ls.finish == ls_first
    assert be.first_token == be_tokens_at[0] and be.finish == be_tokens_at[-1]
    assert be.output_len == 3 and ls.output_len == 1
    assert be.num_preemptions == preemptions
    assert ls.num_preemptions == 0
    if policy == "qllm":
        boundary = "layer" if granularity == "layer" else "expert"
        assert stats[f"preemptions_{boundary}"] == 1
        # the LS waited 4 - 3 = 1 for a layer boundary, 0 for the next expert group
        assert stats["preempt_wait_max"] == (1.0 if granularity == "layer" else 0.0)
        assert be.parked_time == ls_first - (4.0 if granularity == "layer" else 3.0)


@pytest.mark.parametrize(
    "mix_decodes, be_first, resumed", [(False, 68.0, 55.0), (True, 38.0, 25.0)]
)
def test_parked_be_resumes_after_ls_finishes(mix_decodes, be_first, resumed):
    # The BE parks at t=4, cursor 4. The LS prefill ends at 21 and its two decodes at 38, 55.
    # One class per pass: each new LS pass outranks the parked BE pass, which resumes at 55:
    # 55 + 13 = 68. mix_decodes: the first LS decode pass (21 -> 38, no LS prompt left) absorbs
    # the BE rows at cursor 4 (t=25) and they sample with it at 38, the LS timeline unchanged.
    records, stats, _ = simulate(
        be_then_ls(be_tokens=1, ls_tokens=3), policy="qllm", mix_decodes=mix_decodes
    )
    assert [records["ls"].first_token, records["ls"].finish] == [21.0, 55.0]
    assert records["be"].first_token == be_first
    assert records["be"].parked_time == resumed - 4.0
    assert stats["absorbed_passes"] == int(mix_decodes)


def test_abort_of_a_parked_request_drops_its_carry():
    # The BE pass parks at t=4; the abort lands at t=10 (a plan boundary of the LS pass).
    events = [*be_then_ls(be_tokens=2), (10.0, "abort", "be")]
    records, stats, _ = simulate(events, policy="qllm")
    assert records["be"].finish_reason == "abort" and records["be"].finish == 10.0
    assert records["be"].output_len == 0
    assert records["ls"].finish == 21.0 and stats["end_time"] == 21.0


# -- absorbing and splitting parked passes -----------------------------------------------------


def test_later_pass_absorbs_parked_rows_at_the_same_cursor():
    # absorb_be: the BE pass parks at t=3, cursor 3; the LS pass reaches cursor 3 at t=6 and
    # takes the BE rows along, so both sample at 3 + 41 = 44. The BE decode: 44 -> 85.
    records, stats, _ = simulate(be_then_ls(be_tokens=2), group_size=1, absorb_be=True)
    assert stats["absorbed_passes"] == 1
    assert records["ls"].first_token == records["be"].first_token == 44.0
    assert records["be"].finish == 85.0 and records["be"].output_len == 2
    assert records["be"].parked_time == 6.0 - 3.0
    assert records["be"].computed_tokens == 8 + 1  # the prompt once, the first token once


def test_absorbing_respects_max_batch_size():
    # As above with one request per pass: the LS pass may not take the BE rows along, so the BE
    # pass resumes at cursor 3 when the LS pass ends: 44 + 37 + 1 = 82.
    records, stats, _ = simulate(
        be_then_ls(be_tokens=1), group_size=1, absorb_be=True, max_batch_size=1
    )
    assert stats.get("absorbed_passes", 0) == 0
    assert records["ls"].first_token == 44.0 and records["be"].first_token == 82.0


def test_mixed_pass_is_split_when_another_ls_waits():
    # As above, and LS2 arrives at t=10 while the mixed (LS + BE) pass is at cursor 7: the pass
    # splits, the LS rows run on (sampling at 44), the BE rows park at cursor 7. LS2 then runs
    # 44 -> 85, absorbing the BE rows when it reaches cursor 7 at t=51. BE decode: 85 -> 126.
    # (The split-off pass must not be absorbed back by the plan that splits it: the simulator
    # rejects such a plan, as the engine would.)
    events = [*be_then_ls(be_tokens=2), req("ls2", 2, 4, 1, LS, at=10.0)]
    records, stats, _ = simulate(events, group_size=1, absorb_be=True)
    assert stats["splits"] == 1 and stats["absorbed_passes"] == 2
    assert records["ls"].first_token == 44.0
    assert records["ls2"].first_token == records["be"].first_token == 85.0
    assert records["be"].finish == 126.0 and records["be"].output_len == 2
    assert records["be"].num_preemptions == 2
    assert records["be"].parked_time == (6.0 - 3.0) + (51.0 - 10.0)


def test_aging_makes_a_mixed_pass_that_splits():
    # aging_s=20. A (BE) prefills 0 -> 17. B (BE, arrives t=5) joins A's first decode pass at
    # t=17 (both still priority 1). At t=20 A has aged to 0, B (arrived 5) not until t=25; LS
    # arrives at t=21: at the t=21 boundary the pass {A: 0, B: 1} is mixed and LS waits, so B's
    # rows park at cursor 4 and A's continue (A samples at 31 + 3 = 34). At t=34 A (aged 0,
    # arrived first) and LS (0) make one pass; at t=38 it reaches cursor 4, where B (aged to 0
    # by then: 33 s waited) is welcome: absorbed. A, LS, B all sample at 51.
    events = [req("a", 0, 4, 4, BE), req("b", 1, 4, 4, BE, at=5.0), req("ls", 2, 4, 2, LS, 21.0)]
    records, stats, _ = simulate(events, policy="qllm", aging_s=20.0)
    assert stats["splits"] == 1 and stats["absorbed_passes"] == 1
    assert records["b"].parked_time == 38.0 - 21.0
    assert records["b"].first_token == records["ls"].first_token == 51.0
    assert [records["a"].first_token, records["a"].finish] == [17.0, 68.0]
    assert records["ls"].finish == 68.0
    # then B alone: 68 -> 85 -> 102
    assert records["b"].finish == 102.0 and records["b"].output_len == 4


# -- LS decodes topped up with BE rows (mix_decodes) ---------------------------------------------


@pytest.mark.parametrize(
    "mix_decodes, be_first, end",
    [
        # the LS prompt runs alone (0 -> 17); from t=17 its decode rows carry the BE prompt
        # along: one pass 17 -> 34 gives LS its second token and BE its first
        (True, 34.0, 51.0),
        # one class per pass: BE waits for the LS decodes (17 -> 34 -> 51), then 51 -> 68
        (False, 68.0, 68.0),
    ],
)
def test_ls_decodes_are_topped_up_with_be(mix_decodes, be_first, end):
    events = [req("ls", 0, 4, 3, LS), req("be", 1, 4, 1, BE)]
    records, stats, _ = simulate(events, policy="qllm", mix_decodes=mix_decodes)
    assert records["ls"].first_token == 17.0 and records["ls"].finish == 51.0
    assert records["be"].first_token == be_first
    assert stats["end_time"] == end and stats["passes_ls"] == 3 and stats["passes_be"] == 1


def test_ls_prompt_splits_a_mixed_decode_pass_and_a_later_one_absorbs_its_be_rows():
    # Layer granularity, 2 units a layer, 8 layers + head = 17 a pass.
    # 0 -> 17: LS `a`'s prompt alone. 17: a's decode + the BE prompt, mixed. LS `b` arrives at
    # 20; at the t=21 boundary (cursor 2) the pass splits: `a` goes on alone (21 -> 34), the BE
    # row parks at cursor 2. 34 -> 51: a's last decode with b's prompt (a prompt: LS only).
    # 51: b's decode starts a pass that accepts BE rows; at cursor 2 (t=55) it absorbs the
    # parked BE row, which samples with it at 68 (resumed alone after it, it would be 81), then
    # decodes 68 -> 85.
    events = [req("a", 0, 4, 3, LS), req("be", 1, 4, 2, BE), req("b", 2, 4, 2, LS, at=20.0)]
    records, stats, _ = simulate(events, policy="qllm")
    assert stats["splits"] == 1 and stats["absorbed_passes"] == 1
    assert [records["a"].first_token, records["a"].finish] == [17.0, 51.0]
    assert [records["b"].first_token, records["b"].finish] == [51.0, 68.0]
    assert [records["be"].first_token, records["be"].finish] == [68.0, 85.0]
    assert records["be"].parked_time == 55.0 - 21.0


# -- bounded BE delay ----------------------------------------------------------------------------


@pytest.mark.parametrize("aging_s, be_first", [(None, 357.0), (10.0, 34.0)])
def test_aging_lets_a_starving_be_request_run(aging_s, be_first):
    # An LS request decodes 20 tokens, one 17-unit pass each (0 -> 340). With mix_decodes off a
    # new qllm pass takes one priority class only, so without aging the BE request waits for all
    # of them (340 + 17 = 357). With aging_s=10 it is priority 0 at t=17 and joins the LS pass:
    # 34 (with mix_decodes on it would join it anyway: test_ls_decodes_are_topped_up_with_be)
    events = [req("ls", 0, 4, 20, LS), req("be", 1, 4, 1, BE)]
    records, _, _ = simulate(events, policy="qllm", aging_s=aging_s, mix_decodes=False)
    assert records["ls"].finish == 340.0
    assert records["be"].first_token == be_first


@pytest.mark.parametrize(
    "max_park_s, be_first, ls_finish", [(None, 89.0 + 13.0, 89.0), (5.0, 34.0, 102.0)]
)
def test_expired_parked_pass_resumes_first_and_runs_to_its_end(max_park_s, be_first, ls_finish):
    # The BE pass parks at t=4, cursor 4; the LS prefill ends at 21. No limit: the LS decodes
    # (21 -> 38 -> 55 -> 72 -> 89) go first, then the BE pass (89 + 13). max_park_s=5: at t=21
    # the BE pass has been parked 17 > 5, so it resumes first and is not parked again although
    # LS work is runnable: 21 + 12 + 1 = 34. The LS decodes follow: 34 + 4 * 17 = 102. (One
    # class per pass: with mix_decodes the first LS decode pass would absorb the BE rows.)
    records, stats, _ = simulate(
        be_then_ls(be_tokens=1, ls_tokens=5), max_park_s=max_park_s, mix_decodes=False
    )
    assert records["be"].first_token == be_first
    assert records["be"].num_preemptions == 1 and stats["preemptions_layer"] == 1
    assert records["ls"].finish == ls_finish


def test_expired_rows_absorbed_by_an_ls_pass_are_not_split_off_again():
    # The BE pass parks at t=12, cursor 12 (LS1 arrived at 11). LS1's prefill reaches cursor 12
    # at t=24, when the BE rows have been parked 12 > 5: they ride along. LS2 arrives at 25;
    # the pass is mixed, but its BE rows are overdue, so it is not split: LS1 and BE sample at
    # 12 + 17 = 29. Then LS1 and LS2 share a pass: 29 -> 46, and LS1 decodes once more: 63.
    events = [req("be", 0, 8, 1, BE), req("ls1", 1, 4, 3, LS, 11.0), req("ls2", 2, 4, 1, LS, 25.0)]
    records, stats, _ = simulate(events, max_park_s=5.0)
    assert stats["absorbed_passes"] == 1 and stats.get("splits", 0) == 0
    assert records["be"].first_token == records["ls1"].first_token == 29.0
    assert records["be"].parked_time == 24.0 - 12.0
    assert records["ls2"].first_token == 46.0 and records["ls1"].finish == 63.0


def test_paper_preset_never_preempts_a_prefill_pass():
    # paper: layer granularity, prefill never preempted. The BE prefill runs whole (one plan,
    # 0 -> 17) though the LS arrives at 3; the LS prefill runs whole too (17 -> 34). The BE
    # decode (34 -> ...) is preempted at the t=38 layer boundary (cursor 4) by LS2 (t=37),
    # whose prefill runs whole 38 -> 55 (so it absorbs nothing on the way); the BE pass resumes
    # 55 -> 68, then its last decode 68 -> 85.
    events = [*be_then_ls(be_tokens=3), req("ls2", 2, 4, 1, LS, at=37.0)]
    records, stats, _ = simulate(events, **PRESETS["paper"])
    assert records["ls"].first_token == 34.0
    assert records["ls2"].first_token == 55.0
    assert [records["be"].first_token, records["be"].finish] == [17.0, 85.0]
    assert stats["preemptions_layer"] == 1 and records["be"].num_preemptions == 1
    assert stats["plans"] == 1 + 1 + 2 + 1 + 6 + 8  # whole prefills, layer-by-layer decodes


# -- KV pages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("caching, recomputed", [(False, 9), (True, 1)])
def test_priority_evicts_an_idle_be_request_when_pages_are_short(caching, recomputed):
    # 5 usable pages of 4 tokens. BE: 8 + 8 tokens -> 4 pages. LS (t=5): 8 + 4 -> 3 pages.
    # BE prefills 0 -> 17; at t=17 the LS needs 3 pages, 1 is free: the idle BE request is
    # evicted (its output so far is kept). LS: 17 -> 34 (first token), decodes to 85. BE is
    # readmitted at 85 and recomputes its 9 tokens (8 prompt + 1 output), sampling at 102; six
    # more decodes end at 102 + 6 * 17 = 204. With prefix caching its two computed prompt pages
    # stay cached (the LS request took the free page and BE's two empty ones): readmitted, it
    # maps them and recomputes only its output token, on the same timeline.
    events = [req("be", 0, 8, 8, BE), req("ls", 1, 8, 4, LS, at=5.0)]
    records, stats, _ = simulate(
        events, policy="priority", num_pages=6, enable_prefix_caching=caching
    )
    assert stats["evictions"] == 1
    assert [records["ls"].first_token, records["ls"].finish] == [34.0, 85.0]
    be = records["be"]
    assert [be.first_token, be.finish, be.output_len] == [17.0, 204.0, 8]
    assert be.num_preemptions == 1
    assert be.computed_tokens == 8 + recomputed + 6  # prompt, recomputation, decodes
    assert stats["prefix_cache_hits"] == (8 if caching else 0)


def test_fcfs_never_evicts():
    # fcfs: the LS request waits for pages until the BE request finishes (8 passes: 136).
    events = [req("be", 0, 8, 8, BE), req("ls", 1, 8, 4, LS, at=5.0)]
    records, stats, _ = simulate(events, policy="fcfs", num_pages=6)
    assert stats.get("evictions", 0) == 0
    assert records["be"].finish == 136.0 and records["ls"].first_token == 136.0 + 17.0


# -- the cost model and the simulator itself ---------------------------------------------------


def test_plan_time_sums_the_segments_a_plan_runs():
    cost = CostModel(
        attn_base=1.0,
        attn_per_row=0.1,
        attn_per_ctx=0.01,
        expert_base=8.0,
        expert_per_row=0.8,
        head_base=3.0,
        head_per_row=0.5,
        segment_overhead=0.001,
        embed_base=7.0,
        host_overhead=100.0,
    )
    segments = segment_layout(2, 4, 2, shared_expert=False)  # attn, e0-1, e2-3 per layer; head
    chunks = (chunk(0, 0, 5, True), chunk(1, 3, 1, False))  # rows 6, ctx 5 + 4 = 9, 1 sampled
    attn = 1.0 + 0.1 * 6 + 0.01 * 9
    group = (8.0 + 0.8 * 6) * 2 / 4
    head = 3.0 + 0.5 * 1
    # cursor 1..5 of [attn0, e0, e1, attn1, e0, e1, head]: e, e, attn, e, e, then the head
    plan = Plan(0, 1, 5, chunks, finishes=True)
    assert cost.plan_time(plan, segments) == pytest.approx(100 + attn + 4 * group + head + 0.006)
    new = Plan(0, 0, 1, chunks, new=True)
    assert cost.plan_time(new, segments) == pytest.approx(100 + 7 + attn + 0.001)


def test_cost_model_json_round_trip(tmp_path):
    cost = PROFILES["mixtral-a100-efficient"]
    assert CostModel.from_json(cost.to_json(meta={"why": "test"})) == cost
    path = tmp_path / "p.json"
    path.write_text(cost.to_json())
    assert load_profile(path) == cost and load_profile(cost.name) is cost
    with pytest.raises(ValueError, match="unknown cost model fields"):
        CostModel.from_dict({"attn_bsae": 1.0})
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("no-such-profile")


def mixtral_step(
    cost: CostModel, rows_per_seq: int, seqs: int, ctx_each: int, group: int, fused: bool = True
) -> float:
    """A whole pass of Mixtral's shape (32 layers, 8 experts): one plan, or one per segment."""
    segments = segment_layout(32, 8, group, shared_expert=False)
    head = len(segments) - 1
    chunks = tuple(chunk(i, ctx_each - rows_per_seq, rows_per_seq, True) for i in range(seqs))
    if fused:
        return cost.plan_time(Plan(0, 0, head, chunks, new=True, finishes=True), segments)
    plans = [Plan(0, i, 1, chunks, new=i == 0, finishes=i == head - 1) for i in range(head)]
    return sum(cost.plan_time(p, segments) for p in plans)


def test_mixtral_profiles_match_their_calibration():
    paper, eff = PROFILES["mixtral-a100-paper"], PROFILES["mixtral-a100-efficient"]
    # the reference code: a decode step of 32 takes ~1.25 s; prefill ~0.5 ms more per token
    assert 1.15 < mixtral_step(paper, 1, 32, 200, 8) < 1.35
    # or ~0.32 s (the reference README's 50 tokens/s at batch 16)
    assert 0.28 < mixtral_step(PROFILES["mixtral-a100-paper-fast"], 1, 16, 200, 8) < 0.36
    per_token = (mixtral_step(paper, 1024, 1, 1024, 8) - mixtral_step(paper, 512, 1, 512, 8)) / 512
    assert 0.4e-3 < per_token < 0.6e-3
    # an efficient engine: decode of 32 in 25-35 ms; prefill 0.15-0.2 ms per token
    for group in (8, 1):
        fused = mixtral_step(eff, 1, 32, 200, group)
        assert 25e-3 < fused < 35e-3
        # one plan per segment: launch gaps and unhidden host time add at most ~15%
        assert fused < mixtral_step(eff, 1, 32, 200, group, fused=False) < 1.15 * fused
        paper_fused = mixtral_step(paper, 1, 32, 200, group)
        assert mixtral_step(paper, 1, 32, 200, group, fused=False) < 1.02 * paper_fused
    per_token = (mixtral_step(eff, 1024, 1, 1024, 8) - mixtral_step(eff, 512, 1, 512, 8)) / 512
    assert 0.15e-3 < per_token < 0.2e-3


def test_builtin_cpu_profile_is_the_measured_one():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments/results/profile-builtin-cpu.json"
    measured = load_profile(path)
    assert measured == PROFILES["builtin-cpu"]
    assert measured.segment_overhead > 0 and measured.expert_base > 0 and measured.head_base > 0
    assert json.loads(path.read_text())["meta"]["model"]["layers"] == 4


def test_simulator_needs_the_virtual_clock_and_rejects_bad_plans():
    clock = VirtualClock()
    segments = segment_layout(2, 4, 4, shared_expert=False)
    config = SchedulerConfig(page_size=4, num_pages=16, max_model_len=64)
    with pytest.raises(ValueError, match="clock"):
        Simulator(Scheduler(config, segments), unit_cost(4), clock)
    ex = Simulator(Scheduler(config, segments, clock=clock), unit_cost(4), clock).executor
    a = (chunk(0, 0, 4, True, pages=(1,)),)
    with pytest.raises(PlanError, match="no carry"):  # advancing a pass never created
        ex.execute(Plan(7, 2, 1, a))
    ex.execute(Plan(0, 0, 2, a, new=True))
    with pytest.raises(PlanError, match="cursor"):  # the carry is at 2, not 1
        ex.execute(Plan(0, 1, 1, a))
    b = (chunk(1, 3, 1, True, pages=(2,)),)  # claims 3 tokens computed, but none were written
    with pytest.raises(PlanError, match="K/V of position 0 is gone"):
        ex.execute(Plan(1, 0, 1, b, new=True))


# -- property: preemption bookkeeping ------------------------------------------------------------


class CheckedSimulator(Simulator):
    """Also checks per-plan limits, and counts the tokens a request must run again (or need
    not run at all): ``schedule()`` changes a request's computed tokens only by evicting it
    (back to 0), by mapping cached pages (at admission, or until it first runs) and by
    swapping its pages back in (at readmission)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.recomputed: Counter[str] = Counter()  # net tokens lost to evictions, less mapped
        self.seen: dict[str, int] = {}

    def step(self, plan: Plan) -> None:
        cfg = self.scheduler.config
        if plan.runs:
            assert 0 < plan.num_rows <= cfg.max_num_batched_tokens
        assert len(plan.chunks) <= cfg.max_batch_size
        assert len(plan.chunks) == len({c.seq_id for c in plan.chunks})
        swapped_in = {sw.seq_id for sw in plan.swap_in}
        for r in self.scheduler.requests.values():
            before = self.seen.get(r.request_id, 0)
            if r.num_computed != before:
                # evicted (then maybe readmitted), mapped cached pages or swapped back in
                if r.seq_id not in swapped_in:
                    assert r.num_computed == r.prefix_pages * cfg.page_size, r
                assert r.num_computed == 0 or r.pages
                self.recomputed[r.request_id] += before - r.num_computed
        super().step(plan)  # the fake executor checks chunk starts, carries, disjoint passes
        self.seen = {r.request_id: r.num_computed for r in self.scheduler.requests.values()}


@st.composite
def scenarios(draw):
    num_experts = draw(st.sampled_from([2, 4]))
    config = dict(
        policy=draw(st.sampled_from(["fcfs", "priority", "qllm", "qllm"])),
        granularity=draw(st.sampled_from(["layer", "expert"])),
        page_size=draw(st.sampled_from([1, 2, 4])),
        max_batch_size=draw(st.integers(1, 4)),
        prefill_chunk=draw(st.none() | st.integers(1, 8)),
        aging_s=draw(st.sampled_from([None, 5.0, 50.0])),
        max_park_s=draw(st.none() | st.sampled_from([2.0, 20.0])),
        absorb_be=draw(st.booleans()),
        preempt_prefill=draw(st.booleans()),
        grow_pages=draw(st.booleans()),
        swap_pages=draw(st.sampled_from([0, 0, 3, 64])),
        max_model_len=64,
    )
    config["max_num_batched_tokens"] = draw(st.integers(config["max_batch_size"], 16))
    max_tokens = st.integers(1, 6)
    request = st.tuples(
        st.integers(0, 20),  # arrival
        st.sampled_from([0, 1, 2]),  # priority
        st.integers(1, 12),  # prompt length
        max_tokens,
        st.none() | st.integers(0, 80),  # abort time
    )
    # a BE request at t=0, often an LS request soon after: preemption, parking, absorbing
    lead = (0, draw(st.sampled_from([1, 2])), draw(st.integers(4, 12)), draw(max_tokens), None)
    probe = (draw(st.integers(1, 12)), 0, draw(st.integers(1, 6)), draw(max_tokens), None)
    requests = [
        lead,
        *([probe] if draw(st.booleans()) else []),
        *draw(st.lists(request, max_size=5)),
    ]
    most = max(math.ceil((p + m) / config["page_size"]) for _, _, p, m, _ in requests)
    # every request fits alone; "tight" pages make requests wait and get evicted
    config["num_pages"] = 1 + most * draw(st.sampled_from([1, 2, len(requests)]))
    shape = dict(
        num_layers=draw(st.integers(1, 4)),
        num_experts=num_experts,
        group_size=draw(st.sampled_from([g for g in (1, 2, 4) if num_experts % g == 0])),
        shared_expert=draw(st.booleans()),
    )
    cost = CostModel(
        attn_base=draw(st.sampled_from([0.5, 1.0])),
        attn_per_row=draw(st.sampled_from([0.0, 0.1])),
        expert_base=draw(st.sampled_from([1.0, 3.0])),
        shared_base=0.5,
        head_base=draw(st.sampled_from([0.0, 1.0])),
        host_overhead=draw(st.sampled_from([0.0, 0.25])),
    )
    return config, shape, cost, requests


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_every_row_runs_exactly_once_and_nothing_leaks(scenario):
    config, shape, cost, requests = scenario
    clock = VirtualClock()
    sched = Scheduler(SchedulerConfig(**config), segment_layout(**shape), clock=clock)
    sim = CheckedSimulator(sched, cost, clock)
    events = []
    for i, (at, prio, prompt, tokens, abort_at) in enumerate(requests):
        events.append((float(at), make_request(f"r{i}", i, prompt, tokens, prio, float(at))))
        if abort_at is not None:
            events.append((float(abort_at), "abort", f"r{i}"))
    result = sim.run(events, max_plans=100_000)
    assert_clean(sched, sim)
    for what in (
        "preemptions_layer",
        "preemptions_expert",
        "splits",
        "absorbed_passes",
        "evictions",
        "growth_evictions",
        "swapped_in_pages",
        "swap_misses",
    ):
        if result.stats.get(what):
            event(what)  # coverage: pytest --hypothesis-show-statistics
    for i, (_, _, prompt, tokens, abort_at) in enumerate(requests):
        rec = result.records[f"r{i}"]
        if rec.finish_reason == "abort":
            assert abort_at is not None and rec.finish >= abort_at  # at the next plan boundary
            assert rec.output_len < tokens
            continue
        assert rec.finish_reason == "length" and rec.output_len == tokens
        assert rec.arrival <= rec.first_token <= rec.finish
        # every prompt and output row but the last sampled token ran once, plus recomputation
        assert rec.computed_tokens == prompt + tokens - 1 + sim.recomputed[f"r{i}"]


# -- rejoining parked passes -------------------------------------------------------------------


def test_parked_pass_is_rejoined_by_a_new_pass_of_its_class():
    """BE pass A parks at t=4 (cursor 4) for an LS prefill (4 -> 21). A second BE request B
    arrived meanwhile. With rejoin, B's new pass starts at 21 and absorbs A at cursor 4
    (t=25): both share the rest of the pass, so A's first token comes with B's at 21 + 17 = 38.
    Without rejoin, A resumes alone (21 -> 34) and B runs after it (34 -> 51)."""

    def events():
        return [
            req("a", 0, 8, 1, BE),
            req("ls", 1, 4, 1, LS, at=3.0),
            req("b", 2, 8, 1, BE, at=5.0),
        ]

    records, stats, _ = simulate(events())
    assert stats["absorbed_passes"] == 1
    assert records["a"].finish == records["b"].finish == 38.0
    records, stats, _ = simulate(events(), rejoin_parked=False)
    assert stats.get("absorbed_passes", 0) == 0
    assert records["a"].finish == 34.0 and records["b"].finish == 51.0


def test_free_ls_work_goes_before_a_parked_be_pass():
    """While an LS request still decodes, every new pass is its decode, never the parked BE
    pass: LS prefill 4 -> 21, decodes 21 -> 38 -> 55; only then does BE resume (55 -> 68).
    (One class per pass; with mix_decodes the decodes absorb it: see the test above.)"""
    records, _, _ = simulate(be_then_ls(be_tokens=1, ls_tokens=3), mix_decodes=False)
    assert records["ls"].finish == 55.0
    assert records["be"].first_token == 68.0


def test_parked_pass_resumes_when_a_new_pass_has_no_room_for_it():
    """As above, but with one request per pass: B's pass could never absorb A, so A resumes
    alone at 21 (13 segments + head: 34) and B runs after it (34 -> 51); A is not passed over."""
    events = [req("a", 0, 8, 1, BE), req("ls", 1, 4, 1, LS, at=3.0), req("b", 2, 8, 1, BE, at=5.0)]
    records, stats, _ = simulate(events, max_batch_size=1)
    assert stats.get("absorbed_passes", 0) == 0
    assert records["a"].finish == 34.0 and records["b"].finish == 51.0


def _plain(x) -> bool:
    """Whether ``x`` is made of plain values only: what a plan may hold."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return True
    if isinstance(x, tuple):
        return all(_plain(v) for v in x)
    if dataclasses.is_dataclass(x):
        return all(_plain(getattr(x, f.name)) for f in dataclasses.fields(x))
    return False


def test_plans_are_plain_snapshots():
    """Every plan of a preemptive run (splits, absorbs, aborts) is made of plain values, pickles,
    survives a JSON round trip (what a multi-process engine broadcasts), and does not change
    after it is issued."""
    clock = VirtualClock()
    sched = Scheduler(
        SchedulerConfig(page_size=4, num_pages=64, max_model_len=64, max_batch_size=4,
                        max_num_batched_tokens=16, aging_s=None, max_park_s=None, absorb_be=True),
        segment_layout(2, 4, 1, shared_expert=False),
        clock=clock,
    )  # fmt: skip
    sim = Simulator(sched, unit_cost(1), clock)
    plans = []
    step = sim.step

    def record(plan):
        plans.append((plan, pickle.dumps(plan)))
        step(plan)

    sim.step = record
    events = [*be_then_ls(be_tokens=2), req("ls2", 2, 4, 1, LS, at=10.0), (12.0, "abort", "be")]
    sim.run(events)
    assert any(p.split_seq_ids for p, _ in plans) and any(p.finished_seq_ids for p, _ in plans)
    for plan, pickled in plans:
        assert _plain(plan) and pickle.loads(pickled) == plan
        assert decode_plan(json.loads(json.dumps(encode_plan(plan)))) == plan


# -- anti-starvation that never inverts the classes --------------------------------------------


@pytest.mark.parametrize(
    "be_share, be_first, ls_finish",
    [
        # off: the BE request waits for all 20 LS passes (0 -> 340), then runs: 357
        (None, 357.0, 340.0),
        # be_share=0.1, be_starve_s=10: at the t=17 pass boundary the BE request has waited 17
        # and BE has had none of the work: its turn, 17 -> 34. Then LS runs on (19 more passes
        # to 357); BE never runs ahead of LS again (it is done).
        (0.1, 34.0, 357.0),
    ],
)
def test_starving_be_gets_a_turn_without_outranking_ls(be_share, be_first, ls_finish):
    # (mix_decodes off: one class per pass, else the BE prompt rides the first LS decode pass)
    events = [req("ls", 0, 4, 20, LS), req("be", 1, 4, 1, BE)]
    records, stats, _ = simulate(
        events, policy="qllm", be_share=be_share, be_starve_s=10.0, mix_decodes=False
    )
    assert records["be"].first_token == be_first
    assert records["ls"].finish == ls_finish
    assert stats["be_turns"] == (1 if be_share else 0)


def test_a_be_pass_on_its_turn_is_not_parked():
    # As above with an LS request arriving at t=20, inside BE's turn (17 -> 34): the BE pass is
    # owed its share, so it is not parked (with be_share off it would be, at the t=20 boundary).
    # LS2's prefill then joins the LS stream by priority and arrival.
    events = [req("ls", 0, 4, 20, LS), req("be", 1, 4, 1, BE), req("ls2", 2, 4, 1, LS, at=20.0)]
    records, stats, _ = simulate(events, policy="qllm", be_share=0.1, be_starve_s=10.0)
    assert records["be"].first_token == 34.0 and records["be"].num_preemptions == 0
    assert stats["preemptions_layer"] == 0
    assert records["ls2"].first_token == 34.0 + 17.0  # next, ahead of the first LS decode


def test_priority_policy_gives_starving_be_rows_their_seats():
    # iteration-level priority, one seat per pass (max_batch_size=1): without the share the BE
    # request waits for the LS request's 20 passes; with it, it takes the seat at t=17.
    def events():
        return [req("ls", 0, 4, 20, LS), req("be", 1, 4, 1, BE)]

    records, _, _ = simulate(
        events(), policy="priority", max_batch_size=1, be_share=0.1, be_starve_s=10.0
    )
    assert records["be"].first_token == 34.0 and records["ls"].finish == 357.0
    records, _, _ = simulate(events(), policy="priority", max_batch_size=1, be_share=None)
    assert records["be"].first_token == 357.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(["priority", "qllm"]),
    granularity=st.sampled_from(["layer", "expert"]),
    ls_gap=st.sampled_from([3.0, 8.0, 17.0]),
    be=st.lists(
        st.tuples(st.integers(0, 60), st.integers(1, 12), st.integers(1, 4)), min_size=1, max_size=4
    ),
    starve=st.sampled_from([5.0, 30.0]),
)
def test_be_work_is_never_starved_under_sustained_ls_load(policy, granularity, ls_gap, be, starve):
    """A stream of LS requests that alone keeps the engine busy, and a few BE requests: every
    BE request finishes, and none goes longer without progress than the starvation threshold
    plus, for each BE request that may be served first, the passes it takes for BE's share
    to fall below be_share again (the share is the class's, so BE requests take turns)."""
    group = 4 if granularity == "layer" else 1
    events = [req(f"ls{i}", i, 4, 3, LS, at=i * ls_gap) for i in range(40)]
    events += [req(f"be{i}", 100 + i, p, o, BE, at=float(t)) for i, (t, p, o) in enumerate(be)]
    records, stats, _ = simulate(
        events, group_size=group, policy=policy, granularity=granularity,
        be_share=0.1, be_starve_s=starve, max_batch_size=2,
    )  # fmt: skip
    for i in range(len(be)):
        assert records[f"be{i}"].finish_reason == "length"
    pass_time = 41.0 if group == 1 else 17.0  # one whole pass of this layout
    bound = starve + len(be) * (1 / 0.1 + 3) * pass_time * 2
    assert stats["be_longest_wait_s"] <= bound


# -- the ablation, the reference's pass order, the fast path -----------------------------------


def test_qllm_without_in_pass_preemption_runs_passes_whole():
    """preempt=False: the BE prefill runs whole (0 -> 17), then the LS pass (17 -> 34): what
    priority gives, with qllm's one-class passes."""
    records, stats, _ = simulate(be_then_ls(), policy="qllm", preempt=False)
    assert records["ls"].first_token == 34.0 and records["be"].num_preemptions == 0
    assert stats["preemptions_layer"] == stats["preemptions_expert"] == 0


def test_paper_order_never_mixes_prompts_and_decodes():
    """paper preset, 2 seats: LS decoding, a BE prompt and then an LS prompt waiting. The
    reference runs LS prompts (topped up with BE prompts) before LS decodes, and never puts a
    prompt and a decode in one pass."""
    events = [req("ls", 0, 4, 3, LS), req("be", 1, 4, 2, BE, at=1.0), req("ls2", 2, 4, 1, LS, 20.0)]
    clock = VirtualClock()
    config = SchedulerConfig(
        page_size=4, num_pages=64, max_model_len=64, max_batch_size=2, max_num_batched_tokens=64,
        **PRESETS["paper"],
    )  # fmt: skip
    sched = Scheduler(config, segment_layout(8, 4, 4, shared_expert=False), clock=clock)
    sim = Simulator(sched, unit_cost(4), clock)
    kinds = []
    step = sim.step

    def record(plan):
        if plan.runs and plan.new:
            kinds.append({c.num_tokens > 1 or not c.samples for c in plan.chunks})
        step(plan)

    sim.step = record
    sim.run(events)
    assert all(len(k) == 1 for k in kinds)  # prefill and decode never together
    assert {True} in kinds and {False} in kinds  # (and both ran)
    assert_clean(sched, sim)


class FullScheduler(Scheduler):
    """Decides every plan the long way (no fast path)."""

    def schedule(self):
        self._quiet = None
        return super().schedule()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_fast_path_plans_are_the_full_path_plans(scenario):
    config, shape, cost, requests = scenario
    results = []
    for cls in (Scheduler, FullScheduler):
        clock = VirtualClock()
        sched = cls(SchedulerConfig(**config), segment_layout(**shape), clock=clock)
        plans = []
        sim = Simulator(sched, cost, clock)
        step = sim.step
        sim.step = lambda plan, step=step, plans=plans: (plans.append(plan), step(plan))
        events = []
        for i, (at, prio, prompt, tokens, abort_at) in enumerate(requests):
            events.append((float(at), make_request(f"r{i}", i, prompt, tokens, prio, float(at))))
            if abort_at is not None:
                events.append((float(abort_at), "abort", f"r{i}"))
        sim.run(events, max_plans=100_000)
        results.append(plans)
    assert results[0] == results[1]


def test_a_restored_request_is_registered_like_a_new_one():
    """``snapshot.restore`` goes through ``Scheduler.enter``: a BE request saved at 1 s of age
    and restored at t=1000 has not starved since t=0 (no BE turn is due), and its hrrn clock
    starts at the scheduler's current work."""
    from scheduler import snapshot

    clock = VirtualClock()
    config = SchedulerConfig(page_size=4, num_pages=64, max_model_len=64, queue_order="hrrn")
    sched = Scheduler(config, segment_layout(2, 4, 4, shared_expert=False), clock=clock)
    clock.now = 999.0
    old = make_request("be", 0, 8, 4, priority=BE, arrival_time=998.0)
    state = snapshot.request_state(sched, old, clock.now)
    clock.now, sched.rows_done = 1000.0, 123
    (req,) = snapshot.restore(sched, [state], clock.now, lambda: 7, keep_kv=False)
    assert req.last_progress == 1000.0 and req.arrival_work == 123
    assert req.arrival_time == 999.0 and sched.seqs[7] is req and req in sched.waiting
    assert not sched._be_due(clock.now)
