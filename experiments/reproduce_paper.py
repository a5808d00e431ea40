"""The QLLM paper's headline experiment, re-run side by side with faithful baselines.

Two scenarios, on the real engine (``--backend real``: the built-in model, ``--model DIR`` or
``random:PRESET``) or the simulator (``--backend sim --profile NAME|PATH``):

- ``sweep`` (the paper's recipe): open-loop Poisson arrivals at rates λ, 20 % latency-sensitive
  (LS) chosen at random, ShareGPT-like lengths (``--lengths paper`` pins outputs at the reference
  code's 39 tokens; ``--sharegpt PATH`` reads a local ShareGPT JSON). The sim runs ``--seeds``
  seeds and reports their spread. "SLO met up to R" means every tested rate <= R meets it.
- ``backlog`` (what ``make demo`` runs): a standing backlog of best-effort (BE) prompts and LS
  requests arriving over ``--duration`` seconds, measured in that window: where in-pass
  preemption can matter, because BE passes are long and never stop coming.

Arms (``harness.ARMS``; all share one anti-starvation setting and prefill order, and order
requests by arrival inside a priority class, as the paper's code does):

  fcfs            the paper's baseline as its code runs it: decode-first, prefill batches of up to
                  batch_size whole prompts, no token budget, prompts and decodes never together
  fcfs-512        the same with the engine's 512-token budget (this project's old baseline)
  priority        iteration-level priority (LS rows first in every pass), the baseline the
                  paper lacks
  qllm-nopreempt  the qllm policy with in-pass preemption off: the ablation
  qllm-layer      preemption inside the pass, between layers
  qllm-expert     preemption between expert groups
  qllm-sjf        qllm-expert with the engine's default order inside a class: shortest
                  prefill first, aged after 5 s (the multi-level paper's request level)
  qllm-mix        qllm-expert whose passes top LS rows up with BE rows
  qllm-aging      qllm-expert with class-inverting aging and a park timeout instead of the share
  qllm-paper      the reference code's rules (its batch order, layer granularity, prefill never
                  preempted, parked rows ride along, no anti-starvation)
  ls-only         the LS requests alone on the best engine for them: the floor

Every real arm is warmed before its clock starts; compilations inside a measured window are
recorded and such a run is marked invalid. Tables give 95 % bootstrap intervals for LS TTFT
mean and p90 and BE tokens/s, and say how often preemption fired.

    python experiments/reproduce_paper.py --backend real --quick        # make demo (backlog)
    python experiments/reproduce_paper.py --backend sim --profile mixtral-a100-paper --lengths paper
    python experiments/reproduce_paper.py --backend sim --scenario backlog --profile builtin-cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

import harness as h
from harness import ARMS, Item, Lengths, make_backlog, make_workload  # noqa: F401 (API)
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

PAPER = {  # the paper's headline numbers (QLLM vs its FCFS baseline)
    "ls_ttft_reduction_mean": 65.5,
    "ls_ttft_reduction_max": 101.6,
    "slo_max_rate": 7.0,
    "ls_turnaround_reduction_max": 12.8,
    "throughput_ratio": 1.0,
}
PAIRS = [  # (ours, against) in the paper-vs-ours table
    ("qllm-paper", "fcfs"),
    ("qllm-layer", "fcfs"),
    ("qllm-expert", "fcfs"),
    ("priority", "fcfs"),
    ("qllm-expert", "priority"),
    ("qllm-expert", "qllm-nopreempt"),
]
# Model shape of each simulated profile (what the segment layout is built from).
PROFILE_SHAPES = {  # (names not listed: Mixtral's)
    "mixtral": dict(num_layers=32, num_experts=8),
    "builtin-cpu": dict(num_layers=4, num_experts=8),
}


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


# ----------------------------------------------------------------------------------------------
# Tables


def max_rate_meeting_slo(rows: dict[float, dict], arm: str, target: float) -> float | None:
    """The largest tested rate R such that every tested rate <= R meets the SLO target."""
    best = None
    for rate in sorted(rows):
        if rows[rate][arm]["ls"]["slo_attainment"] < target:
            break
        best = rate
    return best


def _ttft_ratios(results: dict[float, dict], a: str, b: str) -> list[float]:
    vals = [
        h.ratio(s[b]["ls"]["ttft"]["mean"], s[a]["ls"]["ttft"]["mean"]) for s in results.values()
    ]
    return [v for v in vals if not math.isnan(v)]


def sweep_metrics(results: dict[float, dict], a: str, b: str, target: float) -> dict:
    """The paper's headline metrics of arm ``a`` against ``b`` over one rate sweep."""
    ttft = _ttft_ratios(results, a, b)
    turn = [
        h.ratio(s[b]["ls"]["turnaround"]["mean"], s[a]["ls"]["turnaround"]["mean"])
        for s in results.values()
    ]
    tput = [
        h.ratio(s[a]["total_tokens_per_s"], s[b]["total_tokens_per_s"]) for s in results.values()
    ]
    turn = [v for v in turn if not math.isnan(v)]
    tput = [v for v in tput if not math.isnan(v)]
    return {
        "ttft_reduction_mean": sum(ttft) / len(ttft) if ttft else math.nan,
        "ttft_reduction_max": max(ttft, default=math.nan),
        "slo_up_to": max_rate_meeting_slo(results, a, target),
        "slo_up_to_baseline": max_rate_meeting_slo(results, b, target),
        "turnaround_reduction_max": max(turn, default=math.nan),
        "throughput_ratio": sum(tput) / len(tput) if tput else math.nan,
    }


