"""experiments/prefix_bench.py: its workload and statistics do what they say (no model run;
the script itself is run by hand, its results are under experiments/results/)."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import prefix_bench as pb  # noqa: E402


def test_help():
    out = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "prefix_bench.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--quick" in out.stdout and "--arms" in out.stdout


def test_zipf_prompt_lengths_are_heavy_tailed_and_in_range():
    xs = np.array(pb.zipf_lengths(random.Random(0), 20_000))
    assert xs.min() >= pb.PROMPT_MIN and xs.max() <= pb.PROMPT_MAX
    assert np.median(xs) < 0.6 * xs.mean()  # most prompts short, a long tail
    counts = np.bincount(xs)
    assert counts[16] > counts[32] > counts[128] > 0  # P(n) falls with n
    # P(n) ~ n^-s: the ratio of frequencies at n and 2n is about 2^s
    assert counts[20:24].sum() / counts[40:48].sum() * 2 == pytest.approx(2**pb.ZIPF_S, rel=0.2)


def test_bootstrap_interval_brackets_the_statistic():
    rng = np.random.default_rng(0)
    xs = rng.exponential(1.0, 400)
    m = pb.bootstrap(xs, np.mean, rng)
    assert m["ci95"][0] < m["value"] < m["ci95"][1]
    assert m["ci95"][1] - m["ci95"][0] < 0.5
    assert np.isnan(pb.bootstrap([], np.mean, rng)["value"])


def _out(rid, arrival, first, finish, prompt, tokens, cached=0):
    metrics = SimpleNamespace(arrival_time=arrival, first_token_time=first, finish_time=finish)
    return SimpleNamespace(
        request_id=rid,
        metrics=metrics,
        prompt_token_ids=[1] * prompt,
        token_ids=[2] * tokens,
        num_cached_tokens=cached,
    )


def test_summary_of_a_run():
    outs = [
        _out("a", 0.0, 0.5, 1.5, 10, 11),  # TTFT 0.5, TPOT 0.1
        _out("b", 1.0, 1.5, 3.0, 300, 4, cached=256),  # TTFT 0.5, TPOT 0.5
        _out("c", 2.0, 4.0, 4.0, 100, 1),  # TTFT 2.0, no TPOT
    ]
    s = pb.summary(outs, np.random.default_rng(0))
    assert s["ttft_mean_s"]["value"] == pytest.approx(1.0)
    assert s["tpot_mean_s"]["value"] == pytest.approx(0.3)
    assert s["longest_wait_s"]["value"] == pytest.approx(2.0)
    assert s["throughput_rps"]["value"] == pytest.approx(3 / 4.0)
    assert s["output_tokens_per_s"]["value"] == pytest.approx(16 / 4.0)
    assert s["cached_tokens"] == 256 and s["prompt_tokens"] == 410
    by = s["ttft_by_prompt_len"]
    assert by["short"]["requests"] == 1 and by["long"]["requests"] == 1
    assert by["long"]["ttft_mean_s"]["value"] == pytest.approx(0.5)
