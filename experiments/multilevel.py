"""Multi-level scheduling in the N-engine simulator: request, engine and expert levels, alone and
together, against a vLLM-like baseline and the production routers.

Reimplements the experiment of "Multi-Layer Scheduling for MoE-Based LLM Reasoning" (arXiv
2602.21626; what is known of it: ../shared/multilevel-paper.md) on
``qllm_jax.scheduler.multisim``: N data-parallel replicas (each this project's ``Scheduler``
over the fake executor) that are also the N ranks of one expert-parallel group, stepping in
lockstep, behind a dispatch policy (``qllm_jax.scheduler.dispatch``). Nothing here is measured
on a GPU: the costs are a cost model of Qwen3-30B-A3B on A100s (``QWEN3_A100``), and the
all-to-all bandwidth and the migration time are parameters (swept in ``--sensitivity``).

Arms (``ARMS``): ``baseline`` (FCFS inside each engine, round-robin dispatch, static expert
placement: stock vLLM DP+EP as the paper ran it); each level alone: ``request`` (SJF by prefill
tokens with aging after 5 s), ``engine`` (the paper's dispatcher), ``expert`` (EPLB placement);
``multilevel`` (all three); ``multilevel-ls`` (all three, with LS/BE classes, in-pass preemption
between layers and our class-aware dispatcher); the production routers over the baseline's
engines: ``vllm``, ``pow2``, ``cache-aware``, ``llmd``.

Workloads (``WORKLOADS``, all seeded; every unknown a constant below): five BurstGPT-like
length shapes with bursty (Gamma) arrivals, and ShareGPT-like multi-turn sessions with user ids
and shared system prompts. A configuration is (workload, N, load, all-to-all bandwidth); the load
is 70 / 85 / 100 % of that (workload, N, bandwidth)'s capacity, measured as the baseline's
saturated throughput (``CAPACITY_BURST`` requests per replica arriving at once; finishes per
second between the ``CAPACITY_WINDOW`` quantiles of their finish times). A run is
``REQUESTS_PER_REPLICA`` requests per replica. Each configuration runs ``--seeds`` seeds; per
arm, the mean over seeds of mean TTFT (and its queueing part), p99 TTFT, mean TPOT and
throughput, with a 95 % bootstrap interval over seeds.

Trace mode (``--routing trace[:PATH]``, "trace mode" below): the expert loads come from a
routing trace recorded on the real engine (``--record-trace``: the built-in model, Mixtral-
shaped, on this repository's text) instead of the Zipf model, at that shape (8 experts, top-2)
with Mixtral-8x7B's layers and A100 costs (``MODELS["mixtral"]``); arms ``TRACE_STUDY_ARMS``
(EPLB variants and inter-layer-affinity placement), N in 2, 4, 8, two all-to-all pricings.

    python experiments/multilevel.py                  # the grid: 108 configs x 5 seeds
    python experiments/multilevel.py --quick          # tiny: a smoke run (seconds)
    python experiments/multilevel.py --sensitivity    # the unknowns, one at a time
    python experiments/multilevel.py --record-trace   # the routing trace (jax; ~10 s)
    python experiments/multilevel.py --routing trace  # the trace study: 24 configs x 3 seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

from qllm_jax.scheduler import SchedulerConfig, segment_layout  # noqa: E402
from qllm_jax.scheduler.dispatch import DEFAULT_STALENESS_S, make_policy  # noqa: E402
from qllm_jax.scheduler.experts import (  # noqa: E402
    ExpertParallel,
    RoutingTrace,
    colocated_placement,
    eplb_placement,
    imbalance,
    pair_stay_share,
    static_placement,
)
from qllm_jax.scheduler.metrics import bootstrap_ci, mean, percentile  # noqa: E402
from qllm_jax.scheduler.multisim import MultiSimulator  # noqa: E402
from qllm_jax.scheduler.simulator import (  # noqa: E402
    MIXTRAL_A100_EFFICIENT,
    CostModel,
    make_request,
)

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

# -- the model and its costs -------------------------------------------------------------------
#
# Qwen3-30B-A3B (the paper's model): 48 layers, 128 experts, top-8, hidden 2048, 32 query / 4 KV
# heads of 128, vocab 151936. Per layer: attention 18.9M params, experts 128 x 3 x 2048 x 768 =
# 604M params (a token uses 8/128). A100: bf16, ~1.8 TB/s achieved, ~156 TFLOP/s (50 % of peak).
# Per layer: attention weights 37.8 MB -> ~25 us; 2 x 18.9M FLOP = 0.24 us per row; K and V 2 KB
# per context token -> 1.1 ns. Experts: all 1.21 GB read when hit -> 0.67 ms on one device;
# 2 x 37.7M FLOP = 0.48 us per row. Head: 622 MB -> 0.35 ms, 4 us per sampled row.
# The simulator's "layer" is a block of LAYERS_PER_BLOCK real layers (8 blocks): preemption
# happens between blocks, and the scheduler makes 8x fewer decisions than at 48 layers, which is
# what makes the grid fit in ~30 minutes on 2 cores. Expert costs and all-to-alls are still
# priced per real layer (experts.ExpertState).
NUM_LAYERS, NUM_EXPERTS, TOP_K, HIDDEN = 48, 128, 8, 2048
LAYERS_PER_BLOCK = 6
G = LAYERS_PER_BLOCK
QWEN3_A100 = CostModel(
    name="qwen3-30b-a3b-a100-block6",
    attn_base=G * 25e-6,
    attn_per_row=G * 0.24e-6,
    attn_per_ctx=G * 1.1e-9,
    expert_base=G * 0.67e-3,
    expert_per_row=G * 0.48e-6,
    head_base=0.35e-3,
    head_per_row=4e-6,
    segment_overhead=5e-6,
    embed_base=10e-6,
    host_overhead=10e-6,
)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What ``run_arm`` simulates: the MoE shape, its cost model per simulated layer (a block of
    ``layers_per_block`` real layers) and how many real layers ``ExpertState`` prices per
    simulated one (``ep_layers_per_block``)."""

    num_layers: int
    num_experts: int
    top_k: int
    hidden: int
    layers_per_block: int
    cost: CostModel
    ep_layers_per_block: int


def block_cost(cost: CostModel, g: int) -> CostModel:
    """``cost`` (per real layer) for a simulated layer of ``g`` real layers: the per-layer
    terms times ``g``; the head, overheads and embedding as they are."""
    per_layer = ("attn_base", "attn_per_row", "attn_per_ctx", "attn_per_row_ctx",
                 "attn_per_row_sq", "expert_base", "expert_per_row", "shared_base",
                 "shared_per_row")  # fmt: skip
    return dataclasses.replace(
        cost, name=f"{cost.name}-block{g}", **{k: g * getattr(cost, k) for k in per_layer}
    )


MODELS = {
    # each simulated block of G real layers pays G all-to-alls at the mean balance of its real
    # layers (the grid before 2026-12-02 ran with 1 here: one all-to-all per block, the balance
    # of real layers 0-7 only, which under-priced the expert level at every N)
    "qwen3": ModelShape(NUM_LAYERS, NUM_EXPERTS, TOP_K, HIDDEN, G, QWEN3_A100, G),
    # the routing trace's shape (the built-in model is Mixtral-shaped: 8 experts, top-2) at
    # Mixtral-8x7B's size on A100s: 32 layers, hidden 4096, blocks of 4 real layers
    "mixtral": ModelShape(32, 8, 2, 4096, 4, block_cost(MIXTRAL_A100_EFFICIENT, 4), 4),
}
ENGINE = dict(
    max_batch_size=32,
    max_num_batched_tokens=2048,
    prefill_chunk=512,  # chunked prefill, as vLLM's
    page_size=16,
)
# KV room per replica: our choice, small enough that KV use varies (what the paper's
# dispatcher reads) and that admission (which reserves prompt + max_tokens) can block: 16k
# tokens (1024 pages of 16). An A100 would hold far more; with that much room nothing queues
# at these loads and only prefix hits separate the arms.
KV_TOKENS = 16384
MAX_MODEL_LEN = 4096

