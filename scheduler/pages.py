"""Host-side KV page accounting (plain Python; the device arrays live in ``qllm_jax.kv_cache``).

The scheduler admits work only when the pages it needs are free, so running out of pages makes
new work wait; it never crashes a pass.
"""

from __future__ import annotations

SCRATCH_PAGE = 0  # padding rows write here; never handed out


class OutOfPages(RuntimeError):
    """Raised only if a caller allocates without checking ``can_allocate`` first (a bug)."""


class PageAllocator:
    """Free list of KV page ids. Page 0 is never handed out."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"need at least 2 KV pages (one is scratch), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} KV pages, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        if SCRATCH_PAGE in pages or len(set(pages)) != len(pages):
            raise ValueError(f"invalid pages to free: {pages}")
        self._free.extend(pages)
