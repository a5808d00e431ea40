"""Prefix caching and in-class queue order, measured on the built-in model on this machine.

Two experiments, both served for real (wall clock, open or closed loop) by the built-in model
(4 layers, 8 experts, float32) under the default policy (``qllm``, layer granularity here: one
class only, so nothing is preempted; the class-free request level is what is measured):

(a) Prefix caching, ``enable_prefix_caching`` on vs off:
    - ``system``: requests sharing a 1024-token system prompt plus 32 tokens of their own,
      one at a time (closed loop: TTFT is the prefill alone) and as a burst arriving together;
    - ``chat``: multi-turn sessions, each turn's prompt the previous prompt + answer + a new
      user message, sessions sharing a 256-token system prompt; the cache's hit rate (tokens
      mapped / prompt tokens looked up) beside the ideal one (every token of the previous turn
      reused), and TTFT.
(b) ``queue_order`` under heavy-tailed prompt lengths, at 70 / 85 / 100 % of the capacity
    measured here (a burst of requests drawn from the same mix, served to the end):
    ``fcfs``, ``sjf`` without aging, ``sjf`` with aging after ``age_after_s`` (the default 5 s,
    the multi-level paper's), and ``hrrn`` (its own ratio ages; no extra aging), on the same
    seeded Poisson arrivals per load. Prompt lengths follow BurstGPT's finding that ChatGPT
    request lengths are Zipf-distributed (Wang et al., "BurstGPT: A Real-World Workload
    Dataset to Optimize LLM Serving Systems", arXiv 2401.17644; its BurstGPT-Perf generator
    models request lengths with Zipf and arrivals with Gamma): P(n) ~ n^-ZIPF_S on
    [PROMPT_MIN, PROMPT_MAX] tokens. The fitted exponent is not published in a form we could
    read, so ZIPF_S = 1.1 is our choice, and the range is cut to what this CPU serves (a
    1024-token prefill takes ~1 s here). Outputs are uniform in [OUTPUT_MIN, OUTPUT_MAX]
    (BurstGPT's responses are only weakly tied to request length); arrivals are Poisson.
    A fifth arm, ``sjf-aging-1s``, applies the paper's rule for the threshold (below the p99
    TTFT) at this CPU's scale.

Per arm and load: mean and p99 TTFT, mean TPOT, throughput (requests and output tokens per
second over the run's span), the longest wait (max TTFT), each with a 95 % bootstrap interval
(resampling requests). Every engine is warmed up first (``Engine.warmup``) and every measured
run sits in a ``compile_log.Window``; the JSON records its compile count (0, or the run is
flagged). Writes ``experiments/results/prefix-bench-cpu[-quick].json``.

    python experiments/prefix_bench.py            # ~9 minutes on 2 CPU cores
    python experiments/prefix_bench.py --quick    # ~2 minutes: fewer requests, one load
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

ENGINE = dict(  # one engine shape for every run, so one warm-up compiles all of them
    policy="qllm",
    granularity="layer",
    max_batch_size=16,
    max_num_batched_tokens=256,
    prefill_chunk=256,
    page_size=16,
)
MAX_CONTEXT = 1024 + 32 + 16  # the longest request of any experiment
ZIPF_S, PROMPT_MIN, PROMPT_MAX = 1.1, 16, 1024
OUTPUT_MIN, OUTPUT_MAX = 8, 32
SHORT, LONG = 64, 256  # prompt-length buckets for TTFT: < SHORT, >= LONG tokens
ARMS: dict[str, dict] = {
    "fcfs": dict(queue_order="fcfs", age_after_s=None),
    "sjf": dict(queue_order="sjf", age_after_s=None),
    "sjf-aging": dict(queue_order="sjf", age_after_s=5.0),
    # the paper's rule for the threshold ("below the p99 TTFT") at this CPU's scale, where
    # p99 TTFTs are 1-3 s and 5 s of waiting almost never happens
    "sjf-aging-1s": dict(queue_order="sjf", age_after_s=1.0),
    "hrrn": dict(queue_order="hrrn", age_after_s=None),
}


# -- statistics ------------------------------------------------------------------------------------


def bootstrap(values, stat, rng: np.random.Generator, n: int = 1000) -> dict:
    """``stat`` of ``values`` with a 95 % percentile-bootstrap interval (resampling values)."""
    xs = np.asarray(values, float)
    if not len(xs):
        return {"value": math.nan, "ci95": [math.nan, math.nan]}
    boots = [stat(xs[rng.integers(0, len(xs), len(xs))]) for _ in range(n)]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"value": float(stat(xs)), "ci95": [float(lo), float(hi)]}


def p99(xs) -> float:
    return float(np.percentile(xs, 99))


def summary(outs: list, rng: np.random.Generator) -> dict:
    """Latency and throughput of one run's finished requests (engine clock)."""
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
    tpot = [
        (o.metrics.finish_time - o.metrics.first_token_time) / (len(o.token_ids) - 1)
        for o in outs
        if len(o.token_ids) > 1
    ]
    start = min(o.metrics.arrival_time for o in outs)
    span = max(o.metrics.finish_time for o in outs) - start
    # throughput per request: resample requests, divide by the span they cover
    spans = np.array([[o.metrics.arrival_time, o.metrics.finish_time] for o in outs])
    tokens = np.array([len(o.token_ids) for o in outs], float)

    def rps(idx):
        return len(idx) / (spans[idx, 1].max() - spans[idx, 0].min())

    def tps(idx):
        return tokens[idx].sum() / (spans[idx, 1].max() - spans[idx, 0].min())

    idx = np.arange(len(outs))
    by_len = {}  # who gains and who pays: TTFT of short and long prompts
    for name, lo, hi in (("short", 0, SHORT), ("long", LONG, 1 << 30)):
        xs = [t for t, o in zip(ttft, outs, strict=True) if lo <= len(o.prompt_token_ids) < hi]
        by_len[name] = {"requests": len(xs), "ttft_mean_s": bootstrap(xs, np.mean, rng)}
    return {
        "requests": len(outs),
        "span_s": span,
        "ttft_mean_s": bootstrap(ttft, np.mean, rng),
        "ttft_p99_s": bootstrap(ttft, p99, rng),
        "tpot_mean_s": bootstrap(tpot, np.mean, rng),
        "throughput_rps": bootstrap(idx, lambda i: rps(i.astype(int)), rng),
        "output_tokens_per_s": bootstrap(idx, lambda i: tps(i.astype(int)), rng),
        "longest_wait_s": bootstrap(ttft, np.max, rng),
        "cached_tokens": int(sum(o.num_cached_tokens for o in outs)),
        "prompt_tokens": int(sum(len(o.prompt_token_ids) for o in outs)),
        "ttft_by_prompt_len": by_len,
    }


