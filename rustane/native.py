"""Native CPU core: fp32<->fp16 conversion, ANE buffer staging, and the background dW queue.

All heavy work runs in C (csrc/fp16.c, csrc/staging.c, csrc/dw_queue.c) with the GIL released.

Conversion semantics (every SIMD path, bit-identical to each other and to numpy ``astype`` for all
non-NaN values): round to nearest even, subnormals kept, overflow to ``±inf``; a NaN stays a NaN and
comes out *quiet* (payload top bits kept), which is what F16C and NEON hardware produce.

SIMD path: chosen at import — ``'f16c'`` on x86-64 CPUs with AVX+F16C (CPUID + XGETBV), ``'neon'`` on
arm64, else ``'scalar'``. The environment variable ``RUSTANE_SIMD`` (``scalar`` / ``f16c`` / ``neon`` /
``auto``) read at import overrides it; :func:`set_simd` switches at run time (process-wide; meant for
tests and benchmarks, not to be flipped while other threads convert).

ANE buffers are channel-major fp16 ``[C, SP]`` arrays (element (c, w) at ``c*SP + w``), e.g. the
numpy view of a locked IOSurface (``Buffer.lock()``).

dW queue semantics (:class:`DWQueue`): jobs ``dW[out, in] += dY[out, S] @ X[in, S].T`` run one at a
time, in submission order, on a background worker (GCD serial queue on macOS, a pthread elsewhere).
By default ``submit`` *snapshots* ``dY`` and ``X`` (one malloc + memcpy on the calling thread, as
maderix does) so the caller may overwrite them immediately; ``copy=False`` skips the copy and then the
caller must leave them untouched until :meth:`DWQueue.wait`. Snapshot buffers are recycled inside the
queue (freed ones are kept for reuse, at most 128 buffers / 512 MB, released by ``close()``), since a
fresh multi-megabyte allocation costs more in page faults than the copy itself. ``dW`` is always updated in place: the
queue keeps a reference to it (so it cannot be freed early), and it must not be read or written by
anyone else until ``wait()`` returns. Bad arguments raise at ``submit``; a failure inside a job is
raised by the next ``wait()``. ``submit`` and ``wait`` may be called from several threads at once.
"""

from __future__ import annotations

import atexit
import os
import sys
import weakref

if sys.platform.startswith("linux"):
    # The extension links libscipy_openblas by SONAME only (its build-time RUNPATH points into a
    # deleted pip build env); importing the wheel first dlopens the library RTLD_GLOBAL.
    import scipy_openblas32  # noqa: F401

from . import _native

__all__ = [
    "simd",
    "best_simd",
    "set_simd",
    "f32_to_f16",
    "f16_to_f32",
    "stage",
    "unstage",
    "copy_channels",
    "DWQueue",
]


def simd() -> str:
    """Name of the conversion path in use: ``'f16c'``, ``'neon'`` or ``'scalar'``."""
    return _native.simd()


def best_simd() -> str:
    """Name of the fastest path this CPU and build support."""
    return _native.best_simd()


def set_simd(name: str | None) -> str:
    """Select the conversion path (``'scalar'``, the best path's name, or ``'auto'``/``None``).

    Returns the previous path name so callers can restore it. Raises ``ValueError`` for an unknown
    or unavailable path. Process-wide: affects conversion and staging in all threads.
    """
    return _native.set_simd(name)


def f32_to_f16(src, out=None):
    """Convert a C-contiguous float32 array of any shape to float16.

    ``out``: optional preallocated C-contiguous, writeable float16 array of the same shape (must not
    share memory with ``src``). Returns ``out`` (or a new array). ``TypeError`` for a wrong dtype,
    ``ValueError`` for non-contiguous/read-only arrays or a shape mismatch.
    """
    return _native.f32_to_f16(src, out)


def f16_to_f32(src, out=None):
    """Convert a C-contiguous float16 array of any shape to float32 (exact). ``out`` as in
    :func:`f32_to_f16`, with dtype float32."""
    return _native.f16_to_f32(src, out)


