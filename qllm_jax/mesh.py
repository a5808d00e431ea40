"""One mesh, two axes: routed experts over ``"expert"``, attention heads and KV over ``"tensor"``.

A model on several devices is laid out on a ``jax.sharding.Mesh`` with exactly these axis
names (scripts may rely on them):

- ``"expert"`` (size ep): routed experts. Device ``d`` of the axis holds experts ``d, d + ep,
  d + 2*ep, ...`` (strided, not blocked), so an expert group of size G = ep * g, which takes
  the same g local experts on every device, is the contiguous id range a single device's
  group of size G covers: every device works on every expert segment, and expert-level
  preemption keeps its single-device meaning (see ``qllm_jax.sharded``). The stacked expert
  arrays [E, ...] are therefore held in *slot order* (``expert_slots``): slot ``d*E/ep + j``
  holds expert ``j*ep + d``.
- ``"tensor"`` (size tp): query/key/value heads (the column blocks of wq/wk/wv, whole heads),
  the KV cache's head axis, and the output projection's output columns.
- both axes together: the embedding's hidden columns and the LM head's vocabulary rows.

Everything else (norms, router, shared expert, the carry's row state) is replicated. Weights
are placed shard by shard from host buffers (``placer``): no device ever holds a whole sharded
tensor. An int8 weight (``models/quant.py``) is two leaves: its values are sharded as the float
weight would be, its per-output-channel scales on the axis of those channels (``scale_spec``).
An expert placement with redundant slots (``qllm_jax.eplb``) has the 'expert' axis as its
ranks: its [E + R, ...] slot arrays are sharded in blocks over it (``slot_ranks``).
``expert_parallel = tensor_parallel = 1`` builds no mesh: the single-device code path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qllm_jax.models import Model, ModelConfig
from qllm_jax.models.params import ExpertParams, Params, QuantizedWeight
from qllm_jax.scheduler.plan import default_group_size
from qllm_jax.scheduler.sampling_params import is_int

EXPERT, TENSOR = "expert", "tensor"
AXES = (EXPERT, TENSOR)
ROUTED = ("experts.w_gate_up", "experts.w_down")
KV_SPEC = P(None, TENSOR, None)  # [slots, Hkv, hd]: heads over "tensor"

# params path (layer prefix removed) -> how it is sharded; anything else is replicated
_SPECS: dict[str, P] = {
    "embed": P(None, AXES),  # [V, D]: hidden columns over every device
    "lm_head": P(AXES, None),  # [V, D]: vocabulary rows over every device
    "lm_head_bias": P(AXES),
    "attn.wq": P(None, TENSOR),  # [D, Hq*hd]: whole heads per device
    "attn.wk": P(None, TENSOR),
    "attn.wv": P(None, TENSOR),
    "attn.bq": P(TENSOR),
    "attn.bk": P(TENSOR),
    "attn.bv": P(TENSOR),
    "attn.wo": P(None, TENSOR),  # [Hq*hd, D]: output columns (no partial sums to add)
    "experts.w_gate_up": P(EXPERT),  # [E, D, 2F] in slot order
    "experts.w_down": P(EXPERT),  # [E, F, D] in slot order
}


def param_spec(path: str, ndim: int | None = None) -> P:
    """The PartitionSpec of a params path (``"layers.3.attn.wq"``, ``"embed"``, ...). A leaf
    below a listed path (a weight wrapped in a pytree, e.g. ``attn.wq.q``) gets that path's
    spec, so wrapping a weight never silently replicates it; ``ndim`` (the leaf's rank) is
    needed for an int8 weight's scales (``scale_spec``)."""
    parts = path.split(".")
    parts = parts[2:] if parts[0] == "layers" else parts
    for n in range(len(parts), 0, -1):
        spec = _SPECS.get(".".join(parts[:n]))
        if spec is not None:
            if parts[n:] == ["scale"]:
                if ndim is None:
                    raise ValueError(f"param_spec({path!r}) needs the scale's ndim")
                return scale_spec(spec, ndim)
            return spec
    return P()


def scale_spec(weight: P, ndim: int) -> P:
    """The spec of an int8 weight's per-output-channel scales [..., out] (``ndim`` dims) from
    its values' spec over [..., in, out]: the values' spec without the ``in`` axis, so each
    scale lives with its output channel (wq's columns over ``tensor``: its scales too; stacked
    experts over ``expert``: their scales too)."""
    full = tuple(weight) + (None,) * (ndim + 1 - len(weight))  # over [..., in, out]
    return P(*full[: ndim - 1], *full[ndim:])


def is_routed(path: str) -> bool:
    """Whether a params path is (a leaf of) a stacked routed-expert weight: [E, ...] in slot
    order on a mesh."""
    return any(r in path for r in ROUTED)


def mesh_shape(expert_parallel: int, tensor_parallel: int, mesh: Mesh | None) -> tuple[int, int]:
    """(ep, tp) from the Engine's arguments: a given ``mesh`` wins over the two sizes."""
    if mesh is not None:
        if not isinstance(mesh, Mesh) or set(mesh.axis_names) != set(AXES):
            names = getattr(mesh, "axis_names", type(mesh).__name__)
            raise ValueError(f"mesh must be a jax.sharding.Mesh with axes {AXES}, got {names}")
        shape = (mesh.shape[EXPERT], mesh.shape[TENSOR])
        if (expert_parallel, tensor_parallel) not in ((1, 1), shape):
            raise ValueError(
                f"expert_parallel={expert_parallel}, tensor_parallel={tensor_parallel} "
                f"disagree with the mesh {dict(mesh.shape)}: give one or the other"
            )
        return shape
    for name, value in (("expert_parallel", expert_parallel), ("tensor_parallel", tensor_parallel)):
        if not is_int(value) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(expert_parallel), int(tensor_parallel)


def check_divides(cfg: ModelConfig, ep: int, tp: int) -> None:
    """Raise ``ValueError`` naming the axis whose size does not divide what it shards."""
    if cfg.num_experts % ep:
        raise ValueError(
            f"the 'expert' axis (expert_parallel={ep}) must divide the model's "
            f"{cfg.num_experts} routed experts"
        )
    if cfg.num_kv_heads % tp:
        raise ValueError(
            f"the 'tensor' axis (tensor_parallel={tp}) must divide the model's "
            f"{cfg.num_kv_heads} KV heads (and {cfg.num_heads} query heads)"
        )
    n = ep * tp
    for what, size in (("vocabulary", cfg.vocab_size), ("hidden size", cfg.hidden_size)):
        if size % n:
            raise ValueError(
                f"the 'expert' x 'tensor' axes ({ep} x {tp} = {n} devices) shard the embedding "
                f"and LM head and must divide the {what} {size}"
            )


def slot_ranks(num_experts: int, redundant_experts: int, eplb_ranks: int, ep: int) -> int:
    """The ranks of an expert placement (``redundant_experts`` / ``rebalance_every``) on a mesh:
    the ``ep`` devices of its 'expert' axis, each holding its block of the E + R slots.
    ``ValueError`` naming the axis unless ``ep`` divides them (or naming ``eplb_ranks`` when
    it asks for other ranks than the axis)."""
    if eplb_ranks not in (1, ep):
        raise ValueError(
            f"eplb_ranks={eplb_ranks!r} on a mesh must be 1 or expert_parallel={ep}: the "
            "'expert' axis's devices are the placement's ranks"
        )
    slots = num_experts + redundant_experts
    if slots % ep:
        raise ValueError(
            f"the 'expert' axis (expert_parallel={ep}) must divide the {slots} expert slots "
            f"per layer (num_experts={num_experts} + redundant_experts={redundant_experts})"
        )
    return ep


def make_mesh(ep: int, tp: int, mesh: Mesh | None = None) -> Mesh | None:
    """The mesh of ``ep`` x ``tp`` devices (the first ones jax sees), ``mesh`` itself if given,
    or None for one device (today's single-device path)."""
    if mesh is not None:
        return mesh if mesh.size > 1 else None
    if ep * tp == 1:
        return None
    devices = jax.devices()
    if len(devices) < ep * tp:
        hint = ""
        if devices[0].platform == "cpu":
            hint = (
                f"; on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count={ep * tp} set "
                "before jax is imported simulates them"
            )
        raise ValueError(
            f"expert_parallel={ep} x tensor_parallel={tp} needs {ep * tp} devices; "
            f"{len(devices)} visible ({devices[0].platform}){hint}"
        )
    return jax.make_mesh((ep, tp), AXES, devices=devices[: ep * tp])


def group_size(num_experts: int, granularity: str, ep: int, requested: int | None) -> int:
    """Experts per expert segment on an ``ep``-wide expert axis: a multiple of ep (a group
    takes the same number of local experts on every device). The default follows
    ``default_group_size`` over one device's experts."""
    if requested is None:
        return ep * default_group_size(num_experts // ep, granularity)
    if not is_int(requested) or requested % ep:
        raise ValueError(
            f"expert_group_size={requested!r} must be a multiple of expert_parallel={ep}: a "
            "group takes the same local experts on every device of the 'expert' axis"
        )
    return requested


def expert_slots(num_experts: int, ep: int) -> np.ndarray:
    """[E] int: the expert each slot of the stacked arrays holds (slot d*E/ep + j on device d
    holds expert j*ep + d). One named function: a placement with redundant copies (EPLB)
    replaces this table."""
    per = num_experts // ep
    return np.array([j * ep + d for d in range(ep) for j in range(per)], np.int64)


def placer(mesh: Mesh) -> Callable[[str, np.ndarray], jax.Array]:
    """``models.load``'s ``place``: a complete host array (or a host ``QuantizedWeight``: its
    int8 values and scales) → a sharded array, each device receiving only its own block
    (routed experts are reordered into slot order on the way)."""
    ep = mesh.shape[EXPERT]

    def place(path: str, buf: np.ndarray | QuantizedWeight) -> jax.Array | QuantizedWeight:
        if isinstance(buf, QuantizedWeight):  # host int8 values and scales: each its own spec
            return QuantizedWeight(place(f"{path}.q", buf.q), place(f"{path}.scale", buf.scale))
        rows = expert_slots(buf.shape[0], ep) if is_routed(path) else None

        def block(index: tuple[slice, ...]) -> np.ndarray:
            if rows is None:
                return np.ascontiguousarray(buf[index])
            return np.ascontiguousarray(buf[rows[index[0]]][(slice(None), *index[1:])])

        sharding = NamedSharding(mesh, param_spec(path, buf.ndim))
        return jax.make_array_from_callback(buf.shape, sharding, block)

    return place


def _dotted(keypath) -> str:
    return ".".join(str(getattr(k, "name", getattr(k, "idx", k))) for k in keypath)


def _stacked(lp):
    """A layer's params with its routed experts in the stacked layout."""
    if lp.experts.layout == "stacked":
        return lp
    ex = lp.experts
    stack = lambda ws: jax.tree.map(lambda *a: jnp.stack(a), *ws)  # noqa: E731 -- int8 too
    return dataclasses.replace(lp, experts=ExpertParams(stack(ex.w_gate_up), stack(ex.w_down)))


def shard_params(params: Params, mesh: Mesh) -> Params:
    """An in-memory model's params (either expert layout) resharded onto ``mesh``. For models
    already built on one device (random models, tests); a checkpoint directory is placed
    shard by shard while it loads instead."""
    layers = tuple(_stacked(lp) for lp in params.layers)
    params = dataclasses.replace(params, layers=layers)
    ep = mesh.shape[EXPERT]

    def put(keypath, x):
        path = _dotted(keypath)
        if is_routed(path):
            x = x[expert_slots(x.shape[0], ep)]
        return jax.device_put(x, NamedSharding(mesh, param_spec(path, x.ndim)))

    return jax.tree_util.tree_map_with_path(put, params)


def shard_model(model: Model, mesh: Mesh) -> Model:
    return dataclasses.replace(model, params=shard_params(model.params, mesh))


def kv_shards(mesh: Mesh | None) -> int:
    """How many ways each device's KV cache is split (its memory per page shrinks so)."""
    return 1 if mesh is None else mesh.shape[TENSOR]


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, P())
