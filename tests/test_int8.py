"""Weight-only int8 (``quantize="int8"``): the quantizer, logit parity against the float model
for every family, the engine end to end (fused = segmented, preemption identity), the errors
of a bad ``quantize``, and the checkpoint fingerprint.

Parity bound: the tiny checkpoints here use ``initializer_range=0.1`` (hf_tiny's 0.3 makes a
model so chaotic that bf16 rounding alone moves logits by ~10 % of their spread). Even so, a
few positions sit at a near-tie of the router, where any rounding flips an expert choice (bf16
does too: its max-abs error on these models reaches 0.28 of max|logit|), so the max-abs bound
is loose and the mean and top-1 bounds carry the check.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")

import qllm_jax  # noqa: E402
from qllm_jax import cli  # noqa: E402
from qllm_jax.fingerprint import differences, model_fingerprint  # noqa: E402
from qllm_jax.models.model import expert_group  # noqa: E402
from qllm_jax.models.params import ExpertParams, QuantizedWeight  # noqa: E402
from qllm_jax.models.quant import int8_channels, quantize_device  # noqa: E402
from tests.hf_tiny import FAMILIES, make_checkpoint, prompt_ids  # noqa: E402
from tests.test_engine_preemption import BASE, _check_clean, _sampling, drive  # noqa: E402

MAX_ABS_REL = 0.6  # max |Δlogit| / max |logit|
MEAN_REL = 0.1  # mean |Δlogit| / std(logits)
TOP1 = 0.9  # fraction of positions whose argmax agrees


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    return functools.cache(
        lambda family: make_checkpoint(family, root / family, initializer_range=0.1)[0]
    )


# ----------------------------------------------------------------------------------------------
# The quantizer


def test_int8_channels_bounds_and_host_equals_device():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 32, 24)).astype(np.float32)  # [E, in, out]
    w[1, :, 5] = 0.0  # an all-zero channel
    q, scale = int8_channels(w)
    assert q.dtype == np.int8 and scale.shape == (3, 24) and scale.dtype == np.float32
    assert np.abs(q).max() == 127 and q.min() >= -127
    np.testing.assert_array_equal(np.abs(q).max(axis=1)[np.arange(3) != 1], 127)
    assert (q[1, :, 5] == 0).all() and scale[1, 5] == 1.0
    err = np.abs(q * scale[:, None, :] - w)
    assert (err <= scale[:, None, :] / 2 + 1e-6).all()
    dev = quantize_device(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(dev.q), q)
    np.testing.assert_array_equal(np.asarray(dev.scale), scale)


def test_ragged_and_dense_agree_on_int8_stacked_experts():
    """The accelerator path (grouped matmul, scales gathered per row) against the CPU path."""
    rng = np.random.default_rng(1)
    e, d, f, n, k = 4, 16, 8, 6, 2
    w_gu = quantize_device(jnp.asarray(rng.standard_normal((e, d, 2 * f)), jnp.float32))
    w_d = quantize_device(jnp.asarray(rng.standard_normal((e, f, d)), jnp.float32))
    ep = ExpertParams(w_gu, w_d)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, e, (n, k)), jnp.int32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    for start, size in ((0, e), (2, 2)):
        dense = expert_group(ep, x, weights, ids, start, size, impl="dense")
        ragged = expert_group(ep, x, weights, ids, start, size, impl="ragged")
        np.testing.assert_allclose(np.asarray(ragged), np.asarray(dense), rtol=1e-5, atol=1e-4)
        assert float(jnp.abs(dense).max()) > 0


# ----------------------------------------------------------------------------------------------
# Logit parity against the float model


def _parity(model_f, model_q, ids) -> tuple[float, float, float]:
    a = np.asarray(qllm_jax.reference_forward(model_f, ids))
    b = np.asarray(qllm_jax.reference_forward(model_q, ids))
    diff = np.abs(a - b)
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    return float(diff.max() / np.abs(a).max()), float(diff.mean() / a.std()), top1


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_logits_close_to_float(ckpts, family):
    path = ckpts(family)
    model_f = qllm_jax.load(path, dtype="float32")
    model_q = qllm_jax.load(path, dtype="float32", quantize="int8")
    attn, experts = model_q.params.layers[0].attn, model_q.params.layers[0].experts
    assert isinstance(attn.wq, QuantizedWeight) and attn.wq.q.dtype == jnp.int8
    assert isinstance(
        experts.w_down[0] if experts.layout == "split" else experts.w_down, QuantizedWeight
    )
    assert not isinstance(attn.router, QuantizedWeight)
    assert model_q.params.embed.dtype == jnp.float32
    max_rel, mean_rel, top1 = _parity(model_f, model_q, prompt_ids(2, 24))
    assert max_rel < MAX_ABS_REL and mean_rel < MEAN_REL and top1 >= TOP1, (max_rel, mean_rel, top1)
    assert mean_rel > 1e-4, "int8 computed like float"


def test_int8_stacked_layout_matches_split(ckpts):
    path = ckpts("qwen2_moe")  # routed and shared experts
    split = qllm_jax.load(path, dtype="float32", expert_layout="split", quantize="int8")
    stacked = qllm_jax.load(path, dtype="float32", expert_layout="stacked", quantize="int8")
    assert isinstance(stacked.params.layers[0].experts.w_gate_up, QuantizedWeight)
    assert isinstance(split.params.layers[0].shared.w_down, QuantizedWeight)
    ids = prompt_ids(2, 12)
    np.testing.assert_allclose(
        np.asarray(qllm_jax.reference_forward(split, ids)),
        np.asarray(qllm_jax.reference_forward(stacked, ids)),
        rtol=1e-5,
        atol=1e-5,
    )


# ----------------------------------------------------------------------------------------------
# The engine end to end


@pytest.fixture(scope="module")
def mixtral_q(tmp_path_factory):
    path, _ = make_checkpoint(
        "mixtral", tmp_path_factory.mktemp("mixq"), num_hidden_layers=2, num_local_experts=4
    )
    return qllm_jax.load(path, dtype="float32", quantize="int8")


def _kw():
    return {k: v for k, v in BASE.items() if k != "dtype"}


def _solo(model, prompt, max_tokens):
    llm = qllm_jax.LLM(model, policy="priority", mode="fused", **_kw())
    return llm.generate([list(prompt)], _sampling(max_tokens, None))[0].token_ids


def test_int8_engine_fused_equals_segmented(mixtral_q):
    prompts = [list(range(3, 13)), [5, 9, 2, 77]]
    sampling = _sampling(5, None)
    fused = qllm_jax.LLM(mixtral_q, policy="priority", mode="fused", quantize="int8", **_kw())
    seg = qllm_jax.LLM(mixtral_q, policy="priority", mode="segmented", **_kw())
    out_f = [o.token_ids for o in fused.generate(prompts, sampling)]
    out_s = [o.token_ids for o in seg.generate(prompts, sampling)]
    assert out_f == out_s and all(len(t) == 5 for t in out_f)
    # the engine's first token is the oracle's greedy choice on the same int8 weights
    first = np.asarray(qllm_jax.reference_forward(mixtral_q, [prompts[0]]))[0, -1].argmax()
    assert out_f[0][0] == int(first)


def test_int8_preemption_identity(mixtral_q):
    """LS arrivals land inside BE passes under ``qllm``: every request still gets the tokens it
    gets alone."""
    be1, be2, ls = tuple(range(3, 3 + 30)), tuple(range(50, 61)), (7, 9, 11, 13)
    eng = qllm_jax.Engine(mixtral_q, policy="qllm", granularity="expert", **_kw())
    events = {
        0: [("add", "be1", (be1, 4, None, 1)), ("add", "be2", (be2, 3, None, 2))],
        3: [("add", "ls", (ls, 4, None, 0))],
    }
    outs = drive(eng, events)
    assert outs["ls"].token_ids == _solo(mixtral_q, ls, 4)
    assert outs["be1"].token_ids == _solo(mixtral_q, be1, 4)
    assert outs["be2"].token_ids == _solo(mixtral_q, be2, 3)
    assert eng.stats()["preemptions_expert"] >= 1
    _check_clean(eng)


# ----------------------------------------------------------------------------------------------
# Errors, the CLI, the fingerprint


def test_bad_quantize_values_error(ckpts, mixtral_q):
    path = ckpts("mixtral")
    with pytest.raises(
        ValueError, match=r"quantize must be None or one of \('int8',\), got 'int4'"
    ):
        qllm_jax.load(path, quantize="int4")
    with pytest.raises(ValueError, match="quantize .*got True"):
        qllm_jax.random_model("mixtral-tiny", quantize=True)
    with pytest.raises(ValueError, match="quantize .*got 'fp8'"):
        qllm_jax.Engine(path, quantize="fp8", compilation_cache_dir=None)
    float_model = qllm_jax.load(path, dtype="float32")
    with pytest.raises(ValueError, match="quantize='int8' but the Model passed"):
        qllm_jax.Engine(float_model, quantize="int8", compilation_cache_dir=None)
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["generate", "hi", "--quantize", "int4"])


def test_cli_quantize_flag_on_every_engine_subcommand():
    parser = cli._parser()
    for argv in (
        ["serve"],
        ["generate", "hi"],
        ["job", "run", "in.jsonl", "--job-dir", "d"],
        ["job", "resume", "d"],
    ):
        assert cli.engine_flags(parser.parse_args([*argv, "--quantize", "int8"]))["quantize"] == (
            "int8"
        )
        assert "quantize" not in cli.engine_flags(parser.parse_args(argv))
    flags = ["--model", "random:mixtral-tiny", "--quantize", "int8", "--dtype", "float32"]
    engine = cli.build_engine(
        cli.engine_flags(parser.parse_args(["generate", "hi", *flags, "--kv-pages", "8"]))
        | {"compilation_cache_dir": "none"}
    )
    assert engine.model.quantize == "int8"
    assert isinstance(engine.model.params.layers[0].attn.wo, QuantizedWeight)


def test_fingerprint_distinguishes_int8(ckpts):
    path = ckpts("olmoe")
    fp_f = model_fingerprint(qllm_jax.load(path, dtype="float32"))
    fp_q = model_fingerprint(qllm_jax.load(path, dtype="float32", quantize="int8"))
    assert "quantize" not in fp_f and fp_q["quantize"] == "int8"
    assert fp_f["digest"] != fp_q["digest"]
    assert differences(fp_f, fp_q) == ["quantize None vs 'int8'"]
    rand = [qllm_jax.random_model("mixtral-tiny", "float32", quantize=q) for q in (None, "int8")]
    assert model_fingerprint(rand[0])["digest"] != model_fingerprint(rand[1])["digest"]


def test_bench_script_help():
    script = Path(__file__).resolve().parents[1] / "experiments" / "int8_bench.py"
    out = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "usage" in out.stdout, out.stderr
