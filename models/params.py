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
class QuantizedWeight:
    """A weight-only int8 matrix with one scale per output channel, where a float ``[in, out]``
    weight would be: ``w ≈ q * scale``. Leading axes (stacked experts ``[E, ...]``) are shared
    by both fields, so slicing experts is a ``tree.map`` over the leaves. See ``models/quant.py``.
    """

    q: Array  # [..., in, out] int8
    scale: Array  # [..., out] float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.q.shape


Weight = Array | QuantizedWeight  # a matrix ``matmul`` (models/model.py) multiplies by


@pytree_dataclass
class NormParams:
    weight: Array  # [N]
    bias: Array | None = None  # [N]; LayerNorm only (PhiMoE)


@pytree_dataclass
class AttentionParams:
    input_norm: NormParams  # over D
    wq: Weight  # [D, Hq*hd]
    wk: Weight  # [D, Hkv*hd]
    wv: Weight  # [D, Hkv*hd]
    wo: Weight  # [Hq*hd, D]
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
    """Routed experts in one of two layouts, the same numbers either way:

    - ``"stacked"``: ``w_gate_up`` [E, D, 2F] (gate in ``[..., :F]``, up in ``[..., F:]``),
      ``w_down`` [E, F, D]; what grouped (ragged) matmuls on accelerators want.
    - ``"split"``: tuples of E arrays [D, 2F] and [F, D]; on a CPU, where experts run as dense
      matmuls, this lets a segment take just its group's experts with no slicing copy, and a
      layer's experts run about 2x faster than as one einsum over the stacked arrays.

    Either layout may hold ``QuantizedWeight``s instead of arrays (``quantize="int8"``).
    On a device mesh (``qllm_jax.mesh``) experts are always stacked, sharded on the expert
    axis, and held in slot order (``mesh.expert_slots``), not expert-id order (an expert
    placement's physical slots, ``qllm_jax.eplb``, are sharded on it too).
    """

    w_gate_up: Weight | tuple[Weight, ...]
    w_down: Weight | tuple[Weight, ...]

    @property
    def layout(self) -> str:
        return "split" if isinstance(self.w_gate_up, tuple) else "stacked"

    def group(self, start: int, size: int) -> ExpertParams:
        """The experts a segment of experts ``[start, start + size)`` takes: the group itself
        (split layout, no copy), or all of them, to be sliced inside the segment (stacked)."""
        if self.layout == "stacked":
            return self
        return ExpertParams(self.w_gate_up[start : start + size], self.w_down[start : start + size])


@pytree_dataclass
class SlotMap:
    """Where one layer's E logical experts live among its S physical expert slots (expert load
    balancing: ``ExpertParams`` then holds S >= E slots, some of them copies of hot experts).

    Copy ``c`` of expert ``e`` is slot ``slot[e, c]`` for ``c < copies[e]`` (the rest of the row
    repeats copy 0); the rows of a pass routed to ``e`` are split among its copies by row index.
    """

    slot: Array  # [E, C] int32 physical slot of each copy of each expert
    copies: Array  # [E] int32 copies of each expert (>= 1)


EXPERT_LAYOUTS = ("stacked", "split")


def default_expert_layout() -> str:
    """``"split"`` on a CPU, ``"stacked"`` on accelerators (see ``ExpertParams``)."""
    return "split" if jax.default_backend() == "cpu" else "stacked"


@pytree_dataclass
class SharedExpertParams:
    w_gate_up: Weight  # [D, 2Fs]
    w_down: Weight  # [Fs, D]
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
