"""MIL interpreter: every op against an independent numpy reference, in fp32 and fp16 modes.

References never call the interpreter: they are float64 numpy formulas, explicit loops
(conv, band_part, interleave) or Python slicing. fp16 mode is checked against "compute in
fp32/float64 from the fp16 operands, round the op's result to fp16".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from milbuild import MilBuilder, single_op
from rustane.mil.interp import MilPlanError, compile_program
from rustane.mil.parser import parse

F16, F32 = np.float16, np.float32
EX = settings(max_examples=25, deadline=None)


def run(text: str, inputs: dict, precision: str = "fp32", blobs=None) -> dict:
    return compile_program(parse(text), blobs or {}, precision).run(inputs)


def rnd(shape, seed=0, scale=1.0, lo=None):
    r = np.random.default_rng(seed)
    a = r.standard_normal(shape) * scale
    if lo is not None:
        a = np.abs(a) + lo
    return a


def one(op, xs: dict, consts: dict, shape, precision, out_dtype=None, **extra):
    """Run a single op; float inputs are declared fp16 (and rounded to fp16 first)."""
    dt = out_dtype or "fp16"
    ins = {}
    decls = {}
    for n, a in xs.items():
        a = np.asarray(a)
        if a.dtype.kind == "f":
            a = a.astype(F16)
            decls[n] = ("fp16", a.shape)
        else:
            decls[n] = ({np.dtype(bool): "bool", np.dtype(np.int32): "int32", np.dtype(np.int8): "int8",
                         np.dtype(np.uint8): "uint8"}[a.dtype], a.shape)
        ins[n] = a
    text = single_op(op, decls, consts, dt, shape, extra)
    return run(text, ins, precision)["res"], ins


def f64(a):
    return np.asarray(a, dtype=np.float64)


def assert_one_fp16_rounding(out, ref):
    """``out`` (fp16) is the fp16 rounding of ``ref`` (float64, exact math), up to one fp16 ulp where
    the fp32 computation lands on the other side of a rounding tie; overflow must give inf."""
    assert out.dtype == F16
    with np.errstate(over="ignore"):
        r16 = ref.astype(F16)
    fin = np.isfinite(r16)
    np.testing.assert_array_equal(out[~fin], r16[~fin])
    diff = np.abs(out[fin].astype(np.float64) - r16[fin].astype(np.float64))
    assert np.all(diff <= np.spacing(np.abs(r16[fin])).astype(np.float64))
    assert np.mean(out[fin] == r16[fin]) >= 0.9


# ---------------------------------------------------------------------------------------
# elementwise binary with broadcasting

BINARY_REF = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.divide,
    "maximum": np.maximum,
    "minimum": np.minimum,
}


@EX
@given(
    shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=5),
    op=st.sampled_from(sorted(BINARY_REF)),
    prec=st.sampled_from(["fp16", "fp32"]),
    seed=st.integers(0, 2**16),
)
def test_binary_broadcast(shapes, op, prec, seed):
    xs, ys = shapes.input_shapes
    x = rnd(xs, seed)
    y = rnd(ys, seed + 1, lo=0.25) if op == "real_div" else rnd(ys, seed + 1)
    out, ins = one(op, {"x": x, "y": y}, {}, shapes.result_shape, prec)
    ref = BINARY_REF[op](f64(ins["x"]), f64(ins["y"]))
    assert out.shape == shapes.result_shape
    if prec == "fp16":
        assert out.dtype == F16
        # fp16 RNE of the exact result equals fp16 RNE of the fp32 result for + - * / max min
        np.testing.assert_array_equal(out, ref.astype(F16))
    else:
        assert out.dtype == F32
        np.testing.assert_allclose(out, ref, rtol=2e-7, atol=1e-30)


@pytest.mark.parametrize(
    "xs,ys",
    [((1, 4, 6, 6), (1, 1, 6, 6)), ((1, 8, 1, 5), (1, 8, 1, 1)), ((1, 3, 1, 7), ())],
    ids=["mask[1,1,S,S]", "bias[1,D,1,1]", "scalar"],
)
def test_ane_broadcast_patterns(xs, ys):
    x, y = rnd(xs, 3), rnd(ys, 4)
    out, ins = one("add", {"x": x}, {"y": np.asarray(y, F16) if ys else F16(y)}, xs, "fp16")
    np.testing.assert_array_equal(out, (f64(ins["x"]) + f64(np.asarray(y, F16))).astype(F16))


def test_pow_and_scalar_const():
    x = rnd((2, 3, 4), 5, lo=0.1)
    out, ins = one("pow", {"x": x}, {"y": F16(-0.5)}, (2, 3, 4), "fp16")
    np.testing.assert_array_equal(out, (f64(ins["x"]) ** -0.5).astype(F16))


@pytest.mark.parametrize("op,ref", [("greater", np.greater), ("less_equal", np.less_equal), ("equal", np.equal)])
def test_compare(op, ref):
    x = np.round(rnd((3, 4), 1)).astype(F16)
    y = np.round(rnd((1, 4), 2)).astype(F16)
    out, _ = one(op, {"x": x, "y": y}, {}, (3, 4), "fp16", out_dtype="bool")
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, ref(x, y))


def test_select():
    c = rnd((2, 1, 5), 1) > 0
    a, b = rnd((2, 3, 5), 2), rnd((1, 3, 1), 3)
    out, ins = one("select", {"cond": c, "a": a, "b": b}, {}, (2, 3, 5), "fp16")
    ref = np.empty((2, 3, 5))
    for i, j, k in np.ndindex(2, 3, 5):
        ref[i, j, k] = ins["a"][i, j, k] if c[i, 0, k] else ins["b"][0, j, 0]
    np.testing.assert_array_equal(out, ref.astype(F16))


# ---------------------------------------------------------------------------------------
# unary / activations


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


_erf = np.vectorize(math.erf)
UNARY_REF = {
    "exp": np.exp,
    "sqrt": np.sqrt,
    "tanh": np.tanh,
    "sigmoid": _sig,
    "relu": lambda x: np.maximum(x, 0),
    "silu": lambda x: x * _sig(x),
    "rsqrt": lambda x: 1 / np.sqrt(x + 1e-12),
    "abs": np.abs,
    "square": np.square,
    "erf": _erf,
}


@pytest.mark.parametrize("op", sorted(UNARY_REF))
@pytest.mark.parametrize("prec", ["fp16", "fp32"])
def test_unary(op, prec):
    positive = op in ("sqrt", "rsqrt")
    x = rnd((3, 17), 11, scale=3.0, lo=0.05 if positive else None)
    x[0, :5] = [-30.0, -8.0, 0.0, 8.0, 30.0] if not positive else [0.01, 1, 100, 1000, 6e4]
    out, ins = one(op, {"x": x}, {}, (3, 17), prec)
    ref = UNARY_REF[op](f64(ins["x"]))
    if prec == "fp32":
        np.testing.assert_allclose(out, ref, rtol=3e-6, atol=2e-7)
    else:
        assert_one_fp16_rounding(out, ref)


def _sigmoid_f32_where(x):
    """The stable fp32 sigmoid written plainly: e = exp(-|x|), where(x >= 0, 1, e) / (1 + e)."""
    x = np.asarray(x, F32)
    e = np.exp(-np.abs(x))
    return (np.where(x >= 0, F32(1), e) / (F32(1) + e)).astype(F32)


def _wide_f32(n, seed):
    """Specials (signed zeros, infinities, NaN payloads, the exp under/overflow edges) and
    random bit patterns, so every float class and both signs appear."""
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 90, -90, 88.7, -88.7, 104, -104,
                        1e-45, -1e-45, 3.4e38, -3.4e38, 17, -17, 1e-8, -1e-8], F32)
    payloads = np.array([0x7FC00001, 0xFFC12345, 0x7F800001], np.uint32).view(F32)
    r = np.random.default_rng(seed)
    bits = r.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(F32)
    return np.concatenate([special, payloads, (r.standard_normal(n) * 20).astype(F32), bits])


def test_sigmoid_silu_fp32_bits_and_in_place():
    """The numpy fallbacks of fp32 sigmoid/silu (used where no row view exists) are bit-equal to
    the plain np.where formula, also in place and on strided views; the interpreter's one-pass C
    path (contiguous rows, also slices of a wider buffer) agrees with float64 within 4 ulp."""
    from rustane.mil import ops as mil_ops

    x = _wide_f32(20000, 3)
    u32 = lambda a: np.ascontiguousarray(a).view(np.uint32)  # noqa: E731  (NaN-safe, sign-exact)
    with np.errstate(all="ignore"):  # NaN and inf inputs
        ref = _sigmoid_f32_where(x)
        ref_silu = ref * x
        for fn, want in ((mil_ops._sigmoid32_exact, ref), (mil_ops._silu32, ref_silu)):
            o = np.empty_like(x)
            fn(x, o)
            np.testing.assert_array_equal(u32(o), u32(want))
            a = x.copy()
            fn(a, a)  # out is the input
            np.testing.assert_array_equal(u32(a), u32(want))
            s = x.copy()[::3]
            fn(s, s)  # strided, in place
            np.testing.assert_array_equal(u32(s), u32(want[::3]))
        # through the interpreter: of an intermediate (h = x * 1, computed in place), of a
        # last-axis slice of the input (strided rows), and of a transpose (the fallback)
        xi = x[np.isfinite(x)][:4096].reshape(1, 16, 1, 256)
        sig64 = lambda v: 1 / (1 + np.exp(-v.astype(np.float64)))  # noqa: E731
        for opname, f in (("sigmoid", sig64), ("silu", lambda v: sig64(v) * v)):
            b = MilBuilder()
            b.input("x", "fp32", xi.shape)
            b.const("one", F32(1.0))
            b.const("b0", np.array([0, 0, 0, 64], np.int32))
            b.const("sz", np.array([1, 16, 1, 128], np.int32))
            b.const("pm", np.array([0, 3, 2, 1], np.int32))
            b.op("h", "mul", "fp32", xi.shape, x="x", y="one")
            b.op("y", opname, "fp32", xi.shape, x="h")
            b.op("xs", "slice_by_size", "fp32", (1, 16, 1, 128), x="x", begin="b0", size="sz")
            b.op("ys", opname, "fp32", (1, 16, 1, 128), x="xs")
            b.op("xt", "transpose", "fp32", (1, 256, 1, 16), x="x", perm="pm")
            b.op("yt", opname, "fp32", (1, 256, 1, 16), x="xt")
            outs = run(b.text(["y", "ys", "yt"]), {"x": xi})
            # exp flushes e^x < 2^-126 to 0, so silu may be off by |x|·2^-126 there
            tol = dict(rtol=4 * 2.0 ** -24, atol=float(np.abs(xi).max()) * 1.2e-38)
            np.testing.assert_allclose(outs["y"], f(xi), **tol)
            np.testing.assert_allclose(outs["ys"], f(xi[..., 64:192]), **tol)
            np.testing.assert_allclose(outs["yt"], f(xi.transpose(0, 3, 2, 1)), **tol)


@pytest.mark.parametrize(
    "mode,ref",
    [
        ("EXACT", lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2)))),
        ("TANH_APPROXIMATION", lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
        ("SIGMOID_APPROXIMATION", lambda x: x * _sig(1.702 * x)),
    ],
)
def test_gelu_modes(mode, ref):
    x = rnd((4, 9), 2, scale=3.0)
    out, ins = one("gelu", {"x": x}, {"mode": mode}, (4, 9), "fp32")
    np.testing.assert_allclose(out, ref(f64(ins["x"])), rtol=1e-5, atol=1e-6)


def test_cast_int_and_back():
    x = np.array([[-2.7, -0.5, 0.5, 3.9]], F16)
    out, _ = one("cast", {"x": x}, {"dtype": "int32"}, (1, 4), "fp16", out_dtype="int32")
    np.testing.assert_array_equal(out, [[-2, 0, 0, 3]])  # truncation toward zero, like astype
    b = MilBuilder()
    b.input("x", "fp16", (2, 3))
    b.const("to", "fp32")
    b.op("y", "cast", "fp32", (2, 3), x="x", dtype="to")
    xi = rnd((2, 3), 1).astype(F16)
    y = run(b.text(["y"]), {"x": xi}, "fp16")["y"]
    assert y.dtype == F32 and np.array_equal(y, xi.astype(F32))


# ---------------------------------------------------------------------------------------
# reductions and softmax


@EX
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
    data=st.data(),
    op=st.sampled_from(["reduce_sum", "reduce_max", "reduce_mean", "reduce_min"]),
    keep=st.booleans(),
    prec=st.sampled_from(["fp16", "fp32"]),
)
def test_reductions(shape, data, op, keep, prec):
    r = len(shape)
    axes = data.draw(st.lists(st.integers(-r, r - 1), min_size=1, max_size=r, unique_by=lambda a: a % r))
    x = rnd(shape, len(axes))
    ref_fn = {"reduce_sum": np.sum, "reduce_max": np.max, "reduce_mean": np.mean, "reduce_min": np.min}[op]
    norm = tuple(sorted(a % r for a in axes))
    oshape = tuple(1 if i in norm else s for i, s in enumerate(shape)) if keep else tuple(
        s for i, s in enumerate(shape) if i not in norm)
    out, ins = one(op, {"x": x}, {"axes": np.array(axes, np.int32), "keep_dims": keep}, oshape, prec)
    ref = ref_fn(f64(ins["x"]), axis=norm, keepdims=keep)
    assert out.shape == oshape
    if prec == "fp16":
        # fp32 accumulation then one rounding: within half an ulp of the exact value (+ tiny fp32 error)
        ulp = np.spacing(np.abs(ref).astype(F16)).astype(np.float64)
        assert np.all(np.abs(out - ref) <= 0.5 * ulp + 1e-5 * np.abs(ref) + 1e-6)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_fp16_multi_axis_sum_rounds_once():
    """numpy reduces several axes into `out` one axis at a time; with an fp16 out that rounded
    after every axis (1 ulp off, e.g. axes [2, 0]). Every axis order, against the exact sum."""
    import itertools

    shape = (2, 3, 2, 4)
    worst = 0.0
    for k in (2, 3):
        for axes in itertools.permutations(range(4), k):
            x = rnd(shape, sum(axes) + 7 * k, scale=2.0)
            oshape = tuple(s for i, s in enumerate(shape) if i not in axes)
            out, ins = one("reduce_sum", {"x": x}, {"axes": np.array(axes, np.int32), "keep_dims": False},
                           oshape, "fp16")
            ref = f64(ins["x"]).sum(axis=tuple(sorted(axes)))  # fp16 operands: exact in float64
            half_ulp = 0.5 * np.spacing(np.abs(ref).astype(F16)).astype(np.float64)
            worst = max(worst, float(np.max(np.abs(f64(out) - ref) / half_ulp)))
    assert worst <= 1.0, f"{worst:.2f} half-ulps off"


def test_reduce_default_all_axes():
    x = rnd((2, 3, 4), 1)
    out, ins = one("reduce_sum", {"x": x}, {}, (), "fp32")
    np.testing.assert_allclose(out, f64(ins["x"]).sum(), rtol=1e-6)


@pytest.mark.parametrize("axis", [-1, 1, 0])
@pytest.mark.parametrize("prec", ["fp16", "fp32"])
def test_softmax(axis, prec):
    x = rnd((2, 5, 3, 7), 4, scale=4.0)
    x[0, 0, 0, 0] = -65504.0  # the causal mask value must give an exact 0, not NaN
    out, ins = one("softmax", {"x": x}, {"axis": np.int32(axis)}, x.shape, prec)
    e = np.exp(f64(ins["x"]) - f64(ins["x"]).max(axis=axis, keepdims=True))
    ref = e / e.sum(axis=axis, keepdims=True)
    tol = dict(rtol=1e-3, atol=1e-4) if prec == "fp16" else dict(rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out, ref, **tol)
    assert np.all(np.isfinite(out))


# ---------------------------------------------------------------------------------------
# matmul


def matmul_ref(x, y, tx, ty):
    x, y = f64(x), f64(y)
    if tx and x.ndim >= 2:
        x = np.swapaxes(x, -1, -2)
    if ty and y.ndim >= 2:
        y = np.swapaxes(y, -1, -2)
    x1, y1 = x.ndim == 1, y.ndim == 1
    if x1:
        x = x[None, :]
    if y1:
        y = y[:, None]
    out = (x[..., :, :, None] * y[..., None, :, :]).sum(axis=-2)  # broadcasting sum, not BLAS
    if y1:
        out = out[..., 0]
    if x1:
        out = out[..., 0, :] if not y1 else out[..., 0]
    return out


@st.composite
def matmul_case(draw):
    m, k, n = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 5))
    batch = draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3))
    xb, yb = batch.input_shapes
    x1, y1 = draw(st.booleans()) and not xb, draw(st.booleans()) and not yb
    tx, ty = draw(st.booleans()), draw(st.booleans())
    xs = (k,) if x1 else xb + ((k, m) if tx else (m, k))
    ys = (k,) if y1 else yb + ((n, k) if ty else (k, n))
    return xs, ys, tx, ty


@EX
@given(case=matmul_case(), prec=st.sampled_from(["fp16", "fp32"]), seed=st.integers(0, 999))
def test_matmul(case, prec, seed):
    xs, ys, tx, ty = case
    x, y = rnd(xs, seed), rnd(ys, seed + 7)
    x16, y16 = x.astype(F16), y.astype(F16)
    ref = matmul_ref(x16, y16, tx, ty)
    b = MilBuilder()
    b.input("x", "fp16", xs)
    b.input("y", "fp16", ys)
    b.const("tx", tx)
    b.const("ty", ty)
    b.op("z", "matmul", "fp16", ref.shape, x="x", y="y", transpose_x="tx", transpose_y="ty")
    out = run(b.text(["z"]), {"x": x16, "y": y16}, prec)["z"]
    assert out.shape == ref.shape
    # fp32 accumulation error bound, then (fp16 mode) one rounding of half an fp16 ulp
    acc = (xs[-2] if tx and len(xs) > 1 else xs[-1]) * 2.0**-23 * matmul_ref(np.abs(x16), np.abs(y16), tx, ty)
    if prec == "fp16":
        ulp = np.spacing(np.abs(ref).astype(F16)).astype(np.float64)
        assert np.all(np.abs(out - ref) <= 0.5 * ulp + acc)
    else:
        assert np.all(np.abs(out - ref) <= acc + 1e-30)


def test_matmul_inner_mismatch_error():
    b = MilBuilder()
    b.input("x", "fp16", (1, 2, 4, 8))
    b.input("y", "fp16", (1, 2, 4, 8))
    b.op("z", "matmul", "fp16", (1, 2, 4, 4), x="x", y="y")
    with pytest.raises(MilPlanError, match=r"inner dimensions differ"):
        compile_program(parse(b.text(["z"])))


# ---------------------------------------------------------------------------------------
# data movement


@EX
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=6), data=st.data())
def test_slice_by_size(shape, data):
    begin = [data.draw(st.integers(0, s - 1)) for s in shape]
    size = [data.draw(st.one_of(st.just(-1), st.integers(1, s - b))) for s, b in zip(shape, begin)]
    x = rnd(shape, 1)
    oshape = tuple(s - b if z == -1 else z for s, b, z in zip(shape, begin, size))
    out, ins = one("slice_by_size", {"x": x}, {"begin": np.array(begin, np.int32), "size": np.array(size, np.int32)},
                   oshape, "fp16")
    ref = ins["x"]
    for d, (b, z) in enumerate(zip(begin, size)):
        ref = np.take(ref, range(b, shape[d] if z == -1 else b + z), axis=d)
    np.testing.assert_array_equal(out, ref)


@EX
@given(shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), data=st.data())
def test_slice_by_index(shape, data):
    r = len(shape)
    begin = [data.draw(st.integers(-s, s - 1)) for s in shape]
    end = [data.draw(st.integers(-s, s)) for s in shape]
    stride = [data.draw(st.sampled_from([1, 2, -1, 3])) for _ in shape]
    bm = [data.draw(st.booleans()) for _ in shape]
    em = [data.draw(st.booleans()) for _ in shape]
    sm = [data.draw(st.booleans()) for _ in shape]
    x = rnd(shape, 2)
    # reference: build the index by hand from the coremltools definition
    idx = []
    for d in range(r):
        if sm[d]:
            idx.append(begin[d] % shape[d])
        else:
            idx.append(slice(None if bm[d] else begin[d], None if em[d] else end[d], stride[d]))
    ref = x.astype(F16)[tuple(idx)]
    consts = {
        "begin": np.array(begin, np.int32), "end": np.array(end, np.int32), "stride": np.array(stride, np.int32),
        "begin_mask": np.array(bm), "end_mask": np.array(em), "squeeze_mask": np.array(sm),
    }
    if ref.size == 0:
        return  # MIL tensors have no zero-size dims
    out, _ = one("slice_by_index", {"x": x}, consts, ref.shape, "fp16")
    np.testing.assert_array_equal(out, ref)


def test_reshape_minus_one_and_zero():
    x = rnd((2, 3, 4), 1)
    out, ins = one("reshape", {"x": x}, {"shape": np.array([0, -1, 2], np.int32)}, (2, 6, 2), "fp16")
    np.testing.assert_array_equal(out, ins["x"].reshape(2, 6, 2))


def test_reshape_after_transpose_copies_in_c_order():
    b = MilBuilder()
    b.input("x", "fp16", (1, 4, 3, 2))
    b.const("pm", np.array([0, 2, 1, 3], np.int32))
    b.op("t", "transpose", "fp16", (1, 3, 4, 2), x="x", perm="pm")
    b.const("sh", np.array([1, 12, 1, 2], np.int32))
    b.op("y", "reshape", "fp16", (1, 12, 1, 2), x="t", shape="sh")
    x = rnd((1, 4, 3, 2), 3).astype(F16)
    y = run(b.text(["y"]), {"x": x}, "fp16")["y"]
    np.testing.assert_array_equal(y, np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(1, 12, 1, 2))


@EX
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=4), data=st.data())
def test_transpose(shape, data):
    perm = data.draw(st.permutations(range(len(shape))))
    x = rnd(shape, 1)
    out, ins = one("transpose", {"x": x}, {"perm": np.array(perm, np.int32)}, tuple(shape[p] for p in perm), "fp16")
    ref = np.empty(out.shape, F16)
    for idx in np.ndindex(*out.shape):
        src = [0] * len(shape)
        for i, p in enumerate(perm):
            src[p] = idx[i]
        ref[idx] = ins["x"][tuple(src)]
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("axis", [1, 3, -1])
def test_concat(interleave, axis):
    shapes = [(1, 2, 1, 3)] * 3 if interleave else [(1, 2, 1, 3), (1, 1, 1, 3), (1, 4, 1, 3)]
    if not interleave and axis != 1:
        shapes = [(1, 2, 1, 3), (1, 2, 1, 1), (1, 2, 1, 2)]
    vals = [rnd(s, i).astype(F16) for i, s in enumerate(shapes)]
    ax = axis % 4
    oshape = list(shapes[0])
    oshape[ax] = sum(s[ax] for s in shapes)
    b = MilBuilder()
    names = tuple(b.input(f"v{i}", "fp16", s) for i, s in enumerate(shapes))
    b.const("ax", np.int32(axis))
    b.const("il", interleave)
    b.op("y", "concat", "fp16", oshape, values=names, axis="ax", interleave="il")
    y = run(b.text(["y"]), {f"v{i}": v for i, v in enumerate(vals)}, "fp16")["y"]
    # reference by explicit element placement
    ref = np.empty(oshape, F16)
    if interleave:
        k = len(vals)
        for i, v in enumerate(vals):
            for j in range(shapes[0][ax]):
                dst = [slice(None)] * 4
                dst[ax] = j * k + i
                srci = [slice(None)] * 4
                srci[ax] = j
                ref[tuple(dst)] = v[tuple(srci)]
    else:
        off = 0
        for v in vals:
            dst = [slice(None)] * 4
            dst[ax] = slice(off, off + v.shape[ax])
            ref[tuple(dst)] = v
            off += v.shape[ax]
    np.testing.assert_array_equal(y, ref)


def test_tile_expand_squeeze():
    x = rnd((2, 1, 3), 1)
    out, ins = one("tile", {"x": x}, {"reps": np.array([2, 3, 1], np.int32)}, (4, 3, 3), "fp16")
    ref = np.empty((4, 3, 3), F16)
    for i, j, k in np.ndindex(4, 3, 3):
        ref[i, j, k] = ins["x"][i % 2, 0, k]
    np.testing.assert_array_equal(out, ref)
    out, ins = one("expand_dims", {"x": x}, {"axes": np.array([0, -1], np.int32)}, (1, 2, 1, 3, 1), "fp16")
    np.testing.assert_array_equal(out.reshape(-1), ins["x"].reshape(-1))
    out, ins = one("squeeze", {"x": x}, {"axes": np.array([1], np.int32)}, (2, 3), "fp16")
    np.testing.assert_array_equal(out, ins["x"][:, 0, :])


@pytest.mark.parametrize("lower,upper", [(-1, 0), (0, -1), (1, 2), (-1, -1)])
def test_band_part(lower, upper):
    x = rnd((2, 4, 5), 1)
    out, ins = one("band_part", {"x": x}, {"lower": np.int32(lower), "upper": np.int32(upper)}, (2, 4, 5), "fp16")
    ref = ins["x"].copy()
    for i, j in np.ndindex(4, 5):
        if (lower >= 0 and i - j > lower) or (upper >= 0 and j - i > upper):
            ref[:, i, j] = 0
    np.testing.assert_array_equal(out, ref)


# ---------------------------------------------------------------------------------------
# conv


def conv_ref(x, w, strides, dil, pads, groups):
    """Direct loop over output positions (float64)."""
    x, w = f64(x), f64(w)
    n, cin = x.shape[:2]
    cout, cig = w.shape[:2]
    ks = w.shape[2:]
    nsp = len(ks)
    xp = np.pad(x, [(0, 0), (0, 0)] + list(pads))
    osp = [(xp.shape[2 + i] - (ks[i] - 1) * dil[i] - 1) // strides[i] + 1 for i in range(nsp)]
    out = np.zeros((n, cout, *osp))
    cog = cout // groups
    for o in range(cout):
        g = o // cog
        for pos in np.ndindex(*osp):
            acc = np.zeros(n)
            for c in range(cig):
                for kk in np.ndindex(*ks):
                    src = tuple(pos[i] * strides[i] + kk[i] * dil[i] for i in range(nsp))
                    acc += xp[(slice(None), g * cig + c) + src] * w[(o, c) + kk]
            out[(slice(None), o) + pos] = acc
    return out


@settings(max_examples=20, deadline=None)
@given(
    nsp=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, "depthwise"]),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dil=st.integers(1, 2),
    pad_type=st.sampled_from(["valid", "same", "same_lower", "custom"]),
    seed=st.integers(0, 999),
    prec=st.sampled_from(["fp16", "fp32"]),
)
def test_conv(nsp, groups, k, stride, dil, pad_type, seed, prec):
    cin = 4
    g = cin if groups == "depthwise" else groups
    cout = 4 if groups == "depthwise" else 6
    sp = (7,) if nsp == 1 else (5, 6)
    ks = (k,) * nsp
    r = np.random.default_rng(seed)
    pad = [int(v) for v in r.integers(0, 3, size=2 * nsp)] if pad_type == "custom" else [0] * (2 * nsp)
    ext = [(k - 1) * dil + 1] * nsp
    if pad_type == "valid" and any(e > s for e, s in zip(ext, sp)):
        return
    if pad_type == "custom":
        pads = [(pad[2 * i], pad[2 * i + 1]) for i in range(nsp)]
    elif pad_type == "valid":
        pads = [(0, 0)] * nsp
    else:
        pads = []
        for i in range(nsp):
            o = -(-sp[i] // stride)
            tot = max((o - 1) * stride + ext[i] - sp[i], 0)
            lo = tot // 2 if pad_type == "same" else tot - tot // 2
            pads.append((lo, tot - lo))
    if any(sp[i] + sum(pads[i]) < ext[i] for i in range(nsp)):
        return
    x = r.standard_normal((2, cin, *sp)).astype(F16)
    w = r.standard_normal((cout, cin // g, *ks)).astype(F16)
    ref = conv_ref(x, w, [stride] * nsp, [dil] * nsp, pads, g)
    b = MilBuilder()
    b.input("x", "fp16", x.shape)
    b.const("W", w)
    b.const("st", np.array([stride] * nsp, np.int32))
    b.const("dl", np.array([dil] * nsp, np.int32))
    b.const("pd", np.array(pad, np.int32))
    b.const("pt", pad_type)
    b.const("gr", np.int32(g))
    b.op("y", "conv", "fp16", ref.shape, x="x", weight="W", strides="st", dilations="dl", pad="pd", pad_type="pt",
         groups="gr")
    out = run(b.text(["y"]), {"x": x}, prec)["y"]
    terms = (cin // g) * k**nsp
    acc = terms * 2.0**-23 * conv_ref(np.abs(x), np.abs(w), [stride] * nsp, [dil] * nsp, pads, g)
    if prec == "fp16":
        ulp = np.spacing(np.abs(ref).astype(F16)).astype(np.float64)
        assert np.all(np.abs(out - ref) <= 0.5 * ulp + acc)
    else:
        assert np.all(np.abs(out - ref) <= acc + 1e-30)


def test_conv_1x1_is_linear_layer_with_blob_weight():
    from rustane.mil.blob import blob_key, write_blob

    oc, ic, s = 6, 5, 8
    r = np.random.default_rng(1)
    w = r.standard_normal((oc, ic)).astype(F16)
    x = r.standard_normal((1, ic, 1, s)).astype(F16)
    b = MilBuilder()
    b.input("x", "fp16", x.shape)
    for n, v in (("dl", [1, 1]), ("st", [1, 1]), ("pd", [0, 0, 0, 0])):
        b.const(n, np.array(v, np.int32))
    b.const("gr", np.int32(1))
    b.const("pt", "valid")
    key = blob_key("w")
    b.raw(f'tensor<fp16, [{oc}, {ic}, 1, 1]> W = const()[name = string("W"), val = tensor<fp16, [{oc}, {ic}, 1, 1]>'
          f'(BLOBFILE(path = string("{key}"), offset = uint64(64)))];')
    b.op("y", "conv", "fp16", (1, oc, 1, s), x="x", weight="W", strides="st", dilations="dl", pad="pd",
         pad_type="pt", groups="gr")
    y = run(b.text(["y"]), {"x": x}, "fp16", blobs={key: write_blob(w)})["y"]
    ref = (f64(w) @ f64(x[0, :, 0, :]))
    ulp = np.spacing(np.abs(ref).astype(F16)).astype(np.float64)
    assert np.all(np.abs(y[0, :, 0, :] - ref) <= 0.5 * ulp + 1e-5 * np.abs(ref) + 1e-6)
    with pytest.raises(MilPlanError, match=r"BLOBFILE .*w\.bin.* not supplied"):
        run(b.text(["y"]), {"x": x}, "fp16", blobs={})


# ---------------------------------------------------------------------------------------
# quantization


@pytest.mark.parametrize("qdt", ["int8", "uint8"])
def test_quantize_dequantize_round_trip(qdt):
    scale, zp = 0.05, (0 if qdt == "int8" else 128)
    x = rnd((1, 8, 1, 16), 1, scale=2.0).astype(F16)
    x[0, 0, 0, :4] = [100.0, -100.0, 0.025, 0.075]  # clipping, and exact .5 ties (round half to even)
    b = MilBuilder()
    b.input("x", "fp16", x.shape)
    b.const("od", qdt)
    b.const("qs", F16(scale))
    b.const("zp", np.asarray(zp, dtype=np.int8 if qdt == "int8" else np.uint8)[()])
    b.op("q", "quantize", qdt, x.shape, input="x", output_dtype="od", scale="qs", zero_point="zp")
    b.op("y", "dequantize", "fp16", x.shape, input="q", scale="qs", zero_point="zp")
    out = run(b.text(["q", "y"]), {"x": x}, "fp16")
    info = np.iinfo(qdt)
    s32 = np.float32(F16(scale))
    qref = np.clip(np.round(x.astype(np.float32) / s32) + zp, info.min, info.max)  # np.round: half to even
    np.testing.assert_array_equal(out["q"], qref.astype(qdt))
    yref = ((qref - zp) * s32).astype(F16)
    np.testing.assert_array_equal(out["y"], yref)
    inside = (x.astype(np.float64) - zp * 0 > (info.min - zp) * scale) & (x.astype(np.float64) < (info.max - zp) * scale)
    assert np.all(np.abs(out["y"][inside].astype(np.float64) - x[inside]) <= scale / 2 + 2e-3)


def test_per_channel_dequantize_and_constexpr():
    q = np.random.default_rng(2).integers(-128, 128, size=(3, 4, 1, 1)).astype(np.int8)
    scales = np.array([0.5, 0.25, 0.125], F16)
    b = MilBuilder()
    b.input("x", "fp16", (1, 4, 1, 2))
    qlit = "tensor<int8, [3, 4, 1, 1]>([" + ", ".join(str(int(v)) for v in q.reshape(-1)) + "])"
    b.raw(f'tensor<fp16, [3, 4, 1, 1]> W = constexpr_affine_dequantize()[axis = int32(0), name = string("W"), '
          f'quantized_data = {qlit}, scale = tensor<fp16, [3]>([0.5, 0.25, 0.125]), zero_point = int8(1)];')
    for n, v in (("dl", [1, 1]), ("st", [1, 1]), ("pd", [0, 0, 0, 0])):
        b.const(n, np.array(v, np.int32))
    b.const("gr", np.int32(1))
    b.const("pt", "valid")
    b.op("y", "conv", "fp16", (1, 3, 1, 2), x="x", weight="W", strides="st", dilations="dl", pad="pd",
         pad_type="pt", groups="gr")
    x = rnd((1, 4, 1, 2), 5).astype(F16)
    y = run(b.text(["y"]), {"x": x}, "fp32")["y"]
    wref = (q[:, :, 0, 0].astype(np.float64) - 1) * f64(scales)[:, None]
    np.testing.assert_allclose(y[0, :, 0, :], wref @ f64(x[0, :, 0, :]), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------
# fp16 model: rounding after every op


def test_fp16_rounds_after_each_op_not_only_at_the_end():
    # (1+2^-10)^2 = 1 + 2^-9 + 2^-20 rounds to 1 + 2^-9 in fp16; subtracting 1 + 2^-9 then gives
    # 0 with per-op rounding, but 2^-20 (representable, subnormal) when only the end is rounded.
    a = np.full((1, 2), 1 + 2**-10, F16)
    c = np.full((1, 2), 1 + 2**-9, F16)
    b = MilBuilder()
    b.input("a", "fp16", (1, 2))
    b.input("c", "fp16", (1, 2))
    b.op("p", "mul", "fp16", (1, 2), x="a", y="a")
    b.op("d", "sub", "fp16", (1, 2), x="p", y="c")
    text = b.text(["d"])
    d16 = run(text, {"a": a, "c": c}, "fp16")["d"]
    d32 = run(text, {"a": a, "c": c}, "fp32")["d"]
    per_op = (((a.astype(F32) * a.astype(F32)).astype(F16)).astype(F32) - c.astype(F32)).astype(F16)
    end_only = (a.astype(np.float64) ** 2 - c.astype(np.float64)).astype(F16)
    np.testing.assert_array_equal(d16, per_op)
    assert np.all(d16 == 0) and np.all(end_only == F16(2**-20))
    assert not np.array_equal(d16, end_only)
    np.testing.assert_array_equal(d32, np.float32(2**-20))  # fp32 mode: exact


@EX
@given(seed=st.integers(0, 10**6))
def test_fp16_chain_matches_per_op_rounding_reference(seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal((1, 6, 1, 9)).astype(F16)
    w = r.standard_normal((1, 6, 1, 1)).astype(F16)
    b = MilBuilder()
    b.input("x", "fp16", x.shape)
    b.input("w", "fp16", w.shape)
    b.op("m", "mul", "fp16", x.shape, x="x", y="w")
    b.op("s", "sigmoid", "fp16", x.shape, x="m")
    b.op("y", "mul", "fp16", x.shape, x="m", y="s")
    res = run(b.text(["y", "s"]), {"x": x, "w": w}, "fp16")
    m = (f64(x) * f64(w)).astype(F16)
    s = (1 / (1 + np.exp(-f64(m)))).astype(F16)
    # sigmoid computed in fp32 may land one fp16 ulp away from the float64 reference at a tie
    # (seed 134: exact 0.50170898 is halfway between two fp16s), and that ulp of s can move y
    # by two ulps of y; so check s to one ulp and y exactly from the simulator's own s.
    assert np.all(np.abs(f64(res["s"]) - s) <= f64(np.spacing(s)))
    assert np.mean(res["s"] == s) > 0.95
    np.testing.assert_array_equal(res["y"], (f64(m) * f64(res["s"])).astype(F16))


# ---------------------------------------------------------------------------------------
# errors


def test_unknown_op_names_op_and_line():
    b = MilBuilder()
    b.input("x", "fp16", (1, 4))
    b.op("y", "frobnicate", "fp16", (1, 4), x="x")
    text = b.text(["y"])
    line = text.splitlines().index(next(ln for ln in text.splitlines() if "frobnicate" in ln)) + 1
    with pytest.raises(MilPlanError, match=rf"'y' at line {line}, column \d+: unknown op 'frobnicate'"):
        compile_program(parse(text))


def test_shape_mismatch_names_statement_line_column_and_types():
    b = MilBuilder()
    b.input("x", "fp16", (1, 4, 1, 8))
    b.input("w", "fp16", (1, 4, 1, 1))
    b.op("y", "add", "fp16", (1, 4, 1, 9), x="x", y="w")
    text = b.text(["y"])
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if " y = add" in ln)
    col = text.splitlines()[line - 1].index("tensor") + 1
    with pytest.raises(MilPlanError) as ei:
        compile_program(parse(text))
    msg = str(ei.value)
    assert f"statement 'y' at line {line}, column {col}" in msg
    assert "declared tensor<fp16, [1, 4, 1, 9]>" in msg and "give tensor<fp16, [1, 4, 1, 8]>" in msg
    assert ei.value.loc.line == line


def test_dtype_mismatch_and_non_const_argument_errors():
    b = MilBuilder()
    b.input("x", "fp16", (2, 3))
    b.input("i", "int32", (1,))
    b.op("y", "softmax", "fp16", (2, 3), x="x", axis="i")
    with pytest.raises(MilPlanError, match=r"axis=i must be a compile-time constant"):
        compile_program(parse(b.text(["y"])))
    b = MilBuilder()
    b.input("x", "fp16", (2, 3))
    b.input("z", "fp32", (2, 3))
    b.op("y", "add", "fp16", (2, 3), x="x", y="z")
    with pytest.raises(MilPlanError, match=r"share one dtype.*insert a cast"):
        compile_program(parse(b.text(["y"])))


def test_bad_broadcast_and_reshape_errors():
    with pytest.raises(MilPlanError, match=r"do not broadcast"):
        one("add", {"x": rnd((2, 3), 0), "y": rnd((4, 3), 1)}, {}, (2, 3), "fp16")
    with pytest.raises(MilPlanError, match=r"cannot reshape"):
        one("reshape", {"x": rnd((2, 3), 0)}, {"shape": np.array([4, 2], np.int32)}, (4, 2), "fp16")


def test_constant_folding_of_const_only_statements():
    b = MilBuilder()
    b.input("x", "fp16", (1, 3))
    b.const("a", np.array([[1.0, 2.0, 3.0]], F16))
    b.const("k", F16(2.0))
    b.op("a2", "mul", "fp16", (1, 3), x="a", y="k")
    b.op("y", "add", "fp16", (1, 3), x="x", y="a2")
    plan = compile_program(parse(b.text(["y"])), {}, "fp16")
    assert [n.name for n in plan.nodes] == ["y"]  # a2 was folded
    y = plan.run({"x": np.ones((1, 3), F16)})["y"]
    np.testing.assert_array_equal(y, [[3, 5, 7]])


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_sdpa(mask):
    h, L, S, E = 3, 5, 6, 4
    q, k, v = rnd((1, h, L, E), 1), rnd((1, h, S, E), 2), rnd((1, h, S, E + 1), 3)
    xs = {"query": q, "key": k, "value": v}
    causal = np.tril(np.ones((L, S), bool))[None, None]
    if mask == "bool":
        xs["attn_mask"] = causal
    elif mask == "float":
        xs["attn_mask"] = np.where(causal, 0.0, -65504.0)
    out, ins = one("scaled_dot_product_attention", xs, {}, (1, h, L, E + 1), "fp32")
    sc = np.einsum("bhle,bhse->bhls", f64(ins["query"]), f64(ins["key"])) / math.sqrt(E)
    if mask is not None:
        sc = np.where(causal, sc, -np.inf)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bhls,bhse->bhle", p, f64(ins["value"])), rtol=1e-5, atol=1e-6)


def test_unknown_argument_is_an_error():
    b = MilBuilder()
    b.input("x", "fp16", (2, 3))
    b.input("w", "fp16", (3, 2))
    b.const("bT", True)
    b.op("y", "matmul", "fp16", (2, 2), x="x", y="w", transpose_Y="bT")
    with pytest.raises(MilPlanError, match=r"unknown argument\(s\) transpose_Y .*transpose_y"):
        compile_program(parse(b.text(["y"])))


@EX
@given(c=st.integers(1, 9), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_fp16_native_casts_on_windows_and_transposes(c, n, seed):
    """fp16 mode widens inputs natively: a contiguous buffer, a window of a wider buffer (a
    last-axis slice: staging's 2-D reader) and a transpose of a whole buffer (widened in memory
    order, viewed permuted). Each must give the numbers of numpy's exact widening: elementwise
    results bit-equal to widen -> fp32 op -> round; the matmul within one fp16 ulp of float64 plus
    the fp32 accumulation bound."""
    from rustane import native

    r = np.random.default_rng(seed)
    x = (r.standard_normal((1, c, 1, 2 * n)) * 4).astype(F16)
    b = MilBuilder()
    b.input("x", "fp16", x.shape)
    b.const("b0", np.array([0, 0, 0, 0], np.int32))
    b.const("b1", np.array([0, 0, 0, n], np.int32))
    b.const("sz", np.array([1, c, 1, n], np.int32))
    b.const("r4", np.array([1, 1, c, 2 * n], np.int32))
    b.const("ra", np.array([1, 1, c, n], np.int32))
    b.const("pm", np.array([0, 1, 3, 2], np.int32))
    b.const("bF", False)
    b.op("a", "slice_by_size", "fp16", (1, c, 1, n), x="x", begin="b0", size="sz")
    b.op("bb", "slice_by_size", "fp16", (1, c, 1, n), x="x", begin="b1", size="sz")
    b.op("prod", "mul", "fp16", (1, c, 1, n), x="a", y="bb")  # two windows
    b.op("e", "exp", "fp16", (1, c, 1, n), x="a")  # unary on a window
    b.op("h", "add", "fp16", x.shape, x="x", y="x")  # contiguous
    b.op("h4", "reshape", "fp16", (1, 1, c, 2 * n), x="h", shape="r4")
    b.op("ht", "transpose", "fp16", (1, 1, 2 * n, c), x="h4", perm="pm")  # whole-buffer transpose
    b.op("a4", "reshape", "fp16", (1, 1, c, n), x="a", shape="ra")
    b.op("mm", "matmul", "fp16", (1, 1, 2 * n, n), x="ht", y="a4", transpose_x="bF", transpose_y="bF")
    calls = {"unstage": 0, "f16_to_f32": 0}
    orig = {k: getattr(native, k) for k in calls}

    def counting(name):
        def f(*args, **kw):
            calls[name] += 1
            return orig[name](*args, **kw)
        return f

    try:
        for k in calls:
            setattr(native, k, counting(k))
        res = run(b.text(["prod", "e", "mm"]), {"x": x}, "fp16")
    finally:
        for k, f in orig.items():
            setattr(native, k, f)
    # the native paths ran (a one-row slice is contiguous: it takes the plain conversion)
    assert calls["unstage"] >= (2 if c > 1 else 0) and calls["f16_to_f32"] >= 2, calls
    xa, xb = x[..., :n].astype(F32), x[..., n:].astype(F32)
    np.testing.assert_array_equal(res["prod"].view(np.uint16), (xa * xb).astype(F16).view(np.uint16))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(res["e"].view(np.uint16), np.exp(xa).astype(F16).view(np.uint16))
    h = (x.astype(F32) + x.astype(F32)).astype(F16)
    ref = (f64(h).reshape(c, 2 * n).T @ f64(x[0, :, 0, :n])).astype(F16)
    got = res["mm"].reshape(2 * n, n)
    fin = np.isfinite(ref)
    # got rounds an fp32 dot product, ref a float64 one: they may differ by one fp16 ulp of the result
    # plus the fp32 accumulation error, which under cancellation can exceed that ulp. The standard
    # bound for a length-c fp32 dot product is c * 2^-24 * sum|h_i a_i| (Higham, Accuracy and
    # Stability, eq. 3.5); a wrong transpose or window is off by O(|result|), far outside it.
    acc = c * 2.0**-24 * (np.abs(f64(h).reshape(c, 2 * n).T) @ np.abs(f64(x[0, :, 0, :n])))
    bound = f64(np.spacing(np.abs(ref))) + acc
    assert np.all(np.abs(f64(got[fin]) - f64(ref[fin])) <= bound[fin])
