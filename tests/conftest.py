"""Shared pytest setup: make `tests.hf_tiny` importable under any pytest import mode."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
