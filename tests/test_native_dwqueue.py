"""The background dW queue: dW += dY @ X.T computed by numpy (float64) is the reference."""

from __future__ import annotations

import errno
import gc
import threading

import numpy as np
import pytest

from rustane import native


def operands(rng, out, inn, s):
    return (rng.standard_normal((out, inn)).astype(np.float32), rng.standard_normal((out, s)).astype(np.float32),
            rng.standard_normal((inn, s)).astype(np.float32))


def reference(dW, dY, X):
    return (dW.astype(np.float64) + dY.astype(np.float64) @ X.astype(np.float64).T).astype(np.float32)


def close_enough(got, want, s):
    # fp32 sgemm with K = s terms of unit variance: error grows ~ sqrt(s) ulps of the partial sums
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(s) * 4)


@pytest.mark.parametrize("copy", [True, False])
def test_results_match_numpy(copy):
    rng = np.random.default_rng(0)
    with native.DWQueue() as q:
        jobs = [operands(rng, o, i, s) for o, i, s in [(64, 48, 32), (1, 1, 1), (33, 17, 5), (96, 96, 256), (5, 7, 0)]]
        want = [reference(*j) for j in jobs]
        for dW, dY, X in jobs:
            q.submit(dW, dY, X, copy=copy)
        assert q.pending == len(jobs)
        q.wait()
        assert q.pending == 0
        for (dW, _, s), w in zip(jobs, want):
            close_enough(dW, w, s.shape[1])


def test_accumulates_in_order_into_one_dW():
    rng = np.random.default_rng(1)
    dW = np.zeros((40, 30), np.float32)
    want = dW.astype(np.float64)
    with native.DWQueue() as q:
        for _ in range(10):
            _, dY, X = operands(rng, 40, 30, 16)
            want += dY.astype(np.float64) @ X.astype(np.float64).T
            q.submit(dW, dY, X)
        q.wait()
    close_enough(dW, want.astype(np.float32), 160)


def test_recycled_snapshot_buffers_across_rounds():
    """Snapshot buffers are pooled: later, smaller or larger jobs must never see stale operands."""
    rng = np.random.default_rng(9)
    with native.DWQueue() as q:
        for shapes in [[(64, 64, 64), (8, 8, 8)], [(8, 8, 8), (64, 32, 16)], [(33, 65, 7)] * 3, [(100, 3, 50)]]:
            jobs = [operands(rng, *s) for s in shapes]
            want = [reference(*j) for j in jobs]
            for j in jobs:
                q.submit(*j)
                j[1][:] = np.nan  # clobber the caller's copies right away
                j[2][:] = np.nan
            q.wait()
            for (dW, _, _), w, s in zip(jobs, want, shapes):
                close_enough(dW, w, s[2])


def test_snapshot_semantics():
    rng = np.random.default_rng(2)
    dW, dY, X = operands(rng, 50, 60, 70)
    want = reference(dW, dY, X)
    with native.DWQueue() as q:
        big = operands(rng, 512, 512, 512)  # a slow job first so ours is still queued when we mutate
        q.submit(*big)
        q.submit(dW, dY, X)
        dY[:] = np.nan  # caller reuses its buffers at once
        X[:] = 1e30
        q.wait()
    close_enough(dW, want, 70)


def test_without_snapshot_the_job_sees_later_writes():
    """Control for the test above: with copy=False the queued job reads the mutated inputs, so the
    snapshot test really detects a missing copy (the 768^3 job ahead keeps ours queued ~10+ ms)."""
    rng = np.random.default_rng(2)
    dW, dY, X = operands(rng, 50, 60, 70)
    with native.DWQueue() as q:
        q.submit(*operands(rng, 768, 768, 768))
        q.submit(dW, dY, X, copy=False)
        dY[:] = np.nan
        q.wait()
    assert np.isnan(dW).all()


def test_keeps_dW_alive_until_wait():
    rng = np.random.default_rng(3)
    q = native.DWQueue()
    q.submit(*operands(rng, 512, 512, 512))
    dW, dY, X = operands(rng, 20, 20, 20)
    want = reference(dW, dY, X)
    view = dW[:]  # what we keep; the queue must keep the array it writes to
    q.submit(dW, dY, X)
    del dW, dY, X
    gc.collect()
    q.wait()
    close_enough(view, want, 20)
    q.close()


