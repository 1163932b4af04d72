"""The ios16 dialect rewrite: same programs, older spelling (docs/ane-runtime.md#mil-text)."""

import re

import numpy as np
import pytest

from rustane import kernels
from rustane.backends import get
from rustane.mil import emit, parse
from rustane.mil.dialect import to_dialect

SHAPES = {
    "gqa": dict(dim=48, hidden_dim=80, n_heads=6, n_kv_heads=2, head_dim=8, seq_len=10, residual_alpha=0.5),
    "mha": dict(dim=32, hidden_dim=48, n_heads=4, n_kv_heads=4, head_dim=8, seq_len=12, rope_theta=1e6),
}
BARE_SCALAR = re.compile(r"(?<![<\w])(bool|int32|fp16|fp32|string|uint64)\(")


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_kernel_converts_and_computes_the_same(shape):
    sim = get("sim", precision="fp16", check=False)
    rng = np.random.default_rng(0)
    for name, spec in kernels.plan_for(**SHAPES[shape]).items():
        t18 = kernels.render(spec)
        t16 = emit(to_dialect(parse(t18), "ios16"))
        assert t16.startswith("program(1.0)") and "func main<ios16>" in t16
        assert "dict<tensor<string, []>, tensor<string, []>>" in t16
        assert not BARE_SCALAR.findall(t16), f"{name}: short scalar left in the ios16 text"
        # and back: the ios18 spelling of the ios16 text is the original program
        assert emit(to_dialect(parse(t16), "ios18")).replace(" ", "").count("tensor<bool,[]>") == 0
        k18, k16 = sim.compile(t18, dict(spec.blobs)), sim.compile(t16, dict(spec.blobs))
        ins = [k18.alloc(s) for s in k18.inputs]
        with ins[0].lock() as a:
            a[...] = (rng.standard_normal(a.shape) * 0.3).astype(np.float16)
        o18, o16 = [k18.alloc(s) for s in k18.outputs], [k16.alloc(s) for s in k16.outputs]
        k18.eval(ins, o18)
        k16.eval(ins, o16)
        assert np.array_equal(o18[0].read(), o16[0].read()), name


def test_unknown_dialect_is_refused():
    prog = parse(kernels.render(kernels.plan_for(**SHAPES["mha"])["wotBwd"]))
    with pytest.raises(ValueError, match="ios17"):
        to_dialect(prog, "ios17")