# -- serving ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    request_id: str
    arrival: float  # seconds after the start of the run
    prompt: tuple[int, ...]
    max_tokens: int


def engine(model, **knobs):
    import qllm_jax

    eng = qllm_jax.Engine(model, **(ENGINE | knobs))
    eng.warmup(max_rows=ENGINE["max_num_batched_tokens"], max_context=MAX_CONTEXT)
    return eng


def serve(eng, items: list[Item]) -> tuple[list, int]:
    """Open loop: each item is added when its arrival time comes (with that time as its
    arrival, so host lag counts against us); steps until all are done. Returns the finished
    outputs and the number of compilations during the run (must be 0)."""
    import qllm_jax
    from qllm_jax import compile_log

    items = sorted(items, key=lambda it: it.arrival)
    done, i = {}, 0
    with compile_log.Window() as window:
        t0 = time.monotonic()
        while i < len(items) or eng.has_unfinished():
            now = time.monotonic() - t0
            while i < len(items) and items[i].arrival <= now:
                it = items[i]
                sp = qllm_jax.SamplingParams(
                    max_tokens=it.max_tokens, temperature=0.0, ignore_eos=True
                )
                eng.add_request(list(it.prompt), sp, 0, t0 + it.arrival, it.request_id)
                i += 1
            if eng.has_unfinished():
                done |= {o.request_id: o for o in eng.step() if o.finished}
            elif i < len(items):
                time.sleep(min(items[i].arrival - now, 0.01))
    return list(done.values()), window.compiles


