"""The fused kernels of docs/design.md against independent numpy math and finite differences.

Every kernel is rendered from mil_templates/, parsed, checked against the ANE rules and run on the
simulator in fp32 (exact math, fp32 I/O) and fp16 (the ANE model, fp16 I/O). References come from
tests/kernel_refs.py, which is written from the equations (per-head loops, complex RoPE), and the
backward kernels are also checked against central finite differences of the forward math.

Tolerances (max |kernel − ref| / max |ref| per tap):
- fp32: 1e-5. The reference uses the kernel's fp16 constants (attention scale, α, RoPE tables)
  because those are part of the kernel contract; what remains is fp32 rounding (observed ≤ 1.1e-6).
- fp16: 5e-3 (~10 fp16 ulps of the largest value). Inputs are rounded to fp16 and every op rounds
  to fp16 (unit roundoff 4.9e-4); chains of up to ~12 rounded ops, including fp16-rounded softmax
  probabilities, stay below 2e-3 in practice.
"""

from __future__ import annotations

import re
import string
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernel_refs as R
from rustane import backends
from rustane import kernels as K
from rustane.mil.blob import read_blob
from rustane.mil.check import check
from rustane.mil.parser import parse
from rustane.mil.render import strip_comments

# The fp16 model rounds scores + (−65504) to −inf for negative scores: harmless (softmax gives 0,
# the diagonal is never masked), and what a saturating ANE add would also make irrelevant.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

TOL = {"fp32": 1e-5, "fp16": 5e-3}

SHAPES = {
    # GQA ratio 3, head_dim 64, α ≠ 1
    "gqa3": K.KernelShape(dim=96, hidden_dim=160, n_heads=6, n_kv_heads=2, head_dim=64, seq_len=24,
                          rope_theta=1e4, residual_alpha=0.5),
    # MHA, head_dim 128 (1/sqrt(128) is not exact in fp16), theta 1e6
    "mha128": K.KernelShape(dim=128, hidden_dim=192, n_heads=2, n_kv_heads=2, head_dim=128, seq_len=40,
                            rope_theta=1e6, residual_alpha=0.35355339),
    # multi-query (R = 4), theta 1e6, α = 1
    "mqa4": K.KernelShape(dim=64, hidden_dim=96, n_heads=4, n_kv_heads=1, head_dim=64, seq_len=24,
                          rope_theta=1e6, residual_alpha=1.0),
}
# tiny shapes for element-wise finite differences (mask and GQA still non-trivial)
TINY_GQA = K.KernelShape(dim=16, hidden_dim=24, n_heads=6, n_kv_heads=2, head_dim=8, seq_len=6, rope_theta=1e4,
                         residual_alpha=0.75)
TINY_MHA = K.KernelShape(dim=12, hidden_dim=20, n_heads=2, n_kv_heads=2, head_dim=8, seq_len=5, rope_theta=1e6,
                         residual_alpha=0.5)

FORBIDDEN_OPS = {"gelu", "silu", "reduce_mean", "scaled_dot_product_attention", "cast", "rsqrt"}
HEADER = (
    "program(1.3)\n"
    '[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, {"coremlc-version", "3505.4.1"}, '
    '{"coremltools-component-milinternal", ""}, {"coremltools-version", "9.0"}})]\n{\n'
)


# -- helpers ----------------------------------------------------------------------------------


def _heads(shape: K.KernelShape) -> dict:
    return dict(n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads, head_dim=shape.head_dim)


def _consts(shape: K.KernelShape) -> dict:
    """The kernel's fp16 constants, as the reference must use them."""
    return dict(scale=float(np.float16(1 / np.sqrt(shape.head_dim))), alpha=float(np.float16(shape.residual_alpha)))


_BACKENDS = {
    "fp32": lambda: backends.get("sim", precision="fp32", io_dtype="fp32"),
    "fp16": lambda: backends.get("sim", precision="fp16"),
}
_COMPILED: dict = {}


def _kernel(shape: K.KernelShape, name: str, precision: str):
    key = (shape, name, precision)
    if key not in _COMPILED:
        spec = K.plan_for(shape)[name]
        _COMPILED[key] = (spec, K.compile_spec(_BACKENDS[precision](), spec))
    return _COMPILED[key]


