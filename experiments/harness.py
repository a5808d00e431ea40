"""What the experiment scripts share: the arms, workloads, running an arm (for real on this
machine, or in the simulator), and summaries with bootstrap intervals and attribution.

Fairness rules (``../shared/qllm-paper.md``): every arm shares the scheduler's default
anti-starvation (a bounded BE share that never outranks LS) and prefill order, except
``qllm-paper``, which replays the reference code's rules, and ``qllm-aging``, which exists to show
what class-inverting aging does. ``qllm-nopreempt`` is the qllm policy with in-pass preemption off
(the ablation). ``fcfs`` is the reference's baseline: decode-first, prefill passes of up to
``batch_size`` whole prompts with no token budget, prompts and decodes never in one pass; the
512-token-budget variant the project used before is ``fcfs-512``. ``ls-only`` serves the LS
requests alone on the best engine for them (fused, iteration-level priority).

A real run warms every executable its arm can reach first (``Engine.warmup``) and counts the
compilations inside its measured window (``qllm_jax.compile_log``); a run with any is invalid.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time

from qllm_jax.scheduler.core import PRESETS
from qllm_jax.scheduler.metrics import (
    RequestRecord,
    bootstrap_ci,
    mean,
    p90,
    summarize,
    windowed_rate,
)

# Every arm orders requests by arrival inside a priority class, as the QLLM paper's code and
# vLLM's priority policy do (the engine's default is "sjf" with aging: the `qllm-sjf` arm, one
# change against `qllm-expert`)
ARM_BASE: dict = dict(queue_order="fcfs", age_after_s=None)
ARMS: dict[str, dict] = {
    "fcfs": dict(policy="fcfs", no_token_budget=True, prefill_chunk=None),
    "fcfs-512": dict(policy="fcfs"),
    "priority": dict(policy="priority"),
    "qllm-nopreempt": dict(policy="qllm", granularity="layer", preempt=False),
    "qllm-layer": dict(policy="qllm", granularity="layer"),
    "qllm-expert": dict(policy="qllm", granularity="expert"),
    "qllm-sjf": dict(policy="qllm", granularity="expert", queue_order="sjf", age_after_s=5.0),
    "qllm-mix": dict(policy="qllm", granularity="expert", mix_classes=True),
    "qllm-aging": dict(
        policy="qllm", granularity="expert", aging_s=10.0, max_park_s=5.0, be_share=None
    ),
    "qllm-paper": dict(PRESETS["paper"]),
    "ls-only": dict(policy="priority"),
}
# the engine mode of each arm when run for real: the qllm policy needs segments; the others
# run their passes as one jit each (their best engine)
FUSED_ARMS = ("fcfs", "fcfs-512", "priority", "ls-only")


def arm_options(arm: str, base: dict, prompt_max: int, options: dict | None = None) -> dict:
    """Scheduler options of ``arm`` over the run's ``base`` options (batch size, token budget,
    prefill chunk), with ``options`` on top (a variant of the arm that changes one knob).
    ``no_token_budget``: a pass may take ``max_batch_size`` whole prompts."""
    knobs = dict(ARM_BASE) | dict(base)
    knobs |= {k: v for k, v in ARMS[arm].items() if k != "no_token_budget"}
    knobs |= options or {}
    if ARMS[arm].get("no_token_budget"):
        knobs["max_num_batched_tokens"] = knobs["max_batch_size"] * prompt_max
    return knobs


# ----------------------------------------------------------------------------------------------
# Workloads


@dataclasses.dataclass(frozen=True)
class Item:
    request_id: str
    arrival: float  # seconds after the start of the run
    prompt_len: int
    output_len: int
    priority: int  # 0 = LS, 1 = BE


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Lognormal prompt/output lengths with the given means, clipped; ``fixed_output`` pins
    every output length (the reference code's 39)."""

    prompt_mean: float = 160.0
    output_mean: float = 340.0
    sigma: float = 1.0
    prompt_max: int = 1024
    output_max: int = 1024
    fixed_output: int | None = None
    pairs: tuple[tuple[int, int], ...] = ()  # from a ShareGPT file: sampled instead

    def sample(self, rng: random.Random) -> tuple[int, int]:
        if self.pairs:
            p, o = rng.choice(self.pairs)
        else:
            p = _lognormal(rng, self.prompt_mean, self.sigma)
            o = _lognormal(rng, self.output_mean, self.sigma)
        p = max(1, min(int(p), self.prompt_max))
        o = max(1, min(int(o), self.output_max))
        return p, self.fixed_output or o

    @property
    def max_context(self) -> int:
        longest = max((p + o for p, o in self.pairs), default=0)
        return longest or self.prompt_max + (self.fixed_output or self.output_max)


def _lognormal(rng: random.Random, mean_: float, sigma: float) -> float:
    mu = math.log(mean_) - sigma**2 / 2  # so that the distribution's mean is `mean_`
    return rng.lognormvariate(mu, sigma)


