"""Sim and null backends: registry, I/O specs and ordering, buffer validation, numerics modes."""

from __future__ import annotations

import numpy as np
import pytest

from milbuild import MilBuilder
from rustane import backends
from rustane.backends.base import HostBuffer, TensorSpec
from rustane.backends.null import NullBackend
from rustane.backends.sim import SimBackend
from rustane.mil.errors import MilCheckError

F16, F32 = np.float16, np.float32


def dyn_matmul_text(ic: int, oc: int, s: int) -> str:
    """The dynamic-weight linear layer of docs/ane-runtime.md#dynamic-weights: input [1, IC, 1, S+OC] packs
    activations x [IC, S] then a weight M [IC, OC]; out[o, s] = sum_d x[d, s] * M[d, o]."""
    b = MilBuilder()
    b.input("x", "fp16", (1, ic, 1, s + oc))
    b.const("b0", np.array([0, 0, 0, 0], np.int32))
    b.const("sz0", np.array([1, ic, 1, s], np.int32))
    b.const("b1", np.array([0, 0, 0, s], np.int32))
    b.const("sz1", np.array([1, ic, 1, oc], np.int32))
    b.op("act", "slice_by_size", "fp16", (1, ic, 1, s), x="x", begin="b0", size="sz0")
    b.op("wt", "slice_by_size", "fp16", (1, ic, 1, oc), x="x", begin="b1", size="sz1")
    b.const("r1", np.array([1, 1, ic, s], np.int32))
    b.op("a2", "reshape", "fp16", (1, 1, ic, s), x="act", shape="r1")
    b.const("pm", np.array([0, 1, 3, 2], np.int32))
    b.op("a3", "transpose", "fp16", (1, 1, s, ic), x="a2", perm="pm")
    b.const("r2", np.array([1, 1, ic, oc], np.int32))
    b.op("w2", "reshape", "fp16", (1, 1, ic, oc), x="wt", shape="r2")
    b.const("bF", False)
    b.op("mm", "matmul", "fp16", (1, 1, s, oc), x="a3", y="w2", transpose_x="bF", transpose_y="bF")
    b.op("mt", "transpose", "fp16", (1, 1, oc, s), x="mm", perm="pm")
    b.const("r3", np.array([1, oc, 1, s], np.int32))
    b.op("out", "reshape", "fp16", (1, oc, 1, s), x="mt", shape="r3")
    return b.text(["out"])


def two_io_text(c: int = 64, s: int = 256) -> str:
    """Inputs declared zeta, alpha; outputs returned (zz, aa): zz = zeta - alpha, aa = zeta * alpha.
    All I/O tensors have the same byte size (the checker requires uniform surfaces)."""
    b = MilBuilder()
    b.input("zeta", "fp16", (1, c, 1, s))
    b.input("alpha", "fp16", (1, c, 1, s))
    b.op("zz", "sub", "fp16", (1, c, 1, s), x="zeta", y="alpha")
    b.op("aa", "mul", "fp16", (1, c, 1, s), x="zeta", y="alpha")
    return b.text(["zz", "aa"])


def test_registry():
    be = backends.get("sim", precision="fp16")
    assert isinstance(be, SimBackend) and be.precision == "fp16"
    assert backends.get("sim", precision="fp32").precision == "fp32"
    assert isinstance(backends.get("null"), NullBackend)
    with pytest.raises(ValueError, match="precision"):
        SimBackend(precision="bf16")
    with pytest.raises(ValueError, match="io_dtype"):
        SimBackend(io_dtype="int8")


def test_alphabetical_io_order_and_eval():
    k = SimBackend().compile(two_io_text(), name="two")
    assert [s.name for s in k.inputs] == ["alpha", "zeta"]
    assert [s.name for s in k.outputs] == ["aa", "zz"]
    assert all(s.dtype == F16 and s.view_shape == (64, 256) for s in k.inputs + k.outputs)
    ins = [k.alloc(s) for s in k.inputs]
    outs = [k.alloc(s) for s in k.outputs]
    r = np.random.default_rng(0)
    a, z = r.standard_normal((64, 256)).astype(F16), r.standard_normal((64, 256)).astype(F16)
    ins[0].write(a)
    ins[1].write(z)
    req = k.request(ins, outs)
    req.eval()
    np.testing.assert_array_equal(outs[0].read(), (z.astype(np.float64) * a).astype(F16))
    np.testing.assert_array_equal(outs[1].read(), (z.astype(np.float64) - a).astype(F16))
    # the request reads its input buffers at every eval
    ins[0].write(np.ones((64, 256), F16))
    req.eval()
    np.testing.assert_array_equal(outs[0].read(), z)