def run_kernel(shape: K.KernelShape, name: str, precision: str, arrays: dict) -> dict[str, np.ndarray]:
    """Pack ``arrays``, evaluate the kernel on the sim backend, return its taps as float64."""
    spec, kern = _kernel(shape, name, precision)
    assert [s.name for s in kern.inputs] == ["x"] and [s.name for s in kern.outputs] == ["out"]
    assert kern.inputs[0].shape == spec.in_shape and kern.outputs[0].shape == spec.out_shape
    dtype = kern.inputs[0].dtype
    inb, outb = kern.alloc(kern.inputs[0]), kern.alloc(kern.outputs[0])
    inb.write(K.pack_input(spec, arrays, dtype=dtype))
    kern.eval([inb], [outb])
    return {k: v.astype(np.float64) for k, v in K.unpack_outputs(spec, outb.read()).items()}


def random_inputs(spec: K.KernelSpec, rng: np.random.Generator, precision: str) -> dict[str, np.ndarray]:
    """Random block contents (weights ~0.2-scaled so activations stay O(1)), fp16-exact in fp16 mode."""
    out = {}
    for b in spec.blocks:
        a = rng.standard_normal(b.source_shape) * (0.15 if b.kind == "weight" else 1.0)
        out[b.name] = _q(a) if precision == "fp16" else a.astype(np.float32).astype(np.float64)
    return out


def _q(a) -> np.ndarray:
    """Round to fp16 (the values the kernel actually sees), back to float64."""
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float64)


def assert_close(got: dict, ref: dict, tol: float, what: str, floor: float = 1e-30) -> None:
    """max |got − ref| <= tol · max(max |ref|, floor) for every tap of ``ref``."""
    for k, r in ref.items():
        err = np.abs(got[k] - r).max() / max(np.abs(r).max(), floor)
        assert err <= tol, f"{what}: tap {k!r} relative error {err:.3g} > {tol:g}"


def reference(shape: K.KernelShape, name: str, a: dict) -> dict:
    c, h = _consts(shape), _heads(shape)
    theta = shape.rope_theta
    if name == "sdpaFwd":
        return R.sdpa_fwd(a["xn"], a["x"], a["wq"], a["wk"], a["wv"], a["wo"], theta=theta, **c, **h)
    if name == "ffnFused":
        return R.ffn_fwd(a["x2n"], a["x2"], a["w1"], a["w3"], a["w2"], alpha=c["alpha"])
    if name == "ffnBwdW2t":
        return R.ffn_bwd_w2t(a["df"], a["w2"])
    if name == "ffnBwdW13t":
        return R.ffn_bwd_w13t(a["dgate"], a["h1"], a["h3"], a["w1"], a["w3"])
    if name == "wotBwd":
        return R.wot_bwd(a["dx2s"], a["wo"])
    if name == "sdpaBwd1":
        return R.sdpa_bwd1(a["q_rope"], a["k_rope"], a["v"], a["da"], scale=c["scale"], **h)
    if name == "sdpaBwd2":
        return R.sdpa_bwd2(a["P"], a["dP"], a["q_rope"], a["k_rope"], scale=c["scale"], **h)
    if name == "qBwd":
        return R.q_bwd(a["dq"], a["wq"])
    if name == "kvBwd":
        return R.kv_bwd(a["dk"], a["dv"], a["wk"], a["wv"])
    if name == "qkvBwd":
        return R.qkv_bwd(a["dq"], a["dk"], a["dv"], a["wq"], a["wk"], a["wv"])
    raise AssertionError(name)


def _cases():
    for sname, shape in SHAPES.items():
        for kname in K.plan_for(shape):
            yield sname, kname


# -- rendering, parsing, ANE rules ------------------------------------------------------------


