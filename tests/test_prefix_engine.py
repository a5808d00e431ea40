"""Prefix caching on a real (tiny) model: a request that maps another's K/V pages must produce
exactly the tokens it produces with caching off, under every policy, greedy and seeded,
including qllm passes parked while their rows read shared pages, on a KV budget small enough
that requests wait and get evicted; nothing may leak.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

pytest.importorskip("torch")

import qllm_jax  # noqa: E402
from tests.hf_tiny import make_checkpoint  # noqa: E402

KW = dict(
    kv_pages=20,  # 19 usable pages of 8 tokens: requests wait, and some are evicted
    page_size=8,
    max_batch_size=4,
    max_num_batched_tokens=16,
    prefill_chunk=8,
    compilation_cache_dir=None,
)
POLICIES = {
    "fcfs": dict(policy="fcfs"),
    "priority": dict(policy="priority"),
    "qllm-layer": dict(policy="qllm", granularity="layer"),
    "qllm-expert": dict(policy="qllm", granularity="expert"),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_checkpoint(
        "mixtral", tmp_path_factory.mktemp("mix"), num_hidden_layers=2, num_local_experts=4
    )
    return _load(path)


@functools.cache
def _load(path):
    return qllm_jax.load(path, dtype="float32")


def _sampling(max_tokens: int, seed: int | None) -> qllm_jax.SamplingParams:
    if seed is None:
        return qllm_jax.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return qllm_jax.SamplingParams(
        max_tokens=max_tokens, temperature=0.9, top_p=0.9, seed=seed, ignore_eos=True
    )


def workload():
    """Step -> requests (id, prompt, max tokens, seed, priority). Everyone shares a 24-token
    system prompt (3 pages); BE requests arrive first and keep arriving after it is cached,
    LS requests land inside their passes."""
    rng = np.random.default_rng(7)
    system = rng.integers(3, 120, 24).tolist()

    def own(n):
        return rng.integers(3, 120, n).tolist()

    return {
        0: [("be0", system + own(9), 4, None, 1)],
        2: [("ls0", system + own(2), 3, 5, 0)],
        14: [("be1", system + own(5), 5, 11, 1), ("be2", system + own(12), 3, None, 1)],
        16: [("ls1", system + own(4), 2, None, 0)],
        21: [("ls3", system + own(3), 2, None, 0)],  # parks a pass of be1, be2 (qllm-layer)
        30: [("ls2", system[:16] + own(6), 3, 2, 0), ("be3", system + own(1), 2, 3, 1)],
        75: [("ls4", own(7), 2, 4, 0)],  # parks a pass of be1, be2, be3 (qllm-expert)
    }


def drive(engine: qllm_jax.Engine, events, max_steps: int = 20_000):
    """Run to the end; returns the outputs and whether a parked pass ever held rows on pages
    mapped from the cache."""
    outs, step, parked_shared = {}, 0, False
    sched = engine.scheduler
    while engine.has_unfinished() or step <= max(events):
        for rid, prompt, max_tokens, seed, prio in events.get(step, []):
            engine.add_request(prompt, _sampling(max_tokens, seed), prio, None, rid)
        for out in engine.step():
            outs[out.request_id] = out
        parked_shared |= any(
            sched.seqs[c.seq_id].prefix_pages
            for p in sched.passes.values()
            if p.parked_since is not None
            for c in p.chunks
        )
        step += 1
        assert step < max_steps
    return outs, parked_shared


def check_clean(engine: qllm_jax.Engine) -> None:
    stats = engine.stats()
    assert stats["kv_pages_used"] == 0 and stats["passes_live"] == 0, stats
    assert stats["carries"] == 0 and not len(engine.executor.ledger)
    engine.scheduler.allocator.check()


@pytest.mark.parametrize("policy", list(POLICIES))
def test_same_tokens_with_prefix_caching_on_and_off(model, policy):
    events = workload()
    runs = {}
    for caching in (False, True):
        eng = qllm_jax.Engine(model, enable_prefix_caching=caching, **POLICIES[policy], **KW)
        runs[caching] = drive(eng, events)
        check_clean(eng)
        stats = eng.stats()
        if caching:
            assert stats["prefix_cache_hits"] > 0 and stats["kv_pages_cached"] > 0, stats
        else:
            assert stats["prefix_cache_hits"] == 0 and stats["kv_pages_cached"] == 0, stats
    (plain, _), (cached, parked_shared) = runs[False], runs[True]
    assert set(plain) == set(cached) == {r[0] for rs in events.values() for r in rs}
    for rid, out in cached.items():
        assert out.finish_reason == "length" == plain[rid].finish_reason, rid
        assert out.token_ids == plain[rid].token_ids, rid
        assert plain[rid].num_cached_tokens == 0
    assert sum(o.num_cached_tokens for o in cached.values()) >= 3 * 24
    if policy.startswith("qllm"):
        assert parked_shared  # a pass was preempted while its rows read shared pages


def test_multi_turn_chat_maps_the_previous_turn(model):
    """Turn 2's prompt extends turn 1's prompt and answer: it maps every full page of them
    that turn 1 computed, and its tokens equal a run without the cache."""
    rng = np.random.default_rng(3)
    prompt1, extra = rng.integers(3, 120, 21).tolist(), rng.integers(3, 120, 5).tolist()
    tokens = {}
    for caching in (False, True):
        llm = qllm_jax.LLM(model, policy="priority", enable_prefix_caching=caching, **KW)
        first = llm.generate([prompt1], _sampling(6, None))[0]
        second = llm.generate([prompt1 + first.token_ids + extra], _sampling(4, 9))[0]
        # turn 1 computed 21 + 5 tokens (its last one is never fed): 3 full pages of 8
        assert second.num_cached_tokens == (24 if caching else 0)
        tokens[caching] = (first.token_ids, second.token_ids)
    assert tokens[True] == tokens[False]
