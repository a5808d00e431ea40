"""One engine over several processes (one per host), on JAX's own distributed runtime.

JAX is multi-controller: every process runs the same program and issues the same jitted calls
in the same order on a global mesh spanning all processes' devices. Here process 0 (the
*leader*) runs the scheduler, the HTTP server and an executor; every other process (a
*follower*) runs only an executor. Plans are plain data (``scheduler.plan``), so the leader
publishes each plan, as JSON, in the distributed runtime's key-value store before it executes
it, and each follower reads them in order and executes them with the same executor code: the
executors' ledgers, carries and KV caches stay identical, and every collective has all its
participants.

A message also carries the leader's result of the plan before it (tokens, failed rows, KV
reset), and each follower checks its own against it: a process that diverged stops with an
error naming the plan instead of feeding wrong data into later collectives. Every
``sync_every`` messages, after a warm-up and at the stop, all processes meet at a barrier: it
bounds how far the leader runs ahead and lets it delete the messages everyone has read. A
follower that fails reports its error in the store and meets the leader at its next barrier,
where the leader raises ``ClusterError`` with it. A process that dies outright misses its
heartbeats (``heartbeat_timeout_s``): the leader's barrier fails naming it, or the runtime
terminates the others with a message naming it; on CPU a collective waiting for a dead peer
fails after ``--xla_cpu_collective_call_terminate_timeout_seconds``.

Durable jobs (``export_kv`` / ``import_kv`` / rows) are not carried across processes: they read
device arrays into one host's memory, which a sharded cache does not allow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from qllm_jax.models import Model
from qllm_jax.scheduler.plan import Plan, StepResult, decode_plan, encode_plan

_PREFIX = "qllm"
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_call_terminate_timeout_seconds"


class ClusterError(RuntimeError):
    """The processes of a multi-process engine no longer agree or no longer answer."""


@dataclasses.dataclass
class Channel:
    """An ordered stream of JSON messages from process 0 to all others, over the distributed
    runtime's key-value store (a gRPC call to the coordinator per message and reader)."""

    client: Any  # jax's DistributedRuntimeClient
    process_id: int
    sync_every: int = 32
    barrier_timeout_s: float = 600.0
    poll_s: float = 1.0  # a follower's wait per get (its signal handlers run in between)
    sent: int = 0  # messages sent (leader) or received (follower)
    sync_s: float = 0.0  # time spent at barriers

    def send(self, kind: str, **body: Any) -> None:
        """Publish the next message (leader only)."""
        data = json.dumps({"kind": kind, **body}, separators=(",", ":")).encode()
        self.client.key_value_set_bytes(f"{_PREFIX}/msg/{self.sent}", data)
        self.sent += 1

    def receive(self) -> dict[str, Any]:
        """The next message (followers), waiting for it as long as it takes."""
        key = f"{_PREFIX}/msg/{self.sent}"
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(key, int(self.poll_s * 1000))
                break
            except Exception as e:  # noqa: BLE001 -- jaxlib raises its own runtime error
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise ClusterError(f"process {self.process_id} lost the leader: {e}") from e
        self.sent += 1
        return json.loads(data)

    def due(self) -> bool:
        """Whether the message just sent/received is followed by a barrier (same rule on every
        process, so they meet)."""
        return self.sent % self.sync_every == 0

    def sync(self) -> None:
        """All processes meet; the leader then deletes the messages everyone has read, or
        raises ``ClusterError`` with the errors followers have reported (``report``)."""
        t0 = time.perf_counter()
        try:
            self.client.wait_at_barrier(
                f"{_PREFIX}/sync/{self.sent}", int(self.barrier_timeout_s * 1000)
            )
        except Exception as e:  # noqa: BLE001
            raise ClusterError(
                f"process {self.process_id}: the processes did not all reach the barrier "
                f"after message {self.sent} (timeout {self.barrier_timeout_s:g} s): {e} "
                f"{self._errors()}"
            ) from e
        if self.process_id == 0:
            if errors := self._errors():  # a follower that failed reports, then comes here
                raise ClusterError(f"a follower stopped: {errors}")
            self.client.key_value_delete(f"{_PREFIX}/msg/")
        self.sync_s += time.perf_counter() - t0

    def report(self, message: str) -> None:
        """Leave an error for process 0 to find at its next barrier (best effort)."""
        with contextlib.suppress(Exception):
            self.client.key_value_set(f"{_PREFIX}/error/{self.process_id}", message, True)

    def _errors(self) -> str:
        """Errors processes have reported, as "process I: message; ..." ("" if none)."""
        with contextlib.suppress(Exception):
            found = self.client.key_value_dir_get(f"{_PREFIX}/error/")
            return "; ".join(f"process {k.rsplit('/', 1)[-1]}: {v}" for k, v in found)
        return ""


