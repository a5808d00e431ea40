"""Where BE throughput goes on the demo's backlog: engine time by the classes a pass carries.

The backlog of ``reproduce_paper.py`` (4000 BE prompts standing, LS arrivals over
``--duration``), run for real for each arm, ``--repeats`` rounds with the arms interleaved.
Every step's wall time (schedule + execute + update) is charged to the classes of its plan's
rows: ``LS`` (a pass of LS rows only), ``BE``, ``mixed``. A pass of a few LS rows costs
nearly what a 512-row BE pass costs in weight reads, segment calls and the head, so the share
of time in LS-only passes is BE throughput lost against ``priority``, whose fused passes carry
LS rows inside BE batches. Also per arm: BE tokens/s against ``priority`` in the same round,
LS TTFT p90, preemptions, splits, absorbed passes, rows per pass. ``--options`` adds variants
of an arm that change one knob, e.g. ``--options 'qllm-expert:nomix={"mix_decodes": false}'``.

    python experiments/backlog_attribution.py --duration 20 --ls-rate 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import harness as h
from harness import Lengths, make_backlog

RESULTS = Path(__file__).resolve().parent / "results"
# the demo's lengths (reproduce_paper.run_backlog)
LS_LEN = Lengths(prompt_mean=48, output_mean=12, sigma=0.5, prompt_max=128, output_max=32)
BE_LEN = Lengths(prompt_mean=160, output_mean=8, sigma=0.4, prompt_max=256, output_max=16)
CLASSES = {(): "none", (False,): "LS", (True,): "BE", (False, True): "mixed"}


def timed_steps(engine, log: list) -> None:
    """Wrap ``engine``'s step so each plan that runs logs (classes, rows, finishes, seconds)."""
    step, schedule = engine.step, engine.scheduler.schedule
    box = {}

    def schedule_and_keep():
        box["plan"] = plan = schedule()
        return plan

    def timed_step():
        t = time.perf_counter()
        box["plan"] = None
        outs = step()
        plan = box["plan"]
        if plan is not None and plan.runs:
            rows = {False: 0, True: 0}
            for c in plan.chunks:
                req = engine.scheduler.seqs.get(c.seq_id)
                if req is not None:
                    rows[req.priority > 0] += c.num_tokens
            kinds = tuple(k for k in (False, True) if rows[k])
            log.append((CLASSES[kinds], rows, plan.finishes, time.perf_counter() - t))
        return outs

    engine.scheduler.schedule = schedule_and_keep
    engine.step = timed_step


def by_class(log: list, window: float) -> dict:
    out = {}
    for kind, rows, finishes, dt in log:
        e = out.setdefault(kind, dict(time_s=0.0, plans=0, passes=0, ls_rows=0, be_rows=0))
        e["time_s"] += dt
        e["plans"] += 1
        if finishes:  # a pass's rows once, at its last plan
            e["passes"] += 1
            e["ls_rows"] += rows[False]
            e["be_rows"] += rows[True]
    for e in out.values():
        e["time_share"] = e["time_s"] / window
        e["ms_per_pass"] = 1000 * e["time_s"] / e["passes"] if e["passes"] else None
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arms", nargs="+", default=["priority", "qllm-nopreempt", "qllm-expert"])
    ap.add_argument("--options", nargs="*", default=[], help="NAME:VARIANT=JSON knobs")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of LS arrivals")
    ap.add_argument("--ls-rate", type=float, default=2.0, help="LS arrivals per second")
    ap.add_argument("--repeats", type=int, default=3, help="rounds, arms interleaved")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "backlog-attribution.json"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import qllm_jax

    args = parse_args(argv)
    variants = {}
    for spec in args.options:
        name, _, knobs = spec.partition("=")
        if ":" not in name or name.split(":")[0] not in h.ARMS:
            raise SystemExit(f"--options: want ARM:VARIANT=JSON with a known arm, got {spec!r}")
        variants[name] = json.loads(knobs)
    arms = args.arms + [v for v in variants if v not in args.arms]
    if "priority" not in arms:
        raise SystemExit("--arms must include priority (the ratios are against it)")
    items = make_backlog(args.duration, args.ls_rate, 4000, LS_LEN, BE_LEN, args.seed)
    model = qllm_jax.load(str(qllm_jax.builtin_model_dir()))
    base = dict(max_batch_size=32, max_num_batched_tokens=512, prefill_chunk=None)
    rounds = []
    for rep in range(args.repeats):
        row = {}
        for arm in arms:
            log: list = []
            r = h.run_real(
                model,
                arm.split(":")[0],
                items,
                base,
                args.seed,
                until=args.duration,
                options=variants.get(arm),
                observe=lambda e, log=log: timed_steps(e, log),
            )
            s = h.summarize_run(r, 3.0, args.seed)
            st = r.stats
            row[arm] = dict(
                be_tokens_per_s=s["be_tokens_per_s"],
                ls_ttft_p90=s["ls"]["ttft"]["p90"],
                ls_requests=sum(rec.priority == 0 for rec in r.records),
                valid=r.valid,
                window_s=r.window[1],
                preemptions=st["preemptions_layer"] + st["preemptions_expert"],
                splits=st["splits"],
                absorbed_passes=st["absorbed_passes"],
                be_turns=st["be_turns"],
                by_class=by_class(log, r.window[1]),
            )
            print(f"round {rep} {arm}: {json.dumps(row[arm], default=round)}", flush=True)
        for arm in arms:
            row[arm]["be_vs_priority"] = (
                row[arm]["be_tokens_per_s"] / row["priority"]["be_tokens_per_s"]
            )
        rounds.append(row)
    summary = {}
    for arm in arms:
        ratio = [r[arm]["be_vs_priority"] for r in rounds]
        p90 = [r[arm]["ls_ttft_p90"] for r in rounds]
        ls_only = [r[arm]["by_class"].get("LS", {}).get("time_share", 0.0) for r in rounds]
        summary[arm] = dict(
            be_vs_priority=dict(min=min(ratio), median=statistics.median(ratio), max=max(ratio)),
            ls_ttft_p90=dict(min=min(p90), median=statistics.median(p90), max=max(p90)),
            ls_only_time_share=dict(median=statistics.median(ls_only)),
        )
        print(
            f"{arm:24s} BE vs priority {min(ratio):.2f}/{statistics.median(ratio):.2f}/"
            f"{max(ratio):.2f}  LS p90 {min(p90):.3f}/{statistics.median(p90):.3f}/"
            f"{max(p90):.3f} s  time in LS-only passes {statistics.median(ls_only):.0%}"
        )
    report = dict(
        args=vars(args),
        machine=dict(cpus=os.cpu_count(), load_average=os.getloadavg()),
        summary=summary,
        rounds=rounds,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {args.out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