def stage(dst, src, col: int = 0, *, c0: int = 0, transpose: bool = False):
    """Write an fp32 block into an fp16 ``[C, SP]`` buffer, converting in one pass.

    ``transpose=False``: ``src`` is ``[Cb, N]`` and lands in ``dst[c0:c0+Cb, col:col+N]``.
    ``transpose=True``: ``src`` is ``[N, Cb]`` and its transpose lands there (cache-blocked, no
    temporary), e.g. ``stage(buf, Wq, col, transpose=True)`` stages ``Wqᵀ`` with channels = in.
    Raises ``ValueError`` naming the shapes when the block does not fit. Returns ``dst``.
    """
    return _native.stage(dst, src, col, c0=c0, transpose=transpose)


def unstage(src, c0: int = 0, n: int | None = None, col: int = 0, ncols: int | None = None, out=None):
    """Read channels ``[c0, c0+n)`` and columns ``[col, col+ncols)`` of an fp16 ``[C, SP]`` buffer
    as fp32 ``[n, ncols]`` (defaults: to the last channel / column), into ``out`` or a new array."""
    return _native.unstage(src, c0, n, col, ncols, out)


def copy_channels(dst, dst_c0: int, src, src_c0: int, n: int, *, dst_col: int = 0, src_col: int = 0,
                  ncols: int | None = None):
    """Copy fp16 channels ``src[src_c0:src_c0+n, src_col:src_col+ncols]`` into
    ``dst[dst_c0:dst_c0+n, dst_col:dst_col+ncols]`` without conversion (surface-to-surface, e.g. a
    forward tap into a backward kernel's input). ``ncols`` defaults to the rest of ``src``'s row.
    The two windows must not overlap. Returns ``dst``."""
    return _native.copy_channels(dst, dst_c0, src, src_c0, n, dst_col=dst_col, src_col=src_col, ncols=ncols)


_live_queues: weakref.WeakSet = weakref.WeakSet()


class DWQueue(_native.DWQueue):
    """Serial background queue of ``dW[out, in] += dY[out, S] @ X[in, S].T`` (fp32 sgemm, β = 1).

    ``DWQueue(blas_threads=1)``: the BLAS thread count for the queue's sgemms, applied before each
    job. 1 leaves the other cores to the caller, which is what makes the overlap pay; 0 keeps the
    library default. ``blas_thread_scope`` says how it applies: ``'local'`` (only the queue's worker,
    OpenBLAS exporting ``openblas_set_num_threads_local``), ``'global'`` (process-wide for the BLAS
    the queue links — scipy-openblas32 0.3.34 only exports the global setter; numpy has its own
    OpenBLAS and is unaffected) or ``'none'`` (Accelerate: no control).

    - ``submit(dW, dY, X, *, copy=True)`` returns at once; all three are C-contiguous float32 2-D
      arrays, ``dW`` writeable and not overlapping the others. See the module docstring for the
      snapshot (``copy``) semantics.
    - ``wait()`` blocks until every job submitted before it has finished, then releases the queue's
      references; raises the first job failure since the previous ``wait()``.
    - ``pending``: jobs submitted since the last ``wait()``. ``close()`` waits, stops the worker and
      frees it (also done on garbage collection and at interpreter exit); must not race other
      threads still using the queue. Usable as a context manager.
    """

    def __init__(self, blas_threads: int = 1):
        _live_queues.add(self)


@atexit.register
def _close_all() -> None:
    for q in list(_live_queues):
        try:
            q.close()
        except Exception:  # a job failure nobody waited for must not break interpreter exit
            pass


def _apply_env() -> None:
    want = os.environ.get("RUSTANE_SIMD", "").strip().lower()
    if want:
        try:
            set_simd(want)
        except ValueError as e:
            raise ImportError(f"RUSTANE_SIMD={want!r}: {e}") from None


_apply_env()