def make_workload(
    rate: float, num: int, ls_fraction: float, lengths: Lengths, seed: int
) -> list[Item]:
    """Open-loop Poisson arrivals; round(num * ls_fraction) of them, chosen at random, are LS
    (an exact share, so short runs are never left without LS requests)."""
    rng = random.Random(seed)
    ls = set(rng.sample(range(num), round(num * ls_fraction)))
    t, items = 0.0, []
    for i in range(num):
        t += rng.expovariate(rate)
        p, o = lengths.sample(rng)
        prio = 0 if i in ls else 1
        items.append(Item(f"{'ls' if prio == 0 else 'be'}{i}", t, p, o, prio))
    return items


def make_backlog(
    duration: float,
    ls_rate: float,
    be_count: int,
    ls_lengths: Lengths,
    be_lengths: Lengths,
    seed: int,
    ls_count: int | None = None,
) -> list[Item]:
    """A standing BE backlog (``be_count`` requests at t=0, more than the run can finish) and
    LS requests arriving as a Poisson process over ``duration`` seconds. ``ls_count``: exactly
    that many LS arrivals, uniform over the window (the Poisson process conditioned on its
    count), so a short run is sure of its sample size; else as many as the process gives."""
    rng = random.Random(seed)
    items = [Item(f"be{i}", 0.0, *be_lengths.sample(rng), 1) for i in range(be_count)]
    if ls_count is not None:
        times = sorted(rng.uniform(0.0, duration) for _ in range(ls_count))
    else:
        times, t = [], rng.expovariate(ls_rate)
        while t < duration:
            times.append(t)
            t += rng.expovariate(ls_rate)
    items += [Item(f"ls{i}", t, *ls_lengths.sample(rng), 0) for i, t in enumerate(times)]
    return sorted(items, key=lambda it: it.arrival)


# ----------------------------------------------------------------------------------------------
# Running one arm


@dataclasses.dataclass
class Run:
    """One arm on one workload: per-request records, engine counters, the (time, LS tokens,
    BE tokens) timeline, the measured window and what compiled inside it."""

    records: list[RequestRecord]
    stats: dict
    timeline: list[tuple[float, int, int]]
    window: tuple[float, float]
    compiles: int = 0
    cache_loads: int = 0

    @property
    def valid(self) -> bool:
        return self.compiles == 0


def run_real(
    model,
    arm: str,
    items: list[Item],
    base: dict,
    seed: int,
    until=None,
    options=None,
    observe=None,
) -> Run:
    """Serve ``items`` on this machine with ``arm``'s engine, arrivals on the wall clock.
    ``until``: stop feeding BE at that time and end once every LS request is done (a standing
    backlog); else run until every request finishes. ``observe(engine)``: called once the
    engine is warm, before the measured window (to instrument it)."""
    import numpy as np

    import qllm_jax
    from qllm_jax import compile_log

    pending = [it for it in items if arm != "ls-only" or it.priority == 0]
    prompt_max = max(it.prompt_len for it in pending)
    knobs = arm_options(arm, base, prompt_max, options)
    mode = "fused" if arm in FUSED_ARMS else "segmented"
    engine = qllm_jax.Engine(model, mode=mode, **knobs)
    engine.warmup(
        max_rows=engine.config.max_num_batched_tokens,
        max_context=max(it.prompt_len + it.output_len for it in pending),
    )
    if observe is not None:
        observe(engine)
    rng = np.random.default_rng(seed)
    vocab = engine.model.config.vocab_size
    prompts = {it.request_id: rng.integers(3, vocab, it.prompt_len).tolist() for it in pending}
    prio = {it.request_id: it.priority for it in pending}
    ls_left = sum(it.priority == 0 for it in pending)
    done, seen, timeline = {}, {}, []
    with compile_log.Window() as w:
        t0, i = time.monotonic(), 0
        while True:
            now = time.monotonic() - t0
            while i < len(pending) and pending[i].arrival <= now:
                it = pending[i]
                sp = qllm_jax.SamplingParams(
                    max_tokens=it.output_len, temperature=0.0, ignore_eos=True
                )
                engine.add_request(
                    prompts[it.request_id], sp, it.priority, t0 + it.arrival, it.request_id
                )
                i += 1
            if until is not None and now >= until and ls_left == 0:
                break
            if not engine.has_unfinished():
                if i >= len(pending):
                    break
                time.sleep(min(pending[i].arrival - now, 0.05))
                continue
            for out in engine.step():
                new = len(out.token_ids) - seen.get(out.request_id, 0)
                seen[out.request_id] = len(out.token_ids)
                if new:
                    be = new if prio[out.request_id] > 0 else 0
                    timeline.append((time.monotonic() - t0, new - be, be))
                if out.finished:
                    done[out.request_id] = out
                    ls_left -= prio[out.request_id] == 0
        end = time.monotonic() - t0
    stats = engine.stats()
    for rid in list(engine.scheduler.requests):
        engine.abort(rid)  # the rest of the backlog
    records = [_record_of_output(out) for out in done.values()]
    return Run(records, stats, timeline, (0.0, end), w.compiles, w.cache_hits)


