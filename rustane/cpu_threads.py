"""Who gets the CPU cores during a training step whose kernels run on the CPU (the simulator).

On the ANE the kernels run off the CPU, and the CPU's jobs — the classifier, cross-entropy, and
the dW sgemms on the queue's worker thread — overlap them. On the simulator every kernel is
numpy on the main thread, so the CPU is the whole machine and two things compete for it: the
dW queue's worker (one core, all step long) and the BLAS inside numpy's matmuls, which starts
its own threads that spin between calls. On 2 cores that is three busy threads: the
Stories15M fp32 step measured 345 ms with numpy's BLAS free and 316 ms with it held to one
thread (the queue keeps its core, the main thread the other); re-measure with
``python -m rustane.bench train --preset stories15m`` (sim fp32 ms/step).

``StepThreads`` applies that policy for the duration of a step (``with threads.step():``): the
BLAS library numpy links is held to ``cores − 1`` threads (never the queue's own library, which
sets its thread count per job), and restored after. The big pieces that run while the queue is
idle use the other core explicitly: ``matmul_rows`` splits the classifier's ``E·xf`` and
``Eᵀ·dlogits`` (4.7 GFLOP each at V = 32000) over the main thread and one helper, and
``run_halves`` splits the weight re-staging. When disabled (ANE, null backend) all of this is
plain: no limit, no helper.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

__all__ = ["StepThreads", "usable_cpus"]


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _numpy_blas_controllers() -> list:
    """threadpoolctl controllers of the BLAS numpy links, excluding the dW queue's library
    (scipy-openblas32 on Linux): changing that one's thread count while a queue job runs is not
    safe, and the queue pins it per job anyway."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # a declared dependency; without it the policy is simply off
        return []
    queue_dir = None
    try:
        import scipy_openblas32

        queue_dir = os.path.realpath(os.path.dirname(scipy_openblas32.__file__))
    except ImportError:
        pass
    out = []
    for lc in ThreadpoolController().lib_controllers:
        if lc.user_api != "blas":
            continue
        path = os.path.realpath(lc.filepath or "")
        if queue_dir and path.startswith(queue_dir + os.sep):
            continue
        out.append(lc)
    return out


class StepThreads:
    """Thread policy of a model's training step (see the module doc). ``enabled`` for backends
    whose kernels run on the CPU."""

    def __init__(self, enabled: bool, cpus: int | None = None, splitter=None):
        self.enabled = bool(enabled)
        self.cpus = usable_cpus() if cpus is None else int(cpus)
        self.blas_threads = max(1, self.cpus - 1)  # the dW queue's worker owns one core
        self._blas = _numpy_blas_controllers() if self.enabled else []
        # a helper for the split matmul only when the main thread's BLAS has a single thread:
        # with more, BLAS already spreads the classifier over the cores
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="rustane-split")
                      if self.enabled and self.blas_threads == 1 and self.cpus > 1 else None)
        # the simulator's matmul splitter (rustane/mil/split.py) splits only while BLAS is held to
        # one thread here: that is when its halves round like the whole call
        self._splitter = splitter if self._pool is not None and self._blas else None

    @contextlib.contextmanager
    def step(self):
        """Hold numpy's BLAS to ``blas_threads`` for the block (restored after)."""
        saved = []
        try:
            for lc in self._blas:
                n = lc.num_threads
                if n != self.blas_threads:
                    lc.set_num_threads(self.blas_threads)
                    saved.append((lc, n))
            if self._splitter is not None:
                self._splitter.active = True
            yield self
        finally:
            if self._splitter is not None:
                self._splitter.active = False
            for lc, n in saved:
                lc.set_num_threads(n)

    def matmul_rows(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``a @ b`` for 2-D fp32 operands, rows of ``a`` split over the main thread and the
        helper (numpy releases the GIL inside matmul). Deterministic: the same halves every call,
        so runs stay reproducible (exact resume)."""
        if out is None:
            out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
        if self._pool is None or a.shape[0] < 2:
            return np.matmul(a, b, out=out)
        h = a.shape[0] // 2
        self._on_both(partial(np.matmul, a[:h], b, out=out[:h]), partial(np.matmul, a[h:], b, out=out[h:]))
        return out

    def run_halves(self, fn, jobs: list) -> None:
        """``fn(jobs)``, with every other job handed to the helper when there is one (``fn``
        must release the GIL in its heavy parts, as numpy copies and rustane's C calls do)."""
        if self._pool is None or len(jobs) < 2:
            fn(jobs)
            return
        self._on_both(partial(fn, jobs[1::2]), partial(fn, jobs[0::2]))

    def _on_both(self, on_helper, here) -> None:
        """Run ``on_helper()`` on the helper thread while ``here()`` runs on this one; return when
        both are done (an error in either is raised here)."""
        fut = self._pool.submit(on_helper)
        try:
            here()
        finally:
            fut.result()

    def describe(self) -> dict:
        """How steps share the cores, for reports (the bench JSON)."""
        return {"applied": self.enabled, "cpus": self.cpus,
                "numpy_blas_threads": self.blas_threads if self.enabled else "unchanged",
                "numpy_blas_controlled": len(self._blas), "split_helper": self._pool is not None,
                "sim_matmul_split": self._splitter is not None}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
