"""Op builders for the MIL interpreter (see ``interp.py`` for the plan/bind/run model).

Each builder receives an ``OpCompiler`` for one statement, reads its static arguments, infers
the result dtype and shape (raising ``MilPlanError`` with the statement's location on bad
arguments) and returns a ``Node`` whose ``make`` builds the run-time steps at bind time.

Semantics follow the coremltools MIL op definitions (docs/ane-runtime.md#ops): numpy broadcasting for
elementwise ops, ``matmul`` with numpy batch broadcasting and 1-D promotion, ``slice_by_size``
size −1 = to the end, ``slice_by_index`` begin/end/stride with begin/end/squeeze masks,
``reshape`` with −1 (inferred) and 0 (copy input dim), ``concat`` with ``interleave``, ``conv``
with pad_type valid/same/same_lower/custom, dilations and groups, ``quantize`` as
``clip(round_half_even(x / scale) + zero_point)`` and ``dequantize`` as
``scale · (q − zero_point)``.

Numerics: float ops compute in fp32 (``dtype=np.float32`` on the ufunc, or fp32 scratch for
composite ops) and write into the storage-dtype ``out`` array, so in fp16 mode each op's result
is rounded once (RNE) and in fp32 mode nothing is rounded.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Sequence

import numpy as np

from rustane.array_views import memory_root, rows_view

from . import ast as A
from .plan import F16, F32, MilPlanError, Node, ValueInfo, literal_value, storage_dtype
from .split import split_matmul

BUILDERS: dict[str, Callable[["OpCompiler"], Node | ValueInfo]] = {}
_REQUIRED = object()
FLOATS = ("fp16", "fp32", "fp64")
_ONE32 = np.float32(1.0)


def op(*names: str):
    def deco(fn):
        for n in names:
            BUILDERS[n] = fn
        return fn

    return deco


class OpCompiler:
    """Compile-time view of one statement: its arguments, their types and constant values."""

    def __init__(self, st: A.Statement, values: dict[str, ValueInfo], precision: str, blobs):
        self.st = st
        self.op = st.op
        self.values = values
        self.precision = precision
        self.blobs = blobs
        self.used: set[str] = set()  # argument names the builder read (others are typos)

    # -- errors ---------------------------------------------------------------------------
    def fail(self, msg: str, loc: A.Loc | None = None):
        raise MilPlanError(f"{self.op}: {msg}", loc or self.st.loc, self.st.name)

    # -- arguments ------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        self.used.add(name)
        return name in self.st.args

    def check_unused(self) -> None:
        extra = [a for a in self.st.args if a not in self.used]
        if extra:
            self.fail(
                f"unknown argument(s) {', '.join(extra)} (this op reads: {', '.join(sorted(self.used)) or 'none'})",
                getattr(self.st.args[extra[0]], "loc", None),
            )

    def _value(self, name: str, v) -> ValueInfo:
        if isinstance(v, A.Ref):
            info = self.values.get(v.name)
            if info is None:
                self.fail(f"argument {name}={v.name} uses a name that is not defined before it", v.loc)
            return info
        if isinstance(v, A.Literal):
            raw = literal_value(v, self.blobs, self.st)
            if isinstance(raw, str):
                return ValueInfo(f"<{name}>", A.STRING, (), None, const=raw, raw=raw)
            sto = storage_dtype(v.type.dtype, self.precision)
            c = np.array(raw, dtype=sto, copy=True)
            c.flags.writeable = False
            lit_name = f"{self.st.name}.{name}"
            info = ValueInfo(lit_name, v.type.dtype, tuple(v.type.shape), sto, const=c, raw=raw)
            self.values.setdefault(lit_name, info)
            return self.values[lit_name]
        self.fail(f"argument {name} must be a single value, got a tuple")

    def tensor(self, name: str, required: bool = True) -> ValueInfo | None:
        """A tensor operand (runtime or constant)."""
        self.used.add(name)
        v = self.st.args.get(name)
        if v is None:
            if required:
                self.fail(f"missing required argument {name!r}")
            return None
        info = self._value(name, v)
        if info.dtype == A.STRING:
            self.fail(f"argument {name} must be a tensor, got a string")
        return info

    def tensors(self, name: str) -> list[ValueInfo]:
        self.used.add(name)
        v = self.st.args.get(name)
        if v is None:
            self.fail(f"missing required argument {name!r}")
        items = v.items if isinstance(v, A.TupleValue) else (v,)
        out = [self._value(name, it) for it in items]
        for info in out:
            if info.dtype == A.STRING:
                self.fail(f"argument {name} must hold tensors, got a string")
        return out

    def static(self, name: str, default=_REQUIRED, attrs: bool = False):
        """A compile-time constant argument (numpy array in its MIL dtype, or str)."""
        src = self.st.attrs if attrs else self.st.args
        if not attrs:
            self.used.add(name)
        v = src.get(name)
        if v is None:
            if default is _REQUIRED:
                self.fail(f"missing required argument {name!r}")
            return default
        info = self._value(name, v)
        if info.raw is None:
            self.fail(f"argument {name}={info.name} must be a compile-time constant (a const), not a runtime tensor")
        return info.raw

    def static_int(self, name: str, default=_REQUIRED) -> int:
        v = self.static(name, default)
        if v is default and default is not _REQUIRED:
            return default
        a = np.asarray(v)
        if a.size != 1 or a.dtype.kind not in "iu":
            self.fail(f"argument {name} must be an integer scalar, got {a.dtype} of shape {a.shape}")
        return int(a.reshape(()))

    def static_float(self, name: str, default=_REQUIRED) -> float:
        v = self.static(name, default)
        if v is default and default is not _REQUIRED:
            return default
        a = np.asarray(v)
        if a.size != 1 or a.dtype.kind not in "fiu":
            self.fail(f"argument {name} must be a numeric scalar, got {a.dtype} of shape {a.shape}")
        return float(a.reshape(()))

    def static_bool(self, name: str, default=_REQUIRED) -> bool:
        v = self.static(name, default)
        if v is default and default is not _REQUIRED:
            return default
        a = np.asarray(v)
        if a.size != 1 or a.dtype.kind != "b":
            self.fail(f"argument {name} must be a bool scalar, got {a.dtype} of shape {a.shape}")
        return bool(a.reshape(()))

    def static_ints(self, name: str, default=_REQUIRED) -> list[int] | None:
        v = self.static(name, default)
        if v is default and default is not _REQUIRED:
            return default
        a = np.asarray(v)
        if a.ndim > 1 or a.dtype.kind not in "iu":
            self.fail(f"argument {name} must be a 1-D int tensor, got {a.dtype} of shape {a.shape}")
        return [int(x) for x in a.reshape(-1)]

    def static_bools(self, name: str, default=_REQUIRED) -> list[bool] | None:
        v = self.static(name, default)
        if v is default and default is not _REQUIRED:
            return default
        a = np.asarray(v)
        if a.ndim > 1 or a.dtype.kind != "b":
            self.fail(f"argument {name} must be a 1-D bool tensor, got {a.dtype} of shape {a.shape}")
        return [bool(x) for x in a.reshape(-1)]

    def static_str(self, name: str, default=_REQUIRED) -> str:
        v = self.static(name, default)
        if v is default and default is not _REQUIRED:
            return default
        if not isinstance(v, str):
            self.fail(f"argument {name} must be a string")
        return v

    # -- helpers --------------------------------------------------------------------------
    def axis(self, axis: int, rank: int, what: str = "axis") -> int:
        if not -rank <= axis < rank:
            self.fail(f"{what} {axis} is out of range for rank {rank}")
        return axis % rank

    def need_float(self, *infos: ValueInfo):
        for i in infos:
            if i.dtype not in FLOATS:
                self.fail(f"operand {i.name} must be fp16/fp32, got {i.dtype}")

    def same_dtype(self, *infos: ValueInfo):
        ds = {i.dtype for i in infos}
        if len(ds) > 1:
            self.fail(
                "operands must share one dtype, got "
                + ", ".join(f"{i.name}: {i.dtype}" for i in infos)
                + " (insert a cast)"
            )

    def node(self, inputs: Sequence[ValueInfo], dtype: str, shape, make, kind: str = "compute") -> Node:
        return Node(self.st.name, self.op, tuple(i.name for i in inputs), dtype, tuple(int(s) for s in shape), kind, make)

    def broadcast(self, *infos: ValueInfo) -> tuple[int, ...]:
        try:
            return tuple(np.broadcast_shapes(*(i.shape for i in infos)))
        except ValueError:
            self.fail("shapes do not broadcast: " + ", ".join(f"{i.name} {list(i.shape)}" for i in infos))


def _cdt(out: np.ndarray):
    """The loop dtype: fp32 for float results (fp16 rounding happens on the write to out)."""
    return F32 if out.dtype.kind == "f" and out.dtype.itemsize <= 4 else out.dtype


def _extension(name: str):
    """``rustane.<name>`` (a module backed by the compiled extensions), or None in a source tree
    without them: the interpreter then runs numpy only."""
    import importlib

    try:
        return importlib.import_module(f"rustane.{name}")
    except ImportError:
        return None


def _native_cast(src: np.ndarray, dst: np.ndarray) -> Callable | None:
    """rustane.native's fp16<->fp32 conversion (F16C/NEON, bit-exact with numpy's casts apart
    from NaN payloads) from ``src`` into ``dst`` when both are C-contiguous and the dtypes are
    fp16/fp32 in either direction; None otherwise. numpy's own half casts ran at 1.2-1.8 GB/s,
    the native ones at 15-19 GB/s: in fp16 mode, where every op widens its inputs and rounds
    its result, they were most of the simulator's time."""
    if not (src.flags.c_contiguous and dst.flags.c_contiguous and src.shape == dst.shape):
        return None
    native = _extension("native")
    if native is None:
        return None

    if src.dtype == F16 and dst.dtype == F32:
        return partial(native.f16_to_f32, src, dst)
    if src.dtype == F32 and dst.dtype == F16:
        return partial(native.f32_to_f16, src, dst)
    return None


