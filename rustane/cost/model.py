"""The step model: projected ANE ms/step and peak memory of a training step (docs/cost-model.md).

Per sequence (``accum`` sequences per step):

- ANE path: every eval costs ``dispatch + FLOPs / (efficiency · peak) + surface bytes / bandwidth``;
- CPU path: classifier forward + backward (3 matmuls of S·dim·vocab) and the weight gradients (the
  dW queue; FLOPs equal to the forward linears) at the chip's sgemm rate, plus the fp32 <-> fp16
  staging of every surface at bandwidth;
- the two paths overlap (pipelined step): the longer one sets the pace;
- once per step: AdamW over fp32 params/grads/moments and re-staging the fp16 weight surfaces,
  memory-bound.

``ANE_EFFICIENCY`` is the one fitted number: the fraction of the fp16 peak the training kernels
reach, fitted to maderix's Stories110M 91 ms/step on M4. The other anchors are predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rustane.cost.chips import Chip, chip as get_chip
from rustane.cost.kernels import KernelCost, kernel_cost
from rustane.mil import ane_rules

#: fitted: rustane.cost.calibrate.fit() against maderix Stories110M on M4 (91 ms/step);
#: re-fit with ``python -m rustane.plan --calibrate``
ANE_EFFICIENCY = 0.0816

#: bytes moved per parameter by one AdamW step + re-staging: read p, g, m, v (16 B), write p, m, v
#: (12 B), zero g (4 B), write the fp16 staged copy (2 B)
OPTIMIZER_BYTES_PER_PARAM = 34


@dataclass
class StepProjection:
    chip: str
    kernels: dict[str, KernelCost]
    evals_per_layer: dict[str, int]
    n_layers: int
    accum: int
    ms: dict[str, float] = field(default_factory=dict)
    evals_per_step: int = 0
    flops: dict[str, float] = field(default_factory=dict)

    @property
    def ms_per_step(self) -> float:
        """Pipelined: the ANE and CPU paths overlap (the longer sets the pace)."""
        return sum(self.ms.values())

    @property
    def serial_ms_per_step(self) -> float:
        """Upper bound: nothing overlaps (the ANE waits for every CPU part and back)."""
        return sum(self.ane_ms.values()) + sum(self.cpu_ms.values()) + self.ms.get("optimizer", 0.0)


def kernel_costs(cfg, profile: ane_rules.Profile = ane_rules.CONSERVATIVE, elem_bytes: int = 2):
    """``{name: KernelCost}`` of the config's kernel plan (its model family's plan)."""
    from rustane.models import family_for

    fam = family_for(cfg)
    plan = fam.plan_for(fam.kernel_shape(cfg))
    return {n: kernel_cost(sp, profile, elem_bytes) for n, sp in plan.items()}, plan


def project(cfg, chip: str | Chip = "m4", accum: int = 1, efficiency: float | None = None,
            include_optimizer: bool = True, evals_per_layer: int | None = None,
            costs: dict | None = None) -> StepProjection:
    """Projected ms/step of ``cfg`` on ``chip``. ``evals_per_layer`` replaces the plan's eval count
    with another plan's (same FLOPs, more or fewer dispatches: how maderix's plan is compared)."""
    c = get_chip(chip) if isinstance(chip, str) else chip
    eff = ANE_EFFICIENCY if efficiency is None else efficiency
    if costs is None:
        costs, _ = kernel_costs(cfg)
    L, S = cfg.n_layers, cfg.seq_len
    ours = len(costs)
    n_evals = (evals_per_layer or ours) * L
    flops_ane = sum(k.matmul_flops for k in costs.values()) * L
    io = sum(k.io_bytes for k in costs.values()) * L
    # the extra dispatches of a plan with more evals move no extra FLOPs or bytes
    classifier = 3 * 2 * S * cfg.dim * cfg.vocab_size
    linear_params = L * (cfg.dim * cfg.q_dim + 2 * cfg.dim * cfg.kv_dim + cfg.q_dim * cfg.dim
                         + 3 * cfg.dim * cfg.hidden_dim)
    dw = 2 * S * linear_params
    p = StepProjection(c.name, costs, {n: 1 for n in costs}, L, accum)
    ane = {"dispatch": accum * n_evals * c.dispatch_ms,
           "ane_compute": accum * 1e3 * flops_ane / (eff * c.ane_peak_tflops * 1e12),
           "surface_io": accum * 1e3 * io / (c.mem_gbs * 1e9)}
    cpu = {"classifier": accum * 1e3 * classifier / (c.cpu_sgemm_tflops * 1e12),
           "dw": accum * 1e3 * dw / (c.cpu_sgemm_tflops * 1e12),
           # fp32 read + fp16 write (3 bytes per surface fp16 byte... 1.5x the fp16 bytes, twice: in and out)
           "staging": accum * 1e3 * (io * 3) / (c.mem_gbs * 1e9)}
    p.ane_ms, p.cpu_ms = ane, cpu
    # the ANE queue and the CPU work (dW queue, classifier, staging) run concurrently in a pipelined
    # step; the longer of the two sets the pace
    p.ms["ane_path" if sum(ane.values()) >= sum(cpu.values()) else "cpu_path"] = max(sum(ane.values()),
                                                                                   sum(cpu.values()))
    if include_optimizer:
        p.ms["optimizer"] = 1e3 * OPTIMIZER_BYTES_PER_PARAM * cfg.n_params / (c.mem_gbs * 1e9)
    p.evals_per_step = accum * n_evals
    p.flops = {"ane": accum * flops_ane, "classifier_cpu": accum * classifier, "dw_cpu": accum * dw}
    return p
