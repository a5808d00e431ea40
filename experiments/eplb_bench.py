"""Expert load balancing under skewed routing: tokens per expert-axis rank before and after
EPLB placement, with and without redundant experts and inter-layer co-location, and the step
time a cost model predicts for that imbalance on a multi-GPU node (an estimate).

Two routings: a random model whose router is biased (each layer's router columns scaled by a
Zipf law over a random order of the experts, so a few experts win most top-k picks), and the
built-in model on real text (this repository's README). The placement is computed from the
engine's own on-device counts (``Engine(expert_stats_every=...)``) over a calibration half of
the sequences and judged on the other half (held out: a placement fitted to the very counts it
is judged on would flatter it). Ranks are virtual (one CPU device): the numbers are of the
placements, not of a run on several devices. ``--engine`` also re-places inside the real
engine (``redundant_experts``, ``rebalance_every``) and checks its greedy tokens are unchanged.

Step time: ``scheduler.simulator.MIXTRAL_A100_EFFICIENT`` (Mixtral-8x7B on A100s) for a decode
step of ``--batch`` tokens over ``ep`` GPUs, 32 layers at the measured mean busiest-rank share,
plus the all-to-all of ``scheduler.experts.ExpertParallel`` (bandwidth a parameter, not
measured). An estimate from a cost model, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np

import qllm_jax
from qllm_jax.eplb import routing_trace
from qllm_jax.models.random_init import MODEL_PRESETS, random_model
from qllm_jax.scheduler.experts import (
    ExpertParallel,
    colocated_placement,
    copy_rank,
    ep_expert_time,
    eplb_placement,
    rank_loads,
    static_placement,
)
from qllm_jax.scheduler.simulator import MIXTRAL_A100_EFFICIENT

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
BIASED = dataclasses.replace(  # 16 experts so that 8 ranks still hold two each
    MODEL_PRESETS["mixtral-tiny"], num_layers=4, num_experts=16, max_position_embeddings=4096
)
NODE_LAYERS, NODE_HIDDEN = 32, 4096  # Mixtral-8x7B, what the cost model prices


def biased_model(skew: float, seed: int) -> qllm_jax.Model:
    """``BIASED`` with random weights and each layer's router column ``e`` scaled by
    ``(rank(e) + 1) ** -skew`` over a random order: a larger column spreads that expert's logits
    wider, so it tops more tokens' picks (a documented synthetic skew, not a trained router)."""
    model = random_model(BIASED, "float32", seed=seed)
    rng = np.random.default_rng(seed)
    layers = []
    for lp in model.params.layers:
        order = rng.permutation(BIASED.num_experts)
        scale = np.empty(BIASED.num_experts, np.float32)
        scale[order] = 4.0 * (np.arange(BIASED.num_experts) + 1.0) ** -skew
        router = lp.attn.router * scale[None, :]
        layers.append(lp.replace(attn=lp.attn.replace(router=router)))
    return dataclasses.replace(model, params=model.params.replace(layers=tuple(layers)))


def text_sequences(model: qllm_jax.Model, n: int, length: int) -> list[list[int]]:
    """``n`` sequences of ``length`` tokens of real text (the README, then design notes)."""
    text = "\n".join(p.read_text() for p in sorted(ROOT.glob("*.md")))
    ids = model.tokenizer.encode(text)
    if len(ids) < n * length:
        raise ValueError(f"the text has {len(ids)} tokens, {n} x {length} needed")
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def random_sequences(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, length).tolist() for _ in range(n)]


