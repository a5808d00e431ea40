"""``qllm-jax serve --replicas N``: N engine replicas as a Ray Serve deployment behind the
OpenAI-compatible HTTP front, routed by our dispatch policies (``scheduler/dispatch.py``).

Three pieces, all Ray Serve's own machinery (no home-made runtime):

- ``EngineReplica`` (a deployment, N replicas): one ``Engine`` driven by the HTTP server's
  ``EngineLoop`` thread, so a request is validated and queued exactly as ``qllm-jax serve``
  does it (``server.submit_body``: ``openai_api.prepare``, the LS-queue bound, priority and
  ``service_tier`` into the scheduler). Its ``generate`` streams the request's outputs.
  ``record_routing_stats`` publishes the replica's load signals (a ``dispatch.Snapshot``'s
  fields: waiting/running requests and tokens by class, prefill left, KV pages used and in all,
  step-time estimates) and the page hashes its prefix cache holds; ``check_health`` fails when
  the engine loop died, so Ray Serve replaces the replica.
- ``DispatchRouter`` (a Ray Serve ``RequestRouter``): ``choose_replicas`` turns the candidates'
  routing stats into snapshots (``LoadBoard``: re-read when older than the stats period, the
  router's own dispatches counted in between, as vLLM's balancer does), the request's prefix
  match on each replica from its published page hashes (what ``Engine.match_length`` answers
  there, as of the publication) and hands them to the policy ``--router`` names; the chosen
  replica is the first rank, the others the fallback.
- ``Frontend`` (the HTTP ingress, one replica): the OpenAI routes. It tokenizes the prompt for
  routing only (the replica validates); a replica that dies before the answer reached the client
  is retried on another (``retries`` times), a stream that already sent text ends with an error
  event; every failure is an OpenAI error JSON, none is silent.

Unsupported here (the single-engine server has them): ``/v1/files``, ``/v1/batches`` and
``/metrics`` (a replica's queues, KV use and row counters by class are in its routing stats).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from qllm_jax import compile_log, openai_api
from qllm_jax.scheduler import dispatch
from qllm_jax.scheduler.pages import extend_hashes, reusable_pages

log = logging.getLogger("qllm_jax.ray_serve")

APP_NAME = "qllm"
DEFAULT_ROUTER = "ours"
DEFAULT_STATS_PERIOD_S = 0.1  # Ray Serve's default (10 s) is far too stale for dispatch
DEFAULT_RETRIES = 2  # attempts after the first when a replica dies under a request
_STEP_EWMA = 0.2  # weight of the newest step time in the replica's step-time estimate
_REPLICA_ERRORS = (RayActorError, ReplicaUnavailableError)


@dataclasses.dataclass(frozen=True)
class RouteHint:
    """What the router reads of a request (``PendingRequest.args[0]``): its prompt as token ids
    (empty when the front could not tokenize it: the replica then refuses it), size, class and
    user."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    priority: int
    user: str | None


# ----------------------------------------------------------------------------------------------
# The replica


