"""Host-side scheduling: request state, KV page accounting, policies. Never imports jax.

Installed as ``qllm_jax.scheduler``.
"""

from .core import POLICIES, PRESETS, Scheduler, SchedulerConfig
from .pages import PageAllocator
from .plan import Chunk, Plan, Segment, segment_schedule
from .request import Request, Status
from .sampling_params import SamplingParams

__all__ = [
    "POLICIES",
    "PRESETS",
    "Chunk",
    "PageAllocator",
    "Plan",
    "Request",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "Segment",
    "Status",
    "segment_schedule",
]
