"""Sharded-engine checks on 8 simulated CPU devices, run in a process of their own.

``XLA_FLAGS`` must name the device count before jax is imported, so ``tests/test_sharded.py``
runs this module in a subprocess: ``python -m tests.sharded_checks parity:mixtral
preemption:4x2 ...``. Each check prints one JSON line; the exit status is 0 only if all pass.
A collective that hangs (2 loaded cores, many queued sharded calls) fails within the
terminate timeout instead of stalling the suite.

Checks:
- ``parity:FAMILY[:POLICY][:int8][:EPxTP...]``: greedy tokens of two prompts on ep=8, tp=2 x
  ep=4 and tp=4 x ep=2 (or the meshes named) equal one device's, fused (``priority``) and
  segmented at expert granularity (``qllm``), float or int8 weights (``int8``: against int8
  on one device);
  last-position logits within 1e-4 of their scale (column blocks of the LM head and of the attention
  projections round differently on XLA:CPU: see qllm_jax/sharded.py).
- ``experts:FAMILY[:int8][:EPxTP...]``: the expert segment on each mesh is bitwise one
  device's (the dense CPU path), and the ragged path (accelerators: a psum of partial sums) is
  close to it.
- ``slots:FAMILY[:int8][:EPxTP...]``: the expert segment over EPLB slots (one redundant per
  rank), whole layer and one expert group, bitwise one device's without slots before and after
  re-placements that move copies between ranks; the ragged path close to it.
- ``eplb:FAMILY[:POLICY][:int8][:EPxTP...]``: the engine with EPLB on the mesh, re-placing
  every 2 steps: greedy tokens equal one device's without EPLB, and each rank's block of slots
  holds the experts its placement names.
- ``preemption:EPxTP``: under ``qllm`` with mixed priorities (BE prompts in flight, LS
  arrivals landing inside their passes, an abort), every request's tokens equal its solo
  single-device run, and no KV page, pass or carry is left behind.
"""

from __future__ import annotations

import os

DEVICES = 8
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count={DEVICES}"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=60"
)

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import qllm_jax  # noqa: E402
from qllm_jax.scheduler.plan import Chunk, SampleSpec  # noqa: E402
from tests.hf_tiny import make_checkpoint  # noqa: E402
from tests.test_engine_preemption import BASE, _check_clean, _sampling, drive  # noqa: E402

MESHES = ((8, 1), (4, 2), (2, 4))  # (expert_parallel, tensor_parallel)
# 8 experts and 8 query / 4 KV heads in every family, so every mesh shape above divides them;
# wide enough that each device's block of a matmul has >= 32 columns (XLA:CPU computes narrower
# blocks with another kernel, whose rounding differs: see qllm_jax/sharded.py)
SHAPE = dict(
    num_attention_heads=8, num_key_value_heads=4, head_dim=32, hidden_size=256, vocab_size=1024
)
_EXPERTS = {"mixtral": "num_local_experts", "phimoe": "num_local_experts"}
PROMPTS = ([1, 17, 90, 4, 55, 23, 8], [1, 100, 3, 64, 12, 77, 31, 9, 40, 5, 6, 120, 44])
KW = {k: v for k, v in BASE.items() if k != "dtype"}


@functools.cache
def checkpoint(family: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=f"sharded-{family}-"))
    overrides = {_EXPERTS.get(family, "num_experts"): 8}
    path, _ = make_checkpoint(family, root, **SHAPE, **overrides)
    return path


def _greedy(llm: qllm_jax.LLM, max_tokens: int = 6) -> list[list[int]]:
    sp = qllm_jax.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate([list(p) for p in PROMPTS], sp)]