class EngineReplica:
    """One engine replica (the deployment's class; ``build_app`` wraps it).

    ``flags``: engine flags (``cli.engine_flags``' form); ``warmup``: compile every executable
    before serving (Ray Serve sends no request before the constructor returns)."""

    def __init__(self, flags: dict[str, Any], warmup: bool = True, max_waiting_ls: int = 256):
        import sys

        from qllm_jax import cli, server

        # As in `qllm-jax serve`: the engine thread shares the GIL with the replica's event loop,
        # which answers Ray's queue-length probes; CPython's 5 ms switch interval would make
        # those miss their deadline (and Ray would route past the policy's choice).
        sys.setswitchinterval(0.0005)
        self.engine = cli.build_engine(flags)
        if warmup:
            self.engine.warmup()
        state_dir = tempfile.mkdtemp(prefix="qllm-replica-")  # batches are not served here
        self.state = server.build_state(self.engine, state_dir, max_waiting_ls=max_waiting_ls)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.step_s = 0.0  # EWMA of the wall time of a busy engine step
        self._last_step: float | None = None  # when the last step ended, if more work followed
        self._compiles = compile_log.count()
        self.engine.add_step_hook(self._on_step)
        self.state.loop.start()

    def _on_step(self) -> None:  # the engine thread, between two steps
        """Time the step that just ended into ``step_s``, unless the engine was idle before it
        or it compiled (a compile's seconds say nothing of the replica's speed)."""
        now, compiles = time.monotonic(), compile_log.count()
        if self._last_step is not None and compiles == self._compiles:
            dt = now - self._last_step
            self.step_s = (
                dt if self.step_s == 0 else (1 - _STEP_EWMA) * self.step_s + _STEP_EWMA * dt
            )
        self._last_step = now if self.engine.has_unfinished() else None
        self._compiles = compiles

    async def generate(self, hint: RouteHint, endpoint: str, body: dict[str, Any]):
        """Validate and queue ``body``, then stream: ``("error", status, error_json)``, or
        ``("prepared", Prepared, replica_id, system_fingerprint)`` and then every
        ``("output", RequestOutput)`` until the finished one. A caller that goes away
        (cancelled) has its request aborted before the engine's next step."""
        from qllm_jax import server

        try:
            prepared, stream = await server.submit_body(self.state, endpoint, body, hint.request_id)
        except server.APIError as e:
            yield ("error", e.status, openai_api.error_body(str(e), e.type, e.param, e.code))
            return
        except openai_api.BadRequest as e:
            yield ("error", 400, e.body())
            return
        yield ("prepared", prepared, self.replica_id, self.state.system_fingerprint)
        finished = False
        try:
            while not finished:
                out = await stream.next()
                finished = out.finished
                yield ("output", out)
        finally:
            if not finished:
                self.state.loop.abort(hint.request_id)

    async def record_routing_stats(self) -> dict[str, Any]:
        """The load signals the router reads (Ray Serve polls this every stats period), read
        on the engine thread between two steps (nothing else touches the engine)."""
        return await self.state.loop.run(self._routing_stats)

    def _routing_stats(self) -> dict[str, Any]:  # the engine thread
        s, cfg = self.engine.scheduler, self.engine.config
        busy = self.engine.has_unfinished()
        signals = dispatch.queue_signals(s.waiting, s.admitted) | dict(
            kv_used=s.allocator.num_used,
            kv_total=s.allocator.num_pages - 1,
            # Estimates from the recent step times (the engine has no cost model): a busy
            # step's time left, one segment of it, a full step's time per batched token.
            pass_left_s=self.step_s if busy else 0.0,
            segment_s=self.step_s / max(1, len(self.engine.executor.segments)) if busy else 0.0,
            token_s=self.step_s / cfg.max_num_batched_tokens,
            preemptive=cfg.policy == "qllm" and cfg.preempt,
        )
        return {
            "replica": self.replica_id,
            "signals": signals,
            "cached": s.allocator.cached_keys(),
            "page_size": cfg.page_size,
            "rows": {"ls": s.counters["rows_ls"], "be": s.counters["rows_be"]},
        }

    async def info(self) -> dict[str, Any]:
        """The replica's identity, model and engine counters (the front's ``/v1/models``)."""
        import qllm_jax

        stats = await self.state.loop.run(self.engine.stats)
        return {
            "replica": self.replica_id,
            "model_name": self.state.model_name,
            "system_fingerprint": self.state.system_fingerprint,
            "max_model_len": self.engine.config.max_model_len,
            "qllm_jax": str(Path(qllm_jax.__file__).parent),
            "stats": stats,
        }

    def check_health(self) -> None:
        """Ray Serve's health check: a dead engine loop fails it (the replica is replaced)."""
        if not self.state.loop.alive:
            raise RuntimeError(f"the engine loop died: {self.state.loop.error!r}")

    def __del__(self) -> None:
        state = getattr(self, "state", None)
        if state is not None:
            state.loop.stop(timeout=10)


# ----------------------------------------------------------------------------------------------
# The router