def _record_of_output(out) -> RequestRecord:
    m = out.metrics
    return RequestRecord(
        request_id=out.request_id,
        priority=out.priority,
        arrival=m.arrival_time,
        first_token=m.first_token_time,
        finish=m.finish_time if out.finish_reason not in ("abort", "error") else None,
        prompt_tokens=len(out.prompt_token_ids),
        output_tokens=len(out.token_ids),
        num_preemptions=m.num_preemptions,
        parked_time=m.parked_time,
    )


def run_sim(profile, arm: str, items: list[Item], sim_kw: dict, until=None, options=None) -> Run:
    """The same arm on the simulator: ``profile``'s costs on a virtual clock."""
    from qllm_jax.scheduler import Scheduler, SchedulerConfig, segment_layout
    from qllm_jax.scheduler.plan import default_group_size
    from qllm_jax.scheduler.simulator import Simulator, VirtualClock, make_request

    pending = [it for it in items if arm != "ls-only" or it.priority == 0]
    base = {k: sim_kw[k] for k in ("max_batch_size", "max_num_batched_tokens", "prefill_chunk")}
    knobs = arm_options(arm, base, max(it.prompt_len for it in pending), options)
    group = default_group_size(sim_kw["num_experts"], knobs.get("granularity", "expert"))
    segments = segment_layout(sim_kw["num_layers"], sim_kw["num_experts"], group, False)
    clock = VirtualClock()
    config = SchedulerConfig(
        page_size=16, num_pages=sim_kw.get("num_pages", 1 << 20), max_model_len=1 << 16, **knobs
    )
    sched = Scheduler(config, segments, clock=clock)
    events = [
        (it.arrival, make_request(it.request_id, n, it.prompt_len, it.output_len, it.priority,
                                  it.arrival))
        for n, it in enumerate(pending)
    ]  # fmt: skip
    horizon = None
    if until is not None:  # a standing backlog: LS requests all arrive before `until`
        horizon = until
    sim = Simulator(sched, profile, clock)
    result = sim.run(events, until=horizon)
    if horizon is not None:  # let the LS requests that arrived finish
        ls = [r for r in sim.requests.values() if r.priority <= 0 and not r.status.done]
        while ls and any(not r.status.done for r in ls):
            plan = sched.schedule()
            if plan is None:
                break
            sim.step(plan)
        result = sim.result()
    records = [r for r in result.records.values() if r.finish_reason != "abort"]
    end = clock.now if horizon is None else max(clock.now, horizon)
    return Run(records, result.stats, sim.timeline, (0.0, end))


# ----------------------------------------------------------------------------------------------
# Summaries


def summarize_run(run: Run, slo: float, seed: int = 0) -> dict:
    """``metrics.summarize`` plus 95 % bootstrap intervals (LS TTFT mean and p90, BE output
    tokens/s over the window by batch means), the max LS TTFT, attribution and validity."""
    summary = summarize(run.records, slo)
    ttft = [r.ttft for r in run.records if r.priority <= 0 and r.ttft is not None]
    summary["ls"]["ttft"]["max"] = max(ttft, default=math.nan)
    summary["ls"]["ttft"]["mean_ci"] = bootstrap_ci(ttft, mean, seed=seed)
    summary["ls"]["ttft"]["p90_ci"] = bootstrap_ci(ttft, p90, seed=seed)
    start, end = run.window
    be_events = [(t, be) for t, _, be in run.timeline]
    rate, ci = windowed_rate(be_events, start, end)
    summary["be_tokens_per_s"] = rate
    summary["be_tokens_per_s_ci"] = ci
    summary["attribution"] = attribution(run)
    summary["valid"] = run.valid
    summary["compiles_in_window"] = run.compiles
    summary["cache_loads_in_window"] = run.cache_loads
    return summary


def attribution(run: Run) -> dict:
    """What the scheduler did: preemptions fired, their wait, parked time, rows per pass."""
    st = run.stats
    be = [r for r in run.records if r.priority > 0]
    return {
        "preemptions": st.get("preemptions_layer", 0) + st.get("preemptions_expert", 0),
        "preempt_wait_s_p50": st.get("preempt_wait_s_p50"),
        "preempt_wait_s_p99": st.get("preempt_wait_s_p99"),
        "be_parked_time_mean_s": mean([r.parked_time for r in be]) if be else math.nan,
        "rows_per_ls_pass": _per(st.get("rows_ls", 0), st.get("passes_ls", 0)),
        "rows_per_be_pass": _per(st.get("rows_be", 0), st.get("passes_be", 0)),
        "be_turns": st.get("be_turns", 0),
        "be_longest_wait_s": st.get("be_longest_wait_s"),
    }


def _per(a: float, b: float) -> float:
    return a / b if b else math.nan


def ratio(a: float, b: float) -> float:
    """a / b, NaN when either is missing or b is 0."""
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_ci(value: float, ci: tuple[float, float], digits: int = 3) -> str:
    if math.isnan(value):
        return "-"
    lo, hi = ci
    if math.isnan(lo):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
