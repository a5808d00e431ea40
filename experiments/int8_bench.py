"""Weight-only int8 against float: parameter bytes, decode step time, logit error, and the
computed memory of Mixtral-8x7B.

One process, every arm side by side: the float and the int8 model (``quantize="int8"``) of the
same checkpoint, each decoding one batch of ``--batch`` sequences in the ``fused`` and the
``segmented`` mode (``priority`` policy, so this measures the weights, not preemption). Rounds
are interleaved (drift on a shared machine hits every arm alike); each arm's first round is
untimed and compiles everything its rounds need, and every measured window counts
compilations (``valid`` is false if one compiled). Also:

- parameter bytes of both models, quantized matrices and the rest (embeddings, LM head,
  router, norms stay in the model dtype);
- logit error of int8 and of bfloat16 against float32 (``reference_forward``), and how many
  greedy tokens of the engine's float and int8 runs agree;
- what XLA does with the int8 → float convert of one expert matmul: whether the compiled HLO
  writes the widened weight out before the dot, and the time of that matmul both ways; and
  how much temporary memory a chain of all the model's expert FFNs in one jit needs, and what
  it costs, with each widening tied to its matmul's input (``matmul``) or not;
- Mixtral-8x7B's bytes in bfloat16 and in int8, *computed* from its config (no weights).

    nice -n 19 python experiments/int8_bench.py      # built-in model, float32, CPU

Writes ``experiments/results/int8-bench-<platform>.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from overhead import GREEDY, Arm, run_arms, stats

import qllm_jax
from qllm_jax.models import MODEL_PRESETS
from qllm_jax.models.loader import target_shapes
from qllm_jax.models.model import matmul
from qllm_jax.models.quant import is_quantized_path, nbytes, quantize_device

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("fused", "segmented")


def load_models(spec: str, dtype: str) -> dict:
    """{None: the float model, "int8": the quantized one} of a checkpoint or random preset."""
    out = {}
    for q in (None, "int8"):
        if spec.startswith("random:"):
            out[q] = qllm_jax.random_model(spec.removeprefix("random:"), dtype, quantize=q)
        else:
            out[q] = qllm_jax.load(spec, dtype=dtype, quantize=q)
    return out


def param_bytes(model) -> dict:
    """Bytes of the quantized matrices (int8 values + scales, or float) and of the rest."""
    mats = []
    for lp in model.params.layers:
        mats += [lp.attn.wq, lp.attn.wk, lp.attn.wv, lp.attn.wo, lp.experts]
        mats += [lp.shared.w_gate_up, lp.shared.w_down] if lp.shared is not None else []
    matrices, total = nbytes(mats), nbytes(model.params)
    return {"total": total, "matrices": matrices, "rest": total - matrices}


def decode_arms(models: dict, prompts, args) -> dict:
    kw = dict(
        policy="priority",
        page_size=16,
        max_num_batched_tokens=max(512, sum(map(len, prompts))),
        compilation_cache_dir=None,
        enable_prefix_caching=False,  # every round prefills alike: no new shape after round 0
    )
    arms = {
        f"{q or 'float'}_{mode}": Arm(m, prompts, args.new_tokens, GREEDY, False, mode=mode, **kw)
        for q, m in models.items()
        for mode in MODES
    }
    out = run_arms(arms, prompts, args)  # interleaved rounds, as overhead.py's arms
    for name, arm in arms.items():
        out[name]["expert_group_size"] = arm.engine.executor.group_size
    out["_tokens"] = {name: greedy_tokens(arm) for name, arm in arms.items()}
    return out


def greedy_tokens(arm: Arm) -> list[list[int]]:
    """One more (untimed) round of the arm's batch, keeping the tokens."""
    eng, done = arm.engine, {}
    ids = [eng.add_request(p, arm.sp) for p in arm.prompts]
    while eng.has_unfinished():
        done |= {o.request_id: o.token_ids for o in eng.step() if o.finished}
    return [done[i] for i in ids]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Identical sequences and the mean length of the common prefix, as fractions."""
    prefix = [
        next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b)
    ]
    n = len(a[0])
    return {
        "identical_sequences": sum(p == n for p in prefix) / len(a),
        "mean_common_prefix": sum(prefix) / (len(a) * n),
    }


def logit_error(models: dict, spec: str, ids: np.ndarray) -> dict:
    """int8 and bfloat16 against float32 logits on the same prompts."""
    ref = np.asarray(qllm_jax.reference_forward(models[None], ids))
    if spec.startswith("random:"):
        bf16 = qllm_jax.random_model(spec.removeprefix("random:"), "bfloat16")
    else:
        bf16 = qllm_jax.load(spec, dtype="bfloat16")
    out = {}
    for name, model in (("int8", models["int8"]), ("bfloat16", bf16)):
        got = np.asarray(qllm_jax.reference_forward(model, ids)).astype(np.float32)
        diff = np.abs(got - ref)
        out[name] = {
            "max_abs_over_max_logit": float(diff.max() / np.abs(ref).max()),
            "mean_abs_over_logit_std": float(diff.mean() / ref.std()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()),
        }
    return out


def convert_probe(d: int, o: int, rows: int, samples: int) -> dict:
    """One [d, o] matmul of ``rows`` rows, float32 against int8: does XLA write the widened
    weight out (an f32[d, o] fusion in the compiled entry computation), and what each costs."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal((d, o)), jnp.float32)
    qw = quantize_device(w)
    f = jax.jit(matmul)
    hlo = f.lower(x, qw).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    times = {}
    for name, weight in (("float32", w), ("int8", qw)):
        f(x, weight).block_until_ready()
        ts = []
        for _ in range(samples):
            t0 = time.perf_counter()
            f(x, weight).block_until_ready()
            ts.append(time.perf_counter() - t0)
        times[name] = stats(ts, 1e6)
    return {
        "shape": [rows, d, o],
        "int8_weight_widened_before_dot": bool(re.search(rf"f32\[{d},{o}\]\S* fusion\(", entry)),
        "us": times,
        "int8_over_float_median": times["int8"]["median"] / times["float32"]["median"],
    }


