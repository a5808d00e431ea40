"""qllm-jax: a JAX inference engine for Mixture-of-Experts LLMs with in-pass preemption.

Public API (see README): ``load`` / ``reference_forward`` (models), ``LLM`` (offline generation),
``Engine`` (step-wise serving), ``SamplingParams``, ``RequestOutput``, the error types, the
priority constants and ``builtin_model_dir`` (the generated demo checkpoint).
"""

from qllm_jax.builtin import builtin_model_dir
from qllm_jax.engine import Engine, RequestMetrics, RequestOutput
from qllm_jax.llm import LLM
from qllm_jax.models import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    Model,
    ModelConfig,
    UnsupportedModelError,
    load,
    random_model,
    reference_forward,
)
from qllm_jax.scheduler import SamplingParams

LATENCY_SENSITIVE = 0  # priority: lower is more urgent (vLLM's polarity)
BEST_EFFORT = 1  # any priority > 0 is best-effort

__version__ = "0.1.0"

__all__ = [
    "BEST_EFFORT",
    "LATENCY_SENSITIVE",
    "LLM",
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "Engine",
    "Model",
    "ModelConfig",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "UnsupportedModelError",
    "builtin_model_dir",
    "load",
    "random_model",
    "reference_forward",
]
