"""``make demo``: generate from the built-in model and report decode throughput.

The built-in model is a small random-weight Mixtral-style checkpoint generated on first use (see
``qllm_jax.builtin``); its text is gibberish by construction; the point is the machinery and the
numbers. Run ``python -m qllm_jax.demo --help`` for options.
"""

from __future__ import annotations

import argparse
import time

import qllm_jax

PROMPTS = [
    "The scheduler preempts best-effort work",
    "Mixture-of-Experts models route each token to",
    "A latency-sensitive request arrives while",
    "Paged attention keeps the KV cache in fixed-size pages so that",
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF checkpoint dir (default: the built-in model)")
    ap.add_argument("--policy", choices=["fcfs", "priority", "qllm"], default="priority")
    ap.add_argument("--mode", choices=["fused", "segmented"], default=None)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8, help="number of prompts")
    args = ap.parse_args(argv)

    model_dir = args.model or qllm_jax.builtin_model_dir()
    print(f"model: {model_dir}")
    t0 = time.perf_counter()
    llm = qllm_jax.LLM(model_dir, dtype="float32", policy=args.policy, mode=args.mode)
    print(f"loaded in {time.perf_counter() - t0:.1f}s")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    sp = qllm_jax.SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)

    t0 = time.perf_counter()
    llm.generate(prompts, sp)  # compiles every row/page bucket the timed run will meet
    print(f"warm-up run (includes compilation) {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    for o in outs[:4]:
        print(f"  [{o.request_id}] {o.text!r}")
    rate = f"{n / dt:.1f} tokens/s ({args.policy}, {llm.engine.mode})"
    print(f"{len(outs)} requests, {n} tokens in {dt:.2f}s: {rate}")


if __name__ == "__main__":
    main()
