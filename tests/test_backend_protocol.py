"""What every backend must do, run on every backend available here.

The ``any_backend`` fixture is parametrized from the registry (``rustane.backends``): every
user-facing backend that is available, in every precision it offers. On plain Linux that is the
simulator in fp16 and fp32; inside the contract tier's ``-Dane_fake=true`` build (which runs this
file too, see tests/test_ane_contract.py) it adds the ANE backend over the fake framework; on a
Mac, the Neural Engine itself. A new backend module gets all of these tests with no edit here.

References are independent: numpy written here or in tests/kernel_refs.py (from the equations),
never the simulator's own output.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import kernel_refs as R
from rustane import backends
from rustane.config import preset
from rustane.models.llama.plan import KernelShape, plan_for
from rustane.runtime.plan import compile_spec, pack_input, unpack_outputs

PARAMS = [(name, precision)
          for name, reason in backends.available().items() if not reason and backends.info(name).cli
          for precision in backends.precisions(name)]
#: max |got - ref| / max |ref| per tap (fp16: inputs and every op rounded, ~10 ulps; fp32: exact math)
TOL = {"fp16": 5e-3, "fp32": 1e-5}
HEADER = (
    "program(1.3)\n"
    '[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, {"coremlc-version", "3505.4.1"}, '
    '{"coremltools-component-milinternal", ""}, {"coremltools-version", "9.0"}})]\n'
)
C, S = 64, 32  # [1, 64, 1, 32] fp16 = 4 KiB surfaces: inside every chip's limits (docs/ane-rules.md)


@pytest.fixture(params=PARAMS, ids=[f"{n}-{p}" for n, p in PARAMS])
def any_backend(request):
    name, precision = request.param
    be = backends.get(name, precision=precision)
    be.test_precision = precision
    yield be


def _t(shape, dtype="fp16") -> str:
    return f"tensor<{dtype}, [{', '.join(map(str, shape))}]>"


def two_input_mil(dtype="fp16") -> str:
    """z = a * b + a and w = a - b; params declared b before a, outputs w before z."""
    t = _t((1, C, 1, S), dtype)
    return (HEADER + "{\n"
            f"    func main<ios18>({t} b, {t} a) {{\n"
            f"        {t} m = mul(x=a, y=b)[name=string(\"m\")];\n"
            f"        {t} z = add(x=m, y=a)[name=string(\"z\")];\n"
            f"        {t} w = sub(x=a, y=b)[name=string(\"w\")];\n"
            "    } -> (z, w);\n}\n")


def _dtype(be) -> str:
    return "fp32" if be.test_precision == "fp32" else "fp16"


def _round(x: np.ndarray, be) -> np.ndarray:
    """What a value is after one operation in the backend's precision."""
    return x.astype(np.float16).astype(np.float64) if be.test_precision == "fp16" else x.astype(np.float32)


def test_every_available_backend_is_under_test():
    assert ("sim", "fp16") in PARAMS and ("sim", "fp32") in PARAMS
    if os.environ.get("RUSTANE_ANE_CONTRACT_INNER"):
        assert ("ane", "fp16") in PARAMS, "the fake-framework build must put the ANE backend under test"


def test_inputs_and_outputs_are_sorted_by_name(any_backend):
    k = any_backend.compile(two_input_mil(_dtype(any_backend)), {}, "sorted")
    try:
        assert [s.name for s in k.inputs] == ["a", "b"] and [s.name for s in k.outputs] == ["w", "z"]
        for s in k.inputs + k.outputs:
            assert s.shape == (1, C, 1, S) and s.view_shape == (C, S)
            assert s.nbytes == C * S * np.dtype(s.dtype).itemsize
    finally:
        k.close()


def test_eval_matches_numpy_and_requests_are_reusable(any_backend):
    k = any_backend.compile(two_input_mil(_dtype(any_backend)), {}, "elementwise")
    rng = np.random.default_rng(1)
    a_buf, b_buf = (k.alloc(s) for s in k.inputs)
    w_buf, z_buf = (k.alloc(s) for s in k.outputs)
    req = k.request([a_buf, b_buf], [w_buf, z_buf])  # built once, evaluated twice
    for _ in range(2):
        a = rng.standard_normal((C, S)).astype(a_buf.spec.dtype)
        b = rng.standard_normal((C, S)).astype(b_buf.spec.dtype)
        a_buf.write(a)
        b_buf.write(b)
        req.eval()
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        z_ref = _round(_round(a64 * b64, any_backend) + a64, any_backend)
        w_ref = _round(a64 - b64, any_backend)
        # the elementwise ops round exactly like the reference: equal, not close
        np.testing.assert_array_equal(z_buf.read().astype(np.float64), z_ref.astype(np.float64))
        np.testing.assert_array_equal(w_buf.read().astype(np.float64), w_ref.astype(np.float64))
    k.close()
    k.close()  # idempotent


