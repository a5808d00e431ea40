"""Request state, as the host sees it. Plain Python: the scheduler never touches device arrays."""

from __future__ import annotations

import dataclasses
import enum

from .sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued, no KV pages yet
    RUNNING = "running"  # admitted: holds KV pages, gets scheduled
    PARKED = "parked"  # its pass was preempted mid-forward; carry kept at a cursor
    FINISHED = "finished"
    ABORTED = "aborted"

    @property
    def done(self) -> bool:
        return self in (Status.FINISHED, Status.ABORTED)


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and everything the host tracks about it."""

    request_id: str
    seq_id: int  # small unique int naming the sequence on the device (KV ownership, masks)
    prompt_token_ids: list[int]
    sampling: SamplingParams
    seed: int  # resolved seed (SamplingParams.seed, or drawn at arrival)
    priority: int = 0  # lower is more urgent; 0 = latency-sensitive, > 0 = best-effort
    arrival_time: float = 0.0
    max_len: int = 0  # prompt + output may not exceed this (model limit and max_tokens)
    status: Status = Status.WAITING
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    pages: list[int] = dataclasses.field(default_factory=list)
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None  # what went wrong, with finish_reason "error"
    num_preemptions: int = 0
    parked_time: float = 0.0
    last_progress: float = 0.0  # when it last had rows computed (its arrival, at first)
    # prefix caching (scheduler/pages.py): the hash chain of the request's full pages of known
    # tokens (computed once, extended as tokens are appended)
    page_hashes: list[int] = dataclasses.field(default_factory=list)
    prefix_pages: int = 0  # leading pages of ``pages`` mapped from the cache (read-only here)
    cached_pages: int = 0  # leading pages whose content is in (or came from) the cache
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the cache (vLLM's field)
    arrival_work: int = 0  # the scheduler's computed-rows counter at arrival (hrrn's clock)
    # KV swapped to host memory while it waits (evicted with ``swap_pages``): the host slots
    # of its first pages, holding the K/V of its first ``swapped_tokens`` tokens
    swap_slots: list[int] = dataclasses.field(default_factory=list)
    swapped_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """``tuple(all_token_ids[start:end])`` without building ``all_token_ids``: a decode
        row's one token does not copy the whole prompt (the simulator's hottest line)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return tuple(self.output_token_ids[start - p : end - p])
        if end <= p:
            return tuple(self.prompt_token_ids[start:end])
        return tuple(self.prompt_token_ids[start:]) + tuple(self.output_token_ids[: end - p])

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_token_ids)

    @property
    def best_effort(self) -> bool:
        return self.priority > 0
