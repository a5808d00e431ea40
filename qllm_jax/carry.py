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
k experts per token, P key pages (a bucket; padding pages have ``key_seq = -1``).
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
    # pass metadata: built by the host from its record of the pass
    positions: Array  # [N] int32 position of each row in its sequence
    seq: Array  # [N] int32 id of the sequence (request) each row belongs to, -1 for padding
    valid: Array  # [N] bool, False for padding rows
    write_slot: Array  # [N] int32 flat KV slot (page * page_size + offset) for the row's K/V
    key_pages: Array  # [P] int32 KV pages the pass attends over (its sequences' pages)
    key_seq: Array  # [P] int32 sequence id owning each key page, -1 for padding
    key_base: Array  # [P] int32 position of each key page's first slot in its sequence

    @property
    def num_rows(self) -> int:
        return self.h.shape[0]

    @property
    def state(self) -> tuple[Array, ...]:
        return tuple(getattr(self, f) for f in STATE_FIELDS)


STATE_FIELDS = ("h", "moe_in", "weights", "ids", "acc")
META_FIELDS = ("positions", "seq", "valid", "write_slot", "key_pages", "key_seq", "key_base")

ROW_BUCKET_MIN = 16  # rows of a pass
PAGE_BUCKET_MIN = 16  # key pages of a pass
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


def key_pages_of(rec: CarryRecord, page_size: int) -> int:
    """Key pages a pass attends over: each chunk's pages up to its last token."""
    return sum(-(-c.end // page_size) for c in rec.chunks)


def pass_meta(rec: CarryRecord, page_size: int) -> dict[str, np.ndarray]:
    """The metadata fields of a carry holding ``rec``'s chunks, in its row order (host arrays).

    Each chunk's rows are consecutive, at positions ``start .. end``; the pass attends over the
    pages of each of its sequences up to the chunk's last token.
    """
    nb = bucket(rec.num_rows)
    pb = bucket(key_pages_of(rec, page_size), PAGE_BUCKET_MIN)
    pos, seq = np.zeros(nb, np.int32), np.full(nb, -1, np.int32)
    valid, slot = np.zeros(nb, bool), np.zeros(nb, np.int32)
    kp, kseq, kbase = np.zeros(pb, np.int32), np.full(pb, -1, np.int32), np.zeros(pb, np.int32)
    r = k = 0
    for c in rec.chunks:
        m, nk = c.num_tokens, -(-c.end // page_size)
        p = np.arange(c.start, c.end, dtype=np.int32)
        pages = np.asarray(c.pages[:nk], np.int32)
        pos[r : r + m], seq[r : r + m], valid[r : r + m] = p, c.seq_id, True
        slot[r : r + m] = pages[p // page_size] * page_size + p % page_size
        kp[k : k + nk], kseq[k : k + nk] = pages, c.seq_id
        kbase[k : k + nk] = np.arange(nk, dtype=np.int32) * page_size
        r, k = r + m, k + nk
    return dict(
        positions=pos, seq=seq, valid=valid, write_slot=slot, key_pages=kp, key_seq=kseq,
        key_base=kbase,
    )  # fmt: skip


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
