"""The parameter pytree: registered dataclasses of arrays, one layout for every family.

Weights are stored ``[in, out]`` (HF stores ``[out, in]``; the loader transposes once), routed
experts are stacked on a leading expert axis, and gate/up projections are fused so one grouped
matmul computes both. Optional pieces (biases, q/k norms, a shared expert) are ``None`` when a
family lacks them: ``None`` is an empty pytree, so jit sees a stable structure per family.
"""

from __future__ import annotations

import jax
from flax import struct

Array = jax.Array

# The one helper for pytree dataclasses in this project (params, carries, segment inputs): a
# frozen dataclass whose fields are all pytree children, registered with jax's fast C++ path
# (``flax.struct.dataclass`` calls ``jax.tree_util.register_dataclass``), with ``.replace``.
pytree_dataclass = struct.dataclass


@pytree_dataclass
class NormParams:
    weight: Array  # [N]
    bias: Array | None = None  # [N]; LayerNorm only (PhiMoE)


@pytree_dataclass
class AttentionParams:
    input_norm: NormParams  # over D
    wq: Array  # [D, Hq*hd]
    wk: Array  # [D, Hkv*hd]
    wv: Array  # [D, Hkv*hd]
    wo: Array  # [Hq*hd, D]
    bq: Array | None  # [Hq*hd]
    bk: Array | None  # [Hkv*hd]
    bv: Array | None  # [Hkv*hd]
    bo: Array | None  # [D]
    q_norm: NormParams | None  # [hd] ("head") or [Hq*hd] ("full")
    k_norm: NormParams | None  # [hd] ("head") or [Hkv*hd] ("full")
    post_norm: NormParams  # over D, the MoE input norm
    router: Array  # [D, E]


@pytree_dataclass
class ExpertParams:
    w_gate_up: Array  # [E, D, 2F]: gate in [..., :F], up in [..., F:]
    w_down: Array  # [E, F, D]


@pytree_dataclass
class SharedExpertParams:
    w_gate_up: Array  # [D, 2Fs]
    w_down: Array  # [Fs, D]
    gate: Array  # [D, 1]: sigmoid gate on the shared expert's output (Qwen2-MoE)


@pytree_dataclass
class LayerParams:
    attn: AttentionParams
    experts: ExpertParams
    shared: SharedExpertParams | None


@pytree_dataclass
class Params:
    embed: Array  # [V, D]
    layers: tuple[LayerParams, ...]  # L entries of identical structure and shapes
    final_norm: NormParams  # over D
    lm_head: Array  # [V, D] (HF layout; the same array as ``embed`` when tied)
    lm_head_bias: Array | None  # [V]
