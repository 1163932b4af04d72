"""Fused fp16 row programs (rustane/mil/fuse_rows.py, csrc/sim_rows.c) give the unfused bits.

The reference is the interpreter's unfused path (``fuse_rows=False``): numpy ufuncs on widened
fp32 scratch, one rounding copy per op, numpy's own add.reduce and the softmax/silu/sigmoid
row functions. It shares no code with the row program's loops, rounding helper or pairwise sum.
Every fp16 kernel of every preset, and Stories15M at seq 1024, runs both ways on inputs that
include overflow, NaN and subnormals; so does a whole training step. The pairwise sum is
compared with numpy's add.reduce directly (hypothesis).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from rustane.config import preset
from rustane.kernels import plan_for, render
from rustane.mil.interp import compile_program
from rustane.mil.parser import parse
from rustane.model import kernel_shape

_cpu = pytest.importorskip("rustane._cpu")

CASES = [(p, None) for p in ("tiny", "stories15m", "stories110m", "smollm2-135m", "qwen3-0.6b")]
CASES.append(("stories15m", 1024))


def _inputs(plan, rng):
    """fp16 inputs: mostly N(0, 1), some huge (overflow inside the ops), NaN, subnormal."""
    ins = {}
    for n in plan.input_names:
        shape = plan.values[n].shape
        x = rng.standard_normal(shape).astype(np.float32)
        pick = rng.random(shape)
        x[pick < 2e-4] = 6e4
        x[(pick >= 2e-4) & (pick < 3e-4)] = np.nan
        x[(pick >= 3e-4) & (pick < 5e-4)] = 3e-6  # an fp16 subnormal
        ins[n] = x.astype(np.float16)
    return ins


def _run(plan, ins, fuse, splitter=None):
    outs = {n: np.full(plan.values[n].shape, np.nan, np.float16) for n in plan.output_names}
    plan.bind(ins, outs, splitter=splitter, fuse_rows=fuse).run()
    return outs



@pytest.mark.parametrize("name,seq", CASES)
def test_every_fp16_kernel_gives_the_unfused_bits(name, seq, splitter):
    cfg = preset(name, seq_len=seq) if seq else preset(name)
    rng = np.random.default_rng(7)
    fused_members = 0
    for kname, spec in plan_for(kernel_shape(cfg, "fp16")).items():
        plan = compile_program(parse(render(spec)), spec.blobs, "fp16")
        fused_members += sum(len(r.members) for r in plan._row_runs(True))
        ins = _inputs(plan, rng)
        with threadpool_limits(limits=1, user_api="blas"):  # as in training (rustane/cpu_threads.py)
            want = _run(plan, ins, fuse=False)
            # with the splitter, the helper thread runs half of each run's rows (and half matmuls)
            gots = [_run(plan, ins, fuse=True, splitter=sp) for sp in (None, splitter)]
        for got in gots:
            for n in plan.output_names:
                a, b = want[n].view(np.uint16), got[n].view(np.uint16)
                bad = np.flatnonzero(a != b)
                assert bad.size == 0, (f"{name} {kname} output {n}: {bad.size} elements differ, "
                                       f"first at {bad[0]}: {want[n].flat[bad[0]]} vs {got[n].flat[bad[0]]}")
    # the attention chains (scale, mask, softmax; P*dP, rowsum, ...) and the FFN gates did fuse
    assert fused_members >= 20


def test_training_steps_write_the_same_weights_fused_or_not(monkeypatch):
    from rustane.engine import Engine, TrainConfig

    cfg = preset("tiny")
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, cfg.vocab_size, size=(2, cfg.seq_len + 1)) for _ in range(3)]
    params = []
    for fuse in ("0", "1"):
        monkeypatch.setenv("RUSTANE_FUSE_ROWS", fuse)
        eng = Engine(cfg, backend="sim", precision="fp16", seed=5, train=TrainConfig(steps=3, warmup=1, lr=3e-3, accum=2))
        try:
            losses = [eng.train_step(b).loss for b in batches]
            params.append((losses, {k: np.array(v, copy=True) for k, v in eng.model.params.items()}))
        finally:
            eng.close()
    (l0, p0), (l1, p1) = params
    assert l0 == l1
    assert set(p0) == set(p1)
    for k in p0:
        assert np.array_equal(p0[k].view(np.uint32 if p0[k].dtype == np.float32 else np.uint16),
                              p1[k].view(np.uint32 if p1[k].dtype == np.float32 else np.uint16)), k


def test_fusion_finds_the_attention_chains():
    """The runs the module doc promises, by name, in the kernels that have them."""
    cfg = preset("stories15m")
    kernels = plan_for(kernel_shape(cfg, "fp16"))

    def runs(kname):
        spec = kernels[kname]
        plan = compile_program(parse(render(spec)), spec.blobs, "fp16")
        return [[plan.nodes[i].name for i in r.members] for r in plan._row_runs(True)]

    assert ["scs", "scm", "p"] in runs("sdpaFwd")
    assert ["scs", "scm", "p"] in runs("sdpaBwd1")
    assert ["pdp", "rs", "dpc", "ds0", "ds"] in runs("sdpaBwd2")
    # fp32 precision never fuses (each op is already one pass)
    spec = plan_for(kernel_shape(cfg, "fp32"))["sdpaBwd2"]
    assert compile_program(parse(render(spec)), spec.blobs, "fp32")._row_runs(True) == []


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 3000), scale=st.floats(1e-3, 1e4), seed=st.integers(0, 2**32 - 1))
def test_pairwise_sum_is_numpys_add_reduce(n, scale, seed):
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    want = np.add.reduce(x)
    got = _cpu.pairwise_sum(x)
    assert np.float32(got).view(np.uint32) == np.float32(want).view(np.uint32), (n, got, want)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), n=st.integers(1, 300), split=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
def test_row_program_matches_numpy_and_any_row_split(rows, n, split, seed):
    """z = softmax((x*s + m)) per row, rowsum of x*y: against numpy written out here."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * 3).astype(np.float16)
    y = rng.standard_normal((rows, n)).astype(np.float16)
    m = rng.standard_normal((1, n)).astype(np.float16)  # broadcast over rows
    s = np.array(0.125, np.float16)
    z = np.zeros((rows, n), np.float16)
    t = np.zeros((rows, 1), np.float16)
    zero = np.zeros(rows, np.int64)
    rowoff = np.arange(rows, dtype=np.int64) * n
    args = [(x, n, 1, rowoff), (y, n, 1, rowoff), (m, n, 1, zero), (s, 1, 0, zero),
            (z, n, 1, rowoff), (t, 1, 0, np.arange(rows, dtype=np.int64))]
    code = _cpu.ROW_OPS
    ops = [(code["load"], 0, 0, 0), (code["load"], 1, 1, 0), (code["load"], 2, 2, 0), (code["load"], 3, 3, 0),
           (code["mul"], 4, 0, 3), (code["add"], 5, 4, 2), (code["softmax"], 6, 5, 0), (code["store"], 0, 4, 6),
           (code["mul"], 7, 0, 1), (code["reduce_sum"], 8, 7, 0), (code["store"], 0, 5, 8)]
    widths = [n, n, n, 1, n, n, n, n, 1]
    prog = _cpu.RowProgram(np.array(ops, np.int32), args, widths, rows, n)
    cut = min(split, rows)
    prog.run(cut, rows)
    prog.run(0, cut)

    f32 = np.float32
    r16 = lambda a: a.astype(np.float16).astype(f32)  # noqa: E731
    v = r16(r16(x.astype(f32) * f32(s)) + m.astype(f32))
    e = np.exp(v - v.max(axis=1, keepdims=True))
    want_z = (e / e.sum(axis=1, keepdims=True)).astype(np.float16)
    want_t = np.add.reduce(r16(x.astype(f32) * y.astype(f32)), axis=1, keepdims=True).astype(np.float16)
    assert np.array_equal(t.view(np.uint16), want_t.view(np.uint16))
    # softmax's exp is the C polynomial (a few fp32 ulp from numpy's): compare in fp16 ulps
    zf, wf = z.astype(f32), want_z.astype(f32)
    assert np.all(np.abs(zf - wf) <= np.spacing(np.maximum(np.abs(wf), np.float16(6e-5)).astype(np.float16)).astype(f32) + 1e-7)


