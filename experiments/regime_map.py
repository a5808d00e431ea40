"""The regime map: where does in-pass preemption beat iteration-level priority, and what does
it cost?

A standing backlog of BE prompts (their length sets how long a BE pass runs: the prefill chunk,
swept from 64 to 2048 tokens, prompts up to 4k) with LS requests arriving over a window, for
``priority``, ``qllm-layer`` and ``qllm-expert``, against the LS-alone floor (``ls-only``), at a
few LS loads and batch sizes. For each point: LS TTFT p90 over the floor, and BE tokens/s
against priority's. The simulator (``--profile``, default the measured ``builtin-cpu``) covers
the whole grid with ``--seeds`` seeds; ``--real`` also runs the built-in model for real at a few
points, and the JSON puts the two side by side. One plot shows the crossover.

Target (the evidence issue): where BE passes are long, qllm LS TTFT p90 <= 1.25x the floor while
priority's is >= 3x, with BE tokens/s >= 0.95x priority's. The printed summary says where that
holds and where it does not.

    python experiments/regime_map.py                      # sim grid (~5 min on 2 cores)
    python experiments/regime_map.py --real               # plus real CPU points (~10 min more)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import harness as h
from harness import Lengths, make_backlog
from tqdm.auto import tqdm

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ["priority", "qllm-layer", "qllm-expert", "ls-only"]
LS_LEN = Lengths(prompt_mean=48, output_mean=12, sigma=0.5, prompt_max=128, output_max=32)
SHAPES = {"builtin-cpu": dict(num_layers=4, num_experts=8)}


def be_lengths(chunk: int) -> Lengths:
    """BE prompts about one chunk long (so a BE pass is a chunk), up to 4k tokens, short
    outputs: prefill-heavy best-effort work."""
    return Lengths(
        prompt_mean=chunk * 0.9,
        output_mean=8,
        sigma=0.3,
        prompt_max=min(4096, chunk),
        output_max=16,
    )


def point(run, chunk: int, batch: int, ls_rate: float, duration: float, seed: int) -> dict:
    """All arms at one grid point: their summaries and the two ratios."""
    items = make_backlog(duration, ls_rate, 3000, LS_LEN, be_lengths(chunk), seed)
    base = dict(max_batch_size=batch, max_num_batched_tokens=max(chunk, batch), prefill_chunk=chunk)
    out = {}
    for arm in ARMS:
        r = run(arm, items, base, seed, duration)
        out[arm] = h.summarize_run(r, slo=3.0, seed=seed)
    floor = out["ls-only"]["ls"]["ttft"]["p90"]
    ref_be = out["priority"]["be_tokens_per_s"]
    return {
        arm: {
            "ls_p90_s": s["ls"]["ttft"]["p90"],
            "ls_p90_ci": s["ls"]["ttft"]["p90_ci"],
            "ls_p90_over_floor": h.ratio(s["ls"]["ttft"]["p90"], floor),
            "be_tokens_per_s": s["be_tokens_per_s"],
            "be_over_priority": h.ratio(s["be_tokens_per_s"], ref_be),
            "preemptions": s["attribution"]["preemptions"],
            "valid": s["valid"],
            "ls_count": s["ls"]["count"],
        }
        for arm, s in out.items()
    }


def sim_runner(profile):
    def run(arm, items, base, seed, until):
        kw = dict(SHAPES.get(profile.name, SHAPES["builtin-cpu"]), **base)
        return h.run_sim(profile, arm, items, kw, until)

    return run


def real_runner(model):
    def run(arm, items, base, seed, until):
        return h.run_real(model, arm, items, base, seed, until)

    return run


def holds(p: dict) -> dict:
    """The target at one point, for each qllm arm (never on a run that compiled inside its
    window)."""
    out = {}
    valid = p["priority"]["valid"] and p["ls-only"]["valid"]
    for arm in ("qllm-layer", "qllm-expert"):
        out[arm] = (
            valid
            and p[arm]["valid"]
            and p[arm]["ls_p90_over_floor"] <= 1.25
            and p["priority"]["ls_p90_over_floor"] >= 3
            and p[arm]["be_over_priority"] >= 0.95
        )
    return out


def median_over_seeds(points: list[dict]) -> dict:
    keys = ("ls_p90_over_floor", "be_over_priority", "ls_p90_s", "be_tokens_per_s")
    out = {}
    for arm in points[0]:
        out[arm] = {k: statistics.median(p[arm][k] for p in points) for k in keys}
        out[arm]["spread"] = {
            k: [min(p[arm][k] for p in points), max(p[arm][k] for p in points)] for k in keys
        }
        out[arm]["preemptions"] = sum(p[arm]["preemptions"] for p in points)
        out[arm]["valid"] = all(p[arm]["valid"] for p in points)
    return out


def plot(grid: list[dict], real: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(g["batch"], g["ls_rate"]) for g in grid})
    fig, ax = plt.subplots(2, len(combos), figsize=(4 * len(combos), 7), squeeze=False)
    for j, (batch, rate) in enumerate(combos):
        pts = sorted((g for g in grid if (g["batch"], g["ls_rate"]) == (batch, rate)),
                     key=lambda g: g["chunk"])  # fmt: skip
        xs = [g["chunk"] for g in pts]
        for i, arm in enumerate(("priority", "qllm-layer", "qllm-expert")):
            ax[0, j].plot(xs, [g["result"][arm]["ls_p90_over_floor"] for g in pts], "o-",
                          color=f"C{i}", label=f"{arm} (sim)")  # fmt: skip
            ax[1, j].plot(xs, [g["result"][arm]["be_over_priority"] for g in pts], "o-",
                          color=f"C{i}", label=f"{arm} (sim)")  # fmt: skip
            rp = sorted((r for r in real if (r["batch"], r["ls_rate"]) == (batch, rate)),
                        key=lambda r: r["chunk"])  # fmt: skip
            if rp:
                ax[0, j].plot([r["chunk"] for r in rp],
                              [r["result"][arm]["ls_p90_over_floor"] for r in rp], "s--",
                              color=f"C{i}", alpha=0.6, label=f"{arm} (real)")  # fmt: skip
                ax[1, j].plot([r["chunk"] for r in rp],
                              [r["result"][arm]["be_over_priority"] for r in rp], "s--",
                              color=f"C{i}", alpha=0.6, label=f"{arm} (real)")  # fmt: skip
        ax[0, j].axhline(1.25, color="k", ls=":", lw=1)
        ax[0, j].axhline(3.0, color="r", ls=":", lw=1)
        xlabel = "BE pass length (prefill chunk, tokens)"
        ax[0, j].set(xscale="log", yscale="log", title=f"batch {batch}, LS {rate:g}/s",
                     xlabel=xlabel, ylabel="LS TTFT p90 / floor")  # fmt: skip
        ax[1, j].axhline(0.95, color="k", ls=":", lw=1)
        ax[1, j].set(xscale="log", xlabel=xlabel, ylabel="BE tokens/s / priority's")
        for a in ax[:, j]:
            a.grid(alpha=0.3)
            a.legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="builtin-cpu", help="simulator profile name or JSON")
    ap.add_argument("--chunks", type=int, nargs="+", default=[64, 256, 1024, 2048, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--ls-rates", type=float, nargs="+", default=[0.5, 2.0])
    ap.add_argument("--duration", type=float, default=120.0, help="sim: seconds of LS arrivals")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--real", action="store_true", help="also run real points on this machine")
    ap.add_argument("--real-chunks", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--real-duration", type=float, default=25.0)
    ap.add_argument("--out", default="regime-map")
    ap.add_argument("--results-dir", default=str(RESULTS))
    args = ap.parse_args(argv)

    from qllm_jax.scheduler.simulator import load_profile

    profile = load_profile(args.profile)
    run = sim_runner(profile)
    grid = []
    t0 = time.time()
    configs = [(c, b, r) for c in args.chunks for b in args.batches for r in args.ls_rates]
    for chunk, batch, rate in tqdm(configs, desc="sim grid"):
        pts = [point(run, chunk, batch, rate, args.duration, s) for s in range(args.seeds)]
        res = median_over_seeds(pts)
        grid.append({"chunk": chunk, "batch": batch, "ls_rate": rate, "result": res,
                     "target_holds": holds(res)})  # fmt: skip
    sim_s = time.time() - t0
    real_points = []
    if args.real:
        import qllm_jax

        model = qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")
        runner = real_runner(model)
        for chunk in tqdm(args.real_chunks, desc="real points"):
            batch, rate = 32, min(args.ls_rates)
            res = point(runner, chunk, batch, rate, args.real_duration, 0)
            sim = next((g["result"] for g in grid if (g["chunk"], g["batch"], g["ls_rate"])
                        == (chunk, batch, rate)), None)  # fmt: skip
            real_points.append({"chunk": chunk, "batch": batch, "ls_rate": rate, "result": res,
                                "target_holds": holds(res), "sim_prediction": sim})  # fmt: skip
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "profile": profile.name,
        "args": vars(args),
        "sim_seconds": sim_s,
        "grid": grid,
        "real": real_points,
    }
    path = results_dir / f"{args.out}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = results_dir / f"{args.out}.png"
    plot(grid, real_points, png, f"regime map ({profile.name} sim; squares: real CPU runs)")
    print(summary_table(grid, real_points))
    print(f"\nJSON: {path}\nplot: {png}")
    return report


def summary_table(grid: list[dict], real: list[dict]) -> str:
    rows = [["source", "chunk", "batch", "LS/s", "priority p90/floor", "layer p90/floor",
             "expert p90/floor", "layer BE/prio", "expert BE/prio",
             "target (layer/expert)"]]  # fmt: skip
    for src, pts in (("sim", grid), ("real", real)):
        for g in pts:
            r = g["result"]
            rows.append([
                src, str(g["chunk"]), str(g["batch"]), f"{g['ls_rate']:g}",
                f"{r['priority']['ls_p90_over_floor']:.2f}",
                f"{r['qllm-layer']['ls_p90_over_floor']:.2f}",
                f"{r['qllm-expert']['ls_p90_over_floor']:.2f}",
                f"{r['qllm-layer']['be_over_priority']:.2f}",
                f"{r['qllm-expert']['be_over_priority']:.2f}",
                "/".join("yes" if v else "no" for v in g["target_holds"].values()),
            ])  # fmt: skip
    return h.format_table(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
