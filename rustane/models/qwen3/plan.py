"""Qwen3's kernel plan: Llama's, with ``sdpaFwd`` rendered from ``templates/sdpaFwdQkNorm.mil``.

The forward kernel normalises q and k per head inside the kernel (weights ``wqn``/``wkn`` staged
as one-row blocks) and adds the taps ``q_pre``/``k_pre`` (the projections before the norm) that
the CPU norm backward needs; every backward kernel is Llama's. The norm's FLOPs (≈ 4·S·(QD+KVD)
per layer) are below 0.1% of the kernels' and left out of ``flops_per_sequence``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from rustane.models.llama import plan as llama
from rustane.models.llama.plan import evals_per_layer, flops_per_sequence  # noqa: F401  (the same kernels)
from rustane.models.qwen3.params import K_NORM, Q_NORM
from rustane.runtime.plan import Block, fp16_literal, fp32_literal, taps

TEMPLATES = Path(__file__).resolve().parent / "templates"


@dataclass(frozen=True)
class KernelShape(llama.KernelShape):
    """Llama's kernel shape plus the norm epsilon the q/k norm const needs."""

    norm_eps: float = 1e-6

    @classmethod
    def of(cls, cfg, dtype: str = "fp16") -> "KernelShape":
        base = llama.KernelShape.of(cfg, dtype)
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, norm_eps=float(cfg.norm_eps))


def plan_for(shape: KernelShape):
    if not isinstance(shape, KernelShape):
        raise TypeError(f"plan_for needs a qwen3 KernelShape (KernelShape.of(config)), got {type(shape).__name__}")
    plan = llama.plan_for(shape)
    plan["sdpaFwd"] = _sdpa_fwd(plan["sdpaFwd"], shape)
    return plan


def _sdpa_fwd(base, shape: KernelShape):
    HD, S, QD, KVD = shape.head_dim, shape.seq_len, shape.q_dim, shape.kv_dim
    col = base.in_shape[3]
    blocks = base.blocks + (Block("wqn", "weight", 0, 1, col, col + HD, False, Q_NORM),
                            Block("wkn", "weight", 0, 1, col + HD, col + 2 * HD, False, K_NORM))
    tap_list = taps([(t.name, t.c1 - t.c0) for t in base.taps] + [("q_pre", QD), ("k_pre", KVD)])
    literal = fp16_literal if shape.dtype == "fp16" else fp32_literal
    params = {**base.params, "IN_W": col + 2 * HD, "OUT_C": tap_list[-1].c1, "COL_WQN": col, "COL_WKN": col + HD,
              "EPS": literal(shape.norm_eps), "INV_SQRT_HD": literal(1.0 / math.sqrt(HD))}
    return dataclasses.replace(base, template="sdpaFwdQkNorm", template_dir=TEMPLATES, blocks=blocks, taps=tap_list,
                               params=MappingProxyType({k: str(v) for k, v in params.items()}),
                               in_shape=(1, base.in_shape[1], 1, col + 2 * HD), out_shape=(1, tap_list[-1].c1, 1, S))
