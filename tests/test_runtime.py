"""Runtime tier: paged KV, segments, fused step, sampling and the offline LLM API on tiny models.

Greedy outputs of ``LLM.generate`` must equal HF transformers ``generate`` token for token, for
prompts of different lengths batched together (so passes mix prefill chunks and decode rows of
different requests), in fused and segmented modes, with expert groups of 1 and of E.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import qllm_jax  # noqa: E402
from qllm_jax.scheduler import Chunk, SampleSpec  # noqa: E402
from tests.hf_tiny import FAMILIES, hf_greedy, make_checkpoint  # noqa: E402

NEW_TOKENS = 12
PROMPT_LENS = (5, 11, 17)
# Small pages and a small token budget force multi-page sequences, chunked prefill and passes
# that mix one request's prefill chunk with other requests' decode rows.
ENGINE = dict(
    dtype="float32",
    policy="priority",
    kv_pages=24,
    page_size=8,
    max_batch_size=4,
    max_num_batched_tokens=16,
    compilation_cache_dir=None,
)


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *map(int, rng.integers(3, 128, n - 1))] for n in PROMPT_LENS]


@pytest.fixture(scope="module", params=FAMILIES)
def family_ckpt(request, tmp_path_factory):
    path, hf = make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    expected = [hf_greedy(hf, np.asarray([p]), NEW_TOKENS)[0].tolist() for p in _prompts()]
    return request.param, path, expected


GREEDY = qllm_jax.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize(
    "mode,group", [("fused", None), ("segmented", 1), ("segmented", None)], ids=str
)
def test_generate_matches_hf(family_ckpt, mode, group):
    family, path, expected = family_ckpt
    llm = qllm_jax.LLM(path, mode=mode, expert_group_size=group, **ENGINE)
    outs = llm.generate(_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    assert len({t for e in expected for t in e}) > 3, "degenerate reference: tokens do not vary"
    stats = llm.engine.stats()
    assert stats["kv_pages_used"] == 0 and stats["running"] == stats["waiting"] == 0
    assert (stats["segments_run"] > 0) == (mode == "segmented")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path, hf = make_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"))
    return path, hf


def test_segmented_and_fused_logits_agree(mixtral):
    """The same pass run as one jit and as separate segments: f32 logits within 1e-5, and both
    equal to the cache-free oracle ``reference_forward``."""
    path, _ = mixtral
    model = qllm_jax.load(path, dtype="float32")
    prompts = _prompts(1)[:2]
    ex = qllm_jax.Engine(model, expert_group_size=2, **{**ENGINE, "dtype": "auto"}).executor
    pages = [(1, 2, 3, 4, 5), (6, 7, 8, 9, 10)]
    greedy = SampleSpec(temperature=0.0, top_k=0, top_p=1.0, seed=0, step=0)
    chunks = [
        Chunk(seq, 0, tuple(p), pg, greedy)
        for seq, (p, pg) in enumerate(zip(prompts, pages, strict=True))
    ]
    fused = ex.forward(chunks, fused=True, want_logits=True)
    seg = ex.forward(chunks, fused=False, want_logits=True)
    np.testing.assert_allclose(seg, fused, atol=1e-5, rtol=1e-5)
    for i, p in enumerate(prompts):
        ref = np.asarray(qllm_jax.reference_forward(model, [p]))[0, -1]
        np.testing.assert_allclose(fused[i], ref, atol=1e-4, rtol=1e-4)


def test_sliding_window_matches_hf(tmp_path):
    path, hf = make_checkpoint("mixtral", tmp_path, sliding_window=6)
    prompt = _prompts(2)[2]
    expected = hf_greedy(hf, np.asarray([prompt]), NEW_TOKENS)[0].tolist()
    llm = qllm_jax.LLM(path, mode="segmented", **ENGINE)
    assert llm.generate([prompt], GREEDY)[0].token_ids == expected


def test_seeded_sampling_is_batch_independent(mixtral):
    path, _ = mixtral
    llm = qllm_jax.LLM(path, **ENGINE)
    sp = qllm_jax.SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    prompts = _prompts(3)
    alone = llm.generate([prompts[1]], sp)[0].token_ids
    others = [qllm_jax.SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in (7, 8)]
    batch = llm.generate(prompts, [others[0], sp, others[1]])
    assert batch[1].token_ids == alone
    assert batch[0].token_ids != batch[2].token_ids  # different seeds, different streams
    unseeded = qllm_jax.SamplingParams(max_tokens=10, temperature=0.9, top_k=20, top_p=0.9)
    assert llm.generate([prompts[1]], sp)[0].token_ids == alone  # seed fixes the stream
    assert len(llm.generate([prompts[1]], unseeded)[0].token_ids) == 10


def test_top_k_one_is_greedy(mixtral):
    path, _ = mixtral
    llm = qllm_jax.LLM(path, **ENGINE)
    greedy = llm.generate(_prompts()[:2], GREEDY)
    top1 = qllm_jax.SamplingParams(
        max_tokens=NEW_TOKENS, temperature=1.5, top_k=1, seed=3, ignore_eos=True
    )
    assert [o.token_ids for o in llm.generate(_prompts()[:2], top1)] == [
        o.token_ids for o in greedy
    ]


def test_small_kv_budget_makes_requests_wait_not_fail(mixtral):
    """With pages for one request at a time, requests queue and still produce HF's tokens."""
    path, hf = mixtral
    prompts = _prompts()
    expected = [hf_greedy(hf, np.asarray([p]), NEW_TOKENS)[0].tolist() for p in prompts]
    llm = qllm_jax.LLM(path, **{**ENGINE, "kv_pages": 5})  # 4 usable pages of 8 = 32 tokens
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert llm.engine.stats()["kv_pages_used"] == 0


