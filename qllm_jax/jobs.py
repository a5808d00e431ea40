"""Durable best-effort jobs: an OpenAI Batch API file in, batch output files out, and orbax
checkpoints so that a job outlives the process that runs it.

A job is a named set of best-effort requests run by the same engine that serves
latency-sensitive traffic. Its directory holds everything about it::

    JOB_DIR/job.json        id, status, priority, timestamps (written atomically)
    JOB_DIR/input.jsonl     a copy of the input: one OpenAI Batch API request per line
    JOB_DIR/output.jsonl    one OpenAI batch output line per finished request, completion order
    JOB_DIR/errors.jsonl    the same for requests that failed (bad body, engine error, cancel)
    JOB_DIR/checkpoints/    orbax checkpoints of the requests in flight (the last few)

``JobRunner(engine)`` runs any number of jobs on one engine: ``create`` validates a whole
input up front (``JobInputError`` lists every structural problem; a request whose body is bad
goes to ``errors.jsonl`` and the job goes on), ``resume`` picks a job up from its directory,
``run`` steps the engine until the jobs finish. Jobs also run alongside other requests: the
runner is a step hook of the engine, and the engine hands the jobs' outputs to the runner
instead of returning them from ``step()``. Jobs share the best-effort capacity fairly: each
keeps at most its share of ``max_in_flight`` requests in the engine, submitted round-robin.

Durability: a finished result is appended and flushed before anything else happens; every
``checkpoint_every`` seconds (and on ``suspend``) the output files are fsynced and then a
checkpoint of the job's requests in flight is written (``qllm_jax.checkpoint``). The output
files are the record of what is done: on resume a partial trailing line is dropped, requests
with a line are done, the checkpoint's other requests continue where they stopped, and the
rest start afresh, so no request is lost or written twice. Ids (response ids, default seeds of
sampled requests) derive from the job id and ``custom_id``, so a resumed job writes exactly
the lines an uninterrupted one would (``created`` aside).

``status(job_dir)`` and ``cancel(job_dir)`` need no engine: cancelling a job that another
process runs leaves a marker it picks up at its next step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from qllm_jax import checkpoint as ckpt
from qllm_jax import openai_api
from qllm_jax.engine import Engine, RequestOutput
from qllm_jax.fingerprint import model_fingerprint

STATUSES = (
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "cancelling",
    "cancelled",
    "failed",
)
TERMINAL = frozenset({"completed", "cancelled", "failed"})
FORMAT_VERSION = 1
_MAX_REPORTED_ERRORS = 100


class JobError(RuntimeError):
    """A job cannot be created, resumed or run as asked."""


class JobInputError(JobError):
    """The input file is invalid as a whole (OpenAI fails such a batch at validation):
    ``errors`` lists ``{"line", "code", "message", "param"}`` for each problem found."""

    def __init__(self, message: str, errors: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.errors = errors


# ----------------------------------------------------------------------------------------------
# The job directory


@dataclasses.dataclass(frozen=True)
class JobPaths:
    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "job.json"

    @property
    def input(self) -> Path:
        return self.root / "input.jsonl"

    @property
    def output(self) -> Path:
        return self.root / "output.jsonl"

    @property
    def errors(self) -> Path:
        return self.root / "errors.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def cancel_marker(self) -> Path:
        return self.root / "cancel-requested"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


def _read_manifest(paths: JobPaths) -> dict[str, Any]:
    try:
        return json.loads(paths.manifest.read_text())
    except FileNotFoundError:
        raise JobError(f"{paths.root} holds no job (no job.json)") from None
    except json.JSONDecodeError as e:
        raise JobError(f"{paths.manifest} is corrupt: {e}") from e


def _write_manifest(paths: JobPaths, manifest: dict[str, Any]) -> None:
    """Atomically: a reader sees the old manifest or the new one, never half of one."""
    tmp = paths.manifest.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, paths.manifest)


class _Lock:
    """The right to run a job: an exclusive ``flock`` on ``JOB_DIR/.lock``, released by the
    kernel when its process dies (SIGKILL included)."""

    def __init__(self, paths: JobPaths) -> None:
        self.fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise JobError(
                f"job in {paths.root} is being run by another process (pid {holder})"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    @staticmethod
    def held(paths: JobPaths) -> bool:
        """Whether some process holds the lock now."""
        if not paths.lock.exists():
            return False
        fd = os.open(paths.lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we took
        return False

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ----------------------------------------------------------------------------------------------
# Input and output lines


@dataclasses.dataclass(frozen=True)
class InputLine:
    index: int  # 0-based among the requests (blank lines are skipped)
    line: int  # 1-based line number in the file
    custom_id: str
    url: str
    body: dict[str, Any]


def parse_input(data: bytes, endpoint: str | None = None) -> list[InputLine]:
    """Every request of a Batch API input file, or ``JobInputError`` listing what is wrong:
    lines that are not JSON objects, a missing or non-string ``custom_id``, a duplicate one,
    ``method`` other than POST, an unsupported ``url`` (or one other than ``endpoint``), a
    ``body`` that is not an object, an empty file."""
    errors: list[dict[str, Any]] = []
    out: list[InputLine] = []
    seen: dict[str, int] = {}

    def bad(line: int, code: str, message: str, param: str | None = None) -> None:
        errors.append({"line": line, "code": code, "message": message, "param": param})

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobInputError(f"the input is not UTF-8: {e}", []) from e
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            bad(number, "invalid_json_line", f"line {number} is not valid JSON: {e}")
            continue
        if not isinstance(obj, dict):
            bad(number, "invalid_json_line", f"line {number} is not a JSON object")
            continue
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            bad(number, "missing_required_parameter", "custom_id must be a non-empty string")
            continue
        if cid in seen:
            bad(
                number,
                "duplicate_custom_id",
                f"custom_id {cid!r} is used on line {seen[cid]} and line {number}",
                "custom_id",
            )
            continue
        seen[cid] = number
        if obj.get("method") != "POST":
            bad(number, "invalid_method", "method must be POST", "method")
        url = obj.get("url")
        if url not in openai_api.ENDPOINTS or (endpoint is not None and url != endpoint):
            allowed = [endpoint] if endpoint else list(openai_api.ENDPOINTS)
            bad(number, "invalid_url", f"url {url!r} is not one of {allowed}", "url")
        if not isinstance(obj.get("body"), dict):
            bad(number, "invalid_body", "body must be a JSON object", "body")
        extra = set(obj) - {"custom_id", "method", "url", "body"}
        if extra:
            bad(number, "invalid_request", f"unknown keys {sorted(extra)}")
        out.append(InputLine(len(out), number, cid, url, obj.get("body")))
    if not out and not errors:
        raise JobInputError("the input holds no requests", [])
    if errors:
        shown = errors[:_MAX_REPORTED_ERRORS]
        first = "; ".join(f"line {e['line']}: {e['message']}" for e in shown[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise JobInputError(f"invalid input: {first}{more}", shown)
    return out


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _derived_seed(job_id: str, custom_id: str) -> int:
    return int(_hash("seed", job_id, custom_id)[:16], 16)


def _line(job_id: str, custom_id: str, response: dict | None, error: dict | None) -> dict:
    return {
        "id": "batch_req_" + _hash("line", job_id, custom_id),
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


def _response(job_id: str, custom_id: str, status_code: int, body: dict) -> dict:
    return {
        "status_code": status_code,
        "request_id": "req_" + _hash("request", job_id, custom_id),
        "body": body,
    }


def _complete_lines(path: Path, repair: bool) -> list[dict]:
    """The complete lines of an output file; with ``repair`` a partial trailing line (a crash
    mid-write) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    out = []
    for raw in data[:end].splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(raw))
    return out


