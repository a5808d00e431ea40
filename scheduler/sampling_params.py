"""``SamplingParams``: how to sample one request, with vLLM's field names. Plain Python."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

INT32_MAX = 2**31 - 1
MIN_TEMPERATURE = 1e-5  # below this a temperature is greedy (vLLM's _SAMPLING_EPS)
MAX_TEMPERATURE = 1e4  # logits / t stay finite in float32


def is_int(x) -> bool:
    """An int (numpy integers included), and not a bool. (A plain int is tested first: a
    prompt's every token id goes through here, and the ABC check costs ~1 us each.)"""
    return type(x) is int or (isinstance(x, numbers.Integral) and not isinstance(x, bool))


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. ``temperature=0`` (or below 1e-5) is greedy.

    ``top_k`` <= 0 and ``top_p`` = 1 disable those filters. ``seed=None`` draws a seed per
    request. Generation stops at ``max_tokens``, at an EOS token (unless ``ignore_eos``), at any
    of ``stop_token_ids``, at any of the ``stop`` strings, or at the model's maximum length.
    ``stop`` strings are matched on the detokenised text, as OpenAI does: the engine (which has
    the tokenizer; the scheduler has none) ends the request with ``finish_reason="stop"`` and
    cuts the text at the match (the output's ``token_ids`` keep every generated token).
    Every field is checked here against the bounds the device types can hold (int32 counts,
    finite float32 values, 64-bit seeds); token ids are checked against the vocabulary when
    the request is added.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    stop: str | Sequence[str] = ()

    def __post_init__(self) -> None:
        if not is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT32_MAX:
            raise ValueError(f"max_tokens must be an int in [1, 2**31), got {self.max_tokens!r}")
        if not _real(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}], "
                f"got {self.temperature!r}"
            )
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        if not is_int(self.top_k) or not -INT32_MAX <= self.top_k <= INT32_MAX:
            raise ValueError(
                f"top_k must be an int in (-2**31, 2**31) (<= 0 disables it), got {self.top_k!r}"
            )
        if not _real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an int in [0, 2**64) or None, got {self.seed!r}")
        if isinstance(self.stop_token_ids, (str, bytes)):
            raise ValueError(f"stop_token_ids must be ints, got {self.stop_token_ids!r}")
        stops = tuple(self.stop_token_ids or ())
        if not all(is_int(t) and 0 <= t <= INT32_MAX for t in stops):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {stops!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        # plain Python values from here on (numpy scalars are accepted above)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in stops))
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))
