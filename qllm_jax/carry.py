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
k experts per token, P pages per row (a bucket, 0 included: the cached prefix of the pass's
longest one).
"""

from __future__ import annotations

import jax
import numpy as np

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
    chunk: Array  # [N] int32 index of the row's chunk in the pass, -1 for padding
    prefix_len: Array  # [N] int32 tokens of the row's sequence before its chunk (in the cache)
    pages: Array  # [N, P] int32 pages holding those tokens, in order (0: scratch padding)

    @property
    def num_rows(self) -> int:
        return self.h.shape[0]

    @property
    def state(self) -> tuple[Array, ...]:
        return tuple(getattr(self, f) for f in STATE_FIELDS)


STATE_FIELDS = ("h", "moe_in", "weights", "ids", "acc")
META_FIELDS = ("positions", "valid", "write_slot", "chunk", "prefix_len", "pages")

ROW_BUCKET_MIN = 8  # rows of a pass
PAGE_BUCKET_MIN = 4  # pages a row attends over
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
    """Pages each row of a pass reads from the cache: those holding the longest prefix (the
    tokens before a chunk) of the pass, bucketed; 0 when every chunk starts its sequence."""
    most = max(-(-c.start // page_size) for c in rec.chunks)
    return bucket(most, PAGE_BUCKET_MIN) if most else 0


def pass_meta(rec: CarryRecord, page_size: int) -> dict[str, np.ndarray]:
    """The metadata fields of a carry holding ``rec``'s chunks, in its row order (host arrays).

    Each chunk's rows are consecutive, at positions ``start .. end``; each row reads its
    sequence's first ``start`` tokens from the cache and sees its own chunk's rows directly.
    """
    nb, pb = bucket(rec.num_rows), pages_per_row(rec, page_size)
    pos, valid = np.zeros(nb, np.int32), np.zeros(nb, bool)
    slot, pages = np.zeros(nb, np.int32), np.zeros((nb, pb), np.int32)
    chunk, prefix = np.full(nb, -1, np.int32), np.zeros(nb, np.int32)
    r = 0
    for i, c in enumerate(rec.chunks):
        m, nk = c.num_tokens, -(-c.end // page_size)
        p = np.arange(c.start, c.end, dtype=np.int32)
        own = np.asarray(c.pages[:nk], np.int32)
        pos[r : r + m], valid[r : r + m], chunk[r : r + m], prefix[r : r + m] = p, True, i, c.start
        slot[r : r + m] = own[p // page_size] * page_size + p % page_size
        held = -(-c.start // page_size)
        pages[r : r + m, :held] = own[:held]
        r += m
    return dict(
        positions=pos, valid=valid, write_slot=slot, chunk=chunk, prefix_len=prefix, pages=pages
    )


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
