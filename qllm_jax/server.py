"""``qllm-jax serve``: an OpenAI-compatible HTTP server over one ``Engine``.

The engine is single-threaded by design (one sequential host loop), so it runs in ONE
background thread, ``EngineLoop``; the HTTP side (FastAPI on uvicorn's asyncio loop) never
touches it directly. Requests are validated on the asyncio side (``openai_api.prepare``: the
tokenizer and the engine's checks, which read but never change engine state), then handed to
the engine thread as commands that it runs between two steps; the engine thread hands every
output back with ``call_soon_threadsafe``. So an abort (a client that disconnected) takes effect
before the next step: its KV pages are freed at once and its rows leave any pass with the next
plan.

Priority: ``service_tier`` "auto"/"default"/"priority" are latency-sensitive (priority 0),
"flex" best-effort (1); vLLM's integer ``priority`` overrides the tier. Latency-sensitive
requests waiting for admission are bounded (``max_waiting_ls``; beyond it a 429); best-effort
work queues without bound. Batches (``/v1/batches``) are durable jobs (``qllm_jax.jobs``)
under ``STATE_DIR/batches/``, always best-effort; a restart with the same state directory
resumes them from their checkpoints. Uploaded files live under ``STATE_DIR/files/``.

Client mistakes get OpenAI's error JSON with a 4xx code; a 500 means a bug or an engine fault.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from qllm_jax import compile_log, jobs, openai_api
from qllm_jax.engine import Engine, RequestOutput
from qllm_jax.fingerprint import model_fingerprint
from qllm_jax.scheduler.request import Status

log = logging.getLogger("qllm_jax.server")

LS, BE = "ls", "be"
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_BATCH_ENDPOINTS = openai_api.ENDPOINTS
_FILE_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,64}$")
_BATCH_ID = re.compile(r"^batch_[A-Za-z0-9_-]{1,64}$")


class APIError(Exception):
    """An error answered with OpenAI's error JSON and ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code

    def response(self) -> JSONResponse:
        body = openai_api.error_body(str(self), self.type, self.param, self.code)
        return JSONResponse(body, status_code=self.status)


def _class(priority: int) -> str:
    return BE if priority > 0 else LS


