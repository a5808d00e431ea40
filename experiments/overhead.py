"""What segmenting a forward pass costs, against a fast fused step and HF transformers.

All arms run in one process, interleaved round by round, each warmed (``Engine.warmup``) so
that nothing compiles inside a measured window (the JSON records compilations per window and
marks any with one invalid). Decode of one batch of ``--batch`` sequences:

- ``fused`` (one jit per pass), ``segmented_layer`` (attention + all experts per layer),
  ``segmented_group<g>`` (``--group-size`` experts per segment), each under the iteration-level
  ``priority`` policy, so this measures segmentation, not preemption;
- the fused step with ``top_p=0.95`` and with ``top_k=50`` sampling against greedy
  (``--only sampling``: just those, plus both at once, in a JSON of their own);
- HF transformers ``generate`` (PyTorch, greedy, same checkpoint and batch);
- host time: ``host_dispatch_us_per_segment`` (the executor enqueuing segments, nothing
  blocking) and ``host_us_per_segment_qllm`` (scheduler + executor per segment under the
  preemptive policy, time waiting on the device excluded), with a breakdown;
- the roofline: bytes a decode step must read over this machine's measured bandwidth;
- ``--attention-sweep``: fused decode steps for B = 1..32 sequences of L tokens (default 512):
  per-sequence cost, which should stay flat (each row reads only its own keys);
- ``--trace``: a profiler trace of fused steps, time by XLA op;
- preemption wait: LS arrivals while a ``--prefill-len``-token BE prompt prefills under
  ``qllm``, expert granularity;
- ``--only passes``: the passes of the demo's backlog (up to 512 rows: decode rows of 100-270
  tokens, prefill chunks, both), each run whole through the executor fused, per layer and per
  expert, interleaved: what segmenting costs at those sizes, and the attention work each pass
  does (key blocks computed per layer; with and without the row tiles of
  ``models.model.paged_attention``), in a JSON of its own.

    python experiments/overhead.py                       # built-in model, float32, CPU
    python experiments/overhead.py --attention-sweep --trace --out experiments/results/x.json
    python experiments/overhead.py --model random:mixtral-8x7b-16l --dtype bfloat16 --no-hf
    python experiments/overhead.py --only sampling --repeats 7 --out /tmp/sampling.json
    python experiments/overhead.py --only passes --repeats 8

Writes ``experiments/results/overhead-<device>.json`` unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import qllm_jax
from qllm_jax import compile_log

RESULTS = Path(__file__).resolve().parent / "results"
GREEDY = dict(temperature=0.0)
SAMPLERS = {"greedy": GREEDY, "top_p": dict(temperature=1.0, top_p=0.95, seed=1),
            "top_k": dict(temperature=1.0, top_k=50, seed=1),
            "top_p_top_k": dict(temperature=1.0, top_p=0.95, top_k=50, seed=1)}  # fmt: skip


def stats(xs: list[float], scale: float = 1e3) -> dict:
    xs = sorted(xs)
    return {
        "min": xs[0] * scale,
        "median": statistics.median(xs) * scale,
        "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))] * scale,
        "max": xs[-1] * scale,
        "n": len(xs),
    }


class Arm:
    """One engine decoding one batch again and again; ``round()`` times its decode steps."""

    def __init__(
        self, model, prompts, new_tokens: int, sampling: dict, warm: bool = True, **engine_kw
    ) -> None:
        """``warm``: compile every executable the batch can reach first (``Engine.warmup``);
        else only what its first, untimed round runs (the measured rounds still count any
        compilation)."""
        self.engine = qllm_jax.Engine(model, max_batch_size=len(prompts), **engine_kw)
        self.prompts, self.new_tokens = prompts, new_tokens
        self.sp = qllm_jax.SamplingParams(max_tokens=new_tokens, ignore_eos=True, **sampling)
        ctx = max(len(p) for p in prompts) + new_tokens
        if warm:
            rows = sum(len(p) for p in prompts)
            self.engine.warmup(min(rows, self.engine.config.max_num_batched_tokens), ctx)
        self.steps: list[float] = []
        self.compiles = 0
        self.round()  # one untimed round: first-call effects
        self.steps.clear()
        self.compiles = 0

    def round(self) -> None:
        eng = self.engine
        for p in self.prompts:
            eng.add_request(p, self.sp)
        with compile_log.Window() as w:
            while eng.has_unfinished():
                decoding = not eng.scheduler.waiting and not any(
                    r.in_prefill for r in eng.scheduler.admitted
                )
                t0 = time.perf_counter()
                eng.step()
                if decoding:
                    self.steps.append(time.perf_counter() - t0)
        self.compiles += w.compiles


def decode_arms(model, prompts, args) -> dict:
    kw = dict(
        policy="priority", page_size=16, max_num_batched_tokens=max(512, sum(map(len, prompts)))
    )
    cfg = model.config
    if args.only == "sampling":  # the fused step under each sampler, nothing else
        arms = {"fused": Arm(model, prompts, args.new_tokens, GREEDY, mode="fused", **kw)}
        for name in ("top_p", "top_k", "top_p_top_k"):
            arms[f"fused_{name}"] = Arm(
                model, prompts, args.new_tokens, SAMPLERS[name], mode="fused", **kw
            )
        return run_arms(arms, prompts, args)
    arms = {
        "fused": Arm(model, prompts, args.new_tokens, GREEDY, mode="fused", **kw),
        "segmented_layer": Arm(
            model, prompts, args.new_tokens, GREEDY, mode="segmented",
            expert_group_size=cfg.num_experts, **kw,
        ),
        f"segmented_group{args.group_size}": Arm(
            model, prompts, args.new_tokens, GREEDY, mode="segmented",
            expert_group_size=args.group_size, **kw,
        ),
        "fused_top_p": Arm(model, prompts, args.new_tokens, SAMPLERS["top_p"], mode="fused", **kw),
        "fused_top_k": Arm(model, prompts, args.new_tokens, SAMPLERS["top_k"], mode="fused", **kw),
    }  # fmt: skip
    return run_arms(arms, prompts, args)


def run_arms(arms: dict, prompts, args) -> dict:
    """Run ``arms`` (name -> ``Arm``) for ``args.repeats`` interleaved rounds; per arm its step
    times, each round's median, decode tokens/s, segments per pass and its compile count."""
    rounds: dict[str, list[float]] = {name: [] for name in arms}  # each round's median step
    for r in range(args.repeats):  # interleaved: drift on a shared machine hits every arm alike
        for name, arm in arms.items():
            seen = len(arm.steps)
            arm.round()
            rounds[name].append(statistics.median(arm.steps[seen:]) * 1e3)
        print(f"round {r + 1}/{args.repeats}", flush=True)
    out = {}
    for name, arm in arms.items():
        st = stats(arm.steps)
        out[name] = {
            "step_ms": st,
            "round_median_ms": rounds[name],
            "decode_tokens_per_s": len(prompts) / (st["median"] / 1e3),
            "segments_per_pass": arm.engine.executor.segments_run / max(arm.engine.num_steps, 1),
            "compiles_in_measured_windows": arm.compiles,
            "valid": arm.compiles == 0,
        }
        print(f"[{name}] median {st['median']:.2f} ms (min {st['min']:.2f})", flush=True)
    return out


