"""Static model configuration, built from a Hugging Face ``config.json``.

One frozen, hashable dataclass describes every supported MoE family; the differences between
families are a handful of switches (norm kind, q/k norm, router kind, shared expert, biases), so
the model functions stay one set of pure functions. ``ModelConfig`` is hashable so it can be a
static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from .errors import CheckpointError, UnsupportedModelError

NormKind = Literal["rms", "layer"]
QKNorm = Literal["none", "head", "full"]
RouterKind = Literal["softmax_topk", "sparsemixer"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the pure model functions need to know, and nothing that changes per call."""

    model_type: str
    vocab_size: int
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # Hq
    num_kv_heads: int  # Hkv (GQA: Hq % Hkv == 0)
    head_dim: int  # hd
    num_experts: int  # E
    top_k: int  # k
    expert_intermediate_size: int  # F, per routed expert
    shared_intermediate_size: int = 0  # Fs; 0 = no shared expert (Qwen2-MoE has one)
    router: RouterKind = "softmax_topk"
    norm_topk_prob: bool = True  # renormalise the top-k probabilities to sum to 1
    # Mixtral keeps the routing weights in float32 when scaling expert outputs; Qwen/OLMoE cast
    # them to the compute dtype first. Only visible in bf16, but we match HF there too.
    routing_weights_f32: bool = True
    router_jitter_eps: float = 0.0  # PhiMoE sparsemixer threshold
    norm: NormKind = "rms"
    norm_eps: float = 1e-5
    qk_norm: QKNorm = "none"  # "head": per-head RMSNorm (Qwen3); "full": over all heads (OLMoE)
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    rope_theta: float = 10000.0
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full causal attention
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    checkpoint_dtype: str = "float32"  # the dtype the checkpoint declares ("auto" resolves to it)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise CheckpointError(
                f"num_experts_per_tok={self.top_k} must be in [1, num_experts={self.num_experts}]"
            )
        if len(self.sliding_windows) != self.num_layers:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


# ----------------------------------------------------------------------------------------------
# Reading config.json. Each family maps HF field names onto ModelConfig; shared fields first.


def _get(hf: Mapping[str, Any], key: str, default: Any = ...) -> Any:
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise CheckpointError(f"config.json lacks required field {key!r}")
    return default


def _rope_theta(hf: Mapping[str, Any]) -> float:
    """rope theta from transformers-5 ``rope_parameters`` or the older top-level fields."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported yet (only 'default' RoPE); "
            "checkpoints that need long-context RoPE scaling cannot be loaded"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _eos_ids(hf: Mapping[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


def _sliding_windows(hf: Mapping[str, Any], num_layers: int) -> tuple[int | None, ...]:
    """Per-layer window. HF masks a key when ``q_pos - k_pos >= window``."""
    window = hf.get("sliding_window")
    if hf.get("use_sliding_window") is False or not window:
        return (None,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (window,) * num_layers


def _dtype_name(dtype: Any) -> str:
    """The dtype's name, from "bfloat16", "torch.bfloat16" or a torch dtype object."""
    return str(dtype).removeprefix("torch.")


