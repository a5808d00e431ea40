"""What the HTTP server costs: LS latency over HTTP against the engine driven directly.

One open-loop workload (Poisson arrivals from a fixed seed: latency-sensitive requests on the
default tier, best-effort ones on ``flex``) is run four ways:

1. ``engine``: through ``Engine`` in this process (add at the arrival time, step);
2. ``http``: against a ``qllm-jax serve`` process, streamed over HTTP (TTFT is measured by the
   client: request sent to first token received);
3. ``http+batch``: the same, with a best-effort batch (``/v1/batches``) running meanwhile;
4. ``burst``: ``--burst`` concurrent requests at once, for the requests/s the server sustains
   and the concurrency reached (requests holding KV pages at once, from ``/metrics``).

``engine`` and ``http`` alternate: the workload is cut into ``--rounds`` windows of time and
each window runs through the engine and over HTTP (both stay up meanwhile), in an order rotated
by one each window (whichever arm ran first after the idle gap between windows measured
differently), so a change in the machine's load falls on all arms alike; the per-window p90s
show the spread. The HTTP client (``--client``) is ``raw`` by default: ``StreamClient``, which
sends the bytes httpx sends on bare asyncio streams and reads the chunked SSE stream, so the
``http`` arm times the server and not the client's own parsing, which here runs on the same
two cores as the server and its XLA threads (a real client runs elsewhere);
``--also-client httpx`` adds an arm in the same windows with httpx's ``AsyncClient``, the
transport of the official ``openai`` package, which shows the client's share.

Reported: LS TTFT p50/p90 of each arm, the ratio http / engine of the LS TTFT p90 (target
<= 1.15) with a 95 % bootstrap interval (requests resampled within each arm), the same for
every other client arm, http+batch / http, completed requests/s. Each arm is preceded by a
short warm-up run of the same workload so no window compiles (the server also warms up at
start); the compilations inside each measured window are recorded (this process's for
``engine``, the server's ``qllm:compilations_total`` for the others), and the run is valid
only if all are 0.

    python experiments/serve_bench.py --quick      # a short smoke run (~1 min on 2 CPU cores)
    python experiments/serve_bench.py              # 30 s per arm
    python experiments/serve_bench.py --duration 60 --rounds 6 --also-client httpx  # README

Writes ``experiments/results/serve-bench-<device>.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import jax
from job_bench import bootstrap_ratio  # (experiments/: the same p_q ratio interval)

import qllm_jax
from qllm_jax import compile_log
from qllm_jax.scheduler.metrics import percentile

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_NAME = "bench"


def engine_flags(args) -> dict:
    return dict(
        dtype=args.dtype,
        policy=args.policy,
        granularity=args.granularity,
        kv_pages=args.kv_pages,
        max_batch_size=args.max_batch_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefill_chunk=args.prefill_chunk,
        grow_pages=True,  # as `qllm-jax serve` runs by default: both arms, one configuration
    )


def workload(args, duration: float, seed: int, vocab: int) -> list[dict]:
    """Arrivals (seconds from the start) of LS and BE requests, merged in time order."""
    rng = random.Random(seed)
    items = []
    for cls, rate, prompt, out in (
        ("ls", args.ls_rate, args.ls_prompt, args.ls_output),
        ("be", args.be_rate, args.be_prompt, args.be_output),
    ):
        t = rng.expovariate(rate)
        while t < duration:
            ids = [rng.randrange(3, vocab) for _ in range(prompt)]
            items.append({"t": t, "cls": cls, "prompt": ids, "max_tokens": out})
            t += rng.expovariate(rate)
    return sorted(items, key=lambda x: x["t"])


def run_engine(eng: qllm_jax.Engine, items: list[dict]) -> dict:
    """The workload through the engine directly; TTFT from the engine's own clock."""
    ttft: dict[str, float] = {}
    cls: dict[str, str] = {}
    done = 0
    i = 0
    t0 = time.monotonic()
    while i < len(items) or eng.has_unfinished():
        now = time.monotonic() - t0
        while i < len(items) and items[i]["t"] <= now:
            it = items[i]
            sp = qllm_jax.SamplingParams(
                max_tokens=it["max_tokens"], temperature=0, ignore_eos=True
            )
            prio = 0 if it["cls"] == "ls" else 1
            rid = eng.add_request(it["prompt"], sp, prio, t0 + it["t"], f"r{i}")
            cls[rid] = it["cls"]
            i += 1
        if not eng.has_unfinished():
            time.sleep(0.0005)
            continue
        for out in eng.step():
            if out.token_ids and out.request_id not in ttft:
                ttft[out.request_id] = out.metrics.first_token_time - out.metrics.arrival_time
            done += out.finished
    wall = time.monotonic() - t0
    return {
        "ls_ttft": [v for k, v in ttft.items() if cls[k] == "ls"],
        "be_ttft": [v for k, v in ttft.items() if cls[k] == "be"],
        "completed": done,
        "wall_s": wall,
    }