def _last_logits(llm: qllm_jax.LLM) -> np.ndarray:
    """Logits at the last position of the longest prompt (one pass outside any plan)."""
    prompt = PROMPTS[1]
    pages = tuple(range(1, 1 + -(-len(prompt) // BASE["page_size"])))
    chunk = Chunk(0, 0, tuple(prompt), pages, SampleSpec(0.0, 0, 1.0, 0, 0))
    return llm.engine.executor.forward([chunk], fused=True, want_logits=True)


RUNS = {"priority": "layer", "qllm": "expert"}  # policy -> granularity


def _options(what: str) -> tuple[str, set[str], str | None, tuple[tuple[int, int], ...]]:
    """``FAMILY[:OPTION...]`` → (family, the options, quantize: ``"int8"`` if named, the
    meshes: those named as ``EPxTP``, else all of ``MESHES``)."""
    family, *rest = what.split(":")
    named = tuple(m for m in MESHES if f"{m[0]}x{m[1]}" in rest)
    return family, set(rest), "int8" if "int8" in rest else None, named or MESHES


def _runs(rest: set[str], quantize: str | None) -> list[tuple[str, dict]]:
    """The (policy, LLM options) a check runs: every ``RUNS`` policy, or those ``rest`` names."""
    return [
        (policy, dict(policy=policy, granularity=granularity, dtype="float32", quantize=quantize)
         | KW)
        for policy, granularity in RUNS.items()
        if not rest & set(RUNS) or policy in rest
    ]  # fmt: skip


def parity(what: str) -> dict:
    """``FAMILY[:POLICY][:int8][:EPxTP...]``: with ``int8``, int8 weights on one device are
    the reference (the same quantized leaves, placed shard by shard on the mesh)."""
    family, rest, quantize, meshes = _options(what)
    path = checkpoint(family)
    out = {}
    for policy, opts in _runs(rest, quantize):
        ref = qllm_jax.LLM(path, **opts)
        want, want_logits = _greedy(ref), _last_logits(ref)
        for ep, tp in meshes:
            llm = qllm_jax.LLM(path, expert_parallel=ep, tensor_parallel=tp, **opts)
            got = _greedy(llm)
            assert got == want, f"{family} ep={ep} tp={tp} {policy}: {got} != {want}"
            diff = float(np.abs(_last_logits(llm) - want_logits).max())
            scale = float(np.abs(want_logits).max())
            assert diff <= 1e-4 * scale, f"{family} ep={ep} tp={tp}: logits off by {diff}"
            out[f"{policy} ep={ep} tp={tp}"] = f"tokens identical, max |dlogit| {diff:.1e}"
    return out


def _routed_rows(cfg, seed: int) -> tuple:
    """16 random rows routed by a random router, as an expert segment takes them: x [16, D],
    weights and ids [16, top_k], the accumulator [16, D], zero routed-token counts [L, E]."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(16, cfg.hidden_size)).astype(np.float32))
    logits = jnp.asarray(rng.normal(size=(16, cfg.num_experts)).astype(np.float32))
    weights, ids = jax.lax.top_k(jax.nn.softmax(logits), cfg.top_k)
    acc = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    counts = jnp.zeros((cfg.num_layers, cfg.num_experts), jnp.int32)
    return x, weights, ids.astype(jnp.int32), acc, counts


def experts(what: str) -> dict:
    """``FAMILY[:int8][:EPxTP...]``: the expert segment on each expert-axis width, bitwise
    against one device: whole experts per device, their outputs added in one device's order."""

    from qllm_jax import mesh as mesh_lib
    from qllm_jax.segments import experts_segment
    from qllm_jax.sharded import MeshSegments

    family, _, quantize, meshes = _options(what)
    model = qllm_jax.load(checkpoint(family), dtype="float32", quantize=quantize)
    cfg = model.config
    x, weights, ids, acc, counts = _routed_rows(cfg, seed=3)
    layer = model.params.layers[0].experts
    extra = (counts, np.int32(0), None)  # routed-token counts, layer, no expert slots
    want, want_counts = experts_segment(
        layer, x, weights, ids, acc, np.int32(0), cfg.num_experts, *extra
    )
    out = {}
    for ep, tp in meshes:
        mesh = mesh_lib.make_mesh(ep, tp)
        sharded = mesh_lib.shard_params(model.params, mesh).layers[0].experts
        kernel = MeshSegments(mesh).kernels()["experts"]
        got, got_counts = kernel(
            sharded, x, weights, ids, acc, np.int32(0), cfg.num_experts, *extra
        )
        assert np.array_equal(np.asarray(got), np.asarray(want)), f"ep={ep} tp={tp}"
        assert np.array_equal(np.asarray(got_counts), np.asarray(want_counts)), "counts"
        ragged = MeshSegments(mesh, impl="ragged").kernels()["experts"]
        got, _ = ragged(sharded, x, weights, ids, acc, np.int32(0), cfg.num_experts, *extra)
        diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
        assert diff <= 1e-5 * float(np.abs(np.asarray(want)).max()), f"ragged ep={ep}: {diff}"
        out[f"ep={ep} tp={tp}"] = f"dense bitwise, ragged (psum) within {diff:.1e}"
    return out


def _skewed(cfg, hot: int) -> np.ndarray:
    """Routed-token counts [L, E] where expert ``hot`` takes most tokens."""
    loads = np.ones((cfg.num_layers, cfg.num_experts), np.int64)
    loads[:, hot] = 50
    return loads


def slots(what: str) -> dict:
    """``FAMILY[:int8][:EPxTP...]``: the expert segment over EPLB slots (E + ep slots, one
    redundant per rank, each rank holding its block) is bitwise one device's without slots,
    for a whole layer and for an expert group, before and after re-placements that move copies
    between ranks; the ragged path (a psum) is close to it."""

    from qllm_jax import mesh as mesh_lib
    from qllm_jax.eplb import ExpertSlots
    from qllm_jax.segments import experts_segment
    from qllm_jax.sharded import MeshSegments

    family, _, quantize, meshes = _options(what)
    model = qllm_jax.load(checkpoint(family), dtype="float32", quantize=quantize)
    cfg = model.config
    x, weights, ids, acc, counts = _routed_rows(cfg, seed=5)
    layer, out = model.params.layers[0].experts, {}
    for ep, tp in meshes:
        mesh = mesh_lib.make_mesh(ep, tp)
        sharded = mesh_lib.shard_params(model.params, mesh)
        placed = ExpertSlots([lp.experts for lp in sharded.layers], ep, ep, mesh)
        dense, ragged = (MeshSegments(mesh, i).kernels()["experts"] for i in ("dense", "ragged"))
        groups = [(0, cfg.num_experts)] + ([(ep, ep)] if ep < cfg.num_experts else [])
        loads, worst, moved = np.zeros((cfg.num_layers, cfg.num_experts), np.int64), 0.0, 0
        for hot in (None, 0, 5):  # the first placement, then two re-placements
            if hot is not None:
                loads = loads + _skewed(cfg, hot)
                moved += placed.rebalance(loads).moved_slots
            ep_slots, sm = placed.params(0)
            assert ep_slots.w_down.shape[0] == cfg.num_experts + ep
            for start, size in groups:
                args = (x, weights, ids, acc, np.int32(start), size, counts, np.int32(0))
                want, want_counts = experts_segment(layer.group(start, size), *args, None)
                got, got_counts = dense(ep_slots, *args, sm)
                assert np.array_equal(np.asarray(got), np.asarray(want)), (ep, tp, hot, start)
                assert np.array_equal(np.asarray(got_counts), np.asarray(want_counts))
                rough, _ = ragged(ep_slots, *args, sm)
                diff = float(np.abs(np.asarray(rough) - np.asarray(want)).max())
                assert diff <= 1e-5 * float(np.abs(np.asarray(want)).max()), (ep, hot, diff)
                worst = max(worst, diff)
        assert moved > 0, "the re-placements moved nothing"
        out[f"ep={ep} tp={tp}"] = (
            f"dense bitwise over 3 placements ({moved} slots moved), ragged within {worst:.1e}"
        )
    return out


def _on_their_ranks(llm: qllm_jax.LLM, ref: qllm_jax.LLM) -> None:
    """Each device's block of every layer's slot arrays is its rank's (its place on the
    'expert' axis) and holds the weights of the experts the placement puts there (compared
    with one device's expert weights: the values of an int8 one)."""
    import jax

    placed, mesh = llm.engine.executor.expert_slots, llm.engine.mesh
    rank_of = {d.id: r for r, row in enumerate(mesh.devices) for d in row}
    for layer, slot_expert in enumerate(placed.slot_expert):
        values = jax.tree.leaves(placed.params(layer)[0].w_down)[0]  # [S, F, D]
        experts = ref.engine.model.params.layers[layer].experts.w_down  # one device, split
        for shard in values.addressable_shards:
            block = range(placed.num_slots)[shard.index[0]]
            assert len(block) == placed.per_rank, (layer, block)
            assert block.start // placed.per_rank == rank_of[shard.device.id], (layer, block)
            for i, slot in enumerate(block):
                want = jax.tree.leaves(experts[slot_expert[slot]])[0]
                assert np.array_equal(np.asarray(shard.data)[i], np.asarray(want)), (layer, slot)


def eplb(what: str) -> dict:
    """``FAMILY[:POLICY][:int8][:EPxTP...]``: EPLB on the mesh (one redundant slot per rank,
    re-placed every 2 steps from the routed counts) gives the greedy tokens of one device
    without EPLB; copies move between ranks, and each rank's block holds the experts its
    placement names. Slots that the expert axis does not divide are refused naming it."""
    family, rest, quantize, meshes = _options(what)
    path = checkpoint(family)
    (ep, tp), *_ = meshes
    try:  # E + R slots that the expert axis does not divide: the error names the axis
        qllm_jax.Engine(path, expert_parallel=ep, tensor_parallel=tp, redundant_experts=3, **KW)
        raise AssertionError("8 + 3 slots over the expert axis were accepted")
    except ValueError as err:
        assert "'expert' axis" in str(err) and "11 expert slots" in str(err), err
    out = {}
    for policy, opts in _runs(rest, quantize):
        ref = qllm_jax.LLM(path, **opts)
        want = _greedy(ref, max_tokens=8)
        for ep, tp in meshes:
            mesh = dict(expert_parallel=ep, tensor_parallel=tp)
            llm = qllm_jax.LLM(path, **mesh, redundant_experts=ep, rebalance_every=2, **opts)
            got = _greedy(llm, max_tokens=8)
            assert got == want, f"{family} ep={ep} tp={tp} {policy} eplb: {got} != {want}"
            stats = llm.engine.stats()
            assert stats["expert_rebalances"] >= 2 and stats["expert_slots_moved"] > 0, stats
            _on_their_ranks(llm, ref)
            out[f"{policy} ep={ep} tp={tp}"] = (
                f"tokens identical over {stats['expert_rebalances']} re-placements "
                f"({stats['expert_slots_moved']} slots moved)"
            )
    return out


def _scenario() -> tuple[dict, dict, set]:
    """BE prompts in flight from step 0, LS arrivals at steps that land inside their passes,
    a BE request with a sampling seed, and one aborted mid-run."""
    rng = np.random.default_rng(7)
    reqs = [  # (arrive step, prompt length, max_tokens, priority, seed, abort after)
        (0, 22, 3, 1, None, None),
        (0, 14, 2, 1, 11, None),
        (3, 5, 2, 0, None, None),
        (6, 4, 3, 0, None, None),
        (9, 11, 2, 1, None, 4),
        (14, 6, 2, 0, 5, None),
    ]
    events, expected, aborted = {}, {}, set()
    for i, (arrive, plen, max_tokens, prio, seed, abort_after) in enumerate(reqs):
        prompt = tuple(int(t) for t in rng.integers(3, 128, plen))
        rid = f"r{i}"
        events.setdefault(arrive, []).append(("add", rid, (prompt, max_tokens, seed, prio)))
        if abort_after is not None:
            events.setdefault(arrive + abort_after, []).append(("abort", rid, None))
            aborted.add(rid)
        expected[rid] = (prompt, max_tokens, seed)
    return events, expected, aborted


def preemption(shape: str) -> dict:
    ep, tp = (int(x) for x in shape.split("x"))
    path = checkpoint("mixtral")
    model = qllm_jax.load(path, dtype="float32")
    events, expected, aborted = _scenario()
    solo = {}
    for rid, (prompt, max_tokens, seed) in expected.items():
        llm = qllm_jax.LLM(model, policy="priority", **KW)
        solo[rid] = llm.generate([list(prompt)], _sampling(max_tokens, seed))[0].token_ids
    eng = qllm_jax.Engine(
        path,
        dtype="float32",
        policy="qllm",
        granularity="expert",
        expert_parallel=ep,
        tensor_parallel=tp,
        **KW,
    )
    outs = drive(eng, events)
    stats = eng.stats()
    assert stats["preemptions_layer"] + stats["preemptions_expert"] > 0, stats
    for rid, want in solo.items():
        out = outs[rid]
        if rid in aborted and out.finish_reason == "abort":
            continue
        assert out.finish_reason == "length", (rid, out.finish_reason, out.error)
        assert out.token_ids == want, (rid, out.token_ids, want)
    _check_clean(eng)
    return {
        "preemptions": stats["preemptions_layer"] + stats["preemptions_expert"],
        "group_size": eng.executor.group_size,
    }


CHECKS = {
    "parity": parity,
    "experts": experts,
    "slots": slots,
    "eplb": eplb,
    "preemption": preemption,
}


def main(argv: list[str]) -> int:
    failed = 0
    for arg in argv:
        kind, _, what = arg.partition(":")
        t0 = time.perf_counter()
        try:
            result = {"ok": True, "detail": CHECKS[kind](what)}
        except Exception as err:  # noqa: BLE001 -- report every check, then fail
            failed += 1
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            traceback.print_exc()
        result |= {"check": arg, "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