def _result(result: StepResult) -> dict[str, Any]:
    """What a follower compares: a step's result as JSON-ready data."""
    return {
        "tokens": [[seq, tok] for seq, tok in sorted(result.tokens.items())],
        "failed": sorted(result.failed),
        "reset": result.reset,
    }


class LeaderExecutor:
    """Process 0's executor: publishes every plan and warm-up before running it itself.

    Stands in for the engine's ``Executor`` (attributes are forwarded), so ``Engine.step``,
    ``Engine.warmup`` and the server run unchanged."""

    def __init__(self, inner, channel: Channel, mesh: Mesh) -> None:
        self.inner = inner
        self.channel = channel
        self.mesh = mesh
        self.last: dict[str, Any] | None = None  # the result of the previous plan
        self.broadcast_s = 0.0  # time spent encoding and publishing plans

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def execute(self, plan: Plan) -> StepResult:
        t0 = time.perf_counter()
        self.channel.send("plan", plan=encode_plan(plan), prev=self.last)
        self.broadcast_s += time.perf_counter() - t0
        if self.channel.due():
            self.channel.sync()
        with jax.set_mesh(self.mesh):
            result = self.inner.execute(plan)
        self.last = _result(result)
        return result

    def warmup(self, *args: Any) -> int:
        self.channel.send("warmup", args=list(args))
        with jax.set_mesh(self.mesh):
            n = self.inner.warmup(*args)
        self.channel.sync()
        return n

    def _single_host(self, *args: Any, **kw: Any):
        raise ClusterError(
            "durable jobs (KV and carry export/import) are not supported on a multi-process "
            "engine: run them on one process"
        )

    export_kv = import_kv = export_rows = import_rows = _single_host


# engine options that copy device state to one host: KV swap, expert placement; and int8
# (loaded replicated here without it)
_SINGLE_PROCESS_OPTIONS = (
    "swap_space",
    "swap_pages",
    "redundant_experts",
    "rebalance_every",
    "quantize",
)