def _f16_window(a: np.ndarray):
    """``a`` (fp16) as a window of the 2-D array its memory belongs to: ``(root2d, row0, rows,
    col0, cols)`` such that ``a`` holds rows ``[row0, row0+rows)`` x columns ``[col0, col0+cols)``
    of ``root2d`` (in order), or None. Slices of a wider buffer along its last axis (a kernel's
    weights inside its input tensor) are such windows; transposes are not."""
    if a.ndim == 0 or a.size == 0:
        return None
    v = rows_view(a)
    if v is None:
        return None
    cols = v.shape[1]
    root = memory_root(a)
    ld = v.strides[0] // 2 if v.shape[0] > 1 else cols
    if root.dtype != F16 or not root.flags.c_contiguous or ld < cols or v.strides[0] % 2 or root.size % ld:
        return None
    off = (v.__array_interface__["data"][0] - root.__array_interface__["data"][0]) // 2
    row0, col0 = divmod(off, ld)
    root2d = root.reshape(-1, ld)
    if col0 + cols > ld or row0 + v.shape[0] > root2d.shape[0]:
        return None
    return root2d, row0, v.shape[0], col0, cols


def _cast_step(src: np.ndarray, dst: np.ndarray) -> Callable:
    """A step writing ``src`` into ``dst`` with a dtype change (fp32 results rounded into fp16
    outputs, fp16 inputs widened into fp32 scratch): native where possible, else numpy."""
    fast = _native_cast(src, dst)
    if fast is None and src.dtype == F16 and dst.dtype == F32 and dst.flags.c_contiguous:
        win = _f16_window(src)  # a strided slice: the native 2-D reader (staging's unstage)
        native = _extension("native")
        if win is not None and native is not None:
            root2d, row0, rows, col0, cols = win
            fast = partial(native.unstage, root2d, row0, rows, col0, cols, out=dst.reshape(rows, cols))
    return fast or partial(np.copyto, dst, src, casting="unsafe")


def whole_buffer_permutation(a: np.ndarray) -> np.ndarray | None:
    """The fp16 buffer ``a`` is a non-contiguous permutation of (all of it, from its first
    element), or None. ``_f32`` widens such an input into a strided fp32 view, which the native
    row functions cannot take (the fusion pass asks the same question)."""
    if a.dtype != F16 or a.flags.c_contiguous:
        return None
    root = memory_root(a)
    if (root.dtype == F16 and root.flags.c_contiguous and root.size == a.size
            and root.__array_interface__["data"][0] == a.__array_interface__["data"][0]):
        return root
    return None


def _f32(a: np.ndarray, bctx, i: int) -> tuple[np.ndarray, Callable | None]:
    """An fp32 version of input ``i``: the array itself, a one-off converted constant, or a
    scratch buffer plus the step that refreshes it each run."""
    if a.dtype == F32:
        return a, None
    if bctx.consts[i]:
        return a.astype(F32), None
    root = whole_buffer_permutation(a)
    if root is not None:
        # a transpose of a whole buffer: widen the buffer in memory order (natively) and
        # view the fp32 copy with the same permutation (BLAS takes it transposed for free)
        s = bctx.scratch(root.shape, F32)
        view = np.lib.stride_tricks.as_strided(s, a.shape, tuple(2 * st for st in a.strides))
        return view, _cast_step(root, s)
    s = bctx.scratch(a.shape, F32)
    return s, _cast_step(a, s)