def serve_closed(eng, prompts: list[list[int]], max_tokens: int) -> tuple[list, int]:
    """Closed loop: one request at a time."""
    outs, compiles = [], 0
    for n, prompt in enumerate(prompts):
        got, c = serve(eng, [Item(f"c{n}", 0.0, tuple(prompt), max_tokens)])
        outs += got
        compiles += c
    return outs, compiles


# -- (a) prefix caching ----------------------------------------------------------------------------


def system_prompt_runs(model, vocab: int, n: int, rng: np.random.Generator, seed: int) -> dict:
    """Requests sharing a 1024-token system prompt: closed loop and as one burst."""
    system = rng.integers(3, vocab, 1024).tolist()
    own = [rng.integers(3, vocab, 32).tolist() for _ in range(n + 1)]
    prompts = [system + o for o in own]
    out = {}
    for caching in (False, True):
        eng = engine(model, enable_prefix_caching=caching)
        # the first request computes the system prompt (and, with caching, caches it)
        first, c0 = serve_closed(eng, prompts[:1], 8)
        closed, c1 = serve_closed(eng, prompts[1:], 8)
        eng2 = engine(model, enable_prefix_caching=caching)
        serve_closed(eng2, prompts[:1], 8)  # cache the system prompt, then a burst
        burst, c2 = serve(eng2, [Item(f"b{k}", 0.0, tuple(p), 8) for k, p in enumerate(prompts)])
        out["on" if caching else "off"] = {
            "first_ttft_s": first[0].metrics.first_token_time - first[0].metrics.arrival_time,
            "closed_loop": summary(closed, np.random.default_rng(seed)),
            "burst": summary(burst, np.random.default_rng(seed)),
            "compiles": c0 + c1 + c2,
            "hit_rate": eng.stats()["prefix_cache_hit_rate"],
        }
    for mode in ("closed_loop", "burst"):
        off = out["off"][mode]["ttft_mean_s"]["value"]
        on = out["on"][mode]["ttft_mean_s"]["value"]
        out[f"{mode}_ttft_speedup"] = off / on
    return out


def chat_runs(model, vocab: int, sessions: int, turns: int, seed: int) -> dict:
    """Multi-turn sessions over a shared 256-token system prompt, run concurrently: each
    session sends its next turn when its previous answer is done."""
    import qllm_jax
    from qllm_jax import compile_log

    out = {}
    for caching in (False, True):
        rng = random.Random(seed)
        nrng = np.random.default_rng(seed)
        system = nrng.integers(3, vocab, 256).tolist()
        eng = engine(model, enable_prefix_caching=caching)
        context = {s: list(system) for s in range(sessions)}
        turn = dict.fromkeys(range(sessions), 0)
        outs, ideal_hits, queried = [], 0, 0
        with compile_log.Window() as window:
            pending = set(range(sessions))
            live: dict[str, int] = {}
            while pending or live:
                for s in sorted(pending):
                    user = nrng.integers(3, vocab, rng.randint(16, 64)).tolist()
                    # tokens whose K/V an earlier request computed (before rounding to
                    # pages): the previous turn's prompt and answer but its last token; for
                    # a first turn the system prompt, once the first session computed it
                    if turn[s]:
                        ideal_hits += len(context[s]) - 1
                    elif s:
                        ideal_hits += len(system)
                    context[s] = context[s] + user
                    queried += len(context[s])
                    rid = f"s{s}t{turn[s]}"
                    sp = qllm_jax.SamplingParams(
                        max_tokens=rng.randint(8, 32), temperature=0.0, ignore_eos=True
                    )
                    eng.add_request(context[s], sp, 0, None, rid)
                    live[rid] = s
                pending.clear()
                for o in eng.step():
                    if o.finished:
                        s = live.pop(o.request_id)
                        outs.append(o)
                        context[s] = context[s] + o.token_ids
                        turn[s] += 1
                        if turn[s] < turns:
                            pending.add(s)
        stats = eng.stats()
        out["on" if caching else "off"] = {
            "summary": summary(outs, np.random.default_rng(seed)),
            "hit_rate": stats["prefix_cache_hit_rate"],
            "ideal_hit_rate": ideal_hits / queried,
            "kv_pages_cached": stats["kv_pages_cached"],
            "compiles": window.compiles,
        }
    return out