# -- the unknowns, each set here (``--sensitivity`` varies them) ---------------------------------
EP_DEFAULTS = dict(
    skew=0.5,  # routing Zipf exponent: hottest of 128 experts ~6x the mean load
    drift_s=20.0,  # hot experts move every 20 s ...
    drift_fraction=0.25,  # ... among a quarter of each layer's experts
    a2a_gbps=100.0,  # all-to-all bandwidth per rank (not measured: swept 25-400)
    a2a_latency_s=20e-6,
    redundant_per_rank=1,  # EPLB's redundant slots per rank
    rebalance_steps=3000,  # vLLM's EPLB step interval (paper A: every 3000 steps too)
    window_steps=1000,
    migration_s=0.72,  # per full re-placement (paper B's 0.72 s; swept 0.1-3)
)
AGE_AFTER_S = 5.0  # paper A's aging threshold
QUEUED_S = 0.1  # a request "queued" if its first pass started this long after its arrival
# (a lockstep step is 10-20 ms decoding, ~0.15 s with full prefill chunks)
LS_FRACTION = 0.2  # share of LS requests (ShareGPT: LS sessions)

ARMS: dict[str, dict] = {
    "baseline": dict(order="fcfs", dispatch="round_robin", eplb=False),
    "request": dict(order="sjf", dispatch="round_robin", eplb=False),
    "engine": dict(order="fcfs", dispatch="dplb", eplb=False),
    "expert": dict(order="fcfs", dispatch="round_robin", eplb=True),
    "multilevel": dict(order="sjf", dispatch="dplb", eplb=True),
    # qllm with LS passes topped up with BE rows (mix_classes): with one class per pass, each
    # class's passes pay the experts' weight reads separately, which halves throughput here
    "multilevel-ls": dict(order="sjf", dispatch="ours", eplb=True, classes=True),
    # the classes without in-pass preemption: iteration-level priority (LS rows first)
    "multilevel-prio": dict(
        order="sjf", dispatch="ours", eplb=True, classes=True, policy="priority"
    ),  # fmt: skip
    "vllm": dict(order="fcfs", dispatch="vllm_balancer", eplb=False),
    "pow2": dict(order="fcfs", dispatch="power_of_two", eplb=False),
    "cache-aware": dict(order="fcfs", dispatch="cache_aware", eplb=False),
    "llmd": dict(order="fcfs", dispatch="llmd", eplb=False),
}
ROUTERS = ("vllm", "pow2", "cache-aware", "llmd")
# trace mode (--routing trace) only: EPLB with inter-layer affinity (colocated_placement), and
# EPLB variants whose expert-parallel overrides ("ep") set what the others leave at EP_DEFAULTS
_EXPERT = dict(order="fcfs", dispatch="round_robin", eplb=True)
TRACE_ARMS: dict[str, dict] = {
    "expert-affinity": _EXPERT | dict(affinity=True),
    "multilevel-affinity": dict(order="sjf", dispatch="dplb", eplb=True, affinity=True),
    # no redundant slots: no extra weights to read, but at N = E nothing to move either
    "expert-r0": _EXPERT | dict(ep=dict(redundant_per_rank=0)),
    "multilevel-r0": dict(order="sjf", dispatch="dplb", eplb=True, ep=dict(redundant_per_rank=0)),
    # re-placed every 100 steps from the last 100 (runs here last ~1-3k steps: at vLLM's
    # 3000 the first placement, fitted to the whole trace, stays): following the text's drift
    "expert-replace": _EXPERT | dict(ep=dict(rebalance_steps=100, window_steps=100)),
}
TRACE_STUDY_ARMS = ("baseline", "expert", "expert-r0", "expert-replace", "expert-affinity",
                    "multilevel", "multilevel-r0", "multilevel-affinity")  # fmt: skip
TRACE_SEEDS = 3

# -- workloads ----------------------------------------------------------------------------------
#
# BurstGPT (Wang et al., arXiv 2401.17644): Zipf-distributed request lengths, Gamma-distributed
# (bursty) arrivals; responses weakly tied to requests. Paper A reshapes BurstGPT's token counts
# into five distributions it names but does not define; ours, for prompt and (independently)
# output length, as a variable u in [0, 1] mapped log-uniformly onto [lo, hi]:
#   random      BurstGPT as is: P(n) ~ n^-ZIPF_S on [lo, hi] (mostly short, a long tail)
#   central     u ~ Beta(5, 5): lengths bunched around the geometric middle
#   descending  u ~ Beta(1, 3): density falling with length (short-heavy, a thinner tail)
#   two-end     u ~ Beta(0.3, 0.3): short and long, few in between
#   average     u ~ Uniform(0, 1): every length scale equally likely
PROMPT_RANGE, OUTPUT_RANGE = (32, 2048), (8, 512)
ZIPF_S = 1.1
BURST_GAMMA_SHAPE = 0.25  # inter-arrival Gamma shape: coefficient of variation 2 (ours)
BURST_USERS = 64  # users, Zipf(1)-popular; each has its own 32-token prefix (persona)
USER_PREFIX = 32
SHAPES = {
    "random": None,
    "central": (5.0, 5.0),
    "descending": (1.0, 3.0),
    "two-end": (0.3, 0.3),
    "average": (1.0, 1.0),
}
# ShareGPT-like sessions: a session is one user; SYSTEM_PROMPTS shared system prompts of
# SYSTEM_LEN tokens (Zipf(1)-popular); 1-5 turns; each turn's prompt is the whole history plus a
# new user message (lognormal, mean 64) and asks for a lognormal (mean 160) answer; turns THINK
# mean seconds apart (exponential) in unit time, sessions starting as a Poisson process.
SYSTEM_PROMPTS, SYSTEM_LEN = 8, 512
TURNS, USER_MEAN, ANSWER_MEAN, THINK_MEAN = (1, 5), 64.0, 160.0, 8.0
WORKLOADS = [*(f"burst-{s}" for s in SHAPES), "sharegpt"]
LOADS = (0.70, 0.85, 1.00)
# capacity: the baseline's saturated throughput. CAPACITY_BURST requests per replica arrive at
# once (4 full batches each, so every replica's queue stays non-empty through the window), and
# capacity is the finishes between the CAPACITY_WINDOW quantiles of the finish times over that
# time: the start-up (batches filling) and the drain (batches emptying) do not count.
CAPACITY_BURST = 4 * 32
CAPACITY_WINDOW = (0.1, 0.5)
REPLICAS = (2, 4, 8, 16)
# all-to-all bandwidth per rank is a grid dimension too (GB/s): PCIe-class and NVLink-class
# (an A100 pair over NVLink has far more; the 400 GB/s point is in --sensitivity)
A2A_GRID = (25.0, 100.0)
# ... but the 25 GB/s point only at these N: N=8 and 16 twice would not fit the grid's ~30
# minutes on 2 cores (the sensitivity sweep varies the bandwidth at N=4). 108 configurations.
A2A_LOW_REPLICAS = (2, 4)


@dataclasses.dataclass(frozen=True)
class Item:
    request_id: str
    arrival: float  # in unit time (rate 1 request/s); scaled by 1/rate
    prompt: tuple[int, ...]
    output_len: int
    priority: int  # 0 LS, 1 BE
    user: str


def _zipf_int(rng: random.Random, lo: int, hi: int, s: float) -> int:
    # inverse CDF of the continuous power law on [lo, hi + 1), floored
    a = 1.0 - s
    u = rng.random()
    x = (lo**a + u * ((hi + 1) ** a - lo**a)) ** (1 / a)
    return min(hi, int(x))


def shaped_length(rng: random.Random, shape: str, lo: int, hi: int) -> int:
    if SHAPES[shape] is None:
        return _zipf_int(rng, lo, hi, ZIPF_S)
    u = rng.betavariate(*SHAPES[shape])
    return max(lo, min(hi, round(lo * (hi / lo) ** u)))


def _lognormal_int(rng: random.Random, m: float, lo: int, hi: int, sigma: float = 0.8) -> int:
    return max(lo, min(hi, int(rng.lognormvariate(math.log(m) - sigma**2 / 2, sigma))))


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 60_000) for _ in range(n)]