def _fp32_then_round(ins, out, bctx, compute: Callable) -> list:
    """Steps for an op that numpy could run with ``dtype=float32`` on fp16 operands, but whose
    internal half casts are slow: widen the inputs into fp32 scratch, ``compute(ins32, acc)``
    into fp32, round into ``out`` once. Same numbers: widening is exact and the single rounding
    is the one numpy's cast would do."""
    steps, ins32 = [], []
    for i, a in enumerate(ins):
        a32, refresh = _f32(a, bctx, i) if a.dtype == F16 else (a, None)
        if refresh:
            steps.append(refresh)
        ins32.append(a32)
    acc = bctx.scratch(out.shape, F32)
    steps.append(compute(ins32, acc))
    steps.append(_cast_step(acc, out))
    return steps


# ---------------------------------------------------------------------------------------
# elementwise


_BINARY = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.true_divide,
    "pow": np.power,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "floor_div": np.floor_divide,
    "mod": np.mod,
}
_COMPARE = {
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "equal": np.equal,
    "not_equal": np.not_equal,
}
_LOGICAL = {"logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor}


@op(*_BINARY)
def _binary(c: OpCompiler):
    x, y = c.tensor("x"), c.tensor("y")
    c.same_dtype(x, y)
    if x.dtype in ("bool", A.STRING):
        c.fail(f"operands must be numeric, got {x.dtype}")
    shape = c.broadcast(x, y)
    uf = _BINARY[c.op]

    def make(ins, out, bctx):
        if out.dtype == F16:
            return _fp32_then_round(ins, out, bctx, lambda a, acc: partial(uf, a[0], a[1], out=acc))
        return partial(uf, ins[0], ins[1], out=out, dtype=_cdt(out))

    return c.node([x, y], x.dtype, shape, make)


@op(*_COMPARE)
def _compare(c: OpCompiler):
    x, y = c.tensor("x"), c.tensor("y")
    c.same_dtype(x, y)
    shape = c.broadcast(x, y)
    uf = _COMPARE[c.op]

    def make(ins, out, bctx):
        return partial(uf, ins[0], ins[1], out=out)

    return c.node([x, y], "bool", shape, make)


@op(*_LOGICAL)
def _logical(c: OpCompiler):
    x, y = c.tensor("x"), c.tensor("y")
    if x.dtype != "bool" or y.dtype != "bool":
        c.fail("operands must be bool")
    uf = _LOGICAL[c.op]
    return c.node([x, y], "bool", c.broadcast(x, y), lambda ins, out, b: partial(uf, ins[0], ins[1], out=out))


@op("logical_not")
def _logical_not(c: OpCompiler):
    x = c.tensor("x")
    if x.dtype != "bool":
        c.fail("operand must be bool")
    return c.node([x], "bool", x.shape, lambda ins, out, b: partial(np.logical_not, ins[0], out=out))


_UNARY = {
    "exp": np.exp,
    "exp2": np.exp2,
    "sqrt": np.sqrt,
    "tanh": np.tanh,
    "abs": np.abs,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "floor": np.floor,
    "ceil": np.ceil,
    "sign": np.sign,
    "square": np.square,
    "atan": np.arctan,
    "asin": np.arcsin,
    "acos": np.arccos,
    "sinh": np.sinh,
    "cosh": np.cosh,
}


@op(*_UNARY)
def _unary(c: OpCompiler):
    x = c.tensor("x")
    c.need_float(x)
    uf = _UNARY[c.op]
    def make(ins, out, bctx):
        if out.dtype == F16:
            return _fp32_then_round(ins, out, bctx, lambda a, acc: partial(uf, a[0], out=acc))
        return partial(uf, ins[0], out=out, dtype=_cdt(out))

    return c.node([x], x.dtype, x.shape, make)


def _native_rows(name: str, x32: np.ndarray, o32: np.ndarray) -> Callable | None:
    """The one-pass C version (``rustane.cpu_ops``) of a composite fp32 op over the last axis,
    bound to row views of ``x32``/``o32``, or None when their layout has no such view (then the
    numpy composition runs). numpy spells sigmoid and softmax as 4-6 passes with temporaries:
    they were a fifth of the simulator's fp32 training step."""
    cpu = _extension("_cpu")
    if cpu is None or x32.dtype != F32 or o32.dtype != F32:
        return None
    xv, ov = rows_view(x32), rows_view(o32)
    if xv is None or ov is None or xv.shape != ov.shape:
        return None
    return partial(getattr(cpu, name), xv, ov)


def _fp32_unary(c: OpCompiler, f32fn: Callable[[np.ndarray, np.ndarray], None], dtype: str | None = None,
                native: str | None = None):
    """A composite unary op: ``f32fn(x32, o32)`` computes in fp32 scratch ``o32`` (may clobber
    x32 only if it is scratch), then one rounding copy into out when storage is not fp32.
    ``native`` names the ``rustane._cpu`` row function used instead where the layout allows."""
    x = c.tensor("x")
    c.need_float(x)

    def make(ins, out, bctx):
        x32, refresh = _f32(ins[0], bctx, 0)
        o32 = out if out.dtype == F32 else bctx.scratch(out.shape, F32)
        steps = [refresh] if refresh else []
        fast = _native_rows(native, x32, o32) if native else None
        steps.append(fast or partial(f32fn, x32, o32))
        if o32 is not out:
            steps.append(_cast_step(o32, out))
        return steps

    node = c.node([x], dtype or x.dtype, x.shape, make)
    if native:
        node.meta = {"rows_fn": native}
    return node


def _sigmoid32_terms(x):
    """Numerator and denominator of the stable fp32 sigmoid, fresh arrays (so callers may write
    over x): with e = exp(-|x|) <= 1 (no overflow), sigmoid = 1/(1+e) where x >= 0, else
    e/(1+e). The numerator is max(e, x >= 0): 1 where x >= 0 (e <= 1), else e (also where
    e = 0 or NaN) -- the same bits as np.where(x >= 0, 1, e), whose scalar branch took 0.8 of
    1.3 ms at [1,768,1,256] (a masked copyto is as slow)."""
    pos = np.greater_equal(x, 0)
    num = np.abs(x)
    np.negative(num, out=num)
    np.exp(num, out=num)
    den = np.add(num, _ONE32)
    np.maximum(num, pos, out=num)
    return num, den


def _sigmoid32_exact(x, o):
    # o may be x: every read of x happens in _sigmoid32_terms, before o is written.
    num, den = _sigmoid32_terms(x)
    np.divide(num, den, out=o)


def _silu32(x, o):
    num, den = _sigmoid32_terms(x)
    np.divide(num, den, out=num)
    np.multiply(num, x, out=o)  # o may be x: x is read here for the last time


def _relu32(x, o):
    np.maximum(x, 0.0, out=o)


def erf32(x: np.ndarray) -> np.ndarray:
    """erf in float64 via Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), returned as float64.

    numpy has no erf; this keeps scipy optional. The error is below one fp32 ulp of 1.
    """
    x = np.asarray(x, dtype=np.float64)
    s = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1.0 - poly * np.exp(-a * a))


@op("sigmoid")
def _sigmoid(c):
    return _fp32_unary(c, _sigmoid32_exact, native="sigmoid_rows")