@pytest.mark.parametrize("sname", list(SHAPES))
def test_render_parse_check_every_kernel(sname):
    shape = SHAPES[sname]
    for name, spec in K.plan_for(shape).items():
        src = strip_comments((spec.template_dir / f"{spec.template}.mil").read_text())
        used = set(string.Template(src).get_identifiers())
        assert used == set(spec.params), f"{name}: placeholders {sorted(used)} vs params {sorted(spec.params)}"
        text = K.render(spec)
        assert text.startswith(HEADER), f"{name}: header is not the proven dialect"
        assert "$" not in text
        prog = parse(text)
        fn = prog.main
        assert fn.opset == "ios18" and [p.name for p in fn.params] == ["x"] and [r.name for r in fn.returns] == ["out"]
        assert fn.params[0].type.dtype == "fp16" and tuple(fn.params[0].type.shape) == spec.in_shape
        out_stmt = [s for s in fn.body if s.name == "out"][0]
        assert out_stmt.type.dtype == "fp16" and tuple(out_stmt.type.shape) == spec.out_shape
        errors = [d for d in check(prog, "m4") if d.is_error]
        assert not errors, f"{name}: {errors}"
        for s in fn.body:
            assert s.op not in FORBIDDEN_OPS, f"{name}: uses {s.op}"
            if s.op == "const":
                continue
            # every argument is a named value (no inline literals), every concat says interleave
            for arg, v in s.args.items():
                vals = v.items if hasattr(v, "items") else (v,)
                assert all(type(x).__name__ == "Ref" for x in vals), f"{name}: {s.name}.{arg} is inline"
            if s.op == "concat":
                assert "interleave" in s.args
            if s.op == "transpose":
                perm = [c for c in fn.body if c.name == s.args["perm"].name][0].attrs["val"].value
                assert list(perm) == [0, 1, 3, 2], f"{name}: unproven transpose perm {list(perm)}"
        blob_paths = set(re.findall(r'path=string\("([^"]+)"\)', text))
        assert blob_paths == set(spec.blobs), f"{name}: blobs referenced {blob_paths} vs given {set(spec.blobs)}"
        assert all("offset=uint64(64)" in line for line in text.splitlines() if "BLOBFILE" in line)


# -- every kernel against the numpy formulation -----------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("sname,kname", list(_cases()))
def test_kernel_matches_reference(sname, kname, precision):
    shape = SHAPES[sname]
    spec = K.plan_for(shape)[kname]
    rng = np.random.default_rng(zlib.crc32(f"{sname}/{kname}".encode()))
    a = random_inputs(spec, rng, precision)
    if kname == "sdpaBwd2":  # P must be a causal softmax and dP its partner for realistic magnitudes
        o = R.sdpa_bwd1(a["q_rope"], a["k_rope"], rng.standard_normal((shape.kv_dim, shape.seq_len)),
                        rng.standard_normal((shape.q_dim, shape.seq_len)), scale=_consts(shape)["scale"], **_heads(shape))
        a["P"], a["dP"] = _q(o["P"]), _q(o["dP"])
    got = run_kernel(shape, kname, precision, a)
    assert_close(got, reference(shape, kname, a), TOL[precision], f"{sname}/{kname}/{precision}")


@settings(max_examples=12, deadline=None)
@given(nkv=st.integers(1, 3), r=st.integers(1, 3), hd=st.sampled_from([2, 4, 8]), dim=st.integers(1, 20),
       hidden=st.integers(1, 20), seq=st.integers(1, 9), theta=st.sampled_from([500.0, 1e4, 1e6]),
       alpha=st.sampled_from([1.0, 0.5, 0.2041241452]), seed=st.integers(0, 2**32 - 1))
def test_random_shapes_match_reference(nkv, r, hd, dim, hidden, seq, theta, alpha, seed):
    """Every kernel of the plan, fp32 sim vs the numpy formulation, on arbitrary small shapes
    (seq 1, dim 1, MHA/GQA/MQA, odd sizes)."""
    shape = K.KernelShape(dim, hidden, nkv * r, nkv, hd, seq, rope_theta=theta, residual_alpha=alpha)
    rng = np.random.default_rng(seed)
    for name, spec in K.plan_for(shape).items():
        a = random_inputs(spec, rng, "fp32")
        if name == "sdpaBwd2":
            o = R.sdpa_bwd1(a["q_rope"], a["k_rope"], rng.standard_normal((shape.kv_dim, seq)),
                            rng.standard_normal((shape.q_dim, seq)), scale=_consts(shape)["scale"], **_heads(shape))
            a["P"], a["dP"] = o["P"], o["dP"]
        got = run_kernel(shape, name, "fp32", a)
        # floor 0.1 (the scale of a 0.15-weighted O(1) input): with dim 1 or seq 1 a tap can be a
        # cancellation-small sum of O(0.1) terms, where fp32 rounding of the terms dominates
        assert_close(got, reference(shape, name, a), TOL["fp32"], f"{shape}/{name}", floor=0.1)


# -- backward kernels against finite differences of the forward math ---------------------------


