"""Weight-only int8 quantization, applied to a checkpoint as it loads (``quantize="int8"``).

What is quantized: the attention projections (wq, wk, wv, wo) and the routed and shared expert
matrices, nearly all of an MoE's parameters (Mixtral-8x7B: 99.4 %). The router, norms,
embeddings, LM head, biases and the shared expert's sigmoid gate stay in the model dtype: they
are small in a large model, and the router and head make the discrete choices (experts,
tokens) that rounding flips most easily.

Scheme: symmetric, one float32 scale per output channel (per expert, for stacked experts):
``scale = max|w[:, j]| / 127``, ``q = round(w / scale)`` in [-127, 127]. Per output channel is
exact to apply after the matmul: ``x @ (q * scale) == (x @ q) * scale``, so the matmul reads
int8 weights and scales its [N, out] result (``models/model.py:matmul``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .params import QuantizedWeight

QUANTIZE_MODES = ("int8",)
# params paths (loader.target_shapes) whose arrays are quantized
QUANTIZED_PATHS = (
    "attn.wq",
    "attn.wk",
    "attn.wv",
    "attn.wo",
    "experts.w_gate_up",
    "experts.w_down",
    "shared.w_gate_up",
    "shared.w_down",
)


def check_quantize(quantize: Any) -> str | None:
    """``quantize`` if it is a known mode or None; else a ValueError naming the argument."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_MODES}, got {quantize!r}")
    return quantize


def is_quantized_path(path: str) -> bool:
    return path.endswith(QUANTIZED_PATHS)


def int8_channels(w, xp=np):
    """w [..., in, out] float → (q [..., in, out] int8, scale [..., out] float32), per output
    channel. ``xp`` is numpy (host, the loader) or jax.numpy (device, random models): one
    formula for both. An all-zero channel gets scale 1 (q = 0) rather than a division by 0."""
    wf = w.astype(xp.float32)
    amax = xp.abs(wf).max(axis=-2)  # [..., out]
    # times 1/127, not divided by 127: XLA rewrites the division so, and host and device agree
    scale = xp.where(amax > 0, amax * np.float32(1 / 127), 1).astype(xp.float32)
    q = xp.clip(xp.rint(wf / scale[..., None, :]), -127, 127).astype(xp.int8)
    return q, scale


def int8_host(w: np.ndarray) -> QuantizedWeight:
    """Quantize a host array, one [in, out] matrix at a time (a float32 temporary of one
    expert, not of a whole stacked layer); the result's leaves stay numpy (host) arrays, for
    a caller that places them itself (a mesh, shard by shard: ``qllm_jax.mesh.placer``)."""
    q = np.empty(w.shape, np.int8)
    scale = np.empty(w.shape[:-2] + w.shape[-1:], np.float32)
    for idx in np.ndindex(w.shape[:-2]):
        q[idx], scale[idx] = int8_channels(w[idx])
    return QuantizedWeight(q, scale)


def quantize_host(w: np.ndarray) -> QuantizedWeight:
    """``int8_host``, handed to JAX (one device)."""
    return jax.tree.map(jnp.asarray, int8_host(w))


@jax.jit
def _quantize_device(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    return int8_channels(w, jnp)


def quantize_device(w: jax.Array) -> QuantizedWeight:
    """Quantize an array already on the device (random models generate their weights there)."""
    return QuantizedWeight(*_quantize_device(w))


def nbytes(tree) -> int:
    """Bytes a params pytree's arrays hold (int8 values and scales as stored; an array that
    appears twice, a tied LM head, counted once)."""
    leaves = {id(x): x for x in jax.tree_util.tree_leaves(tree)}
    return sum(x.size * x.dtype.itemsize for x in leaves.values())