# -- (b) queue order -------------------------------------------------------------------------------


def zipf_lengths(rng: random.Random, n: int) -> list[int]:
    """Prompt lengths with P(k) ~ k^-ZIPF_S on [PROMPT_MIN, PROMPT_MAX]."""
    ks = np.arange(PROMPT_MIN, PROMPT_MAX + 1)
    w = ks.astype(float) ** -ZIPF_S
    cdf = np.cumsum(w) / w.sum()
    return [int(ks[np.searchsorted(cdf, rng.random())]) for _ in range(n)]


def mix(rng: random.Random, n: int, vocab: int, tag: str) -> list[Item]:
    """``n`` requests of the heavy-tailed mix, all arriving at 0 (arrivals are set later)."""
    lengths = zipf_lengths(rng, n)
    nrng = np.random.default_rng(rng.getrandbits(32))
    return [
        Item(
            f"{tag}{i}",
            0.0,
            tuple(int(t) for t in nrng.integers(3, vocab, length)),
            rng.randint(OUTPUT_MIN, OUTPUT_MAX),
        )
        for i, length in enumerate(lengths)
    ]


def capacity(model, items: list[Item]) -> dict:
    """Requests per second this engine sustains on the mix: the whole mix as one burst,
    served to the end (fcfs order), requests / makespan."""
    eng = engine(model, **ARMS["fcfs"])
    before = os.getloadavg()[0]
    outs, compiles = serve(eng, items)
    span = max(o.metrics.finish_time for o in outs) - min(o.metrics.arrival_time for o in outs)
    return {
        "requests": len(items),
        "makespan_s": span,
        "rps": len(items) / span,
        "compiles": compiles,
        "loadavg_1m_before": before,
    }


def order_runs(model, items: list[Item], cap_rps: float, loads, arms, seed) -> dict:
    """Every load serves the same requests (lengths and order); only the Poisson arrival
    times scale with the rate. Arms run in a rotated order per load, so a slow drift of the
    machine (other processes on these cores) does not always hit the same arm."""
    out = {}
    gaps = random.Random(seed + 2)
    unit = np.cumsum([gaps.expovariate(1.0) for _ in items])  # arrivals at rate 1
    for k, load in enumerate(loads):
        rate = load * cap_rps
        timed = [dataclasses.replace(it, arrival=t / rate) for it, t in zip(items, unit)]
        row = {"rate_rps": rate, "requests": len(items), "arrivals_s": unit[-1] / rate}
        row["arms"] = {}
        for arm in arms[k % len(arms) :] + arms[: k % len(arms)]:
            eng = engine(model, **ARMS[arm])
            before = os.getloadavg()[0]
            outs, compiles = serve(eng, timed)
            res = summary(outs, np.random.default_rng(seed)) | {
                "compiles": compiles,
                "loadavg_1m_before": before,
                "loadavg_1m_after": os.getloadavg()[0],
            }
            row["arms"][arm] = res
            print(
                f"  load {load:.2f} ({rate:.2f} req/s, {len(items)} requests) {arm:12s} "
                f"TTFT mean {res['ttft_mean_s']['value']:.3f} s p99 "
                f"{res['ttft_p99_s']['value']:.3f} s TPOT {res['tpot_mean_s']['value'] * 1e3:.1f}"
                f" ms {res['throughput_rps']['value']:.2f} req/s longest wait "
                f"{res['longest_wait_s']['value']:.2f} s short/long TTFT "
                f"{res['ttft_by_prompt_len']['short']['ttft_mean_s']['value']:.3f}/"
                f"{res['ttft_by_prompt_len']['long']['ttft_mean_s']['value']:.3f} s "
                f"compiles {compiles} load average "
                f"{before:.1f}",
                flush=True,
            )
        row["arms"] = {arm: row["arms"][arm] for arm in arms}
        out[f"{load:.2f}"] = row
    return out


