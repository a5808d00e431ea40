"""experiments/multilevel.py: its workloads do what they say, and a --quick run writes the
issue's JSON shape (tiny sizes: seconds)."""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import multilevel as ml  # noqa: E402


@pytest.mark.parametrize("shape", sorted(ml.SHAPES))
def test_length_shapes_stay_in_range(shape):
    rng = random.Random(0)
    xs = [ml.shaped_length(rng, shape, *ml.PROMPT_RANGE) for _ in range(3000)]
    assert min(xs) >= ml.PROMPT_RANGE[0] and max(xs) <= ml.PROMPT_RANGE[1]
    assert len(set(xs)) > 50


def test_length_shapes_differ_as_documented():
    rng = random.Random(1)
    lo, hi = ml.PROMPT_RANGE
    xs = {s: [ml.shaped_length(rng, s, lo, hi) for _ in range(4000)] for s in ml.SHAPES}
    med = {s: statistics.median(v) for s, v in xs.items()}
    mid = math.sqrt(lo * hi)
    assert med["descending"] < med["central"] < med["average"] * 1.2
    assert abs(med["central"] - mid) / mid < 0.15  # bunched at the geometric middle
    tail = {s: statistics.mean(v) / med[s] for s, v in xs.items()}
    assert tail["random"] > tail["central"] * 1.5  # Zipf: a long tail above its median
    ends = [ml.shaped_length(rng, "two-end", lo, hi) for _ in range(4000)]
    near_ends = sum(x < 2 * lo or x > hi / 2 for x in ends) / len(ends)
    assert near_ends > 0.5  # U-shaped


def test_burst_workload_is_bursty_and_has_users_and_an_exact_ls_share():
    items = ml.burst_workload("random", 2000, 0)
    gaps = [b.arrival - a.arrival for a, b in zip(items, items[1:])]
    m = statistics.mean(gaps)
    assert m == pytest.approx(1.0, rel=0.15)  # unit rate
    assert statistics.pstdev(gaps) / m > 1.5  # CV 2 (Gamma shape 0.25): burstier than Poisson
    assert sum(it.priority == 0 for it in items) == round(2000 * ml.LS_FRACTION)
    by_user = {}
    for it in items:
        by_user.setdefault(it.user, []).append(it)
    assert 1 < len(by_user) <= ml.BURST_USERS
    u = max(by_user, key=lambda k: len(by_user[k]))
    prefixes = {it.prompt[: ml.USER_PREFIX] for it in by_user[u] if len(it.prompt) >= 32}
    assert len(prefixes) == 1  # a user's requests share their persona prefix
    assert ml.burst_workload("random", 50, 3) == ml.burst_workload("random", 50, 3)


def test_sharegpt_turns_extend_the_previous_turn():
    from qllm_jax.scheduler.simulator import FAKE_TOKEN

    items = ml.sharegpt_workload(300, 0)
    assert len(items) == 300
    sessions = {}
    for it in items:
        sessions.setdefault(it.user, []).append(it)
    multi = [s for s in sessions.values() if len(s) > 1]
    assert multi
    for turns in multi:
        turns.sort(key=lambda it: int(it.request_id.split("t")[1]))
        for a, b in zip(turns, turns[1:]):
            assert b.prompt[: len(a.prompt)] == a.prompt
            assert b.prompt[len(a.prompt) : len(a.prompt) + a.output_len] == (FAKE_TOKEN,) * (
                a.output_len
            )
            assert b.arrival >= a.arrival
        assert len({t.priority for t in turns}) == 1  # a session is one class
    systems = {it.prompt[: ml.SYSTEM_LEN] for it in items}
    assert len(systems) <= ml.SYSTEM_PROMPTS
    assert all(len(it.prompt) + it.output_len <= ml.MAX_MODEL_LEN for it in items)


def test_runs_can_queue_and_capacity_is_the_saturated_rate():
    # the bug this guards: runs of fewer requests per replica than a pass has seats never
    # queue at any rate, and a "capacity" from such a burst is its drain, not a throughput
    seats = ml.ENGINE["max_batch_size"]
    assert ml.requests_for(4, False) >= 2 * seats * 4
    assert ml.capacity_requests(4, False) >= 4 * seats * 4
    # 80 finishes at 2/s, then a slow drain of 20: the window sees only the steady part
    finishes = [i / 2 for i in range(80)] + [100.0 + 5 * i for i in range(20)]
    assert ml.saturated_throughput(finishes) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="too few finishes"):
        ml.saturated_throughput([1.0])


def test_quick_run_writes_the_issue_json_shape(tmp_path):
    res = ml.main(["--quick", "--results-dir", str(tmp_path), "--jobs", "1",
                   "--workloads", "burst-random", "sharegpt"])  # fmt: skip
    data = json.loads((tmp_path / "multilevel-sim-quick.json").read_text())
    assert (tmp_path / "multilevel-sim-quick.png").stat().st_size > 0
    assert len(data["configs"]) == 2 and data["configs"] == json.loads(json.dumps(res["configs"]))
    for c in data["configs"]:
        assert set(c["arms"]) == set(ml.ARMS)
        for arm in ("baseline", "multilevel"):
            a = c["arms"][arm]
            for k in ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "throughput_rps"):
                assert isinstance(a[k], float) and a[k] > 0
        # the expert level balances the ranks; the baseline's static placement does not
        assert (
            c["arms"]["expert"]["expert_rank_balance"]
            <= c["arms"]["baseline"]["expert_rank_balance"]
        )
        assert c["arms"]["baseline"]["dispatch_imbalance"] >= 1.0
        for a in c["arms"].values():  # TTFT's queueing part
            assert 0 <= a["queue_mean_s"] < a["ttft_mean_s"] and 0 <= a["queued_share"] <= 1
    assert set(data["summary"]) == set(ml.ARMS) - {"baseline"}


def test_trace_mode_runs_the_trace_study_and_writes_the_issue_json_shape(tmp_path):
    res = ml.main(["--routing", f"trace:{ml.TRACE_PATH}", "--quick", "--jobs", "1",
                   "--results-dir", str(tmp_path)])  # fmt: skip
    data = json.loads((tmp_path / "multilevel-trace-sim-quick.json").read_text())
    assert data["configs"] == json.loads(json.dumps(res["configs"]))
    assert [c["a2a_pricing"] for c in data["configs"]] == list(ml.TRACE_PRICINGS)
    assert data["meta"]["model"]["experts"] == 8 and data["meta"]["routing"]["windows"] > 0
    for c in data["configs"]:
        assert set(c["arms"]) == set(ml.TRACE_STUDY_ARMS)
        for a in c["arms"].values():
            for k in ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "throughput_rps"):
                assert isinstance(a[k], float) and a[k] > 0
            assert 0 <= a["expert_stay_share"] <= 1 and a["expert_rank_balance"] >= 1
        arms = c["arms"]  # EPLB balances the real routing better than the static placement
        assert arms["expert"]["expert_rank_balance"] < arms["baseline"]["expert_rank_balance"]
    placed = data["placements_held_out"]["N2"]
    assert placed["eplb_r1"]["max_over_mean"] < placed["static"]["max_over_mean"]
    assert set(data["summary"]) == set(ml.TRACE_STUDY_ARMS) - {"baseline"}


def test_trace_arms_need_a_trace():
    with pytest.raises(SystemExit):
        ml.main(["--quick", "--arms", "baseline", "expert-affinity"])
    with pytest.raises(SystemExit):
        ml.main(["--routing", "zipf", "--quick"])