def burst_workload(shape: str, n: int, seed: int) -> list[Item]:
    rng = random.Random(f"burst-{shape}-{seed}")
    personas = [_tokens(rng, USER_PREFIX) for _ in range(BURST_USERS)]
    weights = [1 / (u + 1) for u in range(BURST_USERS)]
    ls = set(rng.sample(range(n), round(n * LS_FRACTION)))
    t, items = 0.0, []
    for i in range(n):
        t += rng.gammavariate(BURST_GAMMA_SHAPE, 1 / BURST_GAMMA_SHAPE)  # mean 1
        u = rng.choices(range(BURST_USERS), weights)[0]
        p = shaped_length(rng, shape, *PROMPT_RANGE)
        o = shaped_length(rng, shape, *OUTPUT_RANGE)
        prompt = (personas[u] + _tokens(rng, max(1, p - USER_PREFIX)))[:p]
        items.append(Item(f"r{i}", t, tuple(prompt), o, 0 if i in ls else 1, f"u{u}"))
    return items


def sharegpt_workload(n: int, seed: int) -> list[Item]:
    """Sessions until ``n`` requests; a turn's prompt holds the previous turn's prompt and
    answer (the simulator's sampled tokens are all ``FAKE_TOKEN``: the answer is that many)."""
    from qllm_jax.scheduler.simulator import FAKE_TOKEN

    rng = random.Random(f"sharegpt-{seed}")
    systems = [_tokens(rng, SYSTEM_LEN) for _ in range(SYSTEM_PROMPTS)]
    weights = [1 / (k + 1) for k in range(SYSTEM_PROMPTS)]
    items, start, s = [], 0.0, 0
    while len(items) < n:
        start += rng.expovariate(1 / 3.0)  # sessions begin 3 unit-seconds apart on average
        history = list(rng.choices(systems, weights)[0])
        prio = 0 if rng.random() < LS_FRACTION else 1
        t = start
        for turn in range(rng.randint(*TURNS)):
            msg = _tokens(rng, _lognormal_int(rng, USER_MEAN, 4, 512))
            prompt = history + msg
            out = _lognormal_int(rng, ANSWER_MEAN, 8, 512)
            if len(prompt) + out > MAX_MODEL_LEN or len(items) >= n:
                break
            items.append(Item(f"s{s}t{turn}", t, tuple(prompt), out, prio, f"s{s}"))
            history = prompt + [FAKE_TOKEN] * out
            t += rng.expovariate(1 / THINK_MEAN)
        s += 1
    items.sort(key=lambda it: it.arrival)
    # renormalise to mean unit gap, so "rate" means requests per second
    scale = (len(items) - 1) / (items[-1].arrival - items[0].arrival) if len(items) > 1 else 1
    return [
        dataclasses.replace(it, arrival=(it.arrival - items[0].arrival) * scale) for it in items
    ]


def make_items(workload: str, n: int, seed: int) -> list[Item]:
    if workload == "sharegpt":
        return sharegpt_workload(n, seed)
    return burst_workload(workload.removeprefix("burst-"), n, seed)


# -- one run ------------------------------------------------------------------------------------