def test_request_validation_errors():
    k = SimBackend().compile(two_io_text(), name="two")
    ins = [k.alloc(s) for s in k.inputs]
    outs = [k.alloc(s) for s in k.outputs]
    with pytest.raises(ValueError, match=r"takes 2 input\(s\) in this order: alpha, zeta; got 1"):
        k.request(ins[:1], outs)
    wrong = HostBuffer(TensorSpec("alpha", np.dtype(F32), (1, 64, 1, 256)))
    with pytest.raises(ValueError, match=r"input 0 \('alpha'\) needs a float16 buffer .* got float32"):
        k.request([wrong, ins[1]], outs)
    small = HostBuffer(TensorSpec("aa", np.dtype(F16), (1, 32, 1, 256)))
    with pytest.raises(ValueError, match=r"output 0 \('aa'\) .*\[1, 64, 1, 256\].*\[1, 32, 1, 256\]"):
        k.request(ins, [small, outs[1]])
    with pytest.raises(TypeError, match="HostBuffer"):
        k.request([object(), ins[1]], outs)
    # the declaration order (zeta, alpha): same shapes, so only the names tell (docs/ane-rules.md#io-order)
    with pytest.raises(ValueError, match=r"input 0 is the buffer of 'zeta', but position 0 feeds 'alpha'.*"
                                         r"io-order, see docs/ane-rules\.md#io-order"):
        k.request([ins[1], ins[0]], outs)
    with pytest.raises(ValueError, match=r"output 0 is the buffer of 'zz'.*kernel\.outputs \(aa, zz\)"):
        k.request(ins, [outs[1], outs[0]])
    with pytest.raises(ValueError, match="bound as both input and output"):
        k.request(ins, [ins[0], outs[1]])
    with pytest.raises(ValueError, match="no input or output spec"):
        k.alloc(TensorSpec("nope", np.dtype(F16), (1, 1, 1, 1)))


def test_dynamic_weight_matmul_kernel_fp16_and_exact_fp32():
    ic, oc, s = 16, 8, 32
    text = dyn_matmul_text(ic, oc, s)
    r = np.random.default_rng(1)
    x = r.standard_normal((ic, s))
    m = r.standard_normal((ic, oc))
    packed = np.concatenate([x, m], axis=1)

    # fp16: fp16 buffers, one rounding of an fp32-accumulated product
    k = SimBackend(precision="fp16", check=False).compile(text)
    (spec_in,), (spec_out,) = k.inputs, k.outputs
    assert spec_in.view_shape == (ic, s + oc) and spec_out.view_shape == (oc, s)
    bi, bo = k.alloc(spec_in), k.alloc(spec_out)
    bi.write(packed.astype(F16))
    k.eval([bi], [bo])
    p16 = packed.astype(F16).astype(np.float64)
    ref16 = (p16[:, s:].T @ p16[:, :s])  # [OC, S]
    got = bo.read()
    assert got.dtype == F16
    ulp = np.spacing(np.abs(ref16).astype(F16)).astype(np.float64)
    # fp32 accumulation is within ic * 2^-23 * sum|terms| of exact; then one fp16 rounding
    bound = 0.5 * ulp + ic * 2.0**-23 * (np.abs(p16[:, s:]).T @ np.abs(p16[:, :s]))
    assert np.all(np.abs(got - ref16) <= bound)

    # fp32 with io_dtype="fp32": exact math end to end on fp32 buffers
    k32 = SimBackend(precision="fp32", io_dtype="fp32", check=False).compile(text)
    assert k32.inputs[0].dtype == F32 and k32.outputs[0].dtype == F32
    bi, bo = k32.alloc(k32.inputs[0]), k32.alloc(k32.outputs[0])
    bi.write(packed.astype(F32))
    k32.eval([bi], [bo])
    p32 = packed.astype(F32).astype(np.float64)
    np.testing.assert_allclose(bo.read(), p32[:, s:].T @ p32[:, :s], rtol=1e-5, atol=1e-5)

    # fp32 precision with the MIL's fp16 I/O: fp32 math on fp16 inputs, output rounded once
    kf = SimBackend(precision="fp32", check=False).compile(text)
    assert kf.inputs[0].dtype == F16
    bi, bo = kf.alloc(kf.inputs[0]), kf.alloc(kf.outputs[0])
    bi.write(packed.astype(F16))
    kf.eval([bi], [bo])
    assert np.all(np.abs(bo.read() - ref16) <= bound)


def test_checker_errors_raise_and_warnings_are_kept():
    b = MilBuilder()
    b.input("x", "fp16", (1, 64, 1, 256))
    b.op("y", "gelu", "fp16", (1, 64, 1, 256), x="x")
    text = b.text(["y"])
    with pytest.raises(MilCheckError, match="gelu"):
        SimBackend(check=True).compile(text, name="g")
    k = SimBackend(check=False).compile(text)  # the simulator itself can run it
    assert k.diagnostics == []
    k = SimBackend(check=True).compile(two_io_text(c=8, s=16))  # 256-byte surfaces: below ~49 KB
    assert any(d.rule == "surface-size" and not d.is_error for d in k.diagnostics)