def _spread(values: list[float], fmt: str) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    mid = statistics.median(vals)
    if len(vals) == 1 or min(vals) == max(vals):
        return format(mid, fmt)
    return f"{format(mid, fmt)} [{format(min(vals), fmt)}-{format(max(vals), fmt)}]"


def paper_table(per_seed: list[dict[float, dict]], target: float) -> list[list[str]]:
    """Rows: metric | paper | each pair of ``PAIRS`` present: the median over seeds [min-max]."""
    arms = next(iter(per_seed[0].values())).keys()
    pairs = [(a, b) for a, b in PAIRS if a in arms and b in arms]
    m = {(a, b): [sweep_metrics(res, a, b, target) for res in per_seed] for a, b in pairs}

    def slo(a, b):
        ours = [x["slo_up_to"] for x in m[(a, b)]]
        base = [x["slo_up_to_baseline"] for x in m[(a, b)]]
        txt = lambda v: "none" if v is None else f"{v:g}"  # noqa: E731
        return f"{'/'.join(txt(v) for v in ours)} (vs {'/'.join(txt(v) for v in base)}) req/s"

    header = ["metric", "paper (QLLM vs FCFS)", *[f"{a} vs {b}" for a, b in pairs]]
    col = lambda key, fmt: [_spread([x[key] for x in m[p]], fmt) + "x" for p in pairs]  # noqa: E731
    return [
        header,
        ["mean LS TTFT reduction (avg over rates)", "65.5x", *col("ttft_reduction_mean", ".1f")],
        ["max LS TTFT reduction (over rates)", "101.6x", *col("ttft_reduction_max", ".1f")],
        ["LS TTFT SLO met up to (each seed)", "7 req/s (FCFS: none)", *[slo(*p) for p in pairs]],
        ["LS turnaround reduction (max over rates)", "12.8x",
         *col("turnaround_reduction_max", ".1f")],
        ["total throughput ratio (avg over rates)", "about 1.0", *col("throughput_ratio", ".2f")],
    ]  # fmt: skip


