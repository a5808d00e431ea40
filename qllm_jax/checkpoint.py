"""Checkpoints of a set of requests: what a preemption keeps, written to disk with orbax.

``capture(engine, request_ids)`` takes, between two engine steps, the state of those requests:
their tokens and sampling state (``Scheduler.snapshot``, plain data), the contents of their KV
pages (``Executor.export_kv``) and their rows of any pass that holds them, at its cursor
(``Executor.export_rows``: a running pass is between two segments at a step boundary, so it is
saved as if parked there, and other requests' rows are left out). Only the device-to-host copy
is synchronous; ``CheckpointStore.save`` writes in a background thread while the engine keeps
serving.

``restore(engine, snapshot)`` brings them back into another engine, possibly in another
process: fresh sequence ids and pages (the saved pages are remapped into them), the saved rows
parked again at their cursor, so every request continues exactly where it stopped. A snapshot
from a different model, dtype or page size is refused with the mismatch named
(``IncompatibleCheckpoint``) unless ``recompute=True``, which keeps only the tokens and
re-prefills.

``CheckpointStore`` is one job's directory of orbax checkpoints: atomic commits (a temporary
directory renamed into place), the last ``keep`` kept, a CRC-32 of every array in the metadata
so a corrupt or truncated checkpoint is detected on load and the previous one used instead.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qllm_jax.carry import STATE_FIELDS
from qllm_jax.fingerprint import differences, model_fingerprint
from qllm_jax.scheduler.ledger import CarryRecord
from qllm_jax.scheduler.snapshot import kv_pages

if TYPE_CHECKING:
    from qllm_jax.engine import Engine

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


class JobCheckpointError(RuntimeError):
    """A job checkpoint cannot be used or written."""


class IncompatibleCheckpoint(JobCheckpointError):
    """The checkpoint was written by a different model, dtype, page size or format."""


class NoValidCheckpoint(JobCheckpointError):
    """Every checkpoint in the directory is corrupt or unreadable."""


class CheckpointWriteError(JobCheckpointError):
    """Writing a checkpoint failed (disk full, ...); the previous checkpoints are intact."""


@dataclasses.dataclass
class Snapshot:
    """``meta``: JSON-ready (requests, pass layout, model fingerprint, ...); ``arrays``: the
    saved KV pages (``kv_k``/``kv_v`` [L, pages, page_size, Hkv, hd]) and carry rows
    (``rows{i}.{field}``), host numpy arrays."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclasses.dataclass
class Restored:
    """What ``restore`` did: request ids restored with their KV pages, those that recompute
    their KV from tokens, rows parked again at their cursor and rows rerun from their chunk's
    start (a policy or segment layout that cannot hold them)."""

    with_kv: list[str] = dataclasses.field(default_factory=list)
    recomputed: list[str] = dataclasses.field(default_factory=list)
    parked_rows: int = 0
    rewound_rows: int = 0


def engine_identity(engine: Engine) -> dict[str, Any]:
    """What a checkpoint must match to restore KV pages and carries into ``engine``."""
    from qllm_jax import __version__

    return {
        "model": model_fingerprint(engine.model),
        "dtype": str(engine.model.dtype),
        "page_size": engine.config.page_size,
        "segments": [list(dataclasses.astuple(s)) for s in engine.executor.segments],
        "policy": engine.config.policy,
        "qllm_jax": __version__,
    }


def capture(engine: Engine, request_ids: Iterable[str]) -> Snapshot:
    """The state of the live requests among ``request_ids``; call between two steps."""
    sched, ex = engine.scheduler, engine.executor
    states = sched.snapshot(request_ids)
    index = {sched.requests[s["request_id"]].seq_id: i for i, s in enumerate(states)}
    pages: list[int] = []
    for s in states:
        pages += sched.requests[s["request_id"]].pages[: kv_pages(s, sched.config.page_size)]
    arrays: dict[str, np.ndarray] = {}
    if pages:
        arrays["kv_k"], arrays["kv_v"] = ex.export_kv(pages)
    passes = []
    for i, (rec, rows) in enumerate(ex.export_rows(index)):
        passes.append(
            {"cursor": rec.cursor, "rows": [[index[c.seq_id], c.num_tokens] for c in rec.chunks]}
        )
        arrays |= {f"rows{i}.{name}": x for name, x in rows.items()}
        for c in rec.chunks:  # the scheduler and the executor agree on where each row is
            if (states[index[c.seq_id]]["pass"] or {}).get("cursor") != rec.cursor:
                raise RuntimeError(f"sequence {c.seq_id}: scheduler and executor disagree")
    meta = {"format": FORMAT_VERSION, **engine_identity(engine)}
    return Snapshot(meta | {"requests": states, "passes": passes}, arrays)