# ----------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus metrics in vLLM's style under ``qllm:``; histograms and counters are fed by
    the engine thread as outputs arrive, gauges are read from the engine thread's last
    snapshot of the scheduler (so a scrape never touches the engine)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        labels = ["model_name", "priority_class"]

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, registry=self.registry, buckets=_LATENCY_BUCKETS)

        self.ttft = hist("qllm:time_to_first_token_seconds", "Time to first token.")
        self.itl = hist("qllm:inter_token_latency_seconds", "Time between output tokens.")
        self.e2e = hist("qllm:e2e_request_latency_seconds", "Arrival to finish.")
        self.queue = hist("qllm:request_queue_time_seconds", "Arrival to admission (KV pages).")
        reg = self.registry
        self.prompt_tokens = Counter(
            "qllm:prompt_tokens", "Prefilled prompt tokens.", labels, registry=reg
        )
        self.generation_tokens = Counter(
            "qllm:generation_tokens", "Generated tokens.", labels, registry=reg
        )
        self.success = Counter(
            "qllm:request_success",
            "Finished requests by finish reason (stop, length, abort, error).",
            [*labels, "finished_reason"],
            registry=reg,
        )
        self.rejected = Counter(
            "qllm:requests_rejected",
            "Requests refused before reaching the engine (4xx), by status code.",
            ["model_name", "status_code"],
            registry=reg,
        )
        self.snapshot: dict[str, Any] = {}  # replaced whole by the engine thread
        reg.register(_SnapshotCollector(self))

    def label(self, cls: str) -> dict[str, str]:
        return {"model_name": self.model_name, "priority_class": cls}

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector:
    """Gauges and the scheduler's counters from the engine thread's last snapshot."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        snap, name = self.metrics.snapshot, self.metrics.model_name
        if not snap:
            return
        for key, metric, doc in (
            ("running", "qllm:num_requests_running", "Admitted requests (hold KV pages)."),
            ("waiting", "qllm:num_requests_waiting", "Requests waiting for admission."),
            ("parked_rows", "qllm:num_parked_rows", "Token rows of passes parked at a cursor."),
        ):
            g = GaugeMetricFamily(metric, doc, labels=["model_name", "priority_class"])
            for cls in (LS, BE):
                g.add_metric([name, cls], snap[key][cls])
            yield g
        for key, doc in (
            ("kv_pages_used", "KV cache pages in use."),
            ("kv_pages_total", "KV cache pages (scratch page excluded)."),
            ("kv_cache_usage_perc", "Fraction of KV cache pages in use."),
            ("batches_running", "Batches (durable jobs) being run."),
            ("swap_pages_free", "Free host slots for the KV pages of evicted requests."),
        ):
            g = GaugeMetricFamily(f"qllm:{key}", doc, labels=["model_name"])
            g.add_metric([name], snap[key])
            yield g
        for metric, doc, label, key in _COUNTERS:
            if label is None:
                c = CounterMetricFamily(metric, doc, labels=["model_name"])
                c.add_metric([name], snap[key])
            else:  # the snapshot holds the counts by label value
                c = CounterMetricFamily(metric, doc, labels=["model_name", label])
                for value, n in snap[key].items():
                    c.add_metric([name, value], n)
            yield c
        if snap["expert_load"] is not None:
            yield _expert_load_metric(name, snap["expert_load"])


# counters from the engine thread's snapshot: (metric, help, label or None, snapshot key)
_COUNTERS = (
    ("qllm:num_preemptions", "In-pass preemptions by granularity.", "granularity", "preemptions"),
    (
        "qllm:num_evictions",
        "Requests evicted from their KV pages for more urgent work (swapped or recomputed).",
        None,
        "evictions",
    ),
    (
        "qllm:kv_swapped_pages",
        "KV pages copied to host memory (out) and back (in).",
        "direction",
        "swapped",
    ),
    ("qllm:scheduled_rows", "Token rows the scheduler put in passes.", "priority_class", "rows"),
    ("qllm:engine_steps", "Engine steps (plans run).", None, "steps"),
    (
        "qllm:compilations",
        "XLA executables created in the server process (after warm-up: none, normally).",
        None,
        "compiles",
    ),
)


def _expert_load_metric(name: str, load: list[list[int]]) -> CounterMetricFamily:
    """Routed (token, pick) pairs per layer and logical expert, as the engine last read them
    back (every ``expert_stats_every`` steps; recomputed rows count again)."""
    c = CounterMetricFamily(
        "qllm:expert_routed_tokens",
        "Tokens routed to each expert of each layer (one per top-k pick).",
        labels=["model_name", "layer", "expert"],
    )
    for layer, row in enumerate(load):
        for expert, n in enumerate(row):
            c.add_metric([name, str(layer), str(expert)], n)
    return c


# ----------------------------------------------------------------------------------------------
# One request's stream of outputs, across the thread boundary


class OutputStream:
    """Outputs of one request, pushed by the engine thread, read on the asyncio loop. Outputs
    are cumulative (all tokens so far), so a reader that falls behind takes the latest."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()

    def push(self, out: RequestOutput) -> None:  # engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, out)

    def after_readers(self, fn: Callable[[], Any]) -> None:  # engine thread
        """Run ``fn()`` on the loop once every reader woken by the pushes so far has run (a
        push wakes its reader for the loop's next round; this runs in the round after)."""
        self._loop.call_soon_threadsafe(self._loop.call_soon, fn)

    async def next(self) -> RequestOutput:
        out = await self._queue.get()
        while not self._queue.empty() and not out.finished:
            out = self._queue.get_nowait()
        return out


@dataclasses.dataclass
class _Tracked:
    """What the engine thread follows of a server request for the metrics."""

    stream: OutputStream | None  # None: a batch's request (its output goes to its job)
    cls: str
    arrival: float
    request: Any  # the scheduler's Request
    tokens_seen: int = 0
    last_token_time: float | None = None
    admitted: bool = False


# ----------------------------------------------------------------------------------------------
# The engine thread


