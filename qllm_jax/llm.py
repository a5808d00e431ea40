"""Offline, vLLM-shaped API: ``LLM(model_dir).generate(prompts, sampling_params)``."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from tqdm.auto import tqdm

from qllm_jax.engine import Engine, Prompt, RequestOutput
from qllm_jax.models import Model
from qllm_jax.scheduler import SamplingParams


class LLM:
    """Generate for a batch of prompts on one model; all knobs are ``Engine``'s."""

    def __init__(self, model: str | os.PathLike | Model, **engine_kwargs) -> None:
        self.engine = Engine(model, **engine_kwargs)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: int | Sequence[int] = 0,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        A single prompt may be a string or a list of token ids; a batch is a list of those.
        ``sampling_params`` and ``priority`` are one value for all or one per prompt.
        """
        prompts = _as_batch(prompts)
        params = _per_prompt(sampling_params or SamplingParams(), len(prompts), "sampling_params")
        prios = _per_prompt(priority, len(prompts), "priority")
        # validate every request before queuing any: one bad prompt queues nothing
        reqs = [
            self.engine.make_request(p, s, priority=q)
            for p, s, q in zip(prompts, params, prios, strict=True)
        ]
        seen = set()
        for r in reqs:  # make_request checks ids against live requests only, not each other
            if r.request_id in seen:
                raise ValueError(f"request id {r.request_id!r} is used twice")
            seen.add(r.request_id)
        ids = [self.engine.add(r) for r in reqs]
        done: dict[str, RequestOutput] = {}
        show = sys.stderr.isatty() if use_tqdm is None else use_tqdm
        with tqdm(total=len(ids), desc="generate", disable=not show) as bar:
            while len(done) < len(ids) and self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished and out.request_id not in done:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)


def _as_batch(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(
            "prompts must be a string, a list of token ids, or a list of those; got "
            f"{type(prompts).__name__}"
        )
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n
