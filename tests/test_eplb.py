"""Expert load counts and EPLB placement on a real (tiny, random) model: the counts count
exactly the routed (token, pick) pairs of real rows, and moving or copying experts between
steps never changes a token (fused and segmented, split and stacked expert layouts, top_k 2
and 4, under the preemptive qllm policy too)."""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest

import qllm_jax
from qllm_jax.eplb import ExpertLoad, ExpertSlots, routing_trace
from qllm_jax.models.model import expert_group
from qllm_jax.models.random_init import MODEL_PRESETS, random_model
from qllm_jax.scheduler.experts import (
    colocated_placement,
    eplb_placement,
    pair_stay_share,
    slot_experts,
    slot_sources,
    static_placement,
)

TINY = MODEL_PRESETS["mixtral-tiny"]  # 8 experts, top_k 2, 2 layers
TOP4 = dataclasses.replace(TINY, top_k=4, norm_topk_prob=False)  # a sum order that matters
ENGINE = dict(
    kv_pages=40,
    page_size=8,
    max_batch_size=4,
    max_num_batched_tokens=16,  # few row buckets: few executables to compile
    prefill_chunk=8,
    enable_prefix_caching=False,  # a second run of the same prompts runs the same shapes
    compilation_cache_dir=None,
)
PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(5 + 6 * i)] for i in range(3)]
GREEDY = qllm_jax.SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


@functools.cache
def _model(cfg, layout: str):
    return random_model(cfg, "float32", seed=3, expert_layout=layout)


@functools.cache
def _tokens(cfg, layout: str, **kw) -> tuple[tuple[int, ...], ...]:
    llm = qllm_jax.LLM(_model(cfg, layout), **ENGINE, **kw)
    return tuple(tuple(o.token_ids) for o in llm.generate(PROMPTS, GREEDY))


def _generate(cfg, layout, llm=None, **kw):
    llm = llm or qllm_jax.LLM(_model(cfg, layout), **ENGINE, **kw)
    tokens = tuple(tuple(o.token_ids) for o in llm.generate(PROMPTS, GREEDY))
    return tokens, llm


@pytest.mark.parametrize(
    "cfg,layout,kw",
    [
        (TOP4, "stacked", dict(policy="priority")),
        (TOP4, "split", dict(policy="qllm", granularity="expert", expert_group_size=2)),
        (TINY, "stacked", dict(policy="qllm", granularity="expert", expert_group_size=4)),
    ],
)
def test_rebalancing_keeps_greedy_tokens(cfg, layout, kw):
    """Placement on: copies and moves every 2 steps; the tokens are those without placement."""
    want = _tokens(cfg, layout, **kw)
    got, llm = _generate(cfg, layout, redundant_experts=2, rebalance_every=2, eplb_ranks=2, **kw)
    stats = llm.engine.stats()
    assert stats["expert_rebalances"] >= 3 and stats["expert_slots_moved"] > 0, stats
    last = stats["expert_last_rebalance"]
    assert last["imbalance_after"] <= last["imbalance_before"] or not last["moved_slots"], last
    assert got == want
    for layer in stats["expert_placement"]:
        assert sorted(set(layer)) == list(range(cfg.num_experts)) and len(layer) == 10
    # the same traffic again re-places again and compiles nothing (slot maps keep one shape)
    again, _ = _generate(cfg, layout, llm)
    after = llm.engine.stats()
    assert again == want and after["expert_rebalances"] > stats["expert_rebalances"]
    assert after["compiles"] == stats["compiles"]


def test_counts_are_the_routed_pairs_of_real_rows():
    """Prefill only (one token each): per layer and expert, the counts are the reference
    routing's pairs, however the prompts were chunked, batched and padded."""
    model = _model(TINY, "split")
    for kw in (dict(policy="priority"), dict(policy="qllm", expert_group_size=2)):
        llm = qllm_jax.LLM(model, **ENGINE, expert_stats_every=1, **kw)
        one = dataclasses.replace(GREEDY, max_tokens=1)
        llm.generate(PROMPTS, one)
        load = llm.engine.executor.expert_load.read()
        want = sum(
            np.stack([np.bincount(x.ravel(), minlength=8) for x in routing_trace(model, p)])
            for p in PROMPTS
        )
        np.testing.assert_array_equal(load, want)
        assert load.sum() == TINY.num_layers * TINY.top_k * sum(map(len, PROMPTS))


def test_a_warm_rebalance_compiles_nothing():
    """Stacked slots move with a jitted gather: the warm-up compiles it."""
    from qllm_jax import compile_log

    eng = qllm_jax.Engine(_model(TINY, "stacked"), **ENGINE, redundant_experts=2, eplb_ranks=2)
    eng.executor.expert_slots.warmup()
    before = compile_log.count()
    skewed = np.array([[50, 1, 1, 1, 1, 1, 1, 30]] * TINY.num_layers)
    assert eng.executor.expert_slots.rebalance(skewed).moved_slots > 0
    assert compile_log.count() == before


def test_host_totals_survive_int32_wraparound():
    load = ExpertLoad(1, 2)
    load._take(np.array([[2**31 - 1, 5]], np.int32))
    load._take(np.array([[-(2**31) + 9, 5]], np.int32))  # the device counter wrapped: 10 more
    assert load.host.tolist() == [[2**31 + 9, 5]]


def test_counts_reach_stats_without_waiting():
    """``stats()["expert_load"]`` fills in from the asynchronous copies (no wait)."""
    _, llm = _generate(TINY, "split", expert_stats_every=1)
    eng = llm.engine
    eng.step()  # an idle step: takes the copy the last step started
    load = np.array(eng.stats()["expert_load"])
    assert load.shape == (2, 8) and load.sum() > 0
    _, llm = _generate(TINY, "split", expert_stats_every=0)
    assert "expert_load" not in llm.engine.stats()


