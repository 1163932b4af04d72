"""Whole-model gradients of the kernel pipeline against PyTorch autograd.

The engine's step (MIL kernels on the simulator + C CPU ops + the dW queue) and the PyTorch
reference in tests/torch_ref.py (written from the math, float64) share nothing but the
parameters and tokens. fp32 simulation must match autograd to 1e-4 relative for every
parameter; fp16 simulation (the ANE numerics model) must point the same way (cosine >= 0.999).
"""

from __future__ import annotations

import numpy as np
import pytest

from tiers import require_module

require_module("torch", hint="pip install torch==2.13.0")

import torch  # noqa: E402

import torch_ref  # noqa: E402
from rustane.config import ModelConfig  # noqa: E402
from rustane.engine import make_backend  # noqa: E402
from rustane.model import Model  # noqa: E402

CONFIGS = {
    # MHA, untied head, residual scaling on, head_dim 10, odd vocab / seq
    "mha": ModelConfig(dim=40, hidden_dim=72, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=67,
                       seq_len=12, rope_theta=10000.0, tie_embeddings=False, residual_scaling=True),
    # GQA ratio 3, tied, theta 1e6, seq not a power of two
    "gqa": ModelConfig(dim=48, hidden_dim=80, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=53,
                       seq_len=10, rope_theta=1e6, tie_embeddings=True),
}


def _params(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    # larger weights than the 0.02 init make every path (attention, SiLU) matter in the gradients
    p = torch_ref.init_params(cfg, seed, norm_jitter=0.2)
    for k, v in p.items():
        if v.ndim == 2:
            p[k] = (v * 8.0).astype(np.float32)
    return p


def _reference(cfg, params, tokens, targets):
    tp = torch_ref.params_to_torch(params)
    total = None
    for x, y in zip(tokens, targets):
        loss, _ = torch_ref.forward(tp, cfg, x, y)
        total = loss if total is None else total + loss
    total.backward()
    return total.item() / len(tokens), {k: t.grad.numpy() for k, t in tp.items()}


def _engine_grads(cfg, params, tokens, targets, precision, loss_scale=1.0):
    model = Model(cfg, make_backend("sim", precision, ane_rules=False), {k: v.copy() for k, v in params.items()})
    try:
        losses = [model.forward_backward(x, y, loss_scale=loss_scale) for x, y in zip(tokens, targets)]
        grads = {k: g / loss_scale for k, g in model.finish_gradients().items()}
    finally:
        model.close()
    return float(np.mean(losses)), grads


def _batch(cfg, seed, n):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, cfg.vocab_size, size=(n, cfg.seq_len + 1))
    return t[:, :-1], t[:, 1:]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_gradients_match_autograd(name):
    cfg = CONFIGS[name]
    params = _params(cfg, seed=1)
    x, y = _batch(cfg, seed=2, n=2)  # two sequences: accumulation across micro-steps
    ref_loss, ref = _reference(cfg, params, x, y)
    loss, got = _engine_grads(cfg, params, x, y, "fp32")
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(got) == set(ref)
    worst = []
    for k in ref:
        err = np.linalg.norm(got[k] - ref[k]) / np.linalg.norm(ref[k])
        worst.append((err, k))
        assert err < 1e-4, f"{name}: gradient of {k} off by {err:.2e} relative"
    assert max(worst)[0] < 1e-4


class _LaggingQueue:
    """A dW queue that runs nothing until ``wait()``: the slowest queue possible. Any array the
    model reuses while the queue still holds it (the workspace alternates two sets across
    micro-steps) would corrupt the accumulated gradients."""

    def __init__(self):
        self.jobs = []

    def submit(self, grad, dy, x, copy=True):
        self.jobs.append((grad, dy.copy() if copy else dy, x.copy() if copy else x))

    def wait(self):
        for grad, dy, x in self.jobs:
            grad += dy @ x.T
        self.jobs.clear()


