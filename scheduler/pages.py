"""Host-side KV page accounting and the automatic prefix cache (plain Python; the device arrays
live in ``qllm_jax.kv_cache``).

The scheduler admits work only when the pages it needs are free, so running out of pages makes
new work wait; it never crashes a pass.

Prefix caching (vLLM's automatic prefix caching, on pages): a *full* page whose K/V are computed
is content-addressed by a hash chain, ``hash(parent page's hash, this page's token ids)``, so
its key names the whole token prefix up to its end (K/V at a position depend on every token
before it, not only on the page's own). A new request maps the longest run of cached pages at
the start of its tokens instead of recomputing them. Pages are reference-counted; every holder
counts (each admitted request whose page table lists the page, running or parked inside a
pass, and any other holder that calls ``acquire``, e.g. a job checkpoint being written). A page
nobody holds stays cached, and is reused (its content forgotten) least recently released first,
only when the free list is empty. A cached page is never written again: holders only read it,
and the scheduler maps at most the pages before a request's last token, which it always
computes into a page of its own.
"""

from __future__ import annotations

import array
import collections
import hashlib
from collections.abc import Iterable, Sequence

SCRATCH_PAGE = 0  # padding rows write here; never handed out
ROOT_HASH = 0  # the "parent" of a sequence's first page

PageHash = int  # 128-bit, deterministic across processes (replicas compute the same keys)


class OutOfPages(RuntimeError):
    """Raised only if a caller allocates without checking ``can_allocate`` first (a bug)."""


def hash_page(parent: PageHash, token_ids: Sequence[int]) -> PageHash:
    """The key of a full page: its parent's key and its own token ids. blake2b rather than
    Python's ``hash``: 128 bits make a collision (two prefixes sharing K/V) negligible, and the
    value is the same in every process, so replicas and a router can compare keys."""
    h = hashlib.blake2b(parent.to_bytes(16, "little"), digest_size=16)
    h.update(array.array("q", token_ids).tobytes())
    return int.from_bytes(h.digest(), "little")