# -- main ------------------------------------------------------------------------------------------


def fmt(m: dict, scale: float = 1.0, digits: int = 3) -> str:
    v, (lo, hi) = m["value"], m["ci95"]
    return f"{v * scale:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def print_tables(res: dict) -> None:
    if "system" in res:
        s = res["system"]
        print("\n(a) shared 1024-token system prompt, mean TTFT [95% CI]:")
        for mode in ("closed_loop", "burst"):
            print(
                f"  {mode:11s} off {fmt(s['off'][mode]['ttft_mean_s'])} s   on "
                f"{fmt(s['on'][mode]['ttft_mean_s'])} s   speedup "
                f"{s[f'{mode}_ttft_speedup']:.1f}x"
            )
    if "chat" in res:
        c = res["chat"]
        print(
            f"    multi-turn chat: hit rate {c['on']['hit_rate']:.3f} (ideal "
            f"{c['on']['ideal_hit_rate']:.3f}); mean TTFT off "
            f"{fmt(c['off']['summary']['ttft_mean_s'])} s, on "
            f"{fmt(c['on']['summary']['ttft_mean_s'])} s"
        )
    if "order" in res:
        print(f"\n(b) queue order, capacity {res['capacity']['rps']:.2f} req/s [95% CI]:")
        head = "load  arm        TTFT mean s           TTFT p99 s            TPOT ms"
        print(head + "              req/s               longest wait s    TTFT short / long s")
        for load, row in res["order"].items():
            for arm, m in row["arms"].items():
                by = m["ttft_by_prompt_len"]
                print(
                    f"{load}  {arm:12s}  {fmt(m['ttft_mean_s'])}  {fmt(m['ttft_p99_s'])}  "
                    f"{fmt(m['tpot_mean_s'], 1e3, 1)}  {fmt(m['throughput_rps'], 1, 2)}  "
                    f"{fmt(m['longest_wait_s'], 1, 2)}  "
                    f"{by['short']['ttft_mean_s']['value']:.3f} / "
                    f"{by['long']['ttft_mean_s']['value']:.3f}"
                )


