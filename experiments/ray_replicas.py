"""Real replicas on Ray Serve beside the N-engine simulator's prediction for them.

Two CPU replicas of the built-in model (``qllm_jax.ray_serve``, warmed up: nothing compiles in
the measured window) serve the same open-loop session workload under three configurations
(round-robin and ``ours`` at 2 requests/s, ``ours`` at 6); the simulator
(``scheduler/multisim.py``: the same scheduler config, policy and workload over the cost model
measured for this model on CPU, ``results/profile-builtin-cpu.json``) predicts each. Sessions
share a 4-page system prompt, so dispatch decides the prefix-cache hits.

CPU numbers on a shared, loaded 2-core host: the absolute times mostly show how loaded the host
was (the load average is recorded); compare the ratios between configurations, real against
predicted. Streaming gives TTFT (first text chunk) and TPOT ((last - first) / (tokens - 1)).

    python experiments/ray_replicas.py [--quick] [--seed S] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from qllm_jax.scheduler import SchedulerConfig, segment_layout  # noqa: E402
from qllm_jax.scheduler.dispatch import make_policy  # noqa: E402
from qllm_jax.scheduler.multisim import MultiSimulator  # noqa: E402
from qllm_jax.scheduler.simulator import load_profile, make_request  # noqa: E402

ENGINE = dict(
    dtype="float32",
    policy="qllm",
    granularity="layer",
    kv_pages=96,
    page_size=16,
    max_model_len=512,
    max_batch_size=8,
    max_num_batched_tokens=32,
    prefill_chunk=16,
    grow_pages=True,
)
LAYERS, EXPERTS = 4, 8  # the built-in model (segments of the layer granularity: all experts)
SYSTEM_LEN, USERS = 64, 3  # (an odd count: round-robin over 2 moves every user)
CONFIGS = (("round_robin", 2.0), ("ours", 2.0), ("ours", 6.0))  # (router, requests/s)
PORT = 8797


def workload(n: int, seed: int) -> list[dict]:
    """``n`` requests of ``USERS`` sessions in turn: the session's system prompt + a message,
    a fixed output length; unit mean gap (scaled by the rate)."""
    rng = random.Random(f"ray-replicas-{seed}")
    systems = [[rng.randrange(1000, 30000) for _ in range(SYSTEM_LEN)] for _ in range(USERS)]
    items, t = [], 0.0
    for k in range(n):
        u = k % USERS
        msg = [rng.randrange(1000, 30000) for _ in range(rng.randint(8, 24))]
        items.append(dict(id=f"q{k}", user=f"u{u}", prompt=systems[u] + msg,
                          out=rng.randint(8, 16), t=t))  # fmt: skip
        t += rng.expovariate(1.0)
    return items


def predict(items: list[dict], router: str, rate: float, seed: int) -> dict:
    """The simulator's numbers for this workload: the engine's scheduler config and segment
    layout, the CPU cost model, the router's policy (fresh stats: 0.1 s staleness)."""
    cfg = SchedulerConfig.from_options(
        page_size=ENGINE["page_size"],
        num_pages=ENGINE["kv_pages"],
        max_model_len=ENGINE["max_model_len"],
        eos_token_ids=(),
        policy="qllm",
        granularity="layer",
        max_batch_size=8,
        max_num_batched_tokens=32,
        prefill_chunk=16,
        grow_pages=True,
    )
    segments = segment_layout(LAYERS, EXPERTS, EXPERTS, False)
    cost = load_profile(ROOT / "results" / "profile-builtin-cpu.json")
    sim = MultiSimulator(2, cfg, segments, cost, make_policy(router, seed=seed), 0.1)
    events = [
        (it["t"] / rate, make_request(it["id"], k, len(it["prompt"]), it["out"], 0,
                                      it["t"] / rate, list(it["prompt"])), it["user"])
        for k, it in enumerate(items)
    ]  # fmt: skip
    res = sim.run(events)
    recs = list(res.records.values())
    return summarize(
        [r.ttft for r in recs],
        [r.tpot for r in recs if r.tpot is not None],
        max(r.finish for r in recs) - min(r.arrival for r in recs),
        len(recs),
        res.stats["prefix_cache_hit_rate"],
    )