def schedule_probe(cfg, rows: int, samples: int) -> dict:
    """Why ``model._widen`` ties each widening to the matmul's input: a chain of every expert
    FFN of the model (layers x experts, this model's shapes) in one jit, int8 weights widened
    by ``matmul`` against a plain ``q.astype`` that depends on nothing but the weight. Reports
    XLA's temporary buffer size for each (every widened copy live at once, or one) and time."""
    rng = np.random.default_rng(0)
    d, f = cfg.hidden_size, cfg.expert_intermediate_size
    n = cfg.num_layers * cfg.num_experts
    ws = [
        (
            quantize_device(jnp.asarray(0.1 * rng.standard_normal((d, 2 * f)), jnp.float32)),
            quantize_device(jnp.asarray(0.1 * rng.standard_normal((f, d)), jnp.float32)),
        )
        for _ in range(n)
    ]
    x = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)

    def untied(x, w):
        return (x @ w.q.astype(x.dtype)) * w.scale

    out = {"experts": n}
    for name, mm in (("tied", matmul), ("untied", untied)):

        def chain(x, ws, mm=mm):
            for gu, down in ws:
                h = mm(x, gu)
                x = x + 0.01 * mm(jax.nn.silu(h[:, :f]) * h[:, f:], down)
            return x

        fn = jax.jit(chain)
        temp = fn.lower(x, ws).compile().memory_analysis().temp_size_in_bytes
        fn(x, ws).block_until_ready()
        ts = []
        for _ in range(samples):
            t0 = time.perf_counter()
            fn(x, ws).block_until_ready()
            ts.append(time.perf_counter() - t0)
        out[name] = {"temp_mb": temp / 1e6, "ms": stats(ts)}
    out["untied_over_tied_median"] = out["untied"]["ms"]["median"] / out["tied"]["ms"]["median"]
    return out