# ----------------------------------------------------------------------------------------------
# Status and cancel from the directory alone


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """A job as its directory describes it. ``failed`` counts the lines of ``errors.jsonl``
    (bad bodies, engine errors and, after a cancel, the requests that never ran)."""

    id: str
    status: str
    total: int
    completed: int
    failed: int
    job_dir: Path
    priority: int
    created_at: int
    timestamps: dict[str, int]  # in_progress_at, finalizing_at, completed_at, ...
    errors: list[dict[str, Any]]  # why validation failed

    @property
    def output_file(self) -> Path:
        return JobPaths(self.job_dir).output

    @property
    def error_file(self) -> Path:
        return JobPaths(self.job_dir).errors

    def as_dict(self) -> dict[str, Any]:
        """OpenAI Batch-object-like fields (for ``job status --json`` and a server)."""
        return {
            "id": self.id,
            "object": "batch",
            "status": self.status,
            "created_at": self.created_at,
            **self.timestamps,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "job_dir": str(self.job_dir),
            "output_file": str(self.output_file),
            "error_file": str(self.error_file),
            "priority": self.priority,
        }


def status(job_dir: str | os.PathLike) -> JobStatus:
    """The job in ``job_dir`` now: status and request counts (complete lines only)."""
    paths = JobPaths(Path(job_dir))
    m = _read_manifest(paths)
    state = m["status"]
    if state == "in_progress" and paths.cancel_marker.exists():
        state = "cancelling"
    return JobStatus(
        id=m["id"],
        status=state,
        total=m.get("total", 0),
        completed=len(_complete_lines(paths.output, repair=False)),
        failed=len(_complete_lines(paths.errors, repair=False)),
        job_dir=paths.root,
        priority=m["priority"],
        created_at=m["created_at"],
        timestamps={k: v for k, v in m.items() if k.endswith("_at") and k != "created_at"},
        errors=m.get("errors", []),
    )


