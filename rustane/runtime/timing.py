"""Wall time per phase of a training step (kernel evals, staging, CPU ops, dW wait, optimizer)."""

from __future__ import annotations

import time
from collections import defaultdict


class _Phase:
    """``with timer.phase("cpu"):`` adds the block's wall time to that phase."""

    __slots__ = ("_seconds", "_name", "_t0")

    def __init__(self, seconds, name: str):
        self._seconds, self._name = seconds, name

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._seconds[self._name] += time.perf_counter() - self._t0
        return False


class PhaseTimer:
    """Seconds per phase and the number of kernel evaluations since the last ``reset``."""

    PHASES = ("evals", "staging", "cpu", "dw_wait", "optimizer")

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.evals = 0
        self._phases = {p: _Phase(self.seconds, p) for p in self.PHASES}

    def phase(self, name: str) -> _Phase:
        # one reusable context object per phase: phases never nest within themselves
        return self._phases[name]

    def reset(self) -> None:
        self.seconds.clear()
        self.evals = 0

    def ms(self) -> dict[str, float]:
        return {p: 1e3 * self.seconds.get(p, 0.0) for p in self.PHASES}
