"""The scheduler ↔ executor contract, in plain Python.

A forward pass is split into ``Segment``s (``segment_layout``). A pass is a tuple of
``Chunk``s (its rows) plus a cursor into that layout. Each ``Scheduler.schedule()`` call returns
one ``Plan``: which pass to advance and by how many segments, after creating it, absorbing
parked passes into it, or splitting rows off it; ``Executor.execute(plan)`` carries it out and
returns a ``StepResult`` (the tokens of a pass that reached the head, and any requests that
failed); ``Scheduler.update(plan, result)`` records it. The executor never decides anything; the
scheduler never touches device arrays.

Plans, chunks and results are immutable snapshots of plain values (ints, floats, strings,
tuples): they hold no live scheduler objects, so a plan can be logged, compared, or sent to
another process, and nothing the scheduler does later changes a plan already issued.
"""

from __future__ import annotations

import dataclasses
import functools
import typing


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


def segment_layout(
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
class SampleSpec:
    """How the last row of a chunk samples its request's next token."""

    temperature: float  # 0: greedy
    top_k: int  # <= 0: off
    top_p: float  # 1: off
    seed: int  # the request's resolved seed, 0 <= seed < 2**64
    step: int  # index of the token being sampled in the request's output


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Consecutive tokens of one sequence fed in a pass: a prefill chunk, or one decode token.

    ``pages`` are the sequence's KV pages, enough for ``end`` tokens; ``sample`` is set when the
    chunk reaches the end of the request's known tokens, so its last row yields the next token.
    """

    seq_id: int
    start: int  # position of the first token
    token_ids: tuple[int, ...]
    pages: tuple[int, ...]
    sample: SampleSpec | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def samples(self) -> bool:
        return self.sample is not None


@dataclasses.dataclass(frozen=True)
class Swap:
    """KV pages of one sequence copied between device pages and host slots (``pages[i]`` ↔
    ``slots[i]``): out when the scheduler evicts an idle request to free its pages, in when it
    readmits it, so it need not recompute that K/V."""

    seq_id: int
    pages: tuple[int, ...]
    slots: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    """One step of work for the executor, applied in this order:

    1. ``finished_seq_ids``: sequences that finished or were aborted since the last plan; the
       executor drops any rows of theirs from the carries it holds (a carry left empty is gone)
       and any KV pages of theirs it holds in host slots.
    2. ``swap_out``, then ``swap_in``: KV pages copied to host slots, then from host slots (a
       page freed by a swap-out may be refilled by a swap-in of the same plan; a slot emptied
       by a swap-in is refilled only by a later plan); then the host slots ``drop_slots`` are
       emptied unread (a readmitted request's prefix cache held those pages).
    3. ``new``: the pass ``pass_id`` is created at cursor 0 from ``chunks``; otherwise the
       passes in ``absorb`` (parked at the same cursor) are merged into it.
    4. Rows of the sequences ``split_seq_ids`` move out into a new parked pass ``split_pass_id``
       at the same cursor.
    5. ``num_segments`` segments run from ``cursor``; ``finishes``: the run reaches the head,
       which samples and ends the pass. ``fused``: the whole pass runs as one jit.

    ``chunks`` are the pass's rows after steps 1-4 (a check the executor makes: they must equal
    the rows it holds). ``pass_id=None``: nothing runs; the plan only carries steps 1-2.
    """

    pass_id: int | None
    cursor: int = 0
    num_segments: int = 0
    chunks: tuple[Chunk, ...] = ()
    new: bool = False
    absorb: tuple[int, ...] = ()
    split_seq_ids: tuple[int, ...] = ()
    split_pass_id: int | None = None
    finishes: bool = False
    fused: bool = False
    finished_seq_ids: tuple[int, ...] = ()
    swap_out: tuple[Swap, ...] = ()
    swap_in: tuple[Swap, ...] = ()
    drop_slots: tuple[int, ...] = ()

    @property
    def num_rows(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def runs(self) -> bool:
        """Whether the plan runs anything (else it only drops finished sequences' rows and
        swaps pages)."""
        return self.pass_id is not None


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What ``execute(plan)`` returns.

    ``tokens``: the token sampled for each sampling row of a pass that reached the head, by
    sequence id. ``failed``: sequences whose rows were lost to an error while executing (their
    carries are gone), with the message; the scheduler ends those requests with
    ``finish_reason="error"``. ``reset``: the KV cache had to be rebuilt, so every carry is gone
    and every other admitted request must recompute its KV from its tokens.
    """

    tokens: dict[int, int] = dataclasses.field(default_factory=dict)
    failed: dict[int, str] = dataclasses.field(default_factory=dict)
    reset: bool = False


class PlanError(ValueError):
    """A plan the executor cannot carry out (a scheduler bug): raised before anything of it is
    applied, by the real executor and the simulator's fake one alike."""


# -- plans as JSON (a multi-process engine broadcasts each plan to its follower processes) -----


def encode_plan(plan: Plan) -> list:
    """``plan`` as nested lists of plain values: every dataclass (the plan, its chunks, their
    sampling specs, any other record a field holds) as the list of its fields in declaration
    order. JSON-ready, a few bytes a row; ``decode_plan`` inverts it, guided by the field
    types, so a field added to any of these dataclasses travels too."""
    return _encoder(Plan)(plan)


def decode_plan(data: list) -> Plan:
    """The ``Plan`` that ``encode_plan`` encoded (after a JSON round trip)."""
    return _decoder(Plan)(data)


# Per type, a function built once from the field types (walking the types per value costs
# ~20x more); None where a value passes as it is (JSON writes tuples as lists).


@functools.cache
def _encoder(tp):
    if dataclasses.is_dataclass(tp):
        parts = [(name, _encoder(t)) for name, t in _field_types(tp).items()]
        return lambda x: [getattr(x, n) if f is None else f(getattr(x, n)) for n, f in parts]
    inner = _inner(tp)
    if inner is None or (f := _encoder(inner)) is None:
        return None
    if typing.get_origin(tp) is tuple:
        return lambda xs: [f(x) for x in xs]
    return lambda x: None if x is None else f(x)


@functools.cache
def _decoder(tp):
    if dataclasses.is_dataclass(tp):
        parts = [_decoder(t) for t in _field_types(tp).values()]

        def decode(v):
            if not isinstance(v, list) or len(v) != len(parts):
                raise ValueError(
                    f"an encoded {tp.__name__} is a list of {len(parts)} fields, got {v!r:.80}"
                )
            return tp(*[x if f is None else f(x) for f, x in zip(parts, v, strict=True)])

        return decode
    inner = _inner(tp)
    if typing.get_origin(tp) is tuple:
        f = None if inner is None else _decoder(inner)
        return tuple if f is None else (lambda xs: tuple(f(x) for x in xs))
    if inner is None or (f := _decoder(inner)) is None:
        return None
    return lambda x: None if x is None else f(x)


def _inner(tp):
    """X of ``tuple[X, ...]`` or of ``X | None``; None for any other type."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"plans hold tuple[X, ...] fields, not {tp}")
        return args[0]
    if type(None) in args:
        (inner,) = [t for t in args if t is not type(None)]
        return inner
    return None


@functools.cache
def _field_types(cls) -> dict[str, object]:
    """A dataclass's field names and resolved types, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}
