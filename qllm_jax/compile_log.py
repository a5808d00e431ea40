"""Process-wide counts of XLA compilations, from JAX's monitoring events.

A measured window is valid only if nothing compiled inside it: read ``count()`` before and
after (or use ``Window``). ``count()`` counts executables created, whether compiled from scratch
or loaded from the persistent compilation cache (``cache_hits()`` counts the latter); both stall
the host for a while, so both invalidate a latency measurement.

The listener is registered on first use, not at import.
"""

from __future__ import annotations

import threading

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_counts = {"compiles": 0, "cache_hits": 0}
_lock = threading.Lock()
_registered = False


def _on_duration(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT:
        with _lock:
            _counts["compiles"] += 1


def _on_event(event: str, **kwargs) -> None:
    if event == _CACHE_HIT_EVENT:
        with _lock:
            _counts["cache_hits"] += 1


def _register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


def count() -> int:
    """Executables created in this process since the first call of this module."""
    _register()
    return _counts["compiles"]


def cache_hits() -> int:
    """Of those, how many were loaded from the persistent compilation cache."""
    _register()
    return _counts["cache_hits"]


class Window:
    """``with Window() as w: ...`` then ``w.compiles`` / ``w.cache_hits`` inside the block."""

    def __enter__(self) -> Window:
        self._c, self._h = count(), cache_hits()
        self.compiles = self.cache_hits = 0
        return self

    def __exit__(self, *exc) -> None:
        self.compiles, self.cache_hits = count() - self._c, cache_hits() - self._h