METRICS = ("ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "throughput_rps", "longest_wait_s")


def aggregate(paths: list[Path]) -> dict:
    """Median over runs (seeds: other mixes and arrivals) of each (load, arm) metric, and how
    often each arm had the lowest mean TTFT: one run per cell is noisy on a shared CPU."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out: dict = {"files": [str(p) for p in paths], "order": {}}
    for load in runs[0]["order"]:
        arms = runs[0]["order"][load]["arms"]
        row = {}
        for arm in arms:
            cells = [r["order"][load]["arms"][arm] for r in runs if load in r["order"]]
            row[arm] = {m: float(np.median([c[m]["value"] for c in cells])) for m in METRICS}
            for b in ("short", "long"):
                vals = [c["ttft_by_prompt_len"][b]["ttft_mean_s"]["value"] for c in cells]
                row[arm][f"ttft_{b}_mean_s"] = float(np.nanmedian(vals))
            row[arm]["per_run_ttft_mean_s"] = [c["ttft_mean_s"]["value"] for c in cells]
        wins = [min(r["order"][load]["arms"], key=lambda a, r=r: r["order"][load]["arms"][a]
                    ["ttft_mean_s"]["value"]) for r in runs]  # fmt: skip
        out["order"][load] = {"arms": row, "best_mean_ttft_per_run": wins}
    return out


def print_aggregate(agg: dict) -> None:
    print(f"median over {len(agg['files'])} runs:")
    print("load  arm           TTFT mean  TTFT p99  TPOT ms  req/s  longest  short / long TTFT")
    for load, row in agg["order"].items():
        for arm, m in row["arms"].items():
            print(
                f"{load}  {arm:12s}  {m['ttft_mean_s']:8.3f}  {m['ttft_p99_s']:8.3f}  "
                f"{m['tpot_mean_s'] * 1e3:7.1f}  {m['throughput_rps']:5.2f}  "
                f"{m['longest_wait_s']:7.2f}  {m['ttft_short_mean_s']:.3f} / "
                f"{m['ttft_long_mean_s']:.3f}"
            )
        print(f"      lowest mean TTFT per run: {', '.join(row['best_mean_ttft_per_run'])}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, one load (~2 min)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--requests", type=int, default=None, help="requests per run of (b)")
    ap.add_argument("--loads", type=float, nargs="+", default=None)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--only", choices=["prefix", "order"], default=None)
    ap.add_argument(
        "--aggregate", type=Path, nargs="+", default=None, help="result files: median over them"
    )
    args = ap.parse_args(argv)
    if args.aggregate:
        agg = aggregate(args.aggregate)
        print_aggregate(agg)
        path = args.results_dir / "prefix-bench-cpu-order-median.json"
        path.write_text(json.dumps(agg, indent=1) + "\n")
        print(f"wrote {path}")
        return agg
    import qllm_jax

    loads = args.loads or ([1.0] if args.quick else [0.7, 0.85, 1.0])
    n_requests = args.requests or (24 if args.quick else 80)
    model = qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")
    vocab = model.config.vocab_size
    t0 = time.monotonic()
    engine(model)  # compile once, before anything is measured
    res: dict = {
        "meta": {
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpus": os.cpu_count(),
            "model": "builtin-mixtral-v1 (4 layers, 8 experts, float32)",
            "engine": ENGINE,
            "workload": dict(
                zipf_s=ZIPF_S,
                prompt_range=[PROMPT_MIN, PROMPT_MAX],
                output_range=[OUTPUT_MIN, OUTPUT_MAX],
                source="BurstGPT (arXiv 2401.17644): Zipf request lengths; exponent ours",
            ),
            "quick": args.quick,
            "seed": args.seed,
            "warmup_s": time.monotonic() - t0,
            "loadavg_1m_at_start": os.getloadavg()[0],
            "note": "a pass's attention pays every row up to the pass's longest cached prefix "
            "(pages padded to one bucket), so pass composition, which the queue order "
            "decides, changes this engine's capacity, not only its latency",
        }
    }
    rng = np.random.default_rng(args.seed)
    if args.only in (None, "prefix"):
        print("(a) prefix caching ...", flush=True)
        res["system"] = system_prompt_runs(model, vocab, 4 if args.quick else 10, rng, args.seed)
        res["chat"] = chat_runs(model, vocab, 3 if args.quick else 4, 3 if args.quick else 6,
                                args.seed)  # fmt: skip
    if args.only in (None, "order"):
        print("(b) queue order: measuring capacity ...", flush=True)
        items = mix(random.Random(args.seed + 1), n_requests, vocab, "r")
        lengths = [len(it.prompt) for it in items]
        res["mix"] = {
            "prompt_len_mean": float(np.mean(lengths)),
            "prompt_len_p50": float(np.median(lengths)),
            "prompt_len_p99": float(np.percentile(lengths, 99)),
            "prompt_len_max": max(lengths),
            "output_len_mean": float(np.mean([it.max_tokens for it in items])),
        }
        res["capacity"] = capacity(model, items)
        print(f"  capacity {res['capacity']['rps']:.2f} req/s", flush=True)
        res["order"] = order_runs(model, items, res["capacity"]["rps"], loads, args.arms, args.seed)
    res["meta"]["wall_s"] = time.monotonic() - t0
    print_tables(res)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    name = "prefix-bench-cpu" + ("-quick" if args.quick else "")
    name += (f"-{args.only}" if args.only else "") + (f"-seed{args.seed}" if args.seed else "")
    path = args.results_dir / f"{name}.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nwrote {path} ({res['meta']['wall_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
