"""Numeric parity of `qllm_jax.reference_forward` with HF transformers (PyTorch, CPU).

Every family is checked in both on-disk expert layouts, plus the variants that take a different
code path in the loader or the model: tied embeddings, a sharded checkpoint, OLMoE's clip_qkv,
a Qwen3 head_dim that is not hidden/heads, and bfloat16. Checkpoints are tiny random models
built once per session (see tests/hf_tiny.py for why they are random *and* large-weighted).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import qllm_jax  # noqa: E402
from tests.hf_tiny import (  # noqa: E402
    FAMILIES,
    LAYOUTS,
    PAD_ID,
    VOCAB,
    hf_greedy,
    hf_logits,
    load_hf,
    make_checkpoint,
    prompt_ids,
    safetensors_keys,
)

PROMPT_LEN = 12
NEW_TOKENS = 16
# Logits are compared at the greedy loop's buffer length, so both tests share one compilation.
SEQ_LEN = PROMPT_LEN + NEW_TOKENS
F32_RTOL = 1e-4  # of max(1, max|logit|): f32 op-order noise is ~1e-6 relative here

NUM_EXPERTS = {"mixtral": 8, "qwen2_moe": 6, "qwen3_moe": 8, "olmoe": 4, "phimoe": 4}


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    layout: str = "per_expert"
    max_shard_size: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        parts = [self.family, self.layout]
        if self.max_shard_size:
            parts.append("sharded")
        parts += [f"{k}={v}" for k, v in self.overrides]
        return "-".join(parts)


F32_CASES = [Case(f, layout) for f in FAMILIES for layout in LAYOUTS] + [
    Case("qwen3_moe", "per_expert", overrides=(("tie_word_embeddings", True),)),
    Case("mixtral", "per_expert", max_shard_size="200KB"),
    Case("qwen2_moe", "fused", max_shard_size="100KB"),
    Case("olmoe", "per_expert", overrides=(("clip_qkv", 2.0),)),
    Case("qwen3_moe", "fused", overrides=(("head_dim", 32),)),
]
BF16_FAMILIES = ("mixtral", "qwen2_moe")


# ----------------------------------------------------------------------------------------------
# Session-scoped builders: each checkpoint is written and loaded once.


class _Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ckpts: dict[Any, tuple[Path, Any]] = {}
        self.models: dict[Any, Any] = {}
        self.refs: dict[Any, np.ndarray] = {}

    def checkpoint(self, case: Case, dtype: Any = None) -> tuple[Path, Any]:
        dtype = torch.float32 if dtype is None else dtype
        key = (case, dtype)
        if key not in self.ckpts:
            path = self.root / f"{case.id}-{str(dtype).removeprefix('torch.')}"
            self.ckpts[key] = make_checkpoint(
                case.family,
                path,
                layout=case.layout,
                dtype=dtype,
                max_shard_size=case.max_shard_size,
                **dict(case.overrides),
            )
        return self.ckpts[key]

    def ref32_logits(self, case: Case, ckpt_dtype: Any, ids: np.ndarray) -> np.ndarray:
        """HF float32 logits on the checkpoint's (possibly bf16-rounded) weights."""
        key = (case, ckpt_dtype, ids.tobytes())
        if key not in self.refs:
            path, _ = self.checkpoint(case, ckpt_dtype)
            self.refs[key] = hf_logits(load_hf(path, torch.float32), ids)
        return self.refs[key]

    def model(self, case: Case, ckpt_dtype: Any = None, dtype: str = "float32") -> Any:
        ckpt_dtype = torch.float32 if ckpt_dtype is None else ckpt_dtype
        key = (case, ckpt_dtype, dtype)
        if key not in self.models:
            path, _ = self.checkpoint(case, ckpt_dtype)
            self.models[key] = qllm_jax.load(path, dtype=dtype)
        return self.models[key]


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> _Store:
    torch.set_num_threads(2)
    return _Store(tmp_path_factory.mktemp("parity"))


def jax_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    out = qllm_jax.reference_forward(model, ids)
    return np.asarray(jax.device_get(out), dtype=np.float32)


