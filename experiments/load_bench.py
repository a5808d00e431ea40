"""Peak host memory and time of ``qllm_jax.load`` on a ~1 GB random Mixtral-style checkpoint.

The loader streams tensors one at a time and stacks experts layer by layer, so peak RSS should
be about one copy of the weights (the JAX arrays) plus one layer's buffers, never two copies.
Each measurement runs in a fresh subprocess (``ru_maxrss`` is a process-lifetime peak).

    python experiments/load_bench.py [--size-gb 1.0] [--dtype float32] [--shards 3]

Writes ``experiments/results/load-<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

_PROBE = """
import json, resource, sys, time
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if sys.argv[2] == "load":
    import qllm_jax
    t0 = time.perf_counter()
    m = qllm_jax.load(sys.argv[1], dtype=sys.argv[3])
    jax.block_until_ready(m.params)
    dt = time.perf_counter() - t0
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(m.params))
else:
    dt, nbytes = 0.0, 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss": base, "peak_rss": peak, "seconds": dt, "param_bytes": nbytes}))
"""


def write_checkpoint(path: Path, target_bytes: float, shards: int) -> dict:
    """A Mixtral-shaped random checkpoint in HF's per-expert layout, float32, sharded."""
    from safetensors.numpy import save_file

    d, f, e, v = 1024, 3584, 8, 32000
    per_layer = 4 * (2 * d * d + 2 * d * (d // 4) + 3 * e * d * f + e * d)  # float32 bytes
    fixed = 4 * 2 * v * d  # embedding + LM head
    layers_per = max(1, math.floor((target_bytes - fixed) / per_layer))
    config = {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": v,
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": layers_per,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "num_local_experts": e,
        "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)

    def t(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * 0.02

    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, d))]
    for i in range(layers_per):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (d // 4, d)),
            (p + "self_attn.v_proj.weight", (d // 4, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "block_sparse_moe.gate.weight", (e, d)),
        ]
        for x in range(e):
            q = f"{p}block_sparse_moe.experts.{x}."
            tensors += [(q + "w1.weight", (f, d)), (q + "w3.weight", (f, d))]
            tensors += [(q + "w2.weight", (d, f))]
    tensors += [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]
    groups = np.array_split(np.arange(len(tensors)), shards)
    weight_map, total = {}, 0
    for s, idx in enumerate(groups):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        shard = {tensors[i][0]: t(*tensors[i][1]) for i in idx}
        total += sum(a.nbytes for a in shard.values())
        save_file(shard, str(path / name))
        weight_map |= {k: name for k in shard}
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"layers": layers_per, "bytes": total, "shards": shards}


def probe(model_dir: Path, what: str, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(model_dir), what, dtype],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--dir", help="reuse/keep the checkpoint here (default: a temp dir)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.dir) if args.dir else Path(tmp) / "ckpt"
        t0 = time.perf_counter()
        if (model_dir / "config.json").is_file():
            ckpt = {"bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))}
        else:
            ckpt = write_checkpoint(model_dir, args.size_gb * 1e9, args.shards)
        print(f"checkpoint: {ckpt} (written in {time.perf_counter() - t0:.1f}s)", flush=True)
        base = probe(model_dir, "baseline", args.dtype)
        runs = [probe(model_dir, "load", args.dtype) for _ in range(2)]
    best = min(runs, key=lambda r: r["seconds"])
    report = {
        "platform": sys.platform,
        "checkpoint_bytes": ckpt["bytes"],
        "dtype": args.dtype,
        "param_bytes": best["param_bytes"],
        "load_seconds": [r["seconds"] for r in runs],
        "load_gb_per_s": ckpt["bytes"] / best["seconds"] / 1e9,
        "rss_after_jax_import": base["peak_rss"],
        "peak_rss": max(r["peak_rss"] for r in runs),
        "peak_rss_minus_baseline_over_param_bytes": (
            (max(r["peak_rss"] for r in runs) - base["peak_rss"]) / best["param_bytes"]
        ),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"load-{sys.platform}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