def host_dispatch_us(model, prompts, args) -> dict:
    """Executor host time per segment, enqueuing only: the lookahead never blocks."""
    eng = qllm_jax.Engine(
        model, policy="priority", mode="segmented", lookahead=10**6,
        expert_group_size=args.group_size, max_batch_size=len(prompts),
    )  # fmt: skip
    ex = eng.executor
    chunks = tuple(
        qllm_jax.scheduler.Chunk(i, args.prompt_len, (5,), tuple(range(1 + 4 * i, 5 + 4 * i)))
        for i in range(len(prompts))
    )
    rec = qllm_jax.scheduler.CarryRecord(0, chunks)
    eng.warmup(max_rows=len(prompts), max_context=args.prompt_len + 1)
    samples = []
    with compile_log.Window() as w:
        for _ in range(max(5, args.repeats)):
            carry = ex.start(rec)
            jax.block_until_ready(carry)
            t0 = time.perf_counter()
            carry = ex.advance(carry, 0, ex.head)
            samples.append((time.perf_counter() - t0) / ex.head)
            jax.block_until_ready(carry)
    return {"us_per_segment": stats(samples, 1e6), "compiles": w.compiles}


def host_qllm_us(model, prompts, args) -> dict:
    """Scheduler + executor host time per segment under ``qllm`` (expert granularity), decode,
    excluding time spent waiting on the device."""
    eng = qllm_jax.Engine(
        model, policy="qllm", granularity="expert", expert_group_size=args.group_size,
        max_batch_size=len(prompts), aging_s=None, max_park_s=None,
    )  # fmt: skip
    sp = qllm_jax.SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    eng.warmup(max_rows=sum(map(len, prompts)), max_context=args.prompt_len + args.new_tokens)
    sched_s = exec_s = 0.0
    per_segment = []
    with compile_log.Window() as w:
        for _ in range(args.repeats):
            for p in prompts:
                eng.add_request(p, sp)
            while eng.has_unfinished():
                ex = eng.executor
                decoding = not eng.scheduler.waiting and not any(
                    r.in_prefill for r in eng.scheduler.admitted
                )
                seg0, wait0 = ex.segments_run, ex.wait_s
                t0 = time.perf_counter()
                plan = eng.scheduler.schedule()
                t1 = time.perf_counter()
                result = ex.execute(plan)
                t2 = time.perf_counter()
                eng.scheduler.update(plan, result)
                t3 = time.perf_counter()
                segs = ex.segments_run - seg0 + (1 if plan.finishes else 0)
                if decoding and segs:
                    host = (t3 - t0) - (ex.wait_s - wait0)
                    per_segment.append(host / segs)
                    sched_s += (t1 - t0) + (t3 - t2)
                    exec_s += (t2 - t1) - (ex.wait_s - wait0)
    n = len(per_segment)
    return {
        "us_per_segment": stats(per_segment, 1e6),
        "scheduler_us_per_plan": sched_s / max(n, 1) * 1e6,
        "executor_host_us_per_plan": exec_s / max(n, 1) * 1e6,
        "plans_measured": n,
        "compiles": w.compiles,
    }


