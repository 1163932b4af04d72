"""csrc/cpu_ops.c, csrc/sim_ops.c and csrc/sim_rows.c as a Mac runs them: cross-compiled for arm64 (no AVX2 clones,
NEON-width vectorisation, the same -fno-math-errno), run under qemu-aarch64 with several threads.
ISO C keeps FMA contraction off, so every element takes the same operations as on this x86 build:
the arm64 results must equal the installed extension's bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from arm64 import build_driver
from rustane import cpu_ops as cpu  # the installed extension: the x86 side of the comparison


@pytest.fixture(scope="module")
def drive(tmp_path_factory):
    return build_driver(tmp_path_factory.mktemp("arm64cpu"), "cpu_driver", ["cpu_ops.c", "sim_ops.c", "sim_rows.c", "fp16.c"],
                        ["-O3", "-fno-math-errno", "-pthread"])


def _wide(n, seed):
    r = np.random.default_rng(seed)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 87.3, -87.3, 88.8, -88.8, 1e-45, -3.4e38], np.float32)
    return np.concatenate([special, (r.standard_normal(n) * 25).astype(np.float32)])


def same_bits(a, b):
    """Bit-equal, except that a NaN's sign may differ: the default NaN an invalid operation
    (inf · 0) makes is negative on x86 and positive on arm64."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    np.testing.assert_array_equal(nan, np.isnan(b))
    np.testing.assert_array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))


def test_sigmoid_silu_softmax(drive):
    x = _wide(50_001, 1)
    same_bits(np.frombuffer(drive("sigmoid", data=x.tobytes()), np.float32), cpu.sigmoid(x))
    same_bits(np.frombuffer(drive("silu", data=x.tobytes()), np.float32), cpu.silu(x))
    a = (np.random.default_rng(2).standard_normal((37, 259)) * 8).astype(np.float32)
    same_bits(np.frombuffer(drive("softmax", 259, data=a.tobytes()), np.float32).reshape(37, 259),
              cpu.softmax_last(a))


@pytest.mark.parametrize("threads", [1, 3])
def test_cross_entropy(drive, threads):
    r = np.random.default_rng(threads)
    V, S = 1003, 200
    logits = (r.standard_normal((V, S)) * 5).astype(np.float32)
    t = r.integers(0, V, S).astype(np.int32)
    out = drive("ce", V, S, threads, 0.5, data=logits.tobytes() + t.tobytes())
    loss = np.frombuffer(out[:8], np.float64)[0]
    want_loss, want = cpu.cross_entropy(logits, t, grad_scale=0.5)
    assert loss == want_loss
    same_bits(np.frombuffer(out[8:], np.float32).reshape(V, S), want)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_adamw_tensors_and_sumsq(drive, threads):
    r = np.random.default_rng(10 + threads)
    n = 400_000  # >= 128K elements per thread, so the split really happens
    w, g, m = (r.standard_normal(n).astype(np.float32) * s for s in (1.0, 1e-2, 1e-3))
    v = np.abs(r.standard_normal(n).astype(np.float32)) * 1e-5
    out = np.frombuffer(drive("adamw", threads, data=b"".join(a.tobytes() for a in (w, g, m, v))), np.float32)
    a = n // 3
    want = [w.copy(), g.copy(), m.copy(), v.copy()]
    cpu.adamw_tensors([want[0][:a], want[0][a:]], [want[1][:a], want[1][a:]], [want[2][:a], want[2][a:]],
                      [want[3][:a], want[3][a:]], [0.1, 0.0], lr=3e-3, step=7, grad_scale=0.5, zero_grad=True,
                      threads=1)
    for got, exp in zip(np.split(out, 4), (want[0], want[2], want[3], want[1])):
        same_bits(got, exp)
    s = np.frombuffer(drive("sumsq", threads, data=w.tobytes()), np.float64)[0]
    assert s == cpu.sumsq_tensors([w], threads=1)


def test_row_program_rounds_like_x86(drive):
    """The fused sdpaBwd2 row program (NEON fp16 rounding, arm64 pairwise sum) against numpy's
    unfused ops on this machine: each op widened, computed in fp32, rounded to fp16."""
    r = np.random.default_rng(5)
    rows, n = 50, 1000
    p = (r.random((rows, n)) * 0.01).astype(np.float16)
    dp = (r.standard_normal((rows, n)) * 3).astype(np.float16)
    dp[0, :3] = [np.inf, 6e4, 3e-6]  # overflow, an fp16 subnormal
    out = np.frombuffer(drive("rowsds", n, data=p.tobytes() + dp.tobytes()), np.float16).reshape(rows, n)
    f32, r16 = np.float32, (lambda a: a.astype(np.float16).astype(np.float32))  # noqa: E731
    pdp = r16(p.astype(f32) * dp.astype(f32))
    rs = r16(np.add.reduce(pdp, axis=1, keepdims=True))
    want = (r16(r16(p.astype(f32) * r16(dp.astype(f32) - rs))) * f32(0.125)).astype(np.float16)
    nan = np.isnan(want)
    np.testing.assert_array_equal(nan, np.isnan(out))
    np.testing.assert_array_equal(out[~nan].view(np.uint16), want[~nan].view(np.uint16))
