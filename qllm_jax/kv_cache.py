"""Paged KV cache: fixed-size pages per layer, a page table per sequence, a host-side allocator.

Device side, each layer's keys and values are one array of ``num_pages * page_size`` slots; a
token at position ``p`` of a sequence lives in slot ``table[p // page_size] * page_size +
p % page_size``. Attention segments update their layer's arrays through donation, so a step
never copies the cache. Page 0 is reserved as a scratch page that padding rows write into and
no sequence owns. Page ids are handed out by the scheduler's ``PageAllocator`` (plain Python).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qllm_jax.models import ModelConfig


@dataclasses.dataclass
class KVCache:
    """Per-layer key and value arrays of ``[num_pages * page_size, Hkv, hd]``."""

    k: list[jax.Array]
    v: list[jax.Array]
    page_size: int

    @classmethod
    def create(cls, cfg: ModelConfig, num_pages: int, page_size: int, dtype) -> KVCache:
        shape = (num_pages * page_size, cfg.num_kv_heads, cfg.head_dim)
        k = [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
        v = [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
        return cls(k, v, page_size)

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0] // self.page_size

    def read_pages(self, pages: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of some pages, all layers: [L, len(pages) * page_size, Hkv, hd] each.
        For saving a request's KV (job checkpoints)."""
        slots = page_slots(pages, self.page_size)
        return np.stack([np.asarray(x[slots]) for x in self.k]), np.stack(
            [np.asarray(x[slots]) for x in self.v]
        )

    def write_pages(self, pages: list[int], k: np.ndarray, v: np.ndarray) -> None:
        """Inverse of ``read_pages``: restore a request's KV into (possibly other) pages."""
        slots = jnp.asarray(page_slots(pages, self.page_size))
        self.k = [
            x.at[slots].set(jnp.asarray(kk, x.dtype)) for x, kk in zip(self.k, k, strict=True)
        ]
        self.v = [
            x.at[slots].set(jnp.asarray(vv, x.dtype)) for x, vv in zip(self.v, v, strict=True)
        ]


def page_slots(pages: list[int], page_size: int) -> np.ndarray:
    """Flat slot indices of whole pages, in order: [len(pages) * page_size] int32."""
    p = np.asarray(pages, np.int32)
    return (p[:, None] * page_size + np.arange(page_size, dtype=np.int32)[None, :]).reshape(-1)


def pages_for_budget(
    cfg: ModelConfig, page_size: int, dtype, kv_bytes: int | None, fraction: float = 0.9
) -> int:
    """Number of pages that fit ``kv_bytes``, or a fraction of the device's free memory."""
    per_page = 2 * cfg.num_layers * page_size * cfg.kv_size * np.dtype(dtype).itemsize
    if kv_bytes is None:
        stats = jax.devices()[0].memory_stats() or {}
        limit, used = stats.get("bytes_limit"), stats.get("bytes_in_use", 0)
        if limit is None:
            raise ValueError(
                "this device does not report its memory; pass kv_pages= or kv_bytes= explicitly"
            )
        kv_bytes = int((limit - used) * fraction)
    return max(2, kv_bytes // per_page)
