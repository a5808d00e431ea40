"""The carry: every piece of state a forward pass holds between two segments.

A pass is ``(carry, cursor)``. Segments are pure functions of the carry (attention also updates
its layer's KV pages in place), so preempting a pass is just keeping its carry, and resuming it
is calling the next segment. Nothing else about a pass lives on the device.

The carry has two parts. The *row state* (``STATE_FIELDS``) is what segments compute. The *pass
metadata* (``META_FIELDS``) says which row is whose: it is built on the host from the executor's
record of the pass's chunks (``pass_meta``), never read back, and rebuilt whenever rows are
dropped, merged or split; the row state then moves with one jitted scatter per source carry
(``scatter_rows``), over bucketed shapes.

Shapes: N rows (a power-of-two bucket; rows past the real ones have ``valid = False``), D hidden,
k experts per token, P pages per row (a bucket: the pages of the pass's longest sequence up to
its chunk's end).
"""

from __future__ import annotations

import jax
import numpy as np

from qllm_jax.models.model import ATTENTION_BLOCK_PAGES
from qllm_jax.models.params import pytree_dataclass
from qllm_jax.scheduler.ledger import CarryRecord

Array = jax.Array


@pytree_dataclass
class Carry:
    """State of one pass between segments (a pytree; all fields are arrays)."""

    # row state: computed by the segments
    h: Array  # [N, D] residual stream (before the pending MoE output is added)
    moe_in: Array  # [N, D] normed MoE input of the current layer
    weights: Array  # [N, k] top-k routing weights of the current layer (f32 or param dtype)
    ids: Array  # [N, k] int32 top-k expert ids of the current layer
    acc: Array  # [N, D] MoE output accumulated over the expert groups run so far
    # pass metadata: built by the host from its record of the pass (numpy arrays, passed to
    # each segment that reads them)
    positions: Array  # [N] int32 position of each row in its sequence
    valid: Array  # [N] bool, False for padding rows
    write_slot: Array  # [N] int32 flat KV slot (page * page_size + offset) for the row's K/V
    pages: Array  # [N, P] int32 pages of the row's sequence up to its chunk's end, in order
    # (0: scratch padding)

    @property
    def num_rows(self) -> int:
        return self.h.shape[0]

    @property
    def state(self) -> tuple[Array, ...]:
        return tuple(getattr(self, f) for f in STATE_FIELDS)


STATE_FIELDS = ("h", "moe_in", "weights", "ids", "acc")
META_FIELDS = ("positions", "valid", "write_slot", "pages")

ROW_BUCKET_MIN = 8  # rows of a pass
PAGE_BUCKET_MIN = ATTENTION_BLOCK_PAGES  # pages a row attends over: whole attention blocks
SAMPLE_BUCKET_MIN = 8  # rows that sample a token


def bucket(n: int, minimum: int = ROW_BUCKET_MIN) -> int:
    """Smallest power of two >= n (and >= minimum): bounds the number of compilations."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def buckets(largest: int, minimum: int) -> list[int]:
    """Every bucket a count in ``1..largest`` can land in."""
    out, b = [], bucket(1, minimum)
    while b < bucket(largest, minimum):
        out.append(b)
        b *= 2
    return [*out, bucket(largest, minimum)]


def pages_per_row(rec: CarryRecord, page_size: int) -> int:
    """Pages each row of a pass reads from the cache: those of the pass's longest sequence up
    to its chunk's end (attention reads a row's own chunk back from the cache too), bucketed."""
    return bucket(max(-(-c.end // page_size) for c in rec.chunks), PAGE_BUCKET_MIN)


def pass_meta(rec: CarryRecord, page_size: int) -> dict[str, np.ndarray]:
    """The metadata fields of a carry holding ``rec``'s chunks, in its row order (host arrays).

    Each chunk's rows are consecutive, at positions ``start .. end``; each row writes its K/V
    to its slot and reads its sequence's keys up to its own position from the cache.
    """
    nb, pb = bucket(rec.num_rows), pages_per_row(rec, page_size)
    pos, valid = np.zeros(nb, np.int32), np.zeros(nb, bool)
    slot, pages = np.zeros(nb, np.int32), np.zeros((nb, pb), np.int32)
    r = 0
    for c in rec.chunks:
        m, nk = c.num_tokens, -(-c.end // page_size)
        p = np.arange(c.start, c.end, dtype=np.int32)
        own = np.asarray(c.pages[:nk], np.int32)
        pos[r : r + m], valid[r : r + m] = p, True
        slot[r : r + m] = own[p // page_size] * page_size + p % page_size
        pages[r : r + m, :nk] = own
        r += m
    return dict(positions=pos, valid=valid, write_slot=slot, pages=pages)


def token_ids(rec: CarryRecord) -> np.ndarray:
    """[N] int32 input tokens of a new pass, in its row order (0 for padding rows)."""
    out = np.zeros(bucket(rec.num_rows), np.int32)
    r = 0
    for c in rec.chunks:
        out[r : r + c.num_tokens] = c.token_ids
        r += c.num_tokens
    return out


def scatter_rows_fn(dst: tuple[Array, ...], src: tuple[Array, ...], to: Array):
    """Row state ``dst`` with row ``i`` of ``src`` written to row ``to[i]`` (rows whose ``to``
    is out of range are dropped). dst [M, ...], src [N, ...], to [N] int32."""
    return tuple(d.at[to].set(s, mode="drop") for d, s in zip(dst, src, strict=True))


scatter_rows = jax.jit(scatter_rows_fn)
