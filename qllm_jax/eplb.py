"""Expert load on the device, and EPLB-style placement of experts in physical slots.

Counting: every expert segment adds, per layer and logical expert, how many (row, pick) pairs of
its pass's real rows chose each of its experts (``segments.count_routed``) into one int32
[L, E] device array. Nothing on the step path reads it: every N steps, between steps,
``ExpertLoad.poll`` starts an asynchronous copy to the host, and a later step takes it once it
has landed (``is_ready``: never a wait), so the host view lags a step or so. What is counted is what
the experts computed: rows computed again (a pass recomputed after a KV reset, a request evicted
and re-prefilled) count again; padding rows never do.

Placement (``redundant_experts`` / ``rebalance_every``): each layer holds S = E + R physical
expert slots, rank-major over ``ranks`` ranks of S / ranks slots (slot ``s`` lives on rank
``s // (S / ranks)``; on a device mesh the ranks are its ``expert`` axis, which shards the slot
axis in those blocks), with copies of the hottest experts in the R extra slots. The placement
is DeepSeek's EPLB greedy (``scheduler.experts.eplb_placement``: copies to the experts of
highest load per copy, then copies heaviest first onto the least-loaded rank), recomputed from
the counts routed since the last re-placement; weights move with one gather per layer between
steps. Routing ids stay logical, so a parked pass resumes across a re-placement, and the expert
kernels are placement-invariant (``models.model._expert_group_slots``; on a mesh
``qllm_jax.sharded._experts_slots_body``), so moving a copy changes no token.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qllm_jax.mesh import EXPERT, expert_slots
from qllm_jax.models import Model
from qllm_jax.models.model import reference_routing
from qllm_jax.models.params import ExpertParams, SlotMap
from qllm_jax.scheduler.experts import eplb_placement, imbalance, slot_experts, slot_sources


def check_eplb_options(
    num_experts: int, redundant_experts: int, rebalance_every: int, ranks: int
) -> None:
    """Raise ``ValueError`` naming the argument unless the placement options fit the model."""
    for name, value, least in (
        ("redundant_experts", redundant_experts, 0),
        ("rebalance_every", rebalance_every, 0),
        ("eplb_ranks", ranks, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    slots = num_experts + redundant_experts
    if slots % ranks:
        raise ValueError(
            f"eplb_ranks={ranks} must divide the {slots} expert slots per layer "
            f"(num_experts={num_experts} + redundant_experts={redundant_experts})"
        )
    if ranks > num_experts:
        raise ValueError(f"eplb_ranks={ranks} exceeds num_experts={num_experts}")


class ExpertLoad:
    """The routed-token counts [L, E] on the device and their last host copy (module doc)."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.shape = (num_layers, num_experts)
        self.counts = jnp.zeros(self.shape, jnp.int32)  # updated by every expert segment
        self.host = np.zeros(self.shape, np.int64)  # as of the last copy that landed
        self._raw = np.zeros(self.shape, np.uint32)  # that copy's bits
        self._pending: jax.Array | None = None
        self.num_resets = 0

    def poll(self, start: bool) -> np.ndarray:
        """Between steps: take a copy started earlier if it has landed (never waits), and with
        ``start`` begin the next one. Returns the host view."""
        if self._pending is not None and self._pending.is_ready():
            self._take(np.asarray(self._pending))
            self._pending = None
        if start:
            self._pending = self.counts
            self._pending.copy_to_host_async()
        return self.host

    def read(self) -> np.ndarray:
        """The counts now (waits for the device: between steps only, e.g. to re-place)."""
        self._pending = None
        self._take(np.asarray(jax.device_get(self.counts)))
        return self.host

    def _take(self, raw: np.ndarray) -> None:
        """Add what was counted since the last copy: the device's int32 counters wrap after
        2**31 picks, the host's int64 totals add the difference modulo 2**32."""
        raw = raw.view(np.uint32)
        self.host = self.host + (raw - self._raw).astype(np.int64)
        self._raw = raw

    def reset(self) -> None:
        """Count again from zero on the device (its array was lost with a failed computation);
        the host keeps the totals it had read."""
        self.counts = jnp.zeros(self.shape, jnp.int32)
        self._raw = np.zeros(self.shape, np.uint32)
        self._pending = None
        self.num_resets += 1


