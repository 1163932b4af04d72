# cython: language_level=3, boundscheck=False, wraparound=False
"""Cython bindings for csrc/cpu_ops.c (CPU training ops). Use ``rustane.cpu_ops``, not this.

Every function takes its outputs explicitly, validates every array (dtype, C-contiguity,
shape, writability) with an error naming the argument, then runs the C code without the GIL.
"""

import numpy as np
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport malloc, free

cnp.import_array()

cdef extern from "cpu_ops.h":
    void rn_rmsnorm_fwd(const float *x, const float *w, float *out, float *rrms,
                        int C, int S, float eps) nogil
    int rn_rmsnorm_bwd(const float *dy, const float *x, const float *w, const float *rrms,
                       float *dx, float *dw, int C, int S) nogil
    int rn_rope(const float *x, float *out, int n_heads, int hd, int S, double theta,
                int inverse) nogil
    int rn_rope_freq(const float *x, float *out, int n_heads, int hd, int S, const double *inv_freq,
                     int inverse) nogil
    double rn_cross_entropy(const float *logits, const int32_t *targets, float *dlogits,
                            int V, int S, float grad_scale, int threads) nogil
    double rn_cross_entropy_weighted(const float *logits, const int32_t *targets, const float *weights,
                                     float *dlogits, int V, int S, float grad_scale, int threads) nogil
    void rn_embedding_fwd(const float *E, const int32_t *tokens, float *out, int D, int S) nogil
    void rn_embedding_bwd(const float *dx, const int32_t *tokens, float *dE, int D, int S) nogil
    void rn_adamw_step(float *w, const float *grad, float *m, float *v, size_t n,
                       float lr, float beta1, float beta2, float eps, float weight_decay,
                       float grad_scale, int64_t t) nogil
    double rn_sumsq(const float *x, size_t n) nogil
    struct rn_adamw_hyper:
        float lr, beta1, beta2, eps, grad_scale
        int64_t t
    struct rn_adamw_tensor:
        float *w
        float *grad
        float *m
        float *v
        size_t n
        float weight_decay
    void rn_adamw_tensors(const rn_adamw_tensor *ts, int count, const rn_adamw_hyper *h,
                          int zero_grad, int threads) nogil
    double rn_sumsq_tensors(const float *const *xs, const size_t *ns, int count, int threads) nogil

cdef extern from "sim_ops.h":
    void rn_sigmoid_f32(const float *x, Py_ssize_t x_row, float *out, Py_ssize_t out_row,
                        size_t rows, size_t n) nogil
    void rn_silu_f32(const float *x, Py_ssize_t x_row, float *out, Py_ssize_t out_row,
                     size_t rows, size_t n) nogil
    void rn_softmax_rows_f32(const float *x, Py_ssize_t x_row, float *out, Py_ssize_t out_row,
                             size_t rows, size_t n) nogil

cdef extern from "sim_rows.h":
    ctypedef struct rn_row_op:
        int32_t op
        int32_t dst
        int32_t a
        int32_t b
    ctypedef struct rn_row_arg:
        void *base
        int32_t f16
        int32_t width
        Py_ssize_t col_stride
        const int64_t *row_off
    int rn_row_program(const rn_row_op *prog, size_t nops, const rn_row_arg *args, const int32_t *reg_width,
                       size_t nregs, size_t row0, size_t row1, size_t n) nogil
    float rn_pairwise_sum_f32(const float *x, size_t n) nogil

_INT_MAX = 2**31 - 1