def test_accumulation_survives_a_lagging_dw_queue():
    """Five micro-steps (the third to fifth reuse the workspace sets of earlier ones; the third
    and fifth must drain the queue first) with a queue that runs nothing until it is waited on:
    gradients still match autograd."""
    cfg = CONFIGS["mha"]
    params = _params(cfg, seed=7)
    x, y = _batch(cfg, seed=8, n=5)
    _, ref = _reference(cfg, params, x, y)
    model = Model(cfg, make_backend("sim", "fp32", ane_rules=False), {k: v.copy() for k, v in params.items()})
    model.queue = _LaggingQueue()
    try:
        for xi, yi in zip(x, y):
            model.forward_backward(xi, yi)
        got = model.finish_gradients()
    finally:
        model.close()
    for k in ref:
        err = np.linalg.norm(got[k] - ref[k]) / np.linalg.norm(ref[k])
        assert err < 1e-4, f"gradient of {k} off by {err:.2e} relative"


def test_fp32_gradients_detect_a_wrong_parameter():
    """The comparison has teeth: perturbing one weight after the reference moves its gradient."""
    cfg = CONFIGS["gqa"]
    params = _params(cfg, seed=3)
    x, y = _batch(cfg, seed=4, n=1)
    _, ref = _reference(cfg, params, x, y)
    bad = dict(params)
    key = "model.layers.1.self_attn.k_proj.weight"
    bad[key] = params[key] * np.float32(1.01)
    _, got = _engine_grads(cfg, bad, x, y, "fp32")
    err = np.linalg.norm(got[key] - ref[key]) / np.linalg.norm(ref[key])
    assert err > 1e-3


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp16_gradients_point_the_same_way(name):
    cfg = CONFIGS[name]
    params = _params(cfg, seed=5)
    x, y = _batch(cfg, seed=6, n=1)
    _, g32 = _engine_grads(cfg, params, x, y, "fp32")
    _, g16 = _engine_grads(cfg, params, x, y, "fp16", loss_scale=256.0)
    for k in g32:
        a, b = g32[k].ravel().astype(np.float64), g16[k].ravel().astype(np.float64)
        assert np.all(np.isfinite(b)), k
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert cos >= 0.999, f"{name}: fp16 gradient of {k} has cosine {cos:.5f} to fp32"


def test_forward_logits_match_reference():
    cfg = CONFIGS["gqa"]
    params = _params(cfg, seed=7)
    x, _ = _batch(cfg, seed=8, n=1)
    model = Model(cfg, make_backend("sim", "fp32", ane_rules=False), {k: v.copy() for k, v in params.items()})
    try:
        got = model.logits(x[0]).T  # [S, V]
    finally:
        model.close()
    ref = _reference_logits(cfg, params, x[0])
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-5


def _reference_logits(cfg, params, tokens) -> np.ndarray:
    """PyTorch's logits ``[S, V]`` for one sequence."""
    with torch.no_grad():
        _, ref = torch_ref.forward(torch_ref.params_to_torch(params, requires_grad=False), cfg, tokens)
    return ref[0].numpy()


def test_a_custom_loop_never_trains_on_stale_weights():
    """The model owns re-staging: after ``optimizer_step`` (no call to stage_weights anywhere in
    the loop) the kernels compute with the updated masters, per PyTorch on those masters. A model
    whose kernels kept the old weights would give the pre-update logits instead (checked too)."""
    from rustane.optim import AdamW, make_loss_scaler

    cfg = CONFIGS["gqa"]
    params = _params(cfg, seed=11)
    x, y = _batch(cfg, seed=12, n=2)
    model = Model(cfg, make_backend("sim", "fp32", ane_rules=False), {k: v.copy() for k, v in params.items()})
    try:
        before = model.logits(x[0]).T
        opt = AdamW(model.params, weight_decay=0.0)
        for xi, yi in zip(x, y):
            model.forward_backward(xi, yi)
        info = model.optimizer_step(opt, make_loss_scaler(1.0), lr=1e-2, max_norm=None, accum=2)
        assert info.applied
        got = model.logits(x[0]).T
        updated = {k: v.copy() for k, v in model.params.items()}
    finally:
        model.close()
    ref = _reference_logits(cfg, updated, x[0])
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-5
    assert np.max(np.abs(before - ref)) / np.max(np.abs(ref)) > 1e-3  # the update moved the logits