def cancel(job_dir: str | os.PathLike) -> JobStatus:
    """Cancel the job in ``job_dir``. If a process runs it, leave it a marker (it aborts the
    job's requests at its next step; status ``cancelling`` until then); otherwise cancel it
    here: every unfinished request gets a ``batch_cancelled`` line in ``errors.jsonl``."""
    paths = JobPaths(Path(job_dir))
    m = _read_manifest(paths)
    if m["status"] in TERMINAL:
        return status(paths.root)
    paths.cancel_marker.touch()
    try:
        lock = _Lock(paths)
    except JobError:
        return status(paths.root)  # the running process will see the marker
    try:
        lines = parse_input(paths.input.read_bytes())
        done = _done_ids(paths)
        with open(paths.errors, "ab", buffering=0) as f:
            for line in lines:
                if line.custom_id not in done:
                    f.write(_json_line(_cancelled_line(m["id"], line.custom_id)))
            os.fsync(f.fileno())
        now = int(time.time())
        m |= {"status": "cancelled", "cancelling_at": now, "cancelled_at": now}
        _write_manifest(paths, m)
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
        paths.cancel_marker.unlink(missing_ok=True)
    finally:
        lock.release()
    return status(paths.root)


def _done_ids(paths: JobPaths, repair: bool = False) -> set[str]:
    lines = _complete_lines(paths.output, repair) + _complete_lines(paths.errors, repair)
    return {x.get("custom_id") for x in lines}


def _cancelled_line(job_id: str, custom_id: str) -> dict:
    error = {"code": "batch_cancelled", "message": "the batch was cancelled before this ran"}
    return _line(job_id, custom_id, None, error)


def _json_line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


# ----------------------------------------------------------------------------------------------
# Running jobs