def jax_greedy(model: Any, ids: np.ndarray, n: int) -> np.ndarray:
    """Greedy decoding with `reference_forward`, recomputing the whole sequence every step.

    The sequence buffer has its final length [B, S + n] from the start, the not-yet-generated
    tail filled with PAD: under causal attention, positions after t cannot change the logits at
    t, so this equals growing the sequence one token at a time, with one compiled shape
    instead of n.
    """
    b, s = ids.shape
    buf = np.full((b, s + n), PAD_ID, dtype=np.int32)
    buf[:, :s] = ids
    for i in range(n):
        logits = jax_logits(model, buf)
        buf[:, s + i] = logits[:, s + i - 1].argmax(-1)
    return buf[:, s:]


def _assert_logits_close(got: np.ndarray, want: np.ndarray, rtol: float = F32_RTOL) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all()
    tol = rtol * max(1.0, float(np.abs(want).max()))
    err = np.abs(got - want)
    worst = np.unravel_index(err.argmax(), err.shape)
    assert err.max() <= tol, f"max|diff| {err.max():.3g} > {tol:.3g} at [b, s, v]={worst}"


def _matrix_dtypes(model: Any) -> set[str]:
    """dtypes of the weight matrices (ndim >= 2); 1-D norm/bias vectors may legitimately differ."""
    return {str(x.dtype) for x in jax.tree.leaves(model.params) if jnp.ndim(x) >= 2}


# ----------------------------------------------------------------------------------------------
# float32: tight logits parity and identical greedy continuations


@pytest.mark.parametrize("case", F32_CASES, ids=lambda c: c.id)
def test_checkpoint_layout_on_disk(store: _Store, case: Case) -> None:
    """Guards the fixtures: each case really is the layout it claims to test."""
    path, _ = store.checkpoint(case)
    keys = safetensors_keys(path)
    fused = [k for k in keys if k.endswith("mlp.experts.gate_up_proj")]
    per_expert = [k for k in keys if ".experts.0." in k]
    if case.layout == "fused":
        assert fused and not per_expert
    else:
        assert per_expert and not fused
    assert ("lm_head.weight" in keys) != dict(case.overrides).get("tie_word_embeddings", False)
    if case.max_shard_size:
        assert (path / "model.safetensors.index.json").exists()
        assert len(list(path.glob("*.safetensors"))) > 1


@pytest.mark.parametrize("case", F32_CASES, ids=lambda c: c.id)
def test_config(store: _Store, case: Case) -> None:
    cfg = store.model(case).config
    assert cfg.model_type == case.family
    assert cfg.vocab_size == VOCAB
    assert cfg.num_layers == 3
    assert cfg.num_experts == NUM_EXPERTS[case.family]
    assert cfg.top_k == 2


@pytest.mark.parametrize("case", F32_CASES, ids=lambda c: c.id)
def test_logits_match_hf(store: _Store, case: Case) -> None:
    _, hf = store.checkpoint(case)
    ids = prompt_ids(2, SEQ_LEN, seed=1)
    want = hf_logits(hf, ids)
    got = jax_logits(store.model(case), ids)
    _assert_logits_close(got, want)


@pytest.mark.parametrize("case", F32_CASES, ids=lambda c: c.id)
def test_greedy_matches_hf_generate(store: _Store, case: Case) -> None:
    _, hf = store.checkpoint(case)
    ids = prompt_ids(2, PROMPT_LEN, seed=2)
    want = hf_greedy(hf, ids, NEW_TOKENS)
    # A test that cannot fail is useless: the reference continuation must not be degenerate.
    for row in want:
        assert len(set(row.tolist())) > 3, f"degenerate HF continuation {row.tolist()}"
    got = jax_greedy(store.model(case), ids, NEW_TOKENS)
    np.testing.assert_array_equal(got, want)


def test_reference_forward_accepts_lists(store: _Store) -> None:
    case = Case("mixtral")
    ids = prompt_ids(2, SEQ_LEN, seed=1)
    model = store.model(case)
    np.testing.assert_array_equal(jax_logits(model, ids.tolist()), jax_logits(model, ids))


