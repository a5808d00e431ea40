"""Host-side scheduling: request state, KV page accounting, policies. Never imports jax.

Installed as ``qllm_jax.scheduler``.
"""

from .core import POLICIES, PRESETS, Scheduler, SchedulerConfig
from .ledger import CarryRecord, Ledger
from .pages import PageAllocator
from .plan import Chunk, Plan, PlanError, SampleSpec, Segment, StepResult, Swap, segment_layout
from .request import Request, Status
from .sampling_params import SamplingParams

__all__ = [
    "POLICIES",
    "PRESETS",
    "CarryRecord",
    "Chunk",
    "Ledger",
    "PageAllocator",
    "Plan",
    "PlanError",
    "Request",
    "SampleSpec",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "Segment",
    "Status",
    "StepResult",
    "Swap",
    "segment_layout",
]
