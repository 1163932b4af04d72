"""fp32 <-> fp16 conversion in rustane.native against numpy's astype (independent implementation).

Every test runs once per available path: the dispatching one (F16C here) and the forced scalar one.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustane import native

PATHS = sorted({native.best_simd(), "scalar"})


@pytest.fixture(params=PATHS)
def path(request):
    previous = native.set_simd(request.param)
    assert native.simd() == request.param
    yield request.param
    native.set_simd(previous)


ALL_HALVES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def np_f16(x):
    """numpy's conversion (the reference); overflow to inf is expected, not worth a warning."""
    with np.errstate(over="ignore"):
        return x.astype(np.float16)


def assert_same_f16(got, want):
    """Bit-exact, except that any NaN matches any NaN (numpy does not quiet NaNs, hardware does)."""
    g, w = got.view(np.uint16), want.view(np.uint16)
    both_nan = np.isnan(got) & np.isnan(want)
    bad = (g != w) & ~both_nan
    assert not bad.any(), [(hex(x), hex(y)) for x, y in zip(g[bad][:8], w[bad][:8])]


def assert_same_f32(got, want):
    g, w = got.view(np.uint32), want.view(np.uint32)
    both_nan = np.isnan(got) & np.isnan(want)
    bad = (g != w) & ~both_nan
    assert not bad.any(), [(hex(x), hex(y)) for x, y in zip(g[bad][:8], w[bad][:8])]


def test_paths_reported():
    assert native.best_simd() in ("f16c", "neon", "scalar")
    assert native.simd() in ("f16c", "neon", "scalar")
    with pytest.raises(ValueError, match="unknown SIMD path"):
        native.set_simd("avx512")
    unavailable = {"f16c", "neon"} - {native.best_simd()}
    for name in unavailable:
        with pytest.raises(ValueError, match="not available"):
            native.set_simd(name)


def test_all_halves_to_f32(path):
    h = ALL_HALVES.view(np.float16)
    got = native.f16_to_f32(h)
    assert_same_f32(got, h.astype(np.float32))
    # NaNs: quiet, sign and payload kept (the hardware converters' rule)
    nan = np.isnan(h)
    hb = ALL_HALVES[nan].astype(np.uint32)
    want = ((hb & 0x8000) << 16) | 0x7FC00000 | ((hb & 0x3FF) << 13)
    assert np.array_equal(got.view(np.uint32)[nan], want)


def test_all_halves_round_trip(path):
    h = ALL_HALVES.view(np.float16)
    back = native.f32_to_f16(native.f16_to_f32(h)).view(np.uint16)
    nan = np.isnan(h)
    assert np.array_equal(back[~nan], ALL_HALVES[~nan])
    assert np.array_equal(back[nan], ALL_HALVES[nan] | 0x0200)  # quiet bit set, rest kept


def test_rounding_boundaries_exhaustive(path):
    """For every pair of adjacent finite halves: the exact midpoint (a tie) and one f32 ulp either side."""
    h = ALL_HALVES.view(np.float16)
    f16 = h[np.isfinite(h) & (ALL_HALVES != 0x7BFF) & (ALL_HALVES != 0xFBFF)]
    away = np.where(np.signbit(f16), np.float16(-np.inf), np.float16(np.inf))
    nxt16 = np.nextafter(f16, away)  # stays float16: the next half away from zero
    assert nxt16.dtype == np.float16 and (nxt16 != f16).all()
    finite, nxt = f16.astype(np.float64), nxt16.astype(np.float64)
    mid = ((finite + nxt) / 2).astype(np.float32)  # exact: halves have 11-bit significands
    assert np.array_equal(mid.astype(np.float64), (finite + nxt) / 2)
    mb = mid.view(np.uint32)
    cases = np.concatenate([mb, mb + 1, mb - 1]).view(np.float32)
    # overflow edge: 65504 (max half), 65519.996 (rounds down), 65520 (tie -> inf), beyond
    edges = np.array([65504, 65519.996, 65520, 65536, 1e30, 5.960464477539063e-08, 2.9802322387695312e-08,
                      2.98023259e-08, 6.1035156e-05, 6.1035152e-05], np.float32)
    cases = np.concatenate([cases, edges, -edges])
    assert_same_f16(native.f32_to_f16(cases), np_f16(cases))


def test_million_random_bit_patterns(path):
    rng = np.random.default_rng(1234)
    bits = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    assert_same_f16(native.f32_to_f16(x), np_f16(x))


def test_paths_agree_bit_exactly_including_nans():
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 1 << 32, size=1 << 18, dtype=np.uint64).astype(np.uint32)
    nans = rng.integers(0, 1 << 23, size=4096, dtype=np.uint32) | 0x7F800001
    bits = np.concatenate([bits, nans, nans | 0x80000000])
    x = bits.view(np.float32)
    results = {}
    previous = native.simd()
    try:
        for p in PATHS:
            native.set_simd(p)
            results[p] = (native.f32_to_f16(x).view(np.uint16), native.f16_to_f32(ALL_HALVES.view(np.float16)).view(np.uint32))
    finally:
        native.set_simd(previous)
    # the scalar reference of the NaN rule, written independently here
    hb = bits >> 16 & 0x8000 | 0x7E00 | (bits >> 13 & 0x3FF)
    isnan = np.isnan(x)
    for p, (h, f) in results.items():
        assert np.array_equal(h[isnan], hb[isnan].astype(np.uint16)), p
        assert np.array_equal(h, results["scalar"][0]), p
        assert np.array_equal(f, results["scalar"][1]), p