def run_arm(
    arm: str,
    items: list[Item],
    rate: float | None,
    n_replicas: int,
    seed: int,
    ep_overrides: dict | None = None,
    arm_overrides: dict | None = None,
    model: str = "qwen3",
) -> dict:
    """One arm on one workload at ``rate`` requests/s (None: all at once). The numbers of
    the issue's JSON shape plus what explains them. ``model``: a ``MODELS`` shape;
    ``ep_overrides["trace"]``: a routing trace file's path (trace mode)."""
    spec = (ARMS | TRACE_ARMS)[arm] | (arm_overrides or {})
    shape = MODELS[model]
    classes = spec.get("classes", False)
    sched = dict(ENGINE)
    if classes and spec.get("policy", "qllm") == "qllm":
        sched |= dict(policy="qllm", granularity="layer", mix_classes=True)
    else:
        sched |= dict(policy="priority")
    if spec["order"] == "sjf":
        sched |= dict(queue_order="sjf", age_after_s=spec.get("age_after_s", AGE_AFTER_S))
    else:
        sched |= dict(queue_order="fcfs", age_after_s=None)
    config = SchedulerConfig(
        num_pages=KV_TOKENS // ENGINE["page_size"] + 1, max_model_len=MAX_MODEL_LEN, **sched
    )
    g = shape.layers_per_block
    segments = segment_layout(shape.num_layers // g, shape.num_experts, shape.num_experts, False)
    ep_o = EP_DEFAULTS | spec.get("ep", {}) | (ep_overrides or {})
    if "trace" in ep_o:
        ep_o["trace"] = load_trace(ep_o["trace"])
    ep = ExpertParallel(
        num_layers=shape.num_layers,
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        hidden=shape.hidden,
        ranks=n_replicas,
        eplb=spec["eplb"],
        seed=seed,
        affinity=spec.get("affinity", False),
        **ep_o,
    )
    policy = make_policy(spec["dispatch"], seed=seed, **spec.get("dispatch_options", {}))
    staleness = spec.get("staleness_s", DEFAULT_STALENESS_S[spec["dispatch"]])
    sim = MultiSimulator(
        n_replicas, config, segments, shape.cost, policy, staleness, ep,
        shape.ep_layers_per_block, check_kv=False,
    )  # fmt: skip
    events = []
    for k, it in enumerate(items):
        t = it.arrival / rate if rate else 0.0
        prio = it.priority if classes else 0
        req = make_request(it.request_id, k, len(it.prompt), it.output_len, prio, t,
                           list(it.prompt))  # fmt: skip
        events.append((t, req, it.user))
    res = sim.run(events)
    recs = list(res.records.values())
    ttft = [r.ttft for r in recs]
    tpot = [r.tpot for r in recs if r.tpot is not None]
    # TTFT = queueing (arrival to its first pass) + prefill (to the first token)
    queue = [res.started[r.request_id] - r.arrival for r in recs]
    ls_ids = {it.request_id for it in items if it.priority == 0}
    ls_ttft = [r.ttft for r in recs if r.request_id in ls_ids]
    span = max(r.finish for r in recs) - min(r.arrival for r in recs)
    finishes = sorted(r.finish for r in recs)
    capacity = saturated_throughput(finishes)
    # the estimate this script used before (explain()): until 80 % finished, from the start
    k = max(1, math.ceil(0.8 * len(finishes)))
    old_capacity = k / (finishes[k - 1] - min(r.arrival for r in recs))
    trace = {} if ep.trace is None else {"expert_stay_share": res.stats["expert_stay_share"]}
    return trace | {
        "ttft_mean_s": mean(ttft),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_mean_s": mean(tpot),
        "throughput_rps": len(recs) / span,
        "ls_ttft_mean_s": mean(ls_ttft),
        "queue_mean_s": mean(queue),
        "queued_share": sum(q > QUEUED_S for q in queue) / len(queue),
        "prefix_hit_rate": res.stats["prefix_cache_hit_rate"],
        "dispatch_imbalance": res.stats["dispatch_imbalance"],
        "expert_rank_balance": res.stats["expert_rank_balance"],
        "migrations": res.stats["migrations"],
        "migration_stall_s": res.stats["migration_stall_s"],
        "makespan_s": span,
        "capacity_rps": capacity,
        "old_capacity_rps": old_capacity,
    }


def saturated_throughput(finishes: list[float]) -> float:
    """Finishes per second between the ``CAPACITY_WINDOW`` quantiles of ``finishes`` (of a
    burst that keeps every replica's queue non-empty meanwhile: ``CAPACITY_BURST``)."""
    xs = sorted(finishes)
    lo, hi = (min(len(xs) - 1, int(q * len(xs))) for q in CAPACITY_WINDOW)
    if hi <= lo or xs[hi] <= xs[lo]:
        raise ValueError(f"too few finishes ({len(xs)}) to measure a saturated throughput")
    return (hi - lo) / (xs[hi] - xs[lo])


METRICS = (
    "ttft_mean_s", "ttft_p99_s", "tpot_mean_s", "throughput_rps", "ls_ttft_mean_s",
    "queue_mean_s", "queued_share",
    "prefix_hit_rate", "dispatch_imbalance", "expert_rank_balance",
)  # fmt: skip
TRACE_METRICS = ("expert_stay_share",)  # trace mode only


@functools.lru_cache(maxsize=4)
def load_trace(path: str) -> RoutingTrace:
    """A routing trace file, read once per worker."""
    return RoutingTrace.load(path)


@functools.lru_cache(maxsize=8)
def _shared_items(workload: str, n: int, seed: int) -> tuple[Item, ...]:
    """``make_items``, kept for the next runs of this worker: every arm and load of a
    (workload, N) runs the same requests of a seed, and drawing their tokens cost up to a
    tenth of a run. (Items are frozen; run_arm only reads them.) 8 workloads of 1024
    requests are ~0.25 GB."""
    return tuple(make_items(workload, n, seed))


def _job(args: tuple) -> tuple:
    key, arm, workload, n_req, rate, n, seed, ep_o, arm_o, *model = args  # model: optional
    items = list(_shared_items(workload, n_req, seed))
    return key, arm, seed, run_arm(arm, items, rate, n, seed, ep_o, arm_o, *model)


def requests_for(n_replicas: int, quick: bool) -> int:
    """Requests per run: REQUESTS_PER_REPLICA per replica."""
    return (6 if quick else REQUESTS_PER_REPLICA) * n_replicas


# Two full batches per replica (about 2-4 times the requests its KV room holds at once): a
# queue can only form once more requests are live than a replica has seats, so with fewer
# (this was 24, capped at 256 in all) nothing ever waits at any rate. The queues, and so what
# the request and engine levels can win, still grow with the run's length at 100 % load: the
# grid's time budget sets this number, not the model.
REQUESTS_PER_REPLICA = 64


def capacity_requests(n_replicas: int, quick: bool) -> int:
    """Requests of the capacity burst: enough to keep every replica's queue non-empty."""
    return (CAPACITY_BURST // 4 if quick else CAPACITY_BURST) * n_replicas


def _pool_map(jobs: list[tuple], workers: int, label: str) -> Iterator[tuple]:
    """``_job`` of each job, in order, as each is ready."""
    t0 = time.monotonic()
    if workers <= 1:
        it = map(_job, jobs)
    else:
        pool = ProcessPoolExecutor(workers)
        it = pool.map(_job, jobs, chunksize=1)
    for k, r in enumerate(it, 1):
        yield r
        if k % max(1, len(jobs) // 20) == 0 or k == len(jobs):
            print(f"  {label}: {k}/{len(jobs)} runs, {time.monotonic() - t0:.0f} s", flush=True)
    if workers > 1:
        pool.shutdown()


def measure_capacity(
    workloads, pairs, quick, seed, workers, model="qwen3", ep_extra=None, tag=""
) -> dict:
    """Requests/s the baseline sustains per (workload, N, all-to-all bandwidth): the seed's
    ``CAPACITY_BURST`` requests per replica arriving at once (``saturated_throughput``);
    ``pairs``: (N, bandwidth or None for the default). ``ep_extra``: more expert-parallel
    overrides (trace mode), ``tag`` ends their capacities' keys."""
    jobs = [
        ((w, n, bw), "baseline", w, capacity_requests(n, quick), None, n, seed,
         _ep_overrides(bw, ep_extra), None, model)
        for w in workloads
        for n, bw in pairs
    ]  # fmt: skip
    out = {}
    for (w, n, bw), _, _, r in _pool_map(jobs, workers, "capacity"):
        out[_cap_key(w, n, bw) + tag] = r["capacity_rps"]
    return out


def _ep_overrides(bw: float | None, extra: dict | None) -> dict | None:
    out = None if bw is None else {"a2a_gbps": bw}
    return out if not extra else (out or {}) | extra


def _cap_key(w: str, n: int, bw: float | None) -> str:
    return f"{w}/N{n}" + ("" if bw is None else f"/a2a{bw:g}")


def aggregate(per_seed: list[dict], boot_seed: int = 0) -> dict:
    """Per arm: each metric's mean over seeds and its 95 % bootstrap interval over seeds."""
    out = {}
    for m in METRICS + tuple(m for m in TRACE_METRICS if m in per_seed[0]):
        vals = [r[m] for r in per_seed if r[m] is not None and not math.isnan(r[m])]
        out[m] = mean(vals) if vals else math.nan
        out[f"{m}_ci95"] = list(bootstrap_ci(vals, mean, seed=boot_seed))
    out["seeds"] = len(per_seed)
    return out


def reductions(configs: list[dict], arm: str, ref: str = "baseline") -> dict:
    """Per-configuration reductions of ``arm`` against ``ref`` (1 - arm/ref, and throughput's
    ratio - 1), their medians and a 95 % bootstrap interval of each median over configs."""
    out = {}
    for m, sign in (("ttft_mean_s", 1), ("tpot_mean_s", 1), ("ttft_p99_s", 1),
                    ("throughput_rps", -1)):  # fmt: skip
        xs = []
        for c in configs:
            a, b = c["arms"].get(arm, {}).get(m), c["arms"].get(ref, {}).get(m)
            if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
                continue
            xs.append(1 - a / b if sign > 0 else a / b - 1)
        key = m.removesuffix("_s").removesuffix("_rps")
        out[f"{key}_median"] = statistics.median(xs) if xs else math.nan
        out[f"{key}_median_ci95"] = list(bootstrap_ci(xs, statistics.median, seed=1))
        out[f"{key}_all"] = xs
    return out


def run_grid(
    args, workloads, replicas, loads, arms, seeds, a2a, on_config=None,
    model="qwen3", ep_extra=None, tag="", extra_info=None,
) -> dict:  # fmt: skip
    """The grid, cheapest configurations (smallest N) first; ``on_config(grid so far)`` after
    each configuration whose every arm and seed has run (a run stopped early keeps those).
    ``model``, ``ep_extra`` (trace mode): as ``measure_capacity``; ``tag`` ends the
    configurations' names, ``extra_info`` joins their fields."""
    # every bandwidth at the N of A2A_LOW_REPLICAS, only the highest at the others
    pairs = [(n, bw) for n in sorted(replicas) for bw in a2a
             if bw == max(a2a) or n in args.a2a_low_replicas]  # fmt: skip
    planned = len(pairs) * len(workloads) * len(loads)
    cap: dict = {}
    configs: list[dict] = []
    for n in sorted(replicas):  # one N at a time: its capacities, then its configurations
        group = [(m, bw) for m, bw in pairs if m == n]
        cap |= measure_capacity(workloads, group, args.quick, args.seed, args.jobs, model,
                                ep_extra, tag)  # fmt: skip
        jobs, info = [], {}
        for _, bw in group:
            for w in workloads:
                for load in loads:
                    name = f"{w}/N{n}/load{round(load * 100)}/a2a{bw:g}{tag}"
                    rate = load * cap[_cap_key(w, n, bw) + tag]
                    info[name] = dict(workload=w, replicas=n, load=load, a2a_gbps=bw,
                                      rate_rps=rate) | (extra_info or {})  # fmt: skip
                    for arm in arms:
                        for s in seeds:
                            jobs.append((name, arm, w, requests_for(n, args.quick), rate, n,
                                         s, _ep_overrides(bw, ep_extra), None,
                                         model))  # fmt: skip
        results: dict = {}
        for name, arm, _seed, r in _pool_map(jobs, args.jobs, f"grid N={n}"):
            by_arm = results.setdefault(name, {})
            by_arm.setdefault(arm, []).append(r)
            if sum(map(len, by_arm.values())) == len(arms) * len(seeds):
                configs.append({"name": name, **info[name],
                                "arms": {a: aggregate(by_arm[a]) for a in arms}})  # fmt: skip
                if on_config is not None:
                    on_config({"capacity_rps": cap, "configs": configs, "planned": planned})
    return {"capacity_rps": cap, "configs": configs, "planned": planned}


SENSITIVITY: dict[str, list] = {
    # what varies -> its values (a dict: several knobs at once); each point re-runs SENS_ARMS
    # on SENS_CONFIG with everything else at its default
    "a2a_gbps": [25.0, 100.0, 400.0],
    # EPLB re-places every 3000 steps by default, more than a run here lasts: the migration
    # cost only shows with a shorter period
    "migration_s": [{"migration_s": v, "rebalance_steps": 100} for v in (0.1, 0.72, 3.0)],
    "rebalance_steps": [100, 300, 3000],
    "skew": [0.25, 0.5, 0.8],
    "drift_s": [5.0, 20.0, 1e9],
    "redundant_per_rank": [0, 1],
    "staleness_s": [0.0, 0.1, 1.0],
    "age_after_s": [1.0, 5.0],
    "load_imbalance": [1000, 3000, 10000],
}
SENS_ARMS = ("baseline", "engine", "expert", "multilevel", "llmd")
SENS_CONFIG = dict(workload="burst-random", replicas=4, load=0.85)


def _overrides(knob: str, v) -> tuple[dict, dict]:
    """(expert-parallel overrides, arm overrides) of one sensitivity point."""
    point = v if isinstance(v, dict) else {knob: v}
    ep_o = {k: x for k, x in point.items() if k in EP_DEFAULTS}
    arm_o = {k: x for k, x in point.items() if k not in EP_DEFAULTS}
    if "load_imbalance" in arm_o:
        arm_o = {"dispatch_options": {"load_imbalance": arm_o.pop("load_imbalance")}} | arm_o
    return ep_o, arm_o


def _label(v) -> str:
    return ",".join(f"{k}={x:g}" for k, x in v.items()) if isinstance(v, dict) else f"{v:g}"


def run_sensitivity(args, seeds) -> dict:
    w, n, load = SENS_CONFIG["workload"], SENS_CONFIG["replicas"], SENS_CONFIG["load"]
    cap = measure_capacity([w], [(n, None)], args.quick, args.seed, args.jobs)[_cap_key(w, n, None)]
    jobs = []
    for knob, values in SENSITIVITY.items():
        for v in values:
            ep_o, arm_o = _overrides(knob, v)
            for arm in SENS_ARMS:
                o = dict(arm_o)  # staleness_s, age_after_s: every arm (inert where unused)
                if "dispatch_options" in o and ARMS[arm]["dispatch"] != "dplb":
                    o.pop("dispatch_options")
                for s in seeds:
                    jobs.append(((knob, _label(v)), arm, w, requests_for(n, args.quick),
                                 load * cap, n, s, ep_o or None, o or None))  # fmt: skip
    res: dict = {}
    for (knob, v), arm, _, r in _pool_map(jobs, args.jobs, "sensitivity"):
        res.setdefault(knob, {}).setdefault(v, {}).setdefault(arm, []).append(r)
    out = {}
    for knob, by_v in res.items():
        out[knob] = {}
        for v, by_arm in by_v.items():
            arms = {arm: aggregate(rs) for arm, rs in by_arm.items()}
            base = arms["baseline"]
            out[knob][v] = {
                "arms": arms,
                "ttft_reduction": {
                    a: 1 - x["ttft_mean_s"] / base["ttft_mean_s"] for a, x in arms.items()
                },  # fmt: skip
                "tpot_reduction": {
                    a: 1 - x["tpot_mean_s"] / base["tpot_mean_s"] for a, x in arms.items()
                },  # fmt: skip
            }
    return {"config": SENS_CONFIG | {"rate_rps": load * cap}, "points": out}


def explain(workers: int, quick: bool) -> dict:
    """Evidence for where TTFT goes (burst-random, 100 GB/s, seed 0 unless said):

    - ``capacity``: per N, this script's capacity against the earlier estimate (the baseline
      on max(64, min(256, 24 N)) requests arriving at once, finishes per second until 80 % of
      them finished: fewer requests than the replicas have seats, so a drain rate);
    - ``rr_cv``: the coefficient of variation of one replica's inter-arrival times when
      round-robin deals it every N-th request (Gamma(0.25) arrivals: 2 / sqrt(N));
    - ``knee``: N=4 and 8, the baseline past 100 % load: where queues start;
    - ``run_length``: N=4 at 100 % load, seeds 0 and 1, runs of 32 to 128 requests per
      replica: how the queue, and what the levels win, grows with the run."""
    w, bw = "burst-random", {"a2a_gbps": EP_DEFAULTS["a2a_gbps"]}
    ns = (2, 4) if quick else REPLICAS
    old = {n: max(64, min(256, 24 * n)) for n in ns}
    jobs = [(("old", n), "baseline", w, old[n], None, n, 0, bw, None) for n in ns]
    jobs += [(("new", n), "baseline", w, capacity_requests(n, quick), None, n, 0, bw, None)
             for n in ns]  # fmt: skip
    cap: dict = {}
    for (kind, n), _, _, r in _pool_map(jobs, workers, "explain capacity"):
        if kind == "new":
            cap[n] = r["capacity_rps"]
        else:  # the earlier estimate, from its records' finish times as it computed it
            cap[("old", n)] = r["old_capacity_rps"]
    arrivals = [it.arrival for it in make_items(w, 4000, 0)]
    rr_cv = {}
    for n in (1, *ns):
        gaps = [b - a for a, b in zip(arrivals[::n], arrivals[n::n])]
        rr_cv[n] = statistics.pstdev(gaps) / statistics.mean(gaps)
    knee_loads = (1.0, 1.5) if quick else (0.85, 1.0, 1.2, 1.5)
    lengths = (8,) if quick else (32, 64, 128)
    arms = ("baseline", "request", "engine", "multilevel")
    jobs = [(("knee", n, x), "baseline", w, requests_for(n, quick), x * cap[n], n, 0, bw, None)
            for n in ns[1:3] for x in knee_loads]  # fmt: skip
    jobs += [(("length", k), a, w, 4 * k, cap[4], 4, s, bw, None)
             for k in lengths for a in arms for s in (0, 1)]  # fmt: skip
    knee: dict = {}
    runs: dict = {}
    keep = ("ttft_mean_s", "queue_mean_s", "queued_share", "tpot_mean_s", "capacity_rps")
    for key, arm, _, r in _pool_map(jobs, workers, "explain runs"):
        if key[0] == "knee":
            knee.setdefault(f"N{key[1]}", {})[f"{key[2]:g}"] = {m: r[m] for m in keep}
        else:
            runs.setdefault(key[1], {}).setdefault(arm, []).append(r)
    run_length = {
        f"{k}_per_replica": {
            a: {m: mean([r[m] for r in rs]) for m in keep[:4]} for a, rs in by_arm.items()
        }
        for k, by_arm in runs.items()
    }
    return {
        "capacity": {f"N{n}": {"now_rps": cap[n], "earlier_rps": cap[("old", n)]} for n in ns},
        "rr_cv": {f"N{n}": v for n, v in rr_cv.items()},
        "knee": knee,
        "run_length": run_length,
    }


# -- trace mode: the built-in model's routing on real text --------------------------------------
#
# ``--record-trace`` records the built-in model's own top-k picks (``qllm_jax.eplb.
# routing_trace``) on this repository's text (``eplb_bench.text_sequences``: its *.md files),
# TRACE_SEQUENCES sequences of TRACE_TOKENS tokens, one window of counts per sequence.
# ``--routing trace[:PATH]`` simulates the trace's shape (8 experts, top-2) at Mixtral-8x7B's
# size and costs (``MODELS["mixtral"]``) with the expert loads from the trace
# (``scheduler.experts.RoutingTrace``), under both all-to-all pricings: ``home`` (every token
# back to its rank between layers: vLLM's DP attention, placement saves no bytes) and
# ``handoff`` (only picks whose next-layer expert is on another rank travel: the premise of
# inter-layer affinity, an upper bound on what it could save).
TRACE_PATH = RESULTS / "routing-trace-builtin.json"
TRACE_SEQUENCES, TRACE_TOKENS = 256, 128
TRACE_WORKLOADS = ("burst-random", "sharegpt")
TRACE_REPLICAS = (2, 4, 8)  # N dividing the 8 experts
TRACE_LOADS = (0.85, 1.0)
TRACE_PRICINGS = ("home", "handoff")


def record_trace(
    path: Path, sequences: int = TRACE_SEQUENCES, length: int = TRACE_TOKENS
) -> RoutingTrace:
    """Record the built-in model's routing on real text into ``path`` (module section above).
    Imports jax and the model (nothing else in this script does)."""
    import hashlib

    import eplb_bench

    import qllm_jax
    from qllm_jax.eplb import routing_trace

    model = qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")
    seqs = eplb_bench.text_sequences(model, sequences, length)
    ids = [routing_trace(model, s).tolist() for s in seqs]  # each [L, T, k]
    source = {
        "model": "built-in (qllm_jax.builtin_model_dir()), float32",
        "text": "this repository's *.md files (experiments/eplb_bench.text_sequences)",
        "text_tokens_sha256": hashlib.sha256(str(seqs).encode()).hexdigest()[:16],
        "sequences": sequences,
        "tokens_per_sequence": length,
        "routing": "qllm_jax.eplb.routing_trace: the model's own top-k ids per token and layer",
        "recorded_by": "experiments/multilevel.py --record-trace",
    }
    trace = RoutingTrace.from_ids(ids, model.config.num_experts, length, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace.to_dict(), separators=(",", ":")) + "\n")
    return trace


def trace_placements(trace: RoutingTrace, replicas, slack: float) -> dict:
    """Per N, offline: static placement, EPLB and EPLB with inter-layer affinity (each without
    and with the arms' redundant slots), fitted on the trace's first half and judged on its
    second (held out): busiest / mean rank tokens (mean over the trace's layers) and the share
    of consecutive-layer pick pairs that stay on a rank."""
    half = trace.num_windows // 2 * trace.window_tokens
    n_pairs = trace.num_layers - 1  # recorded pairs only (not the independent wrap)
    fit_l, fit_p = trace.loads(0, half), trace.pairs(0, half)[:n_pairs]
    test_l, test_p = trace.loads(half, trace.tokens), trace.pairs(half, trace.tokens)[:n_pairs]
    e, out = trace.num_experts, {}
    for n in replicas:
        per = e // n
        variants = {"static": [static_placement(e, n)] * trace.num_layers}
        for extra in sorted({0, EP_DEFAULTS["redundant_per_rank"]}):
            variants[f"eplb_r{extra}"] = [eplb_placement(w, n, per + extra) for w in fit_l]
            variants[f"affinity_r{extra}"] = colocated_placement(fit_l, fit_p, n, per + extra,
                                                                 slack)  # fmt: skip
        out[f"N{n}"] = {
            v: {
                "max_over_mean": mean([imbalance(p, w) for p, w in zip(pls, test_l, strict=True)]),
                "stay_on_rank": pair_stay_share(pls, test_p),
            }
            for v, pls in variants.items()
        }
    return out


def run_trace_study(args, seeds: list[int], trace_path: Path, on_config=None) -> dict:
    """The trace-driven grid: per all-to-all pricing, ``run_grid`` at the Mixtral shape."""
    workloads = args.workloads or (["burst-random"] if args.quick else list(TRACE_WORKLOADS))
    replicas = args.replicas or ([2] if args.quick else list(TRACE_REPLICAS))
    loads = args.loads or ([0.85] if args.quick else list(TRACE_LOADS))
    a2a = args.a2a or [EP_DEFAULTS["a2a_gbps"]]
    out: dict = {"capacity_rps": {}, "configs": [], "planned": 0}
    for pricing in TRACE_PRICINGS:
        extra = {"trace": str(trace_path), "a2a_handoff": pricing == "handoff"}

        def saved(grid, done=out):
            if on_config is not None:
                on_config(_joined(done, grid))

        grid = run_grid(args, workloads, replicas, loads, args.arms, seeds, a2a, saved,
                        "mixtral", extra, f"/{pricing}", {"a2a_pricing": pricing})  # fmt: skip
        out = _joined(out, grid)
    return out


def _joined(a: dict, b: dict) -> dict:
    """Two grid parts as one: capacities, configurations and planned counts together."""
    return {
        "capacity_rps": a["capacity_rps"] | b["capacity_rps"],
        "configs": a["configs"] + b["configs"],
        "planned": a["planned"] + b["planned"],
    }


def trace_table(configs: list[dict], arms: list[str]) -> list[list[str]]:
    """Per configuration and arm: mean TTFT and TPOT (ms), busiest / mean rank tokens per
    step, and the share of pick pairs staying on a rank."""
    rows = [["config", "arm", "TTFT ms", "TPOT ms", "p99 TTFT ms", "rank balance", "stay"]]
    for c in configs:
        for a in arms:
            x = c["arms"][a]
            rows.append([c["name"], a, f"{x['ttft_mean_s'] * 1e3:.1f}",
                         f"{x['tpot_mean_s'] * 1e3:.2f}", f"{x['ttft_p99_s'] * 1e3:.0f}",
                         f"{x['expert_rank_balance']:.3f}",
                         f"{x['expert_stay_share']:.3f}"])  # fmt: skip
    return rows


def _trace_main(args, seeds: list[int], meta: dict, t0: float) -> dict:
    """``--routing trace[:PATH]``: the trace study, its JSON and its tables."""
    path = Path(args.routing.partition(":")[2] or TRACE_PATH)
    if not path.is_file():
        raise SystemExit(f"--routing {args.routing}: no trace at {path} (--record-trace)")
    trace = load_trace(str(path))
    shape = MODELS["mixtral"]
    meta = meta | {
        "model": dict(
            layers=shape.num_layers,
            experts=shape.num_experts,
            top_k=shape.top_k,
            hidden=shape.hidden,
            layers_per_block=shape.layers_per_block,
        ),  # fmt: skip
        "cost_model": shape.cost.to_dict(),
        "routing": {
            "trace": path.name,
            "window_tokens": trace.window_tokens,
            "windows": trace.num_windows,
            "trace_layers": trace.num_layers,
            "layer_rule": "real layer l replays trace layer l % trace_layers",
            "source": trace.source,
        },  # fmt: skip
        "ep_defaults": {
            k: v for k, v in EP_DEFAULTS.items() if k not in ("skew", "drift_s", "drift_fraction")
        },  # fmt: skip
        "affinity_slack": ExpertParallel.affinity_slack,
        "a2a_pricings": list(TRACE_PRICINGS),
        "note": "simulated (cost model of Mixtral-8x7B on A100s, lockstep DP+EP) with expert "
        "loads from the built-in model's routing on real text; the all-to-all bandwidth, its "
        "pricing and the migration time are parameters, not measurements",
    }
    placements = trace_placements(trace, args.replicas or TRACE_REPLICAS,
                                  ExpertParallel.affinity_slack)  # fmt: skip
    out = args.results_dir / ("multilevel-trace-sim" + ("-quick" if args.quick else "") + ".json")

    def save(grid: dict) -> dict:
        summary = {a: reductions(grid["configs"], a) for a in args.arms if a != "baseline"}
        by_pricing = {
            p: {a: reductions([c for c in grid["configs"] if c["a2a_pricing"] == p], a)
                for a in args.arms if a != "baseline"}
            for p in TRACE_PRICINGS
        }  # fmt: skip
        res = {"meta": meta, "placements_held_out": placements, **grid, "summary": summary,
               "summary_by_pricing": by_pricing}  # fmt: skip
        res["meta"] |= {"wall_s": time.monotonic() - t0, "configs": len(grid["configs"])}
        res["meta"]["complete"] = len(grid["configs"]) == grid["planned"]
        out.write_text(json.dumps(res, indent=1) + "\n")
        return res

    res = save(run_trace_study(args, seeds, path, save))
    print("held-out placement balance (busiest / mean rank tokens; stay on rank):")
    for n, vs in placements.items():
        print(f"  {n}: " + "  ".join(f"{v} {x['max_over_mean']:.3f} ({x['stay_on_rank']:.3f})"
                                     for v, x in vs.items()))  # fmt: skip
    print(h.format_table(trace_table(res["configs"], args.arms)))
    for p, summary in res["summary_by_pricing"].items():
        print(f"\nall-to-all pricing {p}, reductions vs baseline (median config):")
        print(h.format_table(summary_table(summary)))
    print(f"wrote {out}: {len(res['configs'])} configs x {len(seeds)} seeds, "
          f"{res['meta']['wall_s']:.0f} s")  # fmt: skip
    return res


# -- reporting ----------------------------------------------------------------------------------


def summary_table(summary: dict) -> list[list[str]]:
    rows = [["arm vs baseline", "mean TTFT -% [95% CI]", "mean TPOT -%", "p99 TTFT -%",
             "throughput +%", "configs better TTFT"]]  # fmt: skip
    pct = lambda x: "-" if math.isnan(x) else f"{x * 100:.1f}"  # noqa: E731

    def ci(d, k):
        lo, hi = d[f"{k}_median_ci95"]
        return f"{pct(d[f'{k}_median'])} [{pct(lo)}, {pct(hi)}]"

    for arm, d in summary.items():
        better = sum(x > 0 for x in d["ttft_mean_all"])
        n = len(d["ttft_mean_all"])
        rows.append([arm, ci(d, "ttft_mean"), ci(d, "tpot_mean"), pct(d["ttft_p99_median"]),
                     pct(d["throughput_median"]), f"{better}/{n}"])  # fmt: skip
    return rows


def markdown_report(res: dict, sens: dict | None = None) -> str:
    """The README's tables from a result file (and a sensitivity file)."""
    pct = lambda x: "-" if x is None or math.isnan(x) else f"{x * 100:+.1f}"  # noqa: E731
    lines = ["| arm | mean TTFT vs baseline, median config [95% CI] | mean TPOT | p99 TTFT "
             "| throughput | configs with lower mean TTFT | mean rank by mean TTFT |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    configs = res["configs"]
    arms = list(configs[0]["arms"])
    ranks = {a: [] for a in arms}
    for c in configs:
        order = sorted(arms, key=lambda a: c["arms"][a]["ttft_mean_s"])
        for i, a in enumerate(order):
            ranks[a].append(i + 1)
    for arm in arms:
        if arm == "baseline":
            lines.append(f"| baseline | 0 | 0 | 0 | 0 | - | {mean(ranks[arm]):.1f} |")
            continue
        d = res["summary"][arm]
        lo, hi = d["ttft_mean_median_ci95"]
        tlo, thi = d["tpot_mean_median_ci95"]
        lower = sum(x > 0 for x in d["ttft_mean_all"])
        lines.append(
            f"| {arm} | {pct(-d['ttft_mean_median'])} % [{pct(-hi)}, {pct(-lo)}] "
            f"| {pct(-d['tpot_mean_median'])} % [{pct(-thi)}, {pct(-tlo)}] "
            f"| {pct(-d['ttft_p99_median'])} % | {pct(d['throughput_median'])} % "
            f"| {lower}/{len(d['ttft_mean_all'])} | {mean(ranks[arm]):.1f} |"
        )
    out = "\n".join(lines)
    # multilevel's median TTFT / TPOT change by N, by workload and by bandwidth
    for key in ("replicas", "workload", "a2a_gbps", "load"):
        groups: dict = {}
        for c in configs:
            groups.setdefault(c[key], []).append(c)
        row = []
        for g, cs in groups.items():
            r = reductions(cs, "multilevel")
            row.append(f"{key}={g}: TTFT {pct(-r['ttft_mean_median'])} %, "
                       f"TPOT {pct(-r['tpot_mean_median'])} %")  # fmt: skip
        out += "\n\nmultilevel by " + key + ": " + "; ".join(row)
    out += "\n\n" + queueing_report(configs)
    if sens:
        out += "\n\n| unknown | value | " + " | ".join(
            f"{a}: TTFT / TPOT %" for a in SENS_ARMS if a != "baseline") + " |\n"  # fmt: skip
        out += "|---|---|" + "---|" * (len(SENS_ARMS) - 1)
        for knob, pts in sens["sensitivity"]["points"].items():
            for v, p in pts.items():
                cells = [f"{pct(-p['ttft_reduction'][a])} / {pct(-p['tpot_reduction'][a])}"
                         for a in SENS_ARMS if a != "baseline"]  # fmt: skip
                out += f"\n| {knob} | {v} | " + " | ".join(cells) + " |"
    return out


def best_routers(configs: list[dict]) -> dict[str, int]:
    """How many configurations each production router has the lowest mean TTFT of them in."""
    out: dict[str, int] = {}
    for c in configs:
        rs = {a: c["arms"][a]["ttft_mean_s"] for a in ROUTERS if a in c["arms"]}
        if rs:
            best = min(rs, key=rs.get)
            out[best] = out.get(best, 0) + 1
    return out


def queueing_report(configs: list[dict]) -> str:
    """Where the baseline's TTFT goes, by load and N: the median over configurations of its
    queueing share of mean TTFT and of the share of requests that queued (``QUEUED_S``), and
    the median TTFT change of ``request`` and ``multilevel`` in configurations where the
    baseline queued (share >= 10 %) and where it did not."""
    med = lambda xs: statistics.median(xs) if xs else math.nan  # noqa: E731
    rows = []
    for key in ("load", "replicas"):
        groups: dict = {}
        for c in configs:
            groups.setdefault(c[key], []).append(c["arms"]["baseline"])
        rows.append(f"baseline queueing by {key}: " + "; ".join(
            f"{key}={g}: {med([b['queue_mean_s'] / b['ttft_mean_s'] for b in bs]) * 100:.0f} % "
            f"of TTFT, {med([b['queued_share'] for b in bs]) * 100:.0f} % queued"
            for g, bs in groups.items()))  # fmt: skip
    queued = [c for c in configs if c["arms"]["baseline"]["queued_share"] >= 0.1]
    calm = [c for c in configs if c["arms"]["baseline"]["queued_share"] < 0.1]
    for arm in ("request", "engine", "multilevel"):
        parts = []
        for label, cs in (("baseline queued", queued), ("no queue", calm)):
            r = reductions(cs, arm) if cs else {"ttft_mean_median": math.nan}
            parts.append(f"{label} ({len(cs)} configs): TTFT {-r['ttft_mean_median'] * 100:+.1f} %")
        rows.append(f"{arm}: " + "; ".join(parts))
    return "\n\n".join(rows)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in res["summary"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "ttft_mean_all", "mean TTFT"),
                           (axes[1], "tpot_mean_all", "mean TPOT")):  # fmt: skip
        data = [[x * 100 for x in res["summary"][a][key]] for a in arms]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(arms) + 1), arms, rotation=45, ha="right")
        ax.axhline(0, color="grey", lw=0.8)
        target = 17.8 if key.startswith("ttft") else 13.3
        ax.axhline(target, color="red", ls="--", lw=0.8, label=f"target {target} %")
        ax.set_ylabel(f"reduction of {title} vs baseline, % (per configuration)")
        ax.set_title(f"{title}: {len(data[0])} configurations (each the mean over seeds)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _earlier_grid(path: Path, arms: list[str], seeds: list[int]) -> dict:
    """A grid result file to add to; refused unless it ran the same arms and seeds (its
    configurations and the new ones are then one grid)."""
    res = json.loads(path.read_text())
    got_arms = sorted(res["configs"][0]["arms"]) if res["configs"] else sorted(arms)
    if got_arms != sorted(arms) or res["meta"]["seeds"] != seeds:
        raise SystemExit(
            f"--merge {path}: it ran arms {got_arms} and seeds {res['meta']['seeds']}, "
            f"this run {sorted(arms)} and {seeds}"
        )
    return res


def _union(earlier: dict, grid: dict) -> dict:
    """``earlier``'s configurations and capacities with ``grid``'s (a configuration both hold
    is ``grid``'s); planned = the union's configurations plus what ``grid`` has yet to run."""
    names = {c["name"] for c in grid["configs"]}
    configs = [c for c in earlier["configs"] if c["name"] not in names] + grid["configs"]
    todo = grid["planned"] - len(grid["configs"])
    return {
        "capacity_rps": earlier["capacity_rps"] | grid["capacity_rps"],
        "configs": configs,
        "planned": len(configs) + todo,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny: 2 workloads, N 2, 1 load")
    ap.add_argument("--seed", type=int, default=0, help="the first seed")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per config (5; quick 1)")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--arms",
        nargs="+",
        default=None,
        choices=list(ARMS | TRACE_ARMS),
        help="default: every arm of ARMS (trace mode: TRACE_STUDY_ARMS)",
    )
    ap.add_argument(
        "--routing",
        default="synthetic",
        help="synthetic (the Zipf model: the grid) or trace[:PATH]: the trace study, expert "
        f"loads from a recorded routing trace (default {TRACE_PATH.name})",
    )
    ap.add_argument(
        "--record-trace",
        action="store_true",
        help="record the built-in model's routing on the repository's text first "
        "(needs jax; into --routing's PATH or the default)",
    )
    ap.add_argument("--workloads", nargs="+", default=None, choices=WORKLOADS)
    ap.add_argument("--replicas", type=int, nargs="+", default=None)
    ap.add_argument("--loads", type=float, nargs="+", default=None)
    ap.add_argument("--a2a", type=float, nargs="+", default=None, help="all-to-all GB/s")
    ap.add_argument(
        "--a2a-low-replicas",
        type=int,
        nargs="+",
        default=list(A2A_LOW_REPLICAS),
        help="the N that also run the bandwidths below the highest",
    )
    ap.add_argument("--sensitivity", action="store_true", help="sweep the unknowns instead")
    ap.add_argument("--explain", action="store_true", help="why queues form or not (explain())")
    ap.add_argument(
        "--report",
        type=Path,
        nargs="+",
        default=None,
        help="print the README tables of a result file (and a sensitivity file)",
    )
    ap.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="a grid result file whose configurations (and capacities) this run adds to, same "
        "arms and seeds: run only the missing N (--replicas) and write the union",
    )
    args = ap.parse_args(argv)
    if args.report:
        files = [json.loads(p.read_text()) for p in args.report]
        print(markdown_report(files[0], files[1] if len(files) > 1 else None))
        return {}
    trace_mode = args.routing == "trace" or args.routing.startswith("trace:")
    if args.routing != "synthetic" and not trace_mode:
        ap.error(f"--routing must be synthetic, trace or trace:PATH, got {args.routing!r}")
    if args.record_trace:
        path = Path(args.routing.partition(":")[2] or TRACE_PATH)
        trace = record_trace(path)
        print(f"wrote {path}: {trace.num_windows} windows of {trace.window_tokens} tokens")
        if not trace_mode:
            return {}
    args.arms = args.arms or list(TRACE_STUDY_ARMS if trace_mode else ARMS)
    if not trace_mode and set(args.arms) & set(TRACE_ARMS):
        ap.error(f"arms {sorted(set(args.arms) & set(TRACE_ARMS))} need --routing trace")
    if "baseline" not in args.arms:
        ap.error("the baseline arm is needed (every number is relative to it)")
    n_seeds = args.seeds or (1 if args.quick else TRACE_SEEDS if trace_mode else 5)
    seeds = list(range(args.seed, args.seed + n_seeds))
    t0 = time.monotonic()
    meta = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "jobs": args.jobs,
        "seeds": seeds,
        "quick": args.quick,
        "model": dict(
            layers=NUM_LAYERS,
            experts=NUM_EXPERTS,
            top_k=TOP_K,
            hidden=HIDDEN,
            layers_per_block=LAYERS_PER_BLOCK,
        ),  # fmt: skip
        "cost_model": QWEN3_A100.to_dict(),
        "engine": ENGINE | {"kv_tokens": KV_TOKENS, "max_model_len": MAX_MODEL_LEN},
        "ep_defaults": EP_DEFAULTS,
        "age_after_s": AGE_AFTER_S,
        "ls_fraction": LS_FRACTION,
        "staleness_s": DEFAULT_STALENESS_S,
        "workload": dict(
            prompt_range=PROMPT_RANGE,
            output_range=OUTPUT_RANGE,
            zipf_s=ZIPF_S,
            burst_gamma_shape=BURST_GAMMA_SHAPE,
            burst_users=BURST_USERS,
            user_prefix=USER_PREFIX,
            shapes={k: v for k, v in SHAPES.items()},
            system_prompts=SYSTEM_PROMPTS,
            system_len=SYSTEM_LEN,
            turns=TURNS,
            user_mean=USER_MEAN,
            answer_mean=ANSWER_MEAN,
            think_mean=THINK_MEAN,
        ),  # fmt: skip
        "requests": dict(
            per_replica=REQUESTS_PER_REPLICA,
            capacity_burst=CAPACITY_BURST,
            capacity_window=CAPACITY_WINDOW,
        ),  # fmt: skip
        "queued_s": QUEUED_S,
        "note": "simulated (cost model of Qwen3-30B-A3B on A100s, lockstep DP+EP); the "
        "all-to-all bandwidth and the migration time are parameters, not measurements",
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    if trace_mode:
        return _trace_main(args, seeds, meta, t0)
    if args.explain:
        res = {"meta": meta, "explain": explain(args.jobs, args.quick)}
        res["meta"]["wall_s"] = time.monotonic() - t0
        path = args.results_dir / ("multilevel-explain" + ("-quick" if args.quick else "")
                                   + ".json")  # fmt: skip
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(res["explain"], indent=1))
        return res
    if args.sensitivity:
        res = {"meta": meta, "sensitivity": run_sensitivity(args, seeds)}
        res["meta"]["wall_s"] = time.monotonic() - t0
        for knob, pts in res["sensitivity"]["points"].items():
            for v, p in pts.items():
                r = p["ttft_reduction"]
                print(f"{knob}={v}: TTFT reduction " + ", ".join(
                    f"{a} {x * 100:.1f} %" for a, x in r.items() if a != "baseline"))  # fmt: skip
        path = args.results_dir / ("multilevel-sensitivity" + ("-quick" if args.quick else "")
                                   + ".json")  # fmt: skip
        path.write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {path} ({res['meta']['wall_s']:.0f} s)")
        return res
    workloads = args.workloads or (["burst-random", "sharegpt"] if args.quick else WORKLOADS)
    replicas = args.replicas or ([2] if args.quick else list(REPLICAS))
    loads = args.loads or ([0.85] if args.quick else list(LOADS))
    a2a = args.a2a or ([EP_DEFAULTS["a2a_gbps"]] if args.quick else list(A2A_GRID))
    name = "multilevel-sim" + ("-quick" if args.quick else "")
    path = args.results_dir / f"{name}.json"

    earlier = _earlier_grid(args.merge, args.arms, seeds) if args.merge else None

    def save(grid: dict) -> dict:
        if earlier is not None:
            grid = _union(earlier, grid)
        summary = {a: reductions(grid["configs"], a) for a in args.arms if a != "baseline"}
        res = {"meta": meta, **grid, "summary": summary}
        res["meta"] |= {"wall_s": time.monotonic() - t0, "configs": len(grid["configs"])}
        res["meta"]["complete"] = len(grid["configs"]) == grid["planned"]
        if earlier is not None:  # the configurations this run did not compute, and their cost
            res["meta"]["merged"] = {"file": args.merge.name, "configs": len(earlier["configs"]),
                                     "wall_s": earlier["meta"].get("wall_s")}  # fmt: skip
        res["best_router_by_ttft"] = best_routers(grid["configs"])
        path.write_text(json.dumps(res, indent=1) + "\n")
        return res

    grid = run_grid(args, workloads, replicas, loads, args.arms, seeds, a2a, save)
    res = save(grid)
    grid = {k: res[k] for k in ("capacity_rps", "configs")}
    summary = res["summary"]
    print(h.format_table(summary_table(summary)))
    ml = summary.get("multilevel")
    if ml:
        print(
            f"\ntargets (median config, multilevel vs baseline): mean TTFT "
            f"{ml['ttft_mean_median'] * 100:.1f} % lower (target >= 17.8), mean TPOT "
            f"{ml['tpot_mean_median'] * 100:.1f} % lower (>= 13.3), throughput "
            f"{ml['throughput_median'] * 100:+.1f} % (within 3)"
        )
    path.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, args.results_dir / f"{name}.png")
    print(f"wrote {path} and .png: {len(grid['configs'])} configs x {len(seeds)} seeds, "
          f"{res['meta']['wall_s']:.0f} s")  # fmt: skip
    return res


if __name__ == "__main__":
    main()
