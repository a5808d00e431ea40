"""Expert-parallel load: a skewed routing model, expert placements over ranks, and what the
busiest rank costs a layer. Plain Python, no jax; used by the N-engine simulator.

Routing (a documented synthetic choice: no routing trace of a real engine is used here). Per
layer, expert popularity follows a Zipf law over a random permutation of the experts,
``p(e) ~ (rank(e) + 1) ** -skew``; a token's top-k picks hit expert ``e`` with probability
``k * p(e)``, and loads are taken at their expectation (no sampling noise), so a placement's
imbalance is a property of the placement, not of luck. Hot experts move: every ``drift_s``
seconds the popularities of a random ``drift_fraction`` of each layer's experts are shuffled
among themselves, so a placement made from old counts grows stale, which is what periodic
re-placement (and its migration cost) is for.

Placement: ``static_placement`` is vLLM's default without EPLB (expert ``e`` on rank
``e // (E / R)``); ``eplb_placement`` is the EPLB-style greedy one (DeepSeek's algorithm as
vLLM and SGLang run it): redundant copies go one at a time to the expert with the highest load
per copy, then copies, heaviest first, go to the least-loaded rank that has a free slot.
"""

from __future__ import annotations

import dataclasses
import random

Placement = list[list[int]]  # rank -> the experts (copies) it holds


def zipf_popularity(num_experts: int, skew: float, rng: random.Random) -> list[float]:
    """Per-expert routing probabilities (summing to 1): Zipf(``skew``) over a random order."""
    order = list(range(num_experts))
    rng.shuffle(order)
    w = [0.0] * num_experts
    for rank, e in enumerate(order):
        w[e] = (rank + 1) ** -skew
    total = sum(w)
    return [x / total for x in w]


def static_placement(num_experts: int, ranks: int) -> Placement:
    if num_experts % ranks:
        raise ValueError(f"{num_experts} experts do not divide over {ranks} ranks")
    per = num_experts // ranks
    return [list(range(r * per, (r + 1) * per)) for r in range(ranks)]


def eplb_placement(
    loads: list[float],
    ranks: int,
    slots_per_rank: int,
    affinity: list[list[float]] | None = None,
    slack: float = 0.0,
) -> Placement:
    """Greedy EPLB over ``ranks`` ranks of ``slots_per_rank`` slots (module docstring).

    ``affinity[r][e]`` (optional): how much expert ``e`` gains from living on rank ``r``; a copy
    then goes to the rank of highest affinity among those whose load is within ``slack`` of a
    rank's fair share above the least-loaded one's (``colocated_placement``)."""
    n = len(loads)
    if ranks * slots_per_rank < n:
        raise ValueError(f"{ranks} x {slots_per_rank} slots cannot hold {n} experts")
    copies = [1] * n
    for _ in range(ranks * slots_per_rank - n):
        e = max(range(n), key=lambda e: (loads[e] / copies[e], -e))
        copies[e] += 1
    items = sorted(
        ((loads[e] / copies[e], e) for e in range(n) for _ in range(copies[e])),
        key=lambda x: (-x[0], x[1]),
    )
    tol = slack * sum(loads) / ranks
    held: Placement = [[] for _ in range(ranks)]
    load = [0.0] * ranks
    for w, e in items:
        free = [r for r in range(ranks) if len(held[r]) < slots_per_rank]
        # a second copy of an expert on the same rank is useless: avoid it while possible
        apart = [r for r in free if e not in held[r]] or free
        r = min(apart, key=lambda r: (load[r], r))
        if affinity is not None:
            near = [x for x in apart if load[x] <= load[r] + tol]
            r = max(near, key=lambda x: (affinity[x][e], -load[x], -x))
        held[r].append(e)
        load[r] += w
    return held


def colocated_placement(
    loads: list[list[float]],
    transitions: list[list[list[float]]],
    ranks: int,
    slots_per_rank: int,
    slack: float = 0.1,
) -> list[Placement]:
    """EPLB per layer, but a copy of layer ``l+1``'s expert ``b`` leans towards the rank whose
    layer-``l`` experts hand most tokens to ``b`` (the paper's inter-layer expert dependencies):
    ``transitions[l][a][b]`` counts tokens picking ``a`` at layer ``l`` and ``b`` at ``l+1``.
    ``slack`` bounds what balance it may give up (a fraction of a rank's fair load)."""
    out = [eplb_placement(loads[0], ranks, slots_per_rank)]
    for layer in range(1, len(loads)):
        prev, t = out[-1], transitions[layer - 1]
        n = len(loads[layer])
        copies = [sum(x.count(a) for x in prev) for a in range(len(t))]
        affinity = [
            [sum(t[a][b] / copies[a] for a in experts) for b in range(n)] for experts in prev
        ]
        out.append(eplb_placement(loads[layer], ranks, slots_per_rank, affinity, slack))
    return out


