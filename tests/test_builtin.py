"""The built-in checkpoint: deterministic, cached, atomic, a real tokenizer, loadable by HF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from qllm_jax import builtin
from qllm_jax.builtin import BUILTIN_MODEL_NAME, builtin_model_dir

FILES = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, two  inner  spaces and a trailing one ",
    "def f(x):\n\treturn x ** 2\n",
    "Ünïcödé, emoji 🤗 and 日本語 fall back to bytes where needed",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builtin_model_dir(tmp_path_factory.mktemp("cache"))


def test_layout(model_dir: Path) -> None:
    assert model_dir.name == BUILTIN_MODEL_NAME
    assert sorted(p.name for p in model_dir.iterdir()) == FILES
    assert [p.name for p in model_dir.parent.iterdir()] == [BUILTIN_MODEL_NAME]  # no temp left


def test_generation_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    again = builtin_model_dir(tmp_path)
    for name in FILES:
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_second_call_reuses_directory(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {name: (model_dir / name).stat().st_mtime_ns for name in FILES}

    def fail(_out: Path) -> None:
        raise AssertionError("regenerated an existing checkpoint")

    monkeypatch.setattr(builtin, "_write_checkpoint", fail)
    assert builtin_model_dir(model_dir.parent) == model_dir
    # The default cache root is read from the environment at call time, not at import.
    monkeypatch.setenv("QLLM_JAX_CACHE", str(model_dir.parent))
    assert builtin_model_dir() == model_dir
    assert {name: (model_dir / name).stat().st_mtime_ns for name in FILES} == before


def test_weights_follow_hf_mixtral_layout(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(model_dir / "model.safetensors")
    d, v = config["hidden_size"], config["vocab_size"]
    assert v == 32000
    assert weights["model.embed_tokens.weight"].shape == (v, d)
    assert weights["lm_head.weight"].shape == (v, d)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (
        config["num_key_value_heads"] * config["head_dim"],
        d,
    )
    assert weights["model.layers.3.block_sparse_moe.experts.7.w2.weight"].shape == (
        d,
        config["intermediate_size"],
    )
    assert all(w.dtype == np.float32 for w in weights.values())
    n_expert_tensors = sum(".experts." in k for k in weights)
    assert n_expert_tensors == 3 * config["num_local_experts"] * config["num_hidden_layers"]


def test_tokenizer_round_trips_and_matches_sentencepiece(model_dir: Path) -> None:
    import sentencepiece as spm

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_proto=builtin._tokenizer_model_bytes())
    config = json.loads((model_dir / "config.json").read_text())
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids[0] == config["bos_token_id"]
        assert ids[1:] == sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_interrupted_generation_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(_config: dict) -> dict:
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "_random_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        builtin_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_losing_the_rename_race_uses_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fake_write(out: Path, tag: str) -> None:
        for name in FILES:
            (out / name).write_text(tag)

    def slow_write(out: Path) -> None:
        # Another caller finishes while this one is still writing.
        monkeypatch.setattr(builtin, "_write_checkpoint", lambda o: fake_write(o, "winner"))
        builtin_model_dir(tmp_path)
        fake_write(out, "loser")

    monkeypatch.setattr(builtin, "_write_checkpoint", slow_write)
    target = builtin_model_dir(tmp_path)
    assert (target / "config.json").read_text() == "winner"
    assert [p.name for p in tmp_path.iterdir()] == [BUILTIN_MODEL_NAME]


def test_hf_transformers_loads_it_and_greedy_output_varies(model_dir: Path) -> None:
    import torch  # test extra; the HF reference
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    assert model.dtype == torch.float32
    assert model.config.num_key_value_heads == 2 and model.config.num_local_experts == 8

    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    fast = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    continuations = []
    for prompt in ["Hello, my name is", "The capital of France is", "def fibonacci(n):"]:
        ids = hf_tok(prompt, return_tensors="pt").input_ids
        assert ids[0].tolist() == fast.encode(prompt).ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        new = out[0, ids.shape[1] :].tolist()
        assert len(set(new)) > 1, new  # not stuck on one token
        continuations.append(tuple(new))
    assert len(set(continuations)) == len(continuations)