def test_staging_round_trip(any_backend):
    """What is written to a buffer reads back bit for bit, through ``write``/``read`` and ``lock``."""
    k = any_backend.compile(two_input_mil(_dtype(any_backend)), {}, "staging")
    rng = np.random.default_rng(2)
    for spec in k.inputs + k.outputs:
        buf = k.alloc(spec)
        x = (rng.standard_normal(spec.view_shape) * 100).astype(spec.dtype)
        buf.write(x)
        got = buf.read()
        assert got.shape == spec.view_shape and got.dtype == np.dtype(spec.dtype)
        np.testing.assert_array_equal(got.view(np.uint8), x.view(np.uint8))
        with buf.lock() as view:
            assert view.shape == spec.view_shape
            view[3, 5] = 7
        after = buf.read()
        assert after[3, 5] == 7 and after[3, 4] == x[3, 4]
        # (locks do not nest on the ANE: no read() inside a lock)
        with buf.lock(readonly=True) as view:
            np.testing.assert_array_equal(view, after)
    k.close()


def test_bad_buffers_are_refused_naming_the_kernel(any_backend):
    dt = _dtype(any_backend)
    k = any_backend.compile(two_input_mil(dt), {}, "strict")
    other = any_backend.compile(HEADER + "{\n"
                                f"    func main<ios18>({_t((1, C, 1, 2 * S), dt)} a) {{\n"
                                f"        {_t((1, C, 1, 2 * S), dt)} z = add(x=a, y=a)[name=string(\"z\")];\n"
                                "    } -> (z);\n}\n", {}, "wide")
    ins = [k.alloc(s) for s in k.inputs]
    outs = [k.alloc(s) for s in k.outputs]
    wide = other.alloc(other.inputs[0])
    with pytest.raises(ValueError, match="strict"):
        k.request([ins[0], wide], outs)  # wrong shape
    with pytest.raises(ValueError, match="strict"):
        k.request(ins[:1], outs)  # too few inputs
    with pytest.raises(ValueError):
        k.alloc(other.inputs[0])  # not one of this kernel's tensors
    k.request(ins, outs).eval()  # the right buffers still work
    k.close()
    other.close()


def test_bad_mil_is_refused_at_compile(any_backend):
    bad = two_input_mil(_dtype(any_backend)).replace("add(x=m, y=a)", "add(x=m, y=nowhere)")
    with pytest.raises(ValueError, match="nowhere"):
        any_backend.compile(bad, {}, "broken")


@pytest.mark.parametrize("kernel", ["ffnFused", "wotBwd"])
def test_a_model_kernel_matches_the_numpy_reference(any_backend, kernel):
    """A real kernel of the tiny preset (blocks packed into one input, taps unpacked from one
    output) against tests/kernel_refs.py."""
    shape = KernelShape.of(preset("tiny"), _dtype(any_backend))
    spec = plan_for(shape)[kernel]
    k = compile_spec(any_backend, spec)
    rng = np.random.default_rng(3)
    arrays = {}
    for b in spec.blocks:
        a = rng.standard_normal(b.source_shape) * (0.15 if b.kind == "weight" else 1.0)
        arrays[b.name] = _round(a, any_backend).astype(np.float64)
    inb, outb = k.alloc(k.inputs[0]), k.alloc(k.outputs[0])
    inb.write(pack_input(spec, arrays, dtype=k.inputs[0].dtype))
    k.eval([inb], [outb])
    got = {n: v.astype(np.float64) for n, v in unpack_outputs(spec, outb.read()).items()}
    alpha = float(np.float16(shape.residual_alpha))
    if kernel == "ffnFused":
        ref = R.ffn_fwd(arrays["x2n"], arrays["x2"], arrays["w1"], arrays["w3"], arrays["w2"], alpha=alpha)
    else:
        ref = R.wot_bwd(arrays["dx2s"], arrays["wo"])
    assert set(ref) <= set(got)
    for tap, r in ref.items():
        err = np.abs(got[tap] - r).max() / np.abs(r).max()
        assert err <= TOL[any_backend.test_precision], f"{kernel} tap {tap}: relative error {err:.3g}"
    k.close()
