"""``qllm-jax serve`` as a real process on a free loopback port, driven by the official
``openai`` client (and httpx where the client cannot send what we test: invalid JSON, a raw
upload, a dropped stream).

What is checked: greedy answers (completions and chat, streamed and not) equal the offline
``LLM``'s; ``service_tier`` and ``priority`` reach the scheduler (its row counters in
``/metrics``, by class); a client that drops a stream has its request aborted and its KV pages
freed; every kind of bad input gets OpenAI's error JSON with its 4xx code and the server goes
on; a batch end to end (files, batches, output file), cancel; a server SIGKILLed mid-batch and
restarted with the same state directory completes the batch with the same outputs; 200
concurrent clients mixing tiers all get their right answer; a full LS queue answers 429;
``/metrics`` parses with prometheus-client's parser.

Both server processes and the reference share one engine shape (so one compilation cache
serves them all) and the built-in model in float32 (tokens do not depend on the batch).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import qllm_jax

KV_PAGES = 96  # 95 usable pages of 16 tokens
ENGINE = dict(
    dtype="float32",
    policy="qllm",
    granularity="layer",
    kv_pages=KV_PAGES,
    max_batch_size=8,
    max_num_batched_tokens=32,
    prefill_chunk=16,
)
ENGINE_FLAGS = [
    "--dtype", "float32", "--policy", "qllm", "--granularity", "layer",
    "--kv-pages", str(KV_PAGES), "--max-batch-size", "8", "--max-num-batched-tokens", "32",
    "--prefill-chunk", "16",
]  # fmt: skip
FLAGS = [*ENGINE_FLAGS, "--no-warmup", "--log-level", "warning", "--expert-stats-every", "1"]
MODEL = "builtin-mixtral-v2"
PROMPTS = ["Once upon a time", "The capital of France", "def main():", "Hello!", "1, 2, 3,"]
STARTUP_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``qllm-jax serve`` process."""

    def __init__(self, state_dir: Path, cache: str, *extra: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = state_dir.parent / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "qllm_jax.cli", "serve", "--port", str(self.port),
               "--state-dir", str(state_dir), "--compilation-cache-dir", cache,
               *FLAGS, *extra]  # fmt: skip
        env = os.environ | {"JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(cmd, env=env, stdout=open(self.log, "wb"), stderr=-2)  # noqa: SIM115
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert self.proc.poll() is None, f"server exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def metrics(self) -> dict[tuple, float]:
        """Every sample of ``/metrics`` by (name, sorted labels), via prometheus' parser."""
        text = httpx.get(self.url + "/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)


def sample(metrics: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jax-cache"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache):
    srv = Server(tmp_path_factory.mktemp("state") / "state", cache, "--max-upload-bytes", "32768")
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def llm(cache):
    return qllm_jax.LLM(qllm_jax.builtin_model_dir(), compilation_cache_dir=cache, **ENGINE)


@pytest.fixture(scope="module")
def ref_outputs(llm) -> dict[str, qllm_jax.RequestOutput]:
    """The offline engine's greedy 6-token answer to each prompt."""
    outs = llm.generate(PROMPTS, qllm_jax.SamplingParams(max_tokens=6, temperature=0))
    return dict(zip(PROMPTS, outs))


@pytest.fixture(scope="module")
def reference(ref_outputs) -> dict[str, str]:
    return {p: o.text for p, o in ref_outputs.items()}


def _chat_text(llm, content: str, max_tokens: int) -> str:
    tok = llm.tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    sp = qllm_jax.SamplingParams(max_tokens=max_tokens, temperature=0)
    return llm.generate([ids], sp)[0].text


def test_models_health_and_greedy_answers_equal_the_engine(server, llm, reference, ref_outputs):
    c = server.client
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    for prompt, want in reference.items():
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        ref = ref_outputs[prompt]
        assert r.choices[0].text == want and r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.service_tier == "default"
    # streamed: the deltas add up to the same text; the last choice chunk has the reason, then
    # the usage-only chunk
    prompt = PROMPTS[0]
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == reference[prompt]
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    # chat, streamed and not, against the chat template run offline
    want = _chat_text(llm, "Tell me a story", 8)
    msgs = [{"role": "user", "content": "Tell me a story"}]
    r = c.chat.completions.create(
        model=MODEL, messages=msgs, max_completion_tokens=8, temperature=0
    )
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    stream = c.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"
    # the prefix cache shows in OpenAI's usage field: a prompt of several 16-token pages, sent
    # again, maps its full pages before the last token
    long = "The quick brown fox jumps over the lazy dog. " * 6
    first = c.completions.create(model=MODEL, prompt=long, max_tokens=1, temperature=0).usage
    again = c.completions.create(model=MODEL, prompt=long, max_tokens=1, temperature=0).usage
    cached = again.prompt_tokens_details.cached_tokens
    assert first.prompt_tokens == again.prompt_tokens > 48
    assert cached % 16 == 0 and again.prompt_tokens - 16 <= cached < again.prompt_tokens


def test_stop_strings_cut_the_text_streamed_or_not(server, reference):
    c = server.client
    full = reference[PROMPTS[0]]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = full[: full.find(stop)]
    r = c.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(
        c.completions.create(
            model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, stop=[stop], stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == cut


def test_service_tier_and_priority_reach_the_scheduler(server):
    c = server.client

    def rows():
        m = server.metrics()
        return {k: sample(m, "qllm:scheduled_rows_total", priority_class=k) for k in ("ls", "be")}

    def ask(**kw):  # (the client takes service_tier for chat; completions get it in the body)
        msgs = [{"role": "user", "content": "Tiers"}]
        return c.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=3, temperature=0, **kw
        )

    for kw, cls, tier in (
        ({"service_tier": "flex"}, "be", "flex"),
        ({"service_tier": "priority"}, "ls", "priority"),
        ({"service_tier": "auto"}, "ls", "default"),
        ({"service_tier": "priority", "extra_body": {"priority": 3}}, "be", "flex"),
        ({"service_tier": "flex", "extra_body": {"priority": 0}}, "ls", "default"),
    ):
        before = rows()
        assert ask(**kw).service_tier == tier, kw
        after = rows()
        other = "ls" if cls == "be" else "be"
        assert after[cls] > before[cls] and after[other] == before[other], (kw, before, after)
    m = server.metrics()
    assert sample(m, "qllm:request_success_total", priority_class="be") >= 2
    assert sample(m, "qllm:time_to_first_token_seconds_count", priority_class="be") >= 2
    assert sample(m, "qllm:compilations_total") > 0  # (the warm-up's, at least)
    # every (token, pick) of 4 layers of 2 picks, read back within a step or so of routing
    assert sample(m, "qllm:expert_routed_tokens_total", layer="3") > 0


def _wait(cond, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_dropped_stream_is_aborted_and_frees_its_pages(server):
    body = {
        "model": MODEL,
        "prompt": "Keep going",
        "max_tokens": 1400,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    aborted = sample(server.metrics(), "qllm:request_success_total", finished_reason="abort")
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        while got < 3:
            got += next(lines).startswith("data: ")
        # (the gauges are a snapshot at most 50 ms old: the first tokens can come sooner)
        _wait(
            lambda: (
                sample(m := server.metrics(), "qllm:kv_pages_used") >= 1  # pages grow
                and sample(m, "qllm:num_requests_running", priority_class="ls") == 1
            )
        )
    t0 = time.monotonic()  # the connection is closed here
    m = {}

    def freed() -> bool:
        nonlocal m
        m = server.metrics()
        return (
            sample(m, "qllm:kv_pages_used") == 0
            and sample(m, "qllm:request_success_total", finished_reason="abort") == aborted + 1
        )

    _wait(freed)
    assert time.monotonic() - t0 < 5  # it had 1397 tokens to go: many seconds here
    assert sample(m, "qllm:num_requests_running") == 0

    # a client that stops waiting for a non-streamed answer: the same
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body | {"stream": False}, timeout=1.0)
    aborted += 1
    t0 = time.monotonic()
    _wait(freed)
    assert time.monotonic() - t0 < 5


BAD = [
    # (path, raw body or JSON, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 422, "body"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 2}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "service_tier": "gold"}, 400,
     "service_tier"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "priority": "high"}, 400, "priority"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {}}, 400,
     "stream_options"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/batches", {"input_file_id": "file-nope", "endpoint": "/v1/completions",
                     "completion_window": "24h"}, 404, "file_id"),
    ("/v1/batches", {"input_file_id": "file-nope", "endpoint": "/v1/embeddings"}, 400,
     "endpoint"),
]  # fmt: skip


def test_bad_input_gets_its_status_and_the_server_goes_on(server):
    for path, body, status, param in BAD:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = httpx.post(server.url + path, **kw)
        assert r.status_code == status, (path, body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["message"] and err["type"], (body, err)
        ok = server.client.completions.create(model=MODEL, prompt="x", max_tokens=1)
        assert ok.choices[0].finish_reason in ("length", "stop")
    assert (
        "maximum context length is 4096"
        in httpx.post(
            server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5000}
        ).json()["error"]["message"]
    )
    for path in ("/v1/batches/batch_nope", "/v1/files/file-nope", "/v1/files/file-nope/content",
                 "/v1/models/other", "/v1/nothing"):  # fmt: skip
        r = httpx.get(server.url + path)
        assert r.status_code == 404 and "error" in r.json(), path
    big = server.client.files.create
    with pytest.raises(openai.APIStatusError) as e:
        big(file=("big.jsonl", b"x" * 40000), purpose="batch")
    assert e.value.status_code == 413
    with pytest.raises(openai.BadRequestError):
        big(file=("in.jsonl", b"{}"), purpose="fine-tune")
    with pytest.raises(openai.NotFoundError):
        server.client.batches.retrieve("batch_nope")
    assert server.proc.poll() is None


def _batch_lines(n: int, max_tokens: int = 6) -> bytes:
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                  "temperature": 0}}
        for i in range(n)
    ]  # fmt: skip
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


