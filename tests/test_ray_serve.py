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

import asyncio
import concurrent.futures
import dataclasses
import time
import types

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the 'ray' extra (ray[serve]) is not installed")
from ray import serve  # noqa: E402

from qllm_jax import ray_serve  # noqa: E402
from qllm_jax.scheduler import dispatch  # noqa: E402
from qllm_jax.scheduler.pages import extend_hashes, reusable_pages  # noqa: E402

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
            time.sleep(0.5)  # (> the stats period and its broadcast: the router sees the pages)
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


# -- the router alone (no cluster) ---------------------------------------------------------------


class _Replica:
    """What ``DispatchRouter`` reads of a Ray Serve ``RunningReplica``."""

    def __init__(self, uid: str, stats: dict | None = None) -> None:
        self.replica_id = types.SimpleNamespace(unique_id=uid)
        self.routing_stats = stats or {}


def _stats(cached=(), waiting=(0, 0), page_size=16) -> dict:
    return {"signals": {"waiting": waiting}, "cached": list(cached), "page_size": page_size}


def _route(router, replicas, prompt, user=None):
    hint = ray_serve.RouteHint("r", tuple(prompt), 4, 0, user)
    pending = types.SimpleNamespace(args=[hint, "/v1/completions", {}], kwargs={})
    return asyncio.run(router.choose_replicas(replicas, pending))


def _router(policy: str) -> ray_serve.DispatchRouter:
    router = ray_serve.DispatchRouter.__new__(ray_serve.DispatchRouter)  # (no Ray internals)
    router.initialize_state(policy=policy, staleness_s=0.0)
    return router


def test_router_ranks_the_policys_choice_first_from_published_prefix_hashes():
    prompt = list(range(100, 150))  # 3 reusable pages of 16
    chain = extend_hashes([], prompt, 16, reusable_pages(len(prompt), 16))
    a, b = _Replica("a", _stats()), _Replica("b", _stats(cached=chain[:2]))
    router = _router("cache_aware")  # 32 of 50 tokens cached on b: above the 0.3 threshold
    assert _route(router, [a, b], prompt) == [[b], [a]]
    assert ray_serve.prefix_matches(tuple(prompt), [a.routing_stats, b.routing_stats]) == (0, 32)
    none = types.SimpleNamespace(args=[], kwargs={})  # a control call: any replica
    assert asyncio.run(router.choose_replicas([a, b], none)) == [[a, b]]


def test_router_slots_survive_a_replacement():
    router = _router("round_robin")
    a, b, c = _Replica("a"), _Replica("b"), _Replica("c")
    assert [_route(router, [a, b], [1, 2])[0][0] for _ in range(2)] == [a, b]
    assert _route(router, [a], [1, 2]) == [[a], []]  # b died: a alone
    assert router.slots["a"] == 0 and "c" not in router.slots
    _route(router, [c, a], [1, 2])  # c replaces b: it takes b's free slot, after a
    assert router.slots == {"a": 0, "b": 1, "c": 1}
    unmeasured = ray_serve.assume_unmeasured_slowest(
        [dispatch.Snapshot(replica=0, token_s=0.002), dispatch.Snapshot(replica=1)]
    )
    assert [s.token_s for s in unmeasured] == [0.002, 0.002]


def test_a_hint_from_a_by_value_copy_of_its_class_is_read():
    """Ray Serve ships the ingress class by value: its hints are of a copy of ``RouteHint``."""
    fields = [(f.name, f.type) for f in dataclasses.fields(ray_serve.RouteHint)]
    copy = dataclasses.make_dataclass("RouteHint", fields, frozen=True)
    pending = types.SimpleNamespace(args=[copy("r", (1, 2), 4, 0, None)], kwargs={})
    assert ray_serve._hint_of(pending) is pending.args[0]
    assert ray_serve._hint_of(types.SimpleNamespace(args=["RouteHint"], kwargs={})) is None


def test_replica_flags_need_replicas_and_are_checked(capsys):
    from qllm_jax import cli

    assert cli.main(["serve", "--router", "llmd"]) == 2
    assert "--router needs --replicas" in capsys.readouterr().err
    assert cli.main(["serve", "--replicas", "0", "--no-warmup"]) == 2
    assert "replicas must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown router 'fastest'"):
        ray_serve.ReplicaOptions(router="fastest")
