"""The carry: every piece of state a forward pass holds between two segments.

A pass is ``(carry, cursor)``. Segments are pure functions ``carry → carry`` (attention also
updates its layer's KV pages in place), so preempting a pass is just keeping its carry, and
resuming it is calling the next segment. Nothing else about a pass lives on the device.

Shapes: N rows (a power-of-two bucket; rows past the real ones have ``valid = False``), D hidden,
k experts per token, P key pages (a bucket; padding pages have ``key_seq = -1``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass
class Carry:
    """State of one pass between segments (a registered pytree; all fields are arrays)."""

    h: Array  # [N, D] residual stream (before the pending MoE output is added)
    moe_in: Array  # [N, D] normed MoE input of the current layer
    weights: Array  # [N, k] top-k routing weights of the current layer (f32 or param dtype)
    ids: Array  # [N, k] int32 top-k expert ids of the current layer
    acc: Array  # [N, D] MoE output accumulated over the expert groups run so far
    positions: Array  # [N] int32 position of each row in its sequence
    seq: Array  # [N] int32 id of the sequence (request) each row belongs to
    valid: Array  # [N] bool, False for padding rows
    write_slot: Array  # [N] int32 flat KV slot (page * page_size + offset) for the row's K/V
    key_pages: Array  # [P] int32 KV pages the pass attends over (its sequences' pages)
    key_seq: Array  # [P] int32 sequence id owning each key page, -1 for padding
    key_base: Array  # [P] int32 position of each key page's first slot in its sequence

    @property
    def num_rows(self) -> int:
        return self.h.shape[0]


jax.tree_util.register_dataclass(
    Carry, data_fields=[f.name for f in dataclasses.fields(Carry)], meta_fields=[]
)

ROW_FIELDS = ("h", "moe_in", "weights", "ids", "acc", "positions", "seq", "valid", "write_slot")
KEY_FIELDS = ("key_pages", "key_seq", "key_base")


ROW_BUCKET_MIN = 16  # rows of a pass
PAGE_BUCKET_MIN = 16  # key pages of a pass
SAMPLE_BUCKET_MIN = 8  # rows that sample a token


def bucket(n: int, minimum: int = ROW_BUCKET_MIN) -> int:
    """Smallest power of two >= n (and >= minimum): bounds the number of compilations."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def split_rows(carry: Carry, keep: np.ndarray, row_bucket: int, key_bucket: int) -> Carry:
    """A new carry with only the rows ``keep`` (host indices) and the key pages of their
    sequences. Used to split a pass (LS rows continue, BE rows park) and to extract a request.
    """
    keep = np.asarray(keep, np.int32)
    rows = {f: getattr(carry, f)[keep] for f in ROW_FIELDS}
    rows = {f: _pad_device(v, row_bucket, f) for f, v in rows.items()}
    seqs = np.unique(np.asarray(carry.seq)[keep])
    key_seq = np.asarray(carry.key_seq)
    key_idx = np.nonzero(np.isin(key_seq, seqs))[0].astype(np.int32)
    keys = {f: _pad_device(getattr(carry, f)[key_idx], key_bucket, f) for f in KEY_FIELDS}
    return Carry(**rows, **keys)


def merge(carries: list[Carry], row_bucket: int, key_bucket: int) -> Carry:
    """Concatenate the real rows and key pages of several carries at the same cursor."""
    fields = {}
    valid = [np.asarray(c.valid) for c in carries]
    for f in ROW_FIELDS:
        parts = [getattr(c, f)[np.nonzero(v)[0]] for c, v in zip(carries, valid, strict=True)]
        fields[f] = _pad_device(jnp.concatenate(parts), row_bucket, f)
    for f in KEY_FIELDS:
        parts = [getattr(c, f)[np.asarray(c.key_seq) >= 0] for c in carries]
        fields[f] = _pad_device(jnp.concatenate(parts), key_bucket, f)
    return Carry(**fields)


_FILL = {"seq": -1, "valid": False, "write_slot": 0, "key_pages": 0, "key_seq": -1, "key_base": 0}


def _pad_device(x: Array, size: int, field: str) -> Array:
    n = x.shape[0]
    if n > size:
        raise ValueError(f"{n} entries do not fit a bucket of {size}")
    pad = jnp.full((size - n, *x.shape[1:]), _FILL.get(field, 0), x.dtype)
    return jnp.concatenate([x, pad])
