"""The engine sharded over 8 simulated CPU devices gives one device's tokens.

The checks live in ``tests/sharded_checks.py`` and run in one subprocess (the device count must
be set before jax is imported): a representative subset by default, every family and mesh
shape under ``-m slow``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

import qllm_jax  # noqa: E402
from tests.hf_tiny import FAMILIES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _run(checks: list[str], timeout: int) -> None:
    env = os.environ | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharded_checks", *checks],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [r for r in results if not r["ok"]]
    assert proc.returncode == 0 and not failed and len(results) == len(checks), (
        failed or proc.stderr[-4000:]
    )


def test_sharded_subset():
    """One family through every mesh shape (fused), the expert segment bitwise (float, int8,
    over EPLB slots across re-placements), int8 weights with EPLB re-placing on tp=2 x ep=4
    (segmented, expert groups), and the preemption identity + no page leak under qllm with
    mixed priorities on tp=2 x ep=4."""
    checks = ["experts:qwen2_moe", "parity:qwen2_moe:priority", "preemption:4x2"]
    added = ["experts:qwen2_moe:int8", "slots:mixtral:4x2", "eplb:mixtral:qllm:int8:4x2"]
    _run([*checks, *added], timeout=600)


@pytest.mark.slow
def test_sharded_every_family():
    checks = [f"parity:{f}" for f in FAMILIES] + [f"experts:{f}" for f in FAMILIES]
    _run([*checks, "preemption:8x1", "preemption:2x4"], timeout=3000)


@pytest.mark.slow
def test_sharded_int8_every_family():
    """int8 weights on every mesh shape, fused and segmented, against int8 on one device."""
    checks = [f"parity:{f}:int8" for f in FAMILIES] + [f"experts:{f}:int8" for f in FAMILIES]
    _run(checks, timeout=3000)


@pytest.mark.slow
def test_sharded_eplb_every_family():
    """EPLB slots re-placed on every mesh shape, fused and segmented, float and int8."""
    checks = [f"eplb:{f}" for f in FAMILIES] + [f"slots:{f}" for f in FAMILIES]
    _run([*checks, "eplb:qwen3_moe:int8", "slots:olmoe:int8"], timeout=3000)


def test_eplb_slots_must_divide_over_the_expert_axis():
    from qllm_jax.mesh import slot_ranks

    assert slot_ranks(8, 4, 1, 4) == 4 and slot_ranks(8, 4, 4, 4) == 4
    with pytest.raises(ValueError, match=r"'expert' axis \(expert_parallel=4\).*11 expert slots"):
        slot_ranks(8, 3, 1, 4)
    with pytest.raises(ValueError, match="eplb_ranks=2 on a mesh"):
        slot_ranks(8, 4, 2, 4)


def test_mesh_errors_name_the_axis():
    model = qllm_jax.random_model("mixtral-tiny", "float32")  # 8 experts, 2 KV heads
    six = qllm_jax.random_model(dataclasses.replace(model.config, num_experts=6), "float32")
    with pytest.raises(ValueError, match="'expert' axis.*6 routed experts"):
        qllm_jax.Engine(six, expert_parallel=4, kv_pages=8, compilation_cache_dir=None)
    with pytest.raises(ValueError, match="'tensor' axis.*2 KV heads"):
        qllm_jax.Engine(model, tensor_parallel=4, kv_pages=8, compilation_cache_dir=None)
    with pytest.raises(ValueError, match=r"needs 16 devices; \d+ visible"):
        qllm_jax.Engine(
            model, expert_parallel=8, tensor_parallel=2, kv_pages=8, compilation_cache_dir=None
        )
    with pytest.raises(ValueError, match="expert_parallel must be an int"):
        qllm_jax.Engine(model, expert_parallel=0, kv_pages=8, compilation_cache_dir=None)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve"],
        ["generate", "hi"],
        ["job", "run", "in.jsonl", "--job-dir", "d"],
        ["job", "resume", "d"],
    ],
)
def test_parallel_flags_on_every_engine_subcommand(argv):
    from qllm_jax.cli import _parser, engine_flags

    args = _parser().parse_args([*argv, "--expert-parallel", "4", "--tensor-parallel", "2"])
    flags = engine_flags(args)
    assert flags["expert_parallel"] == 4 and flags["tensor_parallel"] == 2


def test_int8_scales_follow_their_output_channels():
    """An int8 weight's scales [..., out] are sharded as its values' output axis is."""
    from jax.sharding import PartitionSpec as P

    from qllm_jax.mesh import param_spec

    assert param_spec("layers.0.attn.wq.q", 2) == P(None, "tensor")
    assert param_spec("layers.0.attn.wq.scale", 1) == P("tensor")
    assert param_spec("layers.1.attn.wo.scale", 1) == P("tensor")
    assert param_spec("layers.0.experts.w_down.scale", 2) == P("expert", None)
    assert param_spec("layers.0.shared.w_down.scale", 1) == P()
    with pytest.raises(ValueError, match="ndim"):
        param_spec("layers.0.attn.wq.scale")
