"""The executor contract on a real tiny model, side by side with the simulator's fake executor.

- Both executors reject the same invalid plans with the same ``PlanError``, changing nothing.
- The step path reads nothing back from the device but the sampled tokens (transfer guard).
- After ``warmup`` a mixed preemptive workload compiles nothing.
- A fault while executing fails only the requests it touched; the engine keeps serving, and
  every other request still gets exactly its solo tokens (also when the fault consumed the KV
  cache, which forces everyone else to recompute).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")

import qllm_jax  # noqa: E402
import qllm_jax.executor  # noqa: E402
from qllm_jax.scheduler import Chunk, Plan, PlanError, SampleSpec, Swap  # noqa: E402
from qllm_jax.scheduler.simulator import CostModel, FakeExecutor  # noqa: E402
from tests.hf_tiny import make_checkpoint  # noqa: E402

BASE = dict(
    dtype="float32",
    kv_pages=14,
    page_size=8,
    max_batch_size=4,
    max_num_batched_tokens=16,
    prefill_chunk=8,
    compilation_cache_dir=None,
)
POLICIES = {
    "fcfs": dict(policy="fcfs"),
    "priority": dict(policy="priority"),
    "qllm-expert": dict(policy="qllm", granularity="expert", absorb_be=True),
    "qllm-layer": dict(policy="qllm", granularity="layer", mix_classes=True),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = make_checkpoint(
        "mixtral", tmp_path_factory.mktemp("mix"), num_hidden_layers=2, num_local_experts=4
    )
    return qllm_jax.load(path, dtype="float32")


def engine(model, **kw) -> qllm_jax.Engine:
    return qllm_jax.Engine(model, **({k: v for k, v in BASE.items() if k != "dtype"} | kw))


def greedy(n: int) -> qllm_jax.SamplingParams:
    return qllm_jax.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def seeded(n: int, seed: int) -> qllm_jax.SamplingParams:
    return qllm_jax.SamplingParams(
        max_tokens=n, temperature=0.9, top_p=0.9, seed=seed, ignore_eos=True
    )


def prompt(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 128, n)]


@functools.cache
def _solo_cached(model_id, prompt_t, sampling):
    llm = qllm_jax.LLM(_MODELS[model_id], policy="priority", **_kw())
    return tuple(llm.generate([list(prompt_t)], sampling)[0].token_ids)


_MODELS: dict[int, qllm_jax.Model] = {}


def _kw():
    return {k: v for k, v in BASE.items() if k != "dtype"}


def solo(model, p, sampling) -> list[int]:
    _MODELS[id(model)] = model
    return list(_solo_cached(id(model), tuple(p), sampling))


def workload():
    """Two BE prompts in flight, LS requests landing inside their passes, one abort."""
    return {
        0: [
            ("add", "be0", prompt(30, 0), greedy(3), 1),
            ("add", "be1", prompt(12, 1), seeded(3, 7), 1),
        ],
        3: [("add", "ls0", prompt(4, 2), greedy(2), 0)],
        9: [
            ("add", "ls1", prompt(5, 3), seeded(2, 9), 0),
            ("add", "be2", prompt(9, 4), greedy(2), 2),
        ],
        14: [("abort", "be2")],
    }


def drive(eng: qllm_jax.Engine, events: dict, max_steps: int = 3000) -> dict:
    outs, step = {}, 0
    while eng.has_unfinished() or step <= max(events):
        for action, rid, *rest in events.get(step, []):
            if action == "add":
                p, sp, prio = rest
                eng.add_request(p, sp, priority=prio, request_id=rid)
            else:
                eng.abort(rid)
        for out in eng.step():
            if out.finished:
                outs[out.request_id] = out
        step += 1
        assert step < max_steps, "engine did not finish"
    return outs


def expected(model) -> dict[str, list[int]]:
    return {
        rid: solo(model, p, sp)
        for evs in workload().values()
        for action, rid, *rest in evs
        if action == "add"
        for p, sp, _ in [rest]
    }


def assert_clean(eng: qllm_jax.Engine) -> None:
    stats = eng.stats()
    assert stats["kv_pages_used"] == 0 and stats["passes_live"] == 0, stats
    assert stats["carries"] == 0 and not len(eng.executor.ledger), stats
    assert not eng.scheduler.requests and not eng.scheduler.seqs  # ended requests forgotten


# -- one contract, two executors ---------------------------------------------------------------


def _chunk(seq: int, start: int, n: int, pages=(1, 2), sample=True) -> Chunk:
    spec = SampleSpec(0.0, 0, 1.0, 0, 0) if sample else None
    return Chunk(seq, start, tuple(range(5, 5 + n)), tuple(pages), spec)


def _executors(model):
    real = engine(model, policy="qllm").executor
    fake = FakeExecutor(real.segments, real.page_size, CostModel())
    return {"real": real, "fake": fake}


def test_both_executors_reject_the_same_invalid_plans(model):
    a, b = _chunk(0, 0, 5), _chunk(1, 0, 3, pages=(3,))
    for name, ex in _executors(model).items():
        head = len(ex.segments) - 1
        ex.execute(Plan(0, 0, 1, (a,), new=True))
        bad = {
            "no carry for pass 7": Plan(7, 1, 1, (a,)),
            "is at cursor 1, plan says 2": Plan(0, 2, 1, (a,)),
            "carry rows differ": Plan(0, 1, 1, (b,)),
            f"runs to {head + 1}": Plan(0, 1, head, (a,)),
            "runs to 2": Plan(0, 1, 1, (a,), finishes=True),
            "two passes": Plan(1, 0, 1, (a,), new=True),
            "created twice": Plan(0, 0, 1, (a,), new=True),
            "bad split": Plan(0, 1, 1, (a,), split_seq_ids=(9,), split_pass_id=3),
            "pages do not hold": Plan(2, 0, 1, (_chunk(2, 0, 20, pages=(4,)),), new=True),
            "fused plan": Plan(0, 1, head - 1, (a,), finishes=True, fused=True),
            "a plan that runs nothing": Plan(0, 1, 0, (a,)),
            "only release": Plan(None, chunks=(a,)),
            "scratch page 0": Plan(None, swap_out=(Swap(5, (0,), (0,)),)),
            "rows in a carry": Plan(None, swap_out=(Swap(0, (1,), (0,)),)),
            "listed twice": Plan(None, swap_out=(Swap(5, (6,), (0,)), Swap(6, (7,), (0,)))),
            "do not hold its pages": Plan(None, swap_in=(Swap(5, (6,), (3,)),)),
        }
        for match, plan in bad.items():
            before = dict(ex.ledger.carries)
            with pytest.raises(PlanError, match=match):
                ex.execute(plan)
            assert ex.ledger.carries == before and not ex.ledger.slots, (name, match)
        # the carry is intact: the pass runs on to its head and samples
        result = ex.execute(Plan(0, 1, head - 1, (a,), finishes=True))
        assert set(result.tokens) == {0} and not result.failed, name
        assert not len(ex.ledger)


def test_finished_sequences_leave_parked_carries_in_both_executors(model):
    a, b = _chunk(0, 0, 5), _chunk(1, 0, 3, pages=(3,))
    for name, ex in _executors(model).items():
        ex.execute(Plan(0, 0, 2, (a, b), new=True))
        ex.execute(Plan(None, finished_seq_ids=(1,)))  # b aborted while parked
        assert [c.seq_id for c in ex.ledger.carries[0].chunks] == [0], name
        ex.execute(Plan(None, finished_seq_ids=(0,)))
        assert not len(ex.ledger), name
        if name == "real":
            assert ex.num_carries == 0


def test_swapped_pages_come_back_into_other_pages_in_both_executors(model):
    for name, ex in _executors(model).items():
        if name == "real":
            k, v = ex.export_kv([1, 2])
            rng = np.random.default_rng(0)
            k, v = (rng.standard_normal(x.shape).astype(x.dtype) for x in (k, v))
            ex.import_kv([1, 2], k, v)
        ex.execute(Plan(None, swap_out=(Swap(9, (1, 2), (0, 3)),)))
        assert ex.ledger.slots == {0: 9, 3: 9}, name
        with pytest.raises(PlanError, match="host slots in use"):
            ex.execute(Plan(None, swap_out=(Swap(8, (4,), (3,)),)))
        ex.execute(Plan(None, swap_in=(Swap(9, (5, 6), (0, 3)),)))
        assert not ex.ledger.slots, name
        ex.execute(Plan(None, swap_out=(Swap(9, (5,), (1,)),)))
        ex.execute(Plan(None, finished_seq_ids=(9,)))  # it ended while swapped out
        assert not ex.ledger.slots, name
        if name == "real":
            back = ex.export_kv([5, 6])
            np.testing.assert_array_equal(back[0], k)
            np.testing.assert_array_equal(back[1], v)
            assert not ex.host_kv


# -- no device reads, no compilation -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["qllm-expert", "qllm-layer"])
def test_step_path_reads_back_only_tokens_and_compiles_nothing_after_warmup(model, policy):
    want = expected(model)  # solo runs compile too: before the measured window
    eng = engine(model, **POLICIES[policy])
    assert eng.warmup() == eng.stats()["executables"]
    for _ in range(2):  # a second run must not compile either
        with jax.transfer_guard_device_to_host("disallow"):
            outs = drive(eng, workload())
        for rid, out in outs.items():
            if out.finish_reason == "abort":
                continue
            assert out.finish_reason == "length" and out.token_ids == want[rid], rid
        stats = eng.stats()
        assert stats["preemptions_expert"] + stats["preemptions_layer"] > 0, stats
        assert stats["compiles_since_warmup"] == 0, stats
        assert_clean(eng)
    assert stats["absorbed_passes"] + stats["splits"] > 0, stats


def test_fused_engine_compiles_nothing_after_warmup(model):
    eng = engine(model, policy="priority")
    eng.warmup()
    with jax.transfer_guard_device_to_host("disallow"):
        drive(eng, workload())
    assert eng.stats()["compiles_since_warmup"] == 0
    assert_clean(eng)


def test_signatures_cover_the_configured_bounds(model):
    ex = engine(model, policy="qllm", max_num_batched_tokens=64, max_batch_size=8).executor
    sigs = ex.signatures()
    assert {s.rows for s in sigs} == {8, 16, 32, 64}
    assert {s.samples for s in sigs if s.kernel == "head"} == {8}
    # a row reads its sequence up to its chunk's end from the cache: 13 pages at most
    assert {s.pages for s in sigs if s.kernel == "attention"} == {4, 8, 16}
    assert len(sigs) == len(set(sigs))
    tighter = ex.signatures(max_rows=16, min_context=40)
    assert {s.rows for s in tighter} == {8, 16} and len(tighter) < len(sigs)
    assert {s.pages for s in tighter if s.kernel == "attention"} == {8, 16}


# -- faults ----------------------------------------------------------------------------------


class Injected(RuntimeError):
    pass


# where the donated KV caches sit among a kernel's positional arguments
KV_ARGS = {"attention": slice(1, 3), "fused": slice(2, 4)}


def failing(kernel, on_call: int, kv: slice | None = None):
    """``kernel``, but its ``on_call``-th call raises (after deleting the donated KV arrays it
    was given at ``kv``, as a failed XLA call with donation does)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == on_call:
            if kv is not None:
                for x in jax.tree_util.tree_leaves(args[kv]):
                    x.delete()
            raise Injected(f"injected fault in call {on_call}")
        return kernel(*args, **kwargs)

    return wrapped