def slot_experts(placement: Placement, previous: list[int] | None = None) -> list[int]:
    """Physical slot -> expert, rank-major (slot ``s`` lives on rank ``s // slots_per_rank``),
    from a placement of equal-sized ranks. With the ``previous`` slot layout, an expert that
    stays on a rank keeps its old slot there, so a re-placement moves only what changed."""
    per = len(placement[0])
    if any(len(x) != per for x in placement):
        raise ValueError(f"ranks hold unequal slot counts: {[len(x) for x in placement]}")
    out: list[int] = []
    for r, experts in enumerate(placement):
        left = list(experts)
        row = [-1] * per
        if previous is not None:
            for i, e in enumerate(previous[r * per : (r + 1) * per]):
                if e in left:
                    row[i] = e
                    left.remove(e)
        for i in range(per):
            if row[i] < 0:
                row[i] = left.pop(0)
        out += row
    return out


def slot_sources(old: list[int], new: list[int]) -> list[int]:
    """For each new slot, an old slot holding its expert (itself when unchanged): the gather
    that moves expert weights from layout ``old`` to ``new``."""
    where: dict[int, int] = {}
    for s, e in enumerate(old):
        where.setdefault(e, s)
    missing = sorted(set(new) - set(where))
    if missing:
        raise ValueError(f"experts {missing} are in no slot of the old layout")
    return [s if old[s] == e else where[e] for s, e in enumerate(new)]


def rank_loads(placement: Placement, loads: list[float]) -> list[float]:
    """Tokens each rank computes when copies split an expert's ``loads`` evenly."""
    total = sum(loads)
    shares = rank_shares(placement, [x / total for x in loads] if total else loads)
    return [x * total for x in shares] if total else shares


def imbalance(placement: Placement, loads: list[float]) -> float:
    """Busiest rank's tokens over the mean rank's (1.0: balanced)."""
    r = rank_loads(placement, loads)
    mean = sum(r) / len(r)
    return max(r) / mean if mean else 1.0


def rank_shares(placement: Placement, p: list[float]) -> list[float]:
    """Each rank's share of a layer's routed tokens (copies split an expert's load evenly)."""
    copies = [0] * len(p)
    for experts in placement:
        for e in experts:
            copies[e] += 1
    return [sum(p[e] / copies[e] for e in experts) for experts in placement]


def changed_slots(old: Placement, new: Placement) -> float:
    """Fraction of slots whose expert changed between two placements (what migrates)."""
    total = sum(len(x) for x in new)
    moved = sum(len(set(b) - set(a)) for a, b in zip(old, new, strict=True))
    return moved / total if total else 0.0


def ep_expert_time(
    expert_base: float, expert_per_row: float, weight_share: float, rows: float, hot: float
) -> float:
    """Seconds of a layer's experts on the busiest rank: it reads ``weight_share`` of the
    layer's expert weights (its slots / E) and computes ``hot`` (its share) of ``rows`` tokens'
    routed work; ``expert_base`` / ``expert_per_row`` are a cost model's, for all experts on one
    device."""
    return expert_base * weight_share + expert_per_row * rows * hot


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """The expert-parallel group: shape, routing model and interconnect. Every value that no
    paper gives is a named default here (see ``experiments/multilevel.py``'s sweep)."""

    num_layers: int  # real MoE layers (a simulated "layer" may stand for several)
    num_experts: int
    top_k: int
    hidden: int
    ranks: int
    skew: float = 0.5  # routing Zipf exponent: the hottest of 128 experts ~6x the mean
    drift_s: float = 20.0  # hot experts move this often ...
    drift_fraction: float = 0.25  # ... among this share of each layer's experts
    a2a_gbps: float = 100.0  # all-to-all bandwidth per rank, GB/s: swept, not measured
    a2a_latency_s: float = 20e-6  # per all-to-all (dispatch and combine each pay it)
    bytes_per_value: int = 2  # bf16 activations
    eplb: bool = False  # EPLB placement (else static)
    redundant_per_rank: int = 1  # EPLB's extra expert slots per rank
    rebalance_steps: int = 3000  # EPLB re-places every this many steps (vLLM's default) ...
    window_steps: int = 1000  # ... from the loads of the last this many
    migration_s: float = 0.72  # stall per full re-placement (paper B's 0.72 s): swept
    seed: int = 0

    def a2a_s(self, max_rows: float) -> float:
        """One layer's dispatch + combine for the busiest sender's ``max_rows`` tokens."""
        if self.ranks == 1:
            return 0.0
        out = max_rows * self.top_k * (self.ranks - 1) / self.ranks
        return 2 * (
            self.a2a_latency_s + out * self.hidden * self.bytes_per_value / self.a2a_gbps / 1e9
        )