def hf_decode(model_dir, prompts, new_tokens: int, dtype: str, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def gen(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            hf.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
        return time.perf_counter() - t0

    gen(2)
    prefill = [gen(1) for _ in range(repeats)]
    total = [gen(new_tokens) for _ in range(repeats)]
    steps = [(t - statistics.median(prefill)) / (new_tokens - 1) for t in total]
    st = stats(steps)
    return {
        "step_ms": st,
        "decode_tokens_per_s": len(prompts) / (st["median"] / 1e3),
        "threads": torch.get_num_threads(),
    }


def bandwidth_gb_s() -> float:
    """This machine's streaming read bandwidth as XLA sees it: a sum over 512 MB (far above any
    cache), the median of 9."""
    x = jnp.ones((128 << 20,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    typical = statistics.median(_timed(lambda: f(x).block_until_ready()) for _ in range(9))
    return x.nbytes / typical / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_bytes(model, batch: int, ctx: int) -> dict:
    """Bytes one decode step must read: every weight but the embedding table (a batch this size
    touches nearly every expert: the expected fraction is counted), plus the KV of each row."""
    cfg = model.config
    itemsize = np.dtype(model.dtype).itemsize
    leaves = jax.tree_util.tree_leaves(model.params)
    total = sum(x.size for x in leaves) * itemsize
    experts = (
        sum(x.size for lp in model.params.layers for x in jax.tree_util.tree_leaves(lp.experts))
        * itemsize
    )
    hit = 1 - (1 - cfg.top_k / cfg.num_experts) ** batch  # P(an expert gets a row)
    embed = model.params.embed.size * itemsize if not cfg.tie_word_embeddings else 0
    weights = total - embed - experts + experts * hit
    kv = batch * ctx * 2 * cfg.num_layers * cfg.kv_size * itemsize
    return {"weights": weights, "kv": kv, "total": weights + kv, "experts_touched": hit}


def attention_sweep(model, args) -> dict:
    """Fused decode step for B sequences of L tokens: per-sequence cost should not grow."""
    out = {}
    length = args.sweep_len
    for b in (1, 2, 4, 8, 16, 32):
        prompts = [[5] * length for _ in range(b)]
        pages = b * (-(-(length + 8) // 16)) + 1  # what the batch needs, no more
        # warmed by its first round: on a CPU each fused executable maps ~400 memory regions
        # and a process may hold 65530, so warming every bucket of every B would not fit
        arm = Arm(model, prompts, 4, GREEDY, warm=False, policy="priority", mode="fused",
                  kv_pages=pages, max_num_batched_tokens=512, prefill_chunk=512)  # fmt: skip
        for _ in range(max(2, args.repeats // 2)):
            arm.round()
        st = stats(arm.steps)
        out[b] = {"step_ms": st, "per_sequence_ms": st["median"] / b, "valid": arm.compiles == 0}
        print(f"[attention sweep] B={b}: {st['median']:.2f} ms, {st['median'] / b:.3f} ms/seq")
    return {"context": length, "points": out}


def trace_account(model, prompts, args) -> dict:
    """Where a fused decode step's time goes: the XLA ops of a profiler trace, each attributed
    to the model function that emitted it (from the compiled program's stack frames)."""
    arm = Arm(model, prompts, args.new_tokens, GREEDY, policy="priority", mode="fused")
    owner = _op_owners(arm.engine.executor, len(prompts), args.prompt_len + args.new_tokens // 2)
    d = tempfile.mkdtemp(prefix="qllm-trace-")
    jax.profiler.start_trace(d)
    arm.round()
    jax.profiler.stop_trace()
    n = max(len(arm.steps), 1)
    path = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    by_fn: collections.Counter[str] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if ev.name in owner:
                    by_fn[owner[ev.name]] += ev.duration_ns
    total = sum(by_fn.values())
    return {
        "ms_per_step_by_function": {k: v / 1e6 / n for k, v in by_fn.most_common()},
        "share": {k: v / total for k, v in by_fn.most_common()} if total else {},
        "steps": n,
        "note": "op time on the XLA threads over all steps of a decode round (prefill passes "
        "included, a few percent); ops of one step may overlap",
    }


_OWNERS = (  # innermost first: the first of these on an op's stack names it
    "paged_attention", "rope", "route", "norm", "qkv", "attention_output", "_expert_group_dense",
    "expert_group", "shared_expert", "top_k_top_p_mask", "_invert_cdf", "sample", "logits",
    "embed", "empty_state", "attention_fn", "experts_fn", "head_fn", "fused_step",
)  # fmt: skip


def _op_owners(ex, batch: int, ctx: int) -> dict[str, str]:
    """fusion/op name → model function, from the compiled fused decode step's HLO text."""
    import re

    from qllm_jax.carry import pass_meta, token_ids
    from qllm_jax.scheduler import CarryRecord, Chunk, SampleSpec

    pages = -(-ctx // ex.page_size)
    spec = SampleSpec(0.0, 0, 1.0, 0, 0)
    rec = CarryRecord(
        0, tuple(Chunk(i, ctx - 1, (5,), tuple(range(1, 1 + pages)), spec) for i in range(batch))
    )
    text = ex.kernels.fused.lower(
        ex._params, ex._head_params, tuple(ex.kv.k), tuple(ex.kv.v), token_ids(rec),
        pass_meta(rec, ex.page_size), ex._sample_inputs(rec, ex._sample_bucket(batch)),
        ex.expert_load.counts, ex._slot_maps, cfg=ex.cfg,
        page_size=ex.page_size, dtype=ex.dtype, want_logits=False,
    ).compile().as_text()  # fmt: skip
    section = lambda name: re.search(rf"\n{name}\n(.*?)\n\n", text, re.S)  # noqa: E731
    fn_names = dict(re.findall(r'(\d+) "([^"]*)"', section("FunctionNames").group(1)))
    locs = dict(re.findall(r"(\d+) \{file_name_id=\d+ function_name_id=(\d+)", text))
    frame_re = r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)"
    frames = {a: (b, c) for a, b, c in re.findall(frame_re, text)}

    def owner(frame: str) -> str:
        names, seen = [], set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            loc, parent = frames[frame]
            names.append(fn_names.get(locs.get(loc, ""), ""))
            frame = parent
        return next((n for n in names if n in _OWNERS), "other")

    out = {}
    for name, frame in re.findall(r"%([\w.-]+) = [^\n]*?stack_frame_id=(\d+)", text):
        out[name] = owner(frame)
    return out


def preemption_wait(model, args) -> dict:
    """What an LS request pays for arriving while a long BE prompt prefills in one pass (qllm,
    expert granularity): its TTFT minus its TTFT on the idle engine, against the time of one
    segment of that prefill (the host runs ``lookahead`` segments ahead of the device)."""
    n = args.prefill_len
    eng = qllm_jax.Engine(
        model, policy="qllm", granularity="expert", expert_group_size=args.group_size,
        max_num_batched_tokens=n, prefill_chunk=n, aging_s=None, max_park_s=None,
    )  # fmt: skip
    eng.warmup(max_rows=n, max_context=n + 4)
    rng = np.random.default_rng(0)
    one = qllm_jax.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ls_prompt = [5, 6, 7]

    def ls_ttft() -> float:
        eng.add_request(ls_prompt, one, priority=0, request_id="ls")
        done = {}
        while eng.has_unfinished():
            done |= {o.request_id: o for o in eng.step() if o.finished}
        m = done["ls"].metrics
        return m.first_token_time - m.arrival_time

    with compile_log.Window() as w:
        alone = statistics.median(ls_ttft() for _ in range(10))
        seg_times = []  # each segment of the BE prefill alone, waited for
        eng.add_request([int(t) for t in rng.integers(3, 1000, n)], one, priority=1)
        while eng.has_unfinished():
            t0 = time.perf_counter()
            eng.step()
            jax.block_until_ready(eng.executor.carries)
            seg_times.append(time.perf_counter() - t0)
        delays = []
        for _ in range(args.preempt_samples):
            eng.add_request([int(t) for t in rng.integers(3, 1000, n)], one, priority=1)
            for _ in range(int(rng.integers(2, 8))):  # a few segments into the prefill; the
                eng.step()  # host is up to `lookahead` segments ahead of the device
            delays.append(ls_ttft() - alone)
    return {
        "prefill_tokens": n,
        "ls_ttft_alone_ms": alone * 1e3,
        "delay_ms": stats(delays),
        "be_segment_ms": stats(seg_times),
        "lookahead": eng.executor.lookahead,
        "compiles": w.compiles,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model", help="HF checkpoint dir (default: the built-in model) or random:PRESET"
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--group-size", type=int, default=1, help="experts per segment, group arm")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF transformers arm")
    ap.add_argument("--attention-sweep", action="store_true")
    ap.add_argument("--sweep-len", type=int, default=512)
    ap.add_argument("--trace", action="store_true", help="profile fused steps by XLA op")
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--preempt-samples", type=int, default=0, help="0: skip the preemption wait")
    ap.add_argument(
        "--only",
        choices=["sampling", "passes"],
        help="sampling: only the fused greedy, top_p, top_k and top_p+top_k decode arms "
        "(their step times and ratios to greedy; no segmented, host, roofline or HF arms); "
        "passes: only the backlog's pass shapes, fused vs per layer vs per expert",
    )
    ap.add_argument("--out", help="JSON path (default experiments/results/overhead-<dev>.json)")
    args = ap.parse_args(argv)

    model_dir = args.model or str(qllm_jax.builtin_model_dir())
    if model_dir.startswith("random:"):  # random weights of a preset's shapes, on the device
        model = qllm_jax.random_model(model_dir.removeprefix("random:"), args.dtype)
        args.no_hf = True
    else:
        model = qllm_jax.load(model_dir, dtype=args.dtype)
    cfg = model.config
    if args.only == "passes":
        report = pass_costs(model, args, argv)
        return _write(report, report["summary"], args.out, "overhead-passes")
    rng = np.random.default_rng(0)
    prompts = [
        [int(t) for t in rng.integers(3, cfg.vocab_size, args.prompt_len)]
        for _ in range(args.batch)
    ]
    arms = decode_arms(model, prompts, args)
    fused = arms["fused"]["step_ms"]["median"]
    if args.only == "sampling":
        return _sampling_report(arms, args, argv, model_dir)
    group = f"segmented_group{args.group_size}"
    summary = {
        "segmented_layer_over_fused": arms["segmented_layer"]["step_ms"]["median"] / fused,
        "segmented_group_over_fused": arms[group]["step_ms"]["median"] / fused,
        "top_p_over_greedy": arms["fused_top_p"]["step_ms"]["median"] / fused,
        "top_k_over_greedy": arms["fused_top_k"]["step_ms"]["median"] / fused,
    }
    dispatch = host_dispatch_us(model, prompts, args)
    qllm_host = host_qllm_us(model, prompts, args)
    summary["host_dispatch_us_per_segment"] = dispatch["us_per_segment"]["median"]
    summary["host_us_per_segment_qllm"] = qllm_host["us_per_segment"]["median"]
    bw = bandwidth_gb_s()
    need = decode_bytes(model, args.batch, args.prompt_len + args.new_tokens // 2)
    floor_ms = need["total"] / (bw * 1e9) * 1e3
    summary["fused_roofline_fraction"] = floor_ms / fused
    report: dict = {
        "arms": arms,
        "host_dispatch": dispatch,
        "host_qllm": qllm_host,
        "roofline": {"bandwidth_gb_s": bw, "bytes_per_step": need, "floor_ms": floor_ms},
    }
    if not args.no_hf:
        print("[hf_generate] ...", flush=True)
        report["hf_generate"] = hf_decode(
            model_dir, prompts, args.new_tokens, args.dtype, args.repeats
        )
        summary["fused_over_hf_tokens_per_s"] = (
            arms["fused"]["decode_tokens_per_s"] / report["hf_generate"]["decode_tokens_per_s"]
        )
    if args.attention_sweep:
        report["attention_sweep"] = sweep = attention_sweep(model, args)
        pts = sweep["points"]
        summary["attention_per_seq_b32_over_b4"] = (
            pts[32]["per_sequence_ms"] / pts[4]["per_sequence_ms"]
        )
    if args.trace:
        report["trace"] = trace_account(model, prompts, args)
    if args.preempt_samples:
        report["preemption_wait"] = preemption_wait(model, args)
        wait = report["preemption_wait"]
        summary["preempt_delay_ms_p90"] = wait["delay_ms"]["p90"]
        summary["preempt_delay_in_be_segments_p90"] = (
            wait["delay_ms"]["p90"] / wait["be_segment_ms"]["median"]
        )
    summary["valid"] = (
        all(a["valid"] for a in arms.values())
        and not dispatch["compiles"]
        and not qllm_host["compiles"]
        and all(pt["valid"] for pt in report.get("attention_sweep", {}).get("points", {}).values())
        and not report.get("preemption_wait", {}).get("compiles")
    )
    report = {
        **_run_header(argv),
        "model": {
            "dir": str(model_dir), "model_type": cfg.model_type, "layers": cfg.num_layers,
            "experts": cfg.num_experts, "hidden": cfg.hidden_size, "dtype": args.dtype,
            "expert_layout": model.params.layers[0].experts.layout,
        },
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "summary": summary,
        **report,
    }  # fmt: skip
    return _write(report, summary, args.out, "overhead")


# (name, [(first position, tokens), ...]): the backlog's passes (reproduce_paper.py's demo:
# BE prompts of ~160 tokens (at most 256) and 8 new tokens, LS prompts of ~48, a 512-token
# budget), one chunk per sequence, each sequence on pages of its own
PASS_SHAPES = {
    "decode22": [(100 + 8 * i, 1) for i in range(22)],
    "decode22+prefill4x122": [(100 + 8 * i, 1) for i in range(22)] + [(0, 122)] * 4,
    "prefill4x122": [(0, 122)] * 4,
    "prefill3x168": [(0, 168)] * 3,
    "prefill1x490": [(0, 490)],
    "decode22+prefill1x490": [(100 + 8 * i, 1) for i in range(22)] + [(0, 490)],
}


def pass_chunks(spec, page_size: int) -> list:
    """``Chunk``s for a pass shape: greedy, each sampling its last row, fresh pages."""
    from qllm_jax.scheduler.plan import Chunk, SampleSpec

    greedy, chunks, page = SampleSpec(0.0, 0, 1.0, 0, 0), [], 1
    for seq, (start, n) in enumerate(spec):
        count = -(-(start + n) // page_size)
        chunks.append(Chunk(seq, start, (5,) * n, tuple(range(page, page + count)), greedy))
        page += count
    return chunks


def attention_blocks(chunks, page_size: int, tiled: bool) -> int:
    """Key blocks one layer's paged attention computes for ``chunks`` (rows x blocks, over
    the pass's row and page buckets), with the row tiles or without (every row runs every
    block of the page bucket). The work, counted, not timed."""
    from qllm_jax.carry import PAGE_BUCKET_MIN, ROW_BUCKET_MIN, bucket
    from qllm_jax.models.model import ATTENTION_BLOCK_PAGES, attention_row_tile

    positions = [c.start + i for c in chunks for i in range(c.num_tokens)]
    rows = bucket(len(positions), ROW_BUCKET_MIN)
    pages = bucket(max(len(c.pages) for c in chunks), PAGE_BUCKET_MIN)
    block = min(pages, ATTENTION_BLOCK_PAGES)
    if not tiled:
        return rows * pages // block
    positions += [0] * (rows - len(positions))  # padding rows
    tile = attention_row_tile(rows)
    reach = [max(positions[i : i + tile]) // (block * page_size) + 1 for i in range(0, rows, tile)]
    return tile * sum(reach)


def pass_costs(model, args, argv) -> dict:
    """``--only passes``: each backlog pass shape run whole through the executor (no
    scheduler), fused, per layer and per expert, ``args.repeats`` interleaved rounds of 5 runs
    each; medians and per-round ratios to the fused pass."""
    page_size = 16
    kw = dict(policy="priority", max_batch_size=32, max_num_batched_tokens=512,
              page_size=page_size, kv_pages=4096)  # fmt: skip
    experts = model.config.num_experts
    engines = {
        "fused": qllm_jax.Engine(model, mode="fused", **kw),
        "segmented_layer": qllm_jax.Engine(
            model, mode="segmented", expert_group_size=experts, **kw
        ),
        "segmented_expert": qllm_jax.Engine(model, mode="segmented", expert_group_size=1, **kw),
    }
    shapes = {name: pass_chunks(spec, page_size) for name, spec in PASS_SHAPES.items()}

    def run(arm: str, chunks) -> None:
        engines[arm].executor.forward(chunks, fused=arm == "fused")

    for chunks in shapes.values():  # compile and first-call effects, outside every window
        for arm in engines:
            run(arm, chunks)
            run(arm, chunks)
    times = {s: {a: [] for a in engines} for s in shapes}
    rounds = {s: {a: [] for a in engines} for s in shapes}
    with compile_log.Window() as window:
        for r in range(args.repeats):
            for name, chunks in shapes.items():
                for arm in engines:
                    ts = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        run(arm, chunks)
                        ts.append(time.perf_counter() - t0)
                    times[name][arm] += ts
                    rounds[name][arm].append(statistics.median(ts))
            print(f"round {r + 1}/{args.repeats}", flush=True)
    out = {}
    for name, chunks in shapes.items():
        fused = rounds[name]["fused"]
        entry = {
            "rows": sum(c.num_tokens for c in chunks),
            "max_pages": max(len(c.pages) for c in chunks),
            "attention_blocks_per_layer": attention_blocks(chunks, page_size, tiled=True),
            "attention_blocks_per_layer_untiled": attention_blocks(chunks, page_size, False),
        }
        for arm in engines:
            entry[f"{arm}_ms"] = stats(times[name][arm])
            if arm != "fused":
                ratios = [a / f for a, f in zip(rounds[name][arm], fused, strict=True)]
                entry[f"{arm}_over_fused"] = {
                    "min": min(ratios), "median": statistics.median(ratios), "max": max(ratios),
                }  # fmt: skip
        out[name] = entry
        print(f"[{name}] rows {entry['rows']}: fused {entry['fused_ms']['median']:.1f} ms, "
              f"per layer x{entry['segmented_layer_over_fused']['median']:.2f}, "
              f"per expert x{entry['segmented_expert_over_fused']['median']:.2f}; attention "
              f"blocks {entry['attention_blocks_per_layer']} "
              f"(untiled {entry['attention_blocks_per_layer_untiled']})", flush=True)  # fmt: skip
    ratios = ("segmented_layer_over_fused", "segmented_expert_over_fused")
    summary = {name: {k: e[k]["median"] for k in ratios} for name, e in out.items()}
    return {
        **_run_header(argv),
        "load_average": list(os.getloadavg()),
        "summary": summary | {"valid": window.compiles == 0},
        "repeats": args.repeats,
        "runs_per_round": 5,
        "engine": kw,
        "compiles_in_measured_windows": window.compiles,
        "valid": window.compiles == 0,
        "passes": out,
    }


def _sampling_report(arms: dict, args, argv, model_dir) -> dict:
    """``--only sampling``: each sampler's step time over greedy's, round by round (min /
    median / max over the rounds of the per-round median ratios, and the ratio of medians over
    all steps), in a JSON of its own (``overhead-sampling-<device>.json`` unless ``--out``)."""
    greedy, greedy_all = arms["fused"]["round_median_ms"], arms["fused"]["step_ms"]["median"]
    summary = {}
    for name, arm in arms.items():
        if name != "fused":  # per round: its median step over greedy's median step that round
            ratios = [a / g for a, g in zip(arm["round_median_ms"], greedy, strict=True)]
            summary[f"{name.removeprefix('fused_')}_over_greedy"] = {
                "min": min(ratios), "median": statistics.median(ratios), "max": max(ratios),
                "of_all_steps_median": arm["step_ms"]["median"] / greedy_all,
            }  # fmt: skip
    summary["valid"] = all(a["valid"] for a in arms.values())
    report = {
        **_run_header(argv),
        "load_average": list(os.getloadavg()),
        "model": str(model_dir), "dtype": args.dtype, "batch": args.batch,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "summary": summary,
        "arms": arms,
    }  # fmt: skip
    return _write(report, summary, args.out, "overhead-sampling")


def _run_header(argv) -> dict:
    """Where and how a report was measured: device, host CPU, jax version, the command."""
    device = jax.devices()[0]
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "command": " ".join(["python experiments/overhead.py", *(argv or sys.argv[1:])]),
    }


def _write(report: dict, summary: dict, out: str | None, stem: str) -> dict:
    """Save ``report`` (to ``out``, or ``RESULTS/<stem>-<platform>.json``) and print its
    summary."""
    path = Path(out) if out else RESULTS / f"{stem}-{jax.devices()[0].platform}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