class Cluster:
    """This process's place in a multi-process engine (from ``initialize``)."""

    def __init__(self, client: Any, process_id: int, num_processes: int, **channel: Any) -> None:
        self.process_id = process_id
        self.num_processes = num_processes
        self.channel = Channel(client, process_id, **channel)
        self.mesh = Mesh(np.array(jax.devices()), ("data",))  # every process's devices
        self._lead: LeaderExecutor | None = None  # process 0's, once it leads
        self._pending = False  # (followers) process 0 meets us after the last message

    @property
    def leader(self) -> bool:
        return self.process_id == 0

    def engine(self, model: str | os.PathLike | Model, **engine_kw: Any):
        """This process's ``Engine`` of ``model`` (a checkpoint directory or a ``Model``), the
        same call on every process. With ``expert_parallel`` / ``tensor_parallel`` (or a
        ``mesh``) the engine shards itself over the first devices of ``jax.devices()``, which
        span every process; without, its weights and KV cache are replicated on every device
        of every process."""
        from qllm_jax.engine import Engine
        from qllm_jax.models import load

        for name in _SINGLE_PROCESS_OPTIONS:  # each reads device arrays back into one host
            if engine_kw.get(name):
                raise ValueError(f"{name} is not supported across processes yet")
        parallel = engine_kw.get("expert_parallel", 1) * engine_kw.get("tensor_parallel", 1)
        if parallel > 1 or engine_kw.get("mesh") is not None:
            return Engine(model, **engine_kw)  # sharded over jax.devices(): every process's
        if not isinstance(model, Model):
            model = load(model, dtype=engine_kw.pop("dtype", "auto"))
        params = jax.device_put(model.params, NamedSharding(self.mesh, PartitionSpec()))
        with jax.set_mesh(self.mesh):  # arrays the engine creates (its KV cache) go there too
            return Engine(dataclasses.replace(model, params=params), **engine_kw)

    def lead(self, engine) -> None:
        """Make ``engine`` (process 0's) publish its plans to the followers."""
        if not self.leader:
            raise ClusterError(f"process {self.process_id} is a follower: call follow()")
        self.channel.send("config", config=engine_config(engine))
        self._lead = LeaderExecutor(engine.executor, self.channel, self._mesh(engine))
        engine.executor = self._lead

    def follow(self, engine) -> int:
        """Run the plans process 0 publishes on ``engine``'s executor until it says stop;
        returns the number of plans run. A disagreement raises ``ClusterError`` (also left in
        the key-value store for the leader to report)."""
        if self.leader:
            raise ClusterError("process 0 leads: call lead()")
        try:
            return self._follow(engine.executor, engine_config(engine), self._mesh(engine))
        except Exception as e:
            self.channel.report(f"{type(e).__name__}: {e}")
            self._meet_leader()
            raise

    def _mesh(self, engine) -> Mesh:
        """The mesh the engine's calls run under: its own, or all devices (replicated)."""
        return getattr(engine, "mesh", None) or self.mesh

    def _follow(self, executor, config: dict[str, Any], mesh: Mesh) -> int:
        plans, last = 0, None
        while True:
            msg = self._next()
            kind = msg["kind"]
            if kind == "config":
                _check_config(msg["config"], config, self.process_id)
            elif kind == "plan":
                self._sync_pending()  # process 0 meets there before it executes the plan
                self._check_prev(msg, last, plans)
                with jax.set_mesh(mesh):
                    last = _result(executor.execute(decode_plan(msg["plan"])))
                plans += 1
            elif kind == "warmup":
                with jax.set_mesh(mesh):
                    executor.warmup(*msg["args"])
                self._sync_pending()
            elif kind == "stop":
                self._check_prev(msg, last, plans)
                self._sync_pending()
                return plans
            else:
                raise ClusterError(f"unknown message kind {kind!r} from process 0")

    def _next(self) -> dict[str, Any]:
        """The next message, noting whether process 0 meets the others at a barrier after it
        (plans every ``sync_every`` messages, every warm-up and the stop)."""
        msg = self.channel.receive()
        kind = msg["kind"]
        self._pending = kind in ("warmup", "stop") or (kind == "plan" and self.channel.due())
        return msg

    def _sync_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.channel.sync()

    def _check_prev(self, msg: dict[str, Any], last: dict[str, Any] | None, plans: int) -> None:
        if msg.get("prev") is not None and msg["prev"] != last:
            raise ClusterError(
                f"process {self.process_id} diverged from process 0 at plan {plans - 1}: it "
                f"got {last}, process 0 got {msg['prev']}"
            )

    def _meet_leader(self) -> None:
        """After an error (reported): meet process 0 at its next barrier without executing
        anything more, so that it passes the barrier, finds the report and stops with it
        (instead of waiting there until this process misses its heartbeats)."""
        with contextlib.suppress(Exception):  # process 0 may be gone too
            while not self._pending:
                self._next()
            self._sync_pending()

    def stop(self) -> None:
        """Leave the distributed runtime; process 0 first tells the followers to stop and waits
        for them all at a last barrier (``ClusterError`` if one has failed: the runtime's
        shutdown would only wait for it, so it is skipped)."""
        if self.leader:
            self.channel.send("stop", prev=getattr(self._lead, "last", None))
            self.channel.sync()
        jax.distributed.shutdown()