class ExpertState:
    """Routing popularity, the placement in force and its per-layer busiest-rank share, drift
    and EPLB re-placement over time; ``block_time`` prices the experts of a simulated layer."""

    def __init__(self, ep: ExpertParallel, layers_per_block: int) -> None:
        self.ep, self.g = ep, layers_per_block
        if ep.num_layers % layers_per_block:
            raise ValueError("layers_per_block must divide num_layers")
        self.rng = random.Random(ep.seed)
        self.p = [zipf_popularity(ep.num_experts, ep.skew, self.rng) for _ in range(ep.num_layers)]
        self.slots = ep.num_experts // ep.ranks + (ep.redundant_per_rank if ep.eplb else 0)
        self.epochs: list[tuple[int, list[list[float]]]] = [(0, self.p)]  # (start step, p)
        self.next_drift = ep.drift_s
        self.steps = 0
        self.migrations = 0
        self.migrated = 0.0  # slots moved, in full placements
        # offline counts (the routing profile at the start) give EPLB its first placement
        self.placement = [self._place(p) for p in self.p]
        self._refresh()
        self.balance_num = self.balance_den = 0.0

    def _place(self, loads: list[float]) -> Placement:
        if self.ep.eplb:
            return eplb_placement(loads, self.ep.ranks, self.slots)
        return static_placement(self.ep.num_experts, self.ep.ranks)

    def _refresh(self) -> None:
        """Busiest-rank share of each layer, averaged over each block of ``g`` layers."""
        hot = [max(rank_shares(pl, p)) for pl, p in zip(self.placement, self.p, strict=True)]
        self.hot = hot
        self.block_hot = [
            sum(hot[b * self.g : (b + 1) * self.g]) / self.g
            for b in range(self.ep.num_layers // self.g)
        ]

    def block_time(
        self, block: int, rows: float, max_rows: float, expert_base: float, expert_per_row: float
    ) -> float:
        """Seconds of the experts of simulated layer ``block`` (``g`` real layers) for ``rows``
        tokens from all replicas, ``max_rows`` of them from the busiest one: the busiest rank's
        expert work plus the all-to-all. ``expert_base`` / ``expert_per_row``: the cost model's
        per block, for all experts on one device."""
        hot = self.block_hot[block]
        self.balance_num += rows * hot * self.ep.ranks
        self.balance_den += rows
        t = ep_expert_time(expert_base, expert_per_row, self.slots / self.ep.num_experts, rows, hot)
        return t + self.g * self.ep.a2a_s(max_rows)

    @property
    def rank_balance(self) -> float:
        """Token-weighted busiest / mean rank load (1.0 = perfectly balanced)."""
        return self.balance_num / self.balance_den if self.balance_den else 1.0

    def tick(self, now: float) -> float:
        """One lockstep step has ended at ``now``: drift, and EPLB re-placement when due.
        Returns the stall it costs (migration), in seconds."""
        self.steps += 1
        while now >= self.next_drift:
            self.next_drift += self.ep.drift_s
            self._drift()
        if not self.ep.eplb or self.steps % self.ep.rebalance_steps:
            return 0.0
        loads = self._window_loads()
        new = [self._place(x) for x in loads]
        moved = sum(changed_slots(a, b) for a, b in zip(self.placement, new, strict=True))
        moved /= len(new)
        self.placement = new
        self._refresh()
        self.migrations += 1
        self.migrated += moved
        return self.ep.migration_s * moved

    def _drift(self) -> None:
        k = max(2, round(self.ep.drift_fraction * self.ep.num_experts))
        p = []
        for layer in self.p:
            layer = list(layer)
            idx = self.rng.sample(range(len(layer)), k)
            vals = [layer[i] for i in idx]
            self.rng.shuffle(vals)
            for i, v in zip(idx, vals, strict=True):
                layer[i] = v
            p.append(layer)
        self.p = p
        self.epochs.append((self.steps, p))
        self._refresh()

    def _window_loads(self) -> list[list[float]]:
        """Per-layer expert loads over the last ``window_steps`` steps: the routing epochs
        overlapping it, weighted by their steps inside it (expected counts)."""
        lo = self.steps - self.ep.window_steps
        acc = [[0.0] * self.ep.num_experts for _ in range(self.ep.num_layers)]
        ends = [s for s, _ in self.epochs[1:]] + [self.steps]
        for (start, p), end in zip(self.epochs, ends, strict=True):
            w = max(0, end - max(start, lo))
            if w:
                for a, layer in zip(acc, p, strict=True):
                    for e, x in enumerate(layer):
                        a[e] += w * x
        self.epochs = [(s, p) for (s, p), e in zip(self.epochs, ends, strict=True) if e > lo]
        return acc