def test_ragged_slots_compute_the_logical_result():
    """The accelerator path (grouped matmuls over physical slots, a row's picks split over its
    expert's copies by row) gives the logical result under any placement. Bit-identical only
    where the grouped matmul computes a row from its own slot alone: with XLA:CPU's ragged_dot
    the same weights in another slot give other last bits (measured)."""
    cfg = TOP4
    ep = _model(cfg, "stacked").params.layers[0].experts
    rng = np.random.default_rng(0)
    n, d = 24, cfg.hidden_size
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.random((n, cfg.top_k)), jnp.float32)
    ids = np.stack([rng.choice(8, cfg.top_k, replace=False) for _ in range(n)]).astype(np.int32)
    ids[-3:] = 8  # padding rows
    ids = jnp.asarray(ids)
    for seed in range(2):
        loads = list(np.random.default_rng(seed).zipf(1.5, 8).astype(float))
        slots = ExpertSlots([ep], redundant=4, ranks=4)
        slots.rebalance(np.array([loads]))
        placed, sm = slots.params(0)
        assert int(sm.copies.sum()) == 12 and int(sm.copies.max()) > 1
        for start, size in ((0, 8), (4, 4)):
            want = expert_group(ep, x, w, ids, start, size, impl="dense")
            got = expert_group(placed, x, w, ids, start, size, "ragged", sm)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            assert not got[-3:].any()


def test_slot_layout_moves_only_what_changed():
    old = slot_experts(eplb_placement([1.0] * 8, 2, 5))
    assert sorted(old) == [0, 0, 1, 1, *range(2, 8)]  # the lowest ids get the copies
    new = slot_experts(eplb_placement([9, 1, 1, 1, 1, 1, 1, 5], 2, 5), old)
    src = slot_sources(old, new)
    assert [old[s] for s in src] == new
    assert all(src[s] == s for s in range(10) if old[s] == new[s])
    assert new.count(0) >= 2 and set(new) == set(range(8))
    with pytest.raises(ValueError, match="in no slot"):
        slot_sources([0, 1], [0, 2])


def test_colocation_follows_inter_layer_transitions():
    """Uniform loads, and layer 0's expert a always hands its tokens to layer 1's expert
    (a + 4) % 8: co-location puts each pair on one rank; with no transitions it is EPLB."""
    loads = [[1.0] * 8, [1.0] * 8]
    t = [[[10.0 if b == (a + 4) % 8 else 0.0 for b in range(8)] for a in range(8)]]
    placed = colocated_placement(loads, t, 4, 2, slack=0.3)
    for rank0, rank1 in zip(*placed, strict=True):
        assert sorted(rank1) == sorted((a + 4) % 8 for a in rank0)
    none = [[[0.0] * 8 for _ in range(8)]]  # no affinity anywhere: plain EPLB
    assert colocated_placement(loads, none, 4, 2, 0.3) == [eplb_placement(w, 4, 2) for w in loads]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(redundant_experts=-1), "redundant_experts"),
        (dict(rebalance_every=1.5), "rebalance_every"),
        (dict(eplb_ranks=3), "eplb_ranks=3 must divide the 8 expert slots"),
        (dict(eplb_ranks=16, redundant_experts=8), "exceeds num_experts"),
        (dict(expert_stats_every=-2), "expert_stats_every"),
    ],
)
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        qllm_jax.Engine(_model(TINY, "split"), **ENGINE, **kw)


def test_cli_flags_reach_the_engine():
    from qllm_jax.cli import _parser, build_engine, engine_flags

    args = _parser().parse_args(
        ["generate", "--model", "random:mixtral-tiny", "--redundant-experts", "2",
         "--rebalance-every", "5", "--eplb-ranks", "2", "--expert-stats-every", "3",
         "--kv-pages", "8", "--compilation-cache-dir", "none", "hi"]
    )  # fmt: skip
    eng = build_engine(engine_flags(args))
    assert eng.rebalance_every == 5 and eng.expert_stats_every == 3
    assert eng.executor.expert_slots.num_slots == 10 and eng.executor.expert_slots.ranks == 2


def _experiment(name: str):
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    return importlib.import_module(name)


def test_simulator_stay_share_is_eplb_bench_stay_fraction_without_copies():
    """The simulator prices co-location from transitions alone (``pair_stay_share``, copies
    taken evenly); eplb_bench counts per token with the engine's copy rule: the same where
    every expert has one copy."""
    bench = _experiment("eplb_bench")
    rng = np.random.default_rng(0)
    traces = [rng.integers(0, 8, (3, 40, 2)) for _ in range(3)]  # [L, T, k]
    t = bench.transitions(traces, 8).tolist()
    placements = colocated_placement(rng.random((3, 8)).tolist(), t, 4, 2, 0.2)
    want = bench.stay_fraction(placements, traces, 8)
    assert pair_stay_share(placements, t) == pytest.approx(want)
    assert pair_stay_share([static_placement(8, 4)] * 3, t) != pytest.approx(want)


def test_recorded_trace_holds_the_models_own_routing(tmp_path):
    ml = _experiment("multilevel")
    trace = ml.record_trace(tmp_path / "t.json", sequences=2, length=16)
    assert (trace.num_windows, trace.window_tokens, trace.top_k) == (2, 16, 2)
    model = qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")
    seqs = _experiment("eplb_bench").text_sequences(model, 2, 16)
    ids = routing_trace(model, seqs[1])  # [L, T, k]
    assert trace.counts[1] == [np.bincount(x.ravel(), minlength=8).tolist() for x in ids]
    assert ml.load_trace(str(tmp_path / "t.json")).counts == trace.counts
