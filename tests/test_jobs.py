"""Durable jobs in one process: input validation, the output format, stop strings and the
chat template, checkpoints that park a carry and resume it at its cursor, cancel, two jobs
sharing an engine, incompatible / corrupt / truncated checkpoints, a failed write.

Every resumed job is compared line by line (``created`` aside) with one uninterrupted run of
the same input: that is the property durable jobs promise (CPU, float32). The engine is the
built-in model with small passes, so passes are parked and resumed often.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest

import qllm_jax
from qllm_jax import checkpoint, jobs
from qllm_jax.openai_api import BadRequest, prepare

ENGINE = dict(
    dtype="float32",
    policy="qllm",
    kv_pages=96,
    page_size=16,
    max_batch_size=4,
    max_num_batched_tokens=16,
    prefill_chunk=8,
)


def request_lines() -> list[dict]:
    """Completions (greedy, seeded, sampled with a derived seed), a stop string, a chat line
    and two bad bodies."""
    out = []
    for i in range(7):
        body = {"model": "builtin", "prompt": f"Tale {i}: once upon a time", "max_tokens": 6 + i}
        body |= [{"temperature": 0}, {"temperature": 0.8, "seed": 11 + i}, {"top_p": 0.9}][i % 3]
        out.append(_line(f"c{i}", body))
    out.append(_line("stop", {"prompt": "Tale 1: once upon a time", "max_tokens": 20, "stop": "e"}))
    chat = {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 5, "temperature": 0}
    out.append(_line("chat", chat, "/v1/chat/completions"))
    out.append(_line("bad-temp", {"prompt": "x", "temperature": -1}))
    out.append(_line("bad-field", {"prompt": "x", "logprobs": 3}))
    return out


def _line(cid: str, body: dict, url: str = "/v1/completions") -> dict:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


@pytest.fixture(scope="module")
def model():
    return qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")


def engine(model, **kw) -> qllm_jax.Engine:
    return qllm_jax.Engine(model, compilation_cache_dir=None, **(ENGINE | kw))


def results(job_dir: Path) -> dict[str, dict]:
    """Every line of a job's output and error files by custom_id (each exactly once), without
    the ``created`` timestamps and the cached-token count (how much of a prompt the prefix
    cache held depends on timing, as timestamps do; checked to be a valid count)."""
    out: dict[str, dict] = {}
    for name in ("output.jsonl", "errors.jsonl"):
        path = job_dir / name
        for raw in path.read_text().splitlines() if path.exists() else []:
            line = json.loads(raw)
            assert line["custom_id"] not in out, f"{line['custom_id']} written twice"
            body = (line.get("response") or {}).get("body") or {}
            body.pop("created", None)
            if "usage" in body:
                details = body["usage"].pop("prompt_tokens_details")
                assert 0 <= details["cached_tokens"] < body["usage"]["prompt_tokens"]
            out[line["custom_id"]] = line
    return out


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> dict[str, dict]:
    """The uninterrupted run of ``request_lines()``."""
    runner = jobs.JobRunner(engine(model), checkpoint_every=None)
    job_dir = tmp_path_factory.mktemp("ref") / "job"
    job = runner.create(request_lines(), job_dir)
    assert runner.run(job)
    assert jobs.status(job_dir).status == "completed"
    return results(job_dir)


# -- formats -----------------------------------------------------------------------------------


def test_output_lines_follow_openai_batch_format(reference):
    assert set(reference) == {line["custom_id"] for line in request_lines()}
    ok = reference["c0"]
    assert ok["id"].startswith("batch_req_") and ok["error"] is None
    assert ok["response"]["status_code"] == 200 and ok["response"]["request_id"].startswith("req_")
    body = ok["response"]["body"]
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "builtin"
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("stop", "length") and isinstance(choice["text"], str)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    chat = reference["chat"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["model"] == "builtin-mixtral-v2"
    assert chat["choices"][0]["message"]["role"] == "assistant"
    for cid, param in (("bad-temp", "temperature"), ("bad-field", "logprobs")):
        err = reference[cid]["response"]
        assert err["status_code"] == 400
        assert err["body"]["error"]["param"] == param, err
        assert err["body"]["error"]["type"] == "invalid_request_error"


def test_ids_are_deterministic(model, reference, tmp_path):
    """The same input gives the same job id, response ids and tokens (the seed of a sampled
    request without one derives from the job id and custom_id); another input is another job
    whose explicitly seeded and greedy requests still give the same tokens."""
    runs = []
    for name in ("one", "two"):
        runner = jobs.JobRunner(engine(model), checkpoint_every=None)
        assert runner.run(runner.create(request_lines()[:3], tmp_path / name))
        runs.append(results(tmp_path / name))
    assert runs[0] == runs[1]
    assert all(runs[0][c]["id"] != reference[c]["id"] for c in runs[0])
    texts = lambda r: [r[c]["response"]["body"]["choices"] for c in ("c0", "c1")]  # noqa: E731
    assert texts(runs[0]) == texts(reference)


def test_stop_strings_cut_the_text(model):
    llm = qllm_jax.LLM(model, compilation_cache_dir=None, **(ENGINE | {"policy": "priority"}))
    prompt = "Tale 1: once upon a time"
    full = llm.generate(prompt, qllm_jax.SamplingParams(max_tokens=20, temperature=0))
    text = full[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text.find(stop)
    sp = qllm_jax.SamplingParams(max_tokens=20, temperature=0, stop=[stop, "\x00never"])
    (out,) = llm.generate(prompt, sp)
    assert out.finish_reason == "stop" and out.text == text[:cut]
    assert out.token_ids == full[0].token_ids[: len(out.token_ids)]
    assert len(out.token_ids) < len(full[0].token_ids)
    assert llm.engine.stats()["kv_pages_used"] == 0
    with pytest.raises(ValueError, match="stop"):
        qllm_jax.SamplingParams(stop=[""])
    with pytest.raises(ValueError, match="stop"):
        qllm_jax.SamplingParams(stop=3)


def test_chat_template_of_the_builtin_model(model):
    tok = model.tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<s>[INST] Be brief.\n\nHi [/INST] Hello!</s>[INST] Bye [/INST]"
    eng = engine(model)
    with pytest.raises(BadRequest, match="alternate"):
        prepare(eng, "/v1/chat/completions", {"messages": messages[2:]})


def test_bodies_are_validated_like_openai(model):
    eng = engine(model)
    ok = prepare(eng, "/v1/completions", {"prompt": [1, 2, 3], "stop": ["a", "b"]})
    assert ok.prompt_token_ids == [1, 2, 3] and ok.sampling.max_tokens == 16
    assert ok.sampling.stop == ("a", "b")
    chat = prepare(eng, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert chat.sampling.max_tokens == ENGINE["kv_pages"] * 16 - 16 - len(chat.prompt_token_ids)
    for body, param in (
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 99999]}, "prompt"),
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "stream": True}, "stream"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
        ({"prompt": "x" * 3000, "max_tokens": 2000}, "prompt"),
        ({"prompt": "x", "color": "red"}, "color"),
    ):
        with pytest.raises(BadRequest) as err:
            prepare(eng, "/v1/completions", body)
        assert err.value.param == param, (body, err.value)


def test_bad_inputs_fail_the_job_up_front(model, tmp_path):
    runner = jobs.JobRunner(engine(model), checkpoint_every=None)
    good = _line("a", {"prompt": "x"})
    bad = [
        "not json",
        json.dumps([1, 2]),
        json.dumps(good),
        json.dumps(good),  # duplicate custom_id
        json.dumps({**good, "custom_id": "m", "method": "GET"}),
        json.dumps({**good, "custom_id": "u", "url": "/v1/embeddings"}),
        json.dumps({**good, "custom_id": "b", "body": "x"}),
        json.dumps({k: v for k, v in good.items() if k != "custom_id"}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(bad) + "\n")
    with pytest.raises(jobs.JobInputError) as err:
        runner.create(path, tmp_path / "job")
    codes = [(e["line"], e["code"]) for e in err.value.errors]
    assert codes == [
        (1, "invalid_json_line"),
        (2, "invalid_json_line"),
        (4, "duplicate_custom_id"),
        (5, "invalid_method"),
        (6, "invalid_url"),
        (7, "invalid_body"),
        (8, "missing_required_parameter"),
    ]
    st = jobs.status(tmp_path / "job")
    assert st.status == "failed" and len(st.errors) == 7
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(jobs.JobInputError, match="no requests"):
        runner.create(empty, tmp_path / "job2")


def test_a_directory_holds_one_job(model, tmp_path):
    runner = jobs.JobRunner(engine(model), checkpoint_every=None)
    job = runner.create([_line("a", {"prompt": "x", "max_tokens": 2})], tmp_path / "job")
    assert runner.run(job)
    with pytest.raises(jobs.JobError, match="already holds job"):
        runner.create([_line("b", {"prompt": "y"})], tmp_path / "job")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f").write_text("x")
    with pytest.raises(jobs.JobError, match="not empty"):
        runner.create([_line("b", {"prompt": "y"})], tmp_path / "other")
    with pytest.raises(ValueError, match="best-effort"):
        runner.create([_line("b", {"prompt": "y"})], tmp_path / "ls", priority=0)


def test_prepare_touches_no_engine_state_and_start_queues(model, tmp_path):
    """``create`` = ``prepare`` (validation, off the engine thread in the server) + ``start``:
    a prepared job is validated on disk but unknown to the runner and the engine."""
    eng = engine(model)
    runner = jobs.JobRunner(eng, checkpoint_every=None)
    lines = [_line("a", {"prompt": "x", "max_tokens": 2}), _line("b", {"prompt": "y", "n": 2})]
    job = runner.prepare(lines, tmp_path / "job", job_id="j1")
    assert jobs.status(tmp_path / "job").status == "validating" and job.total == 2
    assert runner.jobs == {} and not eng.has_unfinished()
    assert set(results(tmp_path / "job")) == {"b"}  # the bad line's error, written up front
    other = runner.prepare(lines, tmp_path / "job2", job_id="j1")
    assert runner.start(job) is job and set(runner.jobs) == {"j1"}
    with pytest.raises(jobs.JobError, match="already running"):
        runner.start(other)
    assert runner.run(job) and jobs.status(tmp_path / "job").status == "completed"


# -- checkpoints -------------------------------------------------------------------------------


def _run_until_parked(runner: jobs.JobRunner, job: jobs.Job, max_steps: int = 400) -> None:
    """Step until a pass holding job rows is parked inside the forward pass: an LS request
    arrives while a job pass is mid-way."""
    eng, added = runner.engine, False
    for _ in range(max_steps):
        eng.step()
        passes = eng.scheduler.passes.values()
        mine = [p for p in passes if any(s in eng.scheduler.seqs for s in p.seq_ids)]
        if any(p.parked_since is not None and p.cursor > 0 for p in mine) and job.num_done:
            return
        if not added and any(p.cursor > 1 for p in mine):
            eng.add_request("An urgent question", qllm_jax.SamplingParams(max_tokens=3), 0)
            added = True
    raise AssertionError("no job pass was parked")


def test_parked_carry_resumes_at_its_cursor(model, reference, tmp_path):
    runner = jobs.JobRunner(engine(model), checkpoint_every=None)
    job = runner.create(request_lines(), tmp_path / "job")
    _run_until_parked(runner, job)
    step = runner.suspend(job)
    _, snap = checkpoint.CheckpointStore(tmp_path / "job" / "checkpoints").load()
    assert snap.meta["passes"] and all(p["cursor"] > 0 for p in snap.meta["passes"])
    parked = {p["cursor"] for p in snap.meta["passes"]}

    eng = engine(model)
    runner2 = jobs.JobRunner(eng, checkpoint_every=None)
    job2 = runner2.resume(tmp_path / "job")
    assert {p.cursor for p in eng.scheduler.passes.values()} == parked, step
    assert eng.executor.num_carries == len(parked)
    assert runner2.run(job2)
    assert results(tmp_path / "job") == reference
    assert not (tmp_path / "job" / "checkpoints").exists()  # removed once completed
    assert eng.stats()["kv_pages_used"] == 0 and eng.executor.num_carries == 0


def test_periodic_checkpoints_and_resume_from_any(model, reference, tmp_path):
    """Checkpoints every step; resuming from the second newest (the newest deleted, as if a
    crash had left its results on disk but not it) still gives every line exactly once."""
    runner = jobs.JobRunner(engine(model), checkpoint_every=1e-9, keep=2)
    job = runner.create(request_lines(), tmp_path / "job")
    while job.store._next < 4:  # a checkpoint after every step (each waited for)
        runner.engine.step()
        job.store.wait()
    assert not job.finished
    runner.close()  # as a crash would: no final checkpoint
    store = checkpoint.CheckpointStore(tmp_path / "job" / "checkpoints")
    steps = store.steps()
    assert len(steps) == 2  # only the last `keep`
    import shutil

    shutil.rmtree(tmp_path / "job" / "checkpoints" / str(steps[-1]))
    runner2 = jobs.JobRunner(engine(model), checkpoint_every=None)
    assert runner2.run(runner2.resume(tmp_path / "job"))
    assert results(tmp_path / "job") == reference


def test_corrupt_and_truncated_checkpoints(model, reference, tmp_path):
    runner = jobs.JobRunner(engine(model), checkpoint_every=None)
    job = runner.create(request_lines(), tmp_path / "job")
    for _ in range(30):
        runner.engine.step()
    runner.checkpoint(job, wait=True)
    for _ in range(10):
        runner.engine.step()
    runner.suspend(job)
    ck = tmp_path / "job" / "checkpoints"
    newest = max(int(p.name) for p in ck.iterdir())
    data = max((p for p in (ck / str(newest)).rglob("*") if p.is_file()), key=os.path.getsize)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped bit of the KV pages
    data.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="corrupt or truncated"):
        runner2 = jobs.JobRunner(engine(model), checkpoint_every=None)
        job2 = runner2.resume(tmp_path / "job")
    assert runner2.run(job2)
    assert results(tmp_path / "job") == reference

    # every checkpoint truncated: a clear error, and the job stays resumable by hand
    runner3 = jobs.JobRunner(engine(model), checkpoint_every=None)
    job3 = runner3.create(request_lines(), tmp_path / "job3")
    for _ in range(30):
        runner3.engine.step()
    runner3.suspend(job3)
    for f in (tmp_path / "job3" / "checkpoints").rglob("*"):
        if f.is_file() and f.stat().st_size > 1000:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(checkpoint.NoValidCheckpoint, match="no valid checkpoint"):
            jobs.JobRunner(engine(model), checkpoint_every=None).resume(tmp_path / "job3")


def test_incompatible_checkpoint(model, reference, tmp_path):
    runner = jobs.JobRunner(engine(model), checkpoint_every=None)
    job = runner.create(request_lines(), tmp_path / "job")
    for _ in range(30):
        runner.engine.step()
    runner.suspend(job)
    other = engine(model, page_size=8, kv_pages=192)
    with pytest.raises(checkpoint.IncompatibleCheckpoint, match="page_size 16 vs 8"):
        jobs.JobRunner(other, checkpoint_every=None).resume(tmp_path / "job")
    assert jobs.status(tmp_path / "job").status == "in_progress"  # nothing was changed
    runner2 = jobs.JobRunner(other, checkpoint_every=None)
    assert runner2.run(runner2.resume(tmp_path / "job", recompute=True))
    done = results(tmp_path / "job")
    assert set(done) == set(reference)
    # other mismatches are named too
    _, snap = checkpoint.CheckpointStore(_checkpoint_copy(model, tmp_path)).load()
    snap.meta["dtype"] = "bfloat16"
    snap.meta["model"] = dict(snap.meta["model"], digest="x", tensors="y")
    problems = checkpoint.mismatches(snap.meta, engine(model))
    assert problems == ["its weights differ", "dtype bfloat16 vs float32"]


def _checkpoint_copy(model, tmp_path) -> Path:
    runner = jobs.JobRunner(engine(model), checkpoint_every=None)
    job = runner.create(request_lines()[:2], tmp_path / "small")
    runner.engine.step()
    runner.suspend(job)
    return tmp_path / "small" / "checkpoints"


# orbax's writer threads report the failure once more as they shut down
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_failed_write_keeps_the_previous_checkpoint(model, reference, tmp_path):
    """A checkpoint that cannot be written (here: a file-size limit, as a full disk refuses
    writes) is an error, and the previous checkpoint stays valid."""
    runner = jobs.JobRunner(engine(model), checkpoint_every=None)
    job = runner.create(request_lines(), tmp_path / "job")
    for _ in range(20):
        runner.engine.step()
    good = runner.checkpoint(job, wait=True)
    for _ in range(5):
        runner.engine.step()
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, old[1]))
    try:
        with pytest.raises(checkpoint.CheckpointWriteError):
            runner.checkpoint(job, wait=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)
    # the failed write's leftovers are gone once its error is raised (orbax's other writer
    # threads were still writing into them when the first one failed)
    assert not list((tmp_path / "job" / "checkpoints").glob("*tmp*"))
    store = checkpoint.CheckpointStore(tmp_path / "job" / "checkpoints")
    assert store.steps() == [good] and store.load()[0] == good
    runner.close()
    runner2 = jobs.JobRunner(engine(model), checkpoint_every=None)
    job2 = runner2.resume(tmp_path / "job")
    assert not list((tmp_path / "job" / "checkpoints").glob("*tmp*"))  # cleaned on resume
    assert runner2.run(job2)
    assert results(tmp_path / "job") == reference


# -- cancel, and two jobs --------------------------------------------------------------------


def test_cancel_running_and_stopped_jobs(model, reference, tmp_path):
    runner = jobs.JobRunner(engine(model), checkpoint_every=None, cancel_poll_s=0)
    job = runner.create(request_lines(), tmp_path / "job")
    while job.num_done < 4:  # the two bad bodies and two results
        runner.engine.step()
    jobs.cancel(tmp_path / "job")  # as another process would: a marker
    assert jobs.status(tmp_path / "job").status == "cancelling"
    assert runner.run(job)
    st = jobs.status(tmp_path / "job")
    assert st.status == "cancelled" and st.completed + st.failed == st.total
    done = results(tmp_path / "job")
    assert set(done) == set(reference)
    cancelled = [c for c, x in done.items() if (x["error"] or {}).get("code") == "batch_cancelled"]
    assert cancelled and all(done[c] == reference[c] for c in done if c not in cancelled)
    assert runner.engine.stats()["kv_pages_used"] == 0

    # a stopped job is cancelled in place
    job2 = runner.create(request_lines(), tmp_path / "job2")
    for _ in range(20):
        runner.engine.step()
    runner.suspend(job2)
    assert jobs.cancel(tmp_path / "job2").status == "cancelled"
    assert set(results(tmp_path / "job2")) == set(reference)
    assert not (tmp_path / "job2" / "checkpoints").exists()


def test_two_jobs_share_the_engine_fairly(model, reference, tmp_path):
    eng = engine(model)
    runner = jobs.JobRunner(eng, checkpoint_every=None, max_in_flight=4)
    body = {"max_tokens": 4, "temperature": 0}
    many = [_line(f"n{i}", body | {"prompt": f"Fact {i}:"}) for i in range(10)]
    a = runner.create(many, tmp_path / "a", job_id="a")
    b = runner.create(many, tmp_path / "b", job_id="b")
    order = []
    ls = eng.add_request("Meanwhile, an LS request", qllm_jax.SamplingParams(max_tokens=4), 0)
    seen_ls = False
    while not (a.finished and b.finished):
        for out in eng.step():
            seen_ls |= out.request_id == ls and out.finished
        for job in (a, b):
            order += [job.id] * (job.num_done - order.count(job.id))
    assert seen_ls  # the engine's own requests still come back from step()
    first_half = order[: len(order) // 2]
    assert abs(first_half.count("a") - first_half.count("b")) <= 2, order
    ra, rb = results(tmp_path / "a"), results(tmp_path / "b")
    assert [x["response"]["body"]["choices"] for x in ra.values()] == [
        rb[c]["response"]["body"]["choices"] for c in ra
    ]


def test_snapshot_is_plain_data(model):
    eng = engine(model)
    eng.add_request("Hello there", qllm_jax.SamplingParams(max_tokens=4, stop="x"), 1, None, "r")
    for _ in range(3):
        eng.step()
    snap = checkpoint.capture(eng, ["r", "unknown"])
    json.dumps(snap.meta)  # JSON-ready
    assert [s["request_id"] for s in snap.meta["requests"]] == ["r"]
    assert all(isinstance(x, np.ndarray) for x in snap.arrays.values())
    state = snap.meta["requests"][0]
    assert state["sampling"]["stop"] == ["x"] and state["kv_tokens"] > 0