@op("silu")
def _silu(c):
    return _fp32_unary(c, _silu32, native="silu_rows")


@op("relu")
def _relu(c):
    x = c.tensor("x")
    c.need_float(x)
    return c.node([x], x.dtype, x.shape, lambda ins, out, b: partial(np.maximum, ins[0], 0.0, out=out, dtype=_cdt(out)))


@op("erf")
def _erf(c):
    return _fp32_unary(c, lambda x, o: np.copyto(o, erf32(x), casting="unsafe"))


@op("gelu")
def _gelu(c):
    mode = c.static_str("mode", "EXACT")
    if mode == "EXACT":
        def f(x, o):
            x64 = x.astype(np.float64)
            np.copyto(o, 0.5 * x64 * (1.0 + erf32(x64 / math.sqrt(2.0))), casting="unsafe")
    elif mode == "TANH_APPROXIMATION":
        k = math.sqrt(2.0 / math.pi)

        def f(x, o):
            inner = np.float32(k) * (x + np.float32(0.044715) * x * x * x)
            np.multiply(np.float32(0.5) * x, np.float32(1.0) + np.tanh(inner), out=o)
    elif mode == "SIGMOID_APPROXIMATION":
        def f(x, o):
            _sigmoid32_exact(np.float32(1.702) * x, o)
            np.multiply(o, x, out=o)
    else:
        c.fail(f"unknown gelu mode {mode!r}: use EXACT, TANH_APPROXIMATION or SIGMOID_APPROXIMATION")
    return _fp32_unary(c, f)


@op("rsqrt", "inverse", "log")
def _eps_unary(c):
    defaults = {"rsqrt": 1e-12, "inverse": 1e-4, "log": 1e-45}
    eps = np.float32(c.static_float("epsilon", defaults[c.op]))
    if c.op == "rsqrt":
        def f(x, o):
            np.add(x, eps, out=o)
            np.sqrt(o, out=o)
            np.divide(1.0, o, out=o)
    elif c.op == "inverse":
        def f(x, o):
            np.add(x, eps, out=o)
            np.divide(1.0, o, out=o)
    else:
        def f(x, o):
            np.add(x, eps, out=o)
            np.log(o, out=o)
    return _fp32_unary(c, f)


@op("clip")
def _clip(c):
    lo, hi = np.float32(c.static_float("alpha")), np.float32(c.static_float("beta"))

    def f(x, o):
        np.maximum(x, lo, out=o)
        np.minimum(o, hi, out=o)

    return _fp32_unary(c, f)


@op("leaky_relu")
def _leaky(c):
    alpha = np.float32(c.static_float("alpha", 0.01))

    def f(x, o):
        np.multiply(x, alpha, out=o)
        np.copyto(o, x, where=x >= 0)

    return _fp32_unary(c, f)


@op("softplus")
def _softplus(c):
    def f(x, o):
        np.logaddexp(np.float32(0.0), x, out=o)

    return _fp32_unary(c, f)


@op("select")
def _select(c):
    cond, a, b = c.tensor("cond"), c.tensor("a"), c.tensor("b")
    c.same_dtype(a, b)
    shape = c.broadcast(cond, a, b)

    def make(ins, out, bctx):
        cnd, x, y = ins
        cb = cnd if cnd.dtype == np.bool_ else None

        def step(_o=out, _c=cnd, _x=x, _y=y, _cb=cb):
            mask = _c.astype(bool) if _cb is None else _cb
            np.copyto(_o, _y, casting="unsafe")
            np.copyto(_o, _x, casting="unsafe", where=mask)

        return step

    return c.node([cond, a, b], a.dtype, shape, make)


@op("cast")
def _cast(c):
    x = c.tensor("x")
    to = c.static_str("dtype")
    if to not in A.DTYPES:
        c.fail(f"unknown dtype {to!r} (use one of {', '.join(A.DTYPES)})")

    def make(ins, out, bctx):
        return partial(np.copyto, out, ins[0], casting="unsafe")

    return c.node([x], to, x.shape, make)


# ---------------------------------------------------------------------------------------
# reductions and softmax


def _axes(c: OpCompiler, rank: int, name: str = "axes") -> tuple[int, ...]:
    axes = c.static_ints(name, None)
    if axes is None:
        return tuple(range(rank))
    out = tuple(sorted({c.axis(a, rank, name) for a in axes}))
    if len(out) != len(axes):
        c.fail(f"{name} {axes} repeats an axis")
    return out


def _reduced_shape(shape, axes, keep):
    if keep:
        return tuple(1 if i in axes else s for i, s in enumerate(shape))
    return tuple(s for i, s in enumerate(shape) if i not in axes)


@op("reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_prod", "reduce_sum_square")
def _reduce(c: OpCompiler):
    x = c.tensor("x")
    if x.dtype in ("bool", A.STRING):
        c.fail(f"cannot reduce {x.dtype}")
    axes = _axes(c, len(x.shape))
    keep = c.static_bool("keep_dims", False)
    shape = _reduced_shape(x.shape, axes, keep)
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    kind = c.op

    def make(ins, out, bctx):
        a = ins[0]
        dt = _cdt(out)
        if kind == "reduce_max":
            return partial(np.maximum.reduce, a, axis=axes, keepdims=keep, out=out)
        if kind == "reduce_min":
            return partial(np.minimum.reduce, a, axis=axes, keepdims=keep, out=out)
        acc = out if out.dtype == dt else bctx.scratch(out.shape, dt)
        if kind in ("reduce_sum", "reduce_prod"):
            # numpy accumulates a multi-axis (or buffered) reduction in `out` itself, so an
            # fp16 out would round after each axis: reduce into fp32 and round once.
            uf = np.add if kind == "reduce_sum" else np.multiply
            steps = [partial(uf.reduce, a, axis=axes, keepdims=keep, dtype=dt, out=acc)]
            if acc is not out:
                steps.append(_cast_step(acc, out))
            return steps
        steps = []
        if kind == "reduce_sum_square":
            sq = bctx.scratch(a.shape, dt)
            steps.append(partial(np.multiply, a, a, out=sq, dtype=dt))
            steps.append(partial(np.add.reduce, sq, axis=axes, keepdims=keep, out=acc))
            if acc is not out:
                steps.append(_cast_step(acc, out))
        else:  # mean: sum in fp32, divide, round once
            steps.append(partial(np.add.reduce, a, axis=axes, keepdims=keep, dtype=dt, out=acc))
            steps.append(partial(np.true_divide, acc, dt.type(count), out=out, dtype=dt))
        return steps

    node = c.node([x], x.dtype, shape, make)
    node.meta = {"axes": axes, "keep": keep}
    return node


