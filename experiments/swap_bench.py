"""What swapping evicted requests' KV to host memory buys over recomputing it.

A cache too small for the workload (``grow_pages``: requests take pages as they grow, idle
less urgent ones are evicted when none are free) runs the same closed batch of chat requests
without ``max_tokens`` (half LS, half BE; greedy and seeded) in two arms that differ in one
thing: ``swap_pages=0`` (an evicted request recomputes its KV when readmitted) and
``swap_pages=S`` (its computed pages go to host memory and come back). Arms alternate round by
round; every executable (segments and the page copies) is compiled before the first round and
each round counts compilations (a round with any is marked invalid). Reported per arm: wall
time of the batch (min/median/max over rounds), rows the engine computed (deterministic),
evictions, pages swapped out and in, misses (victims the free host slots could not hold), LS
and BE TTFT; and, per round, the requests whose tokens differ from a run of the same batch on
a cache large enough that nobody is evicted (passes of up to 32 rows keep this CPU bitwise
batch-invariant; with 64-row passes a recomputed request's K/V can differ in the last bits from
the decoded original and, rarely, a sampled token changes).

    python experiments/swap_bench.py                # built-in model, float32, CPU (~3 min)
    python experiments/swap_bench.py --rounds 2 --requests 8

Writes ``experiments/results/swap-bench-<device>.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax

import qllm_jax
from qllm_jax import compile_log, openai_api
from qllm_jax.scheduler.metrics import percentile

RESULTS = Path(__file__).resolve().parent / "results"
ENGINE = dict(
    dtype="float32",
    policy="qllm",
    granularity="layer",
    page_size=16,
    max_model_len=192,
    max_batch_size=8,
    max_num_batched_tokens=32,  # passes of up to 32 rows: bitwise batch-invariant on CPU
    prefill_chunk=16,
    grow_pages=True,
    compilation_cache_dir="default",
)


def requests(eng: qllm_jax.Engine, n: int) -> list[tuple]:
    """Chat requests without max_tokens (each may run to the context limit): LS then BE."""
    out = []
    for i in range(n):
        text = f"Tell me the long story number {i} about a lighthouse keeper and the sea. " * 2
        body = {"messages": [{"role": "user", "content": text}]}
        body |= {"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": 7 + i}
        prepared = openai_api.prepare(eng, openai_api.CHAT, body)
        out.append((prepared, 0 if i < n // 2 else 1))
    return out


def run_round(eng: qllm_jax.Engine, reqs: list[tuple]) -> dict:
    before = {k: eng.stats().get(k, 0) for k in COUNTERS}
    rows0 = eng.scheduler.rows_done
    t0 = time.perf_counter()
    with compile_log.Window() as window:
        for i, (p, prio) in enumerate(reqs):
            eng.add_request(p.prompt_token_ids, p.sampling, prio, request_id=f"r{i}")
        tokens, ttft = {}, {0: [], 1: []}
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    tokens[out.request_id] = out.token_ids
                    prio = reqs[int(out.request_id[1:])][1]
                    ttft[prio].append(out.metrics.first_token_time - out.metrics.arrival_time)
    wall = time.perf_counter() - t0
    stats = eng.stats()
    return {
        "wall_s": wall,
        "rows_computed": eng.scheduler.rows_done - rows0,
        **{k: stats.get(k, 0) - before[k] for k in COUNTERS},
        "ls_ttft_mean_s": statistics.fmean(ttft[0]),
        "ls_ttft_p90_s": percentile(ttft[0], 90),
        "be_ttft_mean_s": statistics.fmean(ttft[1]),
        "compiles": window.compiles,
        "tokens": tokens,
    }


COUNTERS = ("evictions", "swapped_out_pages", "swapped_in_pages", "swap_misses")


def summarize(rounds: list[dict]) -> dict:
    walls = [r["wall_s"] for r in rounds]
    last = rounds[-1]
    return {
        "wall_s": {"min": min(walls), "median": statistics.median(walls), "max": max(walls)},
        "valid": all(r["compiles"] == 0 for r in rounds),
        **{k: last[k] for k in ("rows_computed", *COUNTERS)},
        **{
            k: statistics.median(r[k] for r in rounds)
            for k in ("ls_ttft_mean_s", "ls_ttft_p90_s", "be_ttft_mean_s")
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--kv-pages", type=int, default=40, help="a cache too small: pressure")
    ap.add_argument("--swap-pages", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    model = qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")
    arms = {
        "recompute": qllm_jax.Engine(model, kv_pages=args.kv_pages, **ENGINE),
        "swap": qllm_jax.Engine(
            model, kv_pages=args.kv_pages, swap_pages=args.swap_pages, **ENGINE
        ),
    }
    for eng in arms.values():
        eng.warmup()
    reqs = requests(arms["recompute"], args.requests)
    roomy = qllm_jax.Engine(model, kv_pages=args.requests * 16, **ENGINE)
    reference = run_round(roomy, reqs)
    assert reference["evictions"] == 0, "the reference run must not evict"
    results: dict[str, list[dict]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, eng in arms.items():
            results[name].append(run_round(eng, reqs))
    differ = {
        name: [sorted(k for k, t in r["tokens"].items() if t != reference["tokens"][k]) for r in rs]
        for name, rs in results.items()
    }
    summary = {
        name: summarize(rs) | {"differing_requests_by_round": differ[name]}
        for name, rs in results.items()
    }
    rec, swp = summary["recompute"], summary["swap"]
    out = {
        "benchmark": "swap-bench",
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "load_average": os.getloadavg(),
        "config": vars(args) | {"engine": ENGINE, "out": None},
        "arms": summary,
        "ratios_swap_over_recompute": {
            "wall_s_median": swp["wall_s"]["median"] / rec["wall_s"]["median"],
            "rows_computed": swp["rows_computed"] / rec["rows_computed"],
            "ls_ttft_p90_s": swp["ls_ttft_p90_s"] / rec["ls_ttft_p90_s"],
        },
    }
    for name, s in summary.items():
        print(
            f"{name:10s} wall {s['wall_s']['median']:.2f} s (min {s['wall_s']['min']:.2f}, "
            f"max {s['wall_s']['max']:.2f})  rows {s['rows_computed']}  evictions "
            f"{s['evictions']}  swapped out/in {s['swapped_out_pages']}/"
            f"{s['swapped_in_pages']}  misses {s['swap_misses']}  LS TTFT p90 "
            f"{s['ls_ttft_p90_s'] * 1e3:.0f} ms  valid {s['valid']}"
        )
    print("requests whose tokens differ from the unpressured run, by round:", differ)
    print("swap / recompute:", json.dumps(out["ratios_swap_over_recompute"]))
    path = args.out or RESULTS / f"swap-bench-{jax.devices()[0].platform}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
