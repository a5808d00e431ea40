"""Serving metrics over wall-clock time, per priority class. Plain Python (no jax), shared by
the real engine, the simulator and the experiments.

Definitions (all times in seconds, on one clock):
- TTFT: first token − arrival. TPOT: (finish − first token) / (output tokens − 1).
- Turnaround: finish − arrival.
- SLO attainment: the fraction of a class's requests whose TTFT <= the SLO; a request that never
  produced a token counts as a miss.
- Throughput: tokens / the run's wall-clock span (first arrival → last finish). Unlike the
  reference code's tokens over busy time, idle time counts.
- Percentiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    request_id: str
    priority: int
    arrival: float
    first_token: float | None
    finish: float | None
    prompt_tokens: int
    output_tokens: int
    num_preemptions: int = 0
    parked_time: float = 0.0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def turnaround(self) -> float | None:
        return None if self.finish is None else self.finish - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finish is None or self.first_token is None or self.output_tokens < 2:
            return None
        return (self.finish - self.first_token) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def slo_attainment(records: Sequence[RequestRecord], slo: float) -> float:
    """Fraction of requests with TTFT <= slo (requests without a first token miss)."""
    if not records:
        return math.nan
    return sum(1 for r in records if r.ttft is not None and r.ttft <= slo) / len(records)


def span(records: Iterable[RequestRecord]) -> float:
    """Wall-clock span of a run: first arrival to last finish."""
    records = list(records)
    finishes = [r.finish for r in records if r.finish is not None]
    if not records or not finishes:
        return math.nan
    return max(finishes) - min(r.arrival for r in records)


def _dist(values: list[float]) -> dict[str, float]:
    return {
        "mean": mean(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def class_summary(records: Sequence[RequestRecord], slo: float, wall: float) -> dict:
    """Latency, SLO and throughput numbers of one class of requests."""
    ttft = [r.ttft for r in records if r.ttft is not None]
    tpot = [r.tpot for r in records if r.tpot is not None]
    turn = [r.turnaround for r in records if r.turnaround is not None]
    out_tokens = sum(r.output_tokens for r in records)
    return {
        "count": len(records),
        "finished": sum(r.finish is not None for r in records),
        "ttft": _dist(ttft),
        "tpot": _dist(tpot),
        "turnaround": _dist(turn),
        "slo_attainment": slo_attainment(records, slo),
        "output_tokens_per_s": out_tokens / wall if wall > 0 else math.nan,
        "preemptions": sum(r.num_preemptions for r in records),
        "parked_time_mean": mean([r.parked_time for r in records]),
    }


def summarize(records: Sequence[RequestRecord], slo: float) -> dict:
    """Per-class (LS: priority <= 0, BE: > 0) and overall metrics of one run."""
    wall = span(records)
    ls = [r for r in records if r.priority <= 0]
    be = [r for r in records if r.priority > 0]
    tokens = sum(r.prompt_tokens + r.output_tokens for r in records if r.finish is not None)
    return {
        "wall_s": wall,
        "ls": class_summary(ls, slo, wall),
        "be": class_summary(be, slo, wall),
        "total_tokens_per_s": tokens / wall if wall > 0 else math.nan,
        "output_tokens_per_s": sum(r.output_tokens for r in records) / wall
        if wall > 0
        else math.nan,
    }


def record_of(req) -> RequestRecord:
    """The metrics view of a scheduler ``Request``."""
    return RequestRecord(
        request_id=req.request_id,
        priority=req.priority,
        arrival=req.arrival_time,
        first_token=req.first_token_time,
        finish=req.finish_time if req.finish_reason != "abort" else None,
        prompt_tokens=len(req.prompt_token_ids),
        output_tokens=len(req.output_token_ids),
        num_preemptions=req.num_preemptions,
        parked_time=req.parked_time,
    )


def bootstrap_ci(
    values: Sequence[float],
    stat: Callable[[Sequence[float]], float],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(values)``: resample with replacement ``n_boot``
    times. (NaN, NaN) for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    draws = sorted(stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(n_boot))
    lo = draws[int((1 - level) / 2 * n_boot)]
    hi = draws[min(n_boot - 1, int((1 + level) / 2 * n_boot))]
    return (lo, hi)


def p90(values: Sequence[float]) -> float:
    return percentile(values, 90)


def windowed_rate(
    events: Sequence[tuple[float, float]], start: float, end: float, windows: int = 10
) -> tuple[float, tuple[float, float]]:
    """A rate (sum of amounts per second) over [start, end) from ``(time, amount)`` events,
    and its 95 % interval by batch means: the span cut into ``windows`` equal windows, their
    rates bootstrapped."""
    span = end - start
    if span <= 0:
        return math.nan, (math.nan, math.nan)
    per = [0.0] * windows
    for t, amount in events:
        if start <= t < end:
            per[min(windows - 1, int((t - start) / span * windows))] += amount
    rates = [x / (span / windows) for x in per]
    return mean(rates), bootstrap_ci(rates, mean)