@pytest.mark.parametrize("shape", [TINY_GQA, TINY_MHA], ids=["gqa", "mha"])
def test_sdpa_backward_chain_matches_finite_differences(shape):
    """sdpaBwd1 + sdpaBwd2 give the gradient of sum(attention(q_rope, k_rope, v) ⊙ dA)."""
    rng = np.random.default_rng(1)
    h, scale = _heads(shape), _consts(shape)["scale"]
    q, k, v, da = (rng.standard_normal((c, shape.seq_len)) for c in (shape.q_dim, shape.kv_dim, shape.kv_dim, shape.q_dim))
    o1 = run_kernel(shape, "sdpaBwd1", "fp32", {"q_rope": q, "k_rope": k, "v": v, "da": da})
    o2 = run_kernel(shape, "sdpaBwd2", "fp32", {"P": o1["P"], "dP": o1["dP"], "q_rope": q, "k_rope": k})

    def loss(qq, kk, vv):
        return float((R.attention(qq, kk, vv, scale=scale, **h)[0] * da).sum())

    num = {
        "dq_rope": R.numerical_grad(lambda x: loss(x, k, v), q),
        "dk_rope": R.numerical_grad(lambda x: loss(q, x, v), k),
        "dv": R.numerical_grad(lambda x: loss(q, k, x), v),
    }
    assert_close({**o1, **o2}, num, 1e-5, "sdpa backward vs finite differences")
    # the P tap is the forward probabilities
    assert_close(o1, {"P": R.attention(q, k, v, scale=scale, **h)[1]}, 1e-5, "P")


def test_ffn_backward_chain_matches_finite_differences():
    """ffnFused taps -> ffnBwdW2t(α·dy) -> ffnBwdW13t give d sum(x_next ⊙ dy) / d x2n."""
    shape = TINY_GQA
    rng = np.random.default_rng(2)
    D, H, S = shape.dim, shape.hidden_dim, shape.seq_len
    w1, w3, w2 = (rng.standard_normal(s) * 0.4 for s in ((H, D), (H, D), (D, H)))
    x2n, x2, dy = (rng.standard_normal((D, S)) for _ in range(3))
    alpha = _consts(shape)["alpha"]
    fwd = run_kernel(shape, "ffnFused", "fp32", {"x2n": x2n, "x2": x2, "w1": w1, "w3": w3, "w2": w2})
    dg = run_kernel(shape, "ffnBwdW2t", "fp32", {"df": alpha * dy, "w2": w2})["dgate"]
    b = run_kernel(shape, "ffnBwdW13t", "fp32", {"dgate": dg, "h1": fwd["h1"], "h3": fwd["h3"], "w1": w1, "w3": w3})

    def loss(x):
        return float((R.ffn_fwd(x, x2, w1, w3, w2, alpha=alpha)["x_next"] * dy).sum())

    assert_close(b, {"dx2n": R.numerical_grad(loss, x2n)}, 1e-5, "ffn dx2n vs finite differences")

    def loss_h1(h1):
        return float(((R.silu(h1) * fwd["h3"]) * dg).sum())

    assert_close(b, {"dh1": R.numerical_grad(loss_h1, fwd["h1"])}, 1e-5, "dh1 (SiLU') vs finite differences")