@op("softmax")
def _softmax(c: OpCompiler):
    x = c.tensor("x")
    c.need_float(x)
    ax = c.axis(c.static_int("axis", -1), len(x.shape))
    red = _reduced_shape(x.shape, (ax,), True)

    def make(ins, out, bctx):
        a = ins[0]
        s = out if out.dtype == F32 else bctx.scratch(out.shape, F32)
        if ax == len(x.shape) - 1:
            a32, refresh = _f32(a, bctx, 0)
            fast = _native_rows("softmax_rows", a32, s)
            if fast is not None:
                steps = ([refresh] if refresh else []) + [fast]
                if s is not out:
                    steps.append(_cast_step(s, out))
                return steps
        m = bctx.scratch(red, F32)

        def step(_a=a, _s=s, _m=m, _o=out, _ax=ax):
            np.copyto(_s, _a, casting="unsafe")
            np.maximum.reduce(_s, axis=_ax, keepdims=True, out=_m)
            np.subtract(_s, _m, out=_s)
            np.exp(_s, out=_s)
            np.add.reduce(_s, axis=_ax, keepdims=True, out=_m)
            np.true_divide(_s, _m, out=_o, dtype=F32)

        return step

    node = c.node([x], x.dtype, x.shape, make)
    node.meta = {"axis": ax}
    return node


# ---------------------------------------------------------------------------------------
# matmul, linear, conv


def _matmul_shape(c: OpCompiler, xs, ys, tx, ty):
    xs, ys = list(xs), list(ys)
    if not xs or not ys:
        c.fail("operands must have rank >= 1")
    if tx and len(xs) >= 2:
        xs[-1], xs[-2] = xs[-2], xs[-1]
    if ty and len(ys) >= 2:
        ys[-1], ys[-2] = ys[-2], ys[-1]
    x1, y1 = len(xs) == 1, len(ys) == 1
    if x1:
        xs = [1] + xs
    if y1:
        ys = ys + [1]
    if xs[-1] != ys[-2]:
        c.fail(
            f"inner dimensions differ: x{' (transposed)' if tx else ''} is {xs} and "
            f"y{' (transposed)' if ty else ''} is {ys} ({xs[-1]} != {ys[-2]})"
        )
    try:
        batch = list(np.broadcast_shapes(tuple(xs[:-2]), tuple(ys[:-2])))
    except ValueError:
        c.fail(f"batch dimensions {xs[:-2]} and {ys[:-2]} do not broadcast")
    out = batch + [xs[-2], ys[-1]]
    if y1:
        out.pop(-1)
    if x1:
        out.pop(-2 if not y1 else -1)
    return tuple(out)


def _t(a: np.ndarray, flag: bool) -> np.ndarray:
    return a.swapaxes(-1, -2) if flag and a.ndim >= 2 else a


@op("matmul")
def _matmul(c: OpCompiler):
    x, y = c.tensor("x"), c.tensor("y")
    c.same_dtype(x, y)
    tx, ty = c.static_bool("transpose_x", False), c.static_bool("transpose_y", False)
    shape = _matmul_shape(c, x.shape, y.shape, tx, ty)

    def make(ins, out, bctx):
        steps = []
        ops_ = []
        for i, a in enumerate(ins):
            if a.dtype.kind == "f":
                a32, refresh = _f32(a, bctx, i)
                if refresh:
                    steps.append(refresh)
                ops_.append(a32)
            else:
                ops_.append(a)
        xa, ya = _t(ops_[0], tx), _t(ops_[1], ty)
        if out.dtype.kind != "f" or out.dtype == F32:
            steps.append(split_matmul(bctx.splitter, xa, ya, out))
        else:
            acc = bctx.scratch(out.shape, F32)
            steps.append(split_matmul(bctx.splitter, xa, ya, acc))
            steps.append(_cast_step(acc, out))
        return steps

    return c.node([x, y], x.dtype, shape, make)


@op("linear")
def _linear(c: OpCompiler):
    x, w = c.tensor("x"), c.tensor("weight")
    b = c.tensor("bias", required=False)
    c.same_dtype(x, w, *([b] if b else []))
    if len(w.shape) != 2 or x.shape[-1] != w.shape[1]:
        c.fail(f"weight must be [out, {x.shape[-1]}], got {list(w.shape)}")
    shape = tuple(x.shape[:-1]) + (w.shape[0],)
    ins_info = [x, w] + ([b] if b else [])

    def make(ins, out, bctx):
        steps = []
        f = []
        for i, a in enumerate(ins):
            a32, refresh = _f32(a, bctx, i)
            if refresh:
                steps.append(refresh)
            f.append(a32)
        acc = out if out.dtype == F32 else bctx.scratch(out.shape, F32)
        steps.append(split_matmul(bctx.splitter, f[0], f[1].T, acc))
        if len(f) == 3:
            steps.append(partial(np.add, acc, f[2], out=acc))
        if acc is not out:
            steps.append(_cast_step(acc, out))
        return steps

    return c.node(ins_info, x.dtype, shape, make)