def extend_hashes(
    hashes: list[PageHash], token_ids: Sequence[int], page_size: int, num_pages: int
) -> list[PageHash]:
    """Grow ``hashes`` (the chain of the first pages of ``token_ids``, in place) to cover
    ``num_pages`` full pages, or as many as ``token_ids`` fill. Tokens only ever get appended
    to a request, so a prefix of the chain never changes and is computed once."""
    num_pages = min(num_pages, len(token_ids) // page_size)
    while len(hashes) < num_pages:
        i = len(hashes)
        parent = hashes[-1] if hashes else ROOT_HASH
        hashes.append(hash_page(parent, token_ids[i * page_size : (i + 1) * page_size]))
    return hashes


def reusable_pages(num_tokens: int, page_size: int) -> int:
    """The most leading pages a sequence of ``num_tokens`` known tokens may map from the cache:
    the full pages before its last token. That token is always computed (it yields the logits
    of the next one) and its page is the sequence's own, so no holder ever writes into a shared
    page."""
    return max(0, num_tokens - 1) // page_size


class PageAllocator:
    """KV page ids with reference counts and (``enable_caching``) a prefix cache. Page 0 is
    never handed out.

    Every page is in exactly one state: free (on the free list), held (reference count >= 1,
    possibly also cached), or cached and unheld (evictable, in least-recently-released order).
    ``num_free`` counts both free and evictable pages: what an allocation can get.
    """

    def __init__(self, num_pages: int, page_size: int = 1, enable_caching: bool = False) -> None:
        if num_pages < 2:
            raise ValueError(f"need at least 2 KV pages (one is scratch), got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_caching = enable_caching
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first
        self._refs: dict[int, int] = {}  # held page -> number of holders (>= 1)
        self._page_of: dict[PageHash, int] = {}  # cached content -> the page holding it
        self._hash_of: dict[int, PageHash] = {}  # cached page -> its content key
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.cache_evictions = 0  # cached pages whose content was dropped to make room
        self.version = 0  # contents registered so far: lookups can only gain when it moves
        self.contents_version = 0  # changes of the cached contents: lookups may change with it

    # -- counts ---------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Pages an allocation can get now: free ones plus cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Pages somebody holds (shared pages once)."""
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Pages whose content is in the prefix cache, held or not."""
        return len(self._hash_of)

    @property
    def num_evictable(self) -> int:
        """Cached pages nobody holds: kept until the room is needed."""
        return len(self._evictable)

    def cached_keys(self) -> list[PageHash]:
        """The content keys of every cached page (a replica publishes them for routers)."""
        return list(self._page_of)

    def refcount(self, page: int) -> int:
        return self._refs.get(page, 0)

    def page_hash(self, page: int) -> PageHash | None:
        """The content key of a cached page (None if its content is not cached)."""
        return self._hash_of.get(page)

    # -- allocation -----------------------------------------------------------------------------

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """``n`` pages for a new holder: free pages first, then the least recently released
        cached pages (their content is forgotten)."""
        if n > self.num_free:
            raise OutOfPages(f"asked for {n} KV pages, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
                self.cache_evictions += 1
                self.contents_version += 1
            self._refs[page] = 1
            out.append(page)
        return out

    def acquire(self, pages: Iterable[int]) -> None:
        """One more holder for each of ``pages`` (held or cached ones): a request mapping a
        cached prefix, or any other holder of K/V that must stay put (a job checkpoint)."""
        pages = list(pages)
        for page in pages:
            if page not in self._refs and page not in self._evictable:
                raise ValueError(f"page {page} is neither held nor cached")
        for page in pages:
            if page in self._evictable:
                del self._evictable[page]
            self._refs[page] = self._refs.get(page, 0) + 1

    def free(self, pages: Sequence[int]) -> None:
        """Drop one holder of each of ``pages``. A page nobody holds any more is kept cached
        if its content is (last in ``pages`` = first to be reused: a sequence's tail is the
        least likely to be shared), else it returns to the free list."""
        if SCRATCH_PAGE in pages or len(set(pages)) != len(pages):
            raise ValueError(f"invalid pages to free: {list(pages)}")
        unheld = [p for p in pages if p not in self._refs]
        if unheld:
            raise ValueError(f"freeing pages nobody holds: {unheld}")
        for page in reversed(pages):
            self._refs[page] -= 1
            if self._refs[page]:
                continue
            del self._refs[page]
            if page in self._hash_of:
                self._evictable[page] = None
            else:
                self._free.append(page)

    # -- the prefix cache -----------------------------------------------------------------------

    def lookup(self, hashes: Sequence[PageHash]) -> list[int]:
        """The cached pages holding the longest run of ``hashes`` (a sequence's page chain)
        from its start. Changes nothing."""
        if not self.enable_caching:
            return []
        out = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            out.append(page)
        return out

    def match_length(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of a request with these token ids would come from the cache
        now (whole pages, at most those before its last token). Changes nothing: for routers
        choosing the replica that already holds a prompt's prefix."""
        if not self.enable_caching:
            return 0
        n = reusable_pages(len(token_ids), self.page_size)
        hashes = extend_hashes([], token_ids, self.page_size, n)
        return len(self.lookup(hashes)) * self.page_size

    def register(self, page: int, key: PageHash) -> bool:
        """Record that held page ``page`` now holds the computed K/V of the content ``key``.
        False (nothing changes) when caching is off, the page is already cached, or another
        page already holds that content (this one then stays private and is freed as usual)."""
        if not self.enable_caching or page in self._hash_of or key in self._page_of:
            return False
        if page not in self._refs:
            raise ValueError(f"page {page} is not held: its K/V cannot be registered")
        self._page_of[key] = page
        self._hash_of[page] = key
        self.version += 1
        self.contents_version += 1
        return True

    def clear_cache(self) -> None:
        """Forget every cached content (the device lost its K/V): unheld cached pages become
        free, held ones stay held but are no longer shared with newcomers."""
        self._free.extend(reversed(self._evictable))
        self._evictable.clear()
        self._page_of.clear()
        self._hash_of.clear()
        self.contents_version += 1

    def check(self) -> None:
        """Raise ``AssertionError`` unless every page 1..num_pages-1 is in exactly one state
        and the cache's two maps agree (tests call this after every step)."""
        free, held, idle = set(self._free), set(self._refs), set(self._evictable)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not (free & held or free & idle or held & idle), "a page is in two states"
        assert free | held | idle == set(range(1, self.num_pages)), "a page leaked"
        assert all(n >= 1 for n in self._refs.values())
        assert idle <= set(self._hash_of), "an unheld cached page without content"
        assert not free & set(self._hash_of), "a free page still claims content"
        assert {p: h for h, p in self._page_of.items()} == self._hash_of
