"""CPU ops (csrc/cpu_ops.c) against float64 numpy forwards, central finite differences, and
PyTorch autograd. Needs the built extension (rustane._cpu)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernel_refs import numerical_grad as central_diff  # one central-difference helper for all tests
from tiers import require_module, unavailable

try:
    from rustane import cpu_ops as cpu
except ImportError as exc:  # source tree without the compiled extension
    cpu = None
    _why = str(exc)


@pytest.fixture(autouse=True)
def _need_build():
    if cpu is None:
        unavailable(f"rustane._cpu not built; test from an install: {_why}")

RNG = np.random.default_rng(1234)


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


# ---- float64 numpy references (the formulas written independently of the C) ----

def np_rmsnorm(x, w, eps):
    r = 1.0 / np.sqrt((x * x).mean(axis=0) + eps)
    return x * r[None, :] * w[:, None]


def np_rope(x, n_heads, hd, theta, sign=1.0):
    C, S = x.shape
    y = x.copy()
    for h in range(n_heads):
        for i in range(hd // 2):
            ang = sign * np.arange(S) * theta ** (-2.0 * i / hd)
            a, b = x[h * hd + 2 * i], x[h * hd + 2 * i + 1]
            y[h * hd + 2 * i] = a * np.cos(ang) - b * np.sin(ang)
            y[h * hd + 2 * i + 1] = a * np.sin(ang) + b * np.cos(ang)
    return y


def np_ce(logits, t):
    z = logits - logits.max(axis=0, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=0))
    return float(np.mean(lse - z[t, np.arange(logits.shape[1])]))


# ---- RMSNorm ----

@pytest.mark.parametrize("C,S", [(8, 5), (64, 17), (3, 1)])
def test_rmsnorm_forward_matches_numpy(C, S):
    x = RNG.standard_normal((C, S))
    w = RNG.uniform(0.3, 2.0, C)
    out, rrms = cpu.rmsnorm_forward(f32(x), f32(w), 1e-5)
    np.testing.assert_allclose(out, np_rmsnorm(x, w, 1e-5), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(rrms, 1 / np.sqrt((x * x).mean(0) + 1e-5), rtol=2e-6)


def test_rmsnorm_backward_finite_differences_w_not_one():
    C, S = 6, 4
    x = RNG.standard_normal((C, S))
    w = RNG.uniform(0.3, 2.0, C)  # w != 1: the case upstream gets wrong
    G = RNG.standard_normal((C, S))
    _, rrms = cpu.rmsnorm_forward(f32(x), f32(w), 1e-5)
    dw = np.zeros(C, np.float32)
    dx = cpu.rmsnorm_backward(f32(G), f32(x), f32(w), rrms, dw)
    dx_fd = central_diff(lambda xx: float((np_rmsnorm(xx, w, 1e-5) * G).sum()), x.copy())
    dw_fd = central_diff(lambda ww: float((np_rmsnorm(x, ww, 1e-5) * G).sum()), w.copy())
    np.testing.assert_allclose(dx, dx_fd, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, dw_fd, rtol=1e-4, atol=1e-5)
    # the upstream formula w·r·(dy − x·coef) must NOT match (so this test can tell them apart)
    r = 1 / np.sqrt((x * x).mean(0) + 1e-5)
    coef = r * r / C * (G * w[:, None] * x).sum(0)
    wrong = w[:, None] * r * (G - x * coef)
    assert not np.allclose(wrong, dx_fd, rtol=1e-3, atol=1e-4)


def test_rmsnorm_backward_accumulates_dw_and_allows_inplace_dx():
    C, S = 5, 3
    x, G = f32(RNG.standard_normal((C, S))), f32(RNG.standard_normal((C, S)))
    w = f32(RNG.uniform(0.5, 1.5, C))
    _, r = cpu.rmsnorm_forward(x, w)
    dw1 = np.zeros(C, np.float32)
    dx1 = cpu.rmsnorm_backward(G, x, w, r, dw1)
    dw2 = np.full(C, 3.0, np.float32)
    g2 = G.copy()
    dx2 = cpu.rmsnorm_backward(g2, x, w, r, dw2, dx=g2)
    assert dx2 is g2
    np.testing.assert_array_equal(dx1, dx2)
    np.testing.assert_allclose(dw2, dw1 + 3.0, rtol=1e-6)


def test_rmsnorm_vs_torch():
    require_module("torch", hint="pip install torch==2.13.0")
    import torch
    C, S = 32, 9
    x = RNG.standard_normal((C, S))
    w = RNG.uniform(0.3, 2.0, C)
    G = RNG.standard_normal((C, S))
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    y = xt * torch.rsqrt(xt.pow(2).mean(0, keepdim=True) + 1e-5) * wt[:, None]
    (y * torch.tensor(G)).sum().backward()
    out, r = cpu.rmsnorm_forward(f32(x), f32(w))
    dw = np.zeros(C, np.float32)
    dx = cpu.rmsnorm_backward(f32(G), f32(x), f32(w), r, dw)
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-4, atol=1e-5)


# ---- RoPE ----

@pytest.mark.parametrize("nh,hd,S,theta", [(2, 8, 7, 10000.0), (3, 4, 33, 1e5), (1, 2, 1, 500.0)])
def test_rope_forward_and_backward(nh, hd, S, theta):
    x = RNG.standard_normal((nh * hd, S))
    y = cpu.rope_forward(f32(x), nh, hd, theta)
    np.testing.assert_allclose(y, np_rope(x, nh, hd, theta), rtol=1e-5, atol=1e-5)
    G = RNG.standard_normal((nh * hd, S))
    dx = cpu.rope_backward(f32(G), nh, hd, theta)
    dx_fd = central_diff(lambda xx: float((np_rope(xx, nh, hd, theta) * G).sum()), x.copy())
    np.testing.assert_allclose(dx, dx_fd, rtol=1e-4, atol=1e-5)
    # inverse: backward undoes forward; in place allowed
    z = f32(y.copy())
    cpu.rope_backward(z, nh, hd, theta, out=z)
    np.testing.assert_allclose(z, x, rtol=1e-5, atol=1e-5)


def test_rope_vs_torch_complex():
    require_module("torch", hint="pip install torch==2.13.0")
    import torch
    nh, hd, S, theta = 2, 16, 40, 10000.0
    x = RNG.standard_normal((nh * hd, S))
    # llama2.c/Meta formulation: view pairs as complex numbers, multiply by e^{i·pos·freq}
    xt = torch.tensor(np.ascontiguousarray(x.T).reshape(S, nh, hd // 2, 2), requires_grad=True)
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(S, dtype=torch.float64), freqs)
    rot = torch.polar(torch.ones_like(ang), ang)[:, None, :]
    y = torch.view_as_real(torch.view_as_complex(xt) * rot)
    G = RNG.standard_normal(y.shape)
    (y * torch.tensor(G)).sum().backward()
    ours = cpu.rope_forward(f32(x), nh, hd, theta)
    np.testing.assert_allclose(ours, y.detach().numpy().reshape(S, -1).T, rtol=1e-5, atol=1e-5)
    dy = f32(G.reshape(S, -1).T)
    np.testing.assert_allclose(cpu.rope_backward(dy, nh, hd, theta),
                               xt.grad.numpy().reshape(S, -1).T, rtol=1e-5, atol=1e-5)


# ---- cross-entropy ----

@pytest.mark.parametrize("V,S,scale", [(11, 6, 1.0), (300, 5, 256.0), (2, 1, 1.0)])
def test_cross_entropy_finite_differences(V, S, scale):
    logits = RNG.standard_normal((V, S)) * 3
    t = RNG.integers(0, V, S)
    loss, dl = cpu.cross_entropy(f32(logits), t, grad_scale=scale)
    assert abs(loss - np_ce(logits, t)) < 1e-5 * max(1, abs(loss))
    if V * S <= 100:
        fd = central_diff(lambda z: np_ce(z, t), logits.copy())
    else:  # analytic float64 softmax for the large case (FD of every element is slow)
        p = np.exp(logits - logits.max(0)); p /= p.sum(0)
        p[t, np.arange(S)] -= 1
        fd = p / S
    np.testing.assert_allclose(dl, fd * scale, rtol=1e-4, atol=1e-6 * scale)


def test_cross_entropy_stable_and_inplace():
    V, S = 50, 4
    logits = f32(RNG.standard_normal((V, S)) + 1000.0)  # naive exp overflows fp32
    t = RNG.integers(0, V, S)
    loss_ref = np_ce(logits.astype(np.float64), t)
    buf = logits.copy()
    loss, dl = cpu.cross_entropy(buf, t, dlogits=buf)
    assert dl is buf and math.isfinite(loss)
    assert abs(loss - loss_ref) < 1e-4
    _, dl2 = cpu.cross_entropy(logits, t)
    np.testing.assert_array_equal(dl, dl2)
    np.testing.assert_allclose(dl.sum(0), 0.0, atol=1e-6)  # softmax − onehot sums to 0


def test_cross_entropy_vs_torch():
    require_module("torch", hint="pip install torch==2.13.0")
    import torch
    V, S = 97, 13
    logits = RNG.standard_normal((V, S)) * 2
    t = RNG.integers(0, V, S)
    lt = torch.tensor(logits.T.copy(), requires_grad=True)  # torch wants [S, V]
    ref = torch.nn.functional.cross_entropy(lt, torch.tensor(t))
    ref.backward()
    loss, dl = cpu.cross_entropy(f32(logits), t)
    assert abs(loss - ref.item()) < 1e-5
    np.testing.assert_allclose(dl, lt.grad.numpy().T, rtol=1e-4, atol=1e-7)


def _ce_float64(logits, t, scale):
    """Loss and dlogits in float64 from the float32 logits (the C computes exp by a polynomial)."""
    x = logits.astype(np.float64)
    m = x.max(axis=0)
    p = np.exp(x - m)
    ssum = p.sum(axis=0)
    cols = np.arange(x.shape[1])
    loss = float(np.mean(np.log(ssum) + m - x[t, cols]))
    g = p / ssum
    g[t, cols] -= 1.0
    return loss, g * (scale / x.shape[1])


def _hard_logits(V, S, rng):
    """[V, S] columns chosen to stress the CE: ordinary, huge magnitudes, a max that rises row
    block by row block (sorted), a falling one, values far below the max (the exp cut-off
    region and -3e38) and a single dominant logit over a spread of [-87.3, 0]."""
    cols = [rng.standard_normal(V) * 3,
            rng.uniform(-3e4, 3e4, V),
            np.sort(rng.standard_normal(V) * 20),
            -np.sort(rng.standard_normal(V) * 20),
            np.where(rng.random(V) < 0.5, rng.uniform(-200, -80, V), rng.standard_normal(V)),
            np.where(rng.random(V) < 0.3, -3e38, rng.standard_normal(V) * 5),
            np.concatenate([[0.0], rng.uniform(-87.3, 0.0, V - 1)])]
    return f32(np.stack([cols[s % len(cols)] for s in range(S)], axis=1))


@pytest.mark.parametrize("V,S", [(32000, 21), (203, 1100)])
def test_cross_entropy_polynomial_exp_vs_float64(V, S):
    """Loss and dlogits against float64 at the production vocabulary (V = 32000) and past one
    column block (S > 512). The C exp has relative error <= ~1.1e-7 (a polynomial, measured
    over every fp32 in [-87.33, 0]); with the fp32 roundings of the normaliser and the stored
    result, each dlogits term stays within 5e-7 relative (plus the fp32 rounding of its exp's
    argument, 2^-24·|logit - max|), the target's within that plus 2e-7 of grad_scale/S (its
    subtraction cancels). The loss differs only through log(sum): <= 3e-7 absolute."""
    rng = np.random.default_rng(V + S)
    logits = _hard_logits(V, S, rng)
    t = rng.integers(0, V, S)
    t[S - 1] = 0  # the dominant logit of the spread column (or its neighbour's target)
    scale = 256.0
    ref_loss, ref_dl = _ce_float64(logits, t, scale)
    loss, dl = cpu.cross_entropy(logits, t, grad_scale=scale)
    assert abs(loss - ref_loss) <= 3e-7 + 1e-15 * abs(ref_loss), (loss, ref_loss)
    k = scale / S
    # relative bound on every probability term; exps below 2^-126 (x < -87.33) are 0 in the C
    # The C rounds x = logit - max to fp32 before exp: up to 2^-24·|x| more, relative.
    x = logits.astype(np.float64) - logits.max(axis=0)
    bound = (5e-7 + 2.0**-24 * np.abs(x)) * np.abs(ref_dl) + 1e-37 * k
    bound[t, np.arange(S)] += 2e-7 * k  # the target's p - 1 cancels
    worst = (np.abs(dl.astype(np.float64) - ref_dl) / bound).max()
    assert worst <= 1.0, f"dlogits off by {worst:.2f}x the stated bound"
    # in place gives the same bits
    buf = logits.copy()
    loss2, dl2 = cpu.cross_entropy(buf, t, grad_scale=scale, dlogits=buf)
    assert loss2 == loss
    np.testing.assert_array_equal(dl2, dl)


def test_cross_entropy_nonfinite_logits():
    """NaN or +inf anywhere in a column makes the loss NaN (and that column's dlogits); a -inf
    logit is an exact zero probability: finite loss unless it is the target's (then +inf)."""
    V, S = 150, 3
    base = f32(RNG.standard_normal((V, S)))
    t = np.array([1, 2, 3])
    for bad in (np.nan, np.inf):
        for row in (5, 1):  # another logit, the target's
            x = base.copy()
            x[row, 0] = bad
            loss, dl = cpu.cross_entropy(x, t)
            assert math.isnan(loss)
            assert np.isnan(dl[:, 0]).all() and np.isfinite(dl[:, 1:]).all()
    x = base.copy()
    x[5, 0] = -np.inf
    loss, dl = cpu.cross_entropy(x, t)
    ref_loss, ref_dl = _ce_float64(x, t, 1.0)
    assert abs(loss - ref_loss) < 1e-6 and dl[5, 0] == 0.0
    np.testing.assert_allclose(dl, ref_dl, rtol=5e-7, atol=1e-7 / S)
    x[1, 0] = -np.inf
    assert cpu.cross_entropy(x, t)[0] == math.inf


def test_cross_entropy_bad_targets():
    with pytest.raises(ValueError, match=r"targets: ids must lie in \[0, 5\)"):
        cpu.cross_entropy(np.zeros((5, 3), np.float32), [0, 5, 1])
    with pytest.raises(ValueError, match="targets: expected shape"):
        cpu.cross_entropy(np.zeros((5, 3), np.float32), [0, 1])


# ---- embedding ----

def test_embedding_forward_backward_and_torch():
    V, D, S = 20, 7, 37  # S > block size, repeated tokens
    E = f32(RNG.standard_normal((V, D)))
    tok = RNG.integers(0, V, S)
    tok[:5] = 3
    out = cpu.embedding_forward(E, tok)
    np.testing.assert_array_equal(out, E[tok].T)
    G = f32(RNG.standard_normal((D, S)))
    dE = np.zeros((V, D), np.float32)
    cpu.embedding_backward(G, tok, dE)
    ref = np.zeros((V, D))
    np.add.at(ref, tok, G.T.astype(np.float64))
    np.testing.assert_allclose(dE, ref, rtol=1e-5, atol=1e-6)
    # finite differences of L = Σ G ⊙ gather(E)
    fd = central_diff(lambda e: float((e[tok].T * G).sum()), E.astype(np.float64))
    np.testing.assert_allclose(dE, fd, rtol=1e-4, atol=1e-5)
    require_module("torch", hint="pip install torch==2.13.0")
    import torch
    Et = torch.tensor(E, requires_grad=True)
    (torch.nn.functional.embedding(torch.tensor(tok), Et).T * torch.tensor(G)).sum().backward()
    np.testing.assert_allclose(dE, Et.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_embedding_errors():
    E = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"tokens: ids must lie in \[0, 4\)"):
        cpu.embedding_forward(E, [1, 4])
    with pytest.raises(TypeError, match="E: expected dtype float32, got float64"):
        cpu.embedding_forward(np.zeros((4, 3)), [1])
    with pytest.raises(ValueError, match="dx: expected shape"):
        cpu.embedding_backward(np.zeros((2, 2), np.float32), [1, 2], E)


# ---- AdamW and norms ----

def test_adamw_matches_torch_over_steps():
    require_module("torch", hint="pip install torch==2.13.0")
    import torch
    n = 257
    w0 = RNG.standard_normal(n).astype(np.float32)
    grads = [RNG.standard_normal(n).astype(np.float32) * 10 ** RNG.uniform(-4, 0) for _ in range(6)]
    lr, b1, b2, eps, wd = 3e-3, 0.9, 0.95, 1e-8, 0.1
    wt = torch.tensor(w0.copy(), requires_grad=True)
    opt = torch.optim.AdamW([wt], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd)
    w, m, v = w0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for step, g in enumerate(grads, start=1):
        wt.grad = torch.tensor(g)
        opt.step()
        # feed a loss-scaled gradient and unscale inside the step: same result
        cpu.adamw_step(w, g * 256, m, v, lr=lr, step=step, beta1=b1, beta2=b2, eps=eps,
                       weight_decay=wd, grad_scale=1 / 256)
        st = opt.state[wt]
        np.testing.assert_allclose(m, st["exp_avg"].numpy(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(v, st["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(w, wt.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adamw_errors():
    z = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="1-based"):
        cpu.adamw_step(z, z.copy(), z.copy(), z.copy(), lr=1e-3, step=0)
    with pytest.raises(ValueError, match="m: expected shape"):
        cpu.adamw_step(z, z.copy(), np.zeros(4, np.float32), z.copy(), lr=1e-3, step=1)
    ro = z.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="w: output array is read-only"):
        cpu.adamw_step(ro, z.copy(), z.copy(), z.copy(), lr=1e-3, step=1)
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu.sumsq(np.zeros((4, 4), np.float32)[:, ::2])


def test_sumsq_and_nonfinite():
    x = RNG.standard_normal(1001).astype(np.float32) * 1e3
    assert cpu.sumsq(x) == pytest.approx(float((x.astype(np.float64) ** 2).sum()), rel=1e-12)
    big = np.full(10, 3e38, np.float32)  # squares overflow fp32 but not double
    assert math.isfinite(cpu.sumsq(big))
    for bad in (np.inf, -np.inf, np.nan):
        y = x.copy()
        y[500] = bad
        assert not math.isfinite(cpu.sumsq(y))
    arrs = [x, x[:10].copy().reshape(2, 5)]
    assert cpu.global_norm(arrs) == pytest.approx(
        math.sqrt(sum(float((a.astype(np.float64) ** 2).sum()) for a in arrs)), rel=1e-12)
