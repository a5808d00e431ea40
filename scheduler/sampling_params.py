"""``SamplingParams``: how to sample one request, with vLLM's field names. Plain Python."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. ``temperature=0`` is greedy.

    ``top_k`` <= 0 and ``top_p`` = 1 disable those filters. ``seed=None`` draws a seed per
    request. Generation stops at ``max_tokens``, at an EOS token (unless ``ignore_eos``), at any
    of ``stop_token_ids``, or at the model's maximum length.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int):
            raise ValueError(f"top_k must be an int (<= 0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {self.seed!r}")
        stops = tuple(self.stop_token_ids or ())
        if not all(isinstance(t, int) and t >= 0 for t in stops):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {stops!r}")
        object.__setattr__(self, "stop_token_ids", stops)
