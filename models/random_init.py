"""Random-weight models of real shapes, initialised on the device: no checkpoint, no download.

For GPU benchmarks at paper scale: ``random_model("mixtral-8x7b")`` has Mixtral-8x7B's exact
shapes (46.7B parameters, ~93 GB in bfloat16: fits one H200); ``mixtral-8x7b-16l`` keeps 16 of
its 32 layers for 80 GB cards. Weights are N(0, 0.02), norms 1: the text is noise, the speed is
real (every matmul and every routed expert has its true size).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import ModelConfig
from .loader import assemble, split_routed, target_shapes
from .params import default_expert_layout
from .quant import check_quantize, is_quantized_path, quantize_device

_MIXTRAL_8X7B = ModelConfig(
    model_type="mixtral",
    vocab_size=32000,
    hidden_size=4096,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    num_experts=8,
    top_k=2,
    expert_intermediate_size=14336,
    norm_eps=1e-5,
    rope_theta=1e6,
    max_position_embeddings=32768,
    bos_token_id=1,
    eos_token_ids=(2,),
    checkpoint_dtype="bfloat16",
)
MODEL_PRESETS: dict[str, ModelConfig] = {
    "mixtral-8x7b": _MIXTRAL_8X7B,
    "mixtral-8x7b-16l": dataclasses.replace(_MIXTRAL_8X7B, num_layers=16, sliding_windows=()),
    # a few MB: for tests and CPU smoke runs of the same code path
    "mixtral-tiny": dataclasses.replace(
        _MIXTRAL_8X7B,
        vocab_size=256,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        expert_intermediate_size=96,
        sliding_windows=(),
    ),
}


def random_params(
    cfg: ModelConfig,
    dtype: str = "bfloat16",
    seed: int = 0,
    expert_layout: str = "auto",
    quantize: str | None = None,
):
    """A params pytree of ``cfg``'s shapes, generated leaf by leaf on the default device
    (the same numbers in either expert layout). ``quantize="int8"`` quantizes each matrix
    on the device as soon as it is generated, so one float leaf at a time exists."""
    check_quantize(quantize)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    key = jax.random.key(seed)
    flat = {}
    for i, (path, shape) in enumerate(sorted(target_shapes(cfg).items())):
        if path.endswith(("norm.weight",)):
            flat[path] = jnp.ones(shape, np_dtype)
        elif path.endswith(("norm.bias", "_bias")) or path.split(".")[-1].startswith("b"):
            flat[path] = jnp.zeros(shape, np_dtype)
        else:
            flat[path] = _normal(jax.random.fold_in(key, i), shape, np_dtype)
            if quantize is not None and is_quantized_path(path):
                flat[path] = quantize_device(flat[path])
    if cfg.tie_word_embeddings:
        flat["lm_head"] = flat["embed"]
    if (default_expert_layout() if expert_layout == "auto" else expert_layout) == "split":
        flat = split_routed(flat)
    return assemble(flat, cfg)


@jax.jit(static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_model(
    name_or_config: str | ModelConfig,
    dtype: str = "bfloat16",
    seed: int = 0,
    expert_layout: str = "auto",
    quantize: str | None = None,
):
    """A ``Model`` with random weights (no tokenizer) from a preset name or a ModelConfig;
    ``quantize`` as in ``load``."""
    from . import Model

    if isinstance(name_or_config, str):
        if name_or_config not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {name_or_config!r}; known: {sorted(MODEL_PRESETS)}")
        cfg = MODEL_PRESETS[name_or_config]
        name = name_or_config
    else:
        cfg, name = name_or_config, "custom"
    params = random_params(cfg, dtype, seed, expert_layout, quantize)
    dtype_name = str(np.dtype(jnp.dtype(dtype)))
    return Model(
        cfg, params, None, Path(f"random:{name}"), dtype_name, seed=seed, quantize=quantize
    )