def test_many_threads_submit_concurrently():
    rng = np.random.default_rng(4)
    n_threads, per_thread = 4, 12
    shared = np.zeros((32, 24), np.float32)
    shared_want = np.zeros((32, 24), np.float64)
    lock = threading.Lock()
    own = []
    q = native.DWQueue()
    inputs = [[operands(rng, 32, 24, 8) for _ in range(per_thread)] for _ in range(n_threads)]
    barrier = threading.Barrier(n_threads)
    errors = []

    def work(k):
        try:
            barrier.wait()
            mine = np.zeros((16, 16), np.float32)
            want = np.zeros((16, 16), np.float64)
            for j, (_, dY, X) in enumerate(inputs[k]):
                q.submit(shared, dY, X)
                q.submit(mine, dY[:16].copy(), X[:16].copy())
                want += dY[:16].astype(np.float64) @ X[:16].astype(np.float64).T
                with lock:
                    shared_want[:] += dY.astype(np.float64) @ X.astype(np.float64).T
                if j % 5 == 4:
                    q.wait()  # waits racing submits from the other threads
            q.wait()
            own.append((mine, want))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    q.wait()
    close_enough(shared, shared_want.astype(np.float32), 8 * n_threads * per_thread)
    for mine, want in own:
        close_enough(mine, want.astype(np.float32), 8 * per_thread)
    q.close()


def test_invalid_jobs_raise_at_submit():
    rng = np.random.default_rng(5)
    dW, dY, X = operands(rng, 8, 6, 4)
    q = native.DWQueue()
    with pytest.raises(ValueError, match=r"dW \(8, 6\), dY \(8, 3\), X \(6, 4\)"):
        q.submit(dW, dY[:, :3].copy(), X)
    with pytest.raises(ValueError, match="same S"):
        q.submit(dW, dY, X[:5])
    with pytest.raises(ValueError, match=r"dW \(6, 8\)"):
        q.submit(dW.T.copy(), dY, X)
    with pytest.raises(TypeError, match="float32"):
        q.submit(dW.astype(np.float64), dY, X)
    with pytest.raises(TypeError, match="float32"):
        q.submit(dW, dY.astype(np.float16), X)
    with pytest.raises(ValueError, match="C-contiguous"):
        q.submit(dW, dY, np.asfortranarray(X))
    with pytest.raises(ValueError, match="2-D"):
        q.submit(dW, dY.reshape(-1), X)
    ro = dW.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        q.submit(ro, dY, X)
    sq = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="share memory"):
        q.submit(sq, sq, sq)
    assert q.pending == 0
    q.wait()
    q.close()
    with pytest.raises(RuntimeError, match="closed"):
        q.submit(dW, dY, X)
    with pytest.raises(RuntimeError, match="closed"):
        q.wait()
    q.close()  # idempotent
    with pytest.raises(ValueError, match="blas_threads"):
        native.DWQueue(blas_threads=-1)


def test_job_failure_surfaces_at_next_wait():
    rng = np.random.default_rng(6)
    dW, dY, X = operands(rng, 10, 12, 14)
    want = reference(dW, dY, X)
    with native.DWQueue() as q:
        q._inject_error(errno.EIO)
        q.submit(dW, dY, X)  # later jobs still run
        with pytest.raises(RuntimeError, match=r"error 5"):
            q.wait()
        close_enough(dW, want, 14)
        q.wait()  # the error was reported once
        q._inject_error(errno.ENOMEM)
        with pytest.raises(MemoryError):
            q.wait()


def test_dealloc_and_close_with_pending_jobs():
    rng = np.random.default_rng(7)
    dW, dY, X = operands(rng, 256, 256, 256)
    want = reference(dW, dY, X)
    q = native.DWQueue()
    q.submit(dW, dY, X)
    del q  # joins the worker after the job ran
    gc.collect()
    close_enough(dW, want, 256)
    for _ in range(20):  # many short-lived queues: threads must not pile up
        native.DWQueue().submit(*operands(rng, 4, 4, 4))
    gc.collect()
    assert threading.active_count() < 10


def test_blas_thread_scope_reported():
    assert native.DWQueue(blas_threads=0).blas_thread_scope in ("local", "global", "none")
