"""One process of a multi-process engine run by tests/test_multiprocess.py (also runnable on
its own: ``python tests/multiproc_worker.py COORDINATOR N ID OUT.json``; with N=0 it runs
one plain process). Process 0 serves the requests and writes their tokens to OUT.json.
Faults to inject: see ``_inject_faults``."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import qllm_jax
from qllm_jax import multiprocess

# greedy and seeded sampling, latency-sensitive and best-effort (the qllm policy preempts)
REQUESTS = [
    ([1, 5, 9, 13, 2, 7, 3], dict(max_tokens=6), 1),
    ([4, 4, 8], dict(max_tokens=5), 0),
    ([11, 3, 17, 19, 23, 29, 31, 37, 41, 43], dict(max_tokens=4, temperature=0.8, seed=7), 1),
    ([2, 6], dict(max_tokens=6, temperature=1.0, top_k=5, seed=3), 0),
]


def build(cluster: multiprocess.Cluster | None) -> qllm_jax.Engine:
    model = qllm_jax.random_model("mixtral-tiny", "float32", seed=1)
    extra = json.loads(os.environ.get("QLLM_TEST_ENGINE", "{}"))
    kw = dict(
        policy="qllm",
        kv_pages=32,
        page_size=8,
        max_model_len=64,
        max_batch_size=8,
        max_num_batched_tokens=32,
        compilation_cache_dir=None,
        **extra,
    )
    return qllm_jax.Engine(model, **kw) if cluster is None else cluster.engine(model, **kw)


def serve(engine: qllm_jax.Engine) -> dict[str, list[int]]:
    ids = [
        engine.add_request(p, qllm_jax.SamplingParams(**s), priority=prio)
        for p, s, prio in REQUESTS
    ]
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return {rid: done[rid] for rid in ids}


def main(coordinator: str, n: int, pid: int, out: str) -> int:
    if n == 0:
        tokens = serve(build(None))
    else:
        cluster = multiprocess.initialize(
            coordinator, n, pid, heartbeat_timeout_s=10, shutdown_timeout_s=10, sync_every=4
        )
        engine = build(cluster)
        _inject_faults(engine, cluster.leader)
        try:
            if not cluster.leader:
                cluster.follow(engine)
                cluster.stop()
                return 0
            cluster.lead(engine)
            tokens = serve(engine)
            cluster.stop()
        except Exception as e:  # noqa: BLE001 -- as the CLI does: say it and leave at once
            print(f"process {pid}: {type(e).__name__}: {e}", flush=True)
            os._exit(1)
    with open(out, "w") as f:
        json.dump(tokens, f)
    return 0


def _inject_faults(engine: qllm_jax.Engine, leader: bool) -> None:
    """QLLM_TEST_DIE_AFTER=K: a follower exits (status 17) after running K plans.
    QLLM_TEST_FAIL_AT=K: on process 0 only, the K-th attention call raises (a fault one
    process sees and the others do not)."""
    ex = engine.executor
    if not leader and "QLLM_TEST_DIE_AFTER" in os.environ:
        execute, plans, count = ex.execute, int(os.environ["QLLM_TEST_DIE_AFTER"]), [0]

        def dying(plan):
            if count[0] == plans:
                os._exit(17)
            count[0] += 1
            return execute(plan)

        ex.execute = dying
    if leader and "QLLM_TEST_FAIL_AT" in os.environ:
        attention, at, calls = ex.kernels.attention, int(os.environ["QLLM_TEST_FAIL_AT"]), [0]

        def failing(*args, **kw):
            calls[0] += 1
            if calls[0] == at:
                raise RuntimeError("injected fault")
            return attention(*args, **kw)

        ex.kernels = dataclasses.replace(ex.kernels, attention=failing)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
