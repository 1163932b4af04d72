# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython layer over csrc/fp16.c, csrc/staging.c and csrc/dw_queue.c.

Import through ``rustane.native`` (which loads the BLAS library first and documents the API); every
function here validates its arguments because it is callable directly too. Native work always runs
with the GIL released.
"""

import os
import threading

import numpy as np

cimport cython
cimport numpy as cnp
from libc.errno cimport ENOMEM
from libc.stdint cimport uint16_t, uintptr_t

cnp.import_array()


cdef extern from "fp16.h" nogil:
    ctypedef enum rustane_simd:
        RUSTANE_SIMD_SCALAR
        RUSTANE_SIMD_F16C
        RUSTANE_SIMD_NEON
    rustane_simd rustane_simd_best()
    rustane_simd rustane_simd_current()
    int rustane_simd_select(rustane_simd path)
    const char *rustane_simd_name(rustane_simd path)
    void rustane_f32_to_f16(uint16_t *dst, const float *src, size_t n)
    void rustane_f16_to_f32(float *dst, const uint16_t *src, size_t n)

cdef extern from "staging.h" nogil:
    void rustane_stage(uint16_t *dst, size_t dst_ld, const float *src, size_t C, size_t N)
    void rustane_stage_t(uint16_t *dst, size_t dst_ld, const float *src, size_t N, size_t C)
    void rustane_unstage(float *dst, size_t dst_ld, const uint16_t *src, size_t src_ld, size_t rows, size_t cols)
    void rustane_copy16(uint16_t *dst, size_t dst_ld, const uint16_t *src, size_t src_ld, size_t rows, size_t cols)

cdef extern from "dw_queue.h" nogil:
    ctypedef struct rustane_dwq:
        pass
    rustane_dwq *rustane_dwq_create(int blas_threads)
    int rustane_dwq_submit(rustane_dwq *q, float *dW, const float *dY, const float *X, int M, int N, int K, int copy)
    int rustane_dwq_submit_error(rustane_dwq *q, int err)
    int rustane_dwq_wait(rustane_dwq *q)
    void rustane_dwq_destroy(rustane_dwq *q)
    int rustane_dwq_blas_scope()


# ---- SIMD path selection ------------------------------------------------------------------------

_PATHS = {"scalar": RUSTANE_SIMD_SCALAR, "f16c": RUSTANE_SIMD_F16C, "neon": RUSTANE_SIMD_NEON}


def simd():
    return rustane_simd_name(rustane_simd_current()).decode()


def best_simd():
    return rustane_simd_name(rustane_simd_best()).decode()


def set_simd(name):
    if name in (None, "", "auto"):
        name = best_simd()
    if name not in _PATHS:
        raise ValueError(f"unknown SIMD path {name!r}; choose one of 'auto', 'scalar', 'f16c', 'neon'")
    previous = simd()
    if rustane_simd_select(_PATHS[name]) != 0:
        raise ValueError(f"SIMD path {name!r} is not available on this machine/build "
                         f"(available: 'scalar', {best_simd()!r})")
    return previous


# ---- argument checking ----------------------------------------------------------------------------

cdef cnp.ndarray _checked(object a, int typenum, str what, str dtname, bint writeable):
    if not isinstance(a, cnp.ndarray):
        raise TypeError(f"{what} must be a numpy.ndarray of {dtname}, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != typenum or not cnp.PyArray_ISNOTSWAPPED(arr):
        raise TypeError(f"{what} must have dtype {dtname} in native byte order, got {a.dtype}; "
                        f"convert with .astype(np.{dtname})")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{what} must be C-contiguous (shape {a.shape}, strides {a.strides}); "
                         f"pass np.ascontiguousarray({what})")
    if not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{what} is not aligned to its element size; pass a copy (np.array({what}))")
    if writeable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{what} is read-only; pass a writeable array")
    return arr


cdef cnp.ndarray _checked2d(object a, int typenum, str what, str dtname, bint writeable, str layout):
    cdef cnp.ndarray arr = _checked(a, typenum, what, dtname, writeable)
    if cnp.PyArray_NDIM(arr) != 2:
        raise ValueError(f"{what} must be 2-D {layout}, got shape {a.shape}")
    return arr


cdef inline uintptr_t _addr(cnp.ndarray a):
    return <uintptr_t>cnp.PyArray_DATA(a)


cdef _disjoint(str what_a, uintptr_t lo_a, uintptr_t hi_a, str what_b, uintptr_t lo_b, uintptr_t hi_b):
    # [lo, hi) byte ranges; empty ranges never collide
    if lo_a < hi_a and lo_b < hi_b and lo_a < hi_b and lo_b < hi_a:
        raise ValueError(f"{what_a} and {what_b} share memory; the native code needs separate buffers")


cdef _disjoint_arrays(str what_a, cnp.ndarray a, str what_b, cnp.ndarray b):
    _disjoint(what_a, _addr(a), _addr(a) + <uintptr_t>cnp.PyArray_NBYTES(a),
              what_b, _addr(b), _addr(b) + <uintptr_t>cnp.PyArray_NBYTES(b))


# ---- conversion -------------------------------------------------------------------------------------

cdef tuple _conversion_arrays(object src, object out, int src_type, str src_name, int dst_type, str dst_name):
    """Checked (src, out) of one conversion; out allocated like src when None."""
    cdef cnp.ndarray s = _checked(src, src_type, "src", src_name, False)
    cdef cnp.ndarray o
    if out is None:
        o = cnp.PyArray_EMPTY(cnp.PyArray_NDIM(s), cnp.PyArray_DIMS(s), dst_type, 0)
    else:
        o = _checked(out, dst_type, "out", dst_name, True)
        if out.shape != src.shape:
            raise ValueError(f"out has shape {out.shape} but src has shape {src.shape}; they must match")
        _disjoint_arrays("src", s, "out", o)
    return s, o


def f32_to_f16(src, out=None):
    cdef cnp.ndarray s, o
    s, o = _conversion_arrays(src, out, cnp.NPY_FLOAT32, "float32", cnp.NPY_FLOAT16, "float16")
    cdef size_t n = <size_t>cnp.PyArray_SIZE(s)
    cdef uint16_t *dp = <uint16_t *>cnp.PyArray_DATA(o)
    cdef const float *sp = <const float *>cnp.PyArray_DATA(s)
    with nogil:
        rustane_f32_to_f16(dp, sp, n)
    return o


def f16_to_f32(src, out=None):
    cdef cnp.ndarray s, o
    s, o = _conversion_arrays(src, out, cnp.NPY_FLOAT16, "float16", cnp.NPY_FLOAT32, "float32")
    cdef size_t n = <size_t>cnp.PyArray_SIZE(s)
    cdef float *dp = <float *>cnp.PyArray_DATA(o)
    cdef const uint16_t *sp = <const uint16_t *>cnp.PyArray_DATA(s)
    with nogil:
        rustane_f16_to_f32(dp, sp, n)
    return o


# ---- staging ------------------------------------------------------------------------------------------

def stage(dst, src, Py_ssize_t col=0, *, Py_ssize_t c0=0, bint transpose=False):
    cdef cnp.ndarray d = _checked2d(dst, cnp.NPY_FLOAT16, "dst", "float16", True, "[C, SP] (channel-major)")
    cdef cnp.ndarray s = _checked2d(src, cnp.NPY_FLOAT32, "src", "float32", False,
                                    "[N, C] (transposed)" if transpose else "[C, N]")
    cdef Py_ssize_t C = d.shape[0], SP = d.shape[1]
    cdef Py_ssize_t cb = s.shape[1] if transpose else s.shape[0]
    cdef Py_ssize_t nb = s.shape[0] if transpose else s.shape[1]
    if c0 < 0 or col < 0 or c0 + cb > C or col + nb > SP:
        how = f"transpose of src {src.shape}" if transpose else f"src {src.shape}"
        raise ValueError(f"stage: {how} is a [{cb}, {nb}] block; at channels [{c0}, {c0 + cb}) and columns "
                         f"[{col}, {col + nb}) it does not fit dst {dst.shape} ([C, SP])")
    _disjoint_arrays("src", s, "dst", d)
    cdef uint16_t *dp = <uint16_t *>cnp.PyArray_DATA(d) + c0 * SP + col
    cdef const float *sp = <const float *>cnp.PyArray_DATA(s)
    with nogil:
        if transpose:
            rustane_stage_t(dp, <size_t>SP, sp, <size_t>nb, <size_t>cb)
        else:
            rustane_stage(dp, <size_t>SP, sp, <size_t>cb, <size_t>nb)
    return dst


def unstage(src, Py_ssize_t c0=0, n=None, Py_ssize_t col=0, ncols=None, out=None):
    cdef cnp.ndarray s = _checked2d(src, cnp.NPY_FLOAT16, "src", "float16", False, "[C, SP] (channel-major)")
    cdef Py_ssize_t C = s.shape[0], SP = s.shape[1]
    cdef Py_ssize_t rows = C - c0 if n is None else n
    cdef Py_ssize_t cols = SP - col if ncols is None else ncols
    if c0 < 0 or col < 0 or rows < 0 or cols < 0 or c0 + rows > C or col + cols > SP:
        raise ValueError(f"unstage: channels [{c0}, {c0 + rows}) x columns [{col}, {col + cols}) are outside "
                         f"src {src.shape} ([C, SP])")
    cdef cnp.ndarray o
    cdef cnp.npy_intp dims[2]
    if out is None:
        dims[0] = rows
        dims[1] = cols
        o = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
    else:
        o = _checked(out, cnp.NPY_FLOAT32, "out", "float32", True)
        if out.shape != (rows, cols):
            raise ValueError(f"unstage: out has shape {out.shape}, expected ({rows}, {cols}) for channels "
                             f"[{c0}, {c0 + rows}) x columns [{col}, {col + cols}) of src {src.shape}")
        _disjoint_arrays("src", s, "out", o)
    cdef float *dp = <float *>cnp.PyArray_DATA(o)
    cdef const uint16_t *sp = <const uint16_t *>cnp.PyArray_DATA(s) + c0 * SP + col
    with nogil:
        rustane_unstage(dp, <size_t>cols, sp, <size_t>SP, <size_t>rows, <size_t>cols)
    return o


def copy_channels(dst, Py_ssize_t dst_c0, src, Py_ssize_t src_c0, Py_ssize_t n, *,
                  Py_ssize_t dst_col=0, Py_ssize_t src_col=0, ncols=None):
    cdef cnp.ndarray d = _checked2d(dst, cnp.NPY_FLOAT16, "dst", "float16", True, "[C, SP] (channel-major)")
    cdef cnp.ndarray s = _checked2d(src, cnp.NPY_FLOAT16, "src", "float16", False, "[C, SP] (channel-major)")
    cdef Py_ssize_t dC = d.shape[0], dW = d.shape[1], sC = s.shape[0], sW = s.shape[1]
    cdef Py_ssize_t cols = sW - src_col if ncols is None else ncols
    if (n < 0 or cols < 0 or src_c0 < 0 or src_col < 0 or src_c0 + n > sC or src_col + cols > sW):
        raise ValueError(f"copy_channels: channels [{src_c0}, {src_c0 + n}) x columns [{src_col}, "
                         f"{src_col + cols}) are outside src {src.shape}")
    if dst_c0 < 0 or dst_col < 0 or dst_c0 + n > dC or dst_col + cols > dW:
        raise ValueError(f"copy_channels: channels [{dst_c0}, {dst_c0 + n}) x columns [{dst_col}, "
                         f"{dst_col + cols}) are outside dst {dst.shape}")
    cdef uint16_t *dp = <uint16_t *>cnp.PyArray_DATA(d) + dst_c0 * dW + dst_col
    cdef const uint16_t *sp = <const uint16_t *>cnp.PyArray_DATA(s) + src_c0 * sW + src_col
    if n > 0 and cols > 0:
        if _addr(d) == _addr(s) and dW == sW:  # one buffer: windows clash only if rows and columns both do
            if dst_c0 < src_c0 + n and src_c0 < dst_c0 + n and dst_col < src_col + cols and src_col < dst_col + cols:
                raise ValueError(f"copy_channels: src window channels [{src_c0}, {src_c0 + n}) x columns "
                                 f"[{src_col}, {src_col + cols}) overlaps the dst window channels [{dst_c0}, "
                                 f"{dst_c0 + n}) x columns [{dst_col}, {dst_col + cols}) of the same buffer")
        else:  # different views: compare the byte hulls of the two windows
            _disjoint("the src window", <uintptr_t>sp, <uintptr_t>(sp + (n - 1) * sW + cols),
                      "the dst window", <uintptr_t>dp, <uintptr_t>(dp + (n - 1) * dW + cols))
    with nogil:
        rustane_copy16(dp, <size_t>dW, sp, <size_t>sW, <size_t>n, <size_t>cols)
    return dst


# ---- dW queue -------------------------------------------------------------------------------------------

cdef _job_error(int rc):
    if rc == ENOMEM:
        return MemoryError("dW queue: out of memory")
    return RuntimeError(f"dW queue: a job failed: {os.strerror(rc)} (error {rc})")


# no_gc_clear: if the queue ends up in a garbage cycle, the collector must not drop the references to
# pending dW arrays before __dealloc__ has waited for the jobs that write into them.
@cython.no_gc_clear
cdef class DWQueue:
    cdef rustane_dwq *_q
    cdef object _lock
    cdef list _refs
    cdef readonly int blas_threads
    cdef object __weakref__

    def __cinit__(self, int blas_threads=1):
        if blas_threads < 0:
            raise ValueError(f"blas_threads must be >= 0 (0 = BLAS default), got {blas_threads}")
        self._lock = threading.Lock()
        self._refs = []
        self.blas_threads = blas_threads
        with nogil:
            self._q = rustane_dwq_create(blas_threads)
        if self._q == NULL:
            raise MemoryError("dW queue: could not allocate the queue or start its worker")

    def __dealloc__(self):
        # Runs before the reference list is released, so every pending dW outlives its job.
        cdef rustane_dwq *q = self._q
        self._q = NULL
        if q != NULL:
            with nogil:
                rustane_dwq_destroy(q)

    cdef rustane_dwq *_live(self) except NULL:
        if self._q == NULL:
            raise RuntimeError("dW queue is closed")
        return self._q

    @property
    def blas_thread_scope(self):
        return ("none", "global", "local")[rustane_dwq_blas_scope()]

    @property
    def pending(self):
        return len(self._refs)

    @property
    def closed(self):
        return self._q == NULL

    def submit(self, dW, dY, X, *, bint copy=True):
        cdef cnp.ndarray w = _checked2d(dW, cnp.NPY_FLOAT32, "dW", "float32", True, "[out, in]")
        cdef cnp.ndarray y = _checked2d(dY, cnp.NPY_FLOAT32, "dY", "float32", False, "[out, S]")
        cdef cnp.ndarray x = _checked2d(X, cnp.NPY_FLOAT32, "X", "float32", False, "[in, S]")
        cdef Py_ssize_t M = w.shape[0], N = w.shape[1], K = y.shape[1]
        if y.shape[0] != M or x.shape[0] != N or x.shape[1] != K:
            raise ValueError(f"dW queue: dW[out, in] += dY[out, S] @ X[in, S].T needs dY [{M}, S] and X [{N}, S] "
                             f"with the same S; got dW {dW.shape}, dY {dY.shape}, X {X.shape}")
        if M > 0x7fffffff or N > 0x7fffffff or K > 0x7fffffff:
            raise ValueError(f"dW queue: dimensions must fit a 32-bit BLAS int, got dW {dW.shape}, dY {dY.shape}")
        _disjoint_arrays("dW", w, "dY", y)
        _disjoint_arrays("dW", w, "X", x)
        cdef float *wp = <float *>cnp.PyArray_DATA(w)
        cdef const float *yp = <const float *>cnp.PyArray_DATA(y)
        cdef const float *xp = <const float *>cnp.PyArray_DATA(x)
        cdef int rc = 0
        cdef rustane_dwq *q = NULL
        cdef int c = copy
        # The reference goes in before the job and under the lock that wait() swaps the list with,
        # so a concurrent wait() never drops the reference of a job it did not wait for.
        with self._lock:
            q = self._live()
            self._refs.append(w if copy else (w, y, x))
            with nogil:
                rc = rustane_dwq_submit(q, wp, yp, xp, <int>M, <int>N, <int>K, c)
            if rc != 0:
                self._refs.pop()
                raise _job_error(rc)

    def _inject_error(self, int code):
        """Test hook: queue a job that fails with errno ``code`` when it runs."""
        if code <= 0:
            raise ValueError("code must be a positive errno value")
        cdef int rc = 0
        with self._lock:
            rc = rustane_dwq_submit_error(self._live(), code)
        if rc != 0:
            raise _job_error(rc)

    def wait(self):
        cdef rustane_dwq *q = NULL
        cdef int rc = 0
        with self._lock:
            q = self._live()
            done = self._refs
            self._refs = []
        with nogil:
            rc = rustane_dwq_wait(q)
        del done
        if rc != 0:
            raise _job_error(rc)

    def close(self):
        cdef rustane_dwq *q = NULL
        cdef int rc = 0
        with self._lock:
            q = self._q
            self._q = NULL
            done = self._refs
            self._refs = []
        if q == NULL:
            return
        with nogil:
            rc = rustane_dwq_wait(q)
            rustane_dwq_destroy(q)
        del done
        if rc != 0:
            raise _job_error(rc)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