def conv_padding(in_sp, k_sp, strides, dilations, pad_type, pad):
    """Per spatial dim (before, after) padding for MIL conv pad types."""
    res = []
    for i, (n, k, s, d) in enumerate(zip(in_sp, k_sp, strides, dilations)):
        ek = (k - 1) * d + 1
        if pad_type == "valid":
            res.append((0, 0))
        elif pad_type == "custom":
            res.append((pad[2 * i], pad[2 * i + 1]))
        else:  # same / same_lower: output = ceil(n / s)
            o = -(-n // s)
            total = max((o - 1) * s + ek - n, 0)
            small = total // 2
            res.append((small, total - small) if pad_type == "same" else (total - small, small))
    return res


@op("conv")
def _conv(c: OpCompiler):
    x, w = c.tensor("x"), c.tensor("weight")
    b = c.tensor("bias", required=False)
    c.same_dtype(x, w, *([b] if b else []))
    c.need_float(x)
    nsp = len(x.shape) - 2
    if nsp < 1 or nsp > 3:
        c.fail(f"x must be [N, C_in, *spatial] with 1-3 spatial dims, got {list(x.shape)}")
    if len(w.shape) != nsp + 2:
        c.fail(f"weight must be [C_out, C_in/groups, *kernel] (rank {nsp + 2}), got {list(w.shape)}")
    groups = c.static_int("groups", 1)
    strides = c.static_ints("strides", [1] * nsp)
    dil = c.static_ints("dilations", [1] * nsp)
    pad_type = c.static_str("pad_type", "valid")
    pad = c.static_ints("pad", [0] * (2 * nsp))
    if pad_type not in ("valid", "same", "same_lower", "custom"):
        c.fail(f"pad_type {pad_type!r} is not one of valid, same, same_lower, custom")
    if len(strides) != nsp or len(dil) != nsp or len(pad) != 2 * nsp:
        c.fail(f"strides/dilations need {nsp} values and pad {2 * nsp} for {nsp} spatial dims")
    if pad_type != "custom" and any(pad):
        c.fail("pad is only allowed with pad_type=\"custom\"")
    if min(strides + dil) < 1 or groups < 1:
        c.fail("strides, dilations and groups must be >= 1")
    n, cin = x.shape[:2]
    cout, cin_g = w.shape[:2]
    ksp = w.shape[2:]
    if cin % groups or cout % groups or cin // groups != cin_g:
        c.fail(f"groups={groups}: C_in={cin} and C_out={cout} must divide by groups and weight dim 1 "
               f"must be C_in/groups={cin // groups if groups else '?'}, got {cin_g}")
    if b is not None and tuple(b.shape) != (cout,):
        c.fail(f"bias must be [{cout}], got {list(b.shape)}")
    pads = conv_padding(x.shape[2:], ksp, strides, dil, pad_type, pad)
    osp = []
    for nn, k, s, d, (pb, pa) in zip(x.shape[2:], ksp, strides, dil, pads):
        ek = (k - 1) * d + 1
        o = (nn + pb + pa - ek) // s + 1
        if o < 1:
            c.fail(f"kernel extent {ek} exceeds padded input {nn + pb + pa}")
        osp.append(o)
    shape = (n, cout) + tuple(osp)
    ins_info = [x, w] + ([b] if b else [])
    pointwise = all(k == 1 for k in ksp) and all(s == 1 for s in strides) and not any(p for pr in pads for p in pr)

    def make(ins, out, bctx):
        steps = []
        xa = ins[0]
        G, cog = groups, cout // groups
        kt = int(np.prod(ksp))
        # weight as [G, C_in/G * K, C_out/G] fp32 (converted once when constant)
        wa = ins[1]
        w32, wref = _f32(wa, bctx, 1)
        if wref:
            steps.append(wref)
        wmat = w32.reshape(G, cog, cin_g * kt).transpose(0, 2, 1)
        if bctx.consts[1]:
            wmat = np.ascontiguousarray(wmat)
        acc = out if out.dtype == F32 else bctx.scratch(out.shape, F32)
        p = int(np.prod(osp))
        acc_g = acc.reshape(n, G, cog, p)
        bias32 = None
        if len(ins) == 3:
            bias32, bref = _f32(ins[2], bctx, 2)
            if bref:
                steps.append(bref)
            bias32 = bias32.reshape((1, cout) + (1,) * nsp)
        if pointwise:
            x32, xref = _f32(xa, bctx, 0)
            if xref:
                steps.append(xref)
            xg = x32.reshape(n, G, cin_g, p)
            # [G, C_out/G, C_in/G] @ [N, G, C_in/G, P] -> [N, G, C_out/G, P]
            wt = np.ascontiguousarray(wmat.transpose(0, 2, 1)) if bctx.consts[1] else wmat.transpose(0, 2, 1)
            steps.append(partial(np.matmul, wt, xg, out=acc_g))
        else:
            padded_shape = (n, cin) + tuple(nn + pb + pa for nn, (pb, pa) in zip(x.shape[2:], pads))
            xp = bctx.scratch(padded_shape, F32)
            xp.fill(0)
            inner = (slice(None), slice(None)) + tuple(slice(pb, pb + nn) for nn, (pb, _) in zip(x.shape[2:], pads))
            xin = xp[inner]
            steps.append(partial(np.copyto, xin, xa, casting="unsafe"))
            ext = tuple((k - 1) * d + 1 for k, d in zip(ksp, dil))
            win = np.lib.stride_tricks.sliding_window_view(xp, ext, axis=tuple(range(2, 2 + nsp)))
            sel = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) + tuple(
                slice(None, None, d) for d in dil
            )
            win = win[sel]  # [N, C_in, *out_sp, *K] (a strided view of xp)
            cols = bctx.scratch((n, G, p, cin_g * kt), F32)
            # cols[n, g, p, c*K + k] = win[n, g*cin_g + c, p..., k...]
            cols_view = cols.reshape((n, G) + tuple(osp) + (cin_g,) + tuple(ksp))
            win_g = np.moveaxis(win.reshape((n, G, cin_g) + tuple(osp) + tuple(ksp)), 2, 2 + nsp)
            steps.append(partial(np.copyto, cols_view, win_g))
            res = bctx.scratch((n, G, p, cog), F32)
            steps.append(partial(np.matmul, cols, wmat, out=res))
            steps.append(partial(np.copyto, acc_g, res.transpose(0, 1, 3, 2)))
        if bias32 is not None:
            steps.append(partial(np.add, acc, bias32, out=acc))
        if acc is not out:
            steps.append(_cast_step(acc, out))
        return steps

    return c.node(ins_info, x.dtype, shape, make)


# ---------------------------------------------------------------------------------------
# shape ops (views at bind time) and data movement


@op("reshape")
def _reshape(c: OpCompiler):
    x = c.tensor("x")
    target = c.static_ints("shape")
    src = list(x.shape)
    shp = list(target)
    if shp.count(-1) > 1:
        c.fail(f"shape {target} has more than one -1")
    if 0 in shp:
        if len(shp) != len(src):
            c.fail(f"shape {target} uses 0 (copy input dim) but its rank differs from x {src}")
        shp = [src[i] if s == 0 else s for i, s in enumerate(shp)]
    total = int(np.prod(src, dtype=np.int64))
    if -1 in shp:
        rest = int(np.prod([s for s in shp if s != -1], dtype=np.int64))
        if rest == 0 or total % rest:
            c.fail(f"cannot infer -1 in shape {target} for x {src} ({total} elements)")
        shp[shp.index(-1)] = total // rest
    if any(s < 0 for s in shp) or int(np.prod(shp, dtype=np.int64)) != total:
        c.fail(f"cannot reshape x {src} ({total} elements) to {target}")
    shp = tuple(shp)

    def make(ins, bctx):
        v = ins[0].view()
        try:
            v.shape = shp  # fails instead of copying when x is a non-contiguous view
        except AttributeError:
            return None
        return v

    return c.node([x], x.dtype, shp, make, kind="view")


@op("transpose")
def _transpose(c: OpCompiler):
    x = c.tensor("x")
    perm = c.static_ints("perm")
    r = len(x.shape)
    perm = [c.axis(p, r, "perm entry") for p in perm]
    if sorted(perm) != list(range(r)):
        c.fail(f"perm {perm} is not a permutation of 0..{r - 1}")
    shape = tuple(x.shape[p] for p in perm)
    return c.node([x], x.dtype, shape, lambda ins, b: ins[0].transpose(perm), kind="view")


@op("expand_dims")
def _expand_dims(c: OpCompiler):
    x = c.tensor("x")
    axes = c.static_ints("axes")
    out_rank = len(x.shape) + len(axes)
    norm = sorted(c.axis(a, out_rank, "axes entry") for a in axes)
    if len(set(norm)) != len(norm):
        c.fail(f"axes {axes} repeats an axis")
    shape = list(x.shape)
    for a in norm:
        shape.insert(a, 1)
    shape = tuple(shape)
    return c.node([x], x.dtype, shape, lambda ins, b: ins[0].reshape(shape), kind="view")


