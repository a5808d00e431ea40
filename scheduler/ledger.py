"""The executor's host-side record of the carries it holds, and the plan checks. Plain Python.

Both executors (the real one in ``qllm_jax.executor`` and the simulator's fake one) keep a
``Ledger``: for every live or parked pass, its cursor and its chunks in device row order (chunk
``i`` occupies rows ``offsets[i] .. offsets[i] + num_tokens``). ``Ledger.apply(plan)`` checks a
plan against that record, raising ``PlanError`` before anything changes, then updates the record
and returns the ``Move``s that rearrange device rows (drop, merge, split). The real executor turns
each move into one jitted gather per source carry; the fake executor has nothing to move. So the
row layout of every carry is known on the host, and nothing on the step path needs to read a
device array back to find out which row is whose.

The ledger also records which host slots hold swapped-out KV pages of which sequence, so a
swap-in from an empty slot, a swap-out over a full one or a swap of a sequence that has rows in
a carry is refused the same way by both executors.
"""

from __future__ import annotations

import dataclasses
import itertools
import operator

from .plan import Chunk, Plan, PlanError


@dataclasses.dataclass(frozen=True)
class CarryRecord:
    """Rows of one carry: chunks in device row order, at a cursor."""

    cursor: int
    chunks: tuple[Chunk, ...]

    @property
    def num_rows(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(itertools.accumulate((c.num_tokens for c in self.chunks), initial=0))[:-1]

    def sample_rows(self) -> list[tuple[int, Chunk]]:
        """(row, chunk) of every row that samples: the last row of each sampling chunk."""
        return [
            (off + c.num_tokens - 1, c)
            for off, c in zip(self.offsets, self.chunks, strict=True)
            if c.samples
        ]


@dataclasses.dataclass(frozen=True)
class Move:
    """Carry ``dst`` is rebuilt with the rows of ``record``: ``parts`` lists, for each of its
    chunks, ``(source pass, first row there, first row in dst, rows)``. The sources are read
    before any of them is replaced (``dst`` may be one of them)."""

    dst: int
    record: CarryRecord
    parts: tuple[tuple[int, int, int, int], ...]

    def is_identity(self, old: CarryRecord | None) -> bool:
        """``dst`` keeps its rows where they are (nothing to move on the device)."""
        return (
            old is not None
            and old.chunks == self.record.chunks
            and all(src == self.dst and a == b for src, a, b, _ in self.parts)
        )


@dataclasses.dataclass(frozen=True)
class Applied:
    """What ``Ledger.apply`` changed, in the order the device must follow."""

    gone: tuple[int, ...]  # carries dropped because every row of theirs finished
    freed_slots: tuple[int, ...]  # host slots of finished sequences (their swapped KV is dropped)
    moves: tuple[Move, ...]  # rows rearranged (drops of finished rows, merge, split)
    record: CarryRecord | None  # the plan's pass after the plan (None: it reached the head)
    finished: CarryRecord | None  # the pass as it reached the head (its rows sample)


class Ledger:
    """The record of every carry an executor holds. ``head``: the cursor of the head segment;
    ``page_size``: to check that a chunk's pages cover its tokens."""

    def __init__(self, head: int, page_size: int) -> None:
        self.head = head
        self.page_size = page_size
        self.carries: dict[int, CarryRecord] = {}
        self.where: dict[int, int] = {}  # seq_id -> pass holding its rows
        self.slots: dict[int, int] = {}  # host slot -> sequence whose swapped KV page it holds

    def __len__(self) -> int:
        return len(self.carries)

    def clear(self) -> None:
        """Forget every carry (the device state is lost; host slots survive)."""
        self.carries.clear()
        self.where.clear()

    def drop_slots(self, seq_ids: set[int]) -> tuple[int, ...]:
        """Forget the host slots of ``seq_ids``; returns them."""
        freed = tuple(slot for slot, s in self.slots.items() if s in seq_ids)
        for slot in freed:
            del self.slots[slot]
        return freed

    def drop(self, pass_id: int) -> CarryRecord | None:
        """Forget a carry (after an error). Returns its record."""
        rec = self.carries.pop(pass_id, None)
        for c in rec.chunks if rec else ():
            self.where.pop(c.seq_id, None)
        return rec

    def restore(self, pass_id: int, rec: CarryRecord) -> None:
        """Record a parked carry restored from a checkpoint (``PlanError`` if it clashes with
        what is held: the pass id or a sequence in use, pages too few, a cursor out of range)."""
        if pass_id in self.carries:
            raise PlanError(f"cannot restore pass {pass_id}: it already holds a carry")
        if not 0 < rec.cursor < self.head:
            raise PlanError(f"cannot restore pass {pass_id} at cursor {rec.cursor}")
        self._check_new_chunks(rec.chunks, {p: list(r.chunks) for p, r in self.carries.items()})
        self._set(pass_id, rec)

    # -- the plan ------------------------------------------------------------------------------

    def apply(self, plan: Plan, checked: bool = False) -> Applied:
        """Check ``plan`` (``PlanError``, nothing changed; skipped if already ``checked``) and
        update the record."""
        if not checked:
            self.check(plan)
        freed = self.drop_slots(set(plan.finished_seq_ids)) if self.slots else ()
        for swap in plan.swap_out:
            self.slots.update(dict.fromkeys(swap.slots, swap.seq_id))
        for slot in (*(s for sw in plan.swap_in for s in sw.slots), *plan.drop_slots):
            del self.slots[slot]
        gone, moves = [], []
        for pid, keep in self._after_release(plan.finished_seq_ids).items():
            old = self.carries[pid]
            if not keep:
                gone.append(pid)
                self._set(pid, None)
                continue
            moves.append(_move(pid, CarryRecord(old.cursor, keep), {pid: old}))
            self._set(pid, moves[-1].record)
        if not plan.runs:
            return Applied(tuple(gone), freed, tuple(moves), None, None)
        if plan.new and plan.finishes:  # (a fused plan: its carry is made and gone at once)
            rec = CarryRecord(plan.cursor + plan.num_segments, tuple(plan.chunks))
            return Applied(tuple(gone), freed, tuple(moves), None, rec)
        if plan.new:
            self._set(plan.pass_id, CarryRecord(0, tuple(plan.chunks)))
        elif plan.absorb or plan.split_seq_ids:
            # merge and split in one move from the original carries, so no intermediate carry
            # ever holds more rows than the pass may
            sources = {p: self.carries[p] for p in (plan.pass_id, *plan.absorb)}
            held = [c for src in sources.values() for c in src.chunks]
            split = set(plan.split_seq_ids)
            mine = []
            if split:  # first: the split-off carry is new, so no later move reads it
                moved = tuple(c for c in held if c.seq_id in split)
                mine.append(_move(plan.split_pass_id, CarryRecord(plan.cursor, moved), sources))
            kept = tuple(c for c in held if c.seq_id not in split)
            mine.append(_move(plan.pass_id, CarryRecord(plan.cursor, kept), sources))
            for p in plan.absorb:
                self._set(p, None)
            for move in mine:
                self._set(move.dst, move.record)
            moves += mine
        rec = self.carries[plan.pass_id]
        rec = CarryRecord(plan.cursor + plan.num_segments, rec.chunks)
        if plan.finishes:
            self._set(plan.pass_id, None)
            return Applied(tuple(gone), freed, tuple(moves), None, rec)
        self.carries[plan.pass_id] = rec  # same rows at a new cursor: `where` is unchanged
        return Applied(tuple(gone), freed, tuple(moves), rec, None)

    def check(self, plan: Plan) -> None:
        """Raise ``PlanError`` naming the first thing wrong with ``plan``; change nothing."""
        # each carry's rows after the plan's releases (the records' own tuples: not copied)
        rows = {pid: rec.chunks for pid, rec in self.carries.items()}
        rows |= self._after_release(plan.finished_seq_ids)
        live = {pid for pid, chunks in rows.items() if chunks}
        if plan.swap_out or plan.swap_in or plan.drop_slots:
            self._check_swaps(plan, rows)
        if not plan.runs:
            if plan.chunks or plan.absorb or plan.split_seq_ids or plan.new or plan.finishes:
                raise PlanError("a plan that runs no pass may only release sequences and swap")
            return
        pid = plan.pass_id
        if plan.new:
            if pid in live or plan.cursor != 0 or plan.absorb:
                raise PlanError(f"pass {pid}: created twice, not at cursor 0, or absorbing")
            self._check_new_chunks(plan.chunks, rows)
            held = plan.chunks
        else:
            if plan.fused:
                raise PlanError(f"pass {pid}: a fused plan must create its pass")
            for p in (pid, *plan.absorb):
                if p not in live:
                    raise PlanError(f"no carry for pass {p}")
                if self.carries[p].cursor != plan.cursor:
                    raise PlanError(
                        f"pass {p} is at cursor {self.carries[p].cursor}, plan says {plan.cursor}"
                    )
            if pid in plan.absorb or len(set(plan.absorb)) != len(plan.absorb):
                raise PlanError(f"pass {pid}: absorbs itself or a pass twice")
            held = (
                rows[pid] if not plan.absorb else [c for p in (pid, *plan.absorb) for c in rows[p]]
            )
        if plan.split_seq_ids:
            split = set(plan.split_seq_ids)
            moved = [c for c in held if c.seq_id in split]
            if (
                plan.split_pass_id is None
                or plan.split_pass_id in live
                or plan.split_pass_id in (pid, *plan.absorb)
                or len(moved) != len(split)
                or len(moved) == len(held)
            ):
                raise PlanError(f"bad split of pass {pid} into pass {plan.split_pass_id}")
            held = [c for c in held if c.seq_id not in split]
        elif plan.split_pass_id is not None:
            raise PlanError(f"pass {pid}: a split pass id without rows to split")
        # (a pass advanced unchanged hands back the very tuple its carry records)
        same = held is plan.chunks or (
            len(held) == len(plan.chunks) and all(map(operator.is_, held, plan.chunks))
        )
        if not same and sorted(held, key=_seq) != sorted(plan.chunks, key=_seq):
            raise PlanError(f"pass {pid}: carry rows differ from plan.chunks")
        end = plan.cursor + plan.num_segments
        if plan.num_segments < 0 or end > self.head or plan.finishes != (end == self.head):
            raise PlanError(f"pass {pid}: runs to {end}, head is {self.head}")
        if plan.num_segments == 0 and not plan.finishes:
            raise PlanError(f"pass {pid}: a plan that runs nothing")
        if plan.fused and not (plan.new and plan.finishes):
            raise PlanError(f"pass {pid}: a fused plan runs a new pass to its head")

    # -- helpers -------------------------------------------------------------------------------

    def _check_swaps(self, plan: Plan, rows: dict[int, list[Chunk]]) -> None:
        """Swapped sequences hold no rows; pages are real (not the scratch page 0), distinct
        within a sequence and among swap-ins; a swap-out fills free slots, a swap-in empties
        slots of its own sequence (filled earlier, or by this plan's swap-out: outs go first;
        slots of finished sequences are free by then)."""
        finished = set(plan.finished_seq_ids)
        held = {c.seq_id for cs in rows.values() for c in cs}
        taken = {slot for slot, s in self.slots.items() if s not in finished}
        after_out = self.slots | {slot: sw.seq_id for sw in plan.swap_out for slot in sw.slots}
        for direction, swaps in (("out", plan.swap_out), ("in", plan.swap_in)):
            # (two sequences may swap out one shared prefix page; nothing writes a page twice)
            pages = [p for sw in swaps for p in sw.pages] if direction == "in" else []
            slots = [slot for sw in swaps for slot in sw.slots]
            if len(set(pages)) != len(pages) or len(set(slots)) != len(slots):
                raise PlanError(f"swap {direction}: a page or a host slot listed twice")
            if any(len(set(sw.pages)) != len(sw.pages) for sw in swaps):
                raise PlanError(f"swap {direction}: a sequence lists a page twice")
            if len({sw.seq_id for sw in swaps}) != len(swaps):
                raise PlanError(f"swap {direction}: a sequence swapped twice")
            for sw in swaps:
                if not sw.pages or len(sw.pages) != len(sw.slots) or 0 in sw.pages:
                    raise PlanError(
                        f"swap {direction} of sequence {sw.seq_id}: pages {sw.pages} and slots "
                        f"{sw.slots} must be as many, at least one, and not the scratch page 0"
                    )
                if sw.seq_id in held or sw.seq_id in finished:
                    raise PlanError(
                        f"swap {direction} of sequence {sw.seq_id}: it has rows in a carry "
                        "or has finished"
                    )
                if direction == "out" and taken & set(sw.slots):
                    raise PlanError(f"swap out of sequence {sw.seq_id}: host slots in use")
                if direction == "in" and any(after_out.get(s) != sw.seq_id for s in sw.slots):
                    raise PlanError(
                        f"swap in of sequence {sw.seq_id}: slots {sw.slots} do not hold its pages"
                    )
        swapped_in = {slot for sw in plan.swap_in for slot in sw.slots}
        drop = set(plan.drop_slots)
        if len(drop) != len(plan.drop_slots) or drop & swapped_in or not drop <= set(after_out):
            raise PlanError(f"drop of host slots {plan.drop_slots}: empty, swapped in or twice")

    def _check_new_chunks(self, chunks: tuple[Chunk, ...], rows: dict[int, list[Chunk]]) -> None:
        if not chunks:
            raise PlanError("a new pass without rows")
        elsewhere = {c.seq_id for cs in rows.values() for c in cs}
        seqs = [c.seq_id for c in chunks]
        if len(set(seqs)) != len(seqs) or elsewhere & set(seqs):
            raise PlanError(f"a request has rows in two passes: sequences {seqs}")
        for c in chunks:
            n = len(c.token_ids)  # (c.num_tokens: every row of every new pass comes here)
            if n < 1 or c.start < 0:
                raise PlanError(f"sequence {c.seq_id}: an empty chunk or a negative start")
            if len(c.pages) * self.page_size < c.start + n:
                raise PlanError(
                    f"sequence {c.seq_id}: {len(c.pages)} pages do not hold {c.end} tokens"
                )

    def _after_release(self, seq_ids: tuple[int, ...]) -> dict[int, tuple[Chunk, ...]]:
        """Carries that hold rows of finished sequences, and the chunks they keep."""
        if not seq_ids:
            return {}
        hit = {self.where[s] for s in seq_ids if s in self.where}
        gone = set(seq_ids)
        return {
            pid: tuple(c for c in self.carries[pid].chunks if c.seq_id not in gone)
            for pid in sorted(hit)
        }

    def _set(self, pass_id: int, rec: CarryRecord | None) -> None:
        old = self.carries.pop(pass_id, None)
        for c in old.chunks if old else ():
            if self.where.get(c.seq_id) == pass_id:
                del self.where[c.seq_id]
        if rec is not None:
            self.carries[pass_id] = rec
            for c in rec.chunks:
                self.where[c.seq_id] = pass_id


def _seq(c: Chunk) -> int:
    return c.seq_id


def _move(dst: int, rec: CarryRecord, sources: dict[int, CarryRecord]) -> Move:
    """Where each chunk of ``rec`` comes from among ``sources`` (found by sequence id)."""
    at = {
        c.seq_id: (pid, off)
        for pid, src in sources.items()
        for off, c in zip(src.offsets, src.chunks, strict=True)
    }
    parts = tuple(
        (*at[c.seq_id], off, c.num_tokens) for off, c in zip(rec.offsets, rec.chunks, strict=True)
    )
    return Move(dst, rec, parts)
