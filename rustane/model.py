"""Compatibility: ``Model`` moved to ``rustane.runtime.model`` (model-agnostic) and the Llama step
math, parameters and plan to ``rustane.models.llama``."""

from rustane.models.llama.params import init_params  # noqa: F401
from rustane.models.llama.plan import KernelShape
from rustane.runtime.model import Model, program_dtype  # noqa: F401
from rustane.runtime.timing import PhaseTimer  # noqa: F401


def kernel_shape(cfg, dtype: str = "fp16") -> KernelShape:
    return KernelShape.of(cfg, dtype)