def completion_body(it: dict) -> dict:
    return {
        "model": MODEL_NAME,
        "prompt": it["prompt"],
        "max_tokens": it["max_tokens"],
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "service_tier": "default" if it["cls"] == "ls" else "flex",
    }


def _is_token_event(line: str | bytes) -> bool:
    """An SSE line of a completion chunk that carries text (the first one ends the TTFT)."""
    if isinstance(line, bytes):
        return line.startswith(b"data: ") and b'"text": "' in line
    return line.startswith("data: ") and '"text": "' in line


async def _one_httpx(client: httpx.AsyncClient, url: str, it: dict, t_send: float) -> float:
    first = None
    async with client.stream("POST", url + "/v1/completions", json=completion_body(it)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and _is_token_event(line):
                first = time.monotonic() - t_send
    return first if first is not None else float("nan")


class StreamClient:
    """A lean HTTP/1.1 client on asyncio streams for the streamed completions: the same
    request bytes as ``httpx`` sends (built by an ``httpx.Client``: its headers, its JSON),
    keep-alive connections reused as ``httpx`` reuses them, the chunked SSE response read to
    its end. It exists because httpx's async machinery cost about 1-2 ms a request on this 2-core
    box, on the same cores as the server: that is the client's cost, not the server's."""

    def __init__(self, url: str) -> None:
        self.url = url
        split = httpx.URL(url)
        self.host, self.port = split.host, split.port
        self._build = httpx.Client()  # only builds requests (headers, body); sends nothing
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def request_bytes(self, path: str, body: dict) -> bytes:
        req = self._build.build_request("POST", self.url + path, json=body)
        head = [f"POST {req.url.raw_path.decode()} HTTP/1.1".encode()]
        head += [k + b": " + v for k, v in req.headers.raw]
        return b"\r\n".join(head) + b"\r\n\r\n" + req.content

    async def _send(self, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        """Send ``data`` on an idle keep-alive connection, or a new one; the response head.
        A reused connection that the server closed meanwhile (its keep-alive timeout) is
        dropped and the request sent again on a new one."""
        while self._idle:
            reader, writer = self._idle.pop()
            if writer.is_closing() or reader.at_eof():
                writer.close()
                continue
            writer.write(data)
            try:
                return reader, writer, await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(data)
        return reader, writer, await reader.readuntil(b"\r\n\r\n")

    async def stream(self, path: str, body: dict, on_line: Callable[[bytes], None]) -> None:
        """POST ``body`` and call ``on_line`` with every line of the SSE response as it
        arrives; raises on a status other than 200."""
        reader, writer, head = await self._send(self.request_bytes(path, body))
        status = int(head.split(b" ", 2)[1])
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:] if h)
        )
        if status != 200 or headers.get(b"transfer-encoding") != b"chunked":
            writer.close()
            raise RuntimeError(f"{path}: HTTP {status} {head[:200]!r}")
        buf = b""
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers
                break
            buf += (await reader.readexactly(size + 2))[:-2]
            *lines, buf = buf.split(b"\n")
            for line in lines:
                on_line(line)
        if headers.get(b"connection") == b"close":
            writer.close()
        else:
            self._idle.append((reader, writer))

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()
        self._build.close()


async def _one_raw(client: StreamClient, it: dict, t_send: float) -> float:
    first = None

    def on_line(line: bytes) -> None:
        nonlocal first
        if first is None and _is_token_event(line):
            first = time.monotonic() - t_send

    await client.stream("/v1/completions", completion_body(it), on_line)
    return first if first is not None else float("nan")


