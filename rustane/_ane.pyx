# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython wrapper of csrc/ane_runtime.h (the ANE runtime over the private framework).

Low level on purpose: ``rustane.backends.ane`` builds the Backend protocol on top. Errors raise
``rustane.backends.ane.AneError`` (code, stage, message). The GIL is released around everything
that talks to the framework (compile, load, eval, unload, surface locks).
"""

from libc.stdlib cimport calloc, free
from libc.string cimport memset

cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "ane_runtime.h" nogil:
    ctypedef struct ane_error:
        long code
        char stage[16]
        char message[512]
    ctypedef struct ane_model:
        pass
    ctypedef struct ane_surface:
        pass
    ctypedef struct ane_request:
        pass

    int ANE_COMPILE_BUDGET
    int ANE_COMPILE_WARN_AT
    const char *ANE_DEFAULT_FRAMEWORK

    int ane_init(const char *path, ane_error *err)
    int ane_is_initialized()
    void *ane_framework_symbol(const char *name)
    int ane_compile_count()
    ane_model *ane_compile(const char *mil, size_t mil_len, size_t n_weights, const char *const *names,
                           const void *const *blobs, const size_t *blob_sizes, ane_error *err)
    const char *ane_model_tmpdir(const ane_model *m)
    int ane_model_free(ane_model *m, ane_error *err)
    ane_surface *ane_surface_create(size_t nbytes, ane_error *err)
    size_t ane_surface_nbytes(const ane_surface *s)
    void *ane_surface_lock(ane_surface *s, int readonly, ane_error *err)
    int ane_surface_unlock(ane_surface *s, int readonly, ane_error *err)
    void ane_surface_free(ane_surface *s)
    ane_request *ane_request_create(ane_model *m, size_t n_in, ane_surface *const *ins, size_t n_out,
                                    ane_surface *const *outs, ane_error *err)
    void ane_request_free(ane_request *r)
    int ane_eval(ane_model *m, ane_request *r, ane_error *err)

cdef extern from *:
    """
    #ifdef RUSTANE_ANE_FAKE
    #define RUSTANE_BUILT_WITH_FAKE 1
    #else
    #define RUSTANE_BUILT_WITH_FAKE 0
    #endif
    #ifndef RUSTANE_FAKE_LIBRARY
    #define RUSTANE_FAKE_LIBRARY ""
    #endif
    """
    int RUSTANE_BUILT_WITH_FAKE
    const char *RUSTANE_FAKE_LIBRARY

COMPILE_BUDGET = ANE_COMPILE_BUDGET
COMPILE_WARN_AT = ANE_COMPILE_WARN_AT
DEFAULT_FRAMEWORK = ANE_DEFAULT_FRAMEWORK.decode()
#: True when this extension was built for the Linux contract tests (meson -Dane_fake=true).
BUILT_WITH_FAKE = bool(RUSTANE_BUILT_WITH_FAKE)
#: where that build left the fake framework (its build folder: the fake is never installed), or ''
FAKE_LIBRARY_PATH = RUSTANE_FAKE_LIBRARY.decode()


cdef object _raise(ane_error *e):
    from rustane.backends.ane.errors import AneError

    raise AneError(e.code, e.stage.decode(errors="replace"), e.message.decode(errors="replace"))


def init(path=None):
    """Load the framework (default: the system's private AppleNeuralEngine) and its classes."""
    cdef ane_error err
    cdef bytes bpath = None if path is None else str(path).encode()
    cdef const char *cpath = NULL
    cdef int rc
    if bpath is not None:
        cpath = bpath
    memset(&err, 0, sizeof(err))
    with nogil:
        rc = ane_init(cpath, &err)
    if rc != 0:
        _raise(&err)


def is_initialized():
    return bool(ane_is_initialized())


def compile_count():
    """Compiles attempted by this process (the ANE allows about COMPILE_BUDGET)."""
    return ane_compile_count()


cdef class Model:
    """A compiled and loaded in-memory model; ``close()`` unloads it and removes its temp dir."""

    cdef ane_model *ptr

    def __cinit__(self):
        self.ptr = NULL

    @property
    def closed(self):
        return self.ptr == NULL

    @property
    def tmpdir(self):
        if self.ptr == NULL:
            return None
        return ane_model_tmpdir(self.ptr).decode()

    def close(self):
        cdef ane_error err
        cdef int rc
        if self.ptr == NULL:
            return
        memset(&err, 0, sizeof(err))
        with nogil:
            rc = ane_model_free(self.ptr, &err)
        self.ptr = NULL
        if rc != 0:
            _raise(&err)

    def __dealloc__(self):
        if self.ptr != NULL:
            ane_model_free(self.ptr, NULL)
            self.ptr = NULL


def compile(bytes mil, weights):
    """Compile and load ``mil`` (UTF-8 MIL text) with ``weights`` {"@model_path/weights/x.bin": blob bytes}."""
    cdef ane_error err
    cdef Py_ssize_t n = len(weights), i
    cdef const char **names = <const char **>calloc(n + 1, sizeof(char *))
    cdef const void **blobs = <const void **>calloc(n + 1, sizeof(void *))
    cdef size_t *sizes = <size_t *>calloc(n + 1, sizeof(size_t))
    cdef list keep = []
    cdef bytes k, v
    cdef ane_model *m
    cdef const char *cmil = mil
    cdef size_t mil_len = len(mil)
    cdef Model model
    if names == NULL or blobs == NULL or sizes == NULL:
        free(names); free(blobs); free(sizes)
        raise MemoryError()
    try:
        for i, (key, blob) in enumerate(weights.items()):
            k = key.encode() if isinstance(key, str) else bytes(key)
            v = bytes(blob)
            keep.append(k)
            keep.append(v)
            names[i] = <const char *>k
            blobs[i] = <const char *>v
            sizes[i] = len(v)
        memset(&err, 0, sizeof(err))
        with nogil:
            m = ane_compile(cmil, mil_len, <size_t>n, names, blobs, sizes, &err)
    finally:
        free(names); free(blobs); free(sizes)
    if m == NULL:
        _raise(&err)
    model = Model.__new__(Model)
    model.ptr = m
    return model


cdef class Surface:
    """An IOSurface used as a flat byte buffer (docs/ane-runtime.md#surfaces).

    ``lock(readonly)`` returns a uint8 numpy view of the whole surface, valid until ``unlock()``.
    """

    cdef ane_surface *ptr
    cdef int locked  # 0: unlocked, 1: locked read-write, 2: locked read-only

    def __cinit__(self, size_t nbytes):
        cdef ane_error err
        memset(&err, 0, sizeof(err))
        self.locked = 0
        with nogil:
            self.ptr = ane_surface_create(nbytes, &err)
        if self.ptr == NULL:
            _raise(&err)

    @property
    def nbytes(self):
        return ane_surface_nbytes(self.ptr)

    @property
    def is_locked(self):
        return self.locked != 0

    def lock(self, bint readonly=False):
        cdef ane_error err
        cdef void *p
        cdef cnp.npy_intp dims[1]
        if self.locked:
            raise RuntimeError("surface is already locked; unlock it first (locks do not nest)")
        memset(&err, 0, sizeof(err))
        with nogil:
            p = ane_surface_lock(self.ptr, readonly, &err)
        if p == NULL:
            _raise(&err)
        self.locked = 2 if readonly else 1
        dims[0] = <cnp.npy_intp>ane_surface_nbytes(self.ptr)
        arr = cnp.PyArray_SimpleNewFromData(1, dims, cnp.NPY_UINT8, p)
        cnp.set_array_base(arr, self)  # the view keeps the surface alive
        if readonly:
            arr.flags.writeable = False
        return arr

    def unlock(self):
        cdef ane_error err
        cdef int rc
        cdef int ro = self.locked == 2
        if not self.locked:
            raise RuntimeError("surface is not locked")
        memset(&err, 0, sizeof(err))
        with nogil:
            rc = ane_surface_unlock(self.ptr, ro, &err)
        self.locked = 0
        if rc != 0:
            _raise(&err)

    def __dealloc__(self):
        if self.ptr != NULL:
            if self.locked:
                ane_surface_unlock(self.ptr, self.locked == 2, NULL)
            ane_surface_free(self.ptr)
            self.ptr = NULL


cdef class Request:
    """Input and output surfaces bound to one model; build once, ``eval()`` many times."""

    cdef ane_request *ptr
    cdef Model model
    cdef tuple surfaces  # keeps the bound surfaces alive as long as the request

    def __cinit__(self, Model model, inputs, outputs):
        cdef ane_error err
        cdef Py_ssize_t n_in = len(inputs), n_out = len(outputs), i
        cdef ane_surface **ins = <ane_surface **>calloc(n_in + 1, sizeof(ane_surface *))
        cdef ane_surface **outs = <ane_surface **>calloc(n_out + 1, sizeof(ane_surface *))
        cdef Surface s
        self.ptr = NULL
        self.model = model
        self.surfaces = tuple(inputs) + tuple(outputs)
        if ins == NULL or outs == NULL:
            free(ins); free(outs)
            raise MemoryError()
        try:
            if model.ptr == NULL:
                raise ValueError("the model is closed")
            for i in range(n_in):
                s = inputs[i]
                ins[i] = s.ptr
            for i in range(n_out):
                s = outputs[i]
                outs[i] = s.ptr
            memset(&err, 0, sizeof(err))
            with nogil:
                self.ptr = ane_request_create(model.ptr, n_in, ins, n_out, outs, &err)
        finally:
            free(ins); free(outs)
        if self.ptr == NULL:
            _raise(&err)

    def eval(self):
        cdef ane_error err
        cdef int rc
        cdef Surface s
        if self.model.ptr == NULL:
            raise ValueError("the model of this request is closed")
        for s in self.surfaces:
            if s.locked:
                raise RuntimeError("a bound surface is still locked by the CPU; unlock it before eval")
        memset(&err, 0, sizeof(err))
        with nogil:
            rc = ane_eval(self.model.ptr, self.ptr, &err)
        if rc != 0:
            _raise(&err)

    def __dealloc__(self):
        if self.ptr != NULL:
            ane_request_free(self.ptr)
            self.ptr = NULL


# ---- fake framework hook (Linux contract tests) -------------------------------------------------
ctypedef int (*fake_eval_fn)(void *ctx, const char *mil, size_t mil_len, size_t n_weights,
                             const char *const *weight_keys, const void *const *weight_data,
                             const size_t *weight_sizes, size_t n_in, void *const *in_ptrs,
                             const size_t *in_sizes, size_t n_out, void *const *out_ptrs,
                             const size_t *out_sizes) noexcept
ctypedef void (*fake_set_fn)(fake_eval_fn fn, void *ctx) noexcept nogil

#: Code the fake's evaluate reports when the Python evaluator raised.
FAKE_EVALUATOR_RAISED = 0x7e5
cdef object _fake_evaluator = None
_last_fake_error = None


cdef object _byte_view(void *p, size_t n, bint writable):
    cdef cnp.npy_intp dims[1]
    dims[0] = <cnp.npy_intp>n
    arr = cnp.PyArray_SimpleNewFromData(1, dims, cnp.NPY_UINT8, p)
    if not writable:
        arr.flags.writeable = False
    return arr


cdef int _fake_eval_trampoline(void *ctx, const char *mil, size_t mil_len, size_t n_weights,
                               const char *const *weight_keys, const void *const *weight_data,
                               const size_t *weight_sizes, size_t n_in, void *const *in_ptrs,
                               const size_t *in_sizes, size_t n_out, void *const *out_ptrs,
                               const size_t *out_sizes) noexcept with gil:
    global _last_fake_error
    cdef size_t i
    try:
        text = (<const char *>mil)[:mil_len].decode()
        weights = {weight_keys[i].decode(): (<const char *>weight_data[i])[:weight_sizes[i]]
                   for i in range(n_weights)}
        ins = [_byte_view(in_ptrs[i], in_sizes[i], False) for i in range(n_in)]
        outs = [_byte_view(out_ptrs[i], out_sizes[i], True) for i in range(n_out)]
        _fake_evaluator(text, weights, ins, outs)
        return 0
    except BaseException as e:  # never let an exception cross the C frames of the fake
        _last_fake_error = e
        return FAKE_EVALUATOR_RAISED


def set_fake_evaluator(fn):
    """Make the fake framework's evaluate call ``fn(mil_text, weights, inputs, outputs)``.

    ``inputs``/``outputs`` are uint8 numpy views of the bound surfaces (outputs writable). Only
    the fake framework has this hook; with the real one this raises.
    """
    global _fake_evaluator
    cdef fake_set_fn setter = <fake_set_fn>ane_framework_symbol(b"fakeane_set_eval_callback")
    if setter == NULL:
        raise RuntimeError("the loaded framework has no fakeane_set_eval_callback (not the test fake)")
    _fake_evaluator = fn
    if fn is None:
        setter(NULL, NULL)
    else:
        setter(_fake_eval_trampoline, NULL)


def last_fake_evaluator_error():
    """The exception the Python evaluator raised in the last failed fake evaluation, if any
    (handed over once: the module keeps no reference to it afterwards)."""
    global _last_fake_error
    e, _last_fake_error = _last_fake_error, None
    return e
