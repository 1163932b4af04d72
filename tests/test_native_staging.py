"""Staging fp32 blocks into fp16 channel-major buffers (and back) against numpy slicing + astype."""

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
    yield request.param
    native.set_simd(previous)


def on_every_path(fn):
    previous = native.simd()
    try:
        for p in PATHS:
            native.set_simd(p)
            fn(p)
    finally:
        native.set_simd(previous)


def random_f16(rng, shape):
    return (rng.standard_normal(shape) * 4).astype(np.float16)


@st.composite
def stage_case(draw):
    C = draw(st.integers(1, 80))
    SP = draw(st.integers(1, 90))
    cb = draw(st.integers(0, C))
    nb = draw(st.integers(0, SP))
    c0 = draw(st.integers(0, C - cb))
    col = draw(st.integers(0, SP - nb))
    return C, SP, cb, nb, c0, col, draw(st.booleans()), draw(st.integers(0, 2**32 - 1))


@settings(max_examples=120)
@given(stage_case())
def test_stage_matches_numpy(case):
    C, SP, cb, nb, c0, col, transpose, seed = case
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal((cb, nb)) * 100).astype(np.float32)
    src = np.ascontiguousarray(block.T) if transpose else block
    dst0 = random_f16(rng, (C, SP))
    want = dst0.copy()
    want[c0:c0 + cb, col:col + nb] = block.astype(np.float16)

    def check(p):
        dst = dst0.copy()
        assert native.stage(dst, src, col, c0=c0, transpose=transpose) is dst
        assert np.array_equal(dst.view(np.uint16), want.view(np.uint16)), p

    on_every_path(check)


@pytest.mark.parametrize("transpose", [False, True])
def test_stage_weight_shapes(path, transpose):
    """A Stories110M-sized block (W1: [2048, 768] staged transposed into 768 channels) at an offset."""
    rng = np.random.default_rng(3)
    D, H, S = 768, 2048, 256
    w = rng.standard_normal((H, D) if transpose else (D, H)).astype(np.float32)
    dst = np.zeros((D, 2 * S + 3 * H), np.float16)
    off = 2 * S + H
    native.stage(dst, w, off, transpose=transpose)
    want = (w.T if transpose else w).astype(np.float16)
    assert np.array_equal(dst[:, off:off + H].view(np.uint16), want.view(np.uint16))
    assert not dst[:, :off].any() and not dst[:, off + H:].any()


@settings(max_examples=80)
@given(st.integers(1, 60), st.integers(1, 70), st.data())
def test_unstage_matches_numpy(C, SP, data):
    c0 = data.draw(st.integers(0, C))
    n = data.draw(st.integers(0, C - c0))
    col = data.draw(st.integers(0, SP))
    ncols = data.draw(st.integers(0, SP - col))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    src = random_f16(rng, (C, SP))
    want = src[c0:c0 + n, col:col + ncols].astype(np.float32)

    def check(p):
        got = native.unstage(src, c0, n, col=col, ncols=ncols)
        assert got.dtype == np.float32 and got.shape == (n, ncols)
        assert np.array_equal(got, want), p
        out = np.full((n, ncols), np.nan, np.float32)
        assert native.unstage(src, c0, n, col, ncols, out=out) is out
        assert np.array_equal(out, want), p

    on_every_path(check)


def test_unstage_defaults():
    src = random_f16(np.random.default_rng(1), (10, 12))
    assert np.array_equal(native.unstage(src), src.astype(np.float32))
    assert np.array_equal(native.unstage(src, 4), src[4:].astype(np.float32))
    assert np.array_equal(native.unstage(src, 2, 3, col=5), src[2:5, 5:].astype(np.float32))


@settings(max_examples=80)
@given(st.integers(1, 40), st.integers(1, 50), st.integers(1, 40), st.integers(1, 50), st.data())
def test_copy_channels_matches_numpy(dC, dW, sC, sW, data):
    n = data.draw(st.integers(0, min(dC, sC)))
    ncols = data.draw(st.integers(0, min(dW, sW)))
    dc0 = data.draw(st.integers(0, dC - n))
    sc0 = data.draw(st.integers(0, sC - n))
    dcol = data.draw(st.integers(0, dW - ncols))
    scol = data.draw(st.integers(0, sW - ncols))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    src, dst = random_f16(rng, (sC, sW)), random_f16(rng, (dC, dW))
    want = dst.copy()
    want[dc0:dc0 + n, dcol:dcol + ncols] = src[sc0:sc0 + n, scol:scol + ncols]
    native.copy_channels(dst, dc0, src, sc0, n, dst_col=dcol, src_col=scol, ncols=ncols)
    assert np.array_equal(dst.view(np.uint16), want.view(np.uint16))


