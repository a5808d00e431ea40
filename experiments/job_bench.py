"""What durable jobs cost: LS latency while a job checkpoints, checkpoint size and time, restore.

1. ``ls``: open-loop Poisson latency-sensitive (LS) requests on an engine that also runs a
   best-effort job, with the job checkpointing every ``--every`` seconds (2 by default) and
   without checkpoints, arms interleaved round by round. LS TTFT p90 of each arm, their ratio
   with a bootstrap 95 % interval (LS TTFTs resampled within each arm), the synchronous pause
   of each checkpoint (capture: device-to-host copy of the job's KV pages and rows, checksums,
   handing the arrays to orbax) and the job's throughput. Target: ratio <= 1.10.
2. ``size``: checkpoints of N in-flight job requests holding T tokens of KV each: KV bytes,
   bytes on disk, the synchronous part, the whole write, and restoring (load + checks + KV
   into a fresh engine).

Every executable (segments and the checkpoint gathers) is compiled before measuring, and each
LS window counts compilations (``compile_log.Window``): a window with any is marked invalid.

    python experiments/job_bench.py                 # built-in model, float32, CPU (~6 min)
    python experiments/job_bench.py --quick         # a short smoke run
    python experiments/job_bench.py --model random:mixtral-8x7b-16l --dtype bfloat16

Writes ``experiments/results/job-bench-<device>.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import qllm_jax
from qllm_jax import checkpoint, compile_log, jobs
from qllm_jax.scheduler.metrics import percentile

RESULTS = Path(__file__).resolve().parent / "results"


def engine_kw(args) -> dict:
    return dict(
        policy="qllm",
        granularity="expert",
        max_batch_size=8,
        max_num_batched_tokens=128,
        prefill_chunk=64,
        kv_pages=args.kv_pages,
        compilation_cache_dir=None,
    )


def job_lines(n: int, prompt_len: int, out_len: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        body = {"prompt": [rng.randrange(3, 30000) for _ in range(prompt_len)]}
        body |= {"max_tokens": out_len, "temperature": 0, "ignore_eos": True}
        lines.append(
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
        )
    return lines


def warm(model, args) -> None:
    """Compile what both arms run: the segments of the passes they make, and the checkpoint
    page gathers (and the restore's scatters) of every bucket up to the cache size."""
    eng = qllm_jax.Engine(model, **engine_kw(args))
    eng.warmup(max_rows=128, max_context=args.prompt + args.output + 64)
    n = 8
    while n <= args.kv_pages:
        pages = list(range(1, min(n, args.kv_pages - 1) + 1))
        eng.executor.import_kv(pages, *eng.executor.export_kv(pages))
        n *= 2
    # a run of the workload itself, checkpointing, so nothing is left to compile
    run_arm(model, args, every=0.5, duration=4.0, seed=12345)


def run_arm(model, args, every: float | None, duration: float, seed: int) -> dict:
    """LS Poisson arrivals for ``duration`` s over a running job (checkpoints every ``every``
    s, or none). Returns LS TTFTs, checkpoint pauses, job tokens/s and compilations."""
    eng = qllm_jax.Engine(model, **engine_kw(args))
    runner = jobs.JobRunner(eng, checkpoint_every=every, keep=2)
    pauses, sizes = [], []
    real = runner.checkpoint

    def timed(job, wait=False):
        t0 = time.perf_counter()
        step = real(job, wait)
        pauses.append(time.perf_counter() - t0)
        return step

    runner.checkpoint = timed
    tmp = Path(tempfile.mkdtemp(prefix="job-bench-"))
    try:
        lines = job_lines(args.job_requests, args.prompt, args.output, seed)
        job = runner.create(lines, tmp / "job", job_id=f"bench{seed}")
        for _ in range(200):  # the job is running before LS traffic starts
            eng.step()
        rng = random.Random(seed)
        arrivals, t = [], rng.expovariate(args.rate)
        while t < duration:
            arrivals.append(t)
            t += rng.expovariate(args.rate)
        vocab = eng.model.config.vocab_size
        sp = qllm_jax.SamplingParams(max_tokens=args.ls_output, temperature=0, ignore_eos=True)
        ttft: dict[str, float] = {}
        done0, i = job.num_done, 0
        t0 = time.monotonic()
        with compile_log.Window() as w:
            while i < len(arrivals) or len(ttft) < len(arrivals):
                now = time.monotonic() - t0
                while i < len(arrivals) and arrivals[i] <= now:
                    prompt = [rng.randrange(3, vocab) for _ in range(args.ls_prompt)]
                    eng.add_request(prompt, sp, 0, t0 + arrivals[i], f"ls{i}")
                    i += 1
                for out in eng.step():
                    if out.token_ids and out.request_id not in ttft:
                        ttft[out.request_id] = (
                            out.metrics.first_token_time - out.metrics.arrival_time
                        )
                if job.finished:
                    raise RuntimeError("the job finished inside the window: give it more requests")
        wall = time.monotonic() - t0
        job_done = job.num_done - done0
        for step in job.store.steps():
            sizes.append(_du(tmp / "job" / "checkpoints" / str(step)))
        runner.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "ttft": [ttft[k] for k in sorted(ttft)],
        "checkpoints": len(pauses),
        "pause_s": pauses,
        "bytes_on_disk": sizes,
        "job_requests_per_s": job_done / wall,
        "job_tokens_per_s": job_done * args.output / wall,
        "compiles": w.compiles,
    }