@contextlib.asynccontextmanager
async def streamer(url: str, kind: str):
    """``send(it, t_send) -> TTFT`` over the chosen client (``raw``: ``StreamClient``)."""
    if kind == "httpx":
        limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            yield lambda it, t: _one_httpx(client, url, it, t)
        return
    client = StreamClient(url)
    try:
        yield lambda it, t: _one_raw(client, it, t)
    finally:
        await client.aclose()


async def run_http(url: str, items: list[dict], client: str) -> dict:
    """The workload over HTTP, open loop: each request is sent at its arrival time."""
    async with streamer(url, client) as send:
        t0 = time.monotonic()
        tasks = []
        for it in items:
            delay = t0 + it["t"] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append((it["cls"], asyncio.create_task(send(it, time.monotonic()))))
        results = [(c, await task) for c, task in tasks]
        wall = time.monotonic() - t0
    return {
        "ls_ttft": [v for c, v in results if c == "ls"],
        "be_ttft": [v for c, v in results if c == "be"],
        "completed": len(results),
        "wall_s": wall,
    }


async def run_burst(url: str, items: list[dict], client: str) -> dict:
    """Every request at once: completed requests per second, and the most requests running
    at once (admitted, holding KV pages) that ``/metrics`` showed meanwhile."""
    most = 0
    async with httpx.AsyncClient(timeout=600) as scraper, streamer(url, client) as send:

        async def watch():
            nonlocal most
            while True:
                text = (await scraper.get(url + "/metrics")).text
                most = max(most, int(metric(text, "qllm:num_requests_running")))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        t0 = time.monotonic()
        await asyncio.gather(*(send(it, t0) for it in items))
        wall = time.monotonic() - t0
        watcher.cancel()
    return {
        "requests": len(items),
        "wall_s": wall,
        "requests_per_s": len(items) / wall,
        "max_running": most,
    }


