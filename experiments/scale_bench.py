"""Decode step time and LS TTFT on 1, 2, 4 and 8 simulated CPU devices (expert / tensor mesh).

READ THIS FIRST: on a CPU the "devices" are XLA's simulated host devices
(``--xla_force_host_platform_device_count``), all sharing this machine's cores. Sharding cannot
make anything faster here; these numbers show what the mesh *costs* (collectives, per-device
dispatch, smaller per-device matmuls), not the speedup real accelerators would give.

One child process per mesh shape (the device count must be set before jax is imported), each on
the built-in model (Mixtral-shaped: 8 experts, 8 query / 2 KV heads, so tensor_parallel <= 2),
float32, every executable warmed before measuring:

Shapes run in turn, ``--rounds`` times over (the load of a shared machine drifts); each shape
reports the median over rounds of its per-round medians.

- ``decode``: a batch of ``--batch`` sequences decoding, fused (``priority``) and segmented at
  expert granularity (``qllm``): wall time per decode pass (between consecutive token steps),
  min / median / max over ``--decode-steps`` passes;
- ``demo``: the demo workload of ``reproduce_paper.py`` (a standing BE backlog, LS arrivals as
  a Poisson process), scaled down to ``--duration`` seconds and smaller prompts so that each
  shape's warm-up stays short, under the ``qllm-expert`` arm: LS TTFT mean / p90 / max, BE
  tokens/s. Compilations inside the measured window are counted (a run with any is invalid).

    nice -n 19 python experiments/scale_bench.py            # ~10-15 min on 2 loaded cores
    python experiments/scale_bench.py --shapes 1x1,8x1 --duration 5

Writes ``experiments/results/scale-bench-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
SHAPES = "1x1,2x1,4x1,8x1,4x2"  # expert_parallel x tensor_parallel
NOTE = (
    "Simulated CPU devices share one machine's cores: these numbers show the mesh's overhead "
    "(collectives, per-device dispatch, smaller matmuls), not a speedup."
)


def _stats(xs: list[float], scale: float = 1e3) -> dict:
    xs = sorted(xs)
    return {
        "min": xs[0] * scale,
        "median": statistics.median(xs) * scale,
        "max": xs[-1] * scale,
        "n": len(xs),
    }


# ----------------------------------------------------------------------------------------------
# The child: one mesh shape


def decode_times(model, ep: int, tp: int, policy: str, batch: int, steps: int) -> dict:
    """Wall time per decode pass of ``batch`` sequences (ms): the time between two steps
    that advanced the whole batch, prefill excluded."""
    import qllm_jax
    from qllm_jax import compile_log

    engine = qllm_jax.Engine(
        model,
        policy=policy,
        granularity="expert",
        expert_parallel=ep,
        tensor_parallel=tp,
        max_batch_size=batch,
        max_num_batched_tokens=32,  # prompts prefill in chunks: few row buckets to warm
        kv_pages=4 * batch + 8,
        page_size=16,
    )
    prompt_len = 16
    engine.warmup(max_rows=32, max_context=prompt_len + steps + 4)
    sp = qllm_jax.SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request([3 + (i * 7 + j) % 200 for j in range(prompt_len)], sp)
    marks, decoding = [], False
    with compile_log.Window() as w:
        while engine.has_unfinished():
            outs = engine.step()
            if len(outs) == batch and all(len(o.token_ids) >= 1 for o in outs):
                marks.append(time.perf_counter())
                decoding = True
            elif decoding and outs:
                break  # the batch started finishing
    passes = [b - a for a, b in zip(marks[1:], marks[2:])]  # after the first decode pass
    if not passes:
        raise ValueError(f"no whole-batch decode pass measured with --steps {steps}: raise it")
    return _stats(passes) | {"compiles": w.compiles}


def demo(model, ep: int, tp: int, duration: float, seed: int) -> dict:
    """The ``qllm-expert`` arm on the scaled demo backlog (see the module docstring)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import harness as h

    ls_len = h.Lengths(prompt_mean=24, output_mean=6, sigma=0.5, prompt_max=48, output_max=12)
    be_len = h.Lengths(prompt_mean=64, output_mean=6, sigma=0.4, prompt_max=96, output_max=8)
    items = h.make_backlog(duration, 1.2, 400, ls_len, be_len, seed)
    base = dict(max_batch_size=8, max_num_batched_tokens=32, prefill_chunk=32)
    options = dict(expert_parallel=ep, tensor_parallel=tp, kv_pages=64, page_size=16)
    run = h.run_real(model, "qllm-expert", items, base, seed, until=duration, options=options)
    summary = h.summarize_run(run, slo=1.0, seed=seed)
    ttft = summary["ls"]["ttft"]
    return {
        "ls_ttft_ms": {k: ttft[k] * 1e3 for k in ("mean", "p90", "max")},
        "ls_requests": summary["ls"]["count"],
        "be_tokens_per_s": summary["be"]["output_tokens_per_s"],
        "compiles_in_window": run.compiles,
        "valid": run.valid,
    }


