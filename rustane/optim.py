"""Optimizer pieces: learning-rate schedule, AdamW over a parameter dict, global-norm clipping,
and loss scaling (dynamic and static).

The engine's optimizer step, in order (``apply_update`` does exactly this)::

    sq    = Σ over grads of Σ g²           (C, double; inf/NaN iff some gradient is)
    if not finite(sq): scaler.update(overflow=True) -> skip the update, halve the scale
    norm  = sqrt(sq) / (loss_scale · accum)       the true gradient norm
    clip  = min(1, max_norm / (norm + 1e-6))
    AdamW with grad_scale = clip / (loss_scale · accum)   (unscale + clip fused into the step)
    scaler.update(overflow=False)

Gradients are therefore never rewritten in place for unscaling or clipping. All state is
JSON-safe (``state_dict``) or a dict of fp32 arrays (Adam moments) for the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

__all__ = [
    "CosineSchedule", "AdamW", "DynamicLossScaler", "StaticLossScaler", "make_loss_scaler",
    "is_no_decay", "clip_coefficient", "apply_update", "UpdateInfo",
]


# ---- schedule -------------------------------------------------------------------------------

@dataclass(frozen=True)
class CosineSchedule:
    """Linear warmup then cosine decay, indexed by optimizer step ``k = 0, 1, 2, ...``.

    - ``k < warmup``: ``lr · (k + 1) / warmup`` (the first update already uses a non-zero lr,
      the last warmup step uses exactly ``lr``);
    - ``warmup <= k < total``: ``min_lr + (lr − min_lr) · ½(1 + cos(π · (k − warmup)/(total − warmup)))``;
    - ``k >= total``: ``min_lr``.
    """

    lr: float
    total: int
    warmup: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"schedule: need 0 <= min_lr <= lr, got lr={self.lr} min_lr={self.min_lr}")
        if self.warmup < 0 or self.total < 1 or self.warmup > self.total:
            raise ValueError(f"schedule: need 0 <= warmup <= total and total >= 1, "
                             f"got warmup={self.warmup} total={self.total} (--warmup / --steps)")

    def __call__(self, k: int) -> float:
        if k < self.warmup:
            return self.lr * (k + 1) / self.warmup
        if k >= self.total:
            return self.min_lr
        span = self.total - self.warmup
        frac = (k - self.warmup) / span
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))


# ---- AdamW ----------------------------------------------------------------------------------

def is_no_decay(name: str) -> bool:
    """Norm weights get no weight decay (``*norm.weight``: input/post_attention layernorm, model.norm)."""
    return name.endswith("norm.weight")


class AdamW:
    """AdamW on a dict of fp32 master weights (updated in place), PyTorch semantics.

    ``w ← w·(1 − lr·wd)`` then ``w ← w − lr·m̂/(√v̂ + eps)`` with bias correction by the
    1-based step count. Weight decay is 0 for names matched by ``is_no_decay``.
    """

    def __init__(self, params: Mapping[str, np.ndarray], *, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1):
        for k, v in params.items():
            if not (isinstance(v, np.ndarray) and v.dtype == np.float32 and v.flags.c_contiguous):
                raise TypeError(f"AdamW: parameter {k} must be a C-contiguous float32 array")
        self.params = params
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.t = 0  # optimizer steps taken

    def step(self, grads: Mapping[str, np.ndarray], lr: float, grad_scale: float = 1.0, *,
             zero_grads: bool = False) -> None:
        """One update of every parameter; ``grads`` holds (possibly scaled) gradients, zeroed
        as they are read with ``zero_grads`` (saves the next accumulation a pass over them)."""
        from rustane import cpu_ops
        missing = [k for k in self.params if k not in grads]
        if missing:
            raise KeyError(f"AdamW.step: no gradient for {missing[:5]}")
        self.t += 1
        names = list(self.params)
        cpu_ops.adamw_tensors([self.params[k] for k in names], [grads[k] for k in names],
                              [self.m[k] for k in names], [self.v[k] for k in names],
                              [0.0 if is_no_decay(k) else self.weight_decay for k in names],
                              lr=lr, step=self.t, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                              grad_scale=grad_scale, zero_grad=zero_grads)

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Moments for optimizer.safetensors: ``m.<name>`` and ``v.<name>``."""
        out = {f"m.{k}": a for k, a in self.m.items()}
        out.update({f"v.{k}": a for k, a in self.v.items()})
        return out

    def state_meta(self) -> dict[str, Any]:
        return {"type": "adamw", "step": self.t, "beta1": self.beta1, "beta2": self.beta2,
                "eps": self.eps, "weight_decay": self.weight_decay}

    def load_state(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore from ``state_tensors()``/``state_meta()`` (checks names and shapes)."""
        if meta.get("type") != "adamw":
            raise ValueError(f"optimizer state is {meta.get('type')!r}, expected 'adamw'")
        for k, w in self.params.items():
            for pre, dst in (("m.", self.m), ("v.", self.v)):
                key = pre + k
                if key not in tensors:
                    raise ValueError(f"optimizer state has no {key}")
                a = tensors[key]
                if a.shape != w.shape:
                    raise ValueError(f"optimizer state {key}: shape {a.shape}, parameter is {w.shape}")
                dst[k][...] = a
        self.t = int(meta["step"])


def clip_coefficient(grad_norm: float, max_norm: float | None) -> float:
    """Factor that brings the global gradient norm down to ``max_norm`` (1 if under, or off)."""
    if max_norm is None or max_norm <= 0 or not math.isfinite(grad_norm):
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))


# ---- loss scaling ---------------------------------------------------------------------------

class DynamicLossScaler:
    """Loss scale for fp16 backward passes that adapts to overflow.

    Starts at ``init_scale`` (2^16, as PyTorch's GradScaler: high enough that tiny fp16
    gradients survive, and overflow walks it down in a few skipped steps). On an overflow
    (inf/NaN in any gradient) the step is skipped and the scale multiplied by ``backoff``
    (½); after ``growth_interval`` consecutive clean steps it grows by ``growth`` (×2).
    It stays within ``[min_scale, max_scale]``.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, *, growth: float = 2.0, backoff: float = 0.5,
                 growth_interval: int = 1000, min_scale: float = 1.0, max_scale: float = 2.0 ** 24):
        if not (0 < min_scale <= init_scale <= max_scale):
            raise ValueError(f"loss scale: need 0 < min_scale <= init_scale <= max_scale, got "
                             f"{min_scale}, {init_scale}, {max_scale}")
        if growth <= 1 or not 0 < backoff < 1 or growth_interval < 1:
            raise ValueError("loss scale: need growth > 1, 0 < backoff < 1, growth_interval >= 1")
        self.scale = float(init_scale)
        self.growth, self.backoff = float(growth), float(backoff)
        self.growth_interval = int(growth_interval)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.good_steps = 0
        self.overflows = 0

    def update(self, overflow: bool) -> bool:
        """Record one step's outcome; returns True when the update should be applied."""
        if overflow:
            self.scale = max(self.min_scale, self.scale * self.backoff)
            self.good_steps = 0
            self.overflows += 1
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale = min(self.max_scale, self.scale * self.growth)
            self.good_steps = 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"type": "dynamic", "scale": self.scale, "good_steps": self.good_steps,
                "overflows": self.overflows, "growth": self.growth, "backoff": self.backoff,
                "growth_interval": self.growth_interval, "min_scale": self.min_scale,
                "max_scale": self.max_scale}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        if d.get("type") != "dynamic":
            raise ValueError(f"loss scaler state is {d.get('type')!r}, expected 'dynamic'")
        self.scale = float(d["scale"])
        self.good_steps = int(d["good_steps"])
        self.overflows = int(d.get("overflows", 0))
        for k in ("growth", "backoff", "min_scale", "max_scale"):
            setattr(self, k, float(d[k]))
        self.growth_interval = int(d["growth_interval"])


