"""Paged KV cache: fixed-size pages per layer, a page table per sequence, a host-side allocator.

Device side, each layer's keys and values are one array of ``num_pages * page_size`` slots; a
token at position ``p`` of a sequence lives in slot ``table[p // page_size] * page_size +
p % page_size``. Attention segments update their layer's arrays through donation, so a step
never copies the cache. Page 0 is reserved as a scratch page that padding rows write into and
no sequence owns. Page ids are handed out by the scheduler's ``PageAllocator`` (plain Python).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qllm_jax.carry import bucket
from qllm_jax.models import ModelConfig


@dataclasses.dataclass
class KVCache:
    """Per-layer key and value arrays of ``[num_pages * page_size, Hkv, hd]``."""

    k: list[jax.Array]
    v: list[jax.Array]
    page_size: int

    @classmethod
    def create(
        cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype, sharding=None
    ) -> KVCache:
        """Zeroed caches, on the default device or laid out by ``sharding`` (a mesh shards
        the head axis: each device allocates only its own heads)."""
        shape = (num_pages * page_size, cfg.num_kv_heads, cfg.head_dim)
        k = [jnp.zeros(shape, dtype, device=sharding) for _ in range(cfg.num_layers)]
        v = [jnp.zeros(shape, dtype, device=sharding) for _ in range(cfg.num_layers)]
        return cls(k, v, page_size)

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0] // self.page_size

    def read_pages(self, pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of whole pages, every layer: k, v [L, len(pages), page_size, Hkv, hd].

        For saving a request's KV (job checkpoints): one jitted gather over a power-of-two
        bucket of page ids (padded with the scratch page, so the executables stay few) and one
        explicit device-to-host copy; the cache itself is not touched."""
        ids = _bucketed(pages)
        k, v = jax.device_get(_gather_pages(tuple(self.k), tuple(self.v), ids, self.page_size))
        return k[:, : len(pages)], v[:, : len(pages)]

    def write_pages(self, pages: Sequence[int], k: np.ndarray, v: np.ndarray) -> None:
        """Inverse of ``read_pages``: put saved pages into (possibly other) pages ``pages``.
        In place (the cache is donated); padding entries write the scratch page."""
        n, layers = len(pages), len(self.k)
        want = (layers, n, self.page_size, *self.k[0].shape[1:])
        if k.shape != want or v.shape != want:
            raise ValueError(f"KV pages of shape {k.shape}, {v.shape}; this cache holds {want}")
        ids = _bucketed(pages)
        pad = ((0, 0), (0, len(ids) - n)) + ((0, 0),) * 3
        dtype = self.k[0].dtype
        kk, vv = (np.pad(np.asarray(x, dtype), pad) for x in (k, v))
        new_k, new_v = _scatter_pages(tuple(self.k), tuple(self.v), ids, kk, vv, self.page_size)
        self.k, self.v = list(new_k), list(new_v)


PAGE_IO_BUCKET_MIN = 8  # pages per checkpoint read or write


def _bucketed(pages: Sequence[int]) -> np.ndarray:
    """Page ids padded with the scratch page to a power-of-two count."""
    ids = np.zeros(bucket(len(pages), PAGE_IO_BUCKET_MIN), np.int32)
    ids[: len(pages)] = pages
    return ids


@functools.partial(jax.jit, static_argnames=("page_size",))
def _gather_pages(k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], ids, page_size: int):
    """k, v [L, P, page_size, Hkv, hd] of pages ``ids`` [P]."""

    def take(x):  # [num_pages * page_size, Hkv, hd] -> [P, page_size, Hkv, hd]
        return x.reshape(-1, page_size, *x.shape[1:])[ids]

    return jnp.stack([take(x) for x in k]), jnp.stack([take(x) for x in v])


@functools.partial(jax.jit, static_argnames=("page_size",), donate_argnums=(0, 1))
def _scatter_pages(k, v, ids, new_k, new_v, page_size: int):
    """The caches with pages ``ids`` [P] replaced by ``new_k``/``new_v`` [L, P, ps, Hkv, hd]."""

    def put(x, new):
        return x.reshape(-1, page_size, *x.shape[1:]).at[ids].set(new).reshape(x.shape)

    return (
        tuple(put(x, new_k[i]) for i, x in enumerate(k)),
        tuple(put(x, new_v[i]) for i, x in enumerate(v)),
    )


def pages_for_budget(
    cfg: ModelConfig,
    page_size: int,
    dtype,
    kv_bytes: int | None,
    fraction: float = 0.9,
    shards: int = 1,
) -> int:
    """Number of pages that fit ``kv_bytes`` per device, or a fraction of the (first) device's
    free memory; ``shards``: the tensor-axis size, which splits each page's heads."""
    per_page = 2 * cfg.num_layers * page_size * cfg.kv_size * np.dtype(dtype).itemsize // shards
    if kv_bytes is None:
        stats = jax.devices()[0].memory_stats() or {}
        limit, used = stats.get("bytes_limit"), stats.get("bytes_in_use", 0)
        if limit is None:
            raise ValueError(
                "this device does not report its memory; pass kv_pages= or kv_bytes= explicitly"
            )
        kv_bytes = int((limit - used) * fraction)
    return max(2, kv_bytes // per_page)
