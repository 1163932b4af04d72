"""The simulator's split matmuls (rustane/mil/split.py) give the bits of the whole call.

The reference is numpy's own unsplit ``np.matmul`` with the BLAS held to one thread (what a
training step does), at the matmul shapes of every shipped preset at seq 256 and Stories15M at
seq 1024, plus whole training steps: the engine with the splitter and without it must write
bit-identical weights in fp32 and in fp16 (the ANE numerics model)."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from rustane.backends.sim import SimBackend
from rustane.config import ModelConfig, preset
from rustane.engine import Engine, TrainConfig
from rustane.mil.split import Splitter, split_matmul


def _shapes(cfg):
    """(m, k, n, transpose_x, transpose_y) of the layer matmuls of a step at ``cfg`` (forward and
    dx), in the orientation the kernels' MIL uses: activations [S, D] times weights."""
    D, H, S = cfg.dim, cfg.hidden_dim, cfg.seq_len
    QD, KVD = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return [(S, D, QD, True, False), (S, D, KVD, True, False), (S, D, H, True, False),
            (D, QD, S, False, False), (D, H, S, False, False), (H, D, S, False, False),
            (QD, D, S, False, False), (D, QD, S, True, False), (H, D, S, True, False),
            (S, H, D, True, True)]


CASES = [(p, 256) for p in ("stories15m", "stories42m", "stories110m", "smollm2-135m", "qwen3-0.6b")]
CASES.append(("stories15m", 1024))



@pytest.mark.parametrize("name,seq", CASES)
def test_split_rows_are_bit_identical_to_the_whole_matmul(name, seq, splitter):
    cfg = preset(name, seq_len=seq)
    rng = np.random.default_rng(seq)
    split_seen = 0
    with threadpool_limits(limits=1, user_api="blas"):
        for m, k, n, tx, ty in _shapes(cfg):
            x = rng.standard_normal((k, m) if tx else (m, k), dtype=np.float32)
            y = rng.standard_normal((n, k) if ty else (k, n), dtype=np.float32)
            xa, ya = (x.T if tx else x), (y.T if ty else y)
            want = np.matmul(xa, ya)
            got = np.full_like(want, np.nan)
            before = splitter.splits
            split_matmul(splitter, xa, ya, got)()
            split_seen += splitter.splits - before
            assert np.array_equal(got, want), f"{name} seq {seq}: [{m}x{k}]@[{k}x{n}] t={tx, ty}"
    assert split_seen > 0  # the shapes did take the split path


def test_batched_attention_splits_on_the_head_axis(splitter):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 12, 256, 64), dtype=np.float32)
    k = rng.standard_normal((1, 12, 256, 64), dtype=np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        want = np.matmul(q, k.swapaxes(-1, -2))
        got = np.empty_like(want)
        split_matmul(splitter, q, k.swapaxes(-1, -2), got)()
    assert splitter.splits == 1 and np.array_equal(got, want)


def test_inactive_or_small_runs_whole():
    sp = Splitter()  # not active: outside a step, where BLAS may run several threads
    a = np.ones((512, 512), np.float32)
    out = np.empty_like(a)
    split_matmul(sp, a, a, out)()
    assert sp.splits == 0 and np.array_equal(out, a @ a)
    sp.active = True
    small = np.ones((64, 64), np.float32)
    out = np.empty_like(small)
    split_matmul(sp, small, small, out)()
    assert sp.splits == 0 and np.array_equal(out, small @ small)
    sp.close()


# big enough that the layer matmuls split, small enough for a test (vocab 512, 2 layers)
_CFG = dict(dim=384, hidden_dim=1024, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=512, seq_len=256,
            rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_training_with_the_splitter_writes_the_same_bits(precision):
    cfg = ModelConfig(**_CFG).validate()
    rng = np.random.default_rng(3)
    batches = [rng.integers(0, cfg.vocab_size, size=(2, cfg.seq_len + 1)) for _ in range(2)]
    out, splits = {}, 0
    for split in (False, True):
        be = SimBackend(precision=precision, split=split)
        eng = Engine(cfg, backend=be, precision=precision, seed=7,
                     train=TrainConfig(steps=2, warmup=1, lr=3e-3, accum=2))
        try:
            losses = [eng.train_step(b).loss for b in batches]
            out[split] = (losses, {k: v.copy() for k, v in eng.model.params.items()})
            if split:
                splits = be.splitter.splits
        finally:
            eng.close()
    assert splits > 0
    assert out[True][0] == out[False][0]
    for k, v in out[False][1].items():
        assert np.array_equal(out[True][1][k], v), k
