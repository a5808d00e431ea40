"""``serve --replicas 2``: two CPU engine replicas of the built-in model on a local Ray Serve,
behind the OpenAI front, routed by our dispatch policies (``qllm_jax.ray_serve``).

What is checked: one user's requests stick to one replica and their prefix-cache hits beat
round-robin's on the same sessions; ``service_tier`` and ``priority`` reach the replica's
scheduler (the priority its ``RequestOutput`` carries); a replica killed while it serves
requests loses none silently (each is answered, retried on the other replica, or a clear 5xx),
nothing hangs, and Ray Serve's replacement replica serves again.

One local Ray for the module; each deployment builds two engines (no warm-up, one shared
compilation cache); the tests run in an order that redeploys least (Serve keeps the replicas
of an unchanged deployment). Every wait is bounded (client timeouts, deadlines).
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the 'ray' extra (ray[serve]) is not installed")
from ray import serve  # noqa: E402

from qllm_jax import ray_serve  # noqa: E402

ENGINE = dict(
    dtype="float32",
    policy="qllm",
    granularity="layer",
    kv_pages=96,
    max_batch_size=8,
    max_num_batched_tokens=32,
    prefill_chunk=16,
    grow_pages=True,
)
PORT = 8791
TIMEOUT_S = 120  # any one HTTP call
DEPLOY_S = 240  # a deployment's replicas up (engine build + first compile on a loaded CPU)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray.init(num_cpus=4, include_dashboard=False, logging_level="error")
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    cache = str(tmp_path_factory.mktemp("jax-cache"))
    yield {"flags": ENGINE | {"compilation_cache_dir": cache}, "router": None}
    serve.shutdown()
    ray.shutdown()


def deploy(cluster, router: str) -> httpx.Client:
    """The app with two replicas under ``router`` (redeployed: fresh engines, empty caches)."""
    opts = ray_serve.ReplicaOptions(
        num_replicas=2, router=router, warmup=False, replica_cpus=0.5, health_check_period_s=1.0
    )
    t0 = time.monotonic()
    serve.run(
        ray_serve.build_app(cluster["flags"], opts), name=ray_serve.APP_NAME, route_prefix="/"
    )
    assert time.monotonic() - t0 < DEPLOY_S
    cluster["router"] = router
    return httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=TIMEOUT_S)


def complete(client: httpx.Client, prompt: str, **kw) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0} | kw
    return client.post("/v1/completions", json=body)


def sessions(client: httpx.Client, users: int = 3, turns: int = 4) -> dict[str, list[tuple]]:
    """Interleaved multi-turn sessions: each user repeats their own 4-page system prompt;
    per user, (replica, cached tokens) of each turn."""
    out: dict[str, list[tuple]] = {f"user{u}": [] for u in range(users)}
    for t in range(turns):
        for user in out:
            system = f"{user} asks. " * 16
            r = complete(client, system + f"turn {t}", user=user)
            assert r.status_code == 200, r.text
            cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            out[user].append((r.headers["x-qllm-replica"], cached))
            time.sleep(0.15)  # (one routing-stats period: the router sees the new pages)
    return out


def test_service_tier_and_priority_reach_the_replica_scheduler(cluster):
    client = deploy(cluster, "ours") if cluster["router"] != "ours" else _client()
    for kw, priority, tier in (
        ({}, 0, "default"),
        ({"service_tier": "flex"}, 1, "flex"),
        ({"service_tier": "priority"}, 0, "priority"),
        ({"service_tier": "priority", "priority": 3}, 3, "flex"),
    ):
        r = complete(client, "Tiers", **kw)
        assert r.status_code == 200, r.text
        assert r.json()["service_tier"] == tier, kw
        assert r.headers["x-qllm-priority"] == str(priority), kw
    bad = complete(client, "Tiers", service_tier="gold")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "service_tier"


def _client() -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=TIMEOUT_S)


def _replicas_running() -> int:
    app = serve.status().applications[ray_serve.APP_NAME]
    return app.deployments["EngineReplica"].replica_states.get("RUNNING", 0)


def _actor_of(replica_id: str):
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["name"].endswith(replica_id) and "EngineReplica" in a["name"]:
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")


@pytest.mark.slow
def test_a_killed_replica_loses_no_request_and_is_replaced(cluster):
    client = deploy(cluster, "ours") if cluster["router"] != "ours" else _client()
    victim = complete(client, "Victim session. " * 8, user="victim").headers["x-qllm-replica"]
    before = {victim}

    def ask(i: int) -> httpx.Response:
        return complete(client, "Victim session. " * 8 + str(i), user="victim", max_tokens=48)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(ask, i) for i in range(4)]
        time.sleep(1.0)  # (the requests are on the victim, decoding)
        ray.kill(_actor_of(victim))
        answers = [f.result(timeout=TIMEOUT_S) for f in futs]  # nothing hangs
    for r in answers:
        if r.status_code == 200:  # done before the kill, or retried on the other replica
            assert r.json()["usage"]["completion_tokens"] == 48
        else:  # a clear error, never a silent loss
            assert r.status_code >= 500, r.text
            assert "replica" in r.json()["error"]["message"], r.text
    assert any(r.status_code == 200 and r.headers["x-qllm-replica"] != victim for r in answers)

    deadline = time.monotonic() + DEPLOY_S
    while _replicas_running() < 2:
        assert time.monotonic() < deadline, "Ray Serve did not replace the killed replica"
        time.sleep(1.0)
    survivors = {r.headers["x-qllm-replica"] for r in answers if r.status_code == 200} - before
    seen: set[str] = set()
    deadline = time.monotonic() + TIMEOUT_S  # (the front's router learns of it by long poll)
    n = 0
    while not seen - before - survivors:
        n += 1
        assert time.monotonic() < deadline, f"the replacement never served: {seen}"
        r = complete(client, f"after the kill {n}", user=f"new{n}")
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-qllm-replica"])
        time.sleep(0.2)


def test_sticky_users_get_more_prefix_hits_than_round_robin(cluster):
    ours = sessions(deploy(cluster, "ours"))
    for user, turns in ours.items():
        assert len({rep for rep, _ in turns}) == 1, (user, turns)  # stuck to one replica
        assert all(c > 0 for _, c in turns[1:]), (user, turns)  # every later turn hits
    rr = sessions(deploy(cluster, "round_robin"))
    assert any(len({rep for rep, _ in turns}) == 2 for turns in rr.values()), rr
    hits = {
        name: sum(c for t in s.values() for _, c in t) for name, s in (("ours", ours), ("rr", rr))
    }
    assert hits["ours"] > hits["rr"], hits