def windows(items: list[dict], duration: float, rounds: int) -> list[list[dict]]:
    """The workload cut into ``rounds`` consecutive windows of time, each re-based to start
    at 0: the engine and HTTP arms alternate window by window, so a change in the machine's
    load (other processes on the same cores) falls on both alike."""
    span = duration / rounds
    out: list[list[dict]] = [[] for _ in range(rounds)]
    for it in items:
        k = min(int(it["t"] // span), rounds - 1)
        out[k].append(dict(it, t=it["t"] - k * span))
    return out


def merged(results: list[dict]) -> dict:
    """One arm's results over its windows."""
    return {
        "ls_ttft": [v for r in results for v in r["ls_ttft"]],
        "be_ttft": [v for r in results for v in r["be_ttft"]],
        "completed": sum(r["completed"] for r in results),
        "wall_s": sum(r["wall_s"] for r in results),
    }


def metric(text: str, name: str) -> float:
    """The sum over labels of one metric in a Prometheus text page."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def server_compiles(url: str) -> float:
    return metric(httpx.get(url + "/metrics").text, "qllm:compilations_total")


def rotated(arms: list[str], k: int) -> list[str]:
    """``arms`` in the order window ``k`` runs them: rotated by one each window, so that each
    arm runs first, second, ... equally often (the one after the engine arm's window found
    the server idle, which is an order effect, not the client's or the server's cost)."""
    k %= len(arms)
    return arms[k:] + arms[:k]


def http_arm(url: str, items: list[dict], compiles: dict, arm: str, client: str) -> dict:
    """``run_http``, recording the server's compilations inside the window."""
    before = server_compiles(url)
    out = asyncio.run(run_http(url, items, client))
    compiles[arm] += server_compiles(url) - before
    return out


def start_batch(url: str, args, vocab: int) -> str:
    rng = random.Random(99)
    lines = []
    for i in range(args.batch_requests):
        body = {
            "prompt": [rng.randrange(3, vocab) for _ in range(args.be_prompt)],
            "max_tokens": args.be_output,
            "temperature": 0,
            "ignore_eos": True,
        }
        lines.append(
            {"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions", "body": body}
        )
    data = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    f = httpx.post(
        url + "/v1/files", files={"file": ("b.jsonl", data)}, data={"purpose": "batch"}
    ).json()
    b = httpx.post(
        url + "/v1/batches",
        json={"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"},
    ).json()
    return b["id"]


def start_server(args, state_dir: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "qllm_jax.cli",
        "serve",
        "--port",
        str(port),
        "--state-dir",
        state_dir,
        "--served-model-name",
        MODEL_NAME,
        "--log-level",
        "warning",
    ]
    if args.model:
        cmd += ["--model", args.model]
    cmd += ["--ls-delivery-wait-ms", str(args.ls_delivery_wait_ms)]
    for k, v in engine_flags(args).items():
        flag = k.replace("_", "-")
        if isinstance(v, bool):
            cmd.append(f"--{flag}" if v else f"--no-{flag}")
        else:
            cmd += ["--" + flag, str(v)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


def summary(res: dict) -> dict:
    return {
        "ls_ttft_p50_s": percentile(res["ls_ttft"], 50),
        "ls_ttft_p90_s": percentile(res["ls_ttft"], 90),
        "be_ttft_p50_s": percentile(res["be_ttft"], 50),
        "ls_requests": len(res["ls_ttft"]),
        "be_requests": len(res["be_ttft"]),
        "requests_per_s": res["completed"] / res["wall_s"],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF checkpoint dir (default: built-in)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--policy", default="qllm")
    ap.add_argument("--granularity", default="layer")
    ap.add_argument("--kv-pages", type=int, default=1024)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-num-batched-tokens", type=int, default=128)
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--ls-rate", type=float, default=2.0)
    ap.add_argument("--be-rate", type=float, default=2.0)
    ap.add_argument("--ls-prompt", type=int, default=32)
    ap.add_argument("--ls-output", type=int, default=8)
    ap.add_argument("--be-prompt", type=int, default=64)
    ap.add_argument("--be-output", type=int, default=32)
    ap.add_argument("--batch-requests", type=int, default=400)
    ap.add_argument("--burst", type=int, default=200, help="concurrent requests of the burst")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per arm")
    ap.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="windows the workload is cut into; the engine and HTTP arms alternate by window",
    )
    ap.add_argument("--warm", type=float, default=4.0, help="seconds of the warm-up run")
    ap.add_argument(
        "--client",
        choices=("raw", "httpx"),
        default="raw",
        help="HTTP client of the measured requests: raw (StreamClient: httpx's request bytes "
        "on asyncio streams) or httpx (its AsyncClient, as the openai client uses)",
    )
    ap.add_argument(
        "--also-client",
        action="append",
        default=[],
        choices=("raw", "httpx"),
        help="one more HTTP arm per window with this client (arm http-CLIENT; repeatable)",
    )
    ap.add_argument(
        "--ls-delivery-wait-ms",
        type=float,
        default=5.0,
        help="the server's --ls-delivery-wait-ms (0: the engine thread does not wait for the "
        "event loop to write latency-sensitive first tokens)",
    )
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--out", help="output JSON path")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.warm, args.batch_requests, args.burst = 8.0, 3.0, 120, 64

    load_start = os.getloadavg()[0]
    spec = args.model or str(qllm_jax.builtin_model_dir())
    model = qllm_jax.load(spec, dtype=args.dtype)
    vocab = model.config.vocab_size
    items = workload(args, args.duration, seed=0, vocab=vocab)
    warm_items = workload(args, args.warm, seed=1, vocab=vocab)

    print("engine: warming up ...")
    eng = qllm_jax.Engine(model, **engine_flags(args))
    eng.warmup()
    run_engine(eng, warm_items)
    compiles = {"engine": 0, "http": 0.0, "http+batch": 0.0}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as state:
        proc, url = start_server(args, state)
        try:
            for client in {args.client, *args.also_client}:
                asyncio.run(run_http(url, warm_items, client))
            rounds = []
            also = [f"http-{c}" for c in args.also_client]
            for arm in also:
                compiles[arm] = 0.0
            for k, part in enumerate(windows(items, args.duration, args.rounds)):
                r = {}
                for arm in rotated(["engine", "http", *also], k):  # no arm always goes first
                    if arm == "engine":
                        with compile_log.Window() as window:
                            r[arm] = run_engine(eng, part)
                        compiles["engine"] += window.compiles
                    else:
                        client = args.client if arm == "http" else arm.removeprefix("http-")
                        r[arm] = http_arm(url, part, compiles, arm, client)
                r = {arm: r[arm] for arm in ["engine", "http", *also]}
                rounds.append(r)
                p90s = ", ".join(
                    f"{a} {1e3 * percentile(v['ls_ttft'], 90):.1f}" for a, v in r.items()
                )
                print(f"round {k}: LS TTFT p90 (ms) {p90s}; load average {os.getloadavg()[0]:.2f}")
            del eng
            arms = {arm: merged([r[arm] for r in rounds]) for arm in rounds[0]}
            for arm in arms:
                print(f"{arm}: LS TTFT p90 {1e3 * percentile(arms[arm]['ls_ttft'], 90):.1f} ms")
            batch_id = start_batch(url, args, vocab)
            arms["http+batch"] = http_arm(url, items, compiles, "http+batch", args.client)
            batch = httpx.get(url + f"/v1/batches/{batch_id}").json()
            print(
                f"http+batch: LS TTFT p90 "
                f"{1e3 * percentile(arms['http+batch']['ls_ttft'], 90):.1f} ms; batch "
                f"{batch['status']}, {batch['request_counts']}"
            )
            httpx.post(url + f"/v1/batches/{batch_id}/cancel")
            burst_items = [dict(items[i % len(items)], cls="ls") for i in range(args.burst)]
            burst = asyncio.run(run_burst(url, burst_items, args.client))
            print(
                f"burst: {burst['requests']} requests in {burst['wall_s']:.1f} s = "
                f"{burst['requests_per_s']:.1f} req/s, at most {burst['max_running']} running"
            )
        finally:
            proc.terminate()
            proc.wait(timeout=120)

    sums = {arm: summary(res) for arm, res in arms.items()}
    p90 = {arm: s["ls_ttft_p90_s"] for arm, s in sums.items()}
    result = {
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "model": spec,
        "load_average_1m": {"start": load_start, "end": os.getloadavg()[0]},
        "args": vars(args),
        "arms": sums,
        "compiles_in_window": compiles,
        "valid": not any(compiles.values()),
        "ls_ttft_p90_ratio_http_vs_engine": p90["http"] / p90["engine"],
        "meets_target_1_15": p90["http"] / p90["engine"] <= 1.15,
        "rounds_ls_ttft_p90_s": [
            {arm: percentile(res["ls_ttft"], 90) for arm, res in r.items()} for r in rounds
        ],
        "ls_ttft_p90_ratio_vs_engine": {arm: v / p90["engine"] for arm, v in p90.items()},
        "ls_ttft_p90_ratio_vs_engine_ci95": {
            arm: bootstrap_ratio(res["ls_ttft"], arms["engine"]["ls_ttft"], 90, 2000, 0)["ci95"]
            for arm, res in arms.items()
            if arm != "engine"
        },
        "ls_ttft_p90_ratio_batch_vs_none": p90["http+batch"] / p90["http"],
        "batch_progress_during_window": batch["request_counts"],
        "burst": burst,
        "raw": {arm: {k: res[k] for k in ("ls_ttft", "be_ttft")} for arm, res in arms.items()},
    }
    lo, hi = result["ls_ttft_p90_ratio_vs_engine_ci95"]["http"]
    others = "".join(
        f", {arm} {1e3 * p90[arm]:.1f} ms (x{p90[arm] / p90['engine']:.2f})"
        for arm in p90
        if arm.startswith("http-")
    )
    print(
        f"LS TTFT p90: engine {1e3 * p90['engine']:.1f} ms, http ({args.client}) "
        f"{1e3 * p90['http']:.1f} ms (ratio {result['ls_ttft_p90_ratio_http_vs_engine']:.2f} "
        f"[{lo:.2f}, {hi:.2f}], target <= 1.15){others}, "
        f"http with a batch {1e3 * p90['http+batch']:.1f} ms "
        f"(x{result['ls_ttft_p90_ratio_batch_vs_none']:.2f}); burst "
        f"{burst['requests_per_s']:.1f} req/s"
    )
    if not result["valid"]:
        print(f"INVALID (compiled inside a measured window): {compiles}")
    device = jax.devices()[0].platform
    out = Path(args.out) if args.out else RESULTS / f"serve-bench-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
