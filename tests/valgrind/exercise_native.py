"""Drive every entry point of the native code once, on small sizes, checking results against numpy.

Run under valgrind by tests/test_native_valgrind.py (about 30x slower there), so sizes are tiny but still
cover every branch that touches memory differently: SIMD and scalar conversion with ragged tails, plain
and transposed (cache-blocked) staging, the dW queue with snapshot and zero-copy jobs from two threads,
job failures, close/GC with jobs pending, all CPU ops, and a two-step fp16 training run on the simulator.
Exits non-zero (an AssertionError) if any result is wrong, so the valgrind run is never a no-op.
"""

from __future__ import annotations

import errno
import gc
import threading

import numpy as np

from rustane import cpu_ops, native

RNG = np.random.default_rng(1234)


def f32(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def raises(exc, fn, *args, **kw) -> None:
    try:
        fn(*args, **kw)
    except exc:
        return
    raise AssertionError(f"{fn.__name__}{args} did not raise {exc.__name__}")


# ---- fp16 conversion on every available path ------------------------------------------------

def check_conversion() -> list[str]:
    specials = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 65520.0, 1e-8, 6e-8, np.inf, -np.inf], np.float32)
    paths = sorted({"scalar", native.best_simd()})
    prev = native.simd()
    try:
        for path in paths:
            native.set_simd(path)
            for n in (0, 1, 7, 8, 9, 33, 1000):  # ragged tails around the 8-lane SIMD blocks
                x = np.concatenate([specials, f32(n) * 100])[: max(n, 1)] if n else np.zeros(0, np.float32)
                h = native.f32_to_f16(x)
                with np.errstate(over="ignore"):  # 65520 overflows to inf on purpose
                    want = x.astype(np.float16)
                assert np.array_equal(h.view(np.uint16), want.view(np.uint16)), (path, n)
                back = native.f16_to_f32(h)
                assert np.array_equal(back, h.astype(np.float32)), (path, n)
                out = np.empty(x.shape, np.float16)
                assert native.f32_to_f16(x, out) is out
            grid = f32(3, 5, 7)  # any shape
            assert np.array_equal(native.f32_to_f16(grid), grid.astype(np.float16))
            nan = native.f16_to_f32(np.array([0x7C01, 0xFE00], np.uint16).view(np.float16))
            assert np.isnan(nan).all()
    finally:
        native.set_simd(prev)
    raises(TypeError, native.f32_to_f16, np.zeros(4, np.float64))
    raises(ValueError, native.f32_to_f16, f32(4, 4)[:, ::2])
    raises(ValueError, native.f32_to_f16, f32(4), np.empty(5, np.float16))
    raises(ValueError, native.set_simd, "no-such-path")
    return paths


# ---- staging ----------------------------------------------------------------------------------

def check_staging() -> None:
    C, SP = 40, 72
    buf = np.zeros((C, SP), np.float16)
    a = f32(10, 33)
    native.stage(buf, a, 5, c0=3)
    assert np.array_equal(buf[3:13, 5:38], a.astype(np.float16))
    w = f32(70, 37)  # [N, Cb] staged transposed: larger than one cache block in both directions
    native.stage(buf, w, 1, c0=2, transpose=True)
    assert np.array_equal(buf[2:39, 1:71], w.T.astype(np.float16))
    got = native.unstage(buf, 2, 37, 1, 70)
    assert np.array_equal(got, w.T.astype(np.float16).astype(np.float32))
    out = np.empty((5, 9), np.float32)
    assert native.unstage(buf, 30, 5, 60, 9, out=out) is out
    assert np.array_equal(out, buf[30:35, 60:69].astype(np.float32))
    dst = np.zeros((20, 50), np.float16)
    native.copy_channels(dst, 4, buf, 10, 12, dst_col=3, src_col=20, ncols=40)
    assert np.array_equal(dst[4:16, 3:43], buf[10:22, 20:60])
    native.copy_channels(buf, 0, buf, 20, 10, ncols=30)  # disjoint windows of one buffer
    assert np.array_equal(buf[0:10, 0:30], buf[20:30, 0:30])
    # every error path must raise before any memory is touched
    raises(ValueError, native.stage, buf, f32(10, 80), 0)
    raises(ValueError, native.stage, buf, f32(80, 10), 0, transpose=True)
    raises(ValueError, native.stage, buf, f32(5, 5), 70)
    raises(ValueError, native.stage, buf, f32(5, 5), 0, c0=38)
    raises((ValueError, TypeError), native.stage, buf, np.zeros((4, 4), np.float64))
    raises(ValueError, native.unstage, buf, 35, 10)
    raises(ValueError, native.unstage, buf, 0, 4, 70, 5)
    raises(ValueError, native.unstage, buf, 0, 5, 0, 5, out=np.empty((4, 5), np.float32))
    raises(ValueError, native.copy_channels, buf, 0, buf, 5, 10)  # overlapping windows
    raises(ValueError, native.copy_channels, dst, 15, buf, 0, 10)


