"""Iteration-level scheduling with continuous batching. Plain Python, never imports jax.

Contract with the executor: ``schedule() -> Plan | None`` says which tokens of which requests
form the next pass; the engine runs it and calls ``update(plan, tokens)`` with the token each
sampling request produced. Requests are admitted first come first served, each reserving the KV
pages of its whole prompt plus ``max_tokens`` up front, so a running request never runs out of
pages: when the cache is full, new requests wait.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable

from .pages import PageAllocator
from .request import Request, Status


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``num_tokens`` tokens of ``request`` starting at position ``start``; ``samples``: the
    chunk reaches the end of the known tokens, so its last row yields the next token."""

    request: Request
    start: int
    num_tokens: int
    samples: bool

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start : self.start + self.num_tokens]


@dataclasses.dataclass
class Plan:
    chunks: list[Chunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    num_pages: int
    max_model_len: int
    max_batch_size: int = 32  # requests running at once
    max_num_batched_tokens: int = 512  # rows in one pass (prefill is chunked to fit)
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_num_batched_tokens < self.max_batch_size:
            raise ValueError(
                "need max_batch_size >= 1 and max_num_batched_tokens >= max_batch_size, got "
                f"{self.max_batch_size} and {self.max_num_batched_tokens}"
            )


class Scheduler:
    """First come first served with continuous batching: each pass carries one decode token of
    every running request, then prefill chunks of admitted requests in arrival order."""

    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.allocator = PageAllocator(config.num_pages)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}

    # -- requests -------------------------------------------------------------------------------

    def pages_needed(self, req: Request) -> int:
        return math.ceil(req.max_len / self.config.page_size)

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if len(req.prompt_token_ids) >= self.config.max_model_len:
            raise ValueError(
                f"prompt of {len(req.prompt_token_ids)} tokens leaves no room to generate "
                f"(max_model_len={self.config.max_model_len})"
            )
        req.max_len = min(
            len(req.prompt_token_ids) + req.sampling.max_tokens, self.config.max_model_len
        )
        if self.pages_needed(req) > self.config.num_pages - 1:
            raise ValueError(
                f"request needs {self.pages_needed(req)} KV pages but the cache has "
                f"{self.config.num_pages - 1}; lower max_tokens or give the cache more pages"
            )
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        """Stop a request and free everything it holds. Unknown or finished ids: None."""
        req = self.requests.get(request_id)
        if req is None or req.status.done:
            return None
        self._finish(req, "abort", Status.ABORTED)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the two calls of the contract ----------------------------------------------------------

    def schedule(self) -> Plan | None:
        self._admit()
        budget = self.config.max_num_batched_tokens
        chunks = []
        for req in sorted(self.running, key=lambda r: r.in_prefill):  # decodes first
            if budget == 0:
                break
            n = min(req.num_tokens - req.num_computed, budget)
            chunks.append(Chunk(req, req.num_computed, n, req.num_computed + n == req.num_tokens))
            budget -= n
        return Plan(chunks) if chunks else None

    def update(self, plan: Plan, tokens: dict[str, int]) -> list[Request]:
        """Record a finished pass: advance each chunk's request, append sampled tokens, finish
        requests that hit a stop condition. Returns the requests that advanced."""
        now = self.clock()
        advanced = []
        for chunk in plan.chunks:
            req = chunk.request
            if req.status.done:  # aborted while the pass ran
                continue
            req.num_computed = chunk.start + chunk.num_tokens
            if chunk.samples:
                self._append(req, tokens[req.request_id], now)
            advanced.append(req)
        return advanced

    # -- internals ------------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_batch_size:
            req = self.waiting[0]
            need = self.pages_needed(req)
            if not self.allocator.can_allocate(need):
                break  # FCFS: later requests wait behind the head of the queue
            self.waiting.popleft()
            req.pages = self.allocator.allocate(need)
            req.status = Status.RUNNING
            self.running.append(req)

    def _append(self, req: Request, token: int, now: float) -> None:
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = now
        sp = req.sampling
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.config.eos_token_ids):
            self._finish(req, "stop", Status.FINISHED)
        elif len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= req.max_len:
            self._finish(req, "length", Status.FINISHED)

    def _finish(self, req: Request, reason: str, status: Status) -> None:
        if req.status == Status.WAITING:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        if req.pages:
            self.allocator.free(req.pages)
            req.pages = []
        req.status, req.finish_reason, req.finish_time = status, reason, self.clock()
