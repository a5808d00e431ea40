"""What summing in a fixed pairwise order (``models.model.row_sum``: RMSNorm's mean and the
paged attention's softmax sum) costs, against the XLA reduce it replaced, and what it buys: a
row's result no longer depends on how many rows its pass holds.

Both arms run in one process on the built-in model (float32), each a compiled executable
(``jit(...).lower(...).compile()`` with ``models.model.row_sum`` swapped while tracing, so
nothing compiles inside a measured window), interleaved round by round, for passes of 8, 16
and 32 decode rows: the norm alone, one layer's attention segment, the head's logits and the
fused step. Then, for each arm, how many of 32 rows get other bits from the attention segment
(its new h, MoE input, routing weights and written K/V) and from the head's logits in passes
of 16 or 32 rows than in passes of 8.

    python experiments/row_sum_order.py [--rounds 7] [--reps 20]

Writes ``experiments/results/row-sum-order-<platform>.json`` unless ``--out`` is given. CPU
numbers on a shared machine: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import qllm_jax
from qllm_jax import segments as S
from qllm_jax.carry import Carry
from qllm_jax.models import model as M

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = (8, 16, 32)
PAGE_SIZE, PAGES_PER_ROW = 16, 4


def reduce_sum(x):
    """The sum before ``row_sum``: an XLA reduce (``jnp.mean`` in the norms, ``.sum`` in the
    attention softmax)."""
    return x.sum(-1)


ARMS = {"reduce": reduce_sum, "pairwise": M.row_sum}


def fresh(fn):
    """``fn`` as a new function object: JAX caches traces by function, and each arm must be
    traced anew."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    return call


@contextlib.contextmanager
def row_sum_as(fn):
    """``models.model.row_sum`` is ``fn`` while the caller traces."""
    saved = M.row_sum
    M.row_sum = fn
    try:
        yield
    finally:
        M.row_sum = saved


