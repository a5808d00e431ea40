"""Anti-starvation that never inverts the classes: what the default BE share costs LS, and what
it buys BE.

Two cases, each with the share on (the default: ``be_share=0.1``, ``be_starve_s=5``) and off,
for ``priority`` and ``qllm-expert``, plus ``qllm-aging`` (class-inverting aging, the previous
default) for contrast:

- ``be-overload``: a standing BE backlog, LS load well below capacity. The target: LS TTFT p90
  with the share within 1.25x of without it.
- ``ls-overload``: LS requests alone above capacity (``--ls-overload-rate``) for a third of
  ``--duration``, and a few BE requests. Without the share BE waits for the LS stream to end;
  with it, the longest BE wait stays bounded.

Simulated on ``--profile`` (default the measured ``builtin-cpu``), ``--seeds`` seeds.

    python experiments/starvation.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import harness as h
from harness import Item, Lengths, make_backlog

RESULTS = Path(__file__).resolve().parent / "results"
LS_LEN = Lengths(prompt_mean=48, output_mean=12, sigma=0.5, prompt_max=128, output_max=32)
BE_LEN = Lengths(prompt_mean=400, output_mean=8, sigma=0.3, prompt_max=512, output_max=16)
SIM = dict(num_layers=4, num_experts=8, max_batch_size=32, max_num_batched_tokens=512,
           prefill_chunk=None)  # fmt: skip
ARMS = {
    "priority": ("priority", {}),
    "priority-noshare": ("priority", {"be_share": None}),
    "qllm-expert": ("qllm-expert", {}),
    "qllm-expert-noshare": ("qllm-expert", {"be_share": None}),
    "qllm-aging": ("qllm-aging", {}),
}


def ls_overload(duration: float, ls_rate: float, seed: int) -> list[Item]:
    """LS arrivals at ``ls_rate`` for ``duration`` seconds, and 5 BE requests at t=1."""
    import random

    rng = random.Random(seed)
    items, t, i = [], 0.0, 0
    while t < duration:
        items.append(Item(f"ls{i}", t, *LS_LEN.sample(rng), 0))
        t, i = t + rng.expovariate(ls_rate), i + 1
    items += [Item(f"be{j}", 1.0, *BE_LEN.sample(rng), 1) for j in range(5)]
    return sorted(items, key=lambda it: it.arrival)


def run_case(profile, items, until, seed) -> dict:
    out = {}
    for name, (arm, extra) in ARMS.items():
        r = h.run_sim(profile, arm, items, SIM, until, options=extra)
        s = h.summarize_run(r, slo=3.0, seed=seed)
        be = [x for x in r.records if x.priority > 0]
        out[name] = {
            "ls_p90_s": s["ls"]["ttft"]["p90"],
            "ls_mean_s": s["ls"]["ttft"]["mean"],
            "be_tokens_per_s": s["be_tokens_per_s"],
            "be_finished": sum(x.finish is not None for x in be),
            "be_longest_wait_s": r.stats.get("be_longest_wait_s"),
            "be_turns": r.stats.get("be_turns", 0),
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="builtin-cpu")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--duration", type=float, default=120.0)
    ap.add_argument("--ls-overload-rate", type=float, default=250.0, help="LS req/s, case 2")
    ap.add_argument("--out", default="starvation")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    from qllm_jax.scheduler.simulator import load_profile

    profile = load_profile(args.profile)
    d = args.duration
    cases = {
        "be-overload": lambda s: (make_backlog(d, 1.0, 3000, LS_LEN, BE_LEN, s), d),
        "ls-overload": lambda s: (ls_overload(d / 3, args.ls_overload_rate, s), None),
    }
    report: dict = {"args": vars(args), "profile": profile.name, "cases": {}}
    for case, make in cases.items():
        seeds = []
        for s in range(args.seeds):
            items, until = make(s)
            seeds.append(run_case(profile, items, until, s))
        report["cases"][case] = {
            arm: {k: statistics.median(x[arm][k] for x in seeds) for k in seeds[0][arm]}
            for arm in ARMS
        } | {"seeds": seeds}
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{args.out}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    rows = [["case", "arm", "LS TTFT p90 s", "vs share off", "BE tok/s", "BE finished",
             "longest BE wait s", "BE turns"]]  # fmt: skip
    for case, res in report["cases"].items():
        for arm in ARMS:
            x = res[arm]
            off = res.get(f"{arm}-noshare") or res.get(arm.removesuffix("-noshare"))
            ref = off["ls_p90_s"] if not arm.endswith("-noshare") and arm != "qllm-aging" else None
            rows.append([
                case, arm, f"{x['ls_p90_s']:.4f}",
                f"{h.ratio(x['ls_p90_s'], ref):.2f}" if ref else "-",
                f"{x['be_tokens_per_s']:.1f}", f"{x['be_finished']:g}",
                f"{x['be_longest_wait_s']:.1f}", f"{x['be_turns']:g}",
            ])  # fmt: skip
    print(h.format_table(rows))
    print(f"\nJSON: {path}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
