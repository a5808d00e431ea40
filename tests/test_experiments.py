"""The experiment scripts run end to end (sim mode, or tiny models), and their workload and
table logic does what it says."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import reproduce_paper as rp  # noqa: E402

SCRIPTS = [
    "reproduce_paper.py", "regime_map.py", "calibration.py", "starvation.py", "overhead.py",
    "load_bench.py", "profile_cost.py", "serve_bench.py", "eplb_bench.py",
]  # fmt: skip


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "usage" in out.stdout


def test_workload_is_poisson_with_an_exact_ls_share():
    items = rp.make_workload(rate=4.0, num=2000, ls_fraction=0.2, lengths=rp.Lengths(), seed=1)
    assert sum(it.priority == 0 for it in items) == 400
    gaps = [b.arrival - a.arrival for a, b in zip(items, items[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.1)  # mean gap 1/rate
    prompts = [it.prompt_len for it in items]
    assert sum(prompts) / len(prompts) == pytest.approx(160, rel=0.15)  # lognormal mean
    assert rp.make_workload(4.0, 50, 0.2, rp.Lengths(), 1) == rp.make_workload(
        4.0, 50, 0.2, rp.Lengths(), 1
    )
    paper = rp.make_workload(4.0, 50, 0.2, rp.Lengths(fixed_output=39), 1)
    assert {it.output_len for it in paper} == {39}


def test_sharegpt_lengths(tmp_path):
    data = [
        {
            "conversations": [
                {"from": "human", "value": "x" * 40},
                {"from": "gpt", "value": "y" * 8},
            ]
        },
        {"conversations": [{"from": "gpt", "value": "orphan"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    assert rp.sharegpt_lengths(str(path)) == ((10, 2),)
    lengths = rp.Lengths(pairs=rp.sharegpt_lengths(str(path)))
    assert lengths.sample(random.Random(0)) == (10, 2)


def _summary(ttft_mean, turn_mean, tput, slo):
    return {
        "ls": {
            "ttft": {"mean": ttft_mean},
            "turnaround": {"mean": turn_mean},
            "slo_attainment": slo,
        },
        "total_tokens_per_s": tput,
    }


def test_paper_table_ratios():
    s = _summary
    results = {
        1.0: {"fcfs": s(10.0, 40.0, 100.0, 0.2), "qllm-layer": s(0.5, 10.0, 100.0, 1.0)},
        2.0: {"fcfs": s(20.0, 60.0, 90.0, 0.0), "qllm-layer": s(1.0, 30.0, 99.0, 0.8)},
        3.0: {"fcfs": s(30.0, 60.0, 90.0, 0.0), "qllm-layer": s(1.0, 30.0, 99.0, 0.95)},
    }
    m = rp.sweep_metrics(results, "qllm-layer", "fcfs", target=0.9)
    assert m["ttft_reduction_mean"] == pytest.approx((20 + 20 + 30) / 3)
    assert m["ttft_reduction_max"] == 30.0
    assert m["slo_up_to"] == 1.0  # 3 req/s meets it, but 2 does not: "up to" stops at 1
    assert m["slo_up_to_baseline"] is None
    assert m["turnaround_reduction_max"] == 4.0
    assert m["throughput_ratio"] == pytest.approx((1.0 + 1.1 + 1.1) / 3)
    table = rp.paper_table([results, results], target=0.9)
    row = {r[0]: r[2] for r in table[1:]}
    assert row["mean LS TTFT reduction (avg over rates)"] == "23.3x"
    assert row["LS TTFT SLO met up to (each seed)"] == "1/1 (vs none/none) req/s"
    assert math.isnan(rp.h.ratio(1.0, 0.0))


def test_backlog_workload_keeps_be_waiting_and_spreads_ls():
    ls_len, be_len = rp.Lengths(48, 12, 0.5, 128, 32), rp.Lengths(160, 8, 0.4, 256, 16)
    items = rp.make_backlog(60.0, 1.0, 500, ls_len, be_len, seed=3)
    ls = [it for it in items if it.priority == 0]
    assert sum(it.priority > 0 and it.arrival == 0.0 for it in items) == 500
    assert 40 <= len(ls) <= 80 and max(it.arrival for it in ls) < 60.0
    assert items == sorted(items, key=lambda it: it.arrival)
    fixed = rp.make_backlog(30.0, 1.2, 10, ls_len, be_len, seed=0, ls_count=36)
    ls = [it.arrival for it in fixed if it.priority == 0]
    assert len(ls) == 36 and min(ls) >= 0 and max(ls) < 30.0 and len(set(ls)) == 36


def test_reproduce_paper_sim_end_to_end(tmp_path):
    arms = ["fcfs", "priority", "qllm-nopreempt", "qllm-layer", "qllm-expert", "ls-only"]
    report = rp.main(
        [
            "--backend", "sim", "--profile", "mixtral-a100-efficient",
            "--rates", "2", "6", "--num-requests", "30", "--output-mean", "20", "--seeds", "2",
            "--arms", *arms, "--results-dir", str(tmp_path), "--out", "t",
        ]
    )  # fmt: skip
    assert (tmp_path / "t.json").is_file() and (tmp_path / "t.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["paper_vs_ours"] == report["paper_vs_ours"] and len(saved["results_by_seed"]) == 2
    for rate in ("2.0", "6.0"):
        res = saved["results"][rate]
        assert set(res) == set(arms)
        assert res["qllm-expert"]["ls"]["finished"] == res["qllm-expert"]["ls"]["count"] == 6
        # the preemptive arm serves LS requests at least as fast as the paper's baseline
        assert res["qllm-expert"]["ls"]["ttft"]["mean"] <= res["fcfs"]["ls"]["ttft"]["mean"]
        assert res["ls-only"]["be"]["count"] == 0
        assert res["qllm-nopreempt"]["attribution"]["preemptions"] == 0
        lo, hi = res["priority"]["ls"]["ttft"]["mean_ci"]
        assert lo <= res["priority"]["ls"]["ttft"]["mean"] <= hi


def test_reproduce_paper_sim_backlog(tmp_path):
    """The demo's scenario on the simulator: in-pass preemption fires and cuts LS latency
    against iteration-level priority, whose passes it must wait for."""
    report = rp.main(
        [
            "--backend", "sim", "--scenario", "backlog", "--profile", "builtin-cpu",
            "--duration", "20", "--arms", "priority", "qllm-nopreempt", "qllm-expert", "ls-only",
            "--results-dir", str(tmp_path), "--out", "b",
        ]
    )  # fmt: skip
    res = report["results"]
    assert res["qllm-expert"]["attribution"]["preemptions"] > 0
    assert res["qllm-nopreempt"]["attribution"]["preemptions"] == 0
    p90 = {arm: res[arm]["ls"]["ttft"]["p90"] for arm in res}
    assert p90["ls-only"] <= p90["qllm-expert"] < p90["priority"]
    assert res["qllm-expert"]["be_tokens_per_s"] > 0 and (tmp_path / "b.png").is_file()


def test_regime_map_sim_point(tmp_path):
    import regime_map

    report = regime_map.main(
        ["--chunks", "256", "--batches", "8", "--ls-rates", "1", "--seeds", "1",
         "--duration", "15", "--results-dir", str(tmp_path), "--out", "m"]
    )  # fmt: skip
    (g,) = report["grid"]
    assert set(g["result"]) == {"priority", "qllm-layer", "qllm-expert", "ls-only"}
    assert g["result"]["ls-only"]["ls_p90_over_floor"] == 1.0
    assert (tmp_path / "m.png").is_file()


def test_reproduce_paper_real_tiny(tmp_path):
    """The real backend on a random-weight model small enough for a test: both scenarios."""
    common = [
        "--backend", "real", "--model", "random:mixtral-tiny", "--dtype", "float32",
        "--batch-size", "4", "--max-num-batched-tokens", "64", "--results-dir", str(tmp_path),
    ]  # fmt: skip
    report = rp.main(
        [*common, "--rates", "8", "--num-requests", "5", "--arms", "priority", "qllm-expert",
         "--prompt-mean", "12", "--output-mean", "4", "--out", "r"]
    )  # fmt: skip
    res = report["results"]["8.0"]
    for arm in ("priority", "qllm-expert"):
        assert res[arm]["ls"]["finished"] + res[arm]["be"]["finished"] == 5
        assert res[arm]["valid"], res[arm]["compiles_in_window"]
    report = rp.main(
        [*common, "--scenario", "backlog", "--duration", "2", "--ls-rate", "4", "--prompt-mean",
         "40", "--arms", "fcfs", "qllm-expert", "--out", "b"]
    )  # fmt: skip
    for arm in ("fcfs", "qllm-expert"):
        s = report["results"][arm]
        assert s["ls"]["count"] >= 1 and s["ls"]["finished"] == s["ls"]["count"]