def engine_counts(model: qllm_jax.Model, seqs: list[list[int]]) -> np.ndarray:
    """[L, E] routed (token, pick) counts the engine accumulated on the device prefilling
    ``seqs`` (read once at the end)."""
    llm = qllm_jax.LLM(model, expert_stats_every=1, compilation_cache_dir=None, kv_pages=256)
    llm.generate(seqs, qllm_jax.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    return llm.engine.executor.expert_load.read()


def transitions(traces: list[np.ndarray], num_experts: int) -> np.ndarray:
    """[L-1, E, E]: (pick at layer l, pick at l+1) pairs of the same token, k x k per token."""
    num_layers = traces[0].shape[0]
    t = np.zeros((num_layers - 1, num_experts, num_experts))
    for tr in traces:  # [L, T, k]
        for layer in range(num_layers - 1):
            a, b = tr[layer], tr[layer + 1]  # [T, k]
            np.add.at(t[layer], (a[:, :, None], b[:, None, :]), 1.0)
    return t


def concentration(t: np.ndarray) -> tuple[float, float]:
    """How predictable the next layer's pick is from this one's: the share of an expert's
    (pick, next pick) pairs that go to its most common successor, over all experts and layers
    of ``t`` [L-1, E, E]; and the same if the next pick were independent of this one (each
    expert's most common successor is then the next layer's hottest expert)."""
    independent = t.sum(1).max(-1).sum()  # per layer: the hottest successor's pairs
    return float(t.max(-1).sum() / t.sum()), float(independent / t.sum())


def stay_fraction(placements: list[list[list[int]]], traces: list[np.ndarray], e: int) -> float:
    """Share of a token's consecutive-layer (pick, pick) pairs whose two copies share a rank
    (a token's copy of an expert: ``token index % copies``, as the engine splits rows). The
    simulator's ``scheduler.experts.pair_stay_share`` counts it from transitions alone, each
    copy taken evenly: the same without redundant copies."""
    ranks = [copy_rank(p, e) for p in placements]
    stay = total = 0
    for tr in traces:
        rows = np.arange(tr.shape[1])
        for layer in range(tr.shape[0] - 1):
            r0 = _ranks_of(ranks[layer], tr[layer], rows)  # [T, k]
            r1 = _ranks_of(ranks[layer + 1], tr[layer + 1], rows)
            stay += int((r0[:, :, None] == r1[:, None, :]).sum())
            total += r0.shape[0] * r0.shape[1] * r1.shape[1]
    return stay / total


def _ranks_of(copies: list[list[int]], picks: np.ndarray, rows: np.ndarray) -> np.ndarray:
    n = np.array([len(c) for c in copies])
    width = n.max()
    table = np.array([c + [c[0]] * (width - len(c)) for c in copies])
    return table[picks, rows[:, None] % n[picks]]


def evaluate(placements, loads: np.ndarray, traces, num_experts: int) -> dict:
    """Held-out balance of per-layer ``placements``: busiest / mean rank tokens per layer."""
    imb = []
    for p, w in zip(placements, loads.tolist(), strict=True):
        r = rank_loads(p, w)
        imb.append(max(r) / (sum(r) / len(r)))
    return {
        "max_over_mean_per_layer": [round(x, 4) for x in imb],
        "max_over_mean": round(float(np.mean(imb)), 4),
        "stay_on_rank": round(stay_fraction(placements, traces, num_experts), 4),
    }


def node_step_estimate(ep: int, imbalance: float, stay: float, batch: int, top_k: int) -> dict:
    """Seconds of one decode step of ``batch`` tokens on ``ep`` GPUs (module doc): experts
    at the busiest rank's share ``imbalance / ep``, attention split evenly, all-to-all for the
    busiest sender; ``a2a_handoff_s`` is the all-to-all if tokens went straight from a layer's
    expert to the next layer's (only the pairs that change rank pay), an upper bound on what
    co-location could save."""
    c = MIXTRAL_A100_EFFICIENT
    par = ExpertParallel(NODE_LAYERS, 8, top_k, NODE_HIDDEN, ep)
    rows = batch / ep  # per GPU: data-parallel attention
    attn = c.attn_base + c.attn_per_row * rows
    experts = ep_expert_time(c.expert_base, c.expert_per_row, 1 / ep, batch, imbalance / ep)
    a2a = par.a2a_s(rows)
    handoff = 0.0 if ep == 1 else a2a * (1 - stay) / ((ep - 1) / ep)
    layer = attn + experts + a2a
    return {
        "step_s": round(NODE_LAYERS * layer + c.head_base + c.head_per_row * rows, 6),
        "experts_per_layer_s": round(experts, 7),
        "a2a_per_layer_s": round(a2a, 7),
        "a2a_handoff_per_layer_s": round(handoff, 7),
    }


def study(name: str, model: qllm_jax.Model, seqs: list[list[int]], args) -> dict:
    """Every placement for ep = 2, 4, 8, fitted on half of ``seqs``, judged on the other."""
    cfg = model.config
    e = cfg.num_experts
    half = len(seqs) // 2
    t0 = time.perf_counter()
    calib_counts = engine_counts(model, seqs[:half])
    traces = [routing_trace(model, s) for s in seqs]
    calib_traces, test_traces = traces[:half], traces[half:]
    trace_counts = sum(
        np.stack([np.bincount(x.ravel(), minlength=e) for x in tr]) for tr in calib_traces
    )
    test_loads = sum(
        np.stack([np.bincount(x.ravel(), minlength=e) for x in tr]) for tr in test_traces
    )
    trans = transitions(calib_traces, e).tolist()
    calib = calib_counts.astype(float).tolist()
    share = test_loads.max(1) / test_loads.mean(1)
    conc, conc_independent = concentration(np.asarray(trans))
    out = {
        "model": name,
        "num_experts": e,
        "top_k": cfg.top_k,
        "num_layers": cfg.num_layers,
        "tokens": {
            "calibration": int(sum(map(len, seqs[:half]))),
            "held_out": int(sum(map(len, seqs[half:]))),
        },
        "engine_counts_equal_trace": bool((calib_counts == trace_counts).all()),
        "hottest_expert_over_mean": [round(float(x), 3) for x in share],
        "successor_concentration": round(conc, 4),
        "successor_concentration_if_independent": round(conc_independent, 4),
        "ep": {},
    }
    for ep in args.ep:
        per = e // ep
        variants = {
            "static": [static_placement(e, ep)] * cfg.num_layers,
            "eplb": [eplb_placement(w, ep, per) for w in calib],
            "eplb_colocated": colocated_placement(calib, trans, ep, per, args.slack),
            f"eplb_r{ep}": [eplb_placement(w, ep, per + 1) for w in calib],
            f"eplb_r{ep}_colocated": colocated_placement(calib, trans, ep, per + 1, args.slack),
            f"eplb_r{ep}_colocated_loose": colocated_placement(calib, trans, ep, per + 1, 0.5),
        }
        res = {}
        for vname, placements in variants.items():
            ev = evaluate(placements, test_loads, test_traces, e)
            ev["redundant_experts"] = sum(map(len, placements[0])) - e
            ev["estimate_mixtral_a100"] = node_step_estimate(
                ep, ev["max_over_mean"], ev["stay_on_rank"], args.batch, cfg.top_k
            )
            res[vname] = ev
        out["ep"][str(ep)] = res
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def engine_check(model: qllm_jax.Model, seqs: list[list[int]], ep: int) -> dict:
    """Re-placement inside the real engine: greedy tokens with and without it."""
    sp = qllm_jax.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    kw = dict(compilation_cache_dir=None, kv_pages=256, expert_stats_every=4)
    plain = qllm_jax.LLM(model, **kw).generate(seqs, sp)
    llm = qllm_jax.LLM(model, redundant_experts=ep, rebalance_every=2, eplb_ranks=ep, **kw)
    placed = llm.generate(seqs, sp)
    st = llm.engine.stats()
    return {
        "ep": ep,
        "tokens_identical": [o.token_ids for o in plain] == [o.token_ids for o in placed],
        "rebalances": st["expert_rebalances"],
        "slots_moved": st["expert_slots_moved"],
        "steps": st["steps"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, nargs="+", default=[2, 4, 8], help="virtual ranks")
    ap.add_argument("--seqs", type=int, default=16, help="sequences per routing (half held out)")
    ap.add_argument("--length", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--skew", type=float, default=1.2, help="router bias Zipf exponent")
    ap.add_argument("--slack", type=float, default=0.1, help="co-location's balance slack")
    # (the "_loose" variant gives up to half a rank's fair load for co-location)
    ap.add_argument("--batch", type=int, default=256, help="decode tokens per step, estimate")
    ap.add_argument("--engine", action="store_true", help="also re-place in the real engine")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="output JSON path")
    args = ap.parse_args(argv)
    biased = biased_model(args.skew, args.seed)
    builtin = qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")
    studies = [
        study(
            "random-biased",
            biased,
            random_sequences(BIASED.vocab_size, args.seqs, args.length, args.seed),
            args,
        ),
        study("builtin-text", builtin, text_sequences(builtin, args.seqs, args.length), args),
    ]
    for s in studies:
        print(
            f"{s['model']}: hottest expert / mean per layer {s['hottest_expert_over_mean']}, "
            f"successor concentration {s['successor_concentration']} "
            f"(independent: {s['successor_concentration_if_independent']})"
        )
        for ep, res in s["ep"].items():
            row = "  ".join(
                f"{v} {r['max_over_mean']:.3f} (stay {r['stay_on_rank']:.2f}, "
                f"{1e3 * r['estimate_mixtral_a100']['step_s']:.2f} ms)"
                for v, r in res.items()
            )
            print(f"  ep={ep}: {row}")
    result = {
        "what": "held-out busiest/mean tokens per expert-axis rank (virtual ranks); step times "
        "are cost-model estimates (mixtral-a100-efficient + ExpertParallel all-to-all), not "
        "measurements",
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "studies": studies,
    }
    if args.engine:
        result["engine"] = [
            engine_check(biased, random_sequences(BIASED.vocab_size, 4, 24, 1), 4),
            engine_check(builtin, text_sequences(builtin, 4, 24), 4),
        ]
        print(f"engine re-placement: {result['engine']}")
    out = Path(args.out) if args.out else RESULTS / "eplb-bench-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