def mixtral_memory() -> dict:
    """Mixtral-8x7B's parameter bytes from its config shapes: bf16, and int8 matrices with
    float32 per-channel scales (the rest bf16). Computed, not measured: no weights loaded."""
    cfg = MODEL_PRESETS["mixtral-8x7b"]
    bf16 = int8 = params = 0
    for path, shape in target_shapes(cfg).items():
        n = int(np.prod(shape))
        params += n
        bf16 += 2 * n
        if is_quantized_path(path):
            int8 += n + 4 * (n // shape[-2])  # int8 values, a float32 scale per output channel
        else:
            int8 += 2 * n
    return {
        "computed_from_config": True,
        "params": params,
        "bfloat16_gb": bf16 / 1e9,
        "int8_gb": int8 / 1e9,
        "int8_over_bf16": int8 / bf16,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="HF checkpoint dir (default: built-in) or random:PRESET")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--probe-samples", type=int, default=300)
    ap.add_argument("--out", help="JSON path (default experiments/results/int8-bench-<dev>.json)")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()
    spec = args.model or str(qllm_jax.builtin_model_dir())
    models = load_models(spec, args.dtype)
    cfg = models[None].config
    rng = np.random.default_rng(0)
    prompts = [
        [int(t) for t in rng.integers(3, cfg.vocab_size, args.prompt_len)]
        for _ in range(args.batch)
    ]
    arms = decode_arms(models, prompts, args)
    tokens = arms.pop("_tokens")
    bytes_ = {q or "float": param_bytes(m) for q, m in models.items()}
    errors = logit_error(models, spec, np.asarray(prompts))
    d, f = cfg.hidden_size, cfg.expert_intermediate_size
    probes = [
        convert_probe(d, 2 * f, args.batch, args.probe_samples),  # this model's expert gate/up
        convert_probe(1024, 4096, args.batch, args.probe_samples),  # a larger one
    ]
    summary = {
        "param_bytes_int8_over_float": bytes_["int8"]["total"] / bytes_["float"]["total"],
        "matrix_bytes_int8_over_float": bytes_["int8"]["matrices"] / bytes_["float"]["matrices"],
        **{
            f"{mode}_step_int8_over_float": arms[f"int8_{mode}"]["step_ms"]["median"]
            / arms[f"float_{mode}"]["step_ms"]["median"]
            for mode in MODES
        },
        "int8_logits": errors["int8"],
        "greedy_int8_vs_float_fused": agreement(tokens["float_fused"], tokens["int8_fused"]),
        "int8_fused_equals_segmented": tokens["int8_fused"] == tokens["int8_segmented"],
        "valid": all(a["valid"] for a in arms.values()),
    }
    device = jax.devices()[0]
    report = {
        "device": f"{device.platform}:{device.device_kind}",
        "host": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "jax": jax.__version__,
        "command": " ".join(["python experiments/int8_bench.py", *(argv or sys.argv[1:])]),
        "model": {
            "dir": spec,
            "model_type": cfg.model_type,
            "layers": cfg.num_layers,
            "experts": cfg.num_experts,
            "hidden": d,
            "expert_ffn": f,
            "vocab": cfg.vocab_size,
            "dtype": args.dtype,
            "expert_layout": models[None].params.layers[0].experts.layout,
        },
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "summary": summary,
        "param_bytes": bytes_,
        "arms": arms,
        "logit_error_vs_float32": errors,
        "convert_probe": probes,
        "schedule_probe": schedule_probe(cfg, args.batch, max(10, args.probe_samples // 10)),
        "mixtral_8x7b_memory": mixtral_memory(),
        "note": "CPU step times show what the int8 path costs on XLA:CPU (it widens each int8 "
        "weight to float before its dot), not what int8 saves on a GPU, where a decode step "
        "is bound by reading the weights.",
    }
    out = Path(args.out) if args.out else RESULTS / f"int8-bench-{device.platform}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(json.dumps(report["mixtral_8x7b_memory"], indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