def _common(hf: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    hidden = int(_get(hf, "hidden_size"))
    heads = int(_get(hf, "num_attention_heads"))
    layers = int(_get(hf, "num_hidden_layers"))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
    return dict(
        model_type=model_type,
        vocab_size=int(_get(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(_get(hf, "num_key_value_heads", heads)),
        head_dim=int(_get(hf, "head_dim", hidden // heads)),
        norm_eps=float(_get(hf, "rms_norm_eps", 1e-5)),
        rope_theta=_rope_theta(hf),
        sliding_windows=_sliding_windows(hf, layers),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(_get(hf, "max_position_embeddings", 4096)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
        checkpoint_dtype=_dtype_name(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
    )


def _all_layers_sparse(hf: Mapping[str, Any]) -> None:
    """Qwen MoE configs can make some layers dense; real checkpoints don't, and neither do we."""
    if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1) or 1) != 1:
        raise UnsupportedModelError(
            "checkpoints with dense (non-MoE) layers (mlp_only_layers / decoder_sparse_step != 1) "
            "are not supported"
        )


def _mixtral(hf: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig(
        **_common(hf, "mixtral"),
        num_experts=int(_get(hf, "num_local_experts")),
        top_k=int(_get(hf, "num_experts_per_tok")),
        expert_intermediate_size=int(_get(hf, "intermediate_size")),
        norm_topk_prob=True,
        routing_weights_f32=True,
    )


def _qwen_moe(hf: Mapping[str, Any], model_type: str) -> ModelConfig:
    _all_layers_sparse(hf)
    is_qwen2 = model_type == "qwen2_moe"
    return ModelConfig(
        **_common(hf, model_type),
        num_experts=int(_get(hf, "num_experts")),
        top_k=int(_get(hf, "num_experts_per_tok")),
        expert_intermediate_size=int(_get(hf, "moe_intermediate_size")),
        shared_intermediate_size=int(_get(hf, "shared_expert_intermediate_size", 0))
        if is_qwen2
        else 0,
        norm_topk_prob=bool(_get(hf, "norm_topk_prob", not is_qwen2)),
        routing_weights_f32=False,
        qk_norm="none" if is_qwen2 else "head",
        qkv_bias=bool(_get(hf, "qkv_bias", True)) if is_qwen2 else bool(hf.get("attention_bias")),
        o_bias=False if is_qwen2 else bool(hf.get("attention_bias")),
    )


def _olmoe(hf: Mapping[str, Any]) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        **_common(hf, "olmoe"),
        num_experts=int(_get(hf, "num_experts")),
        top_k=int(_get(hf, "num_experts_per_tok")),
        expert_intermediate_size=int(_get(hf, "intermediate_size")),
        norm_topk_prob=bool(_get(hf, "norm_topk_prob", False)),
        routing_weights_f32=False,
        qk_norm="full",
        qkv_bias=bias,
        o_bias=bias,
        clip_qkv=hf.get("clip_qkv"),
    )


def _phimoe(hf: Mapping[str, Any]) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    top_k = int(_get(hf, "num_experts_per_tok"))
    if top_k != 2:
        raise UnsupportedModelError(f"PhiMoE's sparsemixer routes exactly 2 experts, got {top_k}")
    return ModelConfig(
        **_common(hf, "phimoe"),
        num_experts=int(_get(hf, "num_local_experts")),
        top_k=top_k,
        expert_intermediate_size=int(_get(hf, "intermediate_size")),
        router="sparsemixer",
        router_jitter_eps=float(_get(hf, "router_jitter_noise", 0.01)),
        routing_weights_f32=False,
        norm="layer",
        qkv_bias=bias,
        o_bias=bias,
        lm_head_bias=bool(hf.get("lm_head_bias", False)),
    )


CONFIG_READERS: dict[str, Callable[[Mapping[str, Any]], ModelConfig]] = {
    "mixtral": _mixtral,
    "qwen2_moe": lambda hf: _qwen_moe(hf, "qwen2_moe"),
    "qwen3_moe": lambda hf: _qwen_moe(hf, "qwen3_moe"),
    "olmoe": _olmoe,
    "phimoe": _phimoe,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(CONFIG_READERS)


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a parsed HF ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type not in CONFIG_READERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: "
            + ", ".join(SUPPORTED_MODEL_TYPES)
        )
    return CONFIG_READERS[model_type](hf)


def read_config(model_dir: str | Path) -> ModelConfig:
    """Read ``config.json`` of a checkpoint directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"no config.json in {Path(model_dir)}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if raw.get("model_type") not in CONFIG_READERS:
        return config_from_hf(raw)  # raises UnsupportedModelError naming the supported types
    # transformers fills in the class defaults that save_pretrained leaves out of config.json
    # (it writes only the fields that differ), so read through it rather than the raw dict.
    from transformers import AutoConfig

    return config_from_hf(_HFConfigView(AutoConfig.from_pretrained(str(model_dir))))


class _HFConfigView(Mapping[str, Any]):
    """Read a transformers config object through ``getattr``, which honours its attribute_map
    (Qwen3-MoE serialises ``num_experts`` as ``num_local_experts``, for instance)."""

    def __init__(self, hf_config: Any) -> None:
        self._config = hf_config
        self._keys = set(hf_config.to_dict()) | set(getattr(hf_config, "attribute_map", {}))

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self._config, key)
        except AttributeError:
            raise KeyError(key) from None

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
