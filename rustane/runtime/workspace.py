"""The fp32 arrays of training micro-steps, reused across steps, and the dW-queue drain rule.

Fresh multi-megabyte arrays cost a page fault per 4 KB on first touch (glibc returns freed ones
to the OS): copying a [768, 256] tap took 430 us into fresh memory and 34 us into reused memory,
~25 ms of the simulator's Stories15M step (measured at 5418f17; ``python -m rustane.bench train
--preset stories15m --json`` shows the step). The dW queue keeps references to some of these
arrays until it is waited on, so micro-steps alternate between two sets, and the workspace owns
the one rule that makes that safe: a micro-step about to reuse a set the queue may still read
waits for the queue first.
"""

from __future__ import annotations

import numpy as np


class Workspace:
    """Two sets of named fp32 arrays; micro-steps alternate between them.

    Protocol: ``begin_micro_step(queue)`` before each micro-step writes (it waits for ``queue``
    when the set it switches to may still be read by it), ``end_accumulation()`` once the caller
    has waited for the queue itself (before the optimizer), so the count starts over.
    """

    def __init__(self):
        self._sets: tuple[dict, dict] = ({}, {})
        self._cur = self._sets[0]
        self._pending = 0  # micro-steps whose arrays the queue may still hold
        #: a micro-step is running: arrays come from the current set. Outside one (forward-only
        #: calls between micro-steps, whose arrays the queue may still read) they are fresh.
        self.active = False

    def begin_micro_step(self, wait_queue) -> None:
        """Switch sets, calling ``wait_queue()`` first when the set was written two micro-steps
        ago without a drain since. After that drain only this micro-step's arrays are in the
        queue's hands, so the next micro-step (the other set) need not wait: with long
        accumulation every second micro-step drains, not every one."""
        self._cur = self._sets[self._pending % 2]
        self._pending += 1
        if self._pending > 2:
            wait_queue()
            self._pending = 1

    def end_accumulation(self) -> None:
        """The queue was drained: no set is in its hands any more."""
        self._pending = 0

    def get(self, key, shape: tuple[int, ...]) -> np.ndarray:
        if not self.active:
            return np.empty(shape, dtype=np.float32)
        a = self._cur.get(key)
        if a is None or a.shape != shape:
            a = self._cur[key] = np.empty(shape, dtype=np.float32)
        return a

    def arrays(self, key, shapes: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
        """Several arrays under one key (one tap read): one lookup on the hot path; ``None`` each
        outside a micro-step (the reader allocates)."""
        if not self.active:
            return (None,) * len(shapes)
        a = self._cur.get(key)
        if a is None:
            a = self._cur[key] = [np.empty(sh, dtype=np.float32) for sh in shapes]
        return a