def test_batch_rows_are_independent(store: _Store) -> None:
    """Row 0 alone gives the same logits as row 0 inside a batch (no cross-row leakage)."""
    case = Case("qwen2_moe", "fused")
    ids = prompt_ids(2, SEQ_LEN, seed=3)
    model = store.model(case)
    _assert_logits_close(jax_logits(model, ids[:1]), jax_logits(model, ids)[:1])


# ----------------------------------------------------------------------------------------------
# bfloat16


@pytest.mark.parametrize("family", BF16_FAMILIES)
def test_bf16_checkpoint_loaded_as_float32(store: _Store, family: str) -> None:
    """bf16 on disk, f32 compute: exact upcast, so the f32 tolerance applies.

    Checks the bf16 decoding path of the loader in isolation from bf16 arithmetic.
    """
    case = Case(family)
    ids = prompt_ids(2, SEQ_LEN, seed=1)
    ref32 = store.ref32_logits(case, torch.bfloat16, ids)
    got = jax_logits(store.model(case, torch.bfloat16, "float32"), ids)
    _assert_logits_close(got, ref32)


@pytest.mark.parametrize("family", BF16_FAMILIES)
def test_bf16_logits_close_to_hf(store: _Store, family: str) -> None:
    """bf16 compute cannot match bit for bit: PyTorch and XLA round at different points (XLA
    CPU may accumulate dots in f32, torch rounds each op's output), and with large random
    weights bf16 noise is ~4% of the logit spread. So compare *errors against the exact f32
    answer on the same bf16 weights*: ours must be no worse than about HF's own bf16 error, and
    ours and HF's bf16 logits must be close on average relative to the logit spread.
    """
    case = Case(family)
    _, hf16 = store.checkpoint(case, torch.bfloat16)
    ids = prompt_ids(2, SEQ_LEN, seed=1)
    ref32 = store.ref32_logits(case, torch.bfloat16, ids)
    want16 = hf_logits(hf16, ids)
    got16 = jax_logits(store.model(case, torch.bfloat16, "bfloat16"), ids)
    assert got16.shape == ref32.shape and np.isfinite(got16).all()
    spread = float(ref32.std())
    hf_err = float(np.abs(want16 - ref32).mean())
    our_err = float(np.abs(got16 - ref32).mean())
    assert our_err <= 2.0 * hf_err + 0.01 * spread, (our_err, hf_err, spread)
    assert float(np.abs(got16 - want16).mean()) <= 0.1 * spread
    # bf16 must actually have been used: an f32 computation would be far more exact.
    assert our_err > 1e-3 * spread, "bfloat16 load computed like float32"


def test_dtype_auto_picks_checkpoint_dtype(store: _Store) -> None:
    case = Case("qwen2_moe")
    ids = prompt_ids(2, SEQ_LEN, seed=1)
    auto16 = store.model(case, torch.bfloat16, "auto")
    assert _matrix_dtypes(auto16) == {"bfloat16"}
    np.testing.assert_array_equal(
        jax_logits(auto16, ids), jax_logits(store.model(case, torch.bfloat16, "bfloat16"), ids)
    )
    auto32 = store.model(case, torch.float32, "auto")
    assert _matrix_dtypes(auto32) == {"float32"}
    assert _matrix_dtypes(store.model(case, torch.float32, "bfloat16")) == {"bfloat16"}


def test_dtype_auto_reads_legacy_torch_dtype(store: _Store, tmp_path: Path) -> None:
    """Hub checkpoints written by transformers 4 say `torch_dtype`, not `dtype`."""
    src, _ = store.checkpoint(Case("mixtral"), torch.bfloat16)
    dst = tmp_path / "legacy"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = cfg.pop("dtype")
    (dst / "config.json").write_text(json.dumps(cfg))
    assert _matrix_dtypes(qllm_jax.load(dst, dtype="auto")) == {"bfloat16"}