@op("squeeze")
def _squeeze(c: OpCompiler):
    x = c.tensor("x")
    axes = c.static_ints("axes", None)
    r = len(x.shape)
    if axes is None:
        norm = [i for i, s in enumerate(x.shape) if s == 1]
    else:
        norm = sorted({c.axis(a, r, "axes entry") for a in axes})
        bad = [a for a in norm if x.shape[a] != 1]
        if bad:
            c.fail(f"cannot squeeze axes {bad} of x {list(x.shape)}: size is not 1")
    shape = tuple(s for i, s in enumerate(x.shape) if i not in norm)
    return c.node([x], x.dtype, shape, lambda ins, b: ins[0].squeeze(axis=tuple(norm)), kind="view")


@op("slice_by_size")
def _slice_by_size(c: OpCompiler):
    x = c.tensor("x")
    begin, size = c.static_ints("begin"), c.static_ints("size")
    r = len(x.shape)
    if len(begin) != r or len(size) != r:
        c.fail(f"begin {begin} and size {size} need one entry per dimension of x {list(x.shape)}")
    sl, shape = [], []
    for d, (b, s, n) in enumerate(zip(begin, size, x.shape)):
        b0 = b + n if b < 0 else b
        e = n if s == -1 else b0 + s
        if not (0 <= b0 <= n) or s < -1 or e > n:
            c.fail(f"dim {d}: begin {b} size {s} is outside x {list(x.shape)}")
        sl.append(slice(b0, e))
        shape.append(e - b0)
    sl = tuple(sl)
    return c.node([x], x.dtype, shape, lambda ins, bc: ins[0][sl], kind="view")


@op("slice_by_index")
def _slice_by_index(c: OpCompiler):
    x = c.tensor("x")
    r = len(x.shape)
    begin, end = c.static_ints("begin"), c.static_ints("end")
    stride = c.static_ints("stride", [1] * r)
    bm = c.static_bools("begin_mask", [False] * r)
    em = c.static_bools("end_mask", [False] * r)
    sm = c.static_bools("squeeze_mask", [False] * r)
    for nm, v in (("begin", begin), ("end", end), ("stride", stride), ("begin_mask", bm), ("end_mask", em),
                  ("squeeze_mask", sm)):
        if len(v) != r:
            c.fail(f"{nm} {v} needs {r} entries (one per dimension of x {list(x.shape)})")
    if any(s == 0 for s in stride):
        c.fail(f"stride {stride} contains 0")
    index, shape = [], []
    for d in range(r):
        n = x.shape[d]
        if sm[d]:
            b = begin[d] + n if begin[d] < 0 else begin[d]
            if not 0 <= b < n:
                c.fail(f"dim {d}: squeeze index {begin[d]} is outside size {n}")
            index.append(b)
            continue
        s = slice(None if bm[d] else begin[d], None if em[d] else end[d], stride[d])
        index.append(s)
        shape.append(len(range(*s.indices(n))))
    index = tuple(index) + (Ellipsis,)  # the Ellipsis keeps an all-integer index a 0-d view, not a copy
    return c.node([x], x.dtype, shape, lambda ins, bc: ins[0][index], kind="view")


@op("concat")
def _concat(c: OpCompiler):
    vals = c.tensors("values")
    if not vals:
        c.fail("values is empty")
    c.same_dtype(*vals)
    r = len(vals[0].shape)
    ax = c.axis(c.static_int("axis"), r)
    inter = c.static_bool("interleave", False)
    for v in vals:
        if len(v.shape) != r or any(v.shape[i] != vals[0].shape[i] for i in range(r) if i != ax):
            c.fail("all values must match except on the concat axis: " + ", ".join(f"{i.name} {list(i.shape)}" for i in vals))
        if inter and v.shape != vals[0].shape:
            c.fail("interleave=true needs all values to have the same shape")
    shape = list(vals[0].shape)
    shape[ax] = sum(v.shape[ax] for v in vals)
    k = len(vals)

    def make(ins, out, bctx):
        steps = []
        if inter:
            # out along axis: v0[0], v1[0], ..., v0[1], v1[1], ... (split the axis into (d, k))
            d = vals[0].shape[ax]
            ov = out.reshape(out.shape[:ax] + (d, k) + out.shape[ax + 1:])
            for i, a in enumerate(ins):
                dst = ov[(slice(None),) * (ax + 1) + (i,)]
                steps.append(partial(np.copyto, dst, a, casting="unsafe"))
        else:
            off = 0
            for a in ins:
                n = a.shape[ax]
                dst = out[(slice(None),) * ax + (slice(off, off + n),)]
                steps.append(partial(np.copyto, dst, a, casting="unsafe"))
                off += n
        return steps

    return c.node(vals, vals[0].dtype, shape, make)


@op("tile")
def _tile(c: OpCompiler):
    x = c.tensor("x")
    reps = c.static_ints("reps")
    if len(reps) != len(x.shape) or any(r < 1 for r in reps):
        c.fail(f"reps {reps} needs one positive entry per dimension of x {list(x.shape)}")
    shape = tuple(s * r for s, r in zip(x.shape, reps))
    inter = tuple(v for pair in zip(reps, x.shape) for v in pair)
    src_shape = tuple(v for s in x.shape for v in (1, s))

    def make(ins, out, bctx):
        return partial(np.copyto, out.reshape(inter), ins[0].reshape(src_shape), casting="unsafe")

    return c.node([x], x.dtype, shape, make)


@op("band_part")
def _band_part(c: OpCompiler):
    x = c.tensor("x")
    if len(x.shape) < 2:
        c.fail("x must have rank >= 2")
    lower, upper = c.static_int("lower", -1), c.static_int("upper", -1)
    m, n = x.shape[-2:]
    i = np.arange(m)[:, None]
    j = np.arange(n)[None, :]
    keep = np.ones((m, n), bool)
    if lower >= 0:
        keep &= (i - j) <= lower
    if upper >= 0:
        keep &= (j - i) <= upper
    drop = ~keep

    def make(ins, out, bctx):
        def step(_o=out, _x=ins[0], _d=drop):
            np.copyto(_o, _x, casting="unsafe")
            np.copyto(_o, 0, where=_d)

        return step

    return c.node([x], x.dtype, x.shape, make)


# ---------------------------------------------------------------------------------------
# quantization


def _qparam(c: OpCompiler, val, axis, shape, what):
    """Broadcast a scalar or per-axis vector quantization parameter against ``shape``."""
    a = np.asarray(val)
    if a.ndim == 0:
        return a
    if a.ndim != 1:
        c.fail(f"{what} must be a scalar or a vector, got shape {list(a.shape)}")
    if axis is None:
        c.fail(f"{what} is a vector, so axis= is required")
    ax = c.axis(axis, len(shape))
    if a.shape[0] != shape[ax]:
        c.fail(f"{what} has {a.shape[0]} entries but x has {shape[ax]} along axis {ax}")
    return a.reshape([-1 if i == ax else 1 for i in range(len(shape))])