class Job:
    """A job being run by a ``JobRunner`` (use the runner's methods to drive it)."""

    def __init__(
        self, paths: JobPaths, manifest: dict[str, Any], lines: list[InputLine], lock: _Lock
    ) -> None:
        self.paths = paths
        self.manifest = manifest
        self.lines = lines
        self.lock = lock
        self.by_custom_id = {line.custom_id: line for line in lines}
        self.done: set[str] = set()
        self.pending: collections.deque[int] = collections.deque()
        self.in_flight: dict[str, int] = {}  # engine request id -> index
        # the prepared bodies of requests submitted by this process (restored ones have none)
        self.prepared: dict[str, openai_api.Prepared] = {}
        self.store: ckpt.CheckpointStore | None = None
        self.last_checkpoint = time.monotonic()
        self.last_error: str | None = None  # of the last failed checkpoint write
        self.notes: list[str] = []  # what resuming did, for the user
        self._files: dict[str, Any] = {}
        self._last_cancel_poll = 0.0

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def dir(self) -> Path:
        return self.paths.root

    @property
    def priority(self) -> int:
        return self.manifest["priority"]

    @property
    def state(self) -> str:
        return self.manifest["status"]

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    @property
    def total(self) -> int:
        return len(self.lines)

    @property
    def num_done(self) -> int:
        return len(self.done)

    def status(self) -> JobStatus:
        return status(self.paths.root)

    def request_id(self, index: int) -> str:
        return f"{self.id}/{index}"

    # -- files ---------------------------------------------------------------------------------

    def write(self, kind: str, obj: dict) -> None:
        """Append one line to ``output.jsonl`` or ``errors.jsonl`` in one write, flushed to the
        OS at once (a SIGKILL cannot lose it; ``sync`` makes it survive a power cut)."""
        f = self._files.get(kind)
        if f is None:
            path = self.paths.output if kind == "output" else self.paths.errors
            f = self._files[kind] = open(path, "ab", buffering=0)  # noqa: SIM115
        f.write(_json_line(obj))
        self.done.add(obj["custom_id"])

    def sync(self) -> None:
        """fsync the output files (also called on the checkpoint writer thread)."""
        for f in list(self._files.values()):
            os.fsync(f.fileno())

    def close_files(self) -> None:
        self.sync()
        for f in self._files.values():
            f.close()
        self._files.clear()

    def set_state(self, state: str) -> None:
        now = int(time.time())
        self.manifest["status"] = state
        self.manifest.setdefault(f"{state}_at", now)
        _write_manifest(self.paths, self.manifest)


