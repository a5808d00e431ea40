"""Preemption on a real (tiny) model: parking, resuming, merging and splitting carries must leave
every request's tokens exactly as if it had run alone, and must never leak KV pages.

Arrivals and aborts are given in engine steps; under the ``qllm`` policy a step advances the
active pass by one segment (expert granularity) or one layer, so an arrival "at step 5" lands
inside a forward pass.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")

import qllm_jax  # noqa: E402
from tests.hf_tiny import make_checkpoint  # noqa: E402

BASE = dict(
    dtype="float32",
    kv_pages=14,  # 13 usable pages of 8 tokens: some requests must wait or be evicted
    page_size=8,
    max_batch_size=4,
    max_num_batched_tokens=16,
    prefill_chunk=8,
    compilation_cache_dir=None,
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _ = make_checkpoint(
        "mixtral", tmp_path_factory.mktemp("mix"), num_hidden_layers=2, num_local_experts=4
    )
    return path


@functools.cache
def _model(path):
    return qllm_jax.load(path, dtype="float32")


def _sampling(max_tokens: int, seed: int | None) -> qllm_jax.SamplingParams:
    if seed is None:
        return qllm_jax.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return qllm_jax.SamplingParams(
        max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=seed, ignore_eos=True
    )


@functools.cache
def _solo(path, prompt: tuple[int, ...], max_tokens: int, seed: int | None) -> list[int]:
    """The request's tokens when it runs alone (iteration-level, fused)."""
    llm = qllm_jax.LLM(_model(path), policy="priority", **_engine_kw())
    return llm.generate([list(prompt)], _sampling(max_tokens, seed))[0].token_ids


def _engine_kw():
    return {k: v for k, v in BASE.items() if k != "dtype"}


def drive(engine: qllm_jax.Engine, events: dict[int, list[tuple]], max_steps: int = 5000):
    """Run the engine, adding/aborting requests at given steps. Returns final outputs."""
    outs, step = {}, 0
    last_event = max(events, default=0)
    while engine.has_unfinished() or step <= last_event:
        for action, rid, payload in events.get(step, []):
            if action == "add":
                prompt, max_tokens, seed, priority = payload
                engine.add_request(list(prompt), _sampling(max_tokens, seed), priority, None, rid)
            else:
                engine.abort(rid)
        for out in engine.step():
            outs[out.request_id] = out
        step += 1
        assert step < max_steps, "engine did not finish"
    return outs


def _check_clean(engine: qllm_jax.Engine) -> None:
    stats = engine.stats()
    assert stats["kv_pages_used"] == 0, stats
    assert stats["passes_live"] == 0 and stats["carries"] == 0, stats
    assert not len(engine.executor.ledger) and not engine.scheduler.requests


def test_ls_arrival_preempts_be_prefill_mid_pass(ckpt):
    """A long BE prompt is being prefilled; an LS request arriving a few segments into the pass
    parks it, gets its first token first, and both end with their solo tokens."""
    be_prompt = tuple(range(3, 3 + 40))
    ls_prompt = (7, 9, 11, 13)
    for granularity in ("expert", "layer"):
        eng = qllm_jax.Engine(_model(ckpt), policy="qllm", granularity=granularity, **_engine_kw())
        events = {
            0: [("add", "be", (be_prompt, 4, None, qllm_jax.BEST_EFFORT))],
            3: [("add", "ls", (ls_prompt, 4, None, qllm_jax.LATENCY_SENSITIVE))],
        }
        outs = drive(eng, events)
        assert outs["ls"].token_ids == _solo(ckpt, ls_prompt, 4, None)
        assert outs["be"].token_ids == _solo(ckpt, be_prompt, 4, None)
        assert outs["ls"].metrics.first_token_time < outs["be"].metrics.first_token_time
        assert outs["be"].metrics.num_preemptions >= 1
        assert outs["be"].metrics.parked_time > 0
        stats = eng.stats()
        assert stats[f"preemptions_{granularity}"] >= 1
        _check_clean(eng)