def test_row_program_refuses_bad_programs_with_a_clear_error():
    x = np.zeros((4, 8), np.float16)
    off = np.arange(4, dtype=np.int64) * 8
    code = _cpu.ROW_OPS
    with pytest.raises(ValueError, match="outside the 32 elements"):
        _cpu.RowProgram(np.array([(code["load"], 0, 0, 0)], np.int32), [(x, 8, 1, off + 1)], [8], 4, 8)
    with pytest.raises(ValueError, match="read-only"):
        ro = x.copy()
        ro.flags.writeable = False
        _cpu.RowProgram(np.array([(code["load"], 0, 0, 0), (code["store"], 0, 1, 0)], np.int32),
                        [(x, 8, 1, off), (ro, 8, 1, off)], [8], 4, 8)
    with pytest.raises(ValueError, match="must differ"):
        _cpu.RowProgram(np.array([(code["load"], 0, 0, 0), (code["mul"], 0, 0, 0)], np.int32),
                        [(x, 8, 1, off)], [8], 4, 8)
    with pytest.raises(ValueError, match="register 3 out of range"):
        _cpu.RowProgram(np.array([(code["load"], 3, 0, 0)], np.int32), [(x, 8, 1, off)], [8], 4, 8)
    prog = _cpu.RowProgram(np.array([(code["load"], 0, 0, 0)], np.int32), [(x, 8, 1, off)], [8], 4, 8)
    with pytest.raises(ValueError, match="outside"):
        prog.run(0, 5)
