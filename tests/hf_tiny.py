"""Tiny random Hugging Face MoE checkpoints, built on the fly, as references for parity tests.

Why random and tiny: no downloads are allowed at test time, and a 3-layer, 64-wide model runs in
milliseconds on CPU while still exercising every code path of a family (GQA, RoPE, routing,
shared experts, q/k norms, biases, LayerNorm vs RMSNorm).

Why `initializer_range` is large and every parameter is re-randomized: with the HF defaults
(std 0.02, norm weights = 1, biases = 0) the logits are nearly flat, greedy decoding repeats one
token, and a converter that drops a norm weight or a bias would still "match". Large weights
and randomized norms/biases make every tensor matter and make greedy continuations vary.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import (
    AutoModelForCausalLM,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe")
LAYOUTS = ("per_expert", "fused")

VOCAB = 128
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Shared by every family: 3 layers, 4 query heads over 2 KV heads (GQA), head_dim 16, top-2.
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    tie_word_embeddings=False,
)

_FAMILY: dict[str, tuple[type[PreTrainedConfig], dict[str, Any]]] = {
    "mixtral": (
        MixtralConfig,
        # rope_parameters left at the family default (theta 1e6) so the loader must read it.
        dict(head_dim=16, num_local_experts=8, intermediate_size=48, initializer_range=0.3),
    ),
    "qwen2_moe": (
        Qwen2MoeConfig,
        dict(
            num_experts=6,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,  # shared expert + its sigmoid gate
            intermediate_size=64,  # dense MLP size, unused while mlp_only_layers == []
            qkv_bias=True,
            norm_topk_prob=False,
            initializer_range=0.3,
        ),
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        # Qwen3-MoE has per-head q/k RMSNorm; norm_topk_prob renormalises the top-k weights.
        dict(
            head_dim=16,
            num_experts=8,
            moe_intermediate_size=40,
            intermediate_size=64,
            norm_topk_prob=True,
            initializer_range=0.3,
        ),
    ),
    "olmoe": (
        OlmoeConfig,
        # OLMoE's q/k norms span all heads (hidden-sized), unlike Qwen3's per-head norms.
        dict(num_experts=4, intermediate_size=56, clip_qkv=None, initializer_range=0.3),
    ),
    "phimoe": (
        PhimoeConfig,
        # PhiMoE: LayerNorm with bias, attention and lm_head biases, sparsemixer top-2 routing
        # (whose eval-mode masking depends on router_jitter_noise, kept at the 0.01 default).
        dict(
            num_local_experts=4,
            intermediate_size=48,
            attention_bias=True,
            lm_head_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            initializer_range=0.3,
        ),
    ),
}


def tiny_config(family: str, **overrides: Any) -> PreTrainedConfig:
    """A tiny transformers config for `family`; `overrides` replace any field."""
    cls, extra = _FAMILY[family]
    kwargs = {**_COMMON, **extra, **overrides}
    config = cls(**kwargs)
    # Eager attention: the plainest reference (no SDPA kernel differences).
    config._attn_implementation = "eager"
    return config


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give norm weights, norm biases and linear biases random values (HF inits them to 1 / 0)."""
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    for name, param in sorted(model.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        is_norm = "norm" in name  # input_layernorm, post_attention_layernorm, q_norm, k_norm, norm
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if is_norm and leaf == "weight":
            param.copy_(1.0 + 0.1 * noise)
        elif leaf == "bias":
            param.copy_(0.1 * noise)


def build_model(family: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised, fully randomized, eval-mode float32 HF model."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_(model, seed)
    return model.eval()


def make_checkpoint(
    family: str,
    path: str | Path,
    layout: str = "per_expert",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> tuple[Path, PreTrainedModel]:
    """Write a tiny checkpoint of `family` to `path`; return (path, the HF model in `dtype`).

    layout "per_expert": transformers 5's default on-disk format (`experts.{i}.w1/w2/w3` or
    `experts.{i}.gate_proj/up_proj/down_proj`, as the original hub checkpoints). layout "fused":
    `save_original_format=False`, transformers 5's in-memory layout
    (`mlp.experts.gate_up_proj [E, 2F, D]`, `mlp.experts.down_proj [E, D, F]`).
    All five families can write both layouts.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    path = Path(path)
    model = build_model(family, seed=seed, **overrides).to(dtype)
    kwargs: dict[str, Any] = {"save_original_format": layout == "per_expert"}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    if dtype != torch.float32:
        # Reload rather than return the `.to(dtype)` model: `.to` also rounds the RoPE `inv_freq`
        # buffer to bf16 (a large positional error), while `from_pretrained` keeps it in f32 as
        # real bf16 inference does.
        model = load_hf(path, dtype)
    return path, model


def load_hf(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a checkpoint with transformers itself, eager attention, eval mode."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval()


def safetensors_keys(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype string, shape)} over every *.safetensors file in `path`."""
    from safetensors import safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def prompt_ids(batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    """Deterministic prompts [batch, length] of ids in [3, VOCAB) (no pad/bos/eos inside)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch, length), dtype=np.int64)
    ids[:, 0] = BOS_ID
    return ids


@torch.no_grad()
def hf_logits(hf_model: PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    """Full-sequence causal logits [B, S, V] as float32 numpy (no cache, no padding)."""
    t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    out = hf_model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False)
    return out.logits.float().numpy()


@torch.no_grad()
def hf_greedy(hf_model: PreTrainedModel, ids: np.ndarray, n: int) -> np.ndarray:
    """Exactly `n` greedy tokens per row from `generate` -> [B, n], never stopping at EOS.

    Two transformers-5 traps: `min_new_tokens` masks the EOS logit to -inf, which changes the
    argmax whenever EOS is the best token; and `eos_token_id=None` passed to `generate` (kwarg or
    GenerationConfig) is silently refilled from `model.generation_config`. So swap in a copy of
    the model's own generation config with EOS removed.
    """
    t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    saved = hf_model.generation_config
    no_eos = copy.deepcopy(saved)
    no_eos.eos_token_id = None
    no_eos.do_sample = False
    hf_model.generation_config = no_eos
    try:
        out = hf_model.generate(
            input_ids=t,
            attention_mask=torch.ones_like(t),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=PAD_ID,
        )
    finally:
        hf_model.generation_config = saved
    new = out[:, t.shape[1] :].numpy()
    if new.shape != (t.shape[0], n):
        raise AssertionError(f"generate returned {new.shape}, expected {(t.shape[0], n)}")
    return new


@torch.no_grad()
def hf_greedy_manual(hf_model: PreTrainedModel, ids: np.ndarray, n: int) -> np.ndarray:
    """Greedy by recomputing the whole sequence each step (no cache): cross-checks `hf_greedy`."""
    seq = np.asarray(ids)
    for _ in range(n):
        nxt = hf_logits(hf_model, seq)[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
    return seq[:, np.asarray(ids).shape[1] :]