def child(args) -> dict:
    import jax

    import qllm_jax

    ep, tp = args.ep, args.tp
    model = qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")
    out = {"expert_parallel": ep, "tensor_parallel": tp, "devices": len(jax.devices())}
    for policy in ("priority", "qllm"):
        out[f"decode_{policy}_ms"] = decode_times(model, ep, tp, policy, args.batch, args.steps)
    out["demo"] = demo(model, ep, tp, args.duration, args.seed)
    return out


# ----------------------------------------------------------------------------------------------
# The parent: one child per shape


def run_shape(shape: str, args) -> dict:
    ep, tp = (int(x) for x in shape.split("x"))
    env = os.environ | {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={ep * tp} "
        "--xla_cpu_collective_call_terminate_timeout_seconds=120",
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
    }
    cmd = [sys.executable, __file__, "--child", "--ep", str(ep), "--tp", str(tp)]
    cmd += ["--batch", str(args.batch), "--steps", str(args.steps)]
    cmd += ["--duration", str(args.duration), "--seed", str(args.seed)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{shape} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result | {"wall_s": round(time.perf_counter() - t0, 1)}


def summarize_shape(rounds: list[dict]) -> dict:
    """One shape over the rounds: the median of each round's median decode pass and mean LS
    TTFT, with every round's value."""

    def over(values: list[float]) -> dict:
        return {"median_of_rounds": statistics.median(values), "rounds": values}

    first = rounds[0]
    return {
        "expert_parallel": first["expert_parallel"],
        "tensor_parallel": first["tensor_parallel"],
        "decode_priority_ms": over([r["decode_priority_ms"]["median"] for r in rounds]),
        "decode_qllm_ms": over([r["decode_qllm_ms"]["median"] for r in rounds]),
        "ls_ttft_mean_ms": over([r["demo"]["ls_ttft_ms"]["mean"] for r in rounds]),
        "valid": all(
            r["demo"]["valid"]
            and not r["decode_priority_ms"]["compiles"]
            and not r["decode_qllm_ms"]["compiles"]
            for r in rounds
        ),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated EPxTP mesh shapes")
    ap.add_argument("--batch", type=int, default=8, help="sequences decoding together")
    ap.add_argument("--steps", type=int, default=24, help="decode passes measured")
    ap.add_argument("--rounds", type=int, default=2, help="passes over every shape")
    ap.add_argument("--duration", type=float, default=8.0, help="demo window, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "scale-bench-cpu.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    load_start, shapes = os.getloadavg(), args.shapes.split(",")
    runs: dict[str, list[dict]] = {shape: [] for shape in shapes}
    for rnd in range(args.rounds):  # shapes interleaved round by round: load drifts
        for shape in shapes:
            r = run_shape(shape, args)
            runs[shape].append(r)
            print(
                f"round {rnd} ep={r['expert_parallel']} tp={r['tensor_parallel']}: decode fused "
                f"{r['decode_priority_ms']['median']:.2f} ms, segmented "
                f"{r['decode_qllm_ms']['median']:.2f} ms (median); LS TTFT mean "
                f"{r['demo']['ls_ttft_ms']['mean']:.0f} ms ({r['wall_s']:.0f} s)",
                flush=True,
            )
    rows = [summarize_shape(runs[shape]) for shape in shapes]
    for r in rows:
        for key in ("decode_priority_ms", "decode_qllm_ms", "ls_ttft_mean_ms"):
            r[key]["vs_first_shape"] = r[key]["median_of_rounds"] / rows[0][key]["median_of_rounds"]
    report = {
        "note": NOTE,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        },
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "ep", "tp")},
        "results": rows,
        "rounds": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(NOTE)
    print(f"JSON: {args.out}")
    return report


if __name__ == "__main__":
    main()
