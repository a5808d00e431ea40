"""A small, strict safetensors reader that streams one tensor at a time.

We parse the format ourselves (8-byte little-endian header length, JSON header, raw data) rather
than use ``safetensors.numpy``: it cannot read bfloat16, and reading tensor by tensor with plain
file reads keeps peak host memory at one tensor plus the arrays being assembled. Every structural
problem (truncated file, bad header, overlapping or out-of-range offsets, unknown dtype) raises a
``CheckpointError`` that names the file and, where there is one, the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from .errors import CheckpointError

DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: str  # safetensors dtype tag, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header. Tensors come back in file order."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path.name}: truncated safetensors file (no header)")
        n = int.from_bytes(raw_len, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path.name}: corrupt safetensors header length {n} (file is {size} bytes)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.name}: corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    infos = []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        infos.append(_tensor_info(path, key, meta, base, size))
    infos.sort(key=lambda t: t.start)
    return {t.key: t for t in infos}


def _tensor_info(path: Path, key: str, meta: object, base: int, size: int) -> TensorInfo:
    try:
        dtype, shape, (lo, hi) = meta["dtype"], meta["shape"], meta["data_offsets"]
        shape = tuple(int(d) for d in shape)
    except (TypeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path.name}: corrupt header entry for tensor {key!r}") from e
    start, end = base + int(lo), base + int(hi)
    if end > size:
        raise CheckpointError(
            f"{path.name}: tensor {key!r} ends at byte {end} but the file has {size} bytes "
            "(truncated file?)"
        )
    if dtype in DTYPES:
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        if hi < lo or end - start != expected:
            raise CheckpointError(
                f"{path.name}: tensor {key!r} has {end - start} bytes, expected {expected} "
                f"for {dtype}{list(shape)}"
            )
    return TensorInfo(key, path, dtype, shape, start, end)


def read_tensor(info: TensorInfo) -> np.ndarray:
    """Read one tensor into a fresh numpy array of its stored dtype."""
    if info.dtype not in DTYPES:
        raise CheckpointError(
            f"{info.file.name}: tensor {info.key!r} has unsupported dtype {info.dtype} "
            f"(supported: {', '.join(DTYPES)})"
        )
    out = np.empty(info.shape, DTYPES[info.dtype])
    with open(info.file, "rb") as f:
        f.seek(info.start)
        got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
    if got != info.end - info.start:
        raise CheckpointError(f"{info.file.name}: tensor {info.key!r}: short read (truncated?)")
    return out


def checkpoint_files(model_dir: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint: a single ``model.safetensors`` or a sharded index."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return _sharded(model_dir, index)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"no *.safetensors file in {model_dir} (PyTorch .bin checkpoints are not supported; "
            "convert them with transformers' save_pretrained)"
        )
    return _merge(files)


def _sharded(model_dir: Path, index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index.name}: not a valid safetensors index: {e}") from e
    shards = sorted(set(weight_map.values()))
    for key, shard in weight_map.items():
        if not (model_dir / shard).is_file():
            raise CheckpointError(f"{index.name}: tensor {key!r} maps to missing file {shard}")
    tensors = _merge([model_dir / s for s in shards])
    for key, shard in weight_map.items():
        if key not in tensors or tensors[key].file.name != Path(shard).name:
            raise CheckpointError(f"{index.name}: tensor {key!r} is not in {shard}")
    return tensors


def _merge(files: list[Path]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for key, info in read_header(path).items():
            if key in tensors:
                raise CheckpointError(
                    f"tensor {key!r} appears in both {tensors[key].file.name} and {path.name}"
                )
            tensors[key] = info
    return tensors


def iter_file_order(tensors: dict[str, TensorInfo]) -> Iterator[TensorInfo]:
    """Tensors grouped by file and in byte order, so reads are sequential."""
    yield from sorted(tensors.values(), key=lambda t: (t.file.name, t.start))