def _finish(client, batch_id: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        assert time.monotonic() < deadline, f"batch still {b.status}"
        time.sleep(0.05)


def _outputs(client, batch) -> dict[str, str]:
    text = client.files.content(batch.output_file_id).text
    out = {}
    for raw in text.splitlines():
        line = json.loads(raw)
        assert line["custom_id"] not in out
        assert line["response"]["status_code"] == 200
        out[line["custom_id"]] = line["response"]["body"]["choices"][0]["text"]
    return out


def test_a_batch_end_to_end(server, reference):
    c = server.client
    data = (
        _batch_lines(6)
        + json.dumps(
            {
                "custom_id": "bad",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"prompt": "x", "temperature": -1},
            }
        ).encode()
    )
    be_tokens = sample(server.metrics(), "qllm:generation_tokens_total", priority_class="be")
    f = c.files.create(file=("in.jsonl", data), purpose="batch")
    assert c.files.retrieve(f.id).bytes == len(data)
    assert c.files.content(f.id).content == data
    b = c.batches.create(
        input_file_id=f.id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata={"who": "test"},
    )
    assert b.status in ("in_progress", "finalizing", "completed") and b.request_counts.total == 7
    b = _finish(c, b.id)
    assert b.status == "completed" and b.metadata == {"who": "test"}
    assert (b.request_counts.completed, b.request_counts.failed) == (6, 1)
    assert b.in_progress_at and b.finalizing_at and b.completed_at
    out = _outputs(c, b)
    assert out == {f"r{i}": reference[PROMPTS[i % len(PROMPTS)]] for i in range(6)}
    usage = sum(
        json.loads(raw)["response"]["body"]["usage"]["completion_tokens"]
        for raw in c.files.content(b.output_file_id).text.splitlines()
    )  # batch requests are best-effort, and counted in the metrics
    after = sample(server.metrics(), "qllm:generation_tokens_total", priority_class="be")
    assert after - be_tokens == usage
    err = json.loads(c.files.content(b.error_file_id).text)
    assert err["custom_id"] == "bad" and err["response"]["status_code"] == 400
    assert b.id in [x.id for x in c.batches.list().data]
    assert c.batches.cancel(b.id).status == "completed"  # nothing left to cancel
    assert c.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        c.files.retrieve(f.id)
    # a batch whose input is invalid as a whole fails at validation, with the reasons
    bad = c.files.create(file=("bad.jsonl", b"not json\n"), purpose="batch")
    b = c.batches.create(input_file_id=bad.id, endpoint="/v1/completions", completion_window="24h")
    assert b.status == "failed" and b.errors.data[0].code == "invalid_json_line"


