"""Compatibility: the plan vocabulary moved to ``rustane.runtime.plan`` and the Llama kernel plan
to ``rustane.models.llama.plan``."""

from rustane.models.llama.plan import (  # noqa: F401
    FORWARD_KERNELS, MASK_NEG, KernelShape, attention_scale, backward_kernels, causal_mask,
    evals_per_layer, plan_for, rope_tables,
)
from rustane.runtime.plan import (  # noqa: F401
    Block, KernelSpec, Tap, compile_spec, fp16_literal, fp32_literal, pack_input, render, unpack_outputs,
)