def backlog_table(results: dict[str, dict]) -> list[list[str]]:
    """One row per arm of a backlog run: LS TTFT with intervals and against the LS-alone floor,
    BE tokens/s with its interval and against priority, and what the scheduler did."""
    floor = results.get("ls-only", {}).get("ls", {}).get("ttft", {}).get("p90", math.nan)
    be_ref = results.get("priority", {}).get("be_tokens_per_s", math.nan)
    rows = [[
        "arm", "LS TTFT mean [95% CI]", "LS TTFT p90 [95% CI]", "p90/floor", "LS TTFT max",
        "BE tok/s [95% CI]", "BE vs priority", "preemptions", "wait p50/p99 ms",
        "rows/pass LS/BE", "valid",
    ]]  # fmt: skip
    for arm, s in results.items():
        t, a = s["ls"]["ttft"], s["attribution"]
        wait = "-"
        if a["preemptions"]:
            p50, p99 = a["preempt_wait_s_p50"] or 0, a["preempt_wait_s_p99"] or 0
            wait = f"{p50 * 1e3:.1f}/{p99 * 1e3:.1f}"
        rows.append([
            arm,
            h.fmt_ci(t["mean"], t["mean_ci"]),
            h.fmt_ci(t["p90"], t["p90_ci"]),
            f"{h.ratio(t['p90'], floor):.2f}",
            f"{t['max']:.3f}",
            h.fmt_ci(s["be_tokens_per_s"], s["be_tokens_per_s_ci"], 1) if arm != "ls-only" else "-",
            f"{h.ratio(s['be_tokens_per_s'], be_ref):.2f}" if arm != "ls-only" else "-",
            str(a["preemptions"]) if a["preemptions"] else "none fired",
            wait,
            f"{a['rows_per_ls_pass']:.1f}/{a['rows_per_be_pass']:.1f}",
            "yes" if s["valid"] else f"NO ({s['compiles_in_window']} compiles)",
        ])  # fmt: skip
    return rows


BACKLOG_NOTE = (
    "(no ratio against fcfs here: fcfs serves the standing backlog before any LS request, so "
    "its LS TTFT is the time to drain the {n} BE requests queued ahead and any ratio against "
    "it measures the backlog's depth; the paper's comparison is the sweep scenario, e.g. "
    "--backend sim --profile mixtral-a100-paper --lengths paper, which make demo also runs)"
)


def backlog_pairs(results: dict[str, dict]) -> list[list[str]]:
    """The paper's metrics for the pairs of ``PAIRS`` that do not involve fcfs (see
    ``BACKLOG_NOTE``), on one backlog run."""
    pairs = [(a, b) for a, b in PAIRS if a in results and b in results and "fcfs" not in (a, b)]
    rows = [["metric", *[f"{a} vs {b}" for a, b in pairs]]]

    def red(key, a, b):
        return h.ratio(results[b]["ls"]["ttft"][key], results[a]["ls"]["ttft"][key])

    rows.append(["mean LS TTFT reduction", *[f"{red('mean', a, b):.1f}x" for a, b in pairs]])
    rows.append(["p90 LS TTFT reduction", *[f"{red('p90', a, b):.1f}x" for a, b in pairs]])
    rows.append(["max LS TTFT reduction", *[f"{red('max', a, b):.1f}x" for a, b in pairs]])
    turn = [
        h.ratio(results[b]["ls"]["turnaround"]["mean"], results[a]["ls"]["turnaround"]["mean"])
        for a, b in pairs
    ]
    rows.append(["LS turnaround reduction", *[f"{v:.1f}x" for v in turn]])
    be = [h.ratio(results[a]["be_tokens_per_s"], results[b]["be_tokens_per_s"]) for a, b in pairs]
    rows.append(["BE throughput ratio", *[f"{v:.2f}" for v in be]])
    return rows  # fmt: skip


def per_rate_table(results: dict[float, dict]) -> list[list[str]]:
    rows = [["rate", "arm", "LS TTFT p50", "LS TTFT p90 [95% CI]", "LS SLO", "LS turnaround",
             "BE tok/s", "preemptions", "valid"]]  # fmt: skip
    for rate in sorted(results):
        for arm, s in results[rate].items():
            rows.append([
                f"{rate:g}", arm, f"{s['ls']['ttft']['p50']:.3f}",
                h.fmt_ci(s["ls"]["ttft"]["p90"], s["ls"]["ttft"]["p90_ci"]),
                f"{s['ls']['slo_attainment']:.2f}", f"{s['ls']['turnaround']['mean']:.2f}",
                f"{s['be']['output_tokens_per_s']:.1f}",
                str(s["attribution"]["preemptions"] or "none fired"),
                "yes" if s["valid"] else "NO",
            ])  # fmt: skip
    return rows


