"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from qllm_jax.scheduler.metrics import (
    RequestRecord,
    percentile,
    slo_attainment,
    span,
    summarize,
)


def rec(rid, prio, arrival, first, finish, prompt=10, out=5, **kw) -> RequestRecord:
    return RequestRecord(rid, prio, arrival, first, finish, prompt, out, **kw)


def test_percentile_interpolates_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5  # halfway between 2 and 3
    assert percentile(xs, 90) == pytest.approx(3.7)  # pos 2.7 → 3 + 0.7 * (4 - 3)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_ttft_tpot_turnaround():
    r = rec("a", 0, arrival=1.0, first=1.5, finish=3.5, out=5)
    assert r.ttft == 0.5 and r.turnaround == 2.5
    assert r.tpot == pytest.approx(0.5)  # (3.5 - 1.5) / (5 - 1)
    assert rec("b", 0, 0.0, 1.0, 1.0, out=1).tpot is None  # one token: no inter-token time
    assert rec("c", 0, 0.0, None, None).ttft is None


def test_slo_attainment_counts_unfinished_as_misses():
    rs = [
        rec("a", 0, 0.0, 1.0, 2.0),  # ttft 1.0: met
        rec("b", 0, 0.0, 3.0, 4.0),  # ttft 3.0: met (<=)
        rec("c", 0, 0.0, 3.5, 4.0),  # ttft 3.5: missed
        rec("d", 0, 0.0, None, None),  # never started: missed
    ]
    assert slo_attainment(rs, 3.0) == 0.5
    assert math.isnan(slo_attainment([], 3.0))


def test_throughput_is_over_wall_clock_including_idle_time():
    rs = [
        rec("a", 1, arrival=0.0, first=1.0, finish=2.0, prompt=10, out=10),
        # 8 s of idle time between the two requests still counts
        rec("b", 1, arrival=10.0, first=11.0, finish=12.0, prompt=10, out=10),
    ]
    assert span(rs) == 12.0
    s = summarize(rs, slo=3.0)
    assert s["wall_s"] == 12.0
    assert s["total_tokens_per_s"] == pytest.approx(40 / 12)
    assert s["be"]["output_tokens_per_s"] == pytest.approx(20 / 12)
    assert s["ls"]["count"] == 0 and math.isnan(s["ls"]["ttft"]["mean"])


def test_summary_splits_classes_and_aggregates():
    rs = [
        rec("ls1", 0, 0.0, 0.2, 1.0, num_preemptions=0),
        rec("ls2", 0, 1.0, 1.6, 2.0),
        rec("be1", 1, 0.0, 3.0, 6.0, num_preemptions=2, parked_time=1.5),
        rec("be2", 2, 0.5, 4.0, 8.0, num_preemptions=1, parked_time=0.5),
    ]
    s = summarize(rs, slo=0.5)
    assert s["ls"]["count"] == 2 and s["be"]["count"] == 2
    assert s["ls"]["ttft"]["mean"] == pytest.approx(0.4)  # (0.2 + 0.6) / 2
    assert s["ls"]["ttft"]["p50"] == pytest.approx(0.4)
    assert s["ls"]["slo_attainment"] == 0.5  # 0.2 met, 0.6 missed
    assert s["be"]["turnaround"]["mean"] == pytest.approx((6.0 + 7.5) / 2)
    assert s["be"]["preemptions"] == 3 and s["be"]["parked_time_mean"] == pytest.approx(1.0)
    assert s["wall_s"] == 8.0


def test_bootstrap_interval_covers_the_statistic_and_narrows_with_samples():
    from qllm_jax.scheduler.metrics import bootstrap_ci, mean

    small = [float(x % 7) for x in range(20)]
    large = [float(x % 7) for x in range(2000)]
    lo, hi = bootstrap_ci(small, mean, seed=1)
    assert lo <= mean(small) <= hi
    lo2, hi2 = bootstrap_ci(large, mean, seed=1)
    assert lo2 <= mean(large) <= hi2 and (hi2 - lo2) < (hi - lo) / 3
    assert bootstrap_ci(small, mean, seed=1) == (lo, hi)  # seeded: reproducible
    assert all(math.isnan(v) for v in bootstrap_ci([1.0], mean))


def test_windowed_rate_by_batch_means():
    from qllm_jax.scheduler.metrics import windowed_rate

    events = [(t * 0.1, 2.0) for t in range(100)]  # 20 units per second over [0, 10)
    rate, (lo, hi) = windowed_rate(events, 0.0, 10.0, windows=10)
    assert rate == pytest.approx(20.0) and lo == pytest.approx(20.0) and hi == pytest.approx(20.0)
    rate, _ = windowed_rate(events + [(50.0, 1e9)], 0.0, 10.0)  # outside the window: ignored
    assert rate == pytest.approx(20.0)
    assert math.isnan(windowed_rate(events, 5.0, 5.0)[0])
