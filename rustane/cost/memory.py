"""Projected peak memory of training (docs/cost-model.md, "Memory").

Parts, from the config and its kernel plan:

- parameters, gradients and the two AdamW moments, fp32: 16 bytes per parameter;
- surfaces: one input per layer for weight-bearing kernels, one output per layer for kernels whose
  taps the backward reads, one shared buffer otherwise (``rustane.runtime.kernel_set``); fp16
  bytes on the ANE and the fp16 simulator, fp32 on the exact simulator;
- CPU activations: the workspace's fp32 arrays, two sets (``rustane.runtime.workspace``): the
  logits and their gradient (seq_len x vocab) and one layer's taps;
- simulator only: the interpreter's intermediates of the largest kernel (fp32, one eval at a time);
- the process itself (Python, numpy, rustane imported): measured by the caller, or 0.
"""

from __future__ import annotations

from rustane.cost.model import kernel_costs

MB = 1e6


def project_memory(cfg, backend: str = "ane", precision: str = "fp16", base_bytes: int = 0) -> dict[str, float]:
    """``{part: bytes}`` plus ``total``."""
    elem = 4 if (backend == "sim" and precision == "fp32") else 2
    costs, plan = kernel_costs(cfg, elem_bytes=elem)
    L, S = cfg.n_layers, cfg.seq_len
    surfaces = 0
    for name, spec in plan.items():
        c = costs[name]
        surfaces += c.in_bytes * (L if spec.weight_bearing else 1)
        surfaces += c.out_bytes * (L if spec.per_layer_output else 1)
    taps_one_layer = sum(spec.out_shape[1] for spec in plan.values()) * S * 4
    parts = {
        "parameters_fp32": 4 * cfg.n_params,
        "gradients_fp32": 4 * cfg.n_params,
        "optimizer_moments_fp32": 8 * cfg.n_params,
        "surfaces": surfaces,
        "activations_and_taps": 2 * (S * cfg.vocab_size * 4 + taps_one_layer),
    }
    if backend == "sim":
        # every op's result of one kernel held in fp32 during its eval (the interpreter's plan)
        parts["interpreter_intermediates"] = max(4 * (c.vector_elems + c.layout_elems) + 4 * sum(
            _prod(s) for s, _ in c.matmuls) for c in costs.values())
    if base_bytes:
        parts["process_base"] = base_bytes
    parts["total"] = sum(parts.values())
    return parts


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def process_base_bytes() -> int:
    """This process's resident size now (Linux /proc; macOS/others: peak RSS from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        import sys

        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024