def plot_sweep(results: dict[float, dict], slo: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted(results)
    arms = list(next(iter(results.values())).keys())
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))

    def series(arm, f):
        return [f(results[r][arm]) for r in rates]

    for i, arm in enumerate(arms):
        c = dict(color=f"C{i % 10}")
        ax[0, 0].plot(rates, series(arm, lambda s: s["ls"]["ttft"]["mean"]), "o-", label=arm, **c)
        ax[0, 0].plot(rates, series(arm, lambda s: s["ls"]["ttft"]["p90"]), "x--", alpha=0.6, **c)
        ax[0, 1].plot(rates, series(arm, lambda s: s["ls"]["slo_attainment"]), "o-", label=arm, **c)
        ax[1, 0].plot(
            rates, series(arm, lambda s: s["ls"]["turnaround"]["mean"]), "o-", label=arm, **c
        )
        if arm != "ls-only":
            ax[1, 0].plot(
                rates, series(arm, lambda s: s["be"]["turnaround"]["mean"]), "x--", alpha=0.6, **c
            )
            ax[1, 1].plot(
                rates, series(arm, lambda s: s["total_tokens_per_s"]), "o-", label=arm, **c
            )
            ax[1, 1].plot(
                rates, series(arm, lambda s: s["be"]["output_tokens_per_s"]), "x--", alpha=0.6, **c
            )
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
    plt.close(fig)  # fmt: skip


def plot_backlog(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(results)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, arm in enumerate(arms):
        t = results[arm]["ls"]["ttft"]
        for j, key in enumerate(("mean", "p90")):
            lo, hi = t[f"{key}_ci"]
            err = [[t[key] - lo], [hi - t[key]]] if not math.isnan(lo) else None
            ax[0].bar(
                i + 0.4 * j, t[key], 0.4, yerr=err, color=f"C{j}", label=key if i == 0 else None
            )
        if arm != "ls-only":
            lo, hi = results[arm]["be_tokens_per_s_ci"]
            v = results[arm]["be_tokens_per_s"]
            ax[1].bar(
                i, v, 0.6, yerr=[[v - lo], [hi - v]] if not math.isnan(lo) else None, color="C2"
            )
    for a in ax:
        a.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
        a.grid(alpha=0.3, axis="y")
    ax[0].set(yscale="log", ylabel="s", title="LS TTFT (mean, p90; 95% CI)")
    ax[0].legend()
    ax[1].set(ylabel="tokens/s", title="BE output tokens/s (95% CI)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # fmt: skip


# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--backend", choices=["real", "sim"], default="sim")
    ap.add_argument("--scenario", choices=["sweep", "backlog"], help="default: backlog for a "
                    "real --quick run (make demo), sweep otherwise")  # fmt: skip
    ap.add_argument("--profile", default="mixtral-a100-paper", help="sim: name or JSON path")
    ap.add_argument(
        "--model",
        help="real: HF checkpoint dir (default: the built-in model), or random:PRESET for "
        "random weights initialised on the device (random:mixtral-8x7b fits an H200 in bf16; "
        "random:mixtral-8x7b-16l an 80 GB card)",
    )
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16")
    ap.add_argument("--rates", type=float, nargs="+", help="sweep: request rates (req/s)")
    ap.add_argument("--num-requests", type=int, help="sweep: requests per rate")
    ap.add_argument("--seeds", type=int, help="sim: seeds per point (default 5; --quick 2)")
    ap.add_argument("--ls-fraction", type=float, default=0.2)
    ap.add_argument("--duration", type=float, help="backlog: seconds of LS arrivals")
    ap.add_argument("--ls-rate", type=float, help="backlog: LS arrivals per second")
    ap.add_argument("--slo", type=float, default=3.0, help="LS TTFT SLO in seconds")
    ap.add_argument("--slo-target", type=float, default=0.9, help="attainment that counts as met")
    ap.add_argument("--lengths", choices=["sharegpt", "paper"], default="sharegpt")
    ap.add_argument("--prompt-mean", type=float)
    ap.add_argument("--output-mean", type=float)
    ap.add_argument("--sharegpt", help="a local ShareGPT JSON to draw lengths from")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), help="default: all (--quick: 6)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument(
        "--prefill-chunk", type=int, help="prompt tokens per pass (default: the budget)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a short run (what make demo uses)")
    ap.add_argument("--out", help="output name stem (default reproduce-<backend>-<profile|model>)")
    ap.add_argument("--results-dir", default=str(RESULTS), help="where JSON and PNG go")
    return ap.parse_args(argv)  # fmt: skip


