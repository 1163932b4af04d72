"""The NEON paths of csrc/fp16.c and csrc/staging.c: cross-compiled for arm64, run under qemu-aarch64,
compared with numpy (and, for NaN payloads, with this machine's native conversion)."""

from __future__ import annotations

import numpy as np
import pytest

from arm64 import build_driver


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    return build_driver(tmp_path_factory.mktemp("neon"), "driver", ["fp16.c", "staging.c"], ["-O2"])


def test_driver_uses_neon(driver):
    assert driver("path").decode().strip() == "neon"


def both_nan_or_equal(got_bits, want_bits, got, want):
    bad = (got_bits != want_bits) & ~(np.isnan(got) & np.isnan(want))
    assert not bad.any(), [(hex(a), hex(b)) for a, b in zip(got_bits[bad][:8], want_bits[bad][:8])]


def test_all_halves_and_round_trip(driver):
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    f = np.frombuffer(driver("h2f", data=h.tobytes()), np.float32)
    want = h.view(np.float16).astype(np.float32)
    both_nan_or_equal(f.view(np.uint32), want.view(np.uint32), f, want)
    back = np.frombuffer(driver("f2h", data=f.tobytes()), np.uint16)
    nan = np.isnan(h.view(np.float16))
    assert np.array_equal(back[~nan], h[~nan])
    assert np.array_equal(back[nan], h[nan] | 0x0200)


def test_random_float32_bit_patterns(driver):
    rng = np.random.default_rng(99)
    bits = rng.integers(0, 1 << 32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
    # plus every exact tie between adjacent halves, and the overflow edge
    h = np.arange(0x7BFF, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid = ((h[:-1] + h[1:]) / 2).astype(np.float32).view(np.uint32)
    bits = np.concatenate([bits, mid, mid | 0x80000000, mid + 1, mid - 1,
                           np.float32([65504, 65519.996, 65520, 1e38]).view(np.uint32)])
    x = bits.view(np.float32)
    got = np.frombuffer(driver("f2h", data=x.tobytes()), np.uint16)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    both_nan_or_equal(got, want.view(np.uint16), got.view(np.float16), want)
    # NaN payloads: the hardware rule (quiet, top payload bits kept), same as F16C/scalar here
    from rustane import native

    previous = native.set_simd("scalar")
    try:
        assert np.array_equal(got, native.f32_to_f16(x).view(np.uint16))
    finally:
        native.set_simd(previous)


@pytest.mark.parametrize("C,SP,c0,col,cb,nb,transpose", [
    (70, 100, 3, 5, 61, 90, True),    # ragged edges in both directions of the 4x4 and 32x32 tiles
    (64, 96, 0, 32, 64, 64, True),
    (9, 20, 2, 1, 7, 13, False),
    (768, 2560, 0, 512, 768, 2048, True),  # W1^T of Stories110M into the ffnFused input
])
def test_stage(driver, C, SP, c0, col, cb, nb, transpose):
    rng = np.random.default_rng(C * SP)
    block = (rng.standard_normal((cb, nb)) * 300).astype(np.float32)
    src = np.ascontiguousarray(block.T) if transpose else block
    out = driver("stage", C, SP, c0, col, cb, nb, int(transpose), data=src.tobytes())
    got = np.frombuffer(out, np.uint16).reshape(C, SP)
    want = np.zeros((C, SP), np.float16)
    want[c0:c0 + cb, col:col + nb] = block.astype(np.float16)
    assert np.array_equal(got, want.view(np.uint16))
