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

SCRIPTS = ["reproduce_paper.py", "overhead.py", "load_bench.py", "profile_cost.py"]


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
    results = {
        1.0: {
            "fcfs": _summary(10.0, 40.0, 100.0, 0.2),
            "qllm-layer": _summary(0.5, 10.0, 100.0, 1.0),
        },
        2.0: {
            "fcfs": _summary(20.0, 60.0, 90.0, 0.0),
            "qllm-layer": _summary(1.0, 30.0, 99.0, 0.8),
        },
    }
    table = rp.paper_table(results, slo_target=0.9)
    row = {r[0]: r[2] for r in table[1:]}
    assert row["mean LS TTFT reduction (avg over rates)"] == "20.0x"  # (20 + 20) / 2
    assert row["LS turnaround reduction (max over rates)"] == "4.0x"  # max(4, 2)
    assert row["LS TTFT SLO met up to"] == "1 req/s (vs none)"
    assert row["total throughput ratio (avg over rates)"] == "1.05"  # (1.0 + 1.1) / 2
    assert math.isnan(rp._ratio(1.0, 0.0))


def test_reproduce_paper_sim_end_to_end(tmp_path):
    report = rp.main(
        [
            "--backend", "sim", "--profile", "mixtral-a100-efficient",
            "--rates", "2", "6", "--num-requests", "30", "--output-mean", "20",
            "--arms", "fcfs", "priority", "qllm-layer", "qllm-expert", "ls-only",
            "--results-dir", str(tmp_path), "--out", "t",
        ]
    )  # fmt: skip
    assert (tmp_path / "t.json").is_file() and (tmp_path / "t.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["paper_vs_ours"] == report["paper_vs_ours"]
    for rate in ("2.0", "6.0"):
        res = saved["results"][rate]
        assert set(res) == {"fcfs", "priority", "qllm-layer", "qllm-expert", "ls-only"}
        assert res["qllm-expert"]["ls"]["finished"] == res["qllm-expert"]["ls"]["count"] == 6
        # the preemptive arm serves LS requests at least as fast as the paper's baseline
        assert res["qllm-expert"]["ls"]["ttft"]["mean"] <= res["fcfs"]["ls"]["ttft"]["mean"]
        assert res["ls-only"]["be"]["count"] == 0


def test_reproduce_paper_real_tiny(tmp_path):
    """The real backend on a random-weight model small enough for a test."""
    report = rp.main(
        [
            "--backend", "real", "--model", "random:mixtral-tiny", "--dtype", "float32",
            "--rates", "8", "--num-requests", "5", "--arms", "priority", "qllm-expert",
            "--batch-size", "4", "--max-num-batched-tokens", "64", "--prompt-mean", "12",
            "--output-mean", "4", "--results-dir", str(tmp_path), "--out", "r",
        ]
    )  # fmt: skip
    res = report["results"]["8.0"]
    for arm in ("priority", "qllm-expert"):
        assert res[arm]["ls"]["finished"] + res[arm]["be"]["finished"] == 5
