"""KV pages as sequences grow (``grow_pages``): requests that omit ``max_tokens`` (OpenAI
clients often do; chat then defaults to the room left in the context) no longer reserve the
context each at admission. A cache that reservation would let hold two of them at once holds
all of them; when pages run out, idle less urgent requests are evicted and recompute their KV
later, or with ``swap_pages`` have it copied to host memory and back; every request finishes
with the tokens it gets without memory pressure (and alone).
"""

from __future__ import annotations

import json

import pytest

import qllm_jax
from qllm_jax import openai_api

ENGINE = dict(
    dtype="float32",
    policy="qllm",
    granularity="layer",
    page_size=16,
    max_model_len=96,
    max_batch_size=8,
    max_num_batched_tokens=32,
    prefill_chunk=16,
)
TIGHT = 14  # 13 usable pages: a 96-token reservation takes 6, so reserving admits 2


@pytest.fixture(scope="module")
def model():
    return qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One compilation cache for the engines here (each would compile its own otherwise)."""
    return str(tmp_path_factory.mktemp("jax-cache"))


def _requests(eng: qllm_jax.Engine) -> list:
    """Chat requests without max_tokens (each may run to the 96-token limit), greedy and
    seeded, LS and BE."""
    out = []
    for i in range(6):
        body = {"messages": [{"role": "user", "content": f"Tell tale number {i}"}]}
        body |= {"temperature": 0} if i % 2 else {"temperature": 0.9, "seed": 100 + i}
        prepared = openai_api.prepare(eng, openai_api.CHAT, body)
        out.append((prepared, 0 if i < 3 else 1))
    return out


def _run(eng: qllm_jax.Engine, reqs, watch=None) -> dict[str, list[int]]:
    for i, (p, prio) in enumerate(reqs):
        eng.add_request(p.prompt_token_ids, p.sampling, prio, request_id=f"r{i}")
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                assert out.finish_reason in ("stop", "length"), out
                done[out.request_id] = out.token_ids
        if watch is not None:
            watch(eng)
    return done


@pytest.fixture(scope="module")
def reserved(model, cache) -> dict[str, list[int]]:
    """The requests with their pages reserved (two at a time, never evicted)."""
    eng = qllm_jax.Engine(model, kv_pages=TIGHT, compilation_cache_dir=cache, **ENGINE)
    got = _run(eng, _requests(eng))
    assert eng.stats()["evictions"] == 0
    return got


def test_requests_without_max_tokens_share_a_small_cache_and_match_runs_without_pressure(
    model, cache, reserved
):
    tight = qllm_jax.Engine(
        model, kv_pages=TIGHT, grow_pages=True, compilation_cache_dir=cache, **ENGINE
    )
    reqs = _requests(tight)
    assert all(p.sampling.max_tokens > 70 for p, _ in reqs)  # the room left in the context
    most = 0

    def watch(eng):
        nonlocal most
        most = max(most, len(eng.scheduler.admitted))
        assert eng.scheduler.allocator.num_used <= TIGHT - 1

    got = _run(tight, reqs, watch)
    stats = tight.stats()
    assert len(got) == 6
    assert most > 2, "growing pages should admit more than the reservation's two"
    assert stats["growth_evictions"] > 0, "the cache never ran out: the test proves nothing"
    assert stats["kv_pages_used"] == 0

    assert reserved == got
    for i in (4,):  # (a seeded BE one)
        alone = qllm_jax.Engine(model, kv_pages=TIGHT, compilation_cache_dir=cache, **ENGINE)
        assert _run(alone, [reqs[i]])["r0"] == got[f"r{i}"]


@pytest.mark.parametrize("slots", [64, 3])
def test_evicted_requests_swap_their_kv_to_host_and_back(model, cache, reserved, slots):
    """With host slots for every eviction, evicted requests resume where they were instead of
    recomputing (fewer rows computed); with too few slots some recompute. Same tokens either
    way, and no page or host slot outlives its request."""
    recompute = qllm_jax.Engine(
        model, kv_pages=TIGHT, grow_pages=True, compilation_cache_dir=cache, **ENGINE
    )
    assert _run(recompute, _requests(recompute)) == reserved
    eng = qllm_jax.Engine(
        model,
        kv_pages=TIGHT,
        grow_pages=True,
        swap_pages=slots,
        compilation_cache_dir=cache,
        **ENGINE,
    )
    eng.warmup()
    assert _run(eng, _requests(eng)) == reserved
    stats = eng.stats()
    assert stats["compiles_since_warmup"] == 0, stats  # the page copies were warmed up too
    assert stats["swap_pages_free"] == slots and not eng.executor.host_kv
    assert not eng.executor.ledger.slots and stats["kv_pages_used"] == 0
    if slots == 64:
        assert stats["swapped_out_pages"] > 0 and stats["swapped_in_pages"] > 0, stats
        assert stats["swap_misses"] == 0, stats
        assert eng.scheduler.rows_done < recompute.scheduler.rows_done
    else:
        assert stats["swap_misses"] > 0, stats  # the victims had more computed pages than that


def test_swap_space_is_given_in_gib(model, cache):
    eng = qllm_jax.Engine(model, kv_pages=TIGHT, swap_space=0.001, compilation_cache_dir=cache)
    per_page = 2 * model.config.num_layers * 16 * model.config.kv_size * 4  # float32
    assert eng.config.swap_pages == int(0.001 * 2**30) // per_page > 0
    with pytest.raises(ValueError, match="swap_space"):
        qllm_jax.Engine(model, kv_pages=TIGHT, swap_space=-1)
    with pytest.raises(ValueError, match="not both"):
        qllm_jax.Engine(model, kv_pages=TIGHT, swap_space=1, swap_pages=4)


def test_reserving_pages_admits_two_of_them(model, cache):
    eng = qllm_jax.Engine(model, kv_pages=TIGHT, compilation_cache_dir=cache, **ENGINE)
    for i, (p, prio) in enumerate(_requests(eng)):
        eng.add_request(p.prompt_token_ids, p.sampling, prio, request_id=f"r{i}")
    eng.step()
    assert len(eng.scheduler.admitted) == 2


def test_a_job_checkpointed_under_page_pressure_resumes_to_the_same_lines(model, cache, tmp_path):
    """Checkpoints hold a growing request's pages so far; resume gives them fresh ones."""
    from qllm_jax import jobs

    lines = [
        {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": f"Tale {i}"}], "temperature": 0}}
        for i in range(4)
    ]  # fmt: skip

    def runner() -> jobs.JobRunner:
        eng = qllm_jax.Engine(
            model, kv_pages=TIGHT, grow_pages=True, compilation_cache_dir=cache, **ENGINE
        )
        return jobs.JobRunner(eng, checkpoint_every=None)

    def lines_of(job_dir) -> dict:
        out = {}
        for raw in (job_dir / "output.jsonl").read_text().splitlines():
            line = json.loads(raw)
            out[line["custom_id"]] = line["response"]["body"]["choices"][0]["message"]
        return out

    ref = runner()
    assert ref.run(ref.create(lines, tmp_path / "ref", job_id="j"))
    first = runner()
    job = first.create(lines, tmp_path / "job", job_id="j")
    while job.num_done < 1:
        first.engine.step()
    assert first.engine.stats()["growth_evictions"] > 0
    first.suspend(job)
    second = runner()
    assert second.run(second.resume(tmp_path / "job"))
    assert lines_of(tmp_path / "job") == lines_of(tmp_path / "ref")
