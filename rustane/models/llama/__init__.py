"""The Llama family: everything rustane knows about what a Llama computes, in one package.

- ``config``: ``ModelConfig`` (the one vocabulary of model dimensions), presets, HF config.json;
- ``params``: parameter names and shapes, initialisation, the q/k row permutation at the HF boundary;
- ``plan``: ``KernelShape`` (derived from a config), the fused kernels with the parameter each
  weight block carries, their taps, evals per layer and FLOPs;
- ``step``: the CPU math of a training step (forward/backward sequence) against the runtime;
- ``templates/``: the kernels as MIL text.

The runtime (``rustane.runtime``) finds this package through ``rustane.models.family_for(config)``
and uses only the names below.
"""

from __future__ import annotations

from rustane.models.llama.config import PRESETS, ConfigError, ModelConfig, preset, preset_names
from rustane.models.llama.params import from_hf_params, init_params, param_shapes, to_hf_params
from rustane.models.llama.plan import KernelShape, evals_per_layer, flops_per_sequence, plan_for

#: Hugging Face ``model_type`` values this family reads (same math, same parameter names)
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "smollm")

__all__ = ["ModelConfig", "ConfigError", "PRESETS", "preset", "preset_names", "param_shapes", "init_params",
           "to_hf_params", "from_hf_params", "KernelShape", "plan_for", "evals_per_layer",
           "flops_per_sequence", "Step", "HF_MODEL_TYPES", "kernel_shape"]


def kernel_shape(cfg: ModelConfig, dtype: str = "fp16") -> KernelShape:
    return KernelShape.of(cfg, dtype)


def __getattr__(name: str):
    # the step pulls in the native CPU ops; a config or plan import should not
    if name == "Step":
        from rustane.models.llama.step import LlamaStep

        return LlamaStep
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
