"""Two-way splitting of the interpreter's big matmuls over the calling thread and one helper.

The simulator runs every kernel on the main thread with numpy's BLAS held to one thread (the dW
queue's worker owns the other core; ``rustane/cpu_threads.py``). Letting BLAS itself use both
cores made the Stories110M step slower, not faster (its spinning worker threads fight the queue
and the optimizer: the performance review, section 4d). Splitting a matmul explicitly — half the
output on this thread, half on a helper that sleeps between jobs — uses the second core whenever
it is idle, and costs nothing when it is not beyond the hand-off (~45 µs).

Numerics: a split never cuts the reduction. Each half is the same sgemm over the full inner
dimension for a subset of output rows, columns or batch entries; OpenBLAS computes every output
element as the same K-ordered dot product whatever the M/N extent of the call (its blocking of K
depends on K only), so the halves hold the bits the whole call would. ``tests/test_sim_split.py``
checks that bit for bit against unsplit numpy at the shapes the presets run, in fp32 and through
the fp16 kernels.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable

import numpy as np

__all__ = ["Splitter", "MIN_SPLIT_FLOPS", "split_matmul"]

#: Below this many FLOPs (2·M·N·K over all batch entries) a matmul runs whole: at one core's
#: ~140 GFLOP/s 16 MFLOP is ~115 µs, so the ~45 µs hand-off would eat the gain.
MIN_SPLIT_FLOPS = 16e6

#: OpenBLAS (0.3.x, SkylakeX) sends plain row-major sgemms with M·N·K below 28·512² to its
#: "direct" kernel and larger ones to the blocked one; a split keeps each half at or above this.
DIRECT_MNK = 28 * 512 * 512


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class Splitter:
    """One helper thread for split kernel work (created on first use). ``run(a, b)`` runs ``a()`` on
    the helper and ``b()`` here and returns when both are done; an error in either is raised.

    Split steps split only while ``active`` is set; otherwise they run whole. The owner sets it
    only while numpy's BLAS is held to one thread (``rustane.cpu_threads.StepThreads.step``): with more, OpenBLAS divides each call among its own
    threads by the call's size, and the halves no longer round like the whole."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.active = False
        self.splits = 0  # split calls run so far (reports and tests read it)

    def run(self, on_helper: Callable[[], object], here: Callable[[], object]) -> None:
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="rustane-sim-split")
                pool = self._pool
        self.splits += 1
        fut = pool.submit(on_helper)
        try:
            here()
        finally:
            fut.result()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _step(splitter: Splitter, whole, on_helper, here) -> None:
    if splitter.active:
        splitter.run(on_helper, here)
    else:
        whole()


def default_splitter() -> Splitter | None:
    """A splitter when there is a second CPU to use, else None."""
    return Splitter() if _cpus() > 1 else None


#: Row split points are multiples of this. OpenBLAS's kernels work on blocks of rows of the
#: result (12 in the Haswell sgemm, 4 in SkylakeX's, 8/16/24 elsewhere) and a last, partial
#: block takes a different code path that rounds differently: a split inside a block changed the
#: last bit of the rows around it. 48 is a multiple of every such block height.
ROW_GRAIN = 48


def _split_row(m: int) -> int | None:
    h = int(round(m / 2 / ROW_GRAIN)) * ROW_GRAIN
    return h if 0 < h < m else None


def split_matmul(splitter: Splitter | None, xa: np.ndarray, ya: np.ndarray, out: np.ndarray) -> Callable:
    """A step computing ``np.matmul(xa, ya, out=out)``, split in two when it is worth it (see the
    module doc: the same bits either way). ``xa``/``ya`` are at least 2-D."""
    whole = partial(np.matmul, xa, ya, out=out)
    if splitter is None or min(xa.ndim, ya.ndim, out.ndim) < 2:
        return whole
    m, n, k = out.shape[-2], out.shape[-1], xa.shape[-1]
    batch = out.shape[:-2]
    entries = int(np.prod(batch, dtype=np.int64))
    if 2.0 * entries * m * n * k < MIN_SPLIT_FLOPS:
        return whole
    if xa.shape[:-2] == batch and ya.shape[:-2] == batch:
        # a batch axis: every entry is the same sgemm call as before, half of them over there
        for ax, nb in enumerate(batch):
            if nb >= 2:
                pre = (slice(None),) * ax
                lo, hi = pre + (slice(0, nb // 2),), pre + (slice(nb // 2, nb),)
                return partial(_step, splitter, whole, partial(np.matmul, xa[hi], ya[hi], out=out[hi]),
                               partial(np.matmul, xa[lo], ya[lo], out=out[lo]))
    if batch and entries > 1:
        return whole  # broadcast batches: not worth a special case
    # rows of the result only: OpenBLAS (row-major C = the column-major Cᵀ = Bᵀ·Aᵀ) then sees
    # the same m and k and a smaller n cut at a block boundary, and rounds every element alike
    h = _split_row(m)
    if h is None or min(h, m - h) * n * k < DIRECT_MNK:
        # OpenBLAS answers calls below DIRECT_MNK through another kernel (sgemm_direct on
        # AVX-512), which need not round alike: never let a half cross that line
        return whole
    a0 = partial(np.matmul, xa[..., :h, :], ya, out=out[..., :h, :])
    a1 = partial(np.matmul, xa[..., h:, :], ya, out=out[..., h:, :])
    return partial(_step, splitter, whole, a1, a0)
