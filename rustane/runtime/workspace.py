"""The fp32 arrays of training micro-steps, reused across steps, and the dW-queue drain rule.

Fresh multi-megabyte arrays cost a page fault per 4 KB on first touch (glibc returns freed ones
to the OS): copying a [768, 256] tap took 430 us into fresh memory and 34 us into reused memory,
~25 ms of the simulator's Stories15M step (measured at 5418f17; ``python -m rustane.bench train
--preset stories15m --json`` shows the step). The dW queue keeps references to some of these
arrays until it is waited on, so micro-steps alternate between two sets, and the workspace owns
the one rule that makes that safe: a micro-step about to reuse a set the queue may still read
waits for the queue first.

LoRA (docs/finetune.md, "Memory"): the frozen base's dW is never computed, so the queue only
holds the adapters' small jobs, and keeping every layer's backward arrays for the whole step
(what lets full training overlap its big dW sgemms with the layers below) costs memory for
nothing. ``Workspace(ring=K, sets=1)`` lets layers ``l`` and ``l+K`` share their backward arrays
(the queue is drained before a slot is reused) and uses one set for all micro-steps (drained
before each). The operations and their order stay the same; only buffers are reused, so the
numbers are the same bits.
"""

from __future__ import annotations

import numpy as np


class Workspace:
    """Two sets of named fp32 arrays (or one); micro-steps alternate between them.

    Protocol: ``begin_micro_step(queue)`` before each micro-step writes (it waits for ``queue``
    when the set it switches to may still be read by it), ``end_accumulation()`` once the caller
    has waited for the queue itself (before the optimizer), so the count starts over.
    """

    def __init__(self, *, ring: int | None = None, sets: int = 2):
        if ring is not None and ring < 2:
            raise ValueError(f"ring must be >= 2 layers (a layer's dx is the next one's dy), got {ring}")
        if sets not in (1, 2):
            raise ValueError(f"sets must be 1 or 2, got {sets}")
        self.ring = ring
        self._sets: tuple[dict, ...] = tuple({} for _ in range(sets))
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
        n = len(self._sets)
        self._cur = self._sets[self._pending % n]
        self._pending += 1
        if self._pending > n:
            wait_queue()
            self._pending = 1

    def backward_slot(self, layer: int, n_layers: int, wait_queue) -> int:
        """The key under which ``layer``'s backward arrays live: the layer itself, or with a ring
        its slot ``layer % ring``, after ``wait_queue()`` when a later layer of this backward
        (which runs from the last layer down) used that slot and the queue may still read it."""
        if self.ring is None:
            return layer
        if layer + self.ring < n_layers:
            wait_queue()
        return layer % self.ring

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
