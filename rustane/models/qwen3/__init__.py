"""The Qwen3 family: Llama with a per-head RMSNorm of q and k before RoPE.

It reuses the Llama family (``rustane.models.llama``) and changes only what Qwen3 changes:
``config`` (model_type, HF config.json), ``params`` (the two norm weights per layer and their
place in the RoPE permutation), ``plan`` (the forward attention kernel), ``step`` (the norm's
backward) and ``templates/sdpaFwdQkNorm.mil``.
"""

from __future__ import annotations

from rustane.models.qwen3.config import PRESETS, ModelConfig, preset
from rustane.models.qwen3.params import from_hf_params, init_params, param_shapes, to_hf_params
from rustane.models.qwen3.plan import KernelShape, evals_per_layer, flops_per_sequence, plan_for

HF_MODEL_TYPES = ("qwen3",)

__all__ = ["ModelConfig", "PRESETS", "preset", "param_shapes", "init_params", "to_hf_params", "from_hf_params",
           "KernelShape", "plan_for", "evals_per_layer", "flops_per_sequence", "Step", "HF_MODEL_TYPES",
           "kernel_shape"]


def kernel_shape(cfg: ModelConfig, dtype: str = "fp16") -> KernelShape:
    return KernelShape.of(cfg, dtype)


def __getattr__(name: str):
    # the step pulls in the native CPU ops; a config or plan import should not
    if name == "Step":
        from rustane.models.qwen3.step import Qwen3Step

        return Qwen3Step
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