# ---- dW queue ---------------------------------------------------------------------------------

def dw_reference(dW, dY, X) -> np.ndarray:
    return dW.astype(np.float64) + dY.astype(np.float64) @ X.astype(np.float64).T


def check_dw_queue() -> None:
    with native.DWQueue() as q:
        results: list[tuple[np.ndarray, np.ndarray]] = []
        lock = threading.Lock()

        def worker(seed: int, copy: bool) -> None:
            rng = np.random.default_rng(seed)
            for out, inn, s in [(24, 16, 8), (1, 1, 1), (9, 13, 5), (5, 7, 0)]:
                dW, dY, X = (rng.standard_normal(sh).astype(np.float32) for sh in [(out, inn), (out, s), (inn, s)])
                want = dw_reference(dW, dY, X)
                q.submit(dW, dY, X, copy=copy)
                if copy:
                    dY[:] = np.nan  # the snapshot must have been taken already
                    X[:] = np.nan
                with lock:
                    results.append((dW, want))
            q.wait()

        threads = [threading.Thread(target=worker, args=(i, i % 2 == 0)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        q.wait()
        assert len(results) == 8
        for dW, want in results:
            np.testing.assert_allclose(dW, want, rtol=1e-5, atol=1e-4)

        q._inject_error(errno.EIO)
        raises(RuntimeError, q.wait)
        q._inject_error(errno.ENOMEM)
        raises(MemoryError, q.wait)
        raises(ValueError, q.submit, f32(4, 4), f32(4, 3), f32(5, 3))  # shapes disagree
        d = f32(4, 4)
        raises(ValueError, q.submit, d, d, d)  # dW overlaps its inputs
        q.wait()  # still usable after failures

    raises(RuntimeError, q.submit, f32(2, 2), f32(2, 2), f32(2, 2))  # closed

    # close() and garbage collection with jobs still pending must wait for them, then free everything
    dW, dY, X = f32(32, 32), f32(32, 64), f32(32, 64)
    want = dw_reference(dW, dY, X)
    q = native.DWQueue()
    q.submit(dW, dY, X, copy=False)
    q.submit(f32(8, 8), f32(8, 8), f32(8, 8))
    q.close()
    np.testing.assert_allclose(dW, want, rtol=1e-5, atol=1e-4)
    q = native.DWQueue()
    q._inject_error(errno.EIO)
    raises(RuntimeError, q.close)  # a failure nobody waited for is reported by close()
    dW2 = f32(16, 16)
    q = native.DWQueue()
    q.submit(dW2, f32(16, 16), f32(16, 16), copy=False)
    q.submit(f32(16, 16), f32(16, 16), f32(16, 16))
    del q  # dealloc waits for the zero-copy job
    cyc = native.DWQueue()
    cyc.self_ref = cyc  # a reference cycle: only the cyclic collector frees it
    cyc.submit(f32(16, 16), f32(16, 16), f32(16, 16))
    del cyc
    gc.collect()


# ---- CPU ops ----------------------------------------------------------------------------------

def check_cpu_ops() -> None:
    C, S = 48, 12
    x, w, dy = f32(C, S), f32(C) + 1.0, f32(C, S)
    y, r = cpu_ops.rmsnorm_forward(x, w, 1e-5)
    x64 = x.astype(np.float64)
    r_ref = 1.0 / np.sqrt((x64 ** 2).mean(0) + 1e-5)
    np.testing.assert_allclose(y, x64 * r_ref * w[:, None], rtol=1e-4, atol=1e-5)
    dw = np.zeros(C, np.float32)
    dx = cpu_ops.rmsnorm_backward(dy, x, w, r, dw)
    g = dy.astype(np.float64) * w[:, None]
    dx_ref = r_ref * (g - x64 * r_ref ** 2 / C * (g * x64).sum(0))
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, (dy * x64 * r_ref).sum(1), rtol=1e-4, atol=1e-5)
    raises(ValueError, cpu_ops.rmsnorm_forward, x, f32(C + 1))

    H, HD = 3, 8
    q = f32(H * HD, S)
    rot = cpu_ops.rope_forward(q, H, HD, 10000.0)
    pos = np.arange(S)[None, :]
    freq = 10000.0 ** (-np.arange(0, HD, 2) / HD)
    ang = np.tile(freq, H)[:, None] * pos
    a, b = q[0::2].astype(np.float64), q[1::2].astype(np.float64)
    np.testing.assert_allclose(rot[0::2], a * np.cos(ang) - b * np.sin(ang), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rot[1::2], a * np.sin(ang) + b * np.cos(ang), rtol=1e-4, atol=1e-5)
    back = cpu_ops.rope_backward(rot.copy(), H, HD, 10000.0)
    np.testing.assert_allclose(back, q, rtol=1e-4, atol=1e-5)
    cpu_ops.rope_forward(q, H, HD, out=q)  # in place

    V, S2 = 2003, 9
    logits = f32(V, S2) * 3
    tgt = RNG.integers(0, V, S2)
    l64 = logits.astype(np.float64)
    lse = np.log(np.exp(l64 - l64.max(0)).sum(0)) + l64.max(0)
    loss_ref = float((lse - l64[tgt, np.arange(S2)]).mean())
    p = np.exp(l64 - lse)
    p[tgt, np.arange(S2)] -= 1.0
    loss, dl = cpu_ops.cross_entropy(logits, tgt, grad_scale=2.0)
    assert abs(loss - loss_ref) < 1e-4 * max(1.0, abs(loss_ref)), (loss, loss_ref)
    np.testing.assert_allclose(dl, p * 2.0 / S2, rtol=1e-4, atol=1e-7)
    inplace = logits.copy()
    loss2, dl2 = cpu_ops.cross_entropy(inplace, tgt, grad_scale=2.0, dlogits=inplace)
    assert dl2 is inplace and loss2 == loss and np.array_equal(dl2, dl)
    raises(ValueError, cpu_ops.cross_entropy, logits, np.full(S2, V))  # target out of range

    Vs, D = 50, 16
    E = f32(Vs, D)
    tok = RNG.integers(0, Vs, S)
    emb = cpu_ops.embedding_forward(E, tok)
    assert np.array_equal(emb, E[tok].T)
    dE = np.zeros_like(E)
    gx = f32(D, S)
    cpu_ops.embedding_backward(gx, tok, dE)
    ref = np.zeros((Vs, D))
    np.add.at(ref, tok, gx.T.astype(np.float64))
    np.testing.assert_allclose(dE, ref, rtol=1e-5, atol=1e-6)
    raises(ValueError, cpu_ops.embedding_forward, E, np.array([Vs]))

    n = 1001
    wt, gr, m, v = f32(n), f32(n), np.zeros(n, np.float32), np.zeros(n, np.float32)
    w0 = wt.astype(np.float64)
    cpu_ops.adamw_step(wt, gr, m, v, lr=1e-2, step=1, weight_decay=0.1, grad_scale=0.5)
    g64 = gr.astype(np.float64) * 0.5
    m_ref, v_ref = 0.1 * g64, 0.05 * g64 ** 2
    w_ref = w0 * (1 - 1e-2 * 0.1) - 1e-2 * (m_ref / 0.1) / (np.sqrt(v_ref / 0.05) + 1e-8)
    np.testing.assert_allclose(m, m_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(wt, w_ref, rtol=1e-4, atol=1e-5)

    z = f32(777)
    assert abs(cpu_ops.sumsq(z) - float((z.astype(np.float64) ** 2).sum())) < 1e-6 * z.size
    assert cpu_ops.sumsq(np.array([1.0, np.inf], np.float32)) == np.inf
    assert abs(cpu_ops.global_norm([z, x]) - np.sqrt((z.astype(np.float64) ** 2).sum() + (x64 ** 2).sum())) < 1e-4
    check_threaded_cpu_ops()
    check_sim_row_ops()


def check_threaded_cpu_ops() -> None:
    """The pthread paths: enough work that 2 threads really split (>= 128K elements each for the
    optimizer passes, >= 32 positions each for the CE), compared with the one-thread results."""
    sizes = (150_001, 3, 130_000)
    ws = [f32(n) for n in sizes]
    gs = [f32(n) for n in sizes]
    ms = [np.zeros(n, np.float32) for n in sizes]
    vs = [np.zeros(n, np.float32) for n in sizes]
    ref = [[a.copy() for a in grp] for grp in (ws, gs, ms, vs)]
    for k in range(len(sizes)):
        cpu_ops.adamw_step(ref[0][k], ref[1][k], ref[2][k], ref[3][k], lr=1e-2, step=3, weight_decay=0.1)
    cpu_ops.adamw_tensors(ws, gs, ms, vs, [0.1] * 3, lr=1e-2, step=3, zero_grad=True, threads=2)
    for got, want in zip((ws, ms, vs), (ref[0], ref[2], ref[3])):
        for a, b in zip(got, want):
            assert np.array_equal(a, b)
    assert not any(g.any() for g in gs)
    arrs = ref[1]
    assert cpu_ops.sumsq_tensors(arrs, threads=2) == cpu_ops.sumsq_tensors(arrs, threads=1)

    V, S = 257, 96
    logits = f32(V, S) * 3
    tgt = RNG.integers(0, V, S)
    l1, d1 = cpu_ops.cross_entropy(logits, tgt, grad_scale=2.0, threads=1)
    l2, d2 = cpu_ops.cross_entropy(logits, tgt, grad_scale=2.0, threads=2)
    assert l1 == l2 and np.array_equal(d1, d2)


def check_sim_row_ops() -> None:
    wide = f32(20, 300) * 10
    rows = wide[:, 5:261]  # strided rows, as the simulator passes slices
    x64 = rows.astype(np.float64)
    sig = 1 / (1 + np.exp(-x64))
    np.testing.assert_allclose(cpu_ops.sigmoid(rows), sig, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(cpu_ops.silu(rows), sig * x64, rtol=1e-6, atol=1e-30)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    np.testing.assert_allclose(cpu_ops.softmax_last(rows), e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-30)
    cpu_ops.softmax_last(rows, out=rows)  # in place on the strided view
    np.testing.assert_allclose(rows, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-30)
    raises(ValueError, cpu_ops.sigmoid, wide.T)


def check_row_programs() -> None:
    """The fused fp16 row programs (csrc/sim_rows.c): a run over a row split, and refused programs
    (their half-built C structs must be freed)."""
    from rustane import _cpu

    rows, n = 33, 70
    x = f32(rows, n).astype(np.float16)
    out = np.zeros((rows, n), np.float16)
    off = np.arange(rows, dtype=np.int64) * n
    code = _cpu.ROW_OPS
    ops = np.array([(code["load"], 0, 0, 0), (code["softmax"], 1, 0, 0), (code["mul"], 2, 1, 0),
                    (code["reduce_sum"], 3, 2, 0), (code["sub"], 4, 2, 3), (code["store"], 0, 1, 4)], np.int32)
    prog = _cpu.RowProgram(ops, [(x, n, 1, off), (out, n, 1, off)], [n, n, n, 1, n], rows, n)
    prog.run(10, rows)
    prog.run(0, 10)
    assert np.isfinite(out.astype(np.float32)).all()
    raises(ValueError, _cpu.RowProgram, ops, [(x, n, 1, off + 1), (out, n, 1, off)], [n, n, n, 1, n], rows, n)
    raises(ValueError, prog.run, 0, rows + 1)
    assert np.float32(_cpu.pairwise_sum(np.arange(1000, dtype=np.float32))) == np.add.reduce(np.arange(1000, dtype=np.float32))


# ---- a short training run through everything at once -------------------------------------------

def check_training() -> None:
    from rustane.config import ModelConfig
    from rustane.engine import Engine, TrainConfig

    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, seq_len=8)
    # a research-sized config (far below the ANE's minimum surfaces): valgrind time stays short
    eng = Engine(cfg, backend="sim", precision="fp16", seed=0,
                 train=TrainConfig(steps=2, warmup=1, lr=1e-2, accum=1), ane_rules=False)
    before = {k: v.copy() for k, v in eng.model.params.items()}
    batch = (np.arange(2 * (cfg.seq_len + 1)) * 7 % cfg.vocab_size).reshape(2, cfg.seq_len + 1)
    stats = [eng.train_step(batch) for _ in range(2)]
    assert all(np.isfinite(s.loss) for s in stats), stats
    assert stats[0].loss > 0.5 * np.log(cfg.vocab_size), stats[0]
    moved = [k for k in before if not np.array_equal(before[k], eng.model.params[k])]
    assert len(moved) == len(before), f"parameters not updated: {sorted(set(before) - set(moved))}"


def main() -> None:
    paths = check_conversion()
    check_staging()
    check_dw_queue()
    check_cpu_ops()
    check_row_programs()
    check_training()
    print(f"conversion paths exercised: {', '.join(paths)}")
    print("exercise_native: all checks passed")


if __name__ == "__main__":
    main()