def test_abort_of_a_parked_request(ckpt):
    be = tuple(range(3, 30))
    eng = qllm_jax.Engine(_model(ckpt), policy="qllm", **_engine_kw())
    events = {
        0: [
            ("add", "be1", (be, 3, None, 1)),
            ("add", "be2", (be[:9], 3, None, 1)),
        ],
        2: [("add", "ls", ((5, 6, 7), 6, None, 0))],
        4: [("abort", "be1", None)],
    }
    outs = drive(eng, events)
    assert outs["ls"].token_ids == _solo(ckpt, (5, 6, 7), 6, None)
    assert outs["be2"].token_ids == _solo(ckpt, be[:9], 3, None)
    assert "be1" not in outs or outs["be1"].finish_reason in ("abort", "length")
    _check_clean(eng)


def test_paper_preset_runs(ckpt):
    eng = qllm_jax.Engine(_model(ckpt), preset="paper", **_engine_kw())
    events = {
        0: [("add", f"be{i}", (tuple(range(3 + i, 12 + i)), 5, None, 1)) for i in range(3)],
        6: [("add", "ls", ((4, 5, 6), 3, None, 0))],
    }
    outs = drive(eng, events)
    for i in range(3):
        assert outs[f"be{i}"].token_ids == _solo(ckpt, tuple(range(3 + i, 12 + i)), 5, None)
    assert outs["ls"].token_ids == _solo(ckpt, (4, 5, 6), 3, None)
    _check_clean(eng)


request_st = st.tuples(
    st.integers(0, 25),  # arrival step
    st.integers(1, 20),  # prompt length
    st.integers(1, 5),  # max tokens
    st.sampled_from([0, 1, 1, 2]),  # priority
    st.one_of(st.none(), st.integers(0, 12)),  # abort this many steps after arrival
    st.one_of(st.none(), st.integers(0, 2**31)),  # seed (None: greedy)
    st.integers(0, 10_000),  # prompt content
)


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    background=st.lists(st.tuples(st.integers(12, 30), st.integers(0, 10_000)), max_size=2),
    ls_arrivals=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    requests=st.lists(request_st, max_size=4),
    granularity=st.sampled_from(["expert", "layer"]),
    aging=st.sampled_from([None, 0.05]),
    absorb_be=st.booleans(),
)
def test_random_workloads_match_solo_runs(
    ckpt, background, ls_arrivals, requests, granularity, aging, absorb_be
):
    # BE prompts in flight from step 0 and LS requests landing inside their passes, plus
    # arbitrary other requests and aborts.
    requests = [
        *[(0, plen, 3, 1, None, None, content) for plen, content in background],
        *[(t, 3 + t % 5, 2, 0, None, None, t) for t in ls_arrivals],
        *requests,
    ]
    eng = qllm_jax.Engine(
        _model(ckpt),
        policy="qllm",
        granularity=granularity,
        aging_s=aging,
        absorb_be=absorb_be,
        **_engine_kw(),
    )
    events: dict[int, list[tuple]] = {}
    expected, aborted = {}, set()
    for i, (arrive, plen, max_tokens, prio, abort_after, seed, content) in enumerate(requests):
        rng = np.random.default_rng(content)
        prompt = tuple(int(t) for t in rng.integers(3, 128, plen))
        rid = f"r{i}"
        events.setdefault(arrive, []).append(("add", rid, (prompt, max_tokens, seed, prio)))
        if abort_after is not None:
            events.setdefault(arrive + abort_after, []).append(("abort", rid, None))
            aborted.add(rid)
        expected[rid] = (prompt, max_tokens, seed)
    outs = drive(eng, events)
    stats = eng.stats()
    event(f"preempted={stats['preemptions_layer'] + stats['preemptions_expert'] > 0}")
    event(f"absorbed={stats['absorbed_passes'] > 0} split={stats['splits'] > 0}")
    event(f"evicted={stats['evictions'] > 0}")
    for rid, (prompt, max_tokens, seed) in expected.items():
        out = outs.get(rid)
        if rid in aborted and outs[rid].finish_reason == "abort":
            continue  # aborted before finishing: no row of it may linger (checked below)
        assert out is not None and out.finished and out.finish_reason == "length", rid
        assert out.token_ids == _solo(ckpt, prompt, max_tokens, seed), rid
    _check_clean(eng)