def mismatches(meta: dict[str, Any], engine: Engine) -> list[str]:
    """Why ``meta``'s KV pages and rows cannot be restored into ``engine`` (empty: they can)."""
    here = engine_identity(engine)
    out = differences(meta["model"], here["model"])
    for key in ("dtype", "page_size"):
        if meta[key] != here[key]:
            out.append(f"{key} {meta[key]} vs {here[key]}")
    return out


def restore(
    engine: Engine,
    snap: Snapshot,
    recompute: bool = False,
    skip: Iterable[str] = (),
) -> Restored:
    """Bring the saved requests (but those in ``skip``) back into ``engine``, between steps.
    ``recompute``: keep only tokens and sampling state (re-prefill), whatever wrote it."""
    meta = snap.meta
    if meta.get("format") != FORMAT_VERSION:
        raise IncompatibleCheckpoint(
            f"checkpoint format {meta.get('format')}, this qllm-jax reads {FORMAT_VERSION}"
        )
    problems = mismatches(meta, engine)
    if problems and not recompute:
        raise IncompatibleCheckpoint(
            "the checkpoint was written by another engine setup: "
            + "; ".join(problems)
            + " (resume with recompute to re-prefill from tokens alone)"
        )
    skip = set(skip)
    keep = [i for i, s in enumerate(meta["requests"]) if s["request_id"] not in skip]
    states = [meta["requests"][i] for i in keep]
    reqs = engine.restore_requests(states, keep_kv=not recompute)
    done = Restored()
    by_old = dict(zip(keep, reqs, strict=True))
    _restore_kv(engine, snap, by_old)
    for r in reqs:
        (done.with_kv if r.pages else done.recomputed).append(r.request_id)
    same_layout = meta["segments"] == engine_identity(engine)["segments"]
    for i, saved in enumerate(meta["passes"]):
        rows = [(by_old.get(j), n, k) for k, (j, n) in enumerate(saved["rows"])]
        alive = [(r, n, k) for r, n, k in rows if r is not None and r.pages]
        if not alive:
            continue
        arrays = _row_arrays(snap, i, saved["rows"], [k for _, _, k in alive])
        if not (same_layout and engine.config.policy == "qllm") or recompute:
            done.rewound_rows += len(alive)  # they rerun their chunk from its start
            continue
        engine.executor.check_rows(sum(n for _, n, _ in alive), arrays)
        pid = engine.scheduler.restore_pass([(r, n) for r, n, _ in alive], saved["cursor"])
        ps = engine.scheduler.passes[pid]
        engine.executor.import_rows(pid, CarryRecord(ps.cursor, tuple(ps.chunks)), arrays)
        done.parked_rows += len(alive)
    return done


def _restore_kv(engine: Engine, snap: Snapshot, by_old: dict[int, Any]) -> None:
    """Write the saved pages of every request restored with pages into its fresh pages."""
    ps = engine.config.page_size
    offsets = itertools.accumulate((kv_pages(s, ps) for s in snap.meta["requests"]), initial=0)
    src, dst = [], []
    for i, (start, state) in enumerate(zip(offsets, snap.meta["requests"])):
        req = by_old.get(i)
        if req is None or not req.pages:
            continue
        n = kv_pages(state, ps)
        src += range(start, start + n)
        dst += req.pages[:n]
    if dst:
        k, v = snap.arrays["kv_k"][:, src], snap.arrays["kv_v"][:, src]
        engine.executor.import_kv(dst, k, v)


def _row_arrays(
    snap: Snapshot, i: int, rows: list[list[int]], chosen: list[int]
) -> dict[str, np.ndarray]:
    """The saved row state of pass ``i``, restricted to its chunks ``chosen``."""
    offsets = list(itertools.accumulate((n for _, n in rows), initial=0))
    idx = np.concatenate([np.arange(offsets[k], offsets[k + 1]) for k in chosen])
    return {f: snap.arrays[f"rows{i}.{f}"][idx] for f in STATE_FIELDS}


# ----------------------------------------------------------------------------------------------
# On disk


def _crc(x: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(x).view(np.uint8).reshape(-1))


