from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rustane.optim import (AdamW, CosineSchedule, DynamicLossScaler, StaticLossScaler,
                           apply_update, clip_coefficient, is_no_decay, make_loss_scaler)
from tiers import require_module, unavailable


def _need_cpu():
    try:
        import rustane.cpu_ops  # noqa: F401
    except ImportError as exc:
        unavailable(f"rustane._cpu not built; test from an install: {exc}")


# ---- schedule ----

def test_schedule_key_points():
    s = CosineSchedule(lr=1e-3, total=110, warmup=10, min_lr=1e-4)
    assert s(0) == pytest.approx(1e-4)            # (0+1)/10 of lr
    assert s(4) == pytest.approx(5e-4)
    assert s(9) == pytest.approx(1e-3)            # end of warmup reaches lr
    assert s(10) == pytest.approx(1e-3)           # cosine starts at lr
    assert s(60) == pytest.approx(5.5e-4)         # halfway: mean of lr and min_lr
    assert s(35) == pytest.approx(1e-4 + 9e-4 * (0.5 + 0.5 * math.cos(math.pi / 4)))
    assert s(110) == pytest.approx(1e-4) and s(10_000) == pytest.approx(1e-4)
    vals = [s(k) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))  # monotone decay
    s0 = CosineSchedule(lr=2.0, total=4)                  # no warmup
    assert [s0(k) for k in range(5)] == pytest.approx([2.0, 1.0 + math.cos(math.pi / 4), 1.0,
                                                       1.0 - math.cos(math.pi / 4), 0.0])


def test_schedule_errors():
    with pytest.raises(ValueError, match="min_lr <= lr"):
        CosineSchedule(lr=1e-4, total=10, min_lr=1e-3)
    with pytest.raises(ValueError, match="warmup <= total"):
        CosineSchedule(lr=1e-3, total=10, warmup=11)


# ---- loss scaling ----

def test_dynamic_scaler_overflow_and_growth():
    s = DynamicLossScaler(1024.0, growth_interval=3, min_scale=256.0, max_scale=4096.0)
    assert s.update(overflow=True) is False and s.scale == 512.0
    assert s.update(True) is False and s.scale == 256.0
    assert s.update(True) is False and s.scale == 256.0   # floor
    assert [s.update(False) for _ in range(2)] == [True, True] and s.scale == 256.0
    assert s.update(False) and s.scale == 512.0            # grows after 3 clean steps
    s.update(False); s.update(True)                        # overflow resets the clean count
    assert s.scale == 256.0
    for _ in range(3 * 10):
        s.update(False)
    assert s.scale == 4096.0                               # ceiling
    assert s.overflows == 4


def test_scaler_state_round_trip():
    a = DynamicLossScaler(growth_interval=5)
    for ov in (False, True, False, False):
        a.update(ov)
    b = DynamicLossScaler()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    seq = [False] * 7 + [True] + [False] * 3
    assert [(a.update(o), a.scale) for o in seq] == [(b.update(o), b.scale) for o in seq]
    st = StaticLossScaler(256)
    assert st.update(True) is False and st.update(False) is True and st.scale == 256
    st2 = StaticLossScaler(1)
    st2.load_state_dict(json.loads(json.dumps(st.state_dict())))
    assert st2.scale == 256 and st2.overflows == 1
    with pytest.raises(ValueError, match="expected 'dynamic'"):
        DynamicLossScaler().load_state_dict(st.state_dict())
    assert isinstance(make_loss_scaler("256"), StaticLossScaler)
    assert isinstance(make_loss_scaler(None), DynamicLossScaler)
    with pytest.raises(ValueError, match="--loss-scale"):
        make_loss_scaler("lots")


def test_no_decay_names_and_clip():
    assert is_no_decay("model.layers.3.input_layernorm.weight")
    assert is_no_decay("model.layers.0.post_attention_layernorm.weight")
    assert is_no_decay("model.norm.weight")
    assert not is_no_decay("model.embed_tokens.weight")
    assert not is_no_decay("model.layers.0.mlp.down_proj.weight")
    assert clip_coefficient(0.5, 1.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(0.25, rel=1e-6)
    assert clip_coefficient(4.0, None) == 1.0


# ---- AdamW over a parameter dict (needs the C ops) ----

def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((10, 6)).astype(np.float32),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((8, 6)).astype(np.float32),
        "model.layers.0.input_layernorm.weight": (1 + 0.1 * rng.standard_normal(6)).astype(np.float32),
        "model.norm.weight": np.ones(6, np.float32),
    }


