"""Host-side scheduling: request state, KV page accounting, policies. Never imports jax.

Installed as ``qllm_jax.scheduler``.
"""

from .core import Chunk, Plan, Scheduler, SchedulerConfig
from .pages import PageAllocator
from .request import Request, Status
from .sampling_params import SamplingParams

__all__ = [
    "Chunk",
    "PageAllocator",
    "Plan",
    "Request",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "Status",
]