def bootstrap_ratio(a: list[float], b: list[float], q: float, n: int, seed: int) -> dict:
    """p_q(a) / p_q(b) and a 95 % percentile-bootstrap interval."""
    rng = np.random.default_rng(seed)
    a_, b_ = np.asarray(a), np.asarray(b)
    ratios = sorted(
        percentile(list(rng.choice(a_, a_.size)), q) / percentile(list(rng.choice(b_, b_.size)), q)
        for _ in range(n)
    )
    return {
        "ratio": percentile(a, q) / percentile(b, q),
        "ci95": [ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]],
    }


def size_sweep(model, args) -> list[dict]:
    """Checkpoints of ``n`` requests with ``tokens`` of KV each: bytes, sync and total write
    time, restore time."""
    rows = []
    for n, tokens in args.sizes:
        eng = qllm_jax.Engine(model, **engine_kw(args))
        sp = qllm_jax.SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
        rng = random.Random(n * tokens)  # distinct prompts: identical KV would compress away
        vocab = eng.model.config.vocab_size
        prompts = [[rng.randrange(3, vocab) for _ in range(tokens)] for _ in range(n)]
        ids = [eng.add_request(p, sp, 1, None, f"s{k}") for k, p in enumerate(prompts)]
        while any(eng.scheduler.requests[r].num_computed < tokens for r in ids):
            eng.step()  # prefilled: each holds about `tokens` tokens of KV
        cfg = eng.model.config
        per_token = 2 * cfg.num_layers * cfg.kv_size * np.dtype(eng.model.dtype).itemsize
        tmp = Path(tempfile.mkdtemp(prefix="job-bench-size-"))
        try:
            store = checkpoint.CheckpointStore(tmp)
            t0 = time.perf_counter()
            snap = checkpoint.capture(eng, ids)
            t1 = time.perf_counter()
            kv_bytes = per_token * sum(r["kv_tokens"] for r in snap.meta["requests"])
            store.save(snap)
            t2 = time.perf_counter()
            store.wait()
            t3 = time.perf_counter()
            disk = _du(tmp / str(store.steps()[-1]))
            fresh = qllm_jax.Engine(model, **engine_kw(args))
            t4 = time.perf_counter()
            _, loaded = store.load()
            t5 = time.perf_counter()
            restored = checkpoint.restore(fresh, loaded)
            jax.block_until_ready(fresh.executor.kv.k)
            assert len(restored.with_kv) == n
            t6 = time.perf_counter()
            store.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append(
            {
                "requests": n,
                "tokens_each": tokens,
                "kv_bytes": kv_bytes,
                "saved_bytes": int(sum(a.nbytes for a in snap.arrays.values())),
                "bytes_on_disk": disk,
                "capture_s": t1 - t0,
                "save_call_s": t2 - t1,
                "sync_s": t2 - t0,  # what the engine's loop waits for
                "write_s": t3 - t0,
                "load_s": t5 - t4,
                "restore_s": t6 - t5,
            }
        )
        print(
            f"  {n:3d} x {tokens:5d} tokens: KV {kv_bytes / 2**20:7.2f} MiB, disk "
            f"{disk / 2**20:7.2f} MiB, sync {1e3 * (t2 - t0):7.1f} ms, write "
            f"{1e3 * (t3 - t0):7.1f} ms, load {1e3 * (t5 - t4):6.1f} ms, restore "
            f"{1e3 * (t6 - t5):6.1f} ms"
        )
    return rows


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF checkpoint dir (default: built-in) or random:PRESET")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rate", type=float, default=2.0, help="LS requests/s")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of LS arrivals a run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per arm, interleaved")
    ap.add_argument("--every", type=float, default=2.0, help="checkpoint interval (s)")
    ap.add_argument("--job-requests", type=int, default=2000)
    ap.add_argument("--prompt", type=int, default=64, help="job prompt tokens")
    ap.add_argument("--output", type=int, default=32, help="job output tokens")
    ap.add_argument("--ls-prompt", type=int, default=32)
    ap.add_argument("--ls-output", type=int, default=8)
    ap.add_argument("--kv-pages", type=int, default=1024)
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--out", help="output JSON path")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.job_requests, args.bootstrap = 6.0, 1, 120, 200
    args.sizes = [(1, 64), (8, 64), (8, 256), (8, 960)] if not args.quick else [(2, 64)]

    spec = args.model or str(qllm_jax.builtin_model_dir())
    if spec.startswith("random:"):
        model = qllm_jax.random_model(spec.removeprefix("random:"), args.dtype)
    else:
        model = qllm_jax.load(spec, dtype=args.dtype)
    print("warming up (compiling) ...")
    warm(model, args)
    arms: dict[str, list[dict]] = {"checkpoint": [], "none": []}
    for r in range(args.rounds):
        for arm, every in (("checkpoint", args.every), ("none", None)):
            res = run_arm(model, args, every, args.duration, seed=r)
            arms[arm].append(res)
            print(
                f"round {r} {arm:10s}: LS TTFT p90 {1e3 * percentile(res['ttft'], 90):7.1f} ms"
                f" ({len(res['ttft'])} LS), {res['checkpoints']} checkpoints, pause p50 "
                f"{1e3 * percentile(res['pause_s'], 50) if res['pause_s'] else math.nan:.1f} ms,"
                f" job {res['job_tokens_per_s']:.1f} tok/s, compiles {res['compiles']}"
            )
    valid = all(res["compiles"] == 0 for runs in arms.values() for res in runs)
    ttft = {arm: [x for res in runs for x in res["ttft"]] for arm, runs in arms.items()}
    ratio = bootstrap_ratio(ttft["checkpoint"], ttft["none"], 90, args.bootstrap, 0)
    pauses = [p for res in arms["checkpoint"] for p in res["pause_s"]]
    summary = {
        "ls_ttft_p90_s": {arm: percentile(v, 90) for arm, v in ttft.items()},
        "ls_ttft_p50_s": {arm: percentile(v, 50) for arm, v in ttft.items()},
        "ls_requests": {arm: len(v) for arm, v in ttft.items()},
        "p90_ratio_checkpoint_vs_none": ratio,
        "meets_target_1_10": ratio["ratio"] <= 1.10,
        "checkpoint_pause_s": {
            "p50": percentile(pauses, 50),
            "p90": percentile(pauses, 90),
            "max": max(pauses, default=math.nan),
            "n": len(pauses),
        },
        "job_tokens_per_s": {
            arm: sum(r["job_tokens_per_s"] for r in runs) / len(runs) for arm, runs in arms.items()
        },
        "valid_no_compiles": valid,
    }
    print(
        f"LS TTFT p90: checkpointing every {args.every:g} s "
        f"{1e3 * summary['ls_ttft_p90_s']['checkpoint']:.1f} ms vs none "
        f"{1e3 * summary['ls_ttft_p90_s']['none']:.1f} ms: ratio {ratio['ratio']:.3f} "
        f"(95% CI {ratio['ci95'][0]:.3f}-{ratio['ci95'][1]:.3f}); valid={valid}"
    )
    print("checkpoint size and time against KV bytes:")
    sizes = size_sweep(model, args)
    result = {
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "cpu_count": __import__("os").cpu_count(),
        "model": spec,
        "dtype": args.dtype,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "summary": summary,
        "sizes": sizes,
        "runs": {
            arm: [{k: v for k, v in r.items() if k != "ttft"} for r in runs]
            for arm, runs in arms.items()
        },
    }
    device = "cpu" if jax.default_backend() == "cpu" else jax.default_backend()
    out = Path(args.out) if args.out else RESULTS / f"job-bench-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
