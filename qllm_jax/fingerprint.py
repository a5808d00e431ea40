"""A model's fingerprint: what a checkpoint of a job records about the model that wrote it.

Restoring KV pages or carry rows into a different model would silently produce garbage, so a
checkpoint names its model and resuming compares. Hashing 90 GB of weights would take minutes,
so the fingerprint hashes what identifies a checkpoint cheaply: its ``config.json``, every
tensor's name, dtype and shape from the safetensors headers (a few KB read per file), each
weight file's size, and the tokenizer files (small; they decide the text). A ``random:`` model
is its preset name, config and seed. A quantized model adds its mode (``"quantize"``): its
weights, KV contents and carries differ from the float model's of the same checkpoint (a float
model's fingerprint has no such key, so its digest is what it always was). Computed once per
loaded model (checkpoints are taken on the engine thread, every few seconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

from qllm_jax.models import Model
from qllm_jax.models.safetensors_io import checkpoint_files

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


_memo: dict[int, dict[str, Any]] = {}  # by id of a live Model (dropped when it is collected)


def model_fingerprint(model: Model) -> dict[str, Any]:
    """``{"name", "config", "tensors", "tokenizer"}`` digests (and ``"quantize"`` for a
    quantized model) plus ``"digest"`` over them all."""
    key = id(model)
    if key not in _memo:
        _memo[key] = _fingerprint(model)
        weakref.finalize(model, _memo.pop, key, None)
    return dict(_memo[key])


def _fingerprint(model: Model) -> dict[str, Any]:
    if str(model.path).startswith("random:"):
        parts = {
            "name": str(model.path),
            "config": _digest(dataclasses.asdict(model.config)),
            "tensors": _digest({"seed": model.seed}),
            "tokenizer": None,
        }
    else:
        path = Path(model.path)
        tensors = checkpoint_files(path)
        parts = {
            "name": path.name,
            "config": _digest(json.loads((path / "config.json").read_text())),
            "tensors": _digest(
                {
                    "tensors": sorted((t.key, t.dtype, list(t.shape)) for t in tensors.values()),
                    "files": sorted(
                        (f.name, f.stat().st_size) for f in {t.file for t in tensors.values()}
                    ),
                }
            ),
            "tokenizer": _digest(
                {n: _file_digest(path / n) for n in _TOKENIZER_FILES if (path / n).is_file()}
            ),
        }
    if model.quantize is not None:
        parts["quantize"] = model.quantize
    return parts | {"digest": _digest(parts)}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (empty: the same model)."""
    if saved.get("digest") == current.get("digest"):
        return []
    out = []
    if saved.get("name") != current.get("name"):
        out.append(f"model {saved.get('name')!r} vs {current.get('name')!r}")
    if saved.get("quantize") != current.get("quantize"):
        out.append(f"quantize {saved.get('quantize')!r} vs {current.get('quantize')!r}")
    parts = (("config", "config.json"), ("tensors", "weights"), ("tokenizer", "tokenizer"))
    for part, what in parts:
        if saved.get(part) != current.get(part):
            out.append(f"its {what} differ")
    return out or ["model fingerprint differs"]


def _digest(obj: Any) -> str:
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(data).hexdigest()[:32]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:32]