def test_cancel_a_batch(server):
    c = server.client
    f = c.files.create(file=("in.jsonl", _batch_lines(40, max_tokens=30)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    b = c.batches.cancel(b.id)
    assert b.status in ("cancelling", "cancelled")
    b = _finish(c, b.id)
    assert b.status == "cancelled" and b.cancelled_at
    counts = b.request_counts
    assert counts.total == 40 and counts.failed >= 1 and counts.completed + counts.failed == 40


def test_200_concurrent_clients_mixing_tiers(server, reference):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        tiers = ["default", "flex", "priority", "auto"]

        async def one(i: int):
            prompt = PROMPTS[i % len(PROMPTS)]
            r = await client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=6,
                temperature=0,
                extra_body={"service_tier": tiers[i % 4]},
            )
            return prompt, r

        try:
            return await asyncio.gather(*(one(i) for i in range(200)))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert len(results) == 200
    for prompt, r in results:
        assert r.choices[0].text == reference[prompt]
    assert {r.service_tier for _, r in results} == {"default", "flex", "priority"}
    m = server.metrics()
    assert sample(m, "qllm:request_success_total", priority_class="be") >= 50


def test_the_bench_client_reads_the_stream_the_openai_client_reads(server, reference):
    """``experiments/serve_bench.py``'s ``StreamClient`` (httpx's request bytes on asyncio
    streams, the one that times the HTTP arm) parses the chunked SSE stream to the same
    text, and reuses its keep-alive connection for the next request."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    import serve_bench

    prompt = PROMPTS[0]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True}
    lines: list[bytes] = []

    async def two_requests() -> int:
        client = serve_bench.StreamClient(server.url)
        await client.stream("/v1/completions", body, lines.append)
        await client.stream("/v1/completions", body, lines.append)
        idle = len(client._idle)
        await client.aclose()
        return idle

    assert asyncio.run(two_requests()) == 1
    data = [line[6:] for line in lines if line.startswith(b"data: ")]
    assert data.count(b"[DONE]") == 2
    events = [json.loads(d) for d in data if d != b"[DONE]"]
    assert "".join(e["choices"][0]["text"] for e in events) == reference[prompt] * 2
    assert sum(serve_bench._is_token_event(line) for line in lines) >= 2


def test_metrics_parse_and_name_every_series(server):
    server.client.completions.create(model=MODEL, prompt="metrics", max_tokens=2)
    names = {name for name, _ in server.metrics()}
    for want in (
        "qllm:time_to_first_token_seconds_bucket",
        "qllm:inter_token_latency_seconds_bucket",
        "qllm:e2e_request_latency_seconds_bucket",
        "qllm:request_queue_time_seconds_bucket",
        "qllm:prompt_tokens_total",
        "qllm:generation_tokens_total",
        "qllm:request_success_total",
        "qllm:num_requests_running",
        "qllm:num_requests_waiting",
        "qllm:num_parked_rows",
        "qllm:kv_pages_used",
        "qllm:kv_cache_usage_perc",
        "qllm:num_preemptions_total",
        "qllm:num_evictions_total",
        "qllm:kv_swapped_pages_total",
        "qllm:swap_pages_free",
        "qllm:scheduled_rows_total",
    ):
        assert want in names, want
    m = server.metrics()
    assert sample(m, "qllm:prompt_tokens_total", priority_class="ls") > 0
    assert sample(m, "qllm:requests_rejected_total", status_code="400") > 0


def test_sigkill_mid_batch_then_restart_completes_it_and_a_full_ls_queue_is_429(
    tmp_path, cache, llm
):
    outs = llm.generate(PROMPTS, qllm_jax.SamplingParams(max_tokens=32, temperature=0))
    reference = {p: o.text for p, o in zip(PROMPTS, outs)}
    state = tmp_path / "state"
    # (pages reserved for prompt + max_tokens at admission: a long request keeps others waiting)
    flags = ["--checkpoint-every", "0.1", "--max-waiting-ls", "2", "--no-grow-pages"]
    srv = Server(state, cache, *flags)
    try:
        c = srv.client
        f = c.files.create(file=("in.jsonl", _batch_lines(48, max_tokens=32)), purpose="batch")
        b = c.batches.create(
            input_file_id=f.id, endpoint="/v1/completions", completion_window="24h"
        )
        job = state / "batches" / b.id
        _wait(
            lambda: (
                _count(job / "output.jsonl") >= 3
                and any(p.is_dir() and "tmp" not in p.name for p in (job / "checkpoints").glob("*"))
            ),
            timeout=60,
        )
        srv.kill(signal.SIGKILL)
        assert 0 < _count(job / "output.jsonl") < 48, "the batch finished before the kill"
    finally:
        srv.kill(signal.SIGKILL)
    srv = Server(state, cache, *flags)
    try:
        c = srv.client
        done = _finish(c, b.id)
        assert done.status == "completed" and done.request_counts.completed == 48
        assert _outputs(c, done) == {
            f"r{i}": reference[PROMPTS[i % len(PROMPTS)]] for i in range(48)
        }
        _full_ls_queue_is_429(srv)
    finally:
        srv.kill()


def _count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _full_ls_queue_is_429(srv: Server) -> None:
    """One LS request holds most KV pages, two more wait for pages (the limit here), so a
    third waiting one is refused with 429; best-effort work still queues."""
    url = srv.url + "/v1/completions"

    def body(max_tokens: int, **kw) -> dict:
        return {
            "model": MODEL,
            "prompt": "Fill",
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            **kw,
        }

    with httpx.Client(timeout=30) as h:
        streams = [h.stream("POST", url, json=body(1400))] + [
            h.stream("POST", url, json=body(300)) for _ in range(2)
        ]
        opened = []
        try:
            for s in streams:
                opened.append(s.__enter__())
                assert opened[-1].status_code == 200
                if len(opened) == 1:  # a token: it holds its pages (keep the iterator:
                    lines = opened[0].iter_lines()  # closing it would drop the stream)
                    assert next(lines).startswith("data: ")
            with pytest.raises(openai.RateLimitError) as e:
                srv.client.completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert e.value.status_code == 429
            with httpx.Client(timeout=30) as h2:  # best-effort still queues
                r = h2.post(url, json=body(2, stream=False, service_tier="flex"), timeout=0.5)
        except httpx.ReadTimeout:
            r = None  # it queued behind the LS requests: fine, not refused
        finally:
            for s in streams[: len(opened)]:
                s.__exit__(None, None, None)
        assert r is None or r.status_code == 200
    _wait(lambda: sample(srv.metrics(), "qllm:kv_pages_used") == 0)
    assert srv.client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices


def test_an_idle_engine_loop_runs_a_command_at_once():
    """The engine thread waits on an event when idle, not on a poll: with a 30 s idle wait a
    command (what a new request is) still runs at once, and so does one sent mid-run."""
    from qllm_jax import jobs, server

    engine = qllm_jax.Engine(qllm_jax.random_model("mixtral-tiny", "float32"), kv_pages=16)
    runner = jobs.JobRunner(engine, checkpoint_every=None)
    loop = server.EngineLoop(engine, runner, server.Metrics("m"), idle_wait_s=30.0)
    loop.start()
    try:
        for _ in range(3):
            time.sleep(0.2)  # idle again: waiting
            sent = time.monotonic()
            assert loop.call(time.monotonic).result(timeout=10) - sent < 5.0
    finally:
        loop.stop()
    assert not loop.alive and loop.error is None


def test_the_engine_thread_waits_until_latency_sensitive_tokens_are_read():
    """After a step that gave a LS request its first token the engine thread starts no step
    before the event loop's reader has it (``ls_delivery_wait_s``); later tokens and BE
    streams are not waited for."""
    import asyncio

    from qllm_jax import jobs, server

    engine = qllm_jax.Engine(qllm_jax.random_model("mixtral-tiny", "float32"), kv_pages=16)
    runner = jobs.JobRunner(engine, checkpoint_every=None)
    with pytest.raises(ValueError, match="ls_delivery_wait_s"):
        server.EngineLoop(engine, runner, server.Metrics("m"), ls_delivery_wait_s=-1)
    loop = server.EngineLoop(engine, runner, server.Metrics("m"), ls_delivery_wait_s=30.0)
    steps: list[tuple[float, int]] = []  # (start, the request's tokens before the step)
    step, req = engine.step, None

    def timed_step():
        steps.append((time.monotonic(), len(req.output_token_ids) if req else 0))
        return step()

    engine.step = timed_step

    async def read(priority: int, lag: float = 0.0, then: float = 0.0) -> list[tuple[float, int]]:
        nonlocal req
        sp = qllm_jax.SamplingParams(max_tokens=6, ignore_eos=True)
        steps.clear()
        req = engine.make_request([5, 6, 7, 8], sp, priority)
        loop.reserve(server._class(priority))
        stream = server.OutputStream(asyncio.get_running_loop())
        await asyncio.wrap_future(loop.submit(req, stream))
        await asyncio.sleep(lag)  # a slow reader
        got = []
        while True:
            out = await stream.next()
            got.append((time.monotonic(), len(out.token_ids)))
            if out.finished:
                return got
            await asyncio.sleep(then)  # slow after the first read

    def read_before_next_step(got) -> list[bool]:
        # a read of n tokens: the next step that starts with n tokens (the one after the step
        # that made the n-th) starts after the read
        return [all(t > at for t, before in steps if before == n) for at, n in got]

    loop.start()
    try:
        t0 = time.monotonic()
        firsts = []
        for _ in range(3):
            ls = asyncio.run(read(0))
            assert [n for _, n in ls] == [1, 2, 3, 4, 5, 6]
            firsts.append(read_before_next_step(ls)[0])
        took = time.monotonic() - t0
        late = asyncio.run(read(0, then=2.0))  # later LS tokens: not waited for
        late_steps = [t for t, n in steps if n > 0]
        be = asyncio.run(read(1, lag=2.0))  # BE: the engine runs on while nobody reads
        be_steps = [t for t, _ in steps]
    finally:
        loop.stop()
    assert all(firsts) and took < 25, firsts  # (never the 30 s timeout)
    assert late[-1][1] == 6 and max(late_steps) < late[1][0]
    assert be[-1][1] == 6 and max(be_steps) < be[0][0]


def test_generate_from_the_shell(cache, reference):
    prompt = PROMPTS[1]
    out = subprocess.run(
        [sys.executable, "-m", "qllm_jax.cli", "generate", prompt, "--max-tokens", "6",
         "--compilation-cache-dir", cache, *ENGINE_FLAGS],
        capture_output=True, text=True, timeout=120, env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == reference[prompt] + "\n"
    assert "finish_reason=" in out.stderr


def test_streamed_text_holds_back_what_may_still_change():
    from qllm_jax.server import _stream_text

    assert _stream_text("abc", False, ()) == "abc"
    assert _stream_text("ab\ufffd", False, ()) == "ab"  # half a UTF-8 character
    assert _stream_text("hello wo", False, ("world",)) == "hello "  # may become the stop
    assert _stream_text("hello w", False, ("xyz", "wx")) == "hello "
    assert _stream_text("hello wo", True, ("world",)) == "hello wo"  # finished: all of it


def test_serve_and_generate_help():
    for command, flags in (
        ("serve", ["--host", "--port", "--state-dir", "--max-waiting-ls", "--grow-pages",
                   "--policy", "--kv-pages"]),
        ("generate", ["--max-tokens", "--temperature", "--stop", "--policy"]),
    ):  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-m", "qllm_jax.cli", command, "--help"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        for flag in flags:
            assert flag in out.stdout, (command, flag)