@dataclasses.dataclass
class Rebalance:
    """What one re-placement did."""

    moved_slots: int  # physical slots that received another expert's weights
    imbalance_before: float  # busiest / mean rank tokens of the window, old placement (worst
    imbalance_after: float  # layer), and under the new placement


class ExpertSlots:
    """Each layer's experts in S = E + R physical slots over ``ranks`` ranks (module doc).

    The stacked layout's slots are the executor's own arrays [S, ...] (a copy: the model's
    logical arrays stay referenced by its ``Model``); the split layout's are the model's arrays.
    On a ``mesh`` (``ranks`` = its 'expert' axis) the model's arrays are in the mesh's strided
    order (``mesh_rows``) and the slots are sharded over the axis, rank r's block on rank r.

    ``params(layer)`` is what an expert kernel takes: the physical slots and their ``SlotMap``
    (stacked layout), or, for the split layout (a CPU's tuples of per-expert arrays), a logical
    view that references each expert's first copy and no ``SlotMap``: there the dense kernel
    runs every expert on every row anyway, and a copy is the same array object.
    """

    def __init__(
        self, experts: list[ExpertParams], redundant: int, ranks: int, mesh: Mesh | None = None
    ) -> None:
        w_down = experts[0].w_down  # a tuple (split layout) or one stacked [E, ...] weight
        self.num_experts = len(w_down) if isinstance(w_down, tuple) else _leading(w_down)
        self.ranks = ranks
        self.num_slots = self.num_experts + redundant
        self.per_rank = self.num_slots // ranks
        self.layout = experts[0].layout
        self._take, rows = _take, list(range(self.num_experts))  # rows: expert -> its row
        if mesh is not None:  # ranks are the 'expert' axis: rank r holds its slots' block
            self._take, rows = _mesh_take(mesh), mesh_rows(self.num_experts, ranks)
        uniform = [1.0] * self.num_experts  # no counts yet: copies of the lowest ids
        first = slot_experts(eplb_placement(uniform, ranks, self.per_rank))
        self.slot_expert = [list(first) for _ in experts]  # layer -> slot -> expert
        self._slots = [self._gather(ep, [rows[e] for e in first]) for ep in experts]
        self._maps: list[SlotMap | None] = [self._slot_map(s) for s in self.slot_expert]
        self.loads_at_rebalance = np.zeros((len(experts), self.num_experts), np.int64)
        self.num_rebalances = 0
        self.moved_slots = 0
        self.last: Rebalance | None = None

    # -- what the kernels take --------------------------------------------------------------

    def params(self, layer: int) -> tuple[ExpertParams, SlotMap | None]:
        if self.layout == "split":
            ep = self._slots[layer]
            first = self._first_copies(layer)
            view = ExpertParams(
                tuple(ep.w_gate_up[s] for s in first), tuple(ep.w_down[s] for s in first)
            )
            return view, None
        return self._slots[layer], self._maps[layer]

    def placement(self, layer: int) -> list[list[int]]:
        """Rank -> the experts (copies) it holds, for ``layer``."""
        se, p = self.slot_expert[layer], self.per_rank
        return [se[r * p : (r + 1) * p] for r in range(self.ranks)]

    def _first_copies(self, layer: int) -> list[int]:
        se = self.slot_expert[layer]
        return [se.index(e) for e in range(self.num_experts)]

    def _slot_map(self, slot_expert: list[int]) -> SlotMap | None:
        if self.layout == "split":
            return None
        copies = [[s for s, x in enumerate(slot_expert) if x == e] for e in range(self.num_experts)]
        width = self.num_slots - self.num_experts + 1  # the most copies: one shape, one compile
        table = np.array([c + [c[0]] * (width - len(c)) for c in copies], np.int32)  # [E, C]
        return SlotMap(jnp.asarray(table), jnp.asarray([len(c) for c in copies], jnp.int32))

    def _gather(self, ep: ExpertParams, sources: list[int]) -> ExpertParams:
        """Slots whose weights are ``ep``'s slots ``sources`` (a copy on the device; for the
        split layout the same arrays, referenced again)."""
        if self.layout == "split":
            return ExpertParams(
                tuple(ep.w_gate_up[s] for s in sources), tuple(ep.w_down[s] for s in sources)
            )
        idx = np.asarray(sources, np.int32)
        return ExpertParams(self._take(ep.w_gate_up, idx), self._take(ep.w_down, idx))

    def warmup(self) -> None:
        """Compile the gather a re-placement moves weights with (slots to slots: another shape
        than the first placement's experts to slots), so serving compiles nothing."""
        if self.layout == "stacked":
            jax.block_until_ready(self._gather(self._slots[0], list(range(self.num_slots))))

    # -- re-placement -------------------------------------------------------------------------

    def rebalance(self, loads: np.ndarray) -> Rebalance | None:
        """Re-place every layer from the counts ``loads`` [L, E] (cumulative) routed since
        the last re-placement; move the weights. None (nothing changes) if no token was routed
        since."""
        window = loads - self.loads_at_rebalance
        if not window.any():
            return None
        self.loads_at_rebalance = loads.copy()
        before = after = 0.0
        moved = 0
        for layer, w in enumerate(window.tolist()):
            old = self.slot_expert[layer]
            new = slot_experts(eplb_placement(w, self.ranks, self.per_rank), old)
            before = max(before, imbalance(self.placement(layer), w))
            if new != old:
                src = slot_sources(old, new)
                self._slots[layer] = self._gather(self._slots[layer], src)
                self.slot_expert[layer] = new
                self._maps[layer] = self._slot_map(new)
                moved += sum(a != b for a, b in zip(old, new, strict=True))
            after = max(after, imbalance(self.placement(layer), w))
        self.num_rebalances += 1
        self.moved_slots += moved
        self.last = Rebalance(moved, round(before, 4), round(after, 4))
        return self.last


