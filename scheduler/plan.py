"""The scheduler ↔ executor contract, in plain Python.

A forward pass is split into ``Segment``s (``segment_schedule``). A pass is a list of
``Chunk``s (rows) plus a cursor into that schedule. Each ``schedule()`` call returns one
``Plan``: which pass to advance, by how many segments, after creating it, absorbing parked
passes into it, or splitting rows off it; the executor carries it out and reports the tokens of
passes that reached the head. The executor never decides anything; the scheduler never touches
device arrays.
"""

from __future__ import annotations

import dataclasses

from .request import Request


@dataclasses.dataclass(frozen=True)
class Segment:
    """One separately jitted piece of a pass."""

    kind: str  # "attention" | "experts" | "shared" | "head"
    layer: int  # -1 for the head
    stage: int  # 0 = attention, 1.. = expert groups, then the shared expert
    group_start: int = 0  # first expert of an "experts" segment
    group_size: int = 0  # experts in an "experts" segment

    @property
    def layer_boundary(self) -> bool:
        """Parking before this segment preempts between layers (else between expert groups)."""
        return self.kind in ("attention", "head")


def segment_schedule(
    num_layers: int, num_experts: int, group_size: int, shared_expert: bool
) -> list[Segment]:
    """Cursor order of a pass: per layer attention, expert groups, shared expert; then head."""
    if not 1 <= group_size <= num_experts or num_experts % group_size:
        raise ValueError(
            f"expert_group_size must divide num_experts={num_experts}, got {group_size}"
        )
    out = []
    for layer in range(num_layers):
        out.append(Segment("attention", layer, 0))
        for g, start in enumerate(range(0, num_experts, group_size)):
            out.append(Segment("experts", layer, g + 1, start, group_size))
        if shared_expert:
            out.append(Segment("shared", layer, num_experts // group_size + 1))
    out.append(Segment("head", -1, 0))
    return out


def default_group_size(num_experts: int, granularity: str) -> int:
    """Experts per segment: the whole layer for layer granularity, else about 8 groups a layer
    (one expert each for 8-expert models)."""
    if granularity == "layer":
        return num_experts
    size = max(1, num_experts // 8)
    while num_experts % size:
        size -= 1
    return size


@dataclasses.dataclass(frozen=True)
class Chunk:
    """``num_tokens`` tokens of ``request`` from position ``start``. ``samples``: the chunk
    reaches the end of the request's known tokens, so its last row yields the next token."""

    request: Request
    start: int
    num_tokens: int
    samples: bool

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start : self.start + self.num_tokens]

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclasses.dataclass
class Plan:
    """Advance pass ``pass_id`` from ``cursor`` by ``num_segments`` segments.

    In order: if ``new`` is set, the pass is created from those chunks (at cursor 0); passes in
    ``absorb`` (parked at the same cursor) are merged into it; rows of the requests in
    ``split_seq_ids`` move out into a new parked pass ``split_pass_id``; then the segments run.
    ``finishes``: the run reaches the head, which samples and ends the pass. ``fused``: run the
    whole pass as one jit (iteration-level policies). ``chunks`` are the pass's rows after all
    of that, in no particular order.
    """

    pass_id: int
    cursor: int
    num_segments: int
    chunks: list[Chunk]
    new: list[Chunk] | None = None
    absorb: list[int] = dataclasses.field(default_factory=list)
    split_seq_ids: list[int] = dataclasses.field(default_factory=list)
    split_pass_id: int | None = None
    finishes: bool = False
    fused: bool = False

    @property
    def num_rows(self) -> int:
        return sum(c.num_tokens for c in self.chunks)
