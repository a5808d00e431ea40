"""Overhead of segmenting a forward pass, against the fused step and HF transformers.

Measures steady-state decode on one batch: tokens/s and step time for
  (a) the fused step (one jit per pass),
  (b) segmented per layer (one attention + one all-experts segment per layer),
  (c) segmented per expert group (``--group-size``, default 1 expert per segment),
  (d) HF transformers ``generate`` (PyTorch, greedy) on the same checkpoint,
plus host time per segment. All arms run in one process, side by side, so compare ratios.

    python experiments/overhead.py                  # the built-in model, float32, CPU
    python experiments/overhead.py --model DIR --dtype bfloat16 --no-hf

Writes ``experiments/results/overhead-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

import qllm_jax
from qllm_jax.scheduler import CarryRecord, Chunk

RESULTS = Path(__file__).resolve().parent / "results"


def decode_step_times(engine: qllm_jax.Engine, prompts, new_tokens: int) -> list[float]:
    """Wall time of each pass after every request has finished its prefill."""
    sp = qllm_jax.SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for p in prompts:
        engine.add_request(p, sp)
    times = []
    while engine.has_unfinished():
        prefill = any(r.in_prefill for r in engine.scheduler.admitted) or engine.scheduler.waiting
        t0 = time.perf_counter()
        engine.step()
        if not prefill:
            times.append(time.perf_counter() - t0)
    return times


def run_arm(model, prompts, new_tokens: int, repeats: int, **kw) -> dict:
    engine = qllm_jax.Engine(model, max_batch_size=len(prompts), **kw)
    decode_step_times(engine, prompts, new_tokens)  # compile every bucket on the way
    steps = []
    segments_before = engine.executor.segments_run
    passes_before = engine.num_steps
    for _ in range(repeats):
        steps += decode_step_times(engine, prompts, new_tokens)
    passes = engine.num_steps - passes_before
    per_pass = (engine.executor.segments_run - segments_before) / max(passes, 1)
    step = statistics.median(steps)
    return {
        "step_ms_median": step * 1e3,
        "step_ms_p90": float(np.percentile(steps, 90)) * 1e3,
        "decode_tokens_per_s": len(prompts) / step,
        "segments_per_pass": per_pass,
        "num_steps_timed": len(steps),
    }


def dispatch_us(model, prompts, **kw) -> float:
    """Host time to enqueue one segment (nothing blocks: lookahead above the segment count)."""
    engine = qllm_jax.Engine(
        model, max_batch_size=len(prompts), lookahead=10_000, policy="priority", **kw
    )
    decode_step_times(engine, prompts, 4)
    ex = engine.executor
    rec = CarryRecord(
        0,
        tuple(Chunk(i, 3, (5,), tuple(range(1 + i * 2, 3 + i * 2))) for i in range(len(prompts))),
    )
    samples = []
    for _ in range(5):
        carry = ex.start(rec)
        jax.block_until_ready(carry)
        n = ex.head
        t0 = time.perf_counter()
        carry = ex.advance(carry, 0, n)
        samples.append((time.perf_counter() - t0) / n)
        jax.block_until_ready(carry)
    return statistics.median(samples) * 1e6


def hf_decode(model_dir, prompts, new_tokens: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    ids = torch.tensor(prompts)

    def gen(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    gen(2)
    prefill = statistics.median(gen(1) for _ in range(3))
    total = statistics.median(gen(new_tokens) for _ in range(3))
    step = (total - prefill) / (new_tokens - 1)
    return {
        "step_ms_median": step * 1e3,
        "decode_tokens_per_s": len(prompts) / step,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", help="HF checkpoint dir (default: the built-in model) or random:PRESET"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=1, help="experts per segment for arm (c)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers arm")
    ap.add_argument("--out", help="JSON path (default experiments/results/overhead-<dev>.json)")
    args = ap.parse_args(argv)

    model_dir = args.model or str(qllm_jax.builtin_model_dir())
    if model_dir.startswith("random:"):  # random weights of a preset's shapes, on the device
        model = qllm_jax.random_model(model_dir.removeprefix("random:"), args.dtype)
        args.no_hf = True
    else:
        model = qllm_jax.load(model_dir, dtype=args.dtype)
    cfg = model.config
    rng = np.random.default_rng(0)
    prompts = [
        [int(t) for t in rng.integers(3, cfg.vocab_size, args.prompt_len)]
        for _ in range(args.batch)
    ]
    # iteration-level scheduling in every arm: this measures segmentation, not preemption
    kw = dict(
        policy="priority",
        page_size=16,
        max_num_batched_tokens=max(512, args.batch * args.prompt_len),
    )
    arms = {
        "fused": dict(mode="fused"),
        "segmented_layer": dict(mode="segmented", expert_group_size=cfg.num_experts),
        f"segmented_group{args.group_size}": dict(
            mode="segmented", expert_group_size=args.group_size
        ),
    }
    results: dict = {}
    for name, extra in arms.items():
        print(f"[{name}] ...", flush=True)
        results[name] = run_arm(model, prompts, args.new_tokens, args.repeats, **kw, **extra)
        print(f"[{name}] {results[name]}", flush=True)
    group_arm = f"segmented_group{args.group_size}"
    dispatch = dispatch_us(model, prompts, mode="segmented", expert_group_size=args.group_size)
    fused = results["fused"]["step_ms_median"]
    summary = {
        "segmented_layer_over_fused": results["segmented_layer"]["step_ms_median"] / fused,
        "segmented_group_over_fused": results[group_arm]["step_ms_median"] / fused,
        "host_dispatch_us_per_segment": dispatch,
        "overhead_us_per_segment_vs_fused": {
            arm: (results[arm]["step_ms_median"] - fused) * 1e3 / results[arm]["segments_per_pass"]
            for arm in ("segmented_layer", group_arm)
        },
    }
    if not args.no_hf:
        print("[hf_generate] ...", flush=True)
        results["hf_generate"] = hf_decode(model_dir, prompts, args.new_tokens, args.dtype)
        print(f"[hf_generate] {results['hf_generate']}", flush=True)
        summary["fused_over_hf_tokens_per_s"] = (
            results["fused"]["decode_tokens_per_s"] / results["hf_generate"]["decode_tokens_per_s"]
        )
    device = jax.devices()[0]
    report = {
        "device": f"{device.platform}:{device.device_kind}",
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "model": {
            "dir": str(model_dir),
            "model_type": cfg.model_type,
            "layers": cfg.num_layers,
            "experts": cfg.num_experts,
            "hidden": cfg.hidden_size,
            "dtype": args.dtype,
        },
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "arms": results,
        "summary": summary,
    }
    out = Path(args.out) if args.out else RESULTS / f"overhead-{device.platform}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