class EngineLoop:
    """Runs ``engine`` in one background thread. ``call(fn)`` runs ``fn()`` on that thread
    between two steps and returns a future of its result; nothing else touches the engine.

    ``runner`` (a ``JobRunner`` over the same engine) runs the batches; ``max_waiting_ls``
    bounds the latency-sensitive requests accepted but not yet admitted.

    ``ls_delivery_wait_s``: after a step that gave a latency-sensitive request its first
    tokens, the engine thread waits (at most this long) until the event loop has written
    them before it launches more work. On a machine with few cores the next step's XLA
    threads would otherwise take the cores the event loop and the client need to deliver
    the token (the tail of the HTTP path's time to first token); on an accelerator the wait
    is the loop's wake-up, tens of microseconds. Later tokens are not waited for: a step
    streaming to hundreds of requests would wait for the loop to write them all. 0 turns
    it off."""

    def __init__(
        self,
        engine: Engine,
        runner: jobs.JobRunner,
        metrics: Metrics,
        max_waiting_ls: int = 256,
        idle_wait_s: float = 0.05,
        snapshot_every_s: float = 0.05,
        ls_delivery_wait_s: float = 0.005,
    ) -> None:
        self.engine = engine
        self.runner = runner
        self.metrics = metrics
        self.max_waiting_ls = max_waiting_ls
        self.idle_wait_s = idle_wait_s
        self.snapshot_every_s = snapshot_every_s
        if not ls_delivery_wait_s >= 0:
            raise ValueError(f"ls_delivery_wait_s must be >= 0, got {ls_delivery_wait_s!r}")
        self.ls_delivery_wait_s = ls_delivery_wait_s
        self._delivered = threading.Event()
        self._ls_pushed: OutputStream | None = None  # a LS stream given its first token
        self._commands: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]]
        self._commands = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._unadmitted: dict[str, _Tracked] = {}  # the server's not yet admitted (ditto)
        self._waiting_lock = threading.Lock()
        self._waiting = {LS: 0, BE: 0}  # accepted, not yet admitted
        self._last_snapshot = 0.0
        self.error: BaseException | None = None  # what killed the loop, if anything
        self._snapshot()
        runner.observer = self._on_job_output

    # -- any thread ----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qllm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 60.0) -> None:
        """Stop after the current step: running batches are checkpointed and suspended (a
        restart resumes them), other requests are aborted."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self.alive:
            fut.set_exception(APIError(503, "the engine is not running", "server_error"))
            return fut
        self._commands.append((fn, fut))
        self._wake.set()
        return fut

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    def reserve(self, cls: str) -> bool:
        """Count a request as waiting for admission; False (nothing counted) if it is
        latency-sensitive and the LS queue is full."""
        with self._waiting_lock:
            if cls == LS and self._waiting[LS] >= self.max_waiting_ls:
                return False
            self._waiting[cls] += 1
            return True

    def unreserve(self, cls: str) -> None:
        with self._waiting_lock:
            self._waiting[cls] -= 1

    def submit(self, req, stream: OutputStream) -> concurrent.futures.Future:
        """Queue ``req`` (from ``engine.make_request``, already ``reserve``d) on the engine;
        its outputs go to ``stream``."""
        cls = _class(req.priority)
        tracked = _Tracked(stream, cls, req.arrival_time, req)

        def add() -> str:
            self._tracked[req.request_id] = self._unadmitted[req.request_id] = tracked
            try:
                return self.engine.add(req, on_output=lambda out: self._on_output(tracked, out))
            except BaseException:
                del self._tracked[req.request_id], self._unadmitted[req.request_id]
                self.unreserve(cls)
                raise

        if not self.alive:
            self.unreserve(cls)
        return self.call(add)  # (fails at once if the loop is down)

    def abort(self, request_id: str) -> concurrent.futures.Future:
        return self.call(lambda: self.engine.abort(request_id))

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain()
                if self._busy():
                    self.engine.step()
                    self._await_delivery()
                    self._after_step()
                else:
                    self._snapshot(force=True)
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
            self._shutdown()
        except BaseException as e:  # a bug: say so, fail what waits, keep the process up
            log.exception("the engine loop died")
            self.error = e
            for tracked in self._tracked.values():
                if tracked.stream is not None:
                    tracked.stream.push(
                        _failed(self.engine, tracked, f"the engine loop died: {e!r}")
                    )
            while self._commands:
                _, fut = self._commands.popleft()
                fut.set_exception(APIError(503, "the engine is not running", "server_error"))

    def _drain(self) -> None:
        while self._commands:
            fn, fut = self._commands.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)

    def _busy(self) -> bool:
        return self.engine.has_unfinished() or any(
            not j.finished for j in self.runner.jobs.values()
        )

    def _await_delivery(self) -> None:
        """Wait (at most ``ls_delivery_wait_s``) for the loop to deliver the latency-sensitive
        first tokens of the step that just ended (see the class docstring)."""
        stream, self._ls_pushed = self._ls_pushed, None
        if stream is None or self.ls_delivery_wait_s == 0:
            return
        self._delivered.clear()
        try:
            stream.after_readers(self._delivered.set)
        except RuntimeError:  # its event loop has closed: nobody is reading
            return
        self._delivered.wait(self.ls_delivery_wait_s)

    def _after_step(self) -> None:
        now = self.engine.clock()
        for tracked in list(self._unadmitted.values()):  # (not every tracked one, each step)
            if tracked.request.status is not Status.WAITING:
                self._admitted(tracked, now)
        self._snapshot()

    def _admitted(self, tracked: _Tracked, now: float) -> None:
        tracked.admitted = True
        self._unadmitted.pop(tracked.request.request_id, None)
        self.unreserve(tracked.cls)
        if tracked.request.status is not Status.ABORTED:
            self.metrics.queue.labels(**self.metrics.label(tracked.cls)).observe(
                max(0.0, now - tracked.arrival)
            )

    def _on_job_output(self, out: RequestOutput) -> None:
        """A batch's request advanced: the same metrics (its queue time is not known: it is
        first seen when its first pass ends)."""
        tracked = self._tracked.get(out.request_id)
        if tracked is None:
            req = self.engine.scheduler.requests.get(out.request_id)
            arrival = out.metrics.arrival_time
            tracked = _Tracked(None, _class(out.priority), arrival, req, admitted=True)
            self._tracked[out.request_id] = tracked
        self._on_output(tracked, out)

    def _on_output(self, tracked: _Tracked, out: RequestOutput) -> None:
        """A server request advanced or ended: its stream gets new tokens before the metrics
        are updated (they are on the client's latency path; the metrics can wait some
        microseconds), the end after them (a client that has seen the end sees it counted)."""
        first = tracked.tokens_seen == 0 and len(out.token_ids) > 0
        if tracked.stream is not None and not out.finished:
            self._push(tracked, out, first)
        m, labels = self.metrics, self.metrics.label(tracked.cls)
        now = self.engine.clock()
        n = len(out.token_ids)
        if n > tracked.tokens_seen:
            if tracked.tokens_seen == 0:
                first = out.metrics.first_token_time or now
                m.ttft.labels(**labels).observe(max(0.0, first - tracked.arrival))
                m.prompt_tokens.labels(**labels).inc(len(out.prompt_token_ids))
            elif tracked.last_token_time is not None:
                gap = (now - tracked.last_token_time) / (n - tracked.tokens_seen)
                m.itl.labels(**labels).observe(max(0.0, gap))
            m.generation_tokens.labels(**labels).inc(n - tracked.tokens_seen)
            tracked.tokens_seen, tracked.last_token_time = n, now
        if out.finished:
            if not tracked.admitted:
                self._admitted(tracked, now)
            finish = out.metrics.finish_time or now
            m.e2e.labels(**labels).observe(max(0.0, finish - tracked.arrival))
            m.success.labels(**labels, finished_reason=out.finish_reason or "abort").inc()
            self._tracked.pop(out.request_id, None)
            if tracked.stream is not None:
                self._push(tracked, out, first)

    def _push(self, tracked: _Tracked, out: RequestOutput, first: bool) -> None:
        tracked.stream.push(out)
        if first and tracked.cls == LS:
            self._ls_pushed = tracked.stream  # _await_delivery waits for it

    def _snapshot(self, force: bool = False) -> None:
        """The scheduler's queue sizes and counters for the gauges, at most every
        ``snapshot_every_s`` (a scrape reads the last one)."""
        now = time.monotonic()
        if not force and now - self._last_snapshot < self.snapshot_every_s:
            return
        self._last_snapshot = now
        s = self.engine.scheduler
        waiting, running, parked = {LS: 0, BE: 0}, {LS: 0, BE: 0}, {LS: 0, BE: 0}
        for r in s.waiting:
            waiting[_class(r.priority)] += 1
        for r in s.admitted:
            running[_class(r.priority)] += 1
        for p in s.passes.values():
            if p.parked_since is not None:
                for c in p.chunks:
                    req = s.seqs.get(c.seq_id)
                    if req is not None:
                        parked[_class(req.priority)] += c.num_tokens
        total = s.allocator.num_pages - 1
        self.metrics.snapshot = {
            "waiting": waiting,
            "running": running,
            "parked_rows": parked,
            "kv_pages_used": s.allocator.num_used,
            "kv_pages_total": total,
            "kv_cache_usage_perc": s.allocator.num_used / total if total else 0.0,
            "batches_running": sum(not j.finished for j in self.runner.jobs.values()),
            "swap_pages_free": s.swap_pages_free,
            "evictions": s.counters["evictions"],
            "swapped": {
                "out": s.counters["swapped_out_pages"],
                "in": s.counters["swapped_in_pages"],
            },
            "preemptions": {
                "layer": s.counters["preemptions_layer"],
                "expert": s.counters["preemptions_expert"],
            },
            "rows": {LS: s.counters["rows_ls"], BE: s.counters["rows_be"]},
            "steps": self.engine.num_steps,
            "compiles": compile_log.count(),
            "expert_load": self.engine.executor.expert_load.host.tolist()
            if self.engine.expert_stats_every
            else None,
        }

    def _shutdown(self) -> None:
        """Checkpoint and suspend running batches; abort the other requests."""
        self._drain()
        for job in list(self.runner.jobs.values()):
            if not job.finished:
                try:
                    self.runner.suspend(job)
                except Exception:
                    log.exception("could not checkpoint batch %s on shutdown", job.id)
        for rid, tracked in list(self._tracked.items()):
            if tracked.stream is not None:
                self.engine.abort(rid)
        with contextlib.suppress(Exception):
            self.engine.step()  # reports the aborts to their streams


def _failed(engine: Engine, tracked: _Tracked, message: str) -> RequestOutput:
    """``tracked``'s output so far, ended with ``message`` (``finish_reason="error"``)."""
    out = engine.output(tracked.request, text="")  # (no detokenising in a dying loop)
    return dataclasses.replace(out, text=None, finished=True, finish_reason="error", error=message)


