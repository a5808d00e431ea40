"""``qllm-jax job ...`` as separate processes: killed with SIGKILL at several moments (one of
them while a checkpoint is being written), stopped with SIGTERM (a checkpoint, exit 0), and
resumed each time; in the end every ``custom_id`` is written exactly once and every line is the
one an uninterrupted run writes (``created`` aside). Plus ``status`` and ``cancel``.

Kills are triggered by progress (lines written, a checkpoint directory appearing), with random
extra delays from a fixed seed, so the test does not depend on the machine's speed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qllm_jax
from qllm_jax import jobs
from tests.test_jobs import ENGINE, results

FLAGS = [
    "--dtype", "float32", "--policy", "qllm", "--kv-pages", str(ENGINE["kv_pages"]),
    "--page-size", str(ENGINE["page_size"]), "--max-batch-size", str(ENGINE["max_batch_size"]),
    "--max-num-batched-tokens", str(ENGINE["max_num_batched_tokens"]),
    "--prefill-chunk", str(ENGINE["prefill_chunk"]),
]  # fmt: skip
TIMEOUT = 120


def big_input() -> list[dict]:
    """Enough work that several resumes each find some left."""
    out = []
    for i in range(20):
        body = {"prompt": f"Chapter {i}. It was a dark night", "max_tokens": 10 + (i * 7) % 25}
        body |= [{"temperature": 0}, {"temperature": 0.7, "seed": i}, {"top_k": 40}][i % 3]
        if i == 4:
            body["stop"] = ["e"]
        out.append({"custom_id": f"q{i}", "method": "POST", "url": "/v1/completions", "body": body})
    out.append({"custom_id": "bad", "method": "POST", "url": "/v1/completions", "body": {}})
    return out


@pytest.fixture(scope="module")
def model():
    return qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return os.environ | {"JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One compilation cache for every job process of this module (the first one compiles)."""
    return str(tmp_path_factory.mktemp("jax-cache"))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "qllm_jax.cli", *args]


def _start(env, cache: str, *args: str) -> subprocess.Popen:
    cmd = cli(*args, "--compilation-cache-dir", cache, "--no-progress")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _wait_for(proc: subprocess.Popen, cond, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        if proc.poll() is not None:
            out = proc.stdout.read().decode()
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{out}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def _kill(proc: subprocess.Popen, sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out.decode()


def test_kill_and_resume_gives_the_uninterrupted_output(model, env, cache, tmp_path):
    rng = random.Random(18)
    job_dir = tmp_path / "job"
    data = b"".join(jobs._json_line(line) for line in big_input())
    (tmp_path / "in.jsonl").write_bytes(data)
    output, ck = job_dir / "output.jsonl", job_dir / "checkpoints"

    # 1. SIGKILL at a random moment once a few results are out
    proc = _start(env, cache, "job", "run", str(tmp_path / "in.jsonl"), "--job-dir", str(job_dir),
                  "--checkpoint-every", "0.05", *FLAGS)  # fmt: skip
    _wait_for(proc, lambda: _lines(output) >= 2, "two results")
    time.sleep(rng.uniform(0, 0.3))
    assert _kill(proc, signal.SIGKILL)[0] == -signal.SIGKILL

    # 2. SIGKILL while a checkpoint is being written (orbax's temporary directory exists)
    mid_write = False
    for _ in range(5):
        proc = _start(env, cache, "job", "resume", str(job_dir), "--checkpoint-every", "0.05")
        _wait_for(proc, lambda: any(ck.glob("*.orbax-checkpoint-tmp*")), "a checkpoint write")
        _kill(proc, signal.SIGKILL)
        mid_write = any(ck.glob("*.orbax-checkpoint-tmp*"))  # it died before the commit
        if mid_write:
            break
    assert mid_write, "never killed a process inside a checkpoint write"
    assert jobs.status(job_dir).status == "in_progress"

    # 3. SIGKILL again a little later
    before = _lines(output)
    proc = _start(env, cache, "job", "resume", str(job_dir), "--checkpoint-every", "0.2")
    _wait_for(proc, lambda: _lines(output) >= before + 1, "one more result")
    time.sleep(rng.uniform(0, 0.2))
    _kill(proc, signal.SIGKILL)

    # 4. SIGTERM: a checkpoint, exit 0 within a few seconds
    before = _lines(output)
    proc = _start(env, cache, "job", "resume", str(job_dir), "--checkpoint-every", "30")
    _wait_for(proc, lambda: _lines(output) >= before + 1, "one more result")
    t0 = time.monotonic()
    code, out = _kill(proc, signal.SIGTERM)
    assert code == 0 and "checkpoint" in out and "job resume" in out, out
    assert time.monotonic() - t0 < 10
    st = jobs.status(job_dir)
    assert st.status == "in_progress" and st.completed + st.failed < st.total

    # 5. to the end
    proc = _start(env, cache, "job", "resume", str(job_dir))
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out.decode()
    assert "completed" in out.decode()

    # the same job uninterrupted, in this process, on the same engine settings
    runner = jobs.JobRunner(qllm_jax.Engine(model, compilation_cache_dir=None, **ENGINE), None)
    ref_dir = tmp_path / "ref"
    assert runner.run(runner.create(tmp_path / "in.jsonl", ref_dir))
    assert results(job_dir) == results(ref_dir)
    assert set(results(job_dir)) == {line["custom_id"] for line in big_input()}


def test_status_and_cancel_commands(env, cache, tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b"".join(jobs._json_line(x) for x in big_input()))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "a"}\nnot json\n')
    run = subprocess.run(
        cli("job", "run", str(bad), "--job-dir", str(tmp_path / "b"), "--no-progress", *FLAGS),
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 1 and "line 2" in run.stderr, run.stderr
    st = subprocess.run(cli("job", "status", str(tmp_path / "b"), "--json"), env=env,
                        capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert st.returncode == 0 and json.loads(st.stdout)["status"] == "failed"
    assert len(json.loads(st.stdout)["errors"]["data"]) == 4  # method, url, body; bad JSON

    # a job that has been created but is not running: cancel finishes it in place
    proc = _start(env, cache, "job", "run",
                  str(tmp_path / "in.jsonl"), "--job-dir", str(tmp_path / "c"), *FLAGS)  # fmt: skip
    _wait_for(proc, lambda: _lines(tmp_path / "c" / "output.jsonl") >= 1, "a result")
    _kill(proc, signal.SIGKILL)
    cancel = subprocess.run(cli("job", "cancel", str(tmp_path / "c")), env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout, cancel.stdout
    assert set(results(tmp_path / "c")) == {x["custom_id"] for x in big_input()}
    again = subprocess.run(cli("job", "resume", str(tmp_path / "c")), env=env,
                           capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert again.returncode == 0 and "cancelled" in again.stdout


def test_benchmark_script_help():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "experiments" / "job_bench.py"), "--help"],
                         capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert out.returncode == 0 and "usage" in out.stdout, out.stderr