QUICK_ARMS = ["fcfs", "priority", "qllm-nopreempt", "qllm-layer", "qllm-expert", "ls-only"]
# the backlog leaves fcfs out by default (see BACKLOG_NOTE; --arms fcfs ... runs it: minutes)
BACKLOG_QUICK_ARMS = [a for a in QUICK_ARMS if a != "fcfs"]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    real = args.backend == "real"
    scenario = args.scenario or ("backlog" if real and args.quick else "sweep")
    quick_arms = BACKLOG_QUICK_ARMS if scenario == "backlog" else QUICK_ARMS
    args.arms = args.arms or (quick_arms if args.quick else list(ARMS))
    seeds = 1 if real else (args.seeds or (2 if args.quick else 5))
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
    base = dict(
        max_batch_size=args.batch_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_chunk=args.prefill_chunk,
    )
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
            pairs = sharegpt_lengths(args.sharegpt, model.tokenizer)
            lengths = dataclasses.replace(lengths, pairs=pairs)
        label = f"real-{jax.devices()[0].platform}-{Path(model_dir).name}"
        device = str(jax.devices()[0].device_kind)
        run = lambda arm, items, seed, until=None: h.run_real(model, arm, items, base, seed, until)  # noqa: E731
    else:
        from qllm_jax.scheduler.simulator import load_profile

        profile = load_profile(args.profile)
        if args.sharegpt:
            lengths = dataclasses.replace(lengths, pairs=sharegpt_lengths(args.sharegpt))
        sim_kw = dict(PROFILE_SHAPES.get(profile.name, PROFILE_SHAPES["mixtral"]), **base)
        label = f"sim-{profile.name}"
        device = f"simulated: {profile.name}"
        run = lambda arm, items, seed, until=None: h.run_sim(profile, arm, items, sim_kw, until)  # noqa: E731

    if scenario == "backlog":
        report = run_backlog(args, run, real, label, device)
    else:
        report = run_sweep(args, run, real, lengths, seeds, label, device)
    return report


MIN_LS_ARRIVALS = 30  # the backlog's LS sample: at least this many arrivals in the window