def _grads(params, rng, scale=1.0):
    return {k: (rng.standard_normal(v.shape) * scale).astype(np.float32) for k, v in params.items()}


def test_adamw_dict_vs_torch_with_clipping_and_loss_scale():
    _need_cpu()
    require_module("torch", hint="pip install torch==2.13.0")
    import torch
    params = _params()
    tp = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    decay = [t for k, t in tp.items() if not is_no_decay(k)]
    nodecay = [t for k, t in tp.items() if is_no_decay(k)]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": nodecay, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95),
                             eps=1e-8)
    opt = AdamW(params, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    scaler = StaticLossScaler(1024.0)
    sched = CosineSchedule(lr=1e-2, total=8, warmup=2, min_lr=1e-3)
    rng = np.random.default_rng(5)
    for k in range(6):
        g = _grads(params, rng, scale=0.3 if k % 2 else 3.0)  # some steps clip, some don't
        lr = sched(k)
        for pg in topt.param_groups:
            pg["lr"] = lr
        for name, t in tp.items():
            t.grad = torch.tensor(g[name])
        tnorm = torch.nn.utils.clip_grad_norm_(list(tp.values()), 1.0).item()
        topt.step()
        scaled = {n: a * np.float32(1024.0 * 2) for n, a in g.items()}  # loss scale, accum 2
        info = apply_update(opt, scaled, scaler, lr, max_norm=1.0, accum=2)
        assert info.applied and info.grad_norm == pytest.approx(tnorm, rel=1e-5)
        for name in params:
            np.testing.assert_allclose(params[name], tp[name].detach().numpy(), rtol=2e-5, atol=2e-6)


def test_apply_update_skips_on_overflow():
    _need_cpu()
    params = _params()
    before = {k: v.copy() for k, v in params.items()}
    opt = AdamW(params)
    scaler = DynamicLossScaler(2.0 ** 16)
    g = _grads(params, np.random.default_rng(0))
    g["model.norm.weight"][2] = np.inf
    info = apply_update(opt, g, scaler, 1e-3)
    assert not info.applied and scaler.scale == 2.0 ** 15 and opt.t == 0
    for k in params:
        np.testing.assert_array_equal(params[k], before[k])
        assert not opt.m[k].any() and not opt.v[k].any()
    g["model.norm.weight"][2] = np.nan
    assert not apply_update(opt, g, scaler, 1e-3).applied
    g["model.norm.weight"][2] = 0.0
    info = apply_update(opt, g, scaler, 1e-3)
    assert info.applied and opt.t == 1 and info.loss_scale == 2.0 ** 14


def test_adamw_state_resume_identical():
    _need_cpu()
    rng = np.random.default_rng(1)
    gs = [_grads(_params(), rng) for _ in range(6)]
    a_params = _params()
    a = AdamW(a_params)
    for g in gs:
        a.step(g, 1e-3)
    b_params = _params()
    b = AdamW(b_params)
    for g in gs[:3]:
        b.step(g, 1e-3)
    tens = {k: v.copy() for k, v in b.state_tensors().items()}
    meta = json.loads(json.dumps(b.state_meta()))
    c_params = {k: v.copy() for k, v in b_params.items()}
    c = AdamW(c_params)
    c.load_state(tens, meta)
    for g in gs[3:]:
        c.step(g, 1e-3)
    for k in a_params:
        np.testing.assert_array_equal(c_params[k], a_params[k])
    with pytest.raises(ValueError, match="has no m.model.norm.weight"):
        c.load_state({k: v for k, v in tens.items() if k != "m.model.norm.weight"}, meta)
    with pytest.raises(TypeError, match="must be a C-contiguous float32"):
        AdamW({"w": np.zeros(3)})