def _leading(w) -> int:
    """The leading (expert) dimension of a stacked weight, float or int8."""
    return jax.tree.leaves(w)[0].shape[0]


def routing_trace(model: Model, token_ids: list[int]) -> np.ndarray:
    """The experts each token of one sequence picks at each layer: ids [L, T, k] int32, from
    the model's oracle pass (``models.model.reference_routing``). For benchmarks of
    placements (which experts follow which from one layer to the next), not for serving."""
    return np.asarray(reference_routing(model, np.asarray(token_ids, np.int32)))


def _take_slots(w, idx):
    """Slots ``idx`` of a stacked [S, ...] weight (both leaves of an int8 one)."""
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), w)


_take = jax.jit(_take_slots)


@functools.cache
def _mesh_take(mesh: Mesh):
    """``_take`` on a mesh, its result sharded on the 'expert' axis (slot block r on rank r).
    The copies move between ranks by gathering the layer's slots on every device for the
    duration of the call (between steps, one layer at a time), then keeping each rank's block:
    simple, and a layer's worth of transient memory per device."""

    whole, blocks = NamedSharding(mesh, P()), NamedSharding(mesh, P(EXPERT))

    def take(w, idx):
        moved = _take_slots(jax.tree.map(lambda a: jax.sharding.reshard(a, whole), w), idx)
        return jax.tree.map(lambda a: jax.sharding.reshard(a, blocks), moved)

    return jax.jit(take, out_shardings=blocks)


def mesh_rows(num_experts: int, ep: int) -> list[int]:
    """Expert -> its row in a mesh's stacked arrays, which hold experts in the strided order of
    ``mesh.expert_slots`` (not in id order)."""
    rows = [0] * num_experts
    for row, e in enumerate(expert_slots(num_experts, ep).tolist()):
        rows[e] = row
    return rows