class DispatchRouter(FIFOMixin, RequestRouter):
    """A Ray Serve request router over ``dispatch.POLICIES`` (see the module docstring).

    Replicas keep a slot number from when the router first sees them (a replacement takes the
    free slot of the one it replaces), so a policy's indices (round-robin's cursor, sticky users)
    keep pointing at the same replica while the set does not change; while one is missing, the
    present ones are numbered densely in slot order."""

    # Ray probes the chosen replica's queue length before sending (to respect
    # max_ongoing_requests) and falls back to the next rank when the answer is late; its
    # 0.1 s default deadline is often missed by a replica whose host is busy stepping, which
    # would override the policy. Ours: 0.5 s, growing to 2 s on repeated misses.
    queue_len_response_deadline_s = 0.5
    max_queue_len_response_deadline_s = 2.0

    def initialize_state(
        self,
        policy: str = DEFAULT_ROUTER,
        staleness_s: float = DEFAULT_STATS_PERIOD_S,
        seed: int = 0,
    ) -> None:
        self.policy_name = policy
        self.policy = dispatch.make_policy(policy, seed=seed)
        self.staleness_s = staleness_s
        self.slots: dict[str, int] = {}
        self.board: dispatch.LoadBoard | None = None
        self.board_ids: tuple[str, ...] = ()
        self.dispatched: dict[str, int] = {}  # replica -> requests routed there (tests, logs)

    def _slot(self, replica_id: str, present: set[str]) -> int:
        if replica_id not in self.slots:
            taken = {s for r, s in self.slots.items() if r in present}
            self.slots[replica_id] = next(i for i in range(len(self.slots) + 1) if i not in taken)
        return self.slots[replica_id]

    def _ordered(self, candidates: list[RunningReplica]) -> list[RunningReplica]:
        present = {r.replica_id.unique_id for r in candidates}
        return sorted(candidates, key=lambda r: self._slot(r.replica_id.unique_id, present))

    def _board(self, order: list[RunningReplica]) -> dispatch.LoadBoard:
        """The load board over ``order`` (a new one when the replica set changed)."""
        ids = tuple(r.replica_id.unique_id for r in order)
        read = lambda i: snapshot_from_stats(i, order[i].routing_stats)
        if self.board is None or ids != self.board_ids:
            self.board_ids = ids
            self.board = dispatch.LoadBoard(len(order), read, staleness_s=self.staleness_s)
        self.board.read = read  # (the same replicas, their current wrappers)
        return self.board

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        hint = _hint_of(pending_request)
        if hint is None or not candidate_replicas:  # (a control call: any replica)
            return [candidate_replicas]
        order = self._ordered(candidate_replicas)
        board = self._board(order)
        snaps = assume_unmeasured_slowest(board.view(time.monotonic()))
        req = dispatch.DispatchRequest(
            request_id=hint.request_id,
            prompt_len=len(hint.prompt_token_ids),
            max_tokens=hint.max_tokens,
            priority=hint.priority,
            user=hint.user,
            match=prefix_matches(hint.prompt_token_ids, [r.routing_stats for r in order]),
        )
        r = self.policy.choose(req, snaps)
        board.dispatched(r, req)
        rid = order[r].replica_id.unique_id
        self.dispatched[rid] = self.dispatched.get(rid, 0) + 1
        return [[order[r]], [x for i, x in enumerate(order) if i != r]]


def _hint_of(pending: PendingRequest | None) -> RouteHint | None:
    """The request's ``RouteHint`` (None: a call without one, e.g. ``info``). Compared by
    name, not ``isinstance``: Ray Serve ships the ingress class by value, so the front's
    hints are instances of its own copy of the class."""
    if pending is None or not pending.args:
        return None
    hint = pending.args[0]
    if type(hint).__name__ != RouteHint.__name__ or not dataclasses.is_dataclass(hint):
        return None
    return hint


def snapshot_from_stats(index: int, stats: dict[str, Any] | None) -> dispatch.Snapshot:
    """Replica ``index``'s ``Snapshot`` from its routing stats (none yet: an idle replica)."""
    if not stats or "signals" not in stats:
        return dispatch.Snapshot(replica=index)
    return dispatch.Snapshot(replica=index, **stats["signals"])


def assume_unmeasured_slowest(snaps: list[dispatch.Snapshot]) -> list[dispatch.Snapshot]:
    """A replica that has not stepped yet (a new or replaced one) publishes no per-token time;
    it is taken as the slowest measured one's (else it would look infinitely fast, and a
    per-token wait would pull every request, sticky users' too, onto it)."""
    slowest = max((s.token_s for s in snaps), default=0.0)
    return [s if s.token_s else dataclasses.replace(s, token_s=slowest) for s in snaps]