class Poisoned:
    """A value whose computation failed: any later wait on it raises."""

    shape = (16,)

    def block_until_ready(self):
        raise Injected("poisoned value")


@pytest.mark.parametrize(
    "policy,fault",
    [
        ("fcfs", "fused"),
        ("priority", "fused"),
        ("qllm-expert", "experts"),
        ("qllm-expert", "attention"),
        ("qllm-layer", "experts"),
        ("qllm-layer", "later"),
    ],
)
def test_a_fault_fails_only_the_requests_it_touched(model, policy, fault):
    """fused / attention: the failed call consumed the donated KV cache, which is rebuilt and
    every other request recomputes; experts: a plain exception; later: a segment's output is
    poisoned and the error surfaces at a later wait."""
    eng = engine(model, **POLICIES[policy])
    k = eng.executor.kernels
    if fault == "fused":
        kern = failing(k.fused, 3, KV_ARGS["fused"])
        eng.executor.kernels = dataclasses.replace(k, fused=kern)
    elif fault == "attention":
        kern = failing(k.attention, 9, KV_ARGS["attention"])
        eng.executor.kernels = dataclasses.replace(k, attention=kern)
    elif fault == "experts":
        eng.executor.kernels = dataclasses.replace(k, experts=failing(k.experts, 12))
    else:
        calls = [0]

        def poisoning(*args, **kwargs):
            calls[0] += 1
            out = k.experts(*args, **kwargs)
            return (Poisoned(), out[1]) if calls[0] == 5 else out

        eng.executor.kernels = dataclasses.replace(k, experts=poisoning, scatter=k.scatter)
    outs = drive(eng, workload())
    failed = {rid for rid, o in outs.items() if o.finish_reason == "error"}
    assert failed, "the fault must fail someone"
    # the error as it surfaced: the injected one, or (later) what the next call made of it
    assert all(outs[r].error and (fault == "later" or "Injected" in outs[r].error) for r in failed)
    want = expected(model)
    for rid, out in outs.items():
        if rid not in failed and out.finish_reason != "abort":
            assert out.finish_reason == "length" and out.token_ids == want[rid], rid
    stats = eng.stats()
    assert stats["failed"] == len(failed)
    assert stats["kv_resets"] == (1 if fault in ("fused", "attention") else 0)
    assert_clean(eng)
    # the engine keeps serving
    eng.executor.kernels = k
    again = drive(eng, {0: [("add", "after", prompt(6, 5), greedy(3), 0)]})
    assert again["after"].token_ids == solo(model, prompt(6, 5), greedy(3))
    assert_clean(eng)