def test_copy_channels_within_one_buffer():
    buf = random_f16(np.random.default_rng(2), (12, 8))
    want = buf.copy()
    want[8:12] = buf[0:4]
    native.copy_channels(buf, 8, buf, 0, 4)  # disjoint channel ranges of one surface
    assert np.array_equal(buf.view(np.uint16), want.view(np.uint16))
    with pytest.raises(ValueError, match="overlaps the dst window"):
        native.copy_channels(buf, 2, buf, 0, 4)
    want = buf.copy()
    want[0:4, 5:8] = buf[0:4, 0:3]
    native.copy_channels(buf, 0, buf, 0, 4, dst_col=5, src_col=0, ncols=3)  # same rows, disjoint columns
    assert np.array_equal(buf.view(np.uint16), want.view(np.uint16))
    with pytest.raises(ValueError, match="overlaps"):
        native.copy_channels(buf, 1, buf, 0, 4, dst_col=2, src_col=0, ncols=3)
    with pytest.raises(ValueError, match="share memory"):  # a second view of the same memory
        native.copy_channels(buf[2:], 0, buf, 0, 4)


def test_out_of_range_and_bad_arguments():
    dst = np.zeros((8, 16), np.float16)
    with pytest.raises(ValueError, match=r"\[11, 17\) it does not fit dst \(8, 16\)"):
        native.stage(dst, np.zeros((8, 6), np.float32), 11)
    with pytest.raises(ValueError, match=r"channels \[4, 12\).*dst \(8, 16\)"):
        native.stage(dst, np.zeros((8, 2), np.float32), 0, c0=4)
    with pytest.raises(ValueError, match=r"transpose of src \(6, 9\)"):
        native.stage(dst, np.zeros((6, 9), np.float32), 0, transpose=True)
    with pytest.raises(ValueError, match="does not fit"):
        native.stage(dst, np.zeros((8, 2), np.float32), -1)
    with pytest.raises(ValueError, match="2-D"):
        native.stage(dst, np.zeros((8,), np.float32), 0)
    with pytest.raises(ValueError, match="2-D"):
        native.stage(np.zeros((1, 8, 1, 16), np.float16), np.zeros((8, 2), np.float32), 0)
    with pytest.raises(TypeError, match="float16"):
        native.stage(dst.astype(np.float32), np.zeros((8, 2), np.float32), 0)
    with pytest.raises(TypeError, match="float32"):
        native.stage(dst, np.zeros((8, 2), np.float16), 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        native.stage(dst, np.zeros((2, 8), np.float32).T, 0)
    with pytest.raises(ValueError, match="C-contiguous"):
        native.stage(np.zeros((8, 32), np.float16)[:, :16], np.zeros((8, 2), np.float32), 0)
    with pytest.raises(ValueError, match=r"outside src \(8, 16\)"):
        native.unstage(dst, 6, 4)
    with pytest.raises(ValueError, match=r"columns \[10, 20\)"):
        native.unstage(dst, 0, 2, col=10, ncols=10)
    with pytest.raises(ValueError, match=r"expected \(2, 16\)"):
        native.unstage(dst, 0, 2, out=np.empty((2, 15), np.float32))
    with pytest.raises(ValueError, match=r"outside dst \(8, 16\)"):
        native.copy_channels(dst, 6, np.zeros((8, 16), np.float16), 0, 4)
    with pytest.raises(ValueError, match=r"outside src \(4, 16\)"):
        native.copy_channels(dst, 0, np.zeros((4, 16), np.float16), 2, 4)
    with pytest.raises(ValueError, match="outside dst"):
        native.copy_channels(dst, 0, np.zeros((4, 32), np.float16), 0, 4)  # rows wider than dst
    assert not dst.any()