def prefix_matches(
    token_ids: tuple[int, ...], stats: list[dict[str, Any] | None]
) -> tuple[int, ...]:
    """Each replica's cached prefix of the prompt (tokens), from the page hashes it published."""
    out, chains = [], {}
    for st in stats:
        if not st or not token_ids or "cached" not in st:
            out.append(0)
            continue
        ps = st["page_size"]
        if ps not in chains:
            chains[ps] = extend_hashes([], token_ids, ps, reusable_pages(len(token_ids), ps))
        out.append(dispatch.cached_match(chains[ps], set(st["cached"]), ps))
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# The HTTP front


class _Encoder:
    """The part of an ``Engine`` that ``openai_api.prompt_token_ids`` needs, over the model's
    tokenizer alone (the front holds no weights)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token id lists")
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]


class _RemoteCall:
    """One request's stream of outputs from a replica, with retries. It plays both the stream
    and the server state that ``server._complete`` / ``server._sse`` read (``next()``,
    ``loop.abort``, ``model_name``, ``system_fingerprint``), so the front answers exactly as the
    single-engine server does."""

    def __init__(self, handle, hint: RouteHint, endpoint: str, body: dict, retries: int, name: str):
        self.handle, self.hint, self.endpoint, self.body = handle, hint, endpoint, body
        self.retries, self.model_name = retries, name
        self.loop = self  # (server._complete calls state.loop.abort)
        self.system_fingerprint: str | None = None
        self.replica: str | None = None
        self.attempts = 0
        self.delivered = False  # an output with text has gone to the client (streaming)
        self.streaming = bool(body.get("stream"))
        self.last = None
        self.gen = None

    async def start(self) -> openai_api.Prepared:
        """Queue the request on a replica; its ``Prepared``. ``APIError`` for a replica's
        refusal (its status) or when every attempt met a dying replica (503)."""
        from qllm_jax.server import APIError

        while True:
            self.attempts += 1
            self.gen = self.handle.options(stream=True).generate.remote(
                self.hint, self.endpoint, self.body
            )
            try:
                first = await self.gen.__anext__()
            except _REPLICA_ERRORS as e:
                self._give_up_unless_retry(e)
                continue
            except StopAsyncIteration:
                raise APIError(
                    500, "the replica ended the request without an answer", "server_error"
                ) from None
            if first[0] == "error":
                _, status, err = first
                raise _ReplicaRefusal(status, err)
            _, prepared, self.replica, self.system_fingerprint = first
            return prepared

    def _give_up_unless_retry(self, e: BaseException) -> None:
        from qllm_jax.server import APIError

        log.warning(
            "request %s: replica failed (%s), attempt %d", self.hint.request_id, e, self.attempts
        )
        if self.attempts > self.retries:
            raise APIError(
                503,
                f"the replica serving this request failed {self.attempts} times "
                f"(last: {type(e).__name__}: {e}); retry later",
                "server_error",
            ) from e

    async def next(self):
        """The next output; a replica that dies restarts the request on another one while the
        client has seen nothing of it, else ends it with ``finish_reason="error"``."""
        while True:
            try:
                item = await self.gen.__anext__()
            except _REPLICA_ERRORS as e:
                if self.delivered or self.attempts > self.retries:
                    return self._failed(f"the replica serving this request died: {e}")
                log.warning(
                    "request %s: replica died mid-request (%s): retried", self.hint.request_id, e
                )
                try:
                    await self.start()
                except Exception as e2:
                    return self._failed(str(e2))
                continue
            except StopAsyncIteration:
                return self._failed("the replica ended the stream before the request finished")
            out = item[1]
            self.last = out
            if self.streaming and out.token_ids:
                self.delivered = True
            return out

    def _failed(self, message: str):
        from qllm_jax.engine import RequestMetrics, RequestOutput

        base = self.last or RequestOutput(
            request_id=self.hint.request_id,
            prompt_token_ids=list(self.hint.prompt_token_ids),
            token_ids=[],
            text=None,
            finished=True,
            finish_reason="error",
            priority=self.hint.priority,
            metrics=RequestMetrics(arrival_time=0.0, first_token_time=None, finish_time=None),
        )
        return dataclasses.replace(base, finished=True, finish_reason="error", error=message)

    def abort(self, request_id: str) -> None:
        """The client went away: cancel the replica's generator (it aborts the request)."""
        if self.gen is not None:
            self.gen.cancel()


