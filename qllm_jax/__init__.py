"""qllm-jax: a JAX inference engine for Mixture-of-Experts LLMs with in-pass preemption.

Public API (see README): ``load``, ``reference_forward``, ``Model``, ``ModelConfig``,
the error types, and the priority constants.
"""

from qllm_jax.models import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    Model,
    ModelConfig,
    UnsupportedModelError,
    load,
    reference_forward,
)

LATENCY_SENSITIVE = 0  # priority: lower is more urgent (vLLM's polarity)
BEST_EFFORT = 1  # any priority > 0 is best-effort

__version__ = "0.1.0"

__all__ = [
    "BEST_EFFORT",
    "LATENCY_SENSITIVE",
    "SUPPORTED_MODEL_TYPES",
    "CheckpointError",
    "Model",
    "ModelConfig",
    "UnsupportedModelError",
    "load",
    "reference_forward",
]
