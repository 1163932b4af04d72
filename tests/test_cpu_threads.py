"""The CPU thread policy of simulator steps (rustane.cpu_threads): the split classifier matmul
against a float64 product, and the BLAS limit applied and restored around a step."""

from __future__ import annotations

import numpy as np
import pytest

from tiers import require_module, unavailable
from rustane.cpu_threads import StepThreads, _numpy_blas_controllers


@pytest.mark.parametrize("rows", [1, 2, 7, 1001])
def test_matmul_rows_equals_the_product(rows):
    r = np.random.default_rng(rows)
    a = r.standard_normal((rows, 96)).astype(np.float32)
    b = r.standard_normal((96, 33)).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    th = StepThreads(enabled=True, cpus=2)
    try:
        assert th._pool is not None  # 2 CPUs: BLAS held to 1 thread, the split uses a helper
        got = th.matmul_rows(a, b)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        out = np.full((rows, 33), np.nan, np.float32)
        assert th.matmul_rows(a, b, out=out) is out
        np.testing.assert_array_equal(out, got)  # deterministic: the same halves every call
    finally:
        th.close()
    plain = StepThreads(enabled=False)
    assert plain._pool is None and plain._blas == []
    np.testing.assert_allclose(plain.matmul_rows(a, b), want, rtol=1e-5, atol=1e-4)


def test_step_limits_numpy_blas_and_restores_it():
    require_module("threadpoolctl", hint="pip install threadpoolctl")
    ctls = _numpy_blas_controllers()
    if not ctls:
        unavailable("numpy links no BLAS that threadpoolctl can control (e.g. Accelerate)")
    for lc in ctls:
        lc.set_num_threads(2)
    queue_lib = [lc for lc in __import__("threadpoolctl").ThreadpoolController().lib_controllers
                 if lc.user_api == "blas" and "scipy_openblas32" in (lc.filepath or "")]
    queue_before = [lc.num_threads for lc in queue_lib]
    th = StepThreads(enabled=True, cpus=2)
    try:
        with th.step():
            assert [lc.num_threads for lc in th._blas] == [1] * len(th._blas)
            assert [lc.num_threads for lc in queue_lib] == queue_before  # the dW queue's BLAS: untouched
        assert [lc.num_threads for lc in ctls] == [2] * len(ctls)
        with pytest.raises(RuntimeError):
            with th.step():
                raise RuntimeError("a failing step still restores the thread count")
        assert [lc.num_threads for lc in ctls] == [2] * len(ctls)
    finally:
        th.close()
    four = StepThreads(enabled=True, cpus=4)
    assert four.blas_threads == 3 and four._pool is None  # BLAS itself spreads over 3 cores
    assert four.describe() == {"applied": True, "cpus": 4, "numpy_blas_threads": 3,
                               "numpy_blas_controlled": len(ctls), "split_helper": False,
                               "sim_matmul_split": False}


def test_sim_matmul_splitter_is_armed_only_inside_a_step_with_one_blas_thread():
    # the split halves round like the whole call only at one BLAS thread (rustane/mil/split.py)
    require_module("threadpoolctl", hint="pip install threadpoolctl")
    if not _numpy_blas_controllers():
        unavailable("numpy links no BLAS that threadpoolctl can control (e.g. Accelerate)")
    from rustane.mil.split import Splitter

    sp = Splitter()
    th = StepThreads(enabled=True, cpus=2, splitter=sp)
    try:
        assert not sp.active
        with th.step():
            assert sp.active
        assert not sp.active
        with pytest.raises(RuntimeError):
            with th.step():
                raise RuntimeError("a failing step disarms it too")
        assert not sp.active
        assert th.describe()["sim_matmul_split"] is True
    finally:
        th.close()
    for other in (StepThreads(enabled=True, cpus=4, splitter=sp), StepThreads(enabled=False, cpus=2, splitter=sp)):
        with other.step():
            assert not sp.active  # BLAS spreads itself (4 cores), or kernels are off the CPU
        other.close()
    sp.close()
