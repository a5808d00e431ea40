"""Requests as plain data and back: the scheduler's part of a durable job's checkpoint.

A checkpoint keeps what a preemption keeps: each request's tokens and sampling state, the
contents of its KV pages and, for a request inside a pass, its row of that pass at the pass's
cursor. This module handles the first and the bookkeeping of the others (which tokens the KV
pages hold, which pass a row belongs to); the executor copies the pages and rows themselves.
Everything here is JSON-ready: ints, floats, strings, lists, dicts.

Times are saved as ages (seconds before the snapshot) because clocks of two processes do not
agree; restoring on another clock keeps every request's age, so aging and arrival order carry
over. Restored requests get fresh sequence ids and fresh pages (the caller remaps the saved
pages into them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .request import Request, Status
from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .core import Scheduler


def take(sched: Scheduler, request_ids: Iterable[str], now: float) -> list[dict[str, Any]]:
    """The state of each live request of ``request_ids`` (unknown or ended ones are skipped)."""
    out = []
    for rid in request_ids:
        req = sched.requests.get(rid)
        if req is not None and not req.status.done:
            out.append(request_state(sched, req, now))
    return out


def request_state(sched: Scheduler, req: Request, now: float) -> dict[str, Any]:
    """One request as plain data. ``kv_tokens``: how many of its first tokens have K/V in its
    pages (for a row inside a pass, the end of its chunk: the layers before the cursor wrote
    those); ``pass``: the pass holding its row (id, cursor, tokens of its chunk), or None."""
    pass_id = sched.in_pass.get(req.seq_id)
    in_pass = None
    kv_tokens = req.num_computed if req.pages else 0
    if pass_id is not None:
        ps = sched.passes[pass_id]
        chunk = next(c for c in ps.chunks if c.seq_id == req.seq_id)
        in_pass = {"pass_id": pass_id, "cursor": ps.cursor, "chunk_tokens": chunk.num_tokens}
        kv_tokens = chunk.end
    return {
        "request_id": req.request_id,
        "prompt_token_ids": list(req.prompt_token_ids),
        "output_token_ids": list(req.output_token_ids),
        "sampling": _sampling_dict(req.sampling),
        "seed": req.seed,
        "priority": req.priority,
        "age": now - req.arrival_time,
        "first_token_age": None if req.first_token_time is None else now - req.first_token_time,
        "num_computed": req.num_computed if req.pages else 0,
        "kv_tokens": kv_tokens,
        "num_preemptions": req.num_preemptions,
        "parked_time": req.parked_time,
        "num_cached_tokens": req.num_cached_tokens,
        "pass": in_pass,
    }


def kv_pages(state: dict[str, Any], page_size: int) -> int:
    """How many of a saved request's first pages hold its K/V."""
    return math.ceil(state["kv_tokens"] / page_size)


def restore(
    sched: Scheduler,
    states: list[dict[str, Any]],
    now: float,
    new_seq_id: Callable[[], int],
    keep_kv: bool = True,
) -> list[Request]:
    """Bring saved requests back, in order. With ``keep_kv`` a request whose K/V was saved is
    admitted at once with fresh pages (the caller writes the saved pages into them) and keeps
    its computed tokens; a row that was inside a pass resumes from its chunk's start unless
    ``restore_pass`` parks it again. Without ``keep_kv``, or when pages are short, it waits
    and recomputes its K/V from its tokens. Raises ``ValueError`` (nothing added) if a request
    cannot be served here."""
    reqs = [_request(s, now, new_seq_id()) for s in states]
    for req in reqs:
        sched.check(req)
    if len({r.request_id for r in reqs}) != len(reqs):
        raise ValueError("a request id appears twice among the restored requests")
    for req, state in zip(reqs, states, strict=True):
        sched.enter(req, now)  # (its wait before the snapshot does not count as starving)
        need = sched.pages_needed(req)
        fits = 0 < kv_pages(state, sched.config.page_size) <= need  # a shorter max_model_len
        if keep_kv and fits and sched.allocator.can_allocate(need):
            req.pages = sched.allocator.allocate(need)
            req.num_computed = state["num_computed"]
            req.status = Status.RUNNING
            sched.admitted.append(req)
        else:
            sched.waiting.append(req)
    return reqs


def restore_pass(sched: Scheduler, rows: list[tuple[Request, int]], cursor: int, now: float) -> int:
    """Park the restored requests' rows (request, tokens of its chunk) as one pass at
    ``cursor``, as a preemption would have left them. Returns the new pass id; the executor
    must then hold a carry for it (``Executor.import_rows``). Raises ``ValueError`` if the
    policy keeps no passes between plans or a request is not admitted."""
    if sched.config.policy != "qllm":
        raise ValueError(f"the {sched.config.policy} policy parks no passes")
    if not 0 < cursor < sched.head:
        raise ValueError(f"cursor {cursor} is not inside a pass (head {sched.head})")
    for req, _ in rows:
        if req.status is not Status.RUNNING or req.seq_id in sched.in_pass:
            raise ValueError(f"request {req.request_id!r} cannot join a restored pass")
    chunks = [sched._chunk(req, n) for req, n in rows]
    ps = sched._new_pass(chunks)
    ps.cursor, ps.parked_since = cursor, now
    sched._quiet = None  # a parked pass to decide about
    for req, _ in rows:
        req.status = Status.PARKED
    return ps.pass_id


def _sampling_dict(sp: SamplingParams) -> dict[str, Any]:
    d = dataclasses.asdict(sp)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _request(state: dict[str, Any], now: float, seq_id: int) -> Request:
    first = state["first_token_age"]
    return Request(
        request_id=state["request_id"],
        seq_id=seq_id,
        prompt_token_ids=[int(t) for t in state["prompt_token_ids"]],
        sampling=SamplingParams(**state["sampling"]),
        seed=int(state["seed"]),
        priority=int(state["priority"]),
        arrival_time=now - float(state["age"]),
        output_token_ids=[int(t) for t in state["output_token_ids"]],
        first_token_time=None if first is None else now - float(first),
        num_preemptions=int(state["num_preemptions"]),
        parked_time=float(state["parked_time"]),
        num_cached_tokens=int(state.get("num_cached_tokens", 0)),  # older checkpoints have none
    )