# ----------------------------------------------------------------------------------------------
# Files and batches on disk


class BatchStore:
    """Uploaded files (``STATE_DIR/files/``) and batches as durable jobs
    (``STATE_DIR/batches/<id>/``, the job directory; the Batch API fields are kept in the
    job's metadata). A batch's output and error files are served as files
    ``file-<batch id>-output`` and ``file-<batch id>-errors``."""

    def __init__(self, state_dir: str | os.PathLike, max_upload_bytes: int) -> None:
        self.root = Path(state_dir)
        self.files = self.root / "files"
        self.batches = self.root / "batches"
        self.files.mkdir(parents=True, exist_ok=True)
        self.batches.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = max_upload_bytes

    # -- files ---------------------------------------------------------------------------------

    def add_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = "file-" + uuid.uuid4().hex[:24]
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        (self.files / f"{file_id}.data").write_bytes(data)
        _write_json(self.files / f"{file_id}.json", meta)
        return meta

    def file(self, file_id: str) -> tuple[dict[str, Any], Path]:
        """A file's object and where its content lies (``APIError`` 404 if none)."""
        if not _FILE_ID.match(file_id):
            raise _not_found("file", file_id)
        meta_path = self.files / f"{file_id}.json"
        if meta_path.exists():
            return json.loads(meta_path.read_text()), self.files / f"{file_id}.data"
        for kind in ("output", "errors"):
            batch_id = file_id.removeprefix("file-").removesuffix(f"-{kind}")
            if file_id.endswith(f"-{kind}") and _BATCH_ID.match(batch_id):
                paths = jobs.JobPaths(self.batches / batch_id)
                path = paths.output if kind == "output" else paths.errors
                if path.exists():
                    meta = {
                        "id": file_id,
                        "object": "file",
                        "bytes": path.stat().st_size,
                        "created_at": int(path.stat().st_mtime),
                        "filename": f"{batch_id}_{kind}.jsonl",
                        "purpose": "batch_output",
                        "status": "processed",
                        "status_details": None,
                    }
                    return meta, path
        raise _not_found("file", file_id)

    def list_files(self) -> list[dict[str, Any]]:
        metas = [json.loads(p.read_text()) for p in self.files.glob("file-*.json")]
        return sorted(metas, key=lambda m: m["created_at"], reverse=True)

    def delete_file(self, file_id: str) -> dict[str, Any]:
        meta, path = self.file(file_id)
        if path.parent != self.files:
            raise APIError(400, f"{file_id} is a batch's output: it goes with the batch", "file_id")
        path.unlink(missing_ok=True)
        (self.files / f"{file_id}.json").unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches -------------------------------------------------------------------------------

    def batch_dir(self, batch_id: str) -> Path:
        if not _BATCH_ID.match(batch_id) or not (self.batches / batch_id / "job.json").exists():
            raise _not_found("batch", batch_id)
        return self.batches / batch_id

    def batch(self, batch_id: str) -> dict[str, Any]:
        """The OpenAI Batch object of a batch, from its job directory."""
        job_dir = self.batch_dir(batch_id)
        st = jobs.status(job_dir).as_dict()
        manifest = json.loads((job_dir / "job.json").read_text())
        meta = manifest.get("metadata", {}).get("batch", {})
        done = st["status"] in jobs.TERMINAL
        paths = jobs.JobPaths(job_dir)
        errors = st["errors"]
        if errors:
            errors = {"object": "list", "data": [_batch_error(e) for e in errors["data"]]}
        created = st["created_at"]
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": meta.get("endpoint"),
            "errors": errors,
            "input_file_id": meta.get("input_file_id"),
            "completion_window": meta.get("completion_window", "24h"),
            "status": st["status"],
            "output_file_id": f"file-{batch_id}-output" if done and paths.output.exists() else None,
            "error_file_id": f"file-{batch_id}-errors" if done and paths.errors.exists() else None,
            "created_at": created,
            "in_progress_at": st.get("in_progress_at"),
            "expires_at": created + 24 * 3600,
            "finalizing_at": st.get("finalizing_at"),
            "completed_at": st.get("completed_at"),
            "failed_at": st.get("failed_at"),
            "expired_at": st.get("expired_at"),
            "cancelling_at": st.get("cancelling_at"),
            "cancelled_at": st.get("cancelled_at"),
            "request_counts": st["request_counts"],
            "metadata": meta.get("metadata"),
        }

    def batch_ids(self) -> list[str]:
        """Every batch here, newest first."""
        found = []
        for d in self.batches.iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError):
                created = json.loads((d / "job.json").read_text())["created_at"]
                found.append((created, d.name))
        return [name for _, name in sorted(found, reverse=True)]