def engine_config(engine) -> dict[str, Any]:
    """What every process's engine must agree on for the same plans to mean the same calls."""
    ex, model = engine.executor, engine.model
    return {
        "model": dataclasses.asdict(model.config),
        "dtype": str(model.dtype),
        "kv_pages": ex.num_pages,
        "page_size": ex.page_size,
        "max_model_len": ex.max_model_len,
        "max_batch_size": ex.max_batch_size,
        "max_num_batched_tokens": ex.max_rows,
        "expert_group_size": ex.group_size,
        "mode": ex.mode,
        "lookahead": ex.lookahead,
        "devices": jax.device_count(),
        "mesh": None if getattr(engine, "mesh", None) is None else dict(engine.mesh.shape),
    }


def _check_config(leader: dict[str, Any], mine: dict[str, Any], process_id: int) -> None:
    mine = json.loads(json.dumps(mine))  # as the leader's went through JSON
    bad = [k for k in leader.keys() | mine.keys() if leader.get(k) != mine.get(k)]
    if bad:
        diffs = ", ".join(f"{k}: {mine.get(k)!r} here, {leader.get(k)!r} on process 0" for k in bad)
        raise ClusterError(
            f"process {process_id}'s engine differs from process 0's ({diffs}); give every "
            "process the same flags (and --kv-pages where free device memory differs)"
        )


def initialize(
    coordinator: str,
    num_processes: int,
    process_id: int,
    *,
    init_timeout_s: int = 120,
    heartbeat_timeout_s: int = 30,
    shutdown_timeout_s: int = 30,
    collective_timeout_s: int | None = 60,
    **channel: Any,
) -> Cluster:
    """Join the multi-process engine: ``jax.distributed.initialize`` with the coordinator at
    ``coordinator`` ("HOST:PORT", process 0's host; process 0 serves it). Call before any other
    JAX work. On CPU, collectives run over gloo and a collective waiting longer than
    ``collective_timeout_s`` for a peer fails the process instead of hanging it."""
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must lie in [0, {num_processes}), got {process_id!r}")
    flags = os.environ.get("XLA_FLAGS", "")
    if collective_timeout_s is not None and COLLECTIVE_TIMEOUT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {COLLECTIVE_TIMEOUT_FLAG}={collective_timeout_s}"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=shutdown_timeout_s,
    )
    client = jax._src.distributed.global_state.client  # the runtime's key-value store
    print(
        f"qllm-jax: process {process_id}/{num_processes} joined {coordinator} "
        f"({jax.local_device_count()} local of {jax.device_count()} devices)",
        file=sys.stderr,
        flush=True,
    )
    return Cluster(client, process_id, num_processes, **channel)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (for a coordinator on this machine)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(
    command: list[str],
    num_processes: int,
    port: int | None = None,
    devices_per_process: int | None = None,
    grace_s: float = 30.0,
) -> int:
    """Run ``qllm-jax COMMAND`` as processes ``0 .. num_processes - 1`` of one engine on this
    machine, with the coordinator on a loopback port. SIGINT/SIGTERM go to process 0, which
    stops the followers; if any process fails, the others get SIGTERM (SIGKILL after
    ``grace_s``). Returns the first failure's exit status, else 0."""
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ValueError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"devices_per_process must be >= 1, got {devices_per_process!r}")
    coordinator = f"127.0.0.1:{port or free_port()}"
    env = dict(os.environ)
    if devices_per_process is not None:
        flag = f"--xla_force_host_platform_device_count={devices_per_process}"
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "qllm_jax.cli", *command, "--coordinator", coordinator]
            + ["--num-processes", str(num_processes), "--process-id", str(i)],
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C reaches the launcher only
        )
        for i in range(num_processes)
    ]
    forward = lambda signum, frame: procs[0].send_signal(signum)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _supervise(procs, grace_s)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _supervise(procs: list[subprocess.Popen], grace_s: float) -> int:
    """Wait for the processes; stop the rest when one fails or when process 0 is done."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or codes[0] == 0:
            break
        time.sleep(0.2)
    deadline = time.monotonic() + (0 if failed else grace_s)
    for p in procs:  # after a success, followers finish by themselves
        while p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return failed[0] if failed else next((p.returncode for p in procs if p.returncode), 0)