@op("quantize")
def _quantize(c: OpCompiler):
    x = c.tensor("input")
    c.need_float(x)
    out_dt = c.static_str("output_dtype")
    if out_dt not in ("int8", "uint8"):
        c.fail(f"output_dtype must be int8 or uint8, got {out_dt!r}")
    axis = c.static_int("axis", None) if c.has("axis") else None
    scale = _qparam(c, c.static("scale"), axis, x.shape, "scale").astype(np.float32)
    zp_raw = c.static("zero_point", None)
    if zp_raw is not None and np.asarray(zp_raw).dtype != A.DTYPES[out_dt]:
        c.fail(f"zero_point dtype {np.asarray(zp_raw).dtype} must equal output_dtype {out_dt}")
    zp = _qparam(c, 0 if zp_raw is None else zp_raw, axis, x.shape, "zero_point").astype(np.float32)
    info = np.iinfo(A.DTYPES[out_dt])
    lo, hi = np.float32(info.min), np.float32(info.max)

    def make(ins, out, bctx):
        t = bctx.scratch(x.shape, F32)

        def step(_x=ins[0], _t=t, _o=out):
            np.true_divide(_x, scale, out=_t, dtype=F32)
            np.rint(_t, out=_t)  # round half to even
            np.add(_t, zp, out=_t)
            np.clip(_t, lo, hi, out=_t)
            np.copyto(_o, _t, casting="unsafe")

        return step

    return c.node([x], out_dt, x.shape, make)


def _dequant(c: OpCompiler, q: np.ndarray | None, qinfo: ValueInfo | None, scale_raw, zp_raw, axis, shape):
    scale_arr = np.asarray(scale_raw)
    if scale_arr.dtype.kind != "f":
        c.fail(f"scale must be fp16/fp32, got {scale_arr.dtype}")
    out_dt = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32"}[scale_arr.dtype]
    scale = _qparam(c, scale_arr, axis, shape, "scale").astype(np.float32)
    zp = _qparam(c, 0 if zp_raw is None else zp_raw, axis, shape, "zero_point").astype(np.float32)
    return out_dt, scale, zp


@op("dequantize")
def _dequantize(c: OpCompiler):
    q = c.tensor("input")
    if q.dtype not in ("int8", "uint8"):
        c.fail(f"input must be int8/uint8, got {q.dtype}")
    axis = c.static_int("axis", None) if c.has("axis") else None
    out_dt, scale, zp = _dequant(c, None, q, c.static("scale"), c.static("zero_point", None), axis, q.shape)

    def make(ins, out, bctx):
        t = bctx.scratch(q.shape, F32)

        def step(_q=ins[0], _t=t, _o=out):
            np.subtract(_q, zp, out=_t, dtype=F32)
            np.multiply(_t, scale, out=_o, dtype=F32)

        return step

    return c.node([q], out_dt, q.shape, make)


@op("constexpr_affine_dequantize")
def _constexpr_affine_dequantize(c: OpCompiler):
    # all arguments live in the attribute list (docs/ane-runtime.md#ops); folded at compile time
    qd = c.static("quantized_data", attrs=True)
    if not isinstance(qd, np.ndarray) or qd.dtype not in (np.int8, np.uint8):
        c.fail("quantized_data must be an int8/uint8 tensor")
    ax_raw = c.static("axis", None, attrs=True)
    axis = None if ax_raw is None else int(np.asarray(ax_raw).reshape(()))
    zp_raw = c.static("zero_point", None, attrs=True)
    scale_raw = c.static("scale", attrs=True)
    out_dt, scale, zp = _dequant(c, qd, None, scale_raw, zp_raw, axis, qd.shape)
    vals = ((qd.astype(np.float32) - zp) * scale).astype(A.DTYPES[out_dt])  # rounded to the declared dtype
    sto = storage_dtype(out_dt, c.precision)
    const = vals.astype(sto)
    const.flags.writeable = False
    return ValueInfo(c.st.name, out_dt, tuple(qd.shape), sto, const=const, raw=vals)


@op("scaled_dot_product_attention")
def _sdpa(c: OpCompiler):
    # iOS18 op: softmax(Q Kᵀ / sqrt(E) + mask) V, computed fused in fp32 with one final rounding.
    # (The ANE is reported to ignore attn_mask; the checker rejects masked SDPA, the simulator
    # applies the documented semantics.)
    q, k, v = c.tensor("query"), c.tensor("key"), c.tensor("value")
    m = c.tensor("attn_mask", required=False)
    c.same_dtype(q, k, v)
    c.need_float(q)
    if min(len(q.shape), len(k.shape), len(v.shape)) < 2:
        c.fail("query, key and value need rank >= 2 ([B, *, L, E])")
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        c.fail(f"query {list(q.shape)}, key {list(k.shape)}, value {list(v.shape)}: need E of query = E of key "
               "and S of key = S of value")
    scores_shape = _matmul_shape(c, q.shape, k.shape, False, True)
    shape = _matmul_shape(c, scores_shape, v.shape, False, False)
    if m is not None:
        try:
            np.broadcast_shapes(m.shape, scores_shape)
        except ValueError:
            c.fail(f"attn_mask {list(m.shape)} does not broadcast to the scores {list(scores_shape)}")
        if m.dtype != "bool" and m.dtype != q.dtype:
            c.fail(f"attn_mask must be bool or {q.dtype}, got {m.dtype}")
    scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
    infos = [q, k, v] + ([m] if m is not None else [])

    def make(ins, out, bctx):
        steps, f = [], []
        for i, a in enumerate(ins[:3]):
            a32, refresh = _f32(a, bctx, i)
            if refresh:
                steps.append(refresh)
            f.append(a32)
        s = bctx.scratch(scores_shape, F32)
        red = bctx.scratch(scores_shape[:-1] + (1,), F32)
        acc = out if out.dtype == F32 else bctx.scratch(out.shape, F32)
        mask = ins[3] if len(ins) == 4 else None

        def step(_q=f[0], _k=f[1], _v=f[2], _s=s, _r=red, _m=mask, _acc=acc):
            np.matmul(_q, np.swapaxes(_k, -1, -2), out=_s)
            np.multiply(_s, scale, out=_s)
            if _m is not None:
                if _m.dtype == np.bool_:
                    np.copyto(_s, -np.inf, where=~_m)
                else:
                    np.add(_s, _m, out=_s, dtype=F32)
            np.maximum.reduce(_s, axis=-1, keepdims=True, out=_r)
            np.subtract(_s, _r, out=_s)
            np.exp(_s, out=_s)
            np.add.reduce(_s, axis=-1, keepdims=True, out=_r)
            np.divide(_s, _r, out=_s)
            np.matmul(_s, _v, out=_acc)

        steps.append(step)
        if acc is not out:
            steps.append(_cast_step(acc, out))
        return steps

    return c.node(infos, q.dtype, shape, make)
