"""Model families as pure functions over param pytrees, and HF checkpoint loading.

Installed as ``qllm_jax.models``; import through ``qllm_jax``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .config import SUPPORTED_MODEL_TYPES, ModelConfig, read_config
from .errors import CheckpointError, UnsupportedModelError
from .loader import Place, load_params, resolve_dtype
from .model import reference_forward
from .params import Params, default_expert_layout
from .random_init import MODEL_PRESETS, random_model

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "MODEL_PRESETS",
    "CheckpointError",
    "Model",
    "ModelConfig",
    "Params",
    "UnsupportedModelError",
    "load",
    "random_model",
    "reference_forward",
]


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded checkpoint: static config, params pytree, tokenizer (None when absent)."""

    config: ModelConfig
    params: Params
    tokenizer: Any | None
    path: Path
    dtype: str  # "float32" or "bfloat16"
    seed: int | None = None  # the seed of a random_model (None: weights from a checkpoint)


def load_tokenizer(model_dir: Path) -> Any | None:
    """The checkpoint's HF tokenizer, or None when the directory ships none."""
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # transformers raises many types; one clear error for the user
        raise CheckpointError(f"cannot load the tokenizer in {model_dir}: {e}") from e


def load(
    model_dir: str | Path,
    dtype: str | Any = "auto",
    expert_layout: str = "auto",
    place: Place | None = None,
) -> Model:
    """Load a Hugging Face MoE checkpoint directory.

    ``dtype``: "auto" (the checkpoint's own float32/bfloat16; float16 computes in float32),
    "float32" or "bfloat16". ``expert_layout``: how routed experts are held (``ExpertParams``):
    "stacked", "split", or "auto" (split on a CPU, stacked on accelerators). Raises
    ``CheckpointError`` for malformed checkpoints and ``UnsupportedModelError`` for model types
    or features this engine does not implement. ``place``: see ``load_params`` (a mesh's
    placement needs the stacked layout, which "auto" then picks).
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    config = read_config(path)
    np_dtype = resolve_dtype(dtype, config)
    if expert_layout == "auto":
        expert_layout = "stacked" if place is not None else default_expert_layout()
    params = load_params(path, config, np_dtype, expert_layout, place)
    return Model(config, params, load_tokenizer(path), path, np_dtype.name)
