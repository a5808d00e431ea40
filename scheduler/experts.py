"""Expert-parallel load: a skewed routing model or a recorded routing trace, expert placements
over ranks, and what the busiest rank costs a layer. Plain Python, no jax; used by the N-engine
simulator.

Synthetic routing (the default: a documented choice, no engine's routing). Per layer, expert
popularity follows a Zipf law over a random permutation of the experts,
``p(e) ~ (rank(e) + 1) ** -skew``; a token's top-k picks hit expert ``e`` with probability
``k * p(e)``, and loads are taken at their expectation (no sampling noise), so a placement's
imbalance is a property of the placement, not of luck. Hot experts move: every ``drift_s``
seconds the popularities of a random ``drift_fraction`` of each layer's experts are shuffled
among themselves, so a placement made from old counts grows stale, which is what periodic
re-placement (and its migration cost) is for.

Trace routing (``ExpertParallel(trace=RoutingTrace(...))``): the loads are those a real engine
routed (``experiments/multilevel.py --record-trace``: the built-in model on this repository's
text), kept as per-window expert counts and layer-to-layer pick pairs. The simulation replays
the trace's tokens in order, cyclically: each simulated layer keeps a cursor into the trace, and
a step that routes ``rows`` tokens through it takes the counts of the next ``rows`` trace tokens
(windows prorated), so a step's imbalance includes the sampling noise a real batch of that size
has, and hot experts move as the text changes (this real drift replaces ``drift_s`` /
``drift_fraction``, which trace mode ignores). Two choices, not measurements: real layer ``l``
replays trace layer ``l % L_trace`` (a deeper model repeats the recorded layers; from a trace's
last layer to its first, picks are taken as independent, the product of the two layers' window
counts); and a step's tokens are consecutive tokens of one text, more alike than a batch of
different requests' tokens (so short-range skew is, if anything, overstated). EPLB's first
placement is fitted to the whole trace's counts (the offline profile), re-placements to the
tokens routed in the last ``window_steps`` steps.

Placement: ``static_placement`` is vLLM's default without EPLB (expert ``e`` on rank
``e // (E / R)``); ``eplb_placement`` is the EPLB-style greedy one (DeepSeek's algorithm as
vLLM and SGLang run it): redundant copies go one at a time to the expert with the highest load
per copy, then copies, heaviest first, go to the least-loaded rank that has a free slot;
``colocated_placement`` (``ExpertParallel(affinity=True)``, trace mode) is EPLB that leans each
layer's copies towards the rank whose previous-layer experts hand them most tokens (the paper's
inter-layer affinity).

All-to-all: by default a layer's dispatch + combine sends the ``(R - 1) / R`` of its picks that
leave the sender's rank (vLLM's DP attention: every token returns home between layers, so no
placement saves bytes). With ``a2a_handoff`` (trace mode) only the picks whose next-layer expert
is on another rank pay (``pair_stay_share``: tokens handed from a layer's expert straight to the
next layer's, the premise of inter-layer affinity; ``experiments/eplb_bench.py`` calls it an
upper bound on what co-location could save); the last layer pays the default share.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import random
from pathlib import Path

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


def copy_rank(placement: Placement, num_experts: int) -> list[list[int]]:
    """expert -> the ranks of its copies, in slot order (the engine's copy ``row % copies``)."""
    out: list[list[int]] = [[] for _ in range(num_experts)]
    for r, experts in enumerate(placement):
        for e in experts:
            out[e].append(r)
    return out


def same_rank(a: Placement, b: Placement, num_experts: int) -> list[list[float]]:
    """[E][E]: the probability that a token's copy of expert ``i`` under placement ``a`` and its
    copy of expert ``j`` under ``b`` (the next layer's) share a rank, each copy taken evenly
    and independently of the other (the engine's ``row % copies`` ties them; without
    redundant copies the two agree: each expert has one rank)."""
    ra, rb = copy_rank(a, num_experts), copy_rank(b, num_experts)
    out = []
    for ci in ra:
        row = []
        for cj in rb:
            row.append(sum(ci.count(r) * cj.count(r) for r in set(ci)) / (len(ci) * len(cj)))
        out.append(row)
    return out


def pair_stay_share(placements: list[Placement], transitions: list[list[list[float]]]) -> float:
    """Share of consecutive-layer (pick, pick) pairs whose two copies share a rank, for
    per-layer ``placements`` and ``transitions[l][a][b]`` (pairs picking ``a`` at layer ``l``
    and ``b`` at ``l + 1``); ``experiments/eplb_bench.stay_fraction`` counts the same from
    per-token ids with the engine's copy rule (equal without redundant copies)."""
    stay = total = 0.0
    for layer, t in enumerate(transitions):
        same = same_rank(placements[layer], placements[layer + 1], len(t))
        for row, srow in zip(t, same, strict=True):
            stay += sum(x * y for x, y in zip(row, srow, strict=True))
            total += sum(row)
    return stay / total if total else 0.0


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


TRACE_FORMAT = "qllm-jax routing trace 1"


@dataclasses.dataclass(frozen=True, eq=False)
class RoutingTrace:
    """Routing recorded on a real engine, per window of ``window_tokens`` consecutive tokens of
    one sequence: ``counts[w][l][e]``, the (token, pick) pairs of layer ``l`` that chose expert
    ``e``, and ``transitions[w][l][a][b]``, the tokens' (pick at layer ``l``, pick at ``l + 1``)
    pairs, ``top_k ** 2`` per token. ``ExpertState`` replays it cyclically (module docstring);
    ``loads`` and ``pairs`` sum any range of its tokens from prefix sums."""

    window_tokens: int
    top_k: int
    counts: list[list[list[float]]]  # [W][L][E]
    transitions: list[list[list[list[float]]]]  # [W][L-1][E][E]
    source: dict = dataclasses.field(default_factory=dict)  # what was recorded, and how

    def __post_init__(self) -> None:
        for name in ("window_tokens", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not self.counts or not self.counts[0] or not self.counts[0][0]:
            raise ValueError("a routing trace needs at least one window, layer and expert")
        if len(self.transitions) != len(self.counts):
            raise ValueError(
                f"{len(self.transitions)} windows of transitions for {len(self.counts)} of counts"
            )
        n_l, n_e = self.num_layers, self.num_experts
        picks, pairs = self.window_tokens * self.top_k, self.window_tokens * self.top_k**2
        for w, (c, t) in enumerate(zip(self.counts, self.transitions, strict=True)):
            if len(c) != n_l or any(len(x) != n_e for x in c):
                raise ValueError(f"window {w}: counts are not [{n_l}][{n_e}]")
            if len(t) != n_l - 1 or any(len(a) != n_e or any(len(b) != n_e for b in a) for a in t):
                raise ValueError(f"window {w}: transitions are not [{n_l - 1}][{n_e}][{n_e}]")
            if any(min(x) < 0 for x in c) or any(min(b) < 0 for a in t for b in a):
                raise ValueError(f"window {w}: negative counts")
            if any(abs(sum(x) - picks) > 1e-6 * picks for x in c):
                raise ValueError(f"window {w}: a layer's counts do not sum to {picks} "
                                 f"(window_tokens x top_k)")  # fmt: skip
            if any(abs(sum(map(sum, a)) - pairs) > 1e-6 * pairs for a in t):
                raise ValueError(f"window {w}: a layer's transitions do not sum to {pairs} "
                                 f"(window_tokens x top_k ** 2)")  # fmt: skip

    @property
    def num_windows(self) -> int:
        return len(self.counts)

    @property
    def num_layers(self) -> int:
        return len(self.counts[0])

    @property
    def num_experts(self) -> int:
        return len(self.counts[0][0])

    @property
    def tokens(self) -> int:
        return self.num_windows * self.window_tokens

    @classmethod
    def from_ids(
        cls,
        sequences: list[list[list[list[int]]]],
        num_experts: int,
        window_tokens: int,
        source: dict | None = None,
    ) -> RoutingTrace:
        """From per-sequence expert ids [L][T][k] (``qllm_jax.eplb.routing_trace(...).tolist()``):
        each sequence cut into windows of ``window_tokens`` tokens (a last partial one dropped)."""
        counts, transitions = [], []
        for seq in sequences:
            n_l, n_t = len(seq), len(seq[0])
            for lo in range(0, n_t - window_tokens + 1, window_tokens):
                c = [[0] * num_experts for _ in range(n_l)]
                t = [[[0] * num_experts for _ in range(num_experts)] for _ in range(n_l - 1)]
                for i in range(lo, lo + window_tokens):
                    for layer in range(n_l):
                        for e in seq[layer][i]:
                            c[layer][e] += 1
                    for layer in range(n_l - 1):
                        for a in seq[layer][i]:
                            row = t[layer][a]
                            for b in seq[layer + 1][i]:
                                row[b] += 1
                counts.append(c)
                transitions.append(t)
        if not counts:
            raise ValueError(f"no sequence holds a window of window_tokens={window_tokens}")
        top_k = len(sequences[0][0][0])
        return cls(window_tokens, top_k, counts, transitions, dict(source or {}))

    def to_dict(self) -> dict:
        return {
            "format": TRACE_FORMAT,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "window_tokens": self.window_tokens,
            "num_windows": self.num_windows,
            "source": self.source,
            "counts": self.counts,
            "transitions": self.transitions,
        }

    @classmethod
    def from_dict(cls, d: dict) -> RoutingTrace:
        if d.get("format") != TRACE_FORMAT:
            raise ValueError(f"not a routing trace: format {d.get('format')!r}, "
                             f"expected {TRACE_FORMAT!r}")  # fmt: skip
        return cls(d["window_tokens"], d["top_k"], d["counts"], d["transitions"], d["source"])

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        return cls.from_dict(json.loads(Path(path).read_text()))

    # -- sums over token ranges ----------------------------------------------------------------

    @functools.cached_property
    def window_pairs(self) -> list[list[float]]:
        """[W][L * E * E]: each window's pick pairs of layer pair ``i`` (layer ``i`` to
        ``i + 1``), flattened; pair ``L - 1`` wraps from the last layer to the first, with
        independent picks (the outer product of the window's two counts / its tokens)."""
        out = []
        for c, t in zip(self.counts, self.transitions, strict=True):
            flat = [x for a in t for row in a for x in row]
            last, first = c[-1], c[0]
            flat += [x * y / self.window_tokens for x in last for y in first]
            out.append(flat)
        return out

    @functools.cached_property
    def _load_prefix(self) -> list[list[float]]:
        return _prefix([[x for layer in c for x in layer] for c in self.counts])

    @functools.cached_property
    def _pair_prefix(self) -> list[list[float]]:
        return _prefix(self.window_pairs)

    def weighted_prefix(self, pair: int, weights: list[float]) -> list[list[float]]:
        """Prefix sums over windows of layer pair ``pair``'s pick pairs weighted by
        ``weights`` [E * E] (for ``range_sum``)."""
        n = self.num_experts**2
        return _prefix([[sum(x * y for x, y in zip(w[pair * n : (pair + 1) * n], weights,
                                                    strict=True))]
                        for w in self.window_pairs])  # fmt: skip

    def range_sum(self, prefix: list[list[float]], start: float, stop: float) -> list[float]:
        """The sum over trace tokens ``[start, stop)`` of a per-window ``prefix`` (windows
        prorated), the trace repeated as often as the range needs."""
        if stop < start or start < 0:
            raise ValueError(f"bad token range [{start}, {stop})")
        a, b = self._at(prefix, start), self._at(prefix, stop)
        return [y - x for x, y in zip(a, b, strict=True)]

    def _at(self, prefix: list[list[float]], x: float) -> list[float]:
        cycles, rem = divmod(x, self.tokens)
        pos = rem / self.window_tokens
        w = min(int(pos), self.num_windows - 1)
        frac = pos - w
        lo, hi, full = prefix[w], prefix[w + 1], prefix[-1]
        return [a + frac * (b - a) + cycles * f for a, b, f in zip(lo, hi, full, strict=True)]

    def loads(self, start: float, stop: float) -> list[list[float]]:
        """[L][E]: (token, pick) counts of trace tokens ``[start, stop)``."""
        flat, n = self.range_sum(self._load_prefix, start, stop), self.num_experts
        return [flat[i * n : (i + 1) * n] for i in range(self.num_layers)]

    def pairs(self, start: float, stop: float) -> list[list[list[float]]]:
        """[L][E][E]: pick pairs of trace tokens ``[start, stop)`` per layer pair (``window_pairs``:
        pair ``L - 1`` is the independent wrap)."""
        flat, n = self.range_sum(self._pair_prefix, start, stop), self.num_experts
        return [[flat[(i * n + a) * n : (i * n + a + 1) * n] for a in range(n)]
                for i in range(self.num_layers)]  # fmt: skip


def _prefix(rows: list[list[float]]) -> list[list[float]]:
    out = [[0.0] * len(rows[0])]
    for r in rows:
        out.append([a + b for a, b in zip(out[-1], r, strict=True)])
    return out


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
    trace: RoutingTrace | None = None  # recorded routing instead of the Zipf model (and drift)
    affinity: bool = False  # EPLB with inter-layer affinity (colocated_placement; a trace's)
    affinity_slack: float = 0.1  # ... giving up at most this share of a rank's fair load
    a2a_handoff: bool = False  # the all-to-all pays only picks whose next expert is elsewhere

    def __post_init__(self) -> None:
        tr = self.trace
        if tr is not None and (tr.num_experts, tr.top_k) != (self.num_experts, self.top_k):
            raise ValueError(
                f"the trace routes top-{tr.top_k} of {tr.num_experts} experts, not "
                f"top_k={self.top_k} of num_experts={self.num_experts}"
            )
        if self.affinity and (tr is None or not self.eplb):
            raise ValueError("affinity=True needs a trace (its transitions) and eplb=True")
        if self.a2a_handoff and tr is None:
            raise ValueError("a2a_handoff=True needs a trace (which experts follow which)")

    def a2a_s(self, max_rows: float, off_rank: float | None = None) -> float:
        """One layer's dispatch + combine for the busiest sender's ``max_rows`` tokens, of whose
        picks ``off_rank`` leave the rank (default ``(R - 1) / R``: routing spread evenly)."""
        if self.ranks == 1:
            return 0.0
        share = (self.ranks - 1) / self.ranks if off_rank is None else off_rank
        out = max_rows * self.top_k * share
        return 2 * (
            self.a2a_latency_s + out * self.hidden * self.bytes_per_value / self.a2a_gbps / 1e9
        )


class ExpertState:
    """Routing (synthetic or a trace), the placement in force and its per-layer busiest-rank
    share, drift and EPLB re-placement over time; ``block_time`` prices the experts of a
    simulated layer (module docstring)."""

    def __init__(self, ep: ExpertParallel, layers_per_block: int) -> None:
        self.ep, self.g = ep, layers_per_block
        if ep.num_layers % layers_per_block:
            raise ValueError("layers_per_block must divide num_layers")
        self.slots = ep.num_experts // ep.ranks + (ep.redundant_per_rank if ep.eplb else 0)
        self.steps = 0
        self.migrations = 0
        self.migrated = 0.0  # slots moved, in full placements
        self.balance_num = self.balance_den = 0.0
        self.stay_num = self.stay_den = 0.0
        self.trace = ep.trace
        if self.trace is not None:
            self._init_trace()
            return
        self.rng = random.Random(ep.seed)
        self.p = [zipf_popularity(ep.num_experts, ep.skew, self.rng) for _ in range(ep.num_layers)]
        self.epochs: list[tuple[int, list[list[float]]]] = [(0, self.p)]  # (start step, p)
        self.next_drift = ep.drift_s
        # offline counts (the routing profile at the start) give EPLB its first placement
        self.placement = [self._place(p) for p in self.p]
        self._refresh()

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
        if self.trace is not None:
            hot, a2a = self._trace_block(block, rows, max_rows)
        else:
            hot, a2a = self.block_hot[block], self.g * self.ep.a2a_s(max_rows)
        self.balance_num += rows * hot * self.ep.ranks
        self.balance_den += rows
        t = ep_expert_time(expert_base, expert_per_row, self.slots / self.ep.num_experts, rows, hot)
        return t + a2a

    @property
    def rank_balance(self) -> float:
        """Token-weighted busiest / mean rank load (1.0 = perfectly balanced)."""
        return self.balance_num / self.balance_den if self.balance_den else 1.0

    @property
    def stay_share(self) -> float | None:
        """Trace mode: the token-weighted share of consecutive-layer pick pairs whose experts
        share a rank (what ``a2a_handoff`` saves); None with synthetic routing."""
        if self.trace is None:
            return None
        return self.stay_num / self.stay_den if self.stay_den else 0.0

    def tick(self, now: float) -> float:
        """One lockstep step has ended at ``now``: drift, and EPLB re-placement when due.
        Returns the stall it costs (migration), in seconds."""
        self.steps += 1
        if self.trace is not None:
            self.positions.append(self.cursor[0])
        else:
            while now >= self.next_drift:
                self.next_drift += self.ep.drift_s
                self._drift()
        if not self.ep.eplb or self.steps % self.ep.rebalance_steps:
            return 0.0
        if self.trace is not None:
            lo, hi = self.positions[0], self.positions[-1]
            if hi <= lo:  # nothing routed in the window: nothing to fit
                return 0.0
            new = self._place_layers(*self._trace_window(lo, hi))
        else:
            new = [self._place(x) for x in self._window_loads()]
        moved = sum(changed_slots(a, b) for a, b in zip(self.placement, new, strict=True))
        moved /= len(new)
        self.placement = new
        if self.trace is not None:
            self._refresh_stay()
        else:
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

    # -- trace mode ----------------------------------------------------------------------------

    def _init_trace(self) -> None:
        ep, tr = self.ep, self.trace
        self.layer_of = [layer % tr.num_layers for layer in range(ep.num_layers)]
        self.cursor = [0.0] * (ep.num_layers // self.g)  # trace tokens routed per block
        # the first block's cursor at the end of each of the last window_steps steps
        self.positions: collections.deque[float] = collections.deque(
            [0.0], maxlen=ep.window_steps + 1
        )
        self._stay_prefixes: dict[tuple, list[list[float]]] = {}
        # the whole trace's counts are the offline profile EPLB first places by
        self.placement = self._place_layers(*self._trace_window(0, tr.tokens))
        self._refresh_stay()

    def _trace_window(
        self, start: float, stop: float
    ) -> tuple[list[list[float]], list[list[list[float]]]]:
        """Real layers' loads [L][E] and real layer pairs' transitions [L-1][E][E] over trace
        tokens ``[start, stop)`` (real layer ``l`` replays trace layer ``l % L_trace``)."""
        loads, pairs = self.trace.loads(start, stop), self.trace.pairs(start, stop)
        n = self.ep.num_layers
        return [loads[i] for i in self.layer_of], [pairs[i] for i in self.layer_of[: n - 1]]

    def _place_layers(
        self, loads: list[list[float]], pairs: list[list[list[float]]]
    ) -> list[Placement]:
        ep = self.ep
        if ep.affinity:
            return colocated_placement(loads, pairs, ep.ranks, self.slots, ep.affinity_slack)
        return [self._place(x) for x in loads]

    def _refresh_stay(self) -> None:
        """Per real layer pair, prefix sums over the trace's windows of its pick pairs that
        stay on one rank under the placement in force (shared by identical pairs)."""
        out = []
        for layer in range(self.ep.num_layers - 1):
            a, b = self.placement[layer], self.placement[layer + 1]
            key = (self.layer_of[layer], tuple(map(tuple, a)), tuple(map(tuple, b)))
            prefix = self._stay_prefixes.get(key)
            if prefix is None:
                same = same_rank(a, b, self.ep.num_experts)
                prefix = self.trace.weighted_prefix(key[0], [x for row in same for x in row])
                self._stay_prefixes[key] = prefix
            out.append(prefix)
        self.stay_prefix = out

    def _trace_block(self, block: int, rows: float, max_rows: float) -> tuple[float, float]:
        """(mean busiest-rank share, all-to-all seconds) of block ``block``'s real layers for
        the next ``rows`` trace tokens, advancing the block's cursor past them."""
        ep, tr = self.ep, self.trace
        start = self.cursor[block]
        stop = self.cursor[block] = start + rows
        loads = tr.loads(start, stop)
        pairs_per_token = tr.top_k**2
        hot = a2a = stay_sum = 0.0
        n_pairs = 0
        for layer in range(block * self.g, (block + 1) * self.g):
            w = loads[self.layer_of[layer]]
            total = sum(w)
            hot += max(rank_shares(self.placement[layer], w)) / total if total else 1 / ep.ranks
            off = None
            if layer + 1 < ep.num_layers and rows > 0:
                s = tr.range_sum(self.stay_prefix[layer], start, stop)[0]
                stay = s / (pairs_per_token * rows)
                stay_sum += stay
                n_pairs += 1
                if ep.a2a_handoff:
                    off = 1.0 - stay
            a2a += ep.a2a_s(max_rows, off)
        if n_pairs:
            self.stay_num += rows * stay_sum / n_pairs
            self.stay_den += rows
        return hot / self.g, a2a
