"""When a non-finite loss stops training.

In fp16 a non-finite loss or gradient is expected now and then: the loss scale was too high, the
step is skipped and the dynamic scaler halves the scale (``rustane.optim``). What the scaler
cannot explain is a run of them: ``max_nonfinite`` consecutive steps with a non-finite loss mean
the weights or the data are broken, and every further step only burns time. In fp32 (exact
math, nothing to overflow at these magnitudes) the first non-finite loss or gradient norm
already means that.

``DivergenceGuard.observe`` is called after every step and returns the reason to stop, naming the
likely cause; ``Engine.fit`` then saves the last state whose weights are all finite and raises
``rustane.errors.Diverged``.
"""

from __future__ import annotations

import math

__all__ = ["DivergenceGuard", "DEFAULT_MAX_NONFINITE"]

DEFAULT_MAX_NONFINITE = 5


class DivergenceGuard:
    def __init__(self, max_nonfinite: int = DEFAULT_MAX_NONFINITE, precision: str = "fp16", lr: float = 1e-3):
        if isinstance(max_nonfinite, bool) or not isinstance(max_nonfinite, int) or max_nonfinite < 0:
            from rustane.errors import UsageError
            raise UsageError(f"--max-nonfinite must be an integer >= 0 (0: never stop), got {max_nonfinite!r}")
        self.max_nonfinite = max_nonfinite
        self.precision = precision
        self.lr = lr
        self.streak = 0
        self.first_bad: int | None = None
        self.finite_steps = 0

    def observe(self, step: int, loss: float, grad_norm: float = 0.0) -> str | None:
        """Record step ``step``'s loss (and gradient norm); return why training must stop, or None.

        In fp32 a non-finite gradient norm counts too: nothing overflows there, so a skipped
        update means the weights are already broken (the loss itself may still look finite)."""
        bad_grad = self.precision == "fp32" and not math.isfinite(grad_norm)
        if math.isfinite(loss) and not bad_grad:
            self.streak, self.first_bad = 0, None
            self.finite_steps += 1
            return None
        self.streak += 1
        if self.first_bad is None:
            self.first_bad = step
        if self.max_nonfinite == 0:
            return None
        limit = 1 if self.precision == "fp32" else self.max_nonfinite
        if self.streak < limit:
            return None
        steps = f"step {step}" if self.streak == 1 else f"steps {self.first_bad}-{step}"
        what = (f"{'gradient norm' if math.isfinite(loss) else 'loss'} "
                f"{grad_norm if math.isfinite(loss) else loss} at {steps} in fp32, where nothing overflows"
                if self.precision == "fp32" else
                f"loss non-finite for {self.streak} consecutive steps ({steps}), more than loss scaling explains")
        return f"training diverged: {what}; likely cause: {self.likely_cause()}"

    def likely_cause(self) -> str:
        if self.finite_steps == 0 and self.first_bad == 1:
            # never a finite loss: the very first forward pass failed, before the optimizer moved
            # anything much
            return ("the data or the initial weights (check --data: token ids within the vocabulary; "
                    f"or a learning rate of {self.lr:g} blowing up the first update: try --lr {self.lr / 10:g})")
        return f"the learning rate {self.lr:g} is too high (try --lr {self.lr / 10:g}, or a longer --warmup)"
