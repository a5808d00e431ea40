"""What broadcasting plans costs a multi-process engine (``qllm_jax.multiprocess``).

- ``codec``: encode + JSON + decode of plans of R decode rows and of one long prefill chunk,
  in one process (no network): microseconds and bytes per plan.
- ``kv_rtt``: a ping-pong through the distributed runtime's key-value store between process 0
  and process 1 over loopback (half the round trip = one message's latency).
- ``serve``: the same decode workload on 1 process and on N processes (one CPU device each,
  params replicated), after ``Engine.warmup``: wall time per plan, and on process 0 the time
  spent publishing plans (encode + set) and waiting at barriers, per plan.

Every process of an N-process run computes the same thing on the same 2 shared cores here, so
the wall-time ratio shows CPU contention plus overhead, not what separate hosts would see; the
publish and barrier times are the broadcast's own cost.

    python experiments/multiproc_overhead.py [--processes 2 4] [--requests 16 --tokens 16]

Writes ``experiments/results/multiproc_overhead.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def spread(xs: list[float], scale: float = 1e6) -> dict[str, float]:
    xs = sorted(xs)
    return {"min": xs[0] * scale, "median": statistics.median(xs) * scale, "max": xs[-1] * scale}


def codec(samples: int = 200) -> dict:
    from qllm_jax.scheduler.plan import Chunk, Plan, SampleSpec, decode_plan, encode_plan

    def decode_rows(r: int) -> Plan:
        spec = SampleSpec(0.0, 0, 1.0, 2**63 + 5, 17)
        chunks = tuple(Chunk(i, 300, (1234,), tuple(range(i, i + 20)), spec) for i in range(r))
        return Plan(7, 0, 9, chunks, new=True, finishes=True)

    prefill = Plan(8, 0, 9, (Chunk(1, 0, tuple(range(512)), tuple(range(32)), None),), new=True)
    plans = {f"decode_{r}_rows": decode_rows(r) for r in (1, 8, 32, 128)} | {
        "prefill_512_tokens": prefill
    }
    out = {}
    for name, plan in plans.items():
        enc, dec = [], []
        for _ in range(samples):
            t0 = time.perf_counter()
            data = json.dumps(encode_plan(plan), separators=(",", ":")).encode()
            t1 = time.perf_counter()
            assert decode_plan(json.loads(data)) == plan
            dec.append(time.perf_counter() - t1)
            enc.append(t1 - t0)
        out[name] = {"bytes": len(data), "encode_us": spread(enc), "decode_us": spread(dec)}
    return out


def kv_rtt(cluster, rounds: int = 300) -> dict:
    client, pid = cluster.channel.client, cluster.process_id
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        if pid == 0:
            client.key_value_set_bytes(f"bench/ping/{i}", b"x" * 200)
            client.blocking_key_value_get_bytes(f"bench/pong/{i}", 10_000)
        elif pid == 1:
            client.blocking_key_value_get_bytes(f"bench/ping/{i}", 10_000)
            client.key_value_set_bytes(f"bench/pong/{i}", b"y")
        times.append(time.perf_counter() - t0)
    client.wait_at_barrier("bench/rtt", 60_000)
    return {"one_way_us": spread([t / 2 for t in times[10:]])}


def workload(engine, requests: int, tokens: int) -> dict:
    import qllm_jax

    sampling = qllm_jax.SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i in range(requests):
        engine.add_request([1 + i % 50, 7, 9, 11], sampling, priority=i % 2)
    t0, plans = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        plans += 1
    return {"plans": plans, "wall_s": time.perf_counter() - t0}


def worker(coordinator: str, n: int, pid: int, out: str, requests: int, tokens: int) -> None:
    import qllm_jax
    from qllm_jax import multiprocess

    kw = dict(policy="qllm", kv_pages=128, page_size=8, max_model_len=64, max_batch_size=16,
              max_num_batched_tokens=64, compilation_cache_dir=None)  # fmt: skip
    if n == 1:
        engine = qllm_jax.Engine(qllm_jax.random_model("mixtral-tiny", "float32", seed=1), **kw)
        engine.warmup(max_context=32)
        result = workload(engine, requests, tokens)
    else:
        cluster = multiprocess.initialize(coordinator, n, pid)
        rtt = kv_rtt(cluster)
        model = qllm_jax.random_model("mixtral-tiny", "float32", seed=1)  # (after initialize)
        engine = cluster.engine(model, **kw)
        if not cluster.leader:
            cluster.follow(engine)
            cluster.stop()
            return
        cluster.lead(engine)
        sizes = []
        send = cluster.channel.send

        def counted(kind, **body):
            if kind == "plan":
                sizes.append(len(json.dumps(body["plan"], separators=(",", ":"))))
            send(kind, **body)

        cluster.channel.send = counted
        engine.warmup(max_context=32)
        ex, ch = engine.executor, cluster.channel
        ex.broadcast_s = ch.sync_s = 0.0
        sizes.clear()
        result = workload(engine, requests, tokens)
        result |= {
            "publish_us_per_plan": ex.broadcast_s / result["plans"] * 1e6,
            "barrier_us_per_plan": ch.sync_s / result["plans"] * 1e6,
            "plan_bytes": spread([float(s) for s in sizes], 1.0),
            "sync_every": ch.sync_every,
        } | rtt
        cluster.stop()
    result["ms_per_plan"] = result["wall_s"] / result["plans"] * 1e3
    Path(out).write_text(json.dumps(result))


def run(n: int, requests: int, tokens: int) -> dict:
    from qllm_jax.multiprocess import free_port

    coordinator = f"127.0.0.1:{free_port()}"
    env = os.environ | {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    coordinator,
                    str(n),
                    str(i),
                    str(out),
                    "--requests",
                    str(requests),
                    "--tokens",
                    str(tokens),
                ],
                env=env,
            )  # fmt: skip
            for i in range(n)
        ]
        for p in procs:
            if p.wait(timeout=900):
                raise SystemExit(f"a process of the {n}-process run failed ({p.returncode})")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", type=Path, default=RESULTS / "multiproc_overhead.json")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        coordinator, n, pid, out = args.worker
        worker(coordinator, int(n), int(pid), out, args.requests, args.tokens)
        return
    load = os.getloadavg()[0]
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "loadavg_1m_before": load,
        "workload": {"requests": args.requests, "tokens": args.tokens, "model": "mixtral-tiny"},
        "codec": codec(),
        "serve": {str(n): run(n, args.requests, args.tokens) for n in [1, *args.processes]},
        "loadavg_1m_after": os.getloadavg()[0],
    }
    base = result["serve"]["1"]["ms_per_plan"]
    for r in result["serve"].values():
        r["ms_per_plan_vs_1"] = r["ms_per_plan"] / base
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