class _ReplicaRefusal(Exception):
    """A replica refused the request (its validation): answered with its status and JSON."""

    def __init__(self, status: int, body: dict) -> None:
        super().__init__(body["error"]["message"])
        self.status, self.body = status, body


@serve.ingress()
class Frontend:
    """The HTTP ingress (``build_app`` makes it a deployment). ``replicas``: the engine
    deployment's handle."""

    def __init__(self, replicas, model_name: str, tokenizer_dir: str | None, retries: int) -> None:
        from qllm_jax import server

        self.replicas, self.model_name, self.retries = replicas, model_name, retries
        tokenizer = None
        if tokenizer_dir is not None:
            from qllm_jax.models import load_tokenizer

            tokenizer = load_tokenizer(Path(tokenizer_dir))
        self.encoder = _Encoder(tokenizer)
        self.metrics = server.Metrics(model_name)  # (the error handlers count rejections)
        self._card: dict | None = None

    def __serve_build_asgi_app__(self):
        from qllm_jax import server

        app = FastAPI(title="qllm-jax (Ray Serve)")
        server._add_error_handlers(app, self)

        @app.exception_handler(_ReplicaRefusal)
        async def refused(request: Request, e: _ReplicaRefusal) -> Response:
            return JSONResponse(e.body, status_code=e.status)

        @app.get("/health")
        async def health() -> Response:
            return JSONResponse({"status": "ok"})

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [await self.card()]}

        @app.get("/v1/models/{model_id:path}")
        async def model(model_id: str) -> dict:
            if model_id != self.model_name:
                raise server._unknown_model(model_id)
            return await self.card()

        async def generate(request: Request, endpoint: str) -> Response:
            body = await server._json_body(request)
            if body.get("model") is not None and body["model"] != self.model_name:
                raise server._unknown_model(body["model"])
            call = _RemoteCall(
                self.replicas, self.hint(endpoint, body), endpoint, body, self.retries,
                self.model_name,
            )  # fmt: skip
            prepared = await call.start()
            rid, created = call.hint.request_id, int(time.time())
            if prepared.stream:
                return StreamingResponse(
                    server._sse(call, prepared, call, rid, created),
                    media_type="text/event-stream",
                    headers={
                        "Cache-Control": "no-cache",
                        "X-Accel-Buffering": "no",
                        "x-qllm-replica": call.replica or "",
                    },
                )
            resp = await server._complete(call, request, prepared, call, rid, created)
            # Which replica answered (after any retry) and the priority its scheduler ran.
            resp.headers["x-qllm-replica"] = call.replica or ""
            resp.headers["x-qllm-priority"] = str(call.last.priority)
            return resp

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await generate(request, openai_api.COMPLETIONS)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await generate(request, openai_api.CHAT)

        return app

    def hint(self, endpoint: str, body: dict[str, Any]) -> RouteHint:
        """What the router needs; a body the front cannot read routes as an empty prompt (the
        replica's validation then answers it)."""
        try:
            ids = tuple(openai_api.prompt_token_ids(self.encoder, endpoint, body))
        except (openai_api.BadRequest, ValueError, TypeError):
            ids = ()
        try:
            priority = openai_api.priority_of(body)[0]
        except openai_api.BadRequest:
            priority = 0
        given = body.get("max_completion_tokens", body.get("max_tokens"))
        user = body.get("user")
        return RouteHint(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=ids,
            max_tokens=given if isinstance(given, int) and given > 0 else 0,
            priority=priority if isinstance(priority, int) else 0,
            user=user if isinstance(user, str) else None,
        )

    async def card(self) -> dict:
        if self._card is None:
            info = await self.replicas.info.remote()
            self._card = {"max_model_len": info["max_model_len"]}
        return {
            "id": self.model_name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "qllm-jax",
            **self._card,
        }


