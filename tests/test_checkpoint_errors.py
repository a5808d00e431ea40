"""Malformed checkpoints fail loudly, with a `CheckpointError` that names the key and the file.

Each test writes a valid tiny checkpoint (copied from one built per module), breaks exactly one
thing, and checks the error type and that the message points at the culprit. A loader that
silently skips an unknown tensor, zero-fills a missing one or reinterprets bytes of the wrong
dtype would produce a model that runs and is wrong; these tests pin that it refuses instead.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import qllm_jax  # noqa: E402
from tests.hf_tiny import make_checkpoint  # noqa: E402

FILE = "model.safetensors"


# ----------------------------------------------------------------------------------------------
# Pristine checkpoints (built once) and per-test copies


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    out = {}
    for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe"):
        for layout in ("per_expert", "fused"):
            name = f"{family}-{layout}"
            out[name], _ = make_checkpoint(family, root / name, layout=layout)
    out["mixtral-sharded"], _ = make_checkpoint(
        "mixtral", root / "mixtral-sharded", max_shard_size="200KB"
    )
    return out


@pytest.fixture
def ckpt(pristine: dict[str, Path], tmp_path: Path):
    """ckpt("mixtral-per_expert") -> a fresh, writable copy of that pristine checkpoint."""

    def copy(name: str = "mixtral-per_expert") -> Path:
        dst = tmp_path / name
        shutil.copytree(pristine[name], dst)
        return dst

    return copy


def _edit_tensors(file: Path, edit) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _names(*parts: str) -> str:
    """A regex that requires every part (literally) somewhere in the message, in any order."""
    return "".join(f"(?=.*{re.escape(p)})" for p in parts)


def _raises_naming(*parts: str):
    return pytest.raises(qllm_jax.CheckpointError, match=re.compile(_names(*parts), re.DOTALL))


def _shard_of(path: Path, key: str) -> str:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return index["weight_map"][key]


# ----------------------------------------------------------------------------------------------


def test_error_types_are_value_errors() -> None:
    assert issubclass(qllm_jax.CheckpointError, ValueError)
    assert issubclass(qllm_jax.UnsupportedModelError, ValueError)


def test_pristine_checkpoints_load(pristine: dict[str, Path]) -> None:
    """Guards every test below: only the one deliberate corruption can cause their errors."""
    for path in pristine.values():
        qllm_jax.load(path, dtype="float32")


# -- tensor set --------------------------------------------------------------------------------

MISSING = [
    ("mixtral-per_expert", "model.layers.1.self_attn.k_proj.weight"),
    ("mixtral-per_expert", "model.layers.2.block_sparse_moe.experts.5.w3.weight"),
    ("mixtral-fused", "model.layers.0.mlp.experts.down_proj"),
    ("qwen2_moe-per_expert", "model.layers.1.mlp.shared_expert_gate.weight"),
    ("qwen2_moe-fused", "model.layers.2.self_attn.v_proj.bias"),
    ("qwen3_moe-per_expert", "model.layers.0.self_attn.q_norm.weight"),
    ("qwen3_moe-fused", "model.layers.1.mlp.experts.gate_up_proj"),
    ("olmoe-per_expert", "model.layers.0.self_attn.k_norm.weight"),
    ("olmoe-fused", "model.norm.weight"),
    ("phimoe-per_expert", "model.layers.1.post_attention_layernorm.bias"),
    ("phimoe-fused", "lm_head.bias"),
    ("phimoe-fused", "model.layers.2.mlp.router.weight"),
]


@pytest.mark.parametrize(("name", "key"), MISSING, ids=[f"{n}:{k}" for n, k in MISSING])
def test_missing_tensor(ckpt, name: str, key: str) -> None:
    path = ckpt(name)
    _edit_tensors(path / FILE, lambda t: t.pop(key))
    with _raises_naming(key, FILE):
        qllm_jax.load(path, dtype="float32")


UNEXPECTED = [
    ("mixtral-per_expert", "model.layers.0.self_attn.extra_proj.weight", (8, 64)),
    ("mixtral-per_expert", "model.layers.0.block_sparse_moe.experts.8.w1.weight", (48, 64)),
    ("mixtral-per_expert", "model.layers.3.input_layernorm.weight", (64,)),
    ("qwen3_moe-fused", "model.layers.1.mlp.experts.gate_up_proj_bias", (8, 80)),
    ("olmoe-fused", "lm_head.bias", (128,)),  # OLMoE has no lm_head bias
]


@pytest.mark.parametrize(
    ("name", "key", "shape"), UNEXPECTED, ids=[f"{n}:{k}" for n, k, _ in UNEXPECTED]
)
def test_unexpected_tensor(ckpt, name: str, key: str, shape: tuple[int, ...]) -> None:
    path = ckpt(name)
    _edit_tensors(path / FILE, lambda t: t.__setitem__(key, torch.zeros(shape)))
    with _raises_naming(key, FILE):
        qllm_jax.load(path, dtype="float32")


# -- shapes and dtypes -------------------------------------------------------------------------

WRONG_SHAPE = [
    ("mixtral-per_expert", "model.layers.1.self_attn.k_proj.weight"),  # [32, 64] -> [64, 32]
    ("mixtral-per_expert", "model.layers.0.block_sparse_moe.experts.3.w2.weight"),
    ("mixtral-fused", "model.layers.2.mlp.experts.gate_up_proj"),  # [8, 96, 64] -> [8, 64, 96]
    ("qwen2_moe-fused", "model.layers.0.mlp.shared_expert.up_proj.weight"),
    ("qwen3_moe-per_expert", "model.layers.2.self_attn.k_norm.weight"),  # [16] -> [17]
    ("phimoe-fused", "model.embed_tokens.weight"),  # [128, 64] -> [64, 128]
]


def _misshape(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 1:
        return torch.zeros(t.shape[0] + 1)
    return t.transpose(-1, -2).contiguous()


@pytest.mark.parametrize(("name", "key"), WRONG_SHAPE, ids=[f"{n}:{k}" for n, k in WRONG_SHAPE])
def test_wrong_shape(ckpt, name: str, key: str) -> None:
    path = ckpt(name)
    _edit_tensors(path / FILE, lambda t: t.__setitem__(key, _misshape(t[key])))
    with _raises_naming(key, FILE):
        qllm_jax.load(path, dtype="float32")


def test_wrong_expert_count_fused(ckpt) -> None:
    path = ckpt("qwen3_moe-fused")
    key = "model.layers.1.mlp.experts.down_proj"  # [8, 64, 40] -> [7, 64, 40]
    _edit_tensors(path / FILE, lambda t: t.__setitem__(key, t[key][:7].contiguous()))
    with _raises_naming(key, FILE):
        qllm_jax.load(path, dtype="float32")


@pytest.mark.parametrize(
    "dtype", [torch.int8, torch.float64, torch.int32], ids=["int8", "float64", "int32"]
)
def test_unsupported_dtype(ckpt, dtype: torch.dtype) -> None:
    path = ckpt()
    key = "model.layers.0.self_attn.q_proj.weight"
    _edit_tensors(path / FILE, lambda t: t.__setitem__(key, t[key].to(dtype)))
    with _raises_naming(key, FILE):
        qllm_jax.load(path, dtype="float32")


# -- corrupt files -----------------------------------------------------------------------------


def _header(file: Path) -> tuple[int, bytes, bytes]:
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, raw[8 : 8 + n], raw[8 + n :]


def test_truncated_file(ckpt) -> None:
    path = ckpt()
    raw = (path / FILE).read_bytes()
    (path / FILE).write_bytes(raw[: len(raw) * 6 // 10])
    with _raises_naming(FILE):
        qllm_jax.load(path, dtype="float32")


def test_file_shorter_than_header_length(ckpt) -> None:
    path = ckpt()
    (path / FILE).write_bytes(b"\x10\x00\x00")
    with _raises_naming(FILE):
        qllm_jax.load(path, dtype="float32")


def test_header_length_huge(ckpt) -> None:
    path = ckpt()
    raw = (path / FILE).read_bytes()
    (path / FILE).write_bytes((1 << 60).to_bytes(8, "little") + raw[8:])
    with _raises_naming(FILE):
        qllm_jax.load(path, dtype="float32")


def test_header_length_past_end_of_file(ckpt) -> None:
    path = ckpt()
    raw = (path / FILE).read_bytes()
    (path / FILE).write_bytes((len(raw)).to_bytes(8, "little") + raw[8:])
    with _raises_naming(FILE):
        qllm_jax.load(path, dtype="float32")


def test_header_not_json(ckpt) -> None:
    path = ckpt()
    n, header, data = _header(path / FILE)
    garbage = (b"this is not json {" * n)[:n]
    (path / FILE).write_bytes(n.to_bytes(8, "little") + garbage + data)
    with _raises_naming(FILE):
        qllm_jax.load(path, dtype="float32")


def test_header_json_not_an_object(ckpt) -> None:
    path = ckpt()
    n, _, data = _header(path / FILE)
    header = b"[1, 2, 3]".ljust(n)
    (path / FILE).write_bytes(n.to_bytes(8, "little") + header + data)
    with _raises_naming(FILE):
        qllm_jax.load(path, dtype="float32")


def test_data_offsets_beyond_end_of_file(ckpt) -> None:
    """A well-formed header whose last tensor claims bytes the file does not have."""
    path = ckpt()
    _, header, data = _header(path / FILE)
    meta = json.loads(header)
    key = max((k for k in meta if k != "__metadata__"), key=lambda k: meta[k]["data_offsets"][1])
    begin, end = meta[key]["data_offsets"]
    meta[key]["data_offsets"] = [begin, end + 4096]
    new = json.dumps(meta).encode()
    new += b" " * (-len(new) % 8)
    (path / FILE).write_bytes(len(new).to_bytes(8, "little") + new + data)
    with _raises_naming(key, FILE):
        qllm_jax.load(path, dtype="float32")


# -- directory layout --------------------------------------------------------------------------


def test_sharded_index_points_to_missing_shard(ckpt) -> None:
    path = ckpt("mixtral-sharded")
    shard = _shard_of(path, "model.layers.1.self_attn.q_proj.weight")
    (path / shard).unlink()
    with _raises_naming(shard):
        qllm_jax.load(path, dtype="float32")


def test_sharded_bad_tensor_names_its_shard(ckpt) -> None:
    path = ckpt("mixtral-sharded")
    key = "model.layers.2.self_attn.k_proj.weight"
    shard = _shard_of(path, key)
    _edit_tensors(path / shard, lambda t: t.__setitem__(key, _misshape(t[key])))
    with _raises_naming(key, shard):
        qllm_jax.load(path, dtype="float32")


def test_sharded_index_lists_key_absent_from_shard(ckpt) -> None:
    path = ckpt("mixtral-sharded")
    key = "model.layers.0.self_attn.o_proj.weight"
    shard = _shard_of(path, key)
    _edit_tensors(path / shard, lambda t: t.pop(key))
    with _raises_naming(key):
        qllm_jax.load(path, dtype="float32")


def test_no_safetensors_files(ckpt) -> None:
    path = ckpt()
    (path / FILE).unlink()
    with pytest.raises(qllm_jax.CheckpointError, match=re.compile("safetensors", re.IGNORECASE)):
        qllm_jax.load(path, dtype="float32")


def test_unsupported_model_type(ckpt) -> None:
    path = ckpt()
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "llama"
    cfg["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(qllm_jax.UnsupportedModelError) as info:
        qllm_jax.load(path, dtype="float32")
    message = str(info.value)
    assert "llama" in message
    for supported in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe"):
        assert supported in message