# floats near interesting places, as bit patterns
_near = st.sampled_from([0x477FE000, 0x477FF000, 0x477FEFFF, 0x477FF001, 0x33000000, 0x33800000, 0x38800000,
                         0x387FC000, 0x7F800000, 0x7FC00000, 0x7F800001, 0x3F801000, 0x3F803000, 0x00000001])
_bits = st.one_of(
    st.integers(0, (1 << 32) - 1),
    st.builds(lambda b, d, s: (b + d) & 0x7FFFFFFF | s, _near, st.integers(-2, 2), st.sampled_from([0, 1 << 31])),
    st.builds(lambda e, m: e << 23 | m, st.integers(95, 145), st.integers(0, (1 << 23) - 1)),  # around half range
    st.builds(lambda e, hi, s: s | e << 23 | hi << 13 | 0x1000, st.integers(102, 142), st.integers(0, 1023),
              st.sampled_from([0, 1 << 31])),  # exact ties
)


@settings(max_examples=150)
@given(st.lists(_bits, min_size=0, max_size=200), st.integers(0, 3))
def test_hypothesis_f32_to_f16(bits, misalign):
    # misalign: start the data 0-3 elements into a buffer so vector loads run unaligned with odd tails
    buf = np.zeros(len(bits) + misalign, np.uint32)
    buf[misalign:] = bits
    x = buf[misalign:].view(np.float32)
    want = np_f16(x)
    for p in PATHS:
        previous = native.set_simd(p)
        try:
            assert_same_f16(native.f32_to_f16(x), want)
        finally:
            native.set_simd(previous)


@settings(max_examples=60)
@given(st.lists(st.integers(0, 0xFFFF), min_size=0, max_size=200))
def test_hypothesis_f16_to_f32(bits):
    h = np.array(bits, np.uint16).view(np.float16)
    for p in PATHS:
        previous = native.set_simd(p)
        try:
            assert_same_f32(native.f16_to_f32(h), h.astype(np.float32))
        finally:
            native.set_simd(previous)


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (4, 1, 3, 33)])
def test_shapes_and_out(path, shape):
    rng = np.random.default_rng(0)
    x = np.asarray(rng.standard_normal(shape) * 1000, dtype=np.float32)
    h = native.f32_to_f16(x)
    assert h.shape == x.shape and h.dtype == np.float16
    assert_same_f16(h, x.astype(np.float16))
    out = np.empty(shape, np.float16)
    assert native.f32_to_f16(x, out=out) is out
    assert_same_f16(out, x.astype(np.float16))
    back = np.empty(shape, np.float32)
    assert native.f16_to_f32(out, out=back) is back
    assert_same_f32(back, out.astype(np.float32))


def test_bad_arguments():
    x = np.ones((4, 6), np.float32)
    with pytest.raises(TypeError, match="float32"):
        native.f32_to_f16(x.astype(np.float64))
    with pytest.raises(TypeError, match="numpy.ndarray"):
        native.f32_to_f16([1.0, 2.0])
    with pytest.raises(TypeError, match="byte order"):
        native.f32_to_f16(x.astype(">f4"))
    with pytest.raises(ValueError, match="C-contiguous"):
        native.f32_to_f16(x[:, ::2])
    with pytest.raises(ValueError, match="C-contiguous"):
        native.f32_to_f16(x.T)
    with pytest.raises(ValueError, match=r"shape \(4, 5\).*\(4, 6\)"):
        native.f32_to_f16(x, out=np.empty((4, 5), np.float16))
    with pytest.raises(ValueError, match="shape"):
        native.f32_to_f16(x, out=np.empty(24, np.float16))
    with pytest.raises(TypeError, match="float16"):
        native.f32_to_f16(x, out=np.empty((4, 6), np.float32))
    ro = np.empty((4, 6), np.float16)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        native.f32_to_f16(x, out=ro)
    with pytest.raises(ValueError, match="C-contiguous"):
        native.f32_to_f16(x, out=np.empty((4, 12), np.float16)[:, ::2])
    with pytest.raises(TypeError, match="float16"):
        native.f16_to_f32(x)
    with pytest.raises(TypeError, match="float32"):
        native.f16_to_f32(x.astype(np.float16), out=np.empty((4, 6), np.float64))
    raw = np.zeros(32, np.uint8)
    with pytest.raises(ValueError, match="share memory"):
        native.f32_to_f16(raw.view(np.float32), out=raw[:16].view(np.float16))
    assert native.f32_to_f16(x).shape == (4, 6)  # the valid call still works


def test_env_override_forces_scalar():
    import subprocess
    import sys

    code = "from rustane import native; print(native.simd())"
    env = dict(__import__("os").environ, RUSTANE_SIMD="scalar")
    out = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"
    env["RUSTANE_SIMD"] = "bogus"
    bad = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "RUSTANE_SIMD='bogus'" in bad.stderr