def run_backlog(args, run, real: bool, label: str, device: str) -> dict:
    """The demo: a standing BE backlog, >= 30 LS arrivals per arm, measured in one window."""
    duration = args.duration or (30.0 if real else 120.0)
    ls_rate = args.ls_rate or (1.2 if real else 1.0)
    ls_len = Lengths(prompt_mean=48, output_mean=12, sigma=0.5, prompt_max=128, output_max=32)
    be_len = Lengths(prompt_mean=160, output_mean=8, sigma=0.4, prompt_max=256, output_max=16)
    if args.prompt_mean:
        be_len = dataclasses.replace(be_len, prompt_mean=args.prompt_mean)
    be_count = 4000  # more than any arm finishes in the window: the backlog never drains
    ls_count = max(MIN_LS_ARRIVALS, round(ls_rate * duration))
    items = make_backlog(duration, ls_rate, be_count, ls_len, be_len, args.seed, ls_count)
    results = {}
    for arm in tqdm(args.arms, desc="arms"):
        r = run(arm, items, args.seed, until=duration)
        results[arm] = h.summarize_run(r, args.slo, args.seed)
        results[arm]["engine_stats"] = r.stats
    stem = args.out or f"reproduce-{label}-backlog{'-quick' if args.quick else ''}"
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    table, pairs = backlog_table(results), backlog_pairs(results)
    report = {
        "scenario": "backlog",
        "backend": args.backend,
        "device": device,
        "args": vars(args),
        "workload": {
            "duration_s": duration, "ls_rate": ls_rate,
            "ls_requests": sum(it.priority == 0 for it in items),
            "ls_lengths": dataclasses.asdict(ls_len), "be_lengths": dataclasses.asdict(be_len),
            "be_backlog": be_count,
        },
        "results": results,
        "table": table,
        "paper_vs_ours": pairs,
    }  # fmt: skip
    json_path = results_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = results_dir / f"{stem}.png"
    n_ls = report["workload"]["ls_requests"]
    plot_backlog(results, png, f"{label}: standing BE backlog, {n_ls} LS arrivals in {duration:g}s")
    print()
    print(h.format_table(table))
    print()
    print(h.format_table(pairs))
    print(BACKLOG_NOTE.format(n=be_count))
    invalid = [a for a, s in results.items() if not s["valid"]]
    if invalid:
        print(f"\nINVALID (compiled inside the measured window): {', '.join(invalid)}")
    print(f"\nJSON: {json_path}\nplots: {png}")
    return report


def run_sweep(args, run, real: bool, lengths: Lengths, seeds: int, label: str, device: str) -> dict:
    """The paper's recipe: a rate sweep, each point all arms, several seeds in simulation."""
    rates = args.rates or ([0.5, 1, 2] if real else [1, 2, 3, 4, 5, 6, 7, 8, 10])
    num = args.num_requests or (40 if real else 60 if args.quick else 300)
    per_seed: list[dict[float, dict]] = []
    with tqdm(total=seeds * len(rates) * len(args.arms), desc="runs") as bar:
        for k in range(seeds):
            seed = args.seed + k
            results: dict[float, dict] = {}
            for rate in rates:
                items = make_workload(rate, num, args.ls_fraction, lengths, seed)
                results[rate] = {}
                for arm in args.arms:
                    r = run(arm, items, seed)
                    results[rate][arm] = h.summarize_run(r, args.slo, seed)
                    bar.update(1)
            per_seed.append(results)
    table = paper_table(per_seed, args.slo_target)
    stem = args.out or f"reproduce-{label}{'-quick' if args.quick else ''}"
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "scenario": "sweep",
        "backend": args.backend,
        "device": device,
        "args": vars(args),
        "lengths": dataclasses.asdict(lengths) | {"pairs": len(lengths.pairs)},
        "rates": rates,
        "requests_per_rate": num,
        "seeds": [args.seed + k for k in range(seeds)],
        "results": {str(r): v for r, v in per_seed[0].items()},
        "results_by_seed": [{str(r): v for r, v in res.items()} for res in per_seed],
        "paper_vs_ours": table,
    }
    json_path = results_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = results_dir / f"{stem}.png"
    plot_sweep(
        per_seed[0],
        args.slo,
        png,
        f"{label}: {num} requests/rate, {args.ls_fraction:.0%} LS, seed {args.seed}",
    )
    print()
    print(h.format_table(table))
    print()
    print(h.format_table(per_rate_table(per_seed[0])))
    invalid = sorted(
        {f"{arm} at {rate:g} req/s" for res in per_seed for rate, arms in res.items()
         for arm, s in arms.items() if not s["valid"]}
    )  # fmt: skip
    if invalid:
        print(f"\nINVALID (compiled inside the measured window): {', '.join(invalid)}")
    print(f"\nJSON: {json_path}\nplots: {png}")
    return report  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