# ----------------------------------------------------------------------------------------------
# Launching


@dataclasses.dataclass(frozen=True)
class ReplicaOptions:
    """How the replicas run. ``replica_cpus``/``replica_gpus``: Ray resources each replica
    reserves (a GPU machine: ``replica_gpus=1`` puts one replica on each GPU)."""

    num_replicas: int = 2
    router: str = DEFAULT_ROUTER
    stats_period_s: float = DEFAULT_STATS_PERIOD_S
    retries: int = DEFAULT_RETRIES
    warmup: bool = True
    max_waiting_ls: int = 256
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    health_check_period_s: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.num_replicas}")
        if self.router not in dispatch.POLICIES:
            raise ValueError(f"unknown router {self.router!r}; known: {sorted(dispatch.POLICIES)}")
        if self.stats_period_s <= 0:
            raise ValueError(f"stats period must be > 0 s, got {self.stats_period_s}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


def model_identity(flags: dict[str, Any], served_model_name: str | None) -> tuple[str, str | None]:
    """The served model name and the directory of its tokenizer (None: a random model, which
    has none), from the engine flags, as ``server.served_model_name`` names it."""
    import qllm_jax

    spec = flags.get("model")
    if spec is not None and spec.startswith("random:"):
        return served_model_name or spec, None
    path = Path(spec) if spec is not None else Path(qllm_jax.builtin_model_dir())
    return served_model_name or path.name, str(path)


def build_app(flags: dict[str, Any], opts: ReplicaOptions, served_model_name: str | None = None):
    """The Ray Serve application: ``Frontend`` over ``opts.num_replicas`` ``EngineReplica``s
    routed by ``DispatchRouter`` with policy ``opts.router``."""
    name, tokenizer_dir = model_identity(flags, served_model_name)
    router = RequestRouterConfig(
        request_router_class=DispatchRouter,
        request_router_kwargs={
            "policy": opts.router,
            "staleness_s": opts.stats_period_s,
            "seed": opts.seed,
        },
        request_routing_stats_period_s=opts.stats_period_s,
        request_routing_stats_timeout_s=max(5.0, 10 * opts.stats_period_s),
    )
    engine = serve.deployment(
        EngineReplica,
        name="EngineReplica",
        num_replicas=opts.num_replicas,
        max_ongoing_requests=max(8, opts.max_waiting_ls + 64),
        request_router_config=router,
        ray_actor_options={"num_cpus": opts.replica_cpus, "num_gpus": opts.replica_gpus},
        health_check_period_s=opts.health_check_period_s,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0,
    ).bind(flags, opts.warmup, opts.max_waiting_ls)
    front = serve.deployment(
        Frontend,
        name="Frontend",
        num_replicas=1,
        max_ongoing_requests=4096,
        ray_actor_options={"num_cpus": 0},
    )
    return front.bind(engine, name, tokenizer_dir, opts.retries)


def start(
    flags: dict[str, Any],
    opts: ReplicaOptions,
    host: str = "127.0.0.1",
    port: int = 8000,
    ray_address: str | None = None,
    served_model_name: str | None = None,
    blocking: bool = False,
):
    """Connect to Ray (``ray_address``: an existing cluster, e.g. ``auto`` or
    ``ray://head:10001``; None: start a local one sized for the replicas) and run the app with
    its HTTP proxy on ``host:port``. Returns the front's deployment handle."""
    import os

    import ray

    if not ray.is_initialized():
        if ray_address is None:
            cpus = max(os.cpu_count() or 1, int(opts.num_replicas * opts.replica_cpus) + 1)
            ray.init(num_cpus=cpus, include_dashboard=False, logging_level="warning")
        else:
            ray.init(address=ray_address, logging_level="warning")
    serve.start(http_options={"host": host, "port": port})
    app = build_app(flags, opts, served_model_name)
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=blocking)


def stop() -> None:
    """Delete the app and disconnect from Ray (a local Ray started by ``start`` stops too)."""
    import ray

    with contextlib.suppress(Exception):  # (already down: nothing to stop)
        serve.delete(APP_NAME)
    ray.shutdown()