@pytest.mark.parametrize("shape", [TINY_GQA, TINY_MHA], ids=["gqa", "mha"])
def test_attention_block_backward_matches_finite_differences(shape):
    """The whole attention backward through the kernels — wotBwd, sdpaBwd1/2, the CPU RoPE
    backward (inverse rotation), qBwd+kvBwd or qkvBwd — is the gradient of sum(x2 ⊙ dy)
    w.r.t. xn, with x2 the sdpaFwd output."""
    rng = np.random.default_rng(3)
    D, S, QD, KVD = shape.dim, shape.seq_len, shape.q_dim, shape.kv_dim
    h, c = _heads(shape), _consts(shape)
    w = {"wq": rng.standard_normal((QD, D)) * 0.4, "wk": rng.standard_normal((KVD, D)) * 0.4,
         "wv": rng.standard_normal((KVD, D)) * 0.4, "wo": rng.standard_normal((D, QD)) * 0.4}
    xn, x, dy = (rng.standard_normal((D, S)) for _ in range(3))
    f = run_kernel(shape, "sdpaFwd", "fp32", {"xn": xn, "x": x, **w})
    da = run_kernel(shape, "wotBwd", "fp32", {"dx2s": c["alpha"] * dy, "wo": w["wo"]})["da"]
    b1 = run_kernel(shape, "sdpaBwd1", "fp32", {"q_rope": f["q_rope"], "k_rope": f["k_rope"], "v": f["v"], "da": da})
    b2 = run_kernel(shape, "sdpaBwd2", "fp32", {"P": b1["P"], "dP": b1["dP"], "q_rope": f["q_rope"], "k_rope": f["k_rope"]})
    factor = R.rope_factor(S, shape.head_dim, shape.rope_theta, rope_fp16=True)
    dq = R.rope_channels(b2["dq_rope"], shape.n_heads, shape.head_dim, factor, inverse=True)
    dk = R.rope_channels(b2["dk_rope"], shape.n_kv_heads, shape.head_dim, factor, inverse=True)
    if shape.is_mha:
        dxn = run_kernel(shape, "qkvBwd", "fp32", {"dq": dq, "dk": dk, "dv": b1["dv"], "wq": w["wq"], "wk": w["wk"],
                                                   "wv": w["wv"]})["dx"]
    else:
        dxn = run_kernel(shape, "qBwd", "fp32", {"dq": dq, "wq": w["wq"]})["dxq"]
        dxn = dxn + run_kernel(shape, "kvBwd", "fp32", {"dk": dk, "dv": b1["dv"], "wk": w["wk"], "wv": w["wv"]})["dxkv"]

    def loss(z):
        return float((R.sdpa_fwd(z, x, theta=shape.rope_theta, **w, **h, **c)["x2"] * dy).sum())

    # The RoPE backward is the transpose of the forward rotation (multiply by the conjugate of
    # the same fp16 cos + i·sin), which is exact even though |cos + i·sin| ≠ 1 after rounding.
    assert_close({"dxn": dxn}, {"dxn": R.numerical_grad(loss, xn)}, 1e-5, "attention block dxn vs finite differences")


def test_reference_backward_formulas_match_finite_differences():
    """The analytic backward in kernel_refs (used as the reference above) is itself right."""
    shape, rng = TINY_GQA, np.random.default_rng(4)
    h, scale = _heads(shape), 0.3
    q, k, v, da = (rng.standard_normal((c, shape.seq_len)) for c in (shape.q_dim, shape.kv_dim, shape.kv_dim, shape.q_dim))
    b1 = R.sdpa_bwd1(q, k, v, da, scale=scale, **h)
    b2 = R.sdpa_bwd2(b1["P"], b1["dP"], q, k, scale=scale, **h)

    def loss(qq, kk, vv):
        return float((R.attention(qq, kk, vv, scale=scale, **h)[0] * da).sum())

    np.testing.assert_allclose(b2["dq_rope"], R.numerical_grad(lambda z: loss(z, k, v), q), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b2["dk_rope"], R.numerical_grad(lambda z: loss(q, z, v), k), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b1["dv"], R.numerical_grad(lambda z: loss(q, k, z), v), rtol=1e-6, atol=1e-7)
    x = rng.standard_normal((4, 3))
    np.testing.assert_allclose(R.silu_grad(x), R.numerical_grad(lambda z: float(R.silu(z).sum()), x), rtol=1e-7)


# -- conventions: RoPE, mask, GQA ------------------------------------------------------------