class StaticLossScaler:
    """A fixed loss scale (``--loss-scale 256``). An overflow still skips the step."""

    def __init__(self, scale: float = 256.0):
        if not scale > 0:
            raise ValueError(f"--loss-scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.overflows = 0

    def update(self, overflow: bool) -> bool:
        if overflow:
            self.overflows += 1
        return not overflow

    def state_dict(self) -> dict[str, Any]:
        return {"type": "static", "scale": self.scale, "overflows": self.overflows}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        if d.get("type") != "static":
            raise ValueError(f"loss scaler state is {d.get('type')!r}, expected 'static'")
        self.scale = float(d["scale"])
        self.overflows = int(d.get("overflows", 0))


def make_loss_scaler(spec: str | float | None) -> DynamicLossScaler | StaticLossScaler:
    """``None``/``"dynamic"`` -> dynamic; a number (or numeric string) -> static at that value."""
    if spec is None or spec == "dynamic":
        return DynamicLossScaler()
    try:
        return StaticLossScaler(float(spec))
    except ValueError:
        raise ValueError(f"--loss-scale: expected 'dynamic' or a number, got {spec!r}") from None


# ---- one optimizer update -------------------------------------------------------------------

@dataclass
class UpdateInfo:
    applied: bool       # False when skipped for overflow
    grad_norm: float    # true (unscaled, pre-clip) global norm; inf/nan on overflow
    clip: float         # clip coefficient used
    lr: float
    loss_scale: float   # scale in effect for this step's gradients


def apply_update(opt: AdamW, grads: Mapping[str, np.ndarray], scaler, lr: float, *,
                 max_norm: float | None = 1.0, accum: int = 1, zero_grads: bool = False) -> UpdateInfo:
    """Overflow check, unscale, clip and AdamW in one pass over the gradients (see module doc).

    ``grads`` hold the sum over ``accum`` micro-batches of gradients of ``loss·scale``. With
    ``zero_grads`` an applied update leaves them zero; a skipped one leaves them untouched.
    """
    from rustane import cpu_ops
    scale = scaler.scale
    sq = cpu_ops.sumsq_tensors(grads.values())
    overflow = not math.isfinite(sq)
    denom = scale * accum
    norm = math.sqrt(sq) / denom if not overflow else sq
    if not scaler.update(overflow):
        return UpdateInfo(False, norm, 1.0, lr, scale)
    clip = clip_coefficient(norm, max_norm)
    opt.step(grads, lr, grad_scale=clip / denom, zero_grads=zero_grads)
    return UpdateInfo(True, norm, clip, lr, scale)