def _batch_error(e: dict[str, Any]) -> dict[str, Any]:
    return {k: e.get(k) for k in ("code", "message", "param", "line")}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _not_found(kind: str, ident: str) -> APIError:
    return APIError(
        404, f"No {kind} found with id {ident!r}", param=f"{kind}_id", code=f"{kind}_not_found"
    )


# ----------------------------------------------------------------------------------------------
# The app


@dataclasses.dataclass
class ServerState:
    engine: Engine
    loop: EngineLoop
    store: BatchStore
    metrics: Metrics
    model_name: str
    system_fingerprint: str


def served_model_name(engine: Engine) -> str:
    path = str(engine.model.path)
    return path if path.startswith("random:") else Path(path).name


def build_state(
    engine: Engine,
    state_dir: str | os.PathLike,
    model_name: str | None = None,
    max_waiting_ls: int = 256,
    max_upload_bytes: int = 200 << 20,
    checkpoint_every: float | None = 60.0,
    ls_delivery_wait_s: float = 0.005,
) -> ServerState:
    """Everything the app serves with; the engine thread is started by the app's lifespan.
    ``ls_delivery_wait_s``: see ``EngineLoop``."""
    name = model_name or served_model_name(engine)
    metrics = Metrics(name)
    runner = jobs.JobRunner(engine, checkpoint_every=checkpoint_every)
    runner.model_name = name
    loop = EngineLoop(
        engine, runner, metrics, max_waiting_ls=max_waiting_ls,
        ls_delivery_wait_s=ls_delivery_wait_s,
    )  # fmt: skip
    store = BatchStore(state_dir, max_upload_bytes)
    fp = "fp_" + model_fingerprint(engine.model)["digest"][:12]
    return ServerState(engine, loop, store, metrics, name, fp)