class JobRunner:
    """Runs jobs on ``engine``; see the module docstring.

    ``checkpoint_every``: seconds between checkpoints of a job (None: only on ``suspend`` and
    ``checkpoint``); ``keep``: checkpoints kept per job; ``max_in_flight``: requests of all jobs
    in the engine at once (default: the engine's ``max_batch_size``), split evenly among them;
    ``cancel_poll_s``: how often a job looks for a cancel marker left by another process;
    ``observer``: called with every output of a job's requests (the server's metrics).
    """

    def __init__(
        self,
        engine: Engine,
        checkpoint_every: float | None = 60.0,
        keep: int = 3,
        max_in_flight: int | None = None,
        cancel_poll_s: float = 0.25,
        observer: Callable[[RequestOutput], None] | None = None,
    ) -> None:
        if checkpoint_every is not None and not checkpoint_every > 0:
            raise ValueError(f"checkpoint_every must be > 0 or None, got {checkpoint_every!r}")
        self.engine = engine
        self.checkpoint_every = checkpoint_every
        self.keep = keep
        self.max_in_flight = max_in_flight or engine.config.max_batch_size
        self.cancel_poll_s = cancel_poll_s
        self.observer = observer
        self.jobs: dict[str, Job] = {}
        self._turn = itertools.count()
        path = engine.model.path
        self.model_name = str(path) if str(path).startswith("random:") else Path(path).name
        self.system_fingerprint = "fp_" + model_fingerprint(engine.model)["digest"][:12]
        engine.add_step_hook(self._after_step)

    # -- creating and resuming -----------------------------------------------------------------

    def create(
        self,
        requests: str | os.PathLike | Iterable[Mapping[str, Any]],
        job_dir: str | os.PathLike,
        priority: int = 1,
        job_id: str | None = None,
        endpoint: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Job:
        """A new job from a Batch API input file (a path) or its lines (dicts), in the empty or
        new directory ``job_dir``. ``job_id`` defaults to a hash of the input and priority (so
        the same input gives the same ids); ``endpoint`` requires every line to use it;
        ``metadata`` is kept in ``job.json`` (the CLI keeps its engine flags there).
        ``prepare`` and then ``start``, in one call."""
        return self.start(self.prepare(requests, job_dir, priority, job_id, endpoint, metadata))

    def prepare(
        self,
        requests: str | os.PathLike | Iterable[Mapping[str, Any]],
        job_dir: str | os.PathLike,
        priority: int = 1,
        job_id: str | None = None,
        endpoint: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Job:
        """``create``'s first half: write, parse and validate the job (status "validating"; a
        bad line gets its error line, a bad file raises ``JobInputError`` and leaves the job
        "failed"). It changes no engine or runner state, so a server runs it off the engine
        thread (validating a large file takes a while); ``start`` then queues the job, on the
        engine's thread."""
        if isinstance(priority, bool) or not isinstance(priority, int) or priority < 1:
            raise ValueError(f"a job is best-effort: priority must be an int >= 1, got {priority}")
        data = _input_bytes(requests)
        paths = JobPaths(Path(job_dir))
        _claim_dir(paths)
        job_id = job_id or "batch_" + _hash("job", hashlib.sha256(data).hexdigest(), str(priority))
        if job_id in self.jobs:
            raise JobError(f"job {job_id} is already running here (give another job_id)")
        paths.input.write_bytes(data)
        now = int(time.time())
        manifest = {
            "format": FORMAT_VERSION,
            "id": job_id,
            "status": "validating",
            "priority": priority,
            "created_at": now,
            "validating_at": now,
            "total": 0,
            "metadata": dict(metadata or {}),
        }
        _write_manifest(paths, manifest)
        lock = _Lock(paths)
        try:
            lines = _parse_or_fail(paths, manifest, data, endpoint)
        except JobInputError:
            lock.release()
            raise
        job = Job(paths, manifest, lines, lock)
        self._validate_bodies(job)
        job.sync()
        return job

    def start(self, job: Job) -> Job:
        """Queue a job from ``prepare``: it goes "in_progress" (or straight to its end: no
        valid line, or cancelled while it was validated)."""
        if job.id in self.jobs:
            job.lock.release()
            raise JobError(f"job {job.id} is already running here (give another job_id)")
        return self._start(job)

    def resume(self, job_dir: str | os.PathLike, recompute: bool = False) -> Job:
        """Pick up the job in ``job_dir`` where its last valid checkpoint left it (a finished
        job is returned as it is). ``recompute``: accept a checkpoint from another model, dtype
        or page size and re-prefill its requests from their tokens."""
        paths = JobPaths(Path(job_dir))
        manifest = _read_manifest(paths)
        if manifest.get("format") != FORMAT_VERSION:
            raise JobError(f"{paths.manifest}: job format {manifest.get('format')} is unknown")
        lock = _Lock(paths)
        job = None
        try:
            lines = parse_input(paths.input.read_bytes())
            job = Job(paths, manifest, lines, lock)
            if manifest["id"] in self.jobs:
                raise JobError(f"job {manifest['id']} is already running here")
            if job.finished:
                lock.release()
                return job
            job.done = _done_ids(paths, repair=True)
            if manifest["status"] == "validating":  # it died validating: validate again
                paths.errors.unlink(missing_ok=True)
                job.done = set()
                self._validate_bodies(job)
            restored = self._restore(job, recompute)
        except BaseException:
            if job is not None and job.store is not None:
                job.store.close()
            lock.release()
            raise
        return self._start(job, restored)

    def _validate_bodies(self, job: Job) -> None:
        """Every body against the engine; a bad one gets its 400 line in ``errors.jsonl``."""
        for line in job.lines:
            try:
                self._prepare(job, line)
            except openai_api.BadRequest as e:
                job.write("errors", self._error_line(job, line.custom_id, 400, e.body()))
        job.manifest["total"] = len(job.lines)

    def _restore(self, job: Job, recompute: bool) -> set[str]:
        """Restore the requests of the newest valid checkpoint that are not done yet."""
        job.store = ckpt.CheckpointStore(job.paths.checkpoints, self.keep)
        job.store.clean_tmp()  # what a write killed mid-way left behind
        loaded = job.store.load()
        if loaded is None:
            return set()
        step, snap = loaded
        if snap.meta.get("job", {}).get("id") != job.id:
            raise ckpt.IncompatibleCheckpoint(f"checkpoint {step} belongs to another job")
        skip = {
            job.request_id(job.by_custom_id[c].index) for c in job.done if c in job.by_custom_id
        }
        before = set(self.engine.scheduler.requests)
        done = ckpt.restore(self.engine, snap, recompute=recompute, skip=skip)
        job.notes.append(
            f"restored checkpoint {step}: {len(done.with_kv)} requests with their KV pages, "
            f"{len(done.recomputed)} recomputing from tokens, {done.parked_rows} rows parked "
            f"at their cursor, {done.rewound_rows} rerun from their chunk's start"
        )
        if recompute:
            why = "; ".join(ckpt.mismatches(snap.meta, self.engine)) or "asked to"
            job.notes.append(f"resumed from tokens alone (recompute: {why})")
        restored = set(self.engine.scheduler.requests) - before
        for rid in restored:
            self.engine.route_outputs(rid, self._on_output)
            job.in_flight[rid] = int(rid.rsplit("/", 1)[1])
        return {job.lines[i].custom_id for i in job.in_flight.values()}

    def _start(self, job: Job, restored: Iterable[str] = ()) -> Job:
        skip = job.done | set(restored)
        job.pending.extend(line.index for line in job.lines if line.custom_id not in skip)
        if job.store is None:
            job.store = ckpt.CheckpointStore(job.paths.checkpoints, self.keep)
        self.jobs[job.id] = job
        job.set_state("in_progress")
        job.last_checkpoint = time.monotonic()
        if job.paths.cancel_marker.exists():
            self.cancel(job)
        else:
            self._finish_if_done(job)
        return job

    # -- running -------------------------------------------------------------------------------

    def run(
        self,
        job: Job | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: bool = False,
    ) -> bool:
        """Step the engine until ``job`` (default: every job here) has finished; other requests
        in the engine are served meanwhile. Returns False if ``should_stop()`` said to stop
        first (the caller then usually ``suspend``s). ``progress``: a bar with rate and ETA."""
        from tqdm.auto import tqdm

        jobs = [job] if job is not None else list(self.jobs.values())
        done = lambda: sum(j.num_done for j in jobs)  # noqa: E731
        with tqdm(
            total=sum(j.total for j in jobs),
            initial=done(),
            unit="req",
            desc=jobs[0].id if len(jobs) == 1 else f"{len(jobs)} jobs",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar:
            while not all(j.finished for j in jobs):
                if should_stop is not None and should_stop():
                    return False
                self.engine.step()
                if done() != bar.n:
                    bar.update(done() - bar.n)
        return True

    def checkpoint(self, job: Job, wait: bool = False) -> int:
        """Checkpoint ``job`` now (between two engine steps): its output files are synced
        first, then its requests in flight are captured and written in the background.
        ``wait``: return once the write has committed. Returns the checkpoint step."""
        snap = ckpt.capture(self.engine, job.in_flight)
        snap.meta["job"] = {"id": job.id, "done": len(job.done)}
        # the results written so far reach the disk before the checkpoint commits (on the
        # writer thread: an fsync can take a while)
        step = job.store.save(snap, before=job.sync)
        job.last_checkpoint = time.monotonic()
        if wait:
            job.store.wait()
        return step

    def suspend(self, job: Job) -> int:
        """Checkpoint ``job``, wait for the write, and stop running it here (its requests leave
        the engine; ``resume`` continues it). Returns the checkpoint step."""
        step = self.checkpoint(job, wait=True)
        self._detach(job)
        return step

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: requests not started get ``batch_cancelled`` lines now, those in
        flight are aborted (and get theirs at the next step); then it is ``cancelled``."""
        if job.finished:
            return
        job.paths.cancel_marker.touch()  # a restart goes on cancelling
        job.set_state("cancelling")
        while job.pending:
            job.write("errors", _cancelled_line(job.id, job.lines[job.pending.popleft()].custom_id))
        for rid in list(job.in_flight):
            self.engine.abort(rid)
        self._finish_if_done(job)

    def close(self) -> None:
        """Stop running every unfinished job here without a new checkpoint (their last one
        stays), and leave the engine."""
        for job in list(self.jobs.values()):
            if not job.finished:
                self._detach(job)
        with contextlib.suppress(ValueError):
            self.engine.remove_step_hook(self._after_step)

    # -- the engine's step hook ----------------------------------------------------------------

    def _after_step(self) -> None:
        now = time.monotonic()
        for job in list(self.jobs.values()):
            if job.finished:
                continue
            if now - job._last_cancel_poll >= self.cancel_poll_s:
                job._last_cancel_poll = now
                if job.state != "cancelling" and job.paths.cancel_marker.exists():
                    self.cancel(job)
                    continue
            self._finish_if_done(job)
        self._refill()
        if self.checkpoint_every is None:
            return
        for job in list(self.jobs.values()):
            due = now - job.last_checkpoint >= self.checkpoint_every
            if due and not job.finished and job.state != "cancelling" and not job.store.busy():
                self._periodic_checkpoint(job)

    def _periodic_checkpoint(self, job: Job) -> None:
        """A periodic checkpoint that fails (disk full) is reported and retried at the next
        interval; the job goes on and its previous checkpoints stay intact."""
        try:
            self.checkpoint(job)
            job.last_error = None
        except ckpt.CheckpointWriteError as e:
            job.last_error = str(e)
            job.last_checkpoint = time.monotonic()
            warnings.warn(f"job {job.id}: {e}", stacklevel=2)

    def _refill(self) -> None:
        """Submit pending requests round-robin over the jobs, each up to its share."""
        active = [j for j in self.jobs.values() if j.pending and j.state == "in_progress"]
        if not active:
            return
        share = max(1, self.max_in_flight // len(active))
        start = next(self._turn) % len(active)
        order = active[start:] + active[:start]
        while True:
            moved = False
            for job in order:
                if job.pending and len(job.in_flight) < share:
                    self._submit(job, job.pending.popleft())
                    moved = True
            if not moved:
                return

    def _submit(self, job: Job, index: int) -> None:
        line = job.lines[index]
        try:
            prepared = self._prepare(job, line)
        except openai_api.BadRequest as e:  # the body was checked at creation; be safe anyway
            job.write("errors", self._error_line(job, line.custom_id, 400, e.body()))
            return
        rid = job.request_id(index)
        req = self.engine.make_request(
            prepared.prompt_token_ids, prepared.sampling, job.priority, request_id=rid
        )
        self.engine.add(req, on_output=self._on_output)
        job.in_flight[rid] = index
        job.prepared[rid] = prepared

    def _prepare(self, job: Job, line: InputLine) -> openai_api.Prepared:
        seed = _derived_seed(job.id, line.custom_id)
        return openai_api.prepare(self.engine, line.url, line.body, default_seed=seed)

    def _on_output(self, out: RequestOutput) -> None:
        """A job request advanced; when it has finished, its line is written."""
        if self.observer is not None:
            self.observer(out)
        if not out.finished:
            return
        job_id, _, index = out.request_id.rpartition("/")
        job = self.jobs.get(job_id)
        if job is None or out.request_id not in job.in_flight:
            return
        del job.in_flight[out.request_id]
        prepared = job.prepared.pop(out.request_id, None)
        line = job.lines[int(index)]
        if out.finish_reason == "abort":
            job.write("errors", _cancelled_line(job.id, line.custom_id))
        elif out.finish_reason == "error":
            body = openai_api.error_body(out.error or "engine error", "server_error")
            job.write("errors", self._error_line(job, line.custom_id, 500, body))
        else:
            if prepared is None:  # restored from a checkpoint
                prepared = self._prepare(job, line)
            body = openai_api.response_body(
                prepared,
                out,
                _hash("response", job.id, line.custom_id),
                int(time.time()),
                self.model_name,
                self.system_fingerprint,
            )
            job.write(
                "output",
                _line(job.id, line.custom_id, _response(job.id, line.custom_id, 200, body), None),
            )

    def _error_line(self, job: Job, custom_id: str, code: int, body: dict) -> dict:
        return _line(job.id, custom_id, _response(job.id, custom_id, code, body), None)

    def _finish_if_done(self, job: Job) -> None:
        """A job with nothing pending or in flight is finalized: files synced and closed,
        checkpoints removed, ``completed`` (or ``cancelled``). A reader may see ``finalizing``
        meanwhile, or ``cancelling`` for a cancelled job (never ``finalizing``: the server's
        cancel answers with the status it reads)."""
        if job.finished or job.pending or job.in_flight:
            return
        cancelled = job.state == "cancelling"
        if not cancelled:  # a cancelled job goes cancelling -> cancelled, as OpenAI's batches
            job.set_state("finalizing")
        if job.store is not None:  # first: its writer may be syncing the files
            with contextlib.suppress(ckpt.CheckpointWriteError):
                job.store.close()
        job.close_files()
        shutil.rmtree(job.paths.checkpoints, ignore_errors=True)
        job.paths.cancel_marker.unlink(missing_ok=True)
        job.set_state("cancelled" if cancelled else "completed")
        job.lock.release()
        del self.jobs[job.id]

    def _detach(self, job: Job) -> None:
        """Stop running ``job`` here: its requests leave the engine, its files and lock are
        released, its status stays ``in_progress`` (a later ``resume`` continues it)."""
        for rid in list(job.in_flight):
            self.engine.abort(rid)  # its abort output reaches no job
        job.in_flight.clear()
        job.prepared.clear()
        job.pending.clear()
        try:
            if job.store is not None:
                job.store.close()
        finally:
            job.close_files()
            job.lock.release()
        self.jobs.pop(job.id, None)


def _input_bytes(requests: str | os.PathLike | Iterable[Mapping[str, Any]]) -> bytes:
    if isinstance(requests, (str, os.PathLike)):
        return Path(requests).read_bytes()
    return b"".join(_json_line(dict(r)) for r in requests)


def _claim_dir(paths: JobPaths) -> None:
    """``job_dir`` must be new or empty: one directory, one job."""
    if paths.manifest.exists():
        m = _read_manifest(paths)
        raise JobError(
            f"{paths.root} already holds job {m.get('id')} ({m.get('status')}); "
            "resume it, or use another directory"
        )
    if paths.root.exists() and any(paths.root.iterdir()):
        raise JobError(f"{paths.root} is not empty; a job needs a new or empty directory")
    paths.root.mkdir(parents=True, exist_ok=True)


def _parse_or_fail(
    paths: JobPaths, manifest: dict[str, Any], data: bytes, endpoint: str | None
) -> list[InputLine]:
    """The input's lines; an invalid input fails the job (status ``failed``, errors kept)."""
    try:
        return parse_input(data, endpoint)
    except JobInputError as e:
        now = int(time.time())
        manifest |= {
            "status": "failed",
            "failed_at": now,
            "errors": e.errors
            or [{"line": None, "code": "invalid_file", "message": str(e), "param": None}],
        }
        _write_manifest(paths, manifest)
        raise