class CheckpointStore:
    """One job's orbax checkpoints in ``directory`` (steps 0, 1, ...; the last ``keep`` kept).

    ``save`` returns at once: one background thread computes the checksums, runs the caller's
    ``before`` (a job syncs its output files there) and has orbax write and commit the step,
    so the engine's loop pays only for ``capture``'s device-to-host copy. A failed write
    surfaces as ``CheckpointWriteError`` from the next ``save`` or ``wait``, with the earlier
    checkpoints untouched. ``load`` returns the newest checkpoint whose metadata parses and
    whose arrays match their checksums, warning about each newer one it had to skip."""

    def __init__(self, directory: str | Path, keep: int = 3) -> None:
        import orbax.checkpoint as ocp

        _quiet_orbax()
        self.directory = Path(directory).absolute()
        self._ocp = ocp
        # orbax's own async mode would still do its setup (directories, metadata) on the
        # calling thread; the whole save runs on our writer thread instead
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=False, create=True
            ),
        )
        self._lock = threading.Lock()  # the manager is used by one thread at a time
        self._writer = concurrent.futures.ThreadPoolExecutor(
            1, "qllm-checkpoint", initializer=_background_priority
        )
        self._pending: concurrent.futures.Future | None = None
        self._next = max(self.steps(), default=-1) + 1

    def steps(self) -> list[int]:
        with self._lock:
            return sorted(self._manager.all_steps())

    def busy(self) -> bool:
        """A write is still in progress."""
        return self._pending is not None and not self._pending.done()

    def save(self, snap: Snapshot, before: Callable[[], None] | None = None) -> int:
        """Start writing ``snap`` as a new step (after the previous write, whose failure is
        raised here); returns the step number. ``before`` runs on the writer thread first."""
        self.wait()
        step, self._next = self._next, self._next + 1
        self._pending = self._writer.submit(self._write, step, snap, before)
        return step

    def wait(self) -> None:
        """Block until the last write has committed (``CheckpointWriteError`` if it failed)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception as e:
            raise CheckpointWriteError(f"writing a checkpoint failed: {e}") from e

    def _write(self, step: int, snap: Snapshot, before: Callable[[], None] | None) -> None:
        if before is not None:
            before()
        arrays = {k: v for k, v in snap.arrays.items() if v.size}  # orbax refuses empty arrays
        meta = snap.meta | {"arrays": {k: _crc(v) for k, v in arrays.items()}}
        items = {"meta": self._ocp.args.JsonSave(meta)}
        if arrays:
            items["state"] = self._ocp.args.StandardSave(arrays)
        with self._lock:
            self.clean_tmp()  # what an earlier failed or killed write left
            running = set(threading.enumerate())
            try:
                self._manager.save(step, args=self._ocp.args.Composite(**items), force=True)
                self._manager.wait_until_finished()
            except BaseException:
                # orbax raises on the first item that fails while the other items' writer
                # threads go on writing into the temporary directory; let them end first
                _join_orbax_threads(set(threading.enumerate()) - running)
                self.clean_tmp()
                raise

    def load(self) -> tuple[int, Snapshot] | None:
        """The newest valid checkpoint (step, snapshot), or None if there is none at all.
        Raises ``NoValidCheckpoint`` if there are some but none is valid."""
        steps = self.steps()
        skipped = []
        for step in reversed(steps):
            try:
                return step, self._load(step)
            except Exception as e:  # noqa: BLE001 -- any failure to read means corrupt
                skipped.append(f"step {step}: {type(e).__name__}: {e}")
                warnings.warn(
                    f"checkpoint {self.directory / str(step)} is corrupt or truncated "
                    f"({type(e).__name__}: {e}); trying the previous one",
                    stacklevel=2,
                )
        if steps:
            raise NoValidCheckpoint(
                f"no valid checkpoint in {self.directory}: " + "; ".join(skipped)
            )
        return None

    def _load(self, step: int) -> Snapshot:
        ocp = self._ocp
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]
        sums = meta.pop("arrays")
        arrays: dict[str, np.ndarray] = {}
        if sums:
            got = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            )["state"]
            arrays = {k: np.asarray(v) for k, v in got.items()}
        if set(arrays) != set(sums):
            raise ValueError(f"arrays {sorted(arrays)} but the metadata lists {sorted(sums)}")
        for key, crc in sums.items():
            if _crc(arrays[key]) != crc:
                raise ValueError(f"array {key} does not match its checksum")
        return Snapshot(meta, arrays)

    def close(self) -> None:
        """Wait for the last write (errors raised) and release the threads."""
        try:
            self.wait()
        finally:
            self._writer.shutdown()
            self._manager.close()

    def clean_tmp(self) -> None:
        """Remove what a failed or interrupted write left (orbax's temporary directories)."""
        for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)


def _join_orbax_threads(threads: set[threading.Thread], timeout_s: float = 120.0) -> None:
    """Wait (at most ``timeout_s`` in all) for those of ``threads`` that orbax started; their
    own errors are the failed write's, already being raised."""
    deadline = time.monotonic() + timeout_s
    for t in threads:
        if type(t).__module__.startswith("orbax"):
            with contextlib.suppress(BaseException):  # orbax's join re-raises the thread's error
                t.join(max(0.0, deadline - time.monotonic()))


def _background_priority() -> None:
    """The writer thread yields the CPU to the engine's threads (Linux: a thread has its own
    nice value), so a checkpoint being written slows serving as little as it can."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _quiet_orbax() -> None:
    """orbax logs every save at INFO through absl; keep a job's terminal for its progress."""
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