def resume_batches(state: ServerState) -> list[str]:
    """Resume every unfinished batch of the state directory (call before the loop starts)."""
    resumed = []
    for batch_id in state.store.batch_ids():
        job_dir = state.store.batches / batch_id
        try:
            if jobs.status(job_dir).status in jobs.TERMINAL:
                continue
            job = state.loop.runner.resume(job_dir)
        except Exception as e:  # a bad checkpoint must not keep the server down
            log.error("could not resume batch %s: %s", batch_id, e)
            continue
        for note in job.notes:
            log.info("batch %s: %s", batch_id, note)
        resumed.append(batch_id)
    return resumed


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not state.loop.alive:
            state.loop.start()
        yield
        await asyncio.to_thread(state.loop.stop)

    app = FastAPI(title="qllm-jax", lifespan=lifespan)
    app.state.qllm = state
    _add_error_handlers(app, state)

    @app.get("/health")
    async def health() -> Response:
        if not state.loop.alive:
            return JSONResponse({"status": "error", "error": repr(state.loop.error)}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(state.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != state.model_name:
            raise _unknown_model(model_id)
        return _model_card(state)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, openai_api.COMPLETIONS)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _generate(state, request, openai_api.CHAT)

    _add_file_routes(app, state)
    _add_batch_routes(app, state)
    return app


def _model_card(state: ServerState) -> dict:
    return {
        "id": state.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "qllm-jax",
        "max_model_len": state.engine.config.max_model_len,
    }


def _unknown_model(name: Any) -> APIError:
    return APIError(
        404, f"The model {name!r} does not exist", param="model", code="model_not_found"
    )


def _add_error_handlers(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        if 400 <= e.status < 500:
            state.metrics.rejected.labels(state.model_name, str(e.status)).inc()
        return e.response()

    @app.exception_handler(openai_api.BadRequest)
    async def bad_request(request: Request, e: openai_api.BadRequest) -> Response:
        state.metrics.rejected.labels(state.model_name, "400").inc()
        return JSONResponse(e.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return APIError(e.status_code, str(e.detail), kind).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return APIError(500, f"internal error: {e!r}", "server_error").response()


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(
            400, f"the request body is not valid JSON: {e}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise APIError(422, "the request body must be a JSON object", param="body")
    return body


# -- completions -------------------------------------------------------------------------------


async def _generate(state: ServerState, request: Request, endpoint: str) -> Response:
    arrival = state.engine.clock()
    body = await _json_body(request)
    model = body.get("model")
    if model is not None and model != state.model_name:
        raise _unknown_model(model)
    response_id = uuid.uuid4().hex
    prepared, stream = await submit_body(state, endpoint, body, response_id, arrival)
    created = int(time.time())
    if prepared.stream:
        return StreamingResponse(
            _sse(state, prepared, stream, response_id, created),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _complete(state, request, prepared, stream, response_id, created)


async def submit_body(
    state: ServerState,
    endpoint: str,
    body: dict[str, Any],
    response_id: str,
    arrival: float | None = None,
) -> tuple[openai_api.Prepared, OutputStream]:
    """Validate a request body and queue it on the engine as ``response_id``: its outputs come
    on the returned stream. ``BadRequest`` or ``APIError`` (429: the LS queue is full) if it
    cannot be queued. The HTTP server and a Ray Serve replica (``qllm_jax.ray_serve``) share
    it."""
    if arrival is None:
        arrival = state.engine.clock()
    prepared = openai_api.prepare(state.engine, endpoint, body, allow_stream=True)
    cls = _class(prepared.priority)
    if not state.loop.reserve(cls):
        raise APIError(
            429,
            f"too many latency-sensitive requests waiting ({state.loop.max_waiting_ls}); "
            "retry later or use service_tier='flex'",
            "rate_limit_exceeded",
            code="rate_limit_exceeded",
        )
    try:
        req = state.engine.make_request(
            prepared.prompt_token_ids,
            prepared.sampling,
            prepared.priority,
            arrival_time=arrival,
            request_id=response_id,
        )
    except (ValueError, TypeError) as e:
        state.loop.unreserve(cls)
        raise openai_api.BadRequest(str(e)) from e
    stream = OutputStream(asyncio.get_running_loop())
    await asyncio.wrap_future(state.loop.submit(req, stream))
    return prepared, stream


async def _complete(state, request, prepared, stream, response_id, created) -> Response:
    """Wait for the finished output; a client that goes away has its request aborted."""
    finished = False
    try:
        while True:
            task = asyncio.ensure_future(stream.next())
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    task.cancel()
                    return Response(status_code=499)
            out = task.result()
            if out.finished:
                finished = True
                break
    finally:
        if not finished:
            state.loop.abort(response_id)
    if out.finish_reason in ("error", "abort"):
        message = out.error or "the request was aborted (the server is shutting down)"
        raise APIError(500 if out.finish_reason == "error" else 503, message, "server_error")
    body = openai_api.response_body(
        prepared, out, response_id, created, state.model_name, state.system_fingerprint
    )
    return JSONResponse(body)


def _stream_text(text: str, finished: bool, stops: tuple[str, ...]) -> str:
    """The part of the text so far that can be sent: while running, an incomplete UTF-8
    character at the end and a tail that may grow into a stop string are held back."""
    if finished:
        return text
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return text[: len(text) - hold]


async def _sse(state, prepared, stream, response_id, created) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI sends them; if the client goes away (the task is
    cancelled), the request is aborted before the engine's next step."""

    def event(obj: dict) -> bytes:
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    def chunk(text, reason=None, first=False) -> bytes:
        return event(
            openai_api.stream_chunk(
                prepared,
                response_id,
                created,
                state.model_name,
                text,
                reason,
                first,
                state.system_fingerprint,
            )
        )

    finished = False
    sent = ""
    try:
        if prepared.endpoint == openai_api.CHAT:
            yield chunk("", first=True)
        while True:
            out = await stream.next()
            if out.finish_reason in ("error", "abort"):
                finished = True
                message = out.error or "the request was aborted (the server is shutting down)"
                yield event(openai_api.error_body(message, "server_error"))
                break
            text = _stream_text(out.text or "", out.finished, prepared.sampling.stop)
            if len(text) > len(sent):
                yield chunk(text[len(sent) :])
                sent = text
            if out.finished:
                finished = True
                yield chunk("", out.finish_reason)
                if prepared.include_usage:
                    yield event(
                        openai_api.usage_chunk(
                            prepared,
                            out,
                            response_id,
                            created,
                            state.model_name,
                            state.system_fingerprint,
                        )
                    )
                break
        yield b"data: [DONE]\n\n"
    finally:
        if not finished:
            state.loop.abort(response_id)


# -- files -------------------------------------------------------------------------------------


def _add_file_routes(app: FastAPI, state: ServerState) -> None:
    store = state.store

    @app.post("/v1/files")
    async def upload(request: Request) -> dict:
        limit = store.max_upload_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit + (1 << 16):
            raise _too_large(limit)
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # malformed multipart
            raise APIError(400, f"the upload is not valid multipart form data: {e}") from e
        purpose, upload = form.get("purpose"), form.get("file")
        if purpose != "batch":
            raise APIError(400, f"purpose must be 'batch', got {purpose!r}", param="purpose")
        if upload is None or isinstance(upload, str):
            raise APIError(400, "a file is required", param="file")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise _too_large(limit)
        return store.add_file(data, upload.filename or "upload.jsonl", purpose)

    @app.get("/v1/files")
    async def list_files() -> dict:
        return {"object": "list", "data": store.list_files(), "has_more": False}

    @app.get("/v1/files/{file_id}")
    async def retrieve(file_id: str) -> dict:
        return store.file(file_id)[0]

    @app.get("/v1/files/{file_id}/content")
    async def content(file_id: str) -> Response:
        _, path = store.file(file_id)
        return Response(path.read_bytes(), media_type="application/jsonl")

    @app.delete("/v1/files/{file_id}")
    async def delete(file_id: str) -> dict:
        return store.delete_file(file_id)


def _too_large(limit: int) -> APIError:
    return APIError(
        413,
        f"the file exceeds the upload limit of {limit} bytes",
        param="file",
        code="file_too_large",
    )


# -- batches -----------------------------------------------------------------------------------


def _add_batch_routes(app: FastAPI, state: ServerState) -> None:
    store, loop = state.store, state.loop

    @app.post("/v1/batches")
    async def create(request: Request) -> dict:
        body = await _json_body(request)
        unknown = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}
        if unknown:
            name = sorted(unknown)[0]
            raise APIError(
                400, f"unrecognized request argument: {name}", param=name, code="unknown_parameter"
            )
        endpoint = body.get("endpoint")
        if endpoint not in _BATCH_ENDPOINTS:
            raise APIError(
                400, f"endpoint must be one of {list(_BATCH_ENDPOINTS)}", param="endpoint"
            )
        if body.get("completion_window", "24h") != "24h":
            raise APIError(400, "completion_window must be '24h'", param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise APIError(400, "metadata must be an object", param="metadata")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise APIError(400, "input_file_id is required", param="input_file_id")
        meta, path = store.file(file_id)
        if meta["purpose"] != "batch":
            raise APIError(
                400, f"file {file_id} was not uploaded with purpose 'batch'", param="input_file_id"
            )
        batch_id = "batch_" + uuid.uuid4().hex[:24]
        info = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": metadata,
        }

        def prepare() -> jobs.Job | None:
            with contextlib.suppress(jobs.JobInputError):  # the batch is then "failed"
                return loop.runner.prepare(
                    path,
                    store.batches / batch_id,
                    priority=1,
                    job_id=batch_id,
                    endpoint=endpoint,
                    metadata={"batch": info},
                )
            return None

        job = await asyncio.to_thread(prepare)  # not on the engine thread: it would stall steps
        if job is not None:
            await loop.run(lambda: loop.runner.start(job))
        return store.batch(batch_id)

    @app.get("/v1/batches")
    async def list_batches(limit: int = 20, after: str | None = None) -> dict:
        if not 1 <= limit <= 100:
            raise APIError(400, "limit must be in [1, 100]", param="limit")
        ids = store.batch_ids()
        if after is not None:
            ids = ids[ids.index(after) + 1 :] if after in ids else []
        page = [store.batch(i) for i in ids[:limit]]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(ids) > limit,
        }

    @app.get("/v1/batches/{batch_id}")
    async def retrieve(batch_id: str) -> dict:
        return store.batch(batch_id)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel(batch_id: str) -> dict:
        job_dir = store.batch_dir(batch_id)

        def do_cancel() -> None:
            job = loop.runner.jobs.get(batch_id)
            if job is not None:
                loop.runner.cancel(job)
            else:
                jobs.cancel(job_dir)

        await loop.run(do_cancel)
        return store.batch(batch_id)
