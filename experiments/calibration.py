"""How much the paper's headline ratio depends on one unmeasured constant and on run length.

The reference code's decode step time is uncertain: its README gives 1.25 s per step of 32 and
also 50 tokens/s at batch 16 (about 0.32 s a step). This script runs the paper's experiment in
the simulator at both (profiles ``mixtral-a100-paper`` and ``mixtral-a100-paper-fast``), prints
each profile's capacity in requests/s (a saturated run: every request at t=0), and measures the
headline ratio (mean LS TTFT of ``fcfs`` over that of ``qllm-paper``, averaged over the rates)
at several run lengths, with ``--seeds`` seeds. Ratios measured past capacity grow with run
length: the plot shows it.

    python experiments/calibration.py          # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import harness as h
from harness import Lengths, make_workload
from tqdm.auto import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
PROFILES = ("mixtral-a100-paper", "mixtral-a100-paper-fast")
SIM = dict(num_layers=32, num_experts=8, max_batch_size=32, max_num_batched_tokens=512,
           prefill_chunk=None)  # fmt: skip
LENGTHS = Lengths(fixed_output=39)  # the reference code's effective output length


def capacity(profile, seed: int, num: int = 300) -> float:
    """Requests/s a saturated engine completes (priority policy, the paper's lengths)."""
    items = [
        dataclasses.replace(it, arrival=0.0) for it in make_workload(1, num, 0.2, LENGTHS, seed)
    ]
    run = h.run_sim(profile, "priority", items, SIM)
    return num / max(r.finish for r in run.records)


def headline(profile, rates, num: int, seed: int) -> dict:
    """fcfs / qllm-paper mean LS TTFT per rate, and their average (the paper's 65.5x)."""
    per_rate = {}
    for rate in rates:
        items = make_workload(rate, num, 0.2, LENGTHS, seed)
        ttft = {}
        for arm in ("fcfs", "qllm-paper"):
            s = h.summarize_run(h.run_sim(profile, arm, items, SIM), slo=3.0, seed=seed)
            ttft[arm] = s["ls"]["ttft"]["mean"]
        per_rate[rate] = h.ratio(ttft["fcfs"], ttft["qllm-paper"])
    return {"per_rate": per_rate, "mean": statistics.mean(per_rate.values())}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="+", default=[1, 3, 5, 7, 10])
    ap.add_argument("--lengths", type=int, nargs="+", default=[100, 300, 600],
                    help="requests per run")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="calibration-paper-step-time")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    from qllm_jax.scheduler.simulator import load_profile

    report: dict = {"args": vars(args), "profiles": {}}
    total = len(PROFILES) * (1 + len(args.lengths) * args.seeds)
    with tqdm(total=total, desc="runs") as bar:
        for name in PROFILES:
            profile = load_profile(name)
            cap = capacity(profile, seed=0)
            bar.update(1)
            runs = {}
            for num in args.lengths:
                runs[num] = [headline(profile, args.rates, num, s) for s in range(args.seeds)]
                bar.update(args.seeds)
            report["profiles"][name] = {
                "capacity_req_per_s": cap,
                "headline_by_length": {
                    str(n): {
                        "median": statistics.median(r["mean"] for r in rs),
                        "min": min(r["mean"] for r in rs),
                        "max": max(r["mean"] for r in rs),
                        "seeds": rs,
                    }
                    for n, rs in runs.items()
                },
            }
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{args.out}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = results_dir / f"{args.out}.png"
    plot(report, args.lengths, png)
    rows = [["profile", "capacity req/s", *[f"ratio, {n} requests" for n in args.lengths]]]
    for name, p in report["profiles"].items():
        cells = []
        for n in args.lengths:
            x = p["headline_by_length"][str(n)]
            cells.append(f"{x['median']:.1f}x [{x['min']:.1f}-{x['max']:.1f}]")
        rows.append([name, f"{p['capacity_req_per_s']:.2f}", *cells])
    print(h.format_table(rows))
    print("(mean LS TTFT of fcfs over qllm-paper, averaged over the rates; paper: 65.5x)")
    print(f"\nJSON: {path}\nplot: {png}")
    return report


def plot(report: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, p) in enumerate(report["profiles"].items()):
        med = [p["headline_by_length"][str(n)]["median"] for n in lengths]
        lo = [p["headline_by_length"][str(n)]["min"] for n in lengths]
        hi = [p["headline_by_length"][str(n)]["max"] for n in lengths]
        label = f"{name} (capacity {p['capacity_req_per_s']:.2f} req/s)"
        ax.plot(lengths, med, "o-", color=f"C{i}", label=label)
        ax.fill_between(lengths, lo, hi, color=f"C{i}", alpha=0.2)
    ax.axhline(65.5, color="k", ls=":", label="paper: 65.5x")
    ax.set(xlabel="requests per run", ylabel="mean LS TTFT, fcfs / qllm-paper", yscale="log",
           title="headline ratio vs step time and run length")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