def test_request_too_large_for_cache_is_rejected(mixtral):
    path, _ = mixtral
    llm = qllm_jax.LLM(path, **{**ENGINE, "kv_pages": 4})
    with pytest.raises(ValueError, match="KV pages"):
        llm.generate([_prompts()[2]], GREEDY)


def test_abort_frees_pages(mixtral):
    path, _ = mixtral
    eng = qllm_jax.Engine(path, **ENGINE)
    ids = [eng.add_request(p, GREEDY) for p in _prompts()]
    eng.step()
    assert eng.stats()["kv_pages_used"] > 0
    assert eng.abort(ids[1]) and not eng.abort(ids[1]) and not eng.abort("nope")
    finished = {}
    while eng.has_unfinished():
        for out in eng.step():
            finished[out.request_id] = out
    assert set(finished) == set(ids)  # the aborted one is reported once, by the next step
    assert finished[ids[1]].finish_reason == "abort" and finished[ids[1]].finished
    assert finished[ids[0]].finish_reason == finished[ids[2]].finish_reason == "length"
    assert eng.stats()["kv_pages_used"] == 0


def test_stop_conditions(mixtral):
    path, hf = mixtral
    prompt = _prompts()[1]
    ref = hf_greedy(hf, np.asarray([prompt]), NEW_TOKENS)[0].tolist()
    llm = qllm_jax.LLM(path, **ENGINE)
    stop_at = ref[4]
    sp = qllm_jax.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=[stop_at])
    out = llm.generate([prompt], sp)[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(stop_at) + 1]
    out = llm.generate([prompt], qllm_jax.SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    m = out.metrics
    assert m.arrival_time <= m.first_token_time <= m.finish_time


def test_eos_stops_unless_ignored(tmp_path):
    """Make the model's own greedy token at step 3 its EOS id: generation must stop there."""
    probe, hf = make_checkpoint("qwen3_moe", tmp_path / "probe")
    prompt = _prompts()[0]
    ref = hf_greedy(hf, np.asarray([prompt]), NEW_TOKENS)[0].tolist()
    eos = ref[3]
    path, _ = make_checkpoint("qwen3_moe", tmp_path / "eos", eos_token_id=eos)
    llm = qllm_jax.LLM(path, **ENGINE)
    out = llm.generate([prompt], qllm_jax.SamplingParams(max_tokens=NEW_TOKENS, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids == ref[: ref.index(eos) + 1]
    assert llm.generate([prompt], GREEDY)[0].token_ids == ref


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(top_k=1.5), "top_k"),
        (dict(seed=-1), "seed"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        qllm_jax.SamplingParams(**kwargs)


def test_bad_inputs_are_rejected(mixtral):
    path, _ = mixtral
    eng = qllm_jax.Engine(path, **ENGINE)
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request("no tokenizer here")
    with pytest.raises(ValueError, match="token ids"):
        eng.add_request([1, 500])
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request(list(range(3, 100)) * 3)
    eng.add_request([1, 2, 3], request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        eng.add_request([1, 2, 3], request_id="a")
    with pytest.raises(ValueError, match="expert_group_size"):
        qllm_jax.Engine(path, expert_group_size=3, **ENGINE)