class Pass:
    """Inputs of a decode pass of ``n`` rows, one sequence each (own pages, random position)."""

    def __init__(self, model, n: int, rng: np.random.Generator):
        cfg = model.config
        slots = (1 + n * PAGES_PER_ROW) * PAGE_SIZE
        shape = (slots, cfg.num_kv_heads, cfg.head_dim)
        self.k = [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(cfg.num_layers)]
        self.v = [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(cfg.num_layers)]
        self.tokens = rng.integers(0, cfg.vocab_size, n).astype(np.int32)
        self.h = model.params.embed[self.tokens]
        self.acc = jnp.asarray(0.1 * rng.normal(size=self.h.shape), jnp.float32)
        pos = rng.integers(0, PAGES_PER_ROW * PAGE_SIZE, n).astype(np.int32)
        pages = (1 + np.arange(n * PAGES_PER_ROW, dtype=np.int32)).reshape(n, -1)
        slot = pages[np.arange(n), pos // PAGE_SIZE] * PAGE_SIZE + pos % PAGE_SIZE
        self.meta = dict(positions=pos, valid=np.ones(n, bool), write_slot=slot, pages=pages)

    @property
    def samples(self) -> S.SampleInputs:
        """Every row samples, greedily."""
        n = len(self.tokens)
        zeros = np.zeros(n, np.int32)
        return S.SampleInputs(
            np.arange(n, dtype=np.int32), zeros.astype(np.float32), zeros,
            np.ones(n, np.float32), np.zeros((n, 2), np.uint32), zeros,
        )  # fmt: skip

    def rows(self, sl: slice) -> Pass:
        """The pass of rows ``sl`` of this one (the same caches)."""
        out = object.__new__(Pass)
        out.k, out.v = self.k, self.v
        out.tokens, out.h, out.acc = self.tokens[sl], self.h[sl], self.acc[sl]
        out.meta = {k: v[sl] for k, v in self.meta.items()}
        return out

    def carry(self, cfg) -> Carry:
        n, k = len(self.tokens), cfg.top_k
        zeros = jnp.zeros_like(self.h)
        return Carry(
            h=self.h, moe_in=zeros, weights=jnp.zeros((n, k)),
            ids=jnp.zeros((n, k), jnp.int32), acc=self.acc, **self.meta,
        )  # fmt: skip


def compiled(model, x: Pass, row_sum) -> dict:
    """Each measured function, compiled for ``x``'s shapes with ``row_sum`` traced in. Nothing is
    donated (the caches are copied inside each call, alike in both arms)."""
    cfg, params = model.config, model.params
    lp, head = params.layers[0], S.head_params(params, transposed=True)
    with row_sum_as(row_sum):
        fn_norm = jax.jit(lambda h: M.norm(h, lp.attn.input_norm, cfg)).lower(x.h).compile()
        attn = (
            jax.jit(fresh(S.attention_fn), static_argnames=("cfg", "window", "page_size"))
            .lower(lp.attn, x.k[0], x.v[0], x.carry(cfg), cfg, None, PAGE_SIZE)
            .compile()
        )
        rows = x.samples.rows
        hl = jax.jit(fresh(S.head_logits_fn), static_argnames=("cfg",))
        hl = hl.lower(head, x.h, x.acc, rows, cfg).compile()
        fused = jax.jit(
            fresh(S.fused_step.__wrapped__),
            static_argnames=("cfg", "page_size", "dtype", "want_logits"),
        )
        counts = jnp.zeros((cfg.num_layers, cfg.num_experts), jnp.int32)  # routed tokens
        fused = fused.lower(
            params, head, tuple(x.k), tuple(x.v), x.tokens, x.meta, x.samples, counts, None,
            cfg=cfg, page_size=PAGE_SIZE, dtype=jnp.float32,
        ).compile()  # fmt: skip

    def attention(p: Pass):
        return attn(lp.attn, p.k[0], p.v[0], p.carry(cfg))

    def attention_rows(p: Pass, out) -> list[np.ndarray]:
        h, moe_in, w, _, k, v = out
        s = p.meta["write_slot"]
        return [np.asarray(a) for a in (h, moe_in, w)] + [np.asarray(k)[s], np.asarray(v)[s]]

    def host(p: Pass, out) -> list[np.ndarray]:
        return [np.asarray(out)]

    return {  # name: (the call, on device; its outputs as host arrays of the pass's rows)
        "norm": (lambda p: fn_norm(p.h), host),
        "attention_segment": (attention, attention_rows),
        "head_logits": (lambda p: hl(head, p.h, p.acc, p.samples.rows), host),
        "fused_step": (
            lambda p: fused(
                params, head, tuple(p.k), tuple(p.v), p.tokens, p.meta, p.samples, counts, None
            ),
            lambda p, out: host(p, out[0]),
        ),
    }


def time_calls(fn, reps: int) -> float:
    """Seconds per call, the outputs read back each time."""
    t0 = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / reps


def stats(xs: list[float]) -> dict:
    return {
        "min_us": min(xs) * 1e6,
        "median_us": statistics.median(xs) * 1e6,
        "max_us": max(xs) * 1e6,
    }


def differing_rows(model, big: Pass, row_sum) -> dict:
    """Rows of ``big`` whose attention-segment outputs or logits differ, bit for bit, between
    passes of 8 rows and passes of 16 or 32."""
    outs = {}
    for n in ROWS:
        fns = compiled(model, big.rows(slice(0, n)), row_sum)
        got = {name: [] for name in ("attention_segment", "head_logits")}
        for r in range(0, len(big.tokens), n):
            p = big.rows(slice(r, r + n))
            for name in got:
                call, rows = fns[name]
                got[name].append(rows(p, call(p)))
        outs[n] = {k: [np.concatenate(o) for o in zip(*v, strict=True)] for k, v in got.items()}
    res = {}
    for n in ROWS[1:]:
        for name in outs[n]:
            diff = np.zeros(len(big.tokens), bool)
            for a, b in zip(outs[n][name], outs[ROWS[0]][name], strict=True):
                diff |= np.any((a != b).reshape(len(diff), -1), axis=1)
            res[f"{name}_8_vs_{n}"] = int(diff.sum())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    model = qllm_jax.load(qllm_jax.builtin_model_dir(), dtype="float32")
    rng = np.random.default_rng(0)
    big = Pass(model, max(ROWS), rng)
    invariance = {arm: differing_rows(model, big, fn) for arm, fn in ARMS.items()}
    timings: dict = {}
    load_before = os.getloadavg()
    for n in ROWS:
        x = big.rows(slice(0, n))
        fns = {arm: compiled(model, x, fn) for arm, fn in ARMS.items()}
        samples = {arm: {name: [] for name in fns[arm]} for arm in ARMS}
        for arm in ARMS:  # a first call of each executable, outside the measurement
            for call, _ in fns[arm].values():
                jax.block_until_ready(call(x))
        for _ in range(args.rounds):
            for name in fns["reduce"]:
                for arm in ARMS:  # interleaved: both arms see the same load
                    f = fns[arm][name][0]
                    samples[arm][name].append(time_calls(lambda f=f, x=x: f(x), args.reps))
        timings[n] = {
            name: {arm: stats(samples[arm][name]) for arm in ARMS}
            | {
                "ratio_pairwise_over_reduce_median": statistics.median(samples["pairwise"][name])
                / statistics.median(samples["reduce"][name])
            }
            for name in fns["reduce"]
        }
        for name, t in timings[n].items():
            print(
                f"rows {n:2d} {name:18s} reduce {t['reduce']['median_us']:8.1f} us  pairwise "
                f"{t['pairwise']['median_us']:8.1f} us  ratio "
                f"{t['ratio_pairwise_over_reduce_median']:.3f}",
                flush=True,
            )
    print("rows of 32 with other bits than in passes of 8:", json.dumps(invariance))
    out = {
        "benchmark": "row-sum-order",
        "device": jax.devices()[0].device_kind,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "config": {"rounds": args.rounds, "reps": args.reps, "rows": ROWS},
        "timings_by_rows": timings,
        "rows_differing_from_passes_of_8": invariance,
    }
    path = args.out or RESULTS / f"row-sum-order-{jax.devices()[0].platform}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