@pytest.mark.parametrize("sname", ["gqa3", "mha128"])
def test_rope_is_interleaved_pair_rotation(sname):
    """q_rope/k_rope equal an explicit 2×2 rotation of (x[2i], x[2i+1]) by p·theta^(−2i/HD)."""
    shape = SHAPES[sname]
    spec = K.plan_for(shape)["sdpaFwd"]
    rng = np.random.default_rng(5)
    a = random_inputs(spec, rng, "fp32")
    got = run_kernel(shape, "sdpaFwd", "fp32", a)
    HD, S = shape.head_dim, shape.seq_len
    for tap, w, nh in (("q_rope", a["wq"], shape.n_heads), ("k_rope", a["wk"], shape.n_kv_heads)):
        x = w @ a["xn"]  # [nh·HD, S]
        want = np.empty_like(x)
        for hh in range(nh):
            for i in range(HD // 2):
                r0, r1 = hh * HD + 2 * i, hh * HD + 2 * i + 1
                for p in range(S):
                    ang = p * shape.rope_theta ** (-2.0 * i / HD)
                    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
                    want[[r0, r1], p] = rot @ x[[r0, r1], p]
        err = np.abs(got[tap] - want).max() / np.abs(want).max()
        assert err < 2e-3, f"{tap}: not the interleaved-pair rotation (rel err {err:.3g})"  # fp16 tables


def test_blob_contents():
    shape = SHAPES["gqa3"]
    spec = K.plan_for(shape)["sdpaFwd"]
    S, HD = shape.seq_len, shape.head_dim
    cos = read_blob(spec.blobs["@model_path/weights/rope_cos.bin"], 64, np.float16, (S, HD)).astype(np.float64)
    sin = read_blob(spec.blobs["@model_path/weights/rope_sin.bin"], 64, np.float16, (S, HD)).astype(np.float64)
    p, j = np.meshgrid(np.arange(S), np.arange(HD), indexing="ij")
    ang = p * shape.rope_theta ** (-2.0 * (j // 2) / HD)
    np.testing.assert_allclose(cos, np.cos(ang), atol=5e-4)
    np.testing.assert_allclose(sin, np.sin(ang), atol=5e-4)
    mask = read_blob(spec.blobs["@model_path/weights/mask.bin"], 64, np.float16, (S, S)).astype(np.float64)
    for i in range(S):
        for k in range(S):
            assert mask[i, k] == (0.0 if k <= i else -65504.0)


def test_gqa_mapping_is_h_div_R():
    """kv-head g feeds exactly q-heads g·R … g·R+R−1, forward and backward."""
    shape = SHAPES["gqa3"]
    R_, HD, NH = shape.gqa_ratio, shape.head_dim, shape.n_heads
    spec = K.plan_for(shape)["sdpaFwd"]
    rng = np.random.default_rng(6)
    a = random_inputs(spec, rng, "fp32")
    base = run_kernel(shape, "sdpaFwd", "fp32", a)
    for g in range(shape.n_kv_heads):
        b = dict(a)
        for wname in ("wk", "wv"):
            b[wname] = a[wname].copy()
            b[wname][g * HD:(g + 1) * HD] += rng.standard_normal((HD, shape.dim)) * 0.3
        out = run_kernel(shape, "sdpaFwd", "fp32", b)
        changed = [hh for hh in range(NH)
                   if np.abs(out["attn"][hh * HD:(hh + 1) * HD] - base["attn"][hh * HD:(hh + 1) * HD]).max() > 0]
        assert changed == list(range(g * R_, (g + 1) * R_)), f"kv-head {g} changed q-heads {changed}"
    # backward: a gradient on q-head h reaches only kv-head h // R
    b1 = K.plan_for(shape)["sdpaBwd1"]
    acts = random_inputs(b1, rng, "fp32")
    for hh in range(NH):
        acts["da"] = np.zeros((shape.q_dim, shape.seq_len))
        acts["da"][hh * HD:(hh + 1) * HD] = rng.standard_normal((HD, shape.seq_len))
        dv = run_kernel(shape, "sdpaBwd1", "fp32", acts)["dv"]
        nz = [g for g in range(shape.n_kv_heads) if np.abs(dv[g * HD:(g + 1) * HD]).max() > 0]
        assert nz == [hh // R_], f"q-head {hh} sends dv to kv-heads {nz}"


# -- the plan, its packing and its errors ------------------------------------------------------


def test_plan_choice_and_evals_per_layer():
    mha = K.KernelShape(768, 2048, 12, 12, 64, 256)
    gqa = K.KernelShape(1024, 3072, 16, 8, 128, 256, rope_theta=1e6)
    assert list(K.plan_for(mha)) == ["sdpaFwd", "ffnFused", "ffnBwdW2t", "ffnBwdW13t", "wotBwd", "sdpaBwd1",
                                     "sdpaBwd2", "qkvBwd"]
    assert list(K.plan_for(gqa))[-2:] == ["qBwd", "kvBwd"] and "qkvBwd" not in K.plan_for(gqa)
    assert K.evals_per_layer(mha) == 8 and K.evals_per_layer(gqa) == 9
    assert K.plan_for(dim=768, hidden_dim=2048, n_heads=12, n_kv_heads=12, head_dim=64, seq_len=256)["sdpaFwd"].in_shape == (
        1, 768, 1, 2 * 256 + 2 * 768 + 2 * 768)
    # design.md table: the Qwen3-shaped sdpaBwd2 input has 2·NH·S + QD + KVD channels
    assert K.plan_for(gqa)["sdpaBwd2"].in_shape == (1, 2 * 16 * 256 + 2048 + 1024, 1, 256)


@pytest.mark.parametrize("sname", list(SHAPES))
def test_blocks_and_taps_tile_exactly(sname):
    for name, spec in K.plan_for(SHAPES[sname]).items():
        _, C, _, W = spec.in_shape
        cover = np.zeros((C, W), dtype=int)
        for b in spec.blocks:
            cover[b.c0:b.c1, b.col0:b.col1] += 1
            if spec.weight_bearing:  # spatial packing: every block spans all channels
                assert (b.c0, b.c1) == (0, C), f"{name}.{b.name}"
            else:  # channel stacking: every block is S wide
                assert (b.col0, b.col1) == (0, SHAPES[sname].seq_len), f"{name}.{b.name}"
        assert (cover == 1).all(), f"{name}: blocks do not tile the input exactly"
        assert [t.c0 for t in spec.taps][1:] == [t.c1 for t in spec.taps][:-1] and spec.taps[0].c0 == 0
        assert spec.taps[-1].c1 == spec.out_shape[1]
        acts = [b.kind for b in spec.blocks]
        assert acts == sorted(acts), f"{name}: activations must precede weights"  # 'act' < 'weight'


small = st.integers(1, 4)


@settings(max_examples=25, deadline=None)
@given(nkv=small, r=st.integers(1, 3), hd=st.sampled_from([2, 4, 6]), dim=st.integers(1, 9),
       hidden=st.integers(1, 9), seq=st.integers(1, 7), data=st.data())
def test_pack_unpack_roundtrip(nkv, r, hd, dim, hidden, seq, data):
    """Every block lands at its place (transposed when staged as Wᵀ); taps split the output."""
    shape = K.KernelShape(dim, hidden, nkv * r, nkv, hd, seq)
    plan = K.plan_for(shape)
    spec = plan[data.draw(st.sampled_from(sorted(plan)))]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    arrays = {b.name: _q(rng.standard_normal(b.source_shape) * 10) for b in spec.blocks}
    packed = K.pack_input(spec, arrays)
    assert packed.dtype == np.float16 and packed.shape == spec.in_shape[1::2]
    for b in spec.blocks:
        region = packed[b.c0:b.c1, b.col0:b.col1].astype(np.float64)
        np.testing.assert_array_equal(region, arrays[b.name].T if b.transpose else arrays[b.name])
    # partial update writes only the named block
    first = spec.blocks[0]
    again = K.pack_input(spec, {first.name: np.zeros(first.source_shape)}, out=packed.copy())
    assert not again[first.c0:first.c1, first.col0:first.col1].any()
    mask = np.ones(packed.shape, bool)
    mask[first.c0:first.c1, first.col0:first.col1] = False
    np.testing.assert_array_equal(again[mask], packed[mask])
    out = rng.standard_normal(spec.out_shape[1::2]).astype(np.float16)
    taps = K.unpack_outputs(spec, out)
    np.testing.assert_array_equal(np.concatenate([taps[t.name] for t in spec.taps]), out.astype(np.float32))


def test_pack_errors_name_the_problem():
    spec = K.plan_for(SHAPES["gqa3"])["sdpaFwd"]
    good = {b.name: np.zeros(b.source_shape) for b in spec.blocks}
    with pytest.raises(ValueError, match=r"'wq' expects shape \(384, 96\).*transposed"):
        K.pack_input(spec, {**good, "wq": np.zeros((96, 384))})
    with pytest.raises(KeyError, match="missing input arrays.*'wo'"):
        K.pack_input(spec, {k: v for k, v in good.items() if k != "wo"})
    with pytest.raises(KeyError, match="no input block named.*'w1'"):
        K.pack_input(spec, {**good, "w1": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="output must be"):
        K.unpack_outputs(spec, np.zeros((3, 3)))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="not divisible by n_kv_heads"):
        K.KernelShape(64, 96, 6, 4, 16, 8)
    with pytest.raises(ValueError, match="even"):
        K.KernelShape(64, 96, 4, 4, 15, 8)
    with pytest.raises(ValueError, match="seq_len: must be > 0"):
        K.KernelShape(64, 96, 4, 4, 16, 0)
    with pytest.raises(ValueError, match="fp16"):
        K.KernelShape(64, 96, 4, 4, 16, 8, residual_alpha=1e6)
    assert K.attention_scale(128) == float(np.float16(1 / np.sqrt(128)))
    assert abs(K.attention_scale(128) * np.sqrt(128) - 1) < 2**-11