# -- input hygiene -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=2**31), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=1e30), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(max_tokens=2**31), "max_tokens"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(seed=2**64), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(stop_token_ids="12"), "stop_token_ids"),
        (dict(stop_token_ids=[1.0]), "stop_token_ids"),
        (dict(ignore_eos=1), "ignore_eos"),
    ],
)
def test_sampling_params_bounds(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qllm_jax.SamplingParams(**kwargs)


def test_tiny_temperature_is_greedy_and_huge_seed_works(model):
    assert qllm_jax.SamplingParams(temperature=1e-9).temperature == 0.0
    eng = engine(model, policy="priority")
    out = drive(eng, {0: [("add", "a", prompt(5, 0), seeded(4, 2**64 - 1), 0)]})
    assert len(out["a"].token_ids) == 4


@pytest.mark.parametrize(
    "bad,error",
    [
        ([5.7], TypeError),
        (["5"], TypeError),
        ([True, 5], TypeError),
        (b"\x05\x06", TypeError),
        (np.array([[5, 6]]), TypeError),
        (np.array([5.0, 6.0]), TypeError),
        ({"ids": [5]}, TypeError),
        (5, TypeError),
        ([], ValueError),
        ([5, 500], ValueError),
        ([-1], ValueError),
    ],
)
def test_bad_prompts_are_refused_at_the_door(model, bad, error):
    eng = engine(model, policy="qllm")
    with pytest.raises(error):
        eng.add_request(bad, greedy(2))
    assert not eng.has_unfinished() and not eng.scheduler.requests


def test_bad_requests_are_refused_at_the_door(model):
    eng = engine(model, policy="qllm")
    assert eng.add_request(np.array([5, 6], np.int64), greedy(1))  # 1-D int arrays are fine
    for sampling in (0, {}, "greedy"):
        with pytest.raises(TypeError, match="SamplingParams"):
            eng.add_request([5, 6], sampling)
    with pytest.raises(ValueError, match="stop_token_ids"):
        eng.add_request([5, 6], qllm_jax.SamplingParams(stop_token_ids=[128]))
    with pytest.raises(TypeError, match="priority"):
        eng.add_request([5, 6], greedy(1), priority=0.5)
    with pytest.raises(ValueError, match="arrival_time"):
        eng.add_request([5, 6], greedy(1), arrival_time=float("nan"))
    assert len(eng.scheduler.requests) == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_model_len=0), "max_model_len"),
        (dict(max_model_len=-1), "max_model_len"),
        (dict(max_model_len=10**9), "max_position_embeddings"),
        (dict(kv_bytes=0), "kv_bytes"),
        (dict(kv_bytes=-1), "kv_bytes"),
        (dict(kv_pages=-1), "kv_pages"),
        (dict(kv_pages=1), "kv_pages"),
        (dict(page_size=3), "page_size"),
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(prefill_chunk=0), "prefill_chunk"),
        (dict(aging_s=float("inf")), "aging_s"),
        (dict(policy="sjf"), "policy"),
        (dict(preset="nope"), "preset"),
        (dict(lookahead=0), "lookahead"),
        (dict(mode="eager"), "mode"),
    ],
)
def test_bad_engine_options_are_refused(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine(model, **kwargs)


def test_unknown_engine_option_is_a_type_error(model):
    with pytest.raises(TypeError, match="max_batch"):
        engine(model, max_batch=4)


def test_preset_options_can_be_overridden(model):
    eng = engine(model, preset="paper", granularity="expert")
    assert eng.config.granularity == "expert" and eng.config.absorb_be and not eng.config.aging_s


def test_generate_with_one_bad_prompt_queues_nothing(model):
    llm = qllm_jax.LLM(model, policy="priority", **_kw())
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([prompt(4, 0), [5, 999], prompt(3, 1)], greedy(2))
    assert not llm.engine.has_unfinished() and not llm.engine.scheduler.requests
    assert len(llm.generate([prompt(4, 0)], greedy(2))[0].token_ids) == 2


def test_auto_ids_never_collide_with_chosen_ones(model):
    eng = engine(model, policy="qllm")
    eng.add_request([5], greedy(1), request_id="1")
    ids = [eng.add_request([5], greedy(1)) for _ in range(3)]
    assert "1" not in ids and len(set(ids)) == 3
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([5], greedy(1), request_id=ids[0])


def test_ended_requests_are_released(model):
    eng = engine(model, policy="qllm")
    events = {i: [("add", f"r{i}", prompt(3, i), greedy(2), i % 2)] for i in range(12)}
    events[5].append(("abort", "r3"))
    outs = drive(eng, events)
    assert len(outs) == 12
    assert_clean(eng)
    assert eng.scheduler.preempt_waits.maxlen is not None


# -- fuzz: random workloads, injected faults, bad inputs ---------------------------------------

BAD_INPUTS = {
    "float ids": lambda eng: eng.add_request([5.5], greedy(1)),
    "empty": lambda eng: eng.add_request([], greedy(1)),
    "vocab": lambda eng: eng.add_request([5, 128], greedy(1)),
    "too long": lambda eng: eng.add_request([5] * 200, greedy(1)),
    "sampling": lambda eng: eng.add_request([5], 0),
    "top_k": lambda eng: eng.add_request([5], qllm_jax.SamplingParams(top_k=2**40)),
    "pages": lambda eng: eng.add_request([5] * 100, greedy(100)),
}

op_st = st.one_of(
    st.tuples(
        st.just("add"),
        st.integers(1, 24),  # prompt length
        st.integers(1, 4),  # max tokens
        st.sampled_from([0, 1, 1, 2]),  # priority
        st.one_of(st.none(), st.integers(0, 1000)),  # seed (None: greedy)
    ),
    st.tuples(st.just("bad"), st.sampled_from(sorted(BAD_INPUTS))),
    st.tuples(st.just("abort"), st.integers(0, 20)),
    st.tuples(st.just("step"), st.integers(1, 12)),
)


def injecting(kernels, fault_calls: set[int]):
    """Every kernel of the table, counting calls together; the listed calls raise (those that
    take the KV cache first delete it, as a failed call with donated buffers does)."""
    calls = [0]

    def wrap(name, fn):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] in fault_calls:
                for x in jax.tree_util.tree_leaves(args[KV_ARGS[name]] if name in KV_ARGS else ()):
                    x.delete()
                raise Injected(f"fault at kernel call {calls[0]} ({name})")
            return fn(*args, **kwargs)

        return wrapped

    fields = {f.name: wrap(f.name, getattr(kernels, f.name)) for f in dataclasses.fields(kernels)}
    return type(kernels)(**fields)


@settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(op_st, min_size=3, max_size=25),
    policy=st.sampled_from(sorted(POLICIES)),
    faults=st.sets(st.integers(1, 60), min_size=1, max_size=3),
)
def test_fuzz_random_workloads_with_faults_and_bad_inputs_keep_serving(model, ops, policy, faults):
    eng = engine(model, **POLICIES[policy])
    eng.executor.kernels = injecting(eng.executor.kernels, faults)
    added: dict[str, tuple] = {}
    outs: dict[str, qllm_jax.RequestOutput] = {}

    def step():
        for out in eng.step():
            if out.finished:
                assert out.request_id not in outs, "a request ended twice"
                outs[out.request_id] = out

    for i, op in enumerate(ops):
        if op[0] == "add":
            _, plen, max_tokens, prio, seed = op
            sp = greedy(max_tokens) if seed is None else seeded(max_tokens, seed)
            p = prompt(plen, i)
            added[eng.add_request(p, sp, priority=prio)] = (p, sp)
        elif op[0] == "bad":
            live = dict(eng.scheduler.requests)
            with pytest.raises((ValueError, TypeError)):
                BAD_INPUTS[op[1]](eng)
            assert eng.scheduler.requests == live  # refused at the door: nothing queued
        elif op[0] == "abort" and added:
            eng.abort(sorted(added)[op[1] % len(added)])
        else:
            for _ in range(op[1]):
                step()
    for _ in range(3000):
        if not eng.has_unfinished():
            break
        step()
    assert not eng.has_unfinished()
    assert set(outs) == set(added)
    errors = [o for o in outs.values() if o.finish_reason == "error"]
    event(f"errors={bool(errors)} resets={eng.stats()['kv_resets'] > 0}")
    assert_clean(eng)
    eng.executor.kernels = qllm_jax.executor.Kernels()  # ours to compare against solo runs
    for rid, out in outs.items():
        if out.finish_reason == "length":
            p, sp = added[rid]
            assert out.token_ids == solo(model, p, sp), rid
        else:
            assert out.finish_reason in ("abort", "error"), out.finish_reason
