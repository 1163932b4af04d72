"""Optimisation settings, per-step statistics and the backend choice shared by ``rustane.engine``
(pretraining) and ``rustane.finetune_engine`` (fine-tuning); both engines import them from here,
so ``Engine`` can hand a fine-tuning job to the fine-tuning engine without an import cycle.
``rustane.engine`` re-exports them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from rustane.errors import UsageError
from rustane.optim import CosineSchedule

__all__ = ["TrainConfig", "StepStats", "make_backend"]


@dataclass
class TrainConfig:
    """Optimisation settings (the CLI flags of the same names)."""

    lr: float = 1e-3
    min_lr: float | None = None  # None -> lr / 10
    warmup: int = 50
    steps: int = 1000  # the schedule's length in optimizer steps
    accum: int = 1  # sequences per optimizer step
    clip: float | None = 1.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    loss_scale: str | float = "dynamic"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "TrainConfig":
        """Raise ``UsageError`` naming every setting of the wrong type or out of range."""
        errs = []

        def number(name: str, lo: float | None = None, *, above: bool = False, hi: float | None = None,
                   below: bool = False, integer: bool = False, optional: bool = False) -> None:
            v = getattr(self, name)
            flag = "--" + name.replace("_", "-")
            if v is None and optional:
                return
            kind = "an integer" if integer else "a number"
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or (integer and not float(v).is_integer()):
                errs.append(f"{flag} must be {kind}, got {v!r}")
                return
            if not math.isfinite(v):
                errs.append(f"{flag} must be a finite number, got {v}")
                return
            if lo is not None and (v <= lo if above else v < lo):
                errs.append(f"{flag} must be {'>' if above else '>='} {lo:g}, got {v}")
            elif hi is not None and (v >= hi if below else v > hi):
                errs.append(f"{flag} must be {'<' if below else '<='} {hi:g}, got {v}")

        number("lr", 0, above=True)
        number("min_lr", 0, optional=True)
        number("warmup", 0, integer=True)
        number("steps", 1, integer=True)
        number("accum", 1, integer=True)
        number("clip", 0, above=True, optional=True)
        number("weight_decay", 0)
        number("beta1", 0, hi=1, below=True)
        number("beta2", 0, hi=1, below=True)
        number("eps", 0, above=True)
        if not errs and self.min_lr is not None and self.min_lr > self.lr:
            errs.append(f"--min-lr must be in [0, lr={self.lr}], got {self.min_lr}")
        ls = self.loss_scale
        if isinstance(ls, str) and ls != "dynamic":
            try:
                ls = float(ls)
            except ValueError:
                errs.append(f"--loss-scale must be 'dynamic' or a positive number, got {ls!r}")
        if not isinstance(ls, str) and not (isinstance(ls, (int, float, np.integer, np.floating))
                                            and not isinstance(ls, bool) and math.isfinite(ls) and ls > 0):
            errs.append(f"--loss-scale must be 'dynamic' or a positive finite number (e.g. 1024), got {ls!r}")
        if errs:
            raise UsageError("invalid training settings: " + "; ".join(errs))
        return self

    def schedule(self) -> CosineSchedule:
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        return CosineSchedule(self.lr, total=self.steps, warmup=min(self.warmup, self.steps), min_lr=min_lr)


@dataclass
class StepStats:
    step: int  # optimizer steps done after this one
    loss: float  # mean loss over the step's sequences
    lr: float
    grad_norm: float
    loss_scale: float
    skipped: bool  # overflow: update skipped, scale reduced
    tokens: int
    seconds: float
    ms: dict[str, float] = field(default_factory=dict)  # per phase
    evals: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


def make_backend(name: str = "auto", precision: str = "fp16", ane_rules: bool = True):
    """A backend for training. Which backend runs which precision, and which may build models
    that break ANE rules (``ane_rules=False``, docs/ane-rules.md), is the registry's to decide
    (``rustane.backends.get``): "fp32" is exact math on the simulator, the ANE computes in fp16."""
    from rustane import backends

    return backends.get(name, precision=precision, ane_rules=ane_rules)