def test_non_rank4_io_view_shape_is_mil_shape():
    b = MilBuilder()
    b.input("x", "fp32", (3, 5))
    b.op("y", "exp", "fp32", (3, 5), x="x")
    k = SimBackend(precision="fp16", check=False).compile(b.text(["y"]))
    assert k.inputs[0].view_shape == (3, 5) and k.inputs[0].dtype == F32
    bi, bo = k.alloc(k.inputs[0]), k.alloc(k.outputs[0])
    x = np.linspace(-2, 2, 15, dtype=F32).reshape(3, 5)
    bi.write(x)
    k.eval([bi], [bo])
    np.testing.assert_allclose(bo.read(), np.exp(x.astype(np.float64)), rtol=1e-6)


def test_compile_errors_carry_location():
    b = MilBuilder()
    b.input("x", "fp16", (1, 4, 1, 8))
    b.op("y", "softmax_typo", "fp16", (1, 4, 1, 8), x="x")
    from rustane.mil.interp import MilPlanError

    with pytest.raises(MilPlanError, match=r"line 5, column \d+: unknown op 'softmax_typo'"):
        SimBackend(check=False).compile(b.text(["y"]))


def test_null_backend_specs_match_sim_and_eval_does_nothing():
    text = two_io_text()
    ks, kn = SimBackend().compile(text), NullBackend().compile(text)
    assert ks.inputs == kn.inputs and ks.outputs == kn.outputs
    ins = [kn.alloc(s) for s in kn.inputs]
    outs = [kn.alloc(s) for s in kn.outputs]
    ins[0].write(np.ones((64, 256), F16))
    outs[0].write(np.full((64, 256), 7, F16))
    kn.request(ins, outs).eval()
    assert np.all(outs[0].read() == 7)
    with pytest.raises(ValueError, match="takes 2 output"):
        kn.request(ins, outs[:1])
    dm = dyn_matmul_text(16, 8, 32)
    assert SimBackend(check=False).compile(dm).outputs == NullBackend().compile(dm).outputs


def test_io_dtype_fp32_with_fp16_precision_rounds_inputs_on_entry():
    b = MilBuilder()
    b.input("x", "fp16", (1, 4, 1, 8))
    b.const("one", np.float16(1.0))
    b.op("y", "add", "fp16", (1, 4, 1, 8), x="x", y="one")
    k = SimBackend(precision="fp16", io_dtype="fp32", check=False).compile(b.text(["y"]))
    assert k.inputs[0].dtype == F32 and k.outputs[0].dtype == F32
    bi, bo = k.alloc(k.inputs[0]), k.alloc(k.outputs[0])
    x = np.full((4, 8), 1e-4, F32)  # 1 + 1e-4 is not an fp16 number: rounds to 1 in fp16
    bi.write(x)
    k.eval([bi], [bo])
    expect = (x.astype(F16).astype(np.float64) + 1).astype(F16).astype(F32)
    np.testing.assert_array_equal(bo.read(), expect)
    assert np.all(bo.read() == 1.0)


def test_outputs_written_in_place_and_transposes_materialized_per_request():
    """Binding details the engine relies on: a computed output goes straight into its request's
    output buffer (no shared scratch between requests of one kernel), an output that later ops
    also read still feeds them, and a transpose read by elementwise ops is copied once in memory
    order without changing any value. Checked against numpy for two requests interleaved."""
    c, s = 8, 16
    b = MilBuilder()
    b.input("x", "fp32", (1, c, 1, s))
    b.const("pm", np.array([0, 3, 2, 1], np.int32))
    b.const("two", F32(2.0))
    b.op("t", "transpose", "fp32", (1, s, 1, c), x="x", perm="pm")  # read by mul and sigmoid
    b.op("u", "mul", "fp32", (1, s, 1, c), x="t", y="two")
    b.op("g", "sigmoid", "fp32", (1, s, 1, c), x="t")
    b.op("v", "add", "fp32", (1, s, 1, c), x="u", y="g")  # an output ...
    b.op("w", "mul", "fp32", (1, s, 1, c), x="v", y="v")  # ... that a later op reads
    text = b.text(["v", "w"])
    k = SimBackend(precision="fp32", check=False).compile(text, name="k")
    ins = [k.alloc(k.inputs[0]) for _ in range(2)]
    outs = [[k.alloc(spec) for spec in k.outputs] for _ in range(2)]
    reqs = [k.request([ins[i]], outs[i]) for i in range(2)]
    r = np.random.default_rng(0)
    xs = [r.standard_normal((c, s)).astype(F32) for _ in range(2)]
    for i in range(2):
        ins[i].write(xs[i])
    for i in (0, 1):
        reqs[i].eval()
    for i in range(2):
        t = xs[i].T.astype(np.float64)
        v = 2 * t + 1 / (1 + np.exp(-t))
        got_v, got_w = (o.read().reshape(s, c) for o in outs[i])
        np.testing.assert_allclose(got_v, v, rtol=1e-6, atol=1e-6)  # 2t + σ(t) cancels near t = -0.2
        np.testing.assert_allclose(got_w, v * v, rtol=3e-6, atol=1e-9)