cdef cnp.ndarray _arr(object a, str name, object dtype, tuple shape, bint writable=False):
    """Check one argument; ``shape`` entries of None accept any size (the caller cross-checks)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    ashape = a.shape
    if arr.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {arr.dtype.name} "
                        f"(convert with .astype(np.{np.dtype(dtype).name}))")
    if arr.ndim != len(shape):
        raise ValueError(f"{name}: expected {len(shape)}-D array, got shape {ashape}")
    for i, want in enumerate(shape):
        if want is not None and ashape[i] != want:
            raise ValueError(f"{name}: expected shape {_fmt(shape)}, got {ashape}")
        if ashape[i] > _INT_MAX:
            raise ValueError(f"{name}: dimension {i} of {ashape} exceeds 2**31-1")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous (use np.ascontiguousarray)")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name}: output array is read-only")
    return arr


cdef str _fmt(tuple shape):
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


cdef inline float* _f(cnp.ndarray a):
    return <float*>cnp.PyArray_DATA(a)


cdef inline int32_t* _i(cnp.ndarray a):
    return <int32_t*>cnp.PyArray_DATA(a)


cdef _check_tokens(cnp.ndarray tok, str name, Py_ssize_t limit, str limit_name):
    if tok.shape[0] and (int(tok.min()) < 0 or int(tok.max()) >= limit):
        raise ValueError(f"{name}: ids must lie in [0, {limit}) ({limit_name}), "
                         f"got min {int(tok.min())} max {int(tok.max())}")


def rmsnorm_fwd(x, w, out, rrms, float eps):
    """x [C, S], w [C] -> out [C, S], rrms [S] (written)."""
    cdef cnp.ndarray X = _arr(x, "x", np.float32, (None, None))
    cdef int C = X.shape[0], S = X.shape[1]
    cdef cnp.ndarray W = _arr(w, "w", np.float32, (C,))
    cdef cnp.ndarray O = _arr(out, "out", np.float32, (C, S), True)
    cdef cnp.ndarray R = _arr(rrms, "rrms", np.float32, (S,), True)
    cdef float* pX = _f(X)
    cdef float* pW = _f(W)
    cdef float* pO = _f(O)
    cdef float* pR = _f(R)
    with nogil:
        rn_rmsnorm_fwd(pX, pW, pO, pR, C, S, eps)


def rmsnorm_bwd(dy, x, w, rrms, dx, dw):
    """Writes dx [C, S]; accumulates into dw [C]."""
    cdef cnp.ndarray X = _arr(x, "x", np.float32, (None, None))
    cdef int C = X.shape[0], S = X.shape[1]
    cdef cnp.ndarray DY = _arr(dy, "dy", np.float32, (C, S))
    cdef cnp.ndarray W = _arr(w, "w", np.float32, (C,))
    cdef cnp.ndarray R = _arr(rrms, "rrms", np.float32, (S,))
    cdef cnp.ndarray DX = _arr(dx, "dx", np.float32, (C, S), True)
    cdef cnp.ndarray DW = _arr(dw, "dw", np.float32, (C,), True)
    cdef int rc
    cdef float* pDY = _f(DY)
    cdef float* pX = _f(X)
    cdef float* pW = _f(W)
    cdef float* pR = _f(R)
    cdef float* pDX = _f(DX)
    cdef float* pDW = _f(DW)
    with nogil:
        rc = rn_rmsnorm_bwd(pDY, pX, pW, pR, pDX, pDW, C, S)
    if rc:
        raise MemoryError("rmsnorm_bwd: out of memory for an [S] scratch row")


cdef tuple _rope_buffers(x, out, int n_heads, int head_dim):
    """The checked [n_heads*head_dim, S] input and output both RoPE entry points take."""
    if n_heads <= 0 or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rope: n_heads must be > 0 and head_dim even and > 0, "
                         f"got n_heads={n_heads} head_dim={head_dim}")
    cdef cnp.ndarray X = _arr(x, "x", np.float32, (n_heads * head_dim, None))
    return X, _arr(out, "out", np.float32, (n_heads * head_dim, X.shape[1]), True)


def rope(x, out, int n_heads, int head_dim, double theta, bint inverse):
    """x, out [n_heads*head_dim, S]; inverse=True is the backward."""
    X, O = _rope_buffers(x, out, n_heads, head_dim)
    if not theta > 0:
        raise ValueError(f"rope: theta must be > 0, got {theta}")
    cdef int S = X.shape[1]
    cdef int rc
    cdef float* pX = _f(X)
    cdef float* pO = _f(O)
    with nogil:
        rc = rn_rope(pX, pO, n_heads, head_dim, S, theta, inverse)
    if rc:
        raise MemoryError("rope: out of memory for the cos/sin table")


def rope_freq(x, out, int n_heads, int head_dim, inv_freq, bint inverse):
    """``rope`` with the frequencies given: inv_freq float64 [head_dim/2] (rope scaling applied)."""
    X, O = _rope_buffers(x, out, n_heads, head_dim)
    cdef cnp.ndarray F = np.ascontiguousarray(inv_freq, dtype=np.float64)
    if F.ndim != 1 or F.shape[0] != head_dim // 2:
        raise ValueError(f"rope: inv_freq must be [head_dim/2={head_dim // 2}], got shape {np.shape(inv_freq)}")
    cdef const double* pF = <const double*> cnp.PyArray_DATA(F)
    cdef int S = X.shape[1]
    cdef int rc
    cdef float* pX = _f(X)
    cdef float* pO = _f(O)
    with nogil:
        rc = rn_rope_freq(pX, pO, n_heads, head_dim, S, pF, inverse)
    if rc:
        raise MemoryError("rope: out of memory for the cos/sin table")


def cross_entropy(logits, targets, dlogits, float grad_scale, int threads=1):
    """logits [V, S], targets int32 [S] -> mean loss (float); writes dlogits [V, S]. Positions
    are split over ``threads`` threads (the same result for any count)."""
    cdef cnp.ndarray L = _arr(logits, "logits", np.float32, (None, None))
    cdef int V = L.shape[0], S = L.shape[1]
    cdef cnp.ndarray T = _arr(targets, "targets", np.int32, (S,))
    cdef cnp.ndarray D = _arr(dlogits, "dlogits", np.float32, (V, S), True)
    _check_tokens(T, "targets", V, "the vocabulary size, logits.shape[0]")
    cdef double loss
    cdef float* pL = _f(L)
    cdef int32_t* pT = _i(T)
    cdef float* pD = _f(D)
    with nogil:
        loss = rn_cross_entropy(pL, pT, pD, V, S, grad_scale, threads)
    if loss != loss and S > 0:
        # NaN is also what non-finite logits give; tell the two apart for the message.
        if not np.isfinite(L).all():
            return float("nan")
        raise MemoryError("cross_entropy: out of memory for [S] scratch rows")
    return loss


def cross_entropy_weighted(logits, targets, weights, dlogits, float grad_scale, int threads=1):
    """logits [V, S], targets int32 [S], weights float32 [S] -> sum of weighted losses; writes
    dlogits [V, S] (column s scaled by grad_scale * weights[s])."""
    cdef cnp.ndarray L = _arr(logits, "logits", np.float32, (None, None))
    cdef int V = L.shape[0], S = L.shape[1]
    cdef cnp.ndarray T = _arr(targets, "targets", np.int32, (S,))
    cdef cnp.ndarray W = _arr(weights, "weights", np.float32, (S,))
    cdef cnp.ndarray D = _arr(dlogits, "dlogits", np.float32, (V, S), True)
    _check_tokens(T, "targets", V, "the vocabulary size, logits.shape[0]")
    cdef double loss
    cdef float* pL = _f(L)
    cdef int32_t* pT = _i(T)
    cdef float* pW = _f(W)
    cdef float* pD = _f(D)
    with nogil:
        loss = rn_cross_entropy_weighted(pL, pT, pW, pD, V, S, grad_scale, threads)
    if loss != loss and S > 0:
        if not np.isfinite(L).all():
            return float("nan")
        raise MemoryError("cross_entropy: out of memory for [S] scratch rows")
    return loss


def embedding_fwd(E, tokens, out):
    """E [V, D], tokens int32 [S] -> out [D, S] (written)."""
    cdef cnp.ndarray EM = _arr(E, "E", np.float32, (None, None))
    cdef int V = EM.shape[0], D = EM.shape[1]
    cdef cnp.ndarray T = _arr(tokens, "tokens", np.int32, (None,))
    cdef int S = T.shape[0]
    cdef cnp.ndarray O = _arr(out, "out", np.float32, (D, S), True)
    _check_tokens(T, "tokens", V, "the vocabulary size, E.shape[0]")
    cdef float* pEM = _f(EM)
    cdef int32_t* pT = _i(T)
    cdef float* pO = _f(O)
    with nogil:
        rn_embedding_fwd(pEM, pT, pO, D, S)


def embedding_bwd(dx, tokens, dE):
    """dx [D, S], tokens int32 [S]; accumulates into dE [V, D]."""
    cdef cnp.ndarray DE = _arr(dE, "dE", np.float32, (None, None), True)
    cdef int V = DE.shape[0], D = DE.shape[1]
    cdef cnp.ndarray T = _arr(tokens, "tokens", np.int32, (None,))
    cdef int S = T.shape[0]
    cdef cnp.ndarray DX = _arr(dx, "dx", np.float32, (D, S))
    _check_tokens(T, "tokens", V, "the vocabulary size, dE.shape[0]")
    cdef float* pDX = _f(DX)
    cdef int32_t* pT = _i(T)
    cdef float* pDE = _f(DE)
    with nogil:
        rn_embedding_bwd(pDX, pT, pDE, D, S)


def adamw_step(w, grad, m, v, float lr, float beta1, float beta2, float eps,
               float weight_decay, float grad_scale, long long step):
    """In-place AdamW on w, m, v (all the same shape as grad)."""
    if step < 1:
        raise ValueError(f"adamw_step: step is 1-based (bias correction), got {step}")
    cdef cnp.ndarray W = _arr(w, "w", np.float32, (None,) * np.ndim(w), True)
    shape = tuple(W.shape[i] for i in range(W.ndim))
    cdef cnp.ndarray G = _arr(grad, "grad", np.float32, shape)
    cdef cnp.ndarray M = _arr(m, "m", np.float32, shape, True)
    cdef cnp.ndarray VV = _arr(v, "v", np.float32, shape, True)
    cdef size_t n = W.size
    cdef float* pW = _f(W)
    cdef float* pG = _f(G)
    cdef float* pM = _f(M)
    cdef float* pVV = _f(VV)
    with nogil:
        rn_adamw_step(pW, pG, pM, pVV, n, lr, beta1, beta2, eps,
                      weight_decay, grad_scale, step)


def sumsq(x):
    """Sum of squares (float, computed in double); inf/NaN iff x holds inf/NaN."""
    cdef cnp.ndarray X = _arr(x, "x", np.float32, (None,) * np.ndim(x))
    cdef size_t n = X.size
    cdef double r
    cdef float* pX = _f(X)
    with nogil:
        r = rn_sumsq(pX, n)
    return r


def adamw_tensors(list ws, list grads, list ms, list vs, list weight_decays, float lr, float beta1,
                  float beta2, float eps, float grad_scale, long long step, bint zero_grad, int threads):
    """rn_adamw_step over many tensors at once, split over ``threads`` threads; with
    ``zero_grad`` every gradient is zeroed after it is read."""
    if step < 1:
        raise ValueError(f"adamw_tensors: step is 1-based (bias correction), got {step}")
    cdef Py_ssize_t count = len(ws), k
    if not (len(grads) == len(ms) == len(vs) == len(weight_decays) == count):
        raise ValueError(f"adamw_tensors: need as many grads, m, v and weight decays as weights "
                         f"({count}), got {len(grads)}, {len(ms)}, {len(vs)}, {len(weight_decays)}")
    if count > _INT_MAX:
        raise ValueError("adamw_tensors: too many tensors")
    cdef cnp.ndarray W, G, M, VV
    keep = []  # the validated arrays stay referenced while C holds their pointers
    cdef rn_adamw_tensor *ts = <rn_adamw_tensor*>malloc(max(count, 1) * sizeof(rn_adamw_tensor))
    if ts == NULL:
        raise MemoryError("adamw_tensors: out of memory")
    cdef rn_adamw_hyper h
    try:
        for k in range(count):
            W = _arr(ws[k], f"w[{k}]", np.float32, (None,) * np.ndim(ws[k]), True)
            shape = tuple(W.shape[i] for i in range(W.ndim))
            G = _arr(grads[k], f"grad[{k}]", np.float32, shape, zero_grad)
            M = _arr(ms[k], f"m[{k}]", np.float32, shape, True)
            VV = _arr(vs[k], f"v[{k}]", np.float32, shape, True)
            keep.append((W, G, M, VV))
            ts[k].w, ts[k].grad, ts[k].m, ts[k].v = _f(W), _f(G), _f(M), _f(VV)
            ts[k].n = W.size
            ts[k].weight_decay = weight_decays[k]
        h.lr, h.beta1, h.beta2, h.eps, h.grad_scale, h.t = lr, beta1, beta2, eps, grad_scale, step
        with nogil:
            rn_adamw_tensors(ts, <int>count, &h, zero_grad, threads)
    finally:
        free(ts)


def sumsq_tensors(list xs, int threads):
    """Σ over arrays of Σx² in double (fixed chunk order: the same value for any thread count)."""
    cdef Py_ssize_t count = len(xs), k
    cdef cnp.ndarray X
    keep = []
    cdef const float **ps = <const float**>malloc(max(count, 1) * sizeof(float*))
    cdef size_t *ns = <size_t*>malloc(max(count, 1) * sizeof(size_t))
    cdef double r
    try:
        if ps == NULL or ns == NULL:
            raise MemoryError("sumsq_tensors: out of memory")
        for k in range(count):
            X = _arr(xs[k], f"x[{k}]", np.float32, (None,) * np.ndim(xs[k]))
            keep.append(X)
            ps[k] = _f(X)
            ns[k] = X.size
        with nogil:
            r = rn_sumsq_tensors(ps, ns, <int>count, threads)
    finally:
        free(ps)
        free(ns)
    if r != r and count:
        if any(not np.isfinite(x).all() for x in keep):
            return float("nan")
        raise MemoryError("sumsq_tensors: out of memory for the chunk sums")
    return r


cdef Py_ssize_t _row_stride(object a, str name) except -1:
    """Row stride in elements of a 2-D fp32 array whose rows are contiguous."""
    if a.dtype != np.float32:
        raise TypeError(f"{name}: expected dtype float32, got {a.dtype.name}")
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D [rows, n] array, got shape {a.shape}")
    if a.strides[1] != 4 and a.shape[1] > 1:
        raise ValueError(f"{name}: rows must be contiguous (last-axis stride 4 bytes), got strides {a.strides}")
    if a.strides[0] % 4:
        raise ValueError(f"{name}: row stride {a.strides[0]} is not a whole number of floats")
    return a.strides[0] // 4


ctypedef void (*rows_fn)(const float *, Py_ssize_t, float *, Py_ssize_t, size_t, size_t) nogil


cdef _rows_op(rows_fn fn, x, out):
    if not isinstance(x, np.ndarray) or not isinstance(out, np.ndarray):
        raise TypeError("x and out must be numpy arrays")
    cdef Py_ssize_t xs = _row_stride(x, "x"), os_ = _row_stride(out, "out")
    cdef cnp.ndarray X = <cnp.ndarray>x
    cdef cnp.ndarray O = <cnp.ndarray>out
    if x.shape != out.shape:
        raise ValueError(f"out: expected shape {x.shape}, got {out.shape}")
    if not O.flags.writeable:
        raise ValueError("out: output array is read-only")
    cdef size_t rows = X.shape[0], n = X.shape[1]
    cdef const float* pX = <const float*>cnp.PyArray_DATA(X)
    cdef float* pO = _f(O)
    with nogil:
        fn(pX, xs, pO, os_, rows, n)


def sigmoid_rows(x, out):
    """out = sigmoid(x) on 2-D fp32 arrays [rows, n] with contiguous rows (out may be x)."""
    _rows_op(rn_sigmoid_f32, x, out)


def silu_rows(x, out):
    """out = x * sigmoid(x) on 2-D fp32 arrays [rows, n] with contiguous rows (out may be x)."""
    _rows_op(rn_silu_f32, x, out)


def softmax_rows(x, out):
    """Softmax of each row of 2-D fp32 arrays [rows, n] with contiguous rows (out may be x)."""
    _rows_op(rn_softmax_rows_f32, x, out)


# ---- fused fp16 row programs (csrc/sim_rows.h) ----------------------------------------------

#: opcodes of csrc/sim_rows.h, by the names rustane/mil/fuse_rows.py uses
ROW_OPS = {"load": 0, "store": 1, "add": 2, "sub": 3, "mul": 4, "real_div": 5, "reduce_sum": 6,
           "softmax": 7, "silu": 8, "sigmoid": 9}


cdef class RowProgram:
    """A row program (csrc/sim_rows.h) bound to its operand buffers, checked once here so that
    ``run(row0, row1)`` is a bare C call without the GIL.

    ``ops``: int32 [nops, 4] rows (op, dst, a, b). ``args``: one (root, width, col_stride,
    row_off) per operand: ``root`` a C-contiguous fp16/fp32 array that owns the memory,
    ``row_off`` int64 [rows] element offsets into it. ``widths``: n or 1 per register."""

    cdef rn_row_op *_ops
    cdef rn_row_arg *_args
    cdef int32_t *_widths
    cdef size_t nops, nargs, nregs
    cdef readonly size_t rows, n
    cdef object _keep

    def __cinit__(self, ops, args, widths, size_t rows, size_t n):
        self._ops = NULL
        self._args = NULL
        self._widths = NULL
        cdef cnp.ndarray O = _arr(ops, "ops", np.int32, (None, 4))
        cdef cnp.ndarray W = _arr(np.asarray(widths, dtype=np.int32), "widths", np.int32, (None,))
        self.nops, self.nargs, self.nregs = O.shape[0], len(args), W.shape[0]
        self.rows, self.n = rows, n
        self._ops = <rn_row_op *>malloc(sizeof(rn_row_op) * max(self.nops, 1))
        self._args = <rn_row_arg *>malloc(sizeof(rn_row_arg) * max(self.nargs, 1))
        self._widths = <int32_t *>malloc(sizeof(int32_t) * max(self.nregs, 1))
        if self._ops == NULL or self._args == NULL or self._widths == NULL:
            raise MemoryError("row program")
        keep = []
        cdef int32_t[:, :] ov = O
        cdef int32_t[:] wv = W
        cdef Py_ssize_t i
        for i in range(<Py_ssize_t>self.nregs):
            if wv[i] != 1 and <size_t>wv[i] != n:
                raise ValueError(f"widths[{i}] = {wv[i]}: a register holds n = {n} values or 1")
            self._widths[i] = wv[i]
        stored = set()
        for i in range(<Py_ssize_t>self.nargs):
            root, width, col_stride, row_off = args[i]
            if not isinstance(root, np.ndarray) or root.dtype not in (np.float16, np.float32):
                raise TypeError(f"args[{i}]: root must be an fp16 or fp32 numpy array")
            if not root.flags.c_contiguous:
                raise ValueError(f"args[{i}]: root must be C-contiguous (the array owning the memory)")
            if width != 1 and width != n:
                raise ValueError(f"args[{i}]: width {width} must be n = {n} or 1")
            R = _arr(row_off, f"args[{i}] row_off", np.int64, (rows,))
            if rows:
                span = (width - 1) * col_stride
                lo = int(R.min()) + min(0, span)
                hi = int(R.max()) + max(0, span)
                if lo < 0 or hi >= root.size:
                    raise ValueError(f"args[{i}]: offsets reach [{lo}, {hi}], outside the {root.size} elements of root")
            keep.append((root, R))
            self._args[i].base = cnp.PyArray_DATA(<cnp.ndarray>root)
            self._args[i].f16 = 1 if root.dtype == np.float16 else 0
            self._args[i].width = width
            self._args[i].col_stride = col_stride
            self._args[i].row_off = <const int64_t *>cnp.PyArray_DATA(R)
        for i in range(<Py_ssize_t>self.nops):
            op, dst, a, b = ov[i, 0], ov[i, 1], ov[i, 2], ov[i, 3]
            if op < 0 or op > 9:
                raise ValueError(f"ops[{i}]: unknown opcode {op}")
            if op == 0 or op == 1:
                if a < 0 or a >= <int32_t>self.nargs:
                    raise ValueError(f"ops[{i}]: operand {a} out of range")
                reg = dst if op == 0 else b
                if reg < 0 or reg >= <int32_t>self.nregs:
                    raise ValueError(f"ops[{i}]: register {reg} out of range")
                if self._args[a].width != self._widths[reg]:
                    raise ValueError(f"ops[{i}]: operand {a} has width {self._args[a].width}, register {reg} {self._widths[reg]}")
                if op == 1:
                    if not args[a][0].flags.writeable:
                        raise ValueError(f"ops[{i}]: operand {a} is read-only")
                    stored.add(a)
            else:
                for reg in (dst, a) + ((b,) if op <= 5 else ()):
                    if reg < 0 or reg >= <int32_t>self.nregs:
                        raise ValueError(f"ops[{i}]: register {reg} out of range")
                if op == 6 and self._widths[dst] != 1:
                    raise ValueError(f"ops[{i}]: a row sum writes a width-1 register")
                if op <= 5 and self._widths[dst] != max(self._widths[a], self._widths[b]):
                    raise ValueError(f"ops[{i}]: result register {dst} has the wrong width")
                if op >= 7 and self._widths[dst] != self._widths[a]:
                    raise ValueError(f"ops[{i}]: result register {dst} has the wrong width")
                if dst == a or (op <= 5 and dst == b):
                    raise ValueError(f"ops[{i}]: the result register must differ from the operands")
            self._ops[i].op, self._ops[i].dst, self._ops[i].a, self._ops[i].b = op, dst, a, b
        self._keep = keep

    def __dealloc__(self):
        free(self._ops)
        free(self._args)
        free(self._widths)

    def run(self, size_t row0=0, row1=None):
        """Run rows [row0, row1) (all rows by default); any split over threads gives the same bits."""
        cdef size_t r1 = self.rows if row1 is None else row1
        if r1 > self.rows or row0 > r1:
            raise ValueError(f"rows [{row0}, {r1}) outside [0, {self.rows})")
        cdef int rc
        with nogil:
            rc = rn_row_program(self._ops, self.nops, self._args, self._widths, self.nregs, row0, r1, self.n)
        if rc != 0:
            raise MemoryError("row program: no memory for its registers")


def pairwise_sum(x):
    """numpy's pairwise fp32 sum of a 1-D contiguous fp32 array (csrc/sim_rows.c; for tests)."""
    cdef cnp.ndarray X = _arr(x, "x", np.float32, (None,))
    cdef size_t n = X.shape[0]
    cdef const float *p = <const float *>cnp.PyArray_DATA(X)
    cdef float r
    with nogil:
        r = rn_pairwise_sum_f32(p, n)
    return np.float32(r)
