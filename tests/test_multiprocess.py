"""A multi-process engine (``qllm_jax.multiprocess``): processes over loopback give the tokens of
one process (params replicated, or sharded with expert/tensor parallelism across the
processes), through the engine API and through ``qllm-jax launch ... -- serve``; a follower that
dies, or a fault on one process only, ends every process with an error instead of a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import qllm_jax
from qllm_jax.multiprocess import free_port
from qllm_jax.scheduler.plan import Chunk, Plan, SampleSpec, decode_plan, encode_plan
from tests import multiproc_worker

WORKER = Path(multiproc_worker.__file__)
ROOT = WORKER.parents[1]
TIMEOUT_S = 180


def _env(devices: int = 1, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    flags = f"--xla_force_host_platform_device_count={devices}"
    return os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags, "PYTHONPATH": path} | extra


def _run_workers(
    n: int, out: Path, devices: int = 1, **env: str
) -> list[subprocess.CompletedProcess]:
    """Processes 0..n-1 of one engine, ``devices`` CPU devices each; waits for all (bounded)
    and returns them."""
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), coordinator, str(n), str(i), str(out)],
            env=_env(devices, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(n)
    ]
    done = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
    return done


@pytest.fixture(scope="module")
def one_process() -> dict[str, list[int]]:
    return multiproc_worker.serve(multiproc_worker.build(None))


def test_plans_keep_every_field_through_json():
    sample = SampleSpec(0.7, 5, 0.9, 2**64 - 1, 3)
    chunks = (Chunk(4, 0, (1, 2, 3), (1, 2), sample), Chunk(5, 9, (7,), (3,), None))
    plan = Plan(3, 2, 5, chunks, True, (1, 2), (5,), 9, True, True, (6, 8))
    assert decode_plan(json.loads(json.dumps(encode_plan(plan)))) == plan
    with pytest.raises(ValueError, match="an encoded Plan is a list of"):
        decode_plan([1, 2])


@pytest.mark.parametrize(
    "n, devices, engine",
    [
        (2, 2, {"expert_parallel": 2, "tensor_parallel": 2}),  # both axes span the processes
        # params replicated (the launch test below serves so, through HTTP)
        pytest.param(2, 1, {}, marks=pytest.mark.slow),
        pytest.param(4, 1, {}, marks=pytest.mark.slow),
        pytest.param(2, 1, {"expert_parallel": 2}, marks=pytest.mark.slow),
        pytest.param(2, 1, {"tensor_parallel": 2}, marks=pytest.mark.slow),
        pytest.param(4, 1, {"expert_parallel": 2, "tensor_parallel": 2}, marks=pytest.mark.slow),
    ],
)
def test_processes_give_the_tokens_of_one(tmp_path, one_process, n, devices, engine):
    out = tmp_path / "tokens.json"
    procs = _run_workers(n, out, devices, QLLM_TEST_ENGINE=json.dumps(engine))
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i}:\n{p.stdout[-3000:]}"
    assert json.loads(out.read_text()) == one_process


def test_a_dead_follower_ends_the_leader_with_an_error(tmp_path):
    out = tmp_path / "tokens.json"
    t0 = time.monotonic()
    leader, follower = _run_workers(2, out, QLLM_TEST_DIE_AFTER="2")
    assert follower.returncode == 17
    assert leader.returncode != 0 and not out.exists()
    # the leader's barrier, or JAX's own check, names the task that missed its heartbeats
    assert "heartbeat" in leader.stdout and "1" in leader.stdout, leader.stdout[-3000:]
    assert time.monotonic() - t0 < 90


def test_a_fault_on_one_process_stops_all_naming_the_plan(tmp_path):
    """The leader's 3rd attention call fails (its executor fails those requests), the
    follower's does not: the follower finds the results differ and stops; the leader reports
    the follower's error at its next barrier (the last one is at the stop)."""
    out = tmp_path / "tokens.json"
    t0 = time.monotonic()
    leader, follower = _run_workers(2, out, QLLM_TEST_FAIL_AT="3")
    assert follower.returncode == 1 and "diverged from process 0 at plan" in follower.stdout
    assert leader.returncode == 1 and not out.exists()
    assert "process 1: ClusterError: process 1 diverged" in leader.stdout, leader.stdout[-3000:]
    assert time.monotonic() - t0 < 90


def test_launch_serves_http_with_the_tokens_of_one_process(tmp_path):
    from tests.test_server import ENGINE, ENGINE_FLAGS

    prompts = ["Once upon a time", "def main():"]
    llm = qllm_jax.LLM(qllm_jax.builtin_model_dir(), compilation_cache_dir=None, **ENGINE)
    sampling = qllm_jax.SamplingParams(max_tokens=5, temperature=0)
    want = [o.text for o in llm.generate(prompts, sampling)]
    port = free_port()
    log = tmp_path / "launch.log"
    cmd = [sys.executable, "-m", "qllm_jax.cli", "launch", "--num-processes", "2", "--",
           "serve", "--port", str(port), "--state-dir", str(tmp_path / "state"),
           "--compilation-cache-dir", "none", *ENGINE_FLAGS, "--no-warmup",
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=open(log, "wb"), stderr=-2)  # noqa: SIM115
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        got = []
        for prompt in prompts:
            body = dict(model="builtin-mixtral-v2", prompt=prompt, max_tokens=5, temperature=0)
            r = httpx.post(url + "/v1/completions", json=body, timeout=TIMEOUT_S)
            got.append(r.json()["choices"][0]["text"])
        assert got == want
    finally:
        proc.terminate()  # the launcher passes it to process 0, which stops process 1
        rc = proc.wait(timeout=60)
    assert rc == 0, log.read_text()[-3000:]
    assert "process 1 ran" in log.read_text()
