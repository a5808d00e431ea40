"""Hugging Face checkpoint → params pytree, through a declarative key map.

Each family has a table of rules ``(HF key template, params path template, placement)``. A
template like ``model.layers.{L}.block_sparse_moe.experts.{e}.w1.weight`` both matches keys (as a
regex) and names the keys we expected but did not find. A placement says how a stored tensor
lands in its target array: copied, transposed to ``[in, out]``, one expert's slice of a stacked
``[E, ...]`` array, or half of a fused gate/up projection. Per-expert and fused (transformers-5
``gate_up_proj``) layouts are both accepted.

Before reading any data we match every key, check every shape and dtype, and check that every
target is fully covered; any missing, unexpected, misshapen or mistyped tensor raises a
``CheckpointError`` naming the key and the file. Then tensors stream one at a time into their
targets, and a stacked expert array is handed to JAX as soon as its layer is complete, so host
memory never holds two full copies of the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from .config import ModelConfig
from .errors import CheckpointError
from .params import (
    EXPERT_LAYOUTS,
    AttentionParams,
    ExpertParams,
    LayerParams,
    NormParams,
    Params,
    SharedExpertParams,
)
from .quant import check_quantize, int8_host, is_quantized_path, quantize_host
from .safetensors_io import DTYPES, TensorInfo, checkpoint_files, iter_file_order, read_tensor

ALL = "*"  # the unit that a whole-tensor placement covers


# ----------------------------------------------------------------------------------------------
# Placements: where a stored tensor goes inside its target array


@dataclasses.dataclass(frozen=True)
class Placement:
    """How a stored tensor lands in a target array of shape ``tgt``.

    source_shape(tgt) → the stored shape we expect; index(tgt, e) → where in the target it goes;
    perm → the axis permutation from stored to target layout; unit(e) → what it covers.
    """

    source_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    index: Callable[[tuple[int, ...], int | None], Any] = lambda tgt, e: ...
    perm: tuple[int, ...] | None = None
    unit: Callable[[int | None], str] = lambda e: ALL


def _half(tgt: tuple[int, ...], second: bool) -> slice:
    f = tgt[-1] // 2
    return slice(f, None) if second else slice(0, f)


COPY = Placement(lambda t: t)
TRANSPOSE = Placement(lambda t: (t[1], t[0]), perm=(1, 0))
# Routed experts, target [E, D, 2F] / [E, F, D]; stored per expert as [F, D] / [D, F] (HF [out, in])
EXPERT_GATE = Placement(
    lambda t: (t[2] // 2, t[1]),
    index=lambda t, e: (e, slice(None), _half(t, False)),
    perm=(1, 0),
    unit=lambda e: f"{e}.gate",
)
EXPERT_UP = dataclasses.replace(
    EXPERT_GATE,
    index=lambda t, e: (e, slice(None), _half(t, True)),
    unit=lambda e: f"{e}.up",
)
EXPERT_DOWN = Placement(lambda t: (t[2], t[1]), index=lambda t, e: e, perm=(1, 0), unit=str)
# The fused transformers-5 layout: gate_up_proj [E, 2F, D], down_proj [E, D, F]
FUSED_GATE_UP = Placement(lambda t: (t[0], t[2], t[1]), perm=(0, 2, 1))
FUSED_DOWN = Placement(lambda t: (t[0], t[2], t[1]), perm=(0, 2, 1))
# Qwen2-MoE's shared expert, target [D, 2Fs]
SHARED_GATE = Placement(
    lambda t: (t[1] // 2, t[0]),
    index=lambda t, e: (slice(None), _half(t, False)),
    perm=(1, 0),
    unit=lambda e: "gate",
)
SHARED_UP = dataclasses.replace(
    SHARED_GATE, index=lambda t, e: (slice(None), _half(t, True)), unit=lambda e: "up"
)
DROP = None  # a known tensor we do not need (a tied lm_head copy, a RoPE buffer)


@dataclasses.dataclass(frozen=True)
class Rule:
    key: str  # HF key template with {L} (layer) and {e} (expert) holes
    target: str | None  # params path template, None = drop
    placement: Placement | None

    @property
    def regex(self) -> re.Pattern[str]:
        return _template_regex(self.key)


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    escaped = re.escape(template)
    return re.compile(escaped.replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{e\}", r"(?P<e>\d+)"))


def _layer(key: str, target: str, placement: Placement | None) -> Rule:
    target_path = f"layers.{{L}}.{target}" if target else None
    return Rule(f"model.layers.{{L}}.{key}", target_path, placement)


COMMON_RULES: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed", COPY),
    Rule("lm_head.weight", "lm_head", COPY),
    Rule("lm_head.bias", "lm_head_bias", COPY),
    Rule("model.norm.weight", "final_norm.weight", COPY),
    Rule("model.norm.bias", "final_norm.bias", COPY),
    _layer("input_layernorm.weight", "attn.input_norm.weight", COPY),
    _layer("input_layernorm.bias", "attn.input_norm.bias", COPY),
    _layer("post_attention_layernorm.weight", "attn.post_norm.weight", COPY),
    _layer("post_attention_layernorm.bias", "attn.post_norm.bias", COPY),
    *(_layer(f"self_attn.{p}_proj.weight", f"attn.w{p}", TRANSPOSE) for p in ("q", "k", "v", "o")),
    *(_layer(f"self_attn.{p}_proj.bias", f"attn.b{p}", COPY) for p in ("q", "k", "v", "o")),
    _layer("self_attn.q_norm.weight", "attn.q_norm.weight", COPY),
    _layer("self_attn.k_norm.weight", "attn.k_norm.weight", COPY),
    _layer("self_attn.rotary_emb.inv_freq", None, DROP),
    _layer("mlp.experts.gate_up_proj", "experts.w_gate_up", FUSED_GATE_UP),
    _layer("mlp.experts.down_proj", "experts.w_down", FUSED_DOWN),
)


def _w123_experts(prefix: str) -> tuple[Rule, ...]:
    """Mixtral/PhiMoE per-expert names: w1 = gate, w3 = up, w2 = down."""
    return (
        _layer(f"{prefix}.experts.{{e}}.w1.weight", "experts.w_gate_up", EXPERT_GATE),
        _layer(f"{prefix}.experts.{{e}}.w3.weight", "experts.w_gate_up", EXPERT_UP),
        _layer(f"{prefix}.experts.{{e}}.w2.weight", "experts.w_down", EXPERT_DOWN),
    )


_PROJ_EXPERTS = (
    _layer("mlp.experts.{e}.gate_proj.weight", "experts.w_gate_up", EXPERT_GATE),
    _layer("mlp.experts.{e}.up_proj.weight", "experts.w_gate_up", EXPERT_UP),
    _layer("mlp.experts.{e}.down_proj.weight", "experts.w_down", EXPERT_DOWN),
)
_ROUTER_MLP_GATE = _layer("mlp.gate.weight", "attn.router", TRANSPOSE)

FAMILY_RULES: dict[str, tuple[Rule, ...]] = {
    "mixtral": (
        *_w123_experts("block_sparse_moe"),
        _layer("block_sparse_moe.gate.weight", "attn.router", TRANSPOSE),
        _ROUTER_MLP_GATE,
    ),
    "phimoe": (
        *_w123_experts("block_sparse_moe"),
        _layer("block_sparse_moe.gate.weight", "attn.router", TRANSPOSE),
        _layer("mlp.router.weight", "attn.router", TRANSPOSE),
    ),
    "qwen2_moe": (
        *_PROJ_EXPERTS,
        _ROUTER_MLP_GATE,
        _layer("mlp.shared_expert.gate_proj.weight", "shared.w_gate_up", SHARED_GATE),
        _layer("mlp.shared_expert.up_proj.weight", "shared.w_gate_up", SHARED_UP),
        _layer("mlp.shared_expert.down_proj.weight", "shared.w_down", TRANSPOSE),
        _layer("mlp.shared_expert_gate.weight", "shared.gate", TRANSPOSE),
    ),
    "qwen3_moe": (*_PROJ_EXPERTS, _ROUTER_MLP_GATE),
    "olmoe": (*_PROJ_EXPERTS, _ROUTER_MLP_GATE),
}


# ----------------------------------------------------------------------------------------------
# What the params tree must contain for a config: path → shape


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, e, f = cfg.hidden_size, cfg.num_experts, cfg.expert_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (cfg.vocab_size, d), "final_norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, d)
    if cfg.lm_head_bias:
        shapes["lm_head_bias"] = (cfg.vocab_size,)
    layer = {
        "attn.input_norm.weight": (d,),
        "attn.post_norm.weight": (d,),
        "attn.wq": (d, cfg.q_size),
        "attn.wk": (d, cfg.kv_size),
        "attn.wv": (d, cfg.kv_size),
        "attn.wo": (cfg.q_size, d),
        "attn.router": (d, e),
        "experts.w_gate_up": (e, d, 2 * f),
        "experts.w_down": (e, f, d),
    }
    if cfg.norm == "layer":
        shapes["final_norm.bias"] = (d,)
        layer |= {"attn.input_norm.bias": (d,), "attn.post_norm.bias": (d,)}
    if cfg.qkv_bias:
        layer |= {"attn.bq": (cfg.q_size,), "attn.bk": (cfg.kv_size,), "attn.bv": (cfg.kv_size,)}
    if cfg.o_bias:
        layer["attn.bo"] = (d,)
    if cfg.qk_norm != "none":
        head = cfg.qk_norm == "head"
        layer["attn.q_norm.weight"] = (cfg.head_dim if head else cfg.q_size,)
        layer["attn.k_norm.weight"] = (cfg.head_dim if head else cfg.kv_size,)
    if cfg.shared_intermediate_size:
        fs = cfg.shared_intermediate_size
        layer |= {"shared.w_gate_up": (d, 2 * fs), "shared.w_down": (fs, d), "shared.gate": (d, 1)}
    for i in range(cfg.num_layers):
        shapes |= {f"layers.{i}.{k}": v for k, v in layer.items()}
    return shapes


def _required_units(path: str, cfg: ModelConfig) -> set[str]:
    if path.endswith("experts.w_gate_up"):
        return {f"{e}.{h}" for e in range(cfg.num_experts) for h in ("gate", "up")}
    if path.endswith("experts.w_down"):
        return {str(e) for e in range(cfg.num_experts)}
    if path.endswith("shared.w_gate_up"):
        return {"gate", "up"}
    return {ALL}


# ----------------------------------------------------------------------------------------------
# Planning: match every key and check every shape before reading data


@dataclasses.dataclass
class _Write:
    info: TensorInfo
    path: str | None  # None = drop
    placement: Placement | None
    expert: int | None
    rule_key: str


def _match(info: TensorInfo, rules: tuple[Rule, ...], cfg: ModelConfig, shapes) -> _Write | None:
    for rule in rules:
        m = rule.regex.fullmatch(info.key)
        if m is None:
            continue
        groups = m.groupdict()
        if rule.target is None or (rule.target == "lm_head" and cfg.tie_word_embeddings):
            return _Write(info, None, None, None, rule.key)  # known, not needed
        path = rule.target.format(**groups)
        expert = int(groups["e"]) if "e" in groups else None
        if path not in shapes or (expert is not None and expert >= cfg.num_experts):
            return None  # a tensor this config has no place for (extra layer, bias, expert, ...)
        return _Write(info, path, rule.placement, expert, rule.key)
    return None


def _check(w: _Write, shapes: dict[str, tuple[int, ...]]) -> None:
    info = w.info
    if info.dtype not in DTYPES:
        raise CheckpointError(
            f"{info.file.name}: tensor {info.key!r} has unsupported dtype {info.dtype} "
            f"(supported: {', '.join(DTYPES)})"
        )
    if w.path is None:
        return
    expected = w.placement.source_shape(shapes[w.path])
    if info.shape != expected:
        raise CheckpointError(
            f"{info.file.name}: tensor {info.key!r} has shape {list(info.shape)}, "
            f"expected {list(expected)}"
        )


def _expected_names(
    path: str, units: set[str], rules: tuple[Rule, ...], seen: set[str]
) -> list[str]:
    """HF key names that would have covered the missing units of a target, for the error.

    Names follow the layout the checkpoint uses elsewhere (``seen`` rule templates), so a fused
    checkpoint missing a tensor is told the fused name, a per-expert one the per-expert name.
    """
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", path)
    layer, rest = (m.group(1), m.group(2)) if m else (None, path)
    candidates = [r for r in rules if r.target and r.target.replace("layers.{L}.", "") == rest]
    candidates.sort(key=lambda r: r.key not in seen)  # stable: layouts in use first
    names: list[str] = []
    for unit in sorted(units):
        head = unit.partition(".")[0]
        expert = int(head) if head.isdigit() else None
        covering = [r for r in candidates if r.placement.unit(expert) in (unit, ALL)]
        rule = (covering or candidates or [None])[0]
        name = rule.key.format(L=layer, e=expert) if rule else f"<{path}>"
        if name not in names:
            names.append(name)
    return names


def plan(
    tensors: dict[str, TensorInfo], cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]
) -> list[_Write]:
    rules = COMMON_RULES + FAMILY_RULES[cfg.model_type]
    writes, unexpected, seen = [], [], set()
    for info in iter_file_order(tensors):
        w = _match(info, rules, cfg, shapes)
        if w is None:
            unexpected.append(info)
            continue
        _check(w, shapes)
        writes.append(w)
        seen.add(w.rule_key)
    if unexpected:
        listed = ", ".join(f"{t.key!r} (in {t.file.name})" for t in unexpected[:8])
        more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
        raise CheckpointError(
            f"unexpected tensor(s) for a {cfg.model_type} model with this config.json: "
            f"{listed}{more}"
        )
    covered: dict[str, set[str]] = {}
    for w in writes:
        if w.path is not None:
            unit = w.placement.unit(w.expert)
            covered.setdefault(w.path, set()).update(
                _required_units(w.path, cfg) if unit == ALL else {unit}
            )
    missing = []
    for path in shapes:
        lacking = _required_units(path, cfg) - covered.get(path, set())
        if lacking:
            missing += _expected_names(path, lacking, rules, seen)
    if missing:
        files = sorted({t.file.name for t in tensors.values()})
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(
            f"missing tensor(s) {', '.join(missing[:8])}{more} in checkpoint files {files}"
        )
    return writes


# ----------------------------------------------------------------------------------------------
# Loading


def resolve_dtype(dtype: str | Any, cfg: ModelConfig) -> np.dtype:
    """'auto' (the checkpoint's own dtype), 'float32', 'bfloat16' or a numpy/jax dtype."""
    name = cfg.checkpoint_dtype if dtype in (None, "auto") else dtype
    try:
        resolved = np.dtype(ml_dtypes.bfloat16 if str(name) == "bfloat16" else name)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32' or 'bfloat16'") from e
    if resolved not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
        if dtype in (None, "auto"):
            return np.dtype(np.float32)  # e.g. a float16 checkpoint: compute in float32
        raise ValueError(f"dtype {dtype!r} is not supported; use 'float32' or 'bfloat16'")
    return resolved


# (params path, complete host array, or a host QuantizedWeight for an int8 matrix) -> device value
Place = Callable[[str, Any], Any]


def load_params(
    model_dir: str | Path,
    cfg: ModelConfig,
    dtype: np.dtype,
    expert_layout: str = "stacked",
    quantize: str | None = None,
    place: Place | None = None,
) -> Params:
    """Stream a checkpoint's tensors into a params pytree of ``dtype`` jax arrays, routed
    experts in ``expert_layout`` (``"stacked"`` or ``"split"``, see ``ExpertParams``).
    ``quantize="int8"``: each attention and expert matrix is quantized on the host as soon as
    it is complete, so the device only ever receives its int8 values (``models/quant.py``).

    ``place`` puts each complete host array on the device(s) as the caller wants it (a mesh
    places it shard by shard: ``qllm_jax.mesh.placer``); by default one device holds it. With
    ``quantize`` it receives an int8 matrix as a ``QuantizedWeight`` of host arrays."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}")
    check_quantize(quantize)
    if place is not None and expert_layout != "stacked":
        raise ValueError("placing params on a mesh needs expert_layout='stacked'")
    tensors = checkpoint_files(Path(model_dir))
    shapes = target_shapes(cfg)
    writes = plan(tensors, cfg, shapes)
    remaining: dict[str, int] = {}
    for w in writes:
        if w.path is not None:
            remaining[w.path] = remaining.get(w.path, 0) + 1
    buffers: dict[str, np.ndarray] = {}
    flat: dict[str, jax.Array] = {}
    for w in writes:
        if w.path is None:
            continue
        data = read_tensor(w.info)
        if w.placement.perm is not None:
            data = data.transpose(w.placement.perm)
        if w.placement.unit(w.expert) == ALL and remaining[w.path] == 1:
            buf = data.astype(dtype, copy=False)
        else:
            buf = buffers.setdefault(w.path, np.empty(shapes[w.path], dtype))
            buf[w.placement.index(shapes[w.path], w.expert)] = data
        del data
        remaining[w.path] -= 1
        if remaining[w.path] == 0:  # complete: hand it to JAX, drop the host buffer
            quantized = quantize is not None and is_quantized_path(w.path)
            if place is not None:  # a host QuantizedWeight for an int8 one: placed leaf by leaf
                flat[w.path] = place(w.path, int8_host(buf) if quantized else buf)
            elif expert_layout == "split" and w.path.endswith(_ROUTED):
                flat[w.path] = tuple(_to_device(quantized)(x) for x in buf)
            else:
                flat[w.path] = _to_device(quantized)(buf)
            buffers.pop(w.path, None)
            del buf
    if cfg.tie_word_embeddings:
        flat["lm_head"] = flat["embed"]
    return assemble(flat, cfg)


def _to_device(quantized: bool) -> Callable[[np.ndarray], Any]:
    if quantized:
        return quantize_host
    return lambda x: jnp.asarray(np.ascontiguousarray(x))


_ROUTED = ("experts.w_gate_up", "experts.w_down")


def split_routed(flat: dict[str, Any]) -> dict[str, Any]:
    """``flat`` with every stacked routed-expert weight as a tuple of per-expert weights."""
    return {
        k: tuple(jax.tree.map(lambda a, e=e: a[e], v) for e in range(v.shape[0]))
        if k.endswith(_ROUTED)
        else v
        for k, v in flat.items()
    }


def assemble(flat: dict[str, jax.Array], cfg: ModelConfig) -> Params:
    """Build the Params dataclasses from a flat ``path → array`` dict."""

    def norm(prefix: str) -> NormParams:
        return NormParams(flat[f"{prefix}.weight"], flat.get(f"{prefix}.bias"))

    def opt_norm(prefix: str) -> NormParams | None:
        return norm(prefix) if f"{prefix}.weight" in flat else None

    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        attn = AttentionParams(
            input_norm=norm(f"{p}.attn.input_norm"),
            wq=flat[f"{p}.attn.wq"],
            wk=flat[f"{p}.attn.wk"],
            wv=flat[f"{p}.attn.wv"],
            wo=flat[f"{p}.attn.wo"],
            bq=flat.get(f"{p}.attn.bq"),
            bk=flat.get(f"{p}.attn.bk"),
            bv=flat.get(f"{p}.attn.bv"),
            bo=flat.get(f"{p}.attn.bo"),
            q_norm=opt_norm(f"{p}.attn.q_norm"),
            k_norm=opt_norm(f"{p}.attn.k_norm"),
            post_norm=norm(f"{p}.attn.post_norm"),
            router=flat[f"{p}.attn.router"],
        )
        experts = ExpertParams(flat[f"{p}.experts.w_gate_up"], flat[f"{p}.experts.w_down"])
        shared = None
        if cfg.shared_intermediate_size:
            shared = SharedExpertParams(
                flat[f"{p}.shared.w_gate_up"], flat[f"{p}.shared.w_down"], flat[f"{p}.shared.gate"]
            )
        layers.append(LayerParams(attn, experts, shared))
    return Params(
        embed=flat["embed"],
        layers=tuple(layers),
        final_norm=norm("final_norm"),
        lm_head=flat["lm_head"],
        lm_head_bias=flat.get("lm_head_bias"),
    )
