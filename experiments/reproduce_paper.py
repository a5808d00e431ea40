"""The QLLM paper's headline experiment, re-run side by side with honest baselines.

Open-loop Poisson arrivals at rate λ, 20 % latency-sensitive (LS, priority 0) chosen at random,
the rest best-effort (BE, priority 1); ShareGPT-like prompt/output lengths (lognormal, seeded;
``--sharegpt PATH`` reads a local ShareGPT JSON; ``--lengths paper`` fixes outputs at 39 tokens
as the reference code effectively did). Arms, all on the same engine and kernels:

  fcfs         the paper's baseline: iteration-level, first come first served, decode-first
  priority     a stronger baseline: iteration-level priority (LS first at every iteration)
  qllm-layer   preemption inside the pass, between layers (no aging: the paper's setting)
  qllm-expert  preemption between expert groups
  qllm-mix     qllm-expert whose passes top LS rows up with BE rows (throughput-oriented)
  qllm-aging   qllm-expert with aging and a maximum park time (bounded BE delay)
  qllm-paper   the reference code's rules: layer granularity, prompts before decodes, parked
               rows ride along with any pass, prefill never preempted, no aging
  ls-only      the LS requests alone, no BE load: the floor for LS latency

``--backend real`` runs the built-in model (or ``--model DIR``) for real on this machine;
``--backend sim --profile NAME|PATH`` runs the same scheduler on a simulated executor calibrated
to e.g. Mixtral-8x7B on an A100. Writes JSON and PNG plots under ``experiments/results/`` and
prints the "paper vs ours" table.

    python experiments/reproduce_paper.py --backend real --quick          # make demo
    python experiments/reproduce_paper.py --backend sim --profile mixtral-a100-paper --lengths paper
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from qllm_jax.scheduler.core import PRESETS

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

ARMS: dict[str, dict] = {
    "fcfs": dict(policy="fcfs"),
    "priority": dict(policy="priority"),
    "qllm-layer": dict(policy="qllm", granularity="layer", aging_s=None, max_park_s=None),
    "qllm-expert": dict(policy="qllm", granularity="expert", aging_s=None, max_park_s=None),
    "qllm-aging": dict(policy="qllm", granularity="expert", aging_s=10.0, max_park_s=5.0),
    "qllm-mix": dict(
        policy="qllm", granularity="expert", aging_s=None, max_park_s=None, mix_classes=True
    ),
    # the reference code's behaviour (scheduler.core.PRESETS["paper"])
    "qllm-paper": dict(PRESETS["paper"]),
    # same engine and knobs as qllm-expert, fed only the LS requests
    "ls-only": dict(policy="qllm", granularity="expert", aging_s=None, max_park_s=None),
}
PAPER = {  # the paper's headline numbers (QLLM vs its FCFS baseline)
    "ls_ttft_reduction_mean": 65.5,
    "slo_max_rate": 7.0,
    "ls_turnaround_reduction_max": 12.8,
    "throughput_ratio": 1.0,
}


# ----------------------------------------------------------------------------------------------
# Workload


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


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    mu = math.log(mean) - sigma**2 / 2  # so that the distribution's mean is `mean`
    return rng.lognormvariate(mu, sigma)


def sharegpt_lengths(path: str, tokenizer=None, limit: int = 20_000) -> tuple[tuple[int, int], ...]:
    """(prompt, output) token lengths of the first human/gpt turns of a ShareGPT JSON. Without
    a tokenizer, 4 characters count as a token."""
    data = json.loads(Path(path).read_text())
    pairs = []
    for conv in data[:limit]:
        turns = conv.get("conversations") or conv.get("items") or []
        human = next((t["value"] for t in turns if t.get("from") in ("human", "user")), None)
        gpt = next((t["value"] for t in turns if t.get("from") in ("gpt", "assistant")), None)
        if not human or not gpt:
            continue
        if tokenizer is not None:
            pairs.append((len(tokenizer.encode(human)), len(tokenizer.encode(gpt))))
        else:
            pairs.append((max(1, len(human) // 4), max(1, len(gpt) // 4)))
    if not pairs:
        raise ValueError(f"no human/gpt turn pairs in {path}")
    return tuple(pairs)


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


# ----------------------------------------------------------------------------------------------
# Backends: each runs one arm on one workload and returns its requests' metrics records


def run_real(model, arm: str, items: list[Item], engine_kw: dict, seed: int):
    import numpy as np

    import qllm_jax

    engine = qllm_jax.Engine(model, **ARMS[arm], **engine_kw)
    rng = np.random.default_rng(seed)
    vocab = engine.model.config.vocab_size
    pending = [it for it in items if arm != "ls-only" or it.priority == 0]
    prompts = {it.request_id: rng.integers(3, vocab, it.prompt_len).tolist() for it in pending}
    t0, i, done = time.monotonic(), 0, {}
    while i < len(pending) or engine.has_unfinished():
        now = time.monotonic() - t0
        while i < len(pending) and pending[i].arrival <= now:
            it = pending[i]
            sp = qllm_jax.SamplingParams(max_tokens=it.output_len, temperature=0, ignore_eos=True)
            engine.add_request(
                prompts[it.request_id], sp, it.priority, t0 + it.arrival, it.request_id
            )
            i += 1
        if engine.has_unfinished():
            done |= {out.request_id: out for out in engine.step() if out.finished}
        elif i < len(pending):
            time.sleep(min(pending[i].arrival - now, 0.05))
    return [_record(out) for out in done.values()], engine.stats()


def _record(out):
    from qllm_jax.scheduler.metrics import RequestRecord

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


def run_sim(profile, arm: str, items: list[Item], sim_kw: dict):
    from qllm_jax.scheduler import Scheduler, SchedulerConfig, segment_layout
    from qllm_jax.scheduler.plan import default_group_size
    from qllm_jax.scheduler.simulator import Simulator, VirtualClock, make_request

    knobs = ARMS[arm]
    layers, experts = sim_kw["num_layers"], sim_kw["num_experts"]
    group = default_group_size(experts, knobs.get("granularity", "expert"))
    segments = segment_layout(layers, experts, group, False)
    clock = VirtualClock()
    config = SchedulerConfig(
        page_size=16,
        num_pages=sim_kw.get("num_pages", 1 << 20),
        max_model_len=1 << 16,
        max_batch_size=sim_kw["max_batch_size"],
        max_num_batched_tokens=sim_kw["max_num_batched_tokens"],
        prefill_chunk=sim_kw.get("prefill_chunk"),
        **knobs,
    )
    sched = Scheduler(config, segments, clock=clock)
    pending = [it for it in items if arm != "ls-only" or it.priority == 0]
    events = [
        (
            it.arrival,
            make_request(it.request_id, n, it.prompt_len, it.output_len, it.priority, it.arrival),
        )
        for n, it in enumerate(pending)
    ]
    result = Simulator(sched, profile, clock).run(events)
    return list(result.records.values()), result.stats


# ----------------------------------------------------------------------------------------------
# Summaries, the table, the plots


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def max_rate_meeting_slo(rows: dict[float, dict], arm: str, target: float) -> float | None:
    ok = [r for r, s in rows.items() if s[arm]["ls"]["slo_attainment"] >= target]
    return max(ok) if ok else None


def paper_table(results: dict[float, dict], slo_target: float) -> list[list[str]]:
    """Rows: metric | paper | ours (qllm-paper, qllm-layer, qllm-expert vs fcfs) |
    priority vs fcfs (the baseline the paper lacks) | qllm-expert vs priority."""
    arms = next(iter(results.values())).keys()

    def ttft_reduction(a: str, b: str) -> float:
        vals = [
            _ratio(s[b]["ls"]["ttft"]["mean"], s[a]["ls"]["ttft"]["mean"]) for s in results.values()
        ]
        vals = [v for v in vals if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    def turnaround_reduction(a: str, b: str) -> float:
        vals = [
            _ratio(s[b]["ls"]["turnaround"]["mean"], s[a]["ls"]["turnaround"]["mean"])
            for s in results.values()
        ]
        return max((v for v in vals if not math.isnan(v)), default=math.nan)

    def tput(a: str, b: str) -> float:
        vals = [
            _ratio(s[a]["total_tokens_per_s"], s[b]["total_tokens_per_s"]) for s in results.values()
        ]
        vals = [v for v in vals if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    def slo(a: str) -> str:
        r = max_rate_meeting_slo(results, a, slo_target)
        return "none" if r is None else f"{r:g} req/s"

    pairs = [
        ("qllm-paper", "fcfs"),
        ("qllm-layer", "fcfs"),
        ("qllm-expert", "fcfs"),
        ("priority", "fcfs"),
        ("qllm-expert", "priority"),
    ]
    pairs = [(a, b) for a, b in pairs if a in arms and b in arms]
    header = ["metric", "paper (QLLM vs FCFS)", *[f"{a} vs {b}" for a, b in pairs]]
    rows = [
        [
            "mean LS TTFT reduction (avg over rates)",
            f"{PAPER['ls_ttft_reduction_mean']}x",
            *[f"{ttft_reduction(a, b):.1f}x" for a, b in pairs],
        ],
        [
            "LS TTFT SLO met up to",
            f"{PAPER['slo_max_rate']:g} req/s (FCFS: none)",
            *[f"{slo(a)} (vs {slo(b)})" for a, b in pairs],
        ],
        [
            "LS turnaround reduction (max over rates)",
            f"{PAPER['ls_turnaround_reduction_max']}x",
            *[f"{turnaround_reduction(a, b):.1f}x" for a, b in pairs],
        ],
        [
            "total throughput ratio (avg over rates)",
            "about 1.0",
            *[f"{tput(a, b):.2f}" for a, b in pairs],
        ],
    ]
    return [header, *rows]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: dict[float, dict], slo: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted(results)
    arms = list(next(iter(results.values())).keys())
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))

    def series(arm, f):
        return [f(results[r][arm]) for r in rates]

    for i, arm in enumerate(arms):
        c = dict(color=f"C{i}")
        ax[0, 0].plot(rates, series(arm, lambda s: s["ls"]["ttft"]["mean"]), "o-", label=arm, **c)
        ax[0, 0].plot(rates, series(arm, lambda s: s["ls"]["ttft"]["p90"]), "x--", alpha=0.6, **c)
        ax[0, 1].plot(rates, series(arm, lambda s: s["ls"]["slo_attainment"]), "o-", label=arm, **c)
        ax[1, 0].plot(
            rates, series(arm, lambda s: s["ls"]["turnaround"]["mean"]), "o-", label=arm, **c
        )
        if arm != "ls-only":
            be_turn = series(arm, lambda s: s["be"]["turnaround"]["mean"])
            ax[1, 0].plot(rates, be_turn, "x--", alpha=0.6, **c)
            ax[1, 1].plot(
                rates, series(arm, lambda s: s["total_tokens_per_s"]), "o-", label=arm, **c
            )
            be_tput = series(arm, lambda s: s["be"]["output_tokens_per_s"])
            ax[1, 1].plot(rates, be_tput, "x--", alpha=0.6, **c)
    ax[0, 0].axhline(slo, color="k", ls=":", label=f"SLO {slo:g}s")
    ax[0, 0].set(yscale="log", title="LS TTFT (o mean, x p90)", xlabel="req/s", ylabel="s")
    ax[0, 1].set(title=f"LS SLO attainment (TTFT <= {slo:g}s)", xlabel="req/s", ylim=(-0.05, 1.05))
    ax[1, 0].set(
        yscale="log", title="turnaround (o LS mean, x BE mean)", xlabel="req/s", ylabel="s"
    )
    ax[1, 1].set(title="throughput (o total tokens/s, x BE output tokens/s)", xlabel="req/s")
    for a in ax.flat:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--backend", choices=["real", "sim"], default="sim")
    ap.add_argument(
        "--profile", default="mixtral-a100-paper", help="sim: profile name or JSON path"
    )
    ap.add_argument(
        "--model",
        help="real: HF checkpoint dir (default: the built-in model), or random:PRESET for "
        "random weights initialised on the device (random:mixtral-8x7b fits an H200 in bf16; "
        "random:mixtral-8x7b-16l an 80 GB card)",
    )
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    ap.add_argument("--rates", type=float, nargs="+", help="request rates (req/s)")
    ap.add_argument("--num-requests", type=int, help="requests per rate")
    ap.add_argument("--ls-fraction", type=float, default=0.2)
    ap.add_argument("--slo", type=float, default=3.0, help="LS TTFT SLO in seconds")
    ap.add_argument("--slo-target", type=float, default=0.9, help="attainment that counts as met")
    ap.add_argument("--lengths", choices=["sharegpt", "paper"], default="sharegpt")
    ap.add_argument("--prompt-mean", type=float)
    ap.add_argument("--output-mean", type=float)
    ap.add_argument("--sharegpt", help="a local ShareGPT JSON to draw lengths from")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all (--quick: 5)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument(
        "--prefill-chunk", type=int, help="prompt tokens per pass (default: the row budget)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a short run (what make demo uses)")
    ap.add_argument("--out", help="output name stem (default reproduce-<backend>-<profile|model>)")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where JSON and PNG go")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    real = args.backend == "real"
    quick = args.quick
    if not args.arms:
        quick_arms = ["fcfs", "priority", "qllm-layer", "qllm-expert", "ls-only"]
        args.arms = quick_arms if quick else list(ARMS)
    rates = args.rates or (
        [1.0, 2.0]
        if real and quick
        else [0.5, 1, 2, 3]
        if real
        else [1, 2, 4, 7, 10]
        if quick
        else list(range(1, 11))
    )
    num = args.num_requests or (16 if real and quick else 40 if real else 60 if quick else 300)
    lengths = Lengths(fixed_output=39 if args.lengths == "paper" else None)
    if real:  # the built-in model on 2 CPU cores: shorter requests
        lengths = dataclasses.replace(
            lengths, prompt_mean=64, output_mean=24, sigma=0.6, prompt_max=256, output_max=64
        )
    if args.prompt_mean or args.output_mean:
        lengths = dataclasses.replace(
            lengths,
            prompt_mean=args.prompt_mean or lengths.prompt_mean,
            output_mean=args.output_mean or lengths.output_mean,
        )

    from qllm_jax.scheduler.metrics import summarize

    if real:
        import jax

        import qllm_jax

        model_dir = args.model or str(qllm_jax.builtin_model_dir())
        if model_dir.startswith("random:"):  # e.g. random:mixtral-8x7b, initialised on device
            dtype = "bfloat16" if args.dtype == "auto" else args.dtype
            model = qllm_jax.random_model(model_dir.removeprefix("random:"), dtype, args.seed)
        else:
            model = qllm_jax.load(model_dir, dtype=args.dtype)
        if args.sharegpt:
            lengths = dataclasses.replace(
                lengths, pairs=sharegpt_lengths(args.sharegpt, model.tokenizer)
            )
        engine_kw = dict(
            max_batch_size=args.batch_size,
            max_num_batched_tokens=args.max_num_batched_tokens,
            # On a CPU a 512-token prefill segment takes hundreds of ms; short chunks keep
            # segments, and so the wait for a preemption point, short.
            prefill_chunk=args.prefill_chunk or (64 if jax.default_backend() == "cpu" else None),
        )
        label = f"real-{jax.devices()[0].platform}-{Path(model_dir).name}"
        warm = make_workload(4.0, 12, 0.5, lengths, args.seed + 99)
        for arm in tqdm(["priority", "qllm-layer", "qllm-expert"], desc="warm-up (compiling)"):
            if arm in ARMS:
                run_real(model, arm, warm, engine_kw, args.seed)
        run = lambda arm, items: run_real(model, arm, items, engine_kw, args.seed)  # noqa: E731
        device = str(jax.devices()[0].device_kind)
    else:
        from qllm_jax.scheduler.simulator import load_profile

        profile = load_profile(args.profile)
        if args.sharegpt:
            lengths = dataclasses.replace(lengths, pairs=sharegpt_lengths(args.sharegpt))
        meta = PROFILE_SHAPES.get(profile.name, PROFILE_SHAPES["mixtral"])
        sim_kw = dict(
            meta,
            max_batch_size=args.batch_size,
            max_num_batched_tokens=args.max_num_batched_tokens,
            prefill_chunk=args.prefill_chunk,
        )
        label = f"sim-{profile.name}"
        run = lambda arm, items: run_sim(profile, arm, items, sim_kw)  # noqa: E731
        device = f"simulated: {profile.name}"

    results: dict[float, dict] = {}
    stats: dict[float, dict] = {}
    with tqdm(total=len(rates) * len(args.arms), desc="runs") as bar:
        for rate in rates:
            items = make_workload(rate, num, args.ls_fraction, lengths, args.seed)
            results[rate], stats[rate] = {}, {}
            for arm in args.arms:
                requests, st = run(arm, items)
                results[rate][arm] = summarize(requests, args.slo)
                stats[rate][arm] = st
                bar.update(1)
    table = paper_table(results, args.slo_target)
    stem = args.out or f"reproduce-{label}{'-quick' if quick else ''}"
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "backend": args.backend,
        "device": device,
        "args": vars(args),
        "lengths": dataclasses.asdict(lengths) | {"pairs": len(lengths.pairs)},
        "rates": rates,
        "requests_per_rate": num,
        "results": {str(r): v for r, v in results.items()},
        "engine_stats": {str(r): v for r, v in stats.items()},
        "paper_vs_ours": table,
    }
    json_path = results_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    png_path = results_dir / f"{stem}.png"
    plot(results, args.slo, png_path, f"{label}: {num} requests/rate, {args.ls_fraction:.0%} LS")
    print()
    print(format_table(table))
    print()
    print(per_rate_table(results))
    print(f"\nJSON: {json_path}\nplots: {png_path}")
    return report


def per_rate_table(results: dict[float, dict]) -> str:
    rows = [
        [
            "rate",
            "arm",
            "LS TTFT p50",
            "LS TTFT p90",
            "LS SLO",
            "LS turnaround",
            "BE tok/s",
            "total tok/s",
        ]
    ]
    for rate in sorted(results):
        for arm, s in results[rate].items():
            rows.append(
                [
                    f"{rate:g}",
                    arm,
                    f"{s['ls']['ttft']['p50']:.3f}",
                    f"{s['ls']['ttft']['p90']:.3f}",
                    f"{s['ls']['slo_attainment']:.2f}",
                    f"{s['ls']['turnaround']['mean']:.2f}",
                    f"{s['be']['output_tokens_per_s']:.1f}",
                    f"{s['total_tokens_per_s']:.1f}",
                ]
            )
    return format_table(rows)


# Model shape of each simulated profile (what the segment schedule is built from).
PROFILE_SHAPES = {
    "mixtral": dict(num_layers=32, num_experts=8),
    "builtin-cpu": dict(num_layers=4, num_experts=8),
}


if __name__ == "__main__":
    main(sys.argv[1:])
