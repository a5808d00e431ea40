"""Shared pytest setup: make `tests.hf_tiny` importable under any pytest import mode, and
release compiled code between test modules."""

import gc
import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """After each test module, drop JAX's caches of compiled executables. One pytest process
    compiles thousands of them, each XLA:CPU executable holds several memory maps, and a
    process may hold at most ``vm.max_map_count`` (65530 here): past it LLVM fails with
    "Cannot allocate memory" and the process dies, however much RAM is free (the full suite
    did, at its ~380th test)."""
    yield
    import jax

    gc.collect()  # the module's engines and models, so that their executables go too
    jax.clear_caches()