def summarize(ttft, tpot, span, n, hit_rate) -> dict:
    return {
        "ttft_mean_s": statistics.mean(ttft),
        "ttft_median_s": statistics.median(ttft),
        "ttft_max_s": max(ttft),
        "tpot_mean_s": statistics.mean(tpot),
        "throughput_rps": n / span,
        "prefix_hit_rate": hit_rate,
    }


def one(url: str, it: dict, t0: float, rate: float) -> dict:
    import httpx

    time.sleep(max(0.0, t0 + it["t"] / rate - time.monotonic()))
    body = {"prompt": it["prompt"], "max_tokens": it["out"], "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "user": it["user"]}  # fmt: skip
    sent = time.monotonic()
    stamps, usage = [], None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        replica = r.headers.get("x-qllm-replica")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                stamps.append(time.monotonic())
    n = usage["completion_tokens"]
    return {
        "ttft": stamps[0] - sent,
        "tpot": (stamps[-1] - stamps[0]) / (n - 1) if n > 1 and len(stamps) > 1 else None,
        "end": stamps[-1],
        "start": sent,
        "cached": usage["prompt_tokens_details"]["cached_tokens"],
        "prompt": usage["prompt_tokens"],
        "replica": replica,
    }


def measure(items: list[dict], router: str, rate: float, cache: str) -> dict:
    from ray import serve

    from qllm_jax import ray_serve

    opts = ray_serve.ReplicaOptions(num_replicas=2, router=router, replica_cpus=0.5)
    t = time.monotonic()
    serve.run(ray_serve.build_app(ENGINE | {"compilation_cache_dir": cache}, opts),
              name=ray_serve.APP_NAME, route_prefix="/")  # fmt: skip
    deploy_s = time.monotonic() - t
    url = f"http://127.0.0.1:{PORT}"
    t0 = time.monotonic() + 0.5
    with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
        outs = list(pool.map(lambda it: one(url, it, t0, rate), items))
    serve.delete(ray_serve.APP_NAME)
    span = max(o["end"] for o in outs) - min(o["start"] for o in outs)
    cached = sum(o["cached"] for o in outs) / sum(o["prompt"] for o in outs)
    res = summarize([o["ttft"] for o in outs], [o["tpot"] for o in outs if o["tpot"]], span,
                    len(outs), cached)  # fmt: skip
    res["deploy_s"] = deploy_s
    res["per_replica"] = {
        r: sum(o["replica"] == r for o in outs) for r in {o["replica"] for o in outs}
    }
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="12 requests per configuration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", default=str(ROOT / "results"))
    args = p.parse_args(argv)
    import ray
    from ray import serve

    n = 12 if args.quick else 24
    items = workload(n, args.seed)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="error")
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    cache = tempfile.mkdtemp(prefix="qllm-ray-bench-cache-")
    configs = []
    try:
        for router, rate in CONFIGS:
            load0 = os.getloadavg()
            real = measure(items, router, rate, cache)
            sim = predict(items, router, rate, args.seed)
            configs.append({"name": f"{router}@{rate:g}rps", "router": router, "rate_rps": rate,
                            "real": real, "sim": sim, "loadavg_before": load0,
                            "loadavg_after": os.getloadavg()})  # fmt: skip
            print(f"{configs[-1]['name']:>18}: real TTFT {real['ttft_mean_s']:.3f} s TPOT "
                  f"{real['tpot_mean_s']:.4f} s hits {real['prefix_hit_rate']:.2f} | sim TTFT "
                  f"{sim['ttft_mean_s']:.3f} s TPOT {sim['tpot_mean_s']:.4f} s hits "
                  f"{sim['prefix_hit_rate']:.2f}", flush=True)  # fmt: skip
    finally:
        serve.shutdown()
        ray.shutdown()
    out = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "engine": ENGINE,
        "requests": n,
        "seed": args.seed,
        "note": "CPU, shared loaded host: absolute times show the load; compare ratios",
        "configs": configs,
    }
    path = Path(args.results_dir) / f"ray-replicas-cpu{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
