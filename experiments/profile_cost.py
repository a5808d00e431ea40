"""Fit the simulator's cost model (``qllm_jax.scheduler.simulator.CostModel``) to the real executor.

Times every segment kind of ``qllm_jax.executor.Executor`` on one model: ``embed`` (``start``:
host inputs and the embed segment), ``attention``, ``experts`` (one group of 1 expert and one
group of all experts), and ``head``, over decode-like passes (B sequences, one row each, C
context tokens each) and prefill-like passes (one sequence, R rows from position 0, or from a
cached prefix). Each point is the fastest of ``--repeats`` calls after a warm-up call
(compilation), blocking on each result. Then a least-squares fit per kind, of the relative
error:

    attention = attn_base + attn_per_row * rows + attn_per_ctx * ctx
                + attn_per_row_ctx * rows * span + attn_per_row_sq * rows**2
    experts   = segment_overhead + (expert_base + expert_per_row * rows) * group / num_experts
    head      = head_base + head_per_row * sampled_rows

(ctx = the sum of chunk ends; span = the longest chunk start: each row reads its own
sequence's cached prefix, padded to the pass's longest, and attends within its chunk.)
``segment_overhead`` (a jitted call's fixed cost, paid per segment) comes from the experts fit,
where the group size separates it from the per-expert work, and is subtracted from the other
intercepts. ``host_overhead`` is the scheduler's own time per plan (``schedule()`` +
``update()``), measured by running the simulator on this model's segment layout (expert
granularity). Coefficients are kept non-negative (a feature whose coefficient comes out
negative is dropped and the rest refitted); the fit's largest relative error per kind is
written next to them.

    python experiments/profile_cost.py                 # built-in model, float32, this machine
    python experiments/profile_cost.py --model DIR --dtype bfloat16 --out my-gpu.json

Writes ``experiments/results/profile-builtin-cpu.json`` by default (load it with
``load_profile(path)``; the copy in ``PROFILES["builtin-cpu"]`` is what the simulator ships).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import jax
import numpy as np

import qllm_jax
from qllm_jax.engine import default_cache_dir, enable_compilation_cache
from qllm_jax.executor import Executor
from qllm_jax.scheduler import (
    CarryRecord,
    Chunk,
    SampleSpec,
    Scheduler,
    SchedulerConfig,
    segment_layout,
)
from qllm_jax.scheduler.simulator import CostModel, Simulator, VirtualClock, make_request

RESULTS = Path(__file__).resolve().parent / "results"
GREEDY = SampleSpec(temperature=0.0, top_k=-1, top_p=1.0, seed=0, step=0)


def passes(decode_batches, decode_ctx, prefill_rows, page_size):
    """Row chunks of each measured pass: decode-like grids, then prefill-like single sequences."""
    out = []
    for b in decode_batches:
        for c in decode_ctx:
            per = -(-c // page_size)
            out.append(
                [
                    Chunk(i, c - 1, (5,), tuple(range(1 + i * per, 1 + (i + 1) * per)), GREEDY)
                    for i in range(b)
                ]
            )
    for r in prefill_rows:
        for start in (0, r):  # a prompt's first chunk, and a chunk after r cached tokens
            pages = tuple(range(1, 1 + -(-(start + r) // page_size)))
            out.append([Chunk(0, start, (5,) * r, pages, GREEDY)])
    return out


def best_time(repeats: int, fn, *args) -> float:
    """Fastest of ``repeats`` calls of ``fn(*args)`` (blocking on each result) after a warm-up
    call: the minimum, not the median, so other load on a shared machine does not leak in."""
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(model, chunk_sets, page_size: int, repeats: int) -> list[dict]:
    num_experts = model.config.num_experts
    need = max(max(p for c in cs for p in c.pages) for cs in chunk_sets) + 1
    most = max(sum(c.num_tokens for c in cs) for cs in chunk_sets)
    bounds = dict(
        max_batch_size=max(len(cs) for cs in chunk_sets),
        max_num_batched_tokens=most,
        max_model_len=max(c.end for cs in chunk_sets for c in cs),
    )
    executors = {
        g: Executor(model, need, page_size, expert_group_size=g, **bounds) for g in (1, num_experts)
    }
    whole = executors[num_experts]
    rows_out = []
    for chunks in chunk_sets:
        rec = CarryRecord(0, tuple(chunks))
        point = {
            "rows": rec.num_rows,
            "ctx": sum(c.end for c in chunks),
            "span": max(c.start for c in chunks),
            "sampled": len(chunks),
        }
        carry = whole.start(rec)
        point["embed"] = best_time(repeats, whole.start, rec)
        point["attention"] = best_time(repeats, lambda c: whole.advance(c, 0, 1), carry)
        after_attn = whole.advance(carry, 0, 1)
        for g, ex in executors.items():  # cursor 1: the first expert group of layer 0
            advance = lambda c, ex=ex: ex.advance(c, 1, 2)  # noqa: E731
            point[f"experts_g{g}"] = best_time(repeats, advance, after_attn)
        done = whole.advance(carry, 0, whole.head)
        point["head"] = best_time(repeats, whole.head_tokens, done, rec)
        print(point, flush=True)
        rows_out.append(point)
    return rows_out


def lstsq(features: list[list[float]], targets: list[float]) -> tuple[np.ndarray, float]:
    """Non-negative coefficients minimising the relative error (timings span 100x), and the
    largest relative error of the fit over the points."""
    a, y = np.asarray(features, float), np.asarray(targets, float)
    keep = np.ones(a.shape[1], bool)
    while True:
        coef = np.zeros(a.shape[1])
        coef[keep], *_ = np.linalg.lstsq(a[:, keep] / y[:, None], np.ones_like(y), rcond=None)
        if (coef >= 0).all():
            return coef, float(np.max(np.abs(a @ coef - y) / y))
        keep &= coef > 0


def fit(points: list[dict], num_experts: int) -> tuple[dict, dict]:
    exp_feats, exp_y = [], []
    for p in points:
        for g in (1, num_experts):
            exp_feats.append([1.0, g / num_experts, g / num_experts * p["rows"]])
            exp_y.append(p[f"experts_g{g}"])
    (seg, e_base, e_row), e_err = lstsq(exp_feats, exp_y)
    attn, a_err = lstsq(
        [[1.0, p["rows"], p["ctx"], p["rows"] * p["span"], p["rows"] ** 2] for p in points],
        [p["attention"] for p in points],
    )
    head, h_err = lstsq([[1.0, p["sampled"]] for p in points], [p["head"] for p in points])
    coefs = dict(
        segment_overhead=seg,
        attn_base=max(0.0, attn[0] - seg),
        attn_per_row=attn[1],
        attn_per_ctx=attn[2],
        attn_per_row_ctx=attn[3],
        attn_per_row_sq=attn[4],
        expert_base=e_base,
        expert_per_row=e_row,
        head_base=max(0.0, head[0] - seg),
        head_per_row=head[1],
        embed_base=statistics.mean(p["embed"] for p in points),
    )
    errors = {"attention": a_err, "experts": e_err, "head": h_err}
    return coefs, errors


def host_overhead(num_layers: int, num_experts: int) -> float:
    """Seconds of scheduler work per plan: a zero-cost simulation of a mixed LS/BE workload."""
    clock = VirtualClock()
    config = SchedulerConfig(page_size=16, num_pages=1 << 14, max_model_len=2048)
    segments = segment_layout(num_layers, num_experts, 1, False)
    sim = Simulator(Scheduler(config, segments, clock=clock), CostModel(attn_base=1e-3), clock)
    rng = random.Random(0)
    events = []
    for i in range(64):
        prio = 0 if rng.random() < 0.2 else 1
        req = make_request(str(i), i, rng.randint(16, 256), rng.randint(8, 64), prio, i * 0.01)
        events.append((i * 0.01, req))
    t0 = time.perf_counter()
    sim.run(events)
    return (time.perf_counter() - t0) / sim.num_plans


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF checkpoint dir (default: the built-in model)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--decode-batches", default="16,32,64", help="sequences of decode passes")
    ap.add_argument("--decode-ctx", default="16,128", help="context tokens per decode row")
    ap.add_argument("--prefill-rows", default="64,256,512", help="rows of one-prompt passes")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--name", default="builtin-cpu", help="profile name stored in the JSON")
    ap.add_argument("--out", help="JSON path (default experiments/results/profile-<name>.json)")
    args = ap.parse_args(argv)

    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    enable_compilation_cache(default_cache_dir())
    model_dir = args.model or str(qllm_jax.builtin_model_dir())
    model = qllm_jax.load(model_dir, dtype=args.dtype)
    cfg = model.config
    chunk_sets = passes(
        ints(args.decode_batches), ints(args.decode_ctx), ints(args.prefill_rows), args.page_size
    )
    t0 = time.perf_counter()
    points = measure(model, chunk_sets, args.page_size, args.repeats)
    coefs, errors = fit(points, cfg.num_experts)
    coefs["host_overhead"] = host_overhead(cfg.num_layers, cfg.num_experts)
    # 4 significant digits: the fit is no better, and the copy in PROFILES stays readable
    cost = CostModel(name=args.name, **{k: float(f"{v:.4g}") for k, v in coefs.items()})
    device = jax.devices()[0]
    meta = {
        "device": f"{device.platform}:{device.device_kind}",
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "model": {
            "dir": Path(model_dir).name,
            "layers": cfg.num_layers,
            "experts": cfg.num_experts,
            "hidden": cfg.hidden_size,
            "dtype": args.dtype,
        },
        "page_size": args.page_size,
        "max_relative_error": errors,
        "points": points,
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out) if args.out else RESULTS / f"profile-{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(cost.to_json(meta))
    print(cost)
    print(f"max relative error per kind: {errors}")
    print(f"wrote {out}")
    return cost.to_dict()


if __name__ == "__main__":
    main()
