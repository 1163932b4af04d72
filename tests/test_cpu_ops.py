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


# ---- many tensors, several threads ----

def _adam_set(sizes, seed):
    r = np.random.default_rng(seed)
    mk = lambda n: r.standard_normal(n).astype(np.float32)  # noqa: E731
    return ([mk(n) for n in sizes], [mk(n) * 1e-2 for n in sizes],
            [mk(n) * 1e-3 for n in sizes], [np.abs(mk(n)) * 1e-5 for n in sizes])


# sizes straddle the per-thread minimum (128K elements) so 2-4 threads really split, also
# inside one tensor, and tiny tensors sit at part boundaries
@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_adamw_tensors_equals_per_tensor_steps(threads):
    sizes = [300_001, 7, 1, 200_000, 0, 65_537]
    wds = [0.1, 0.0, 0.1, 0.05, 0.1, 0.0]
    ws, gs, ms, vs = _adam_set(sizes, 5)
    ref = [[a.copy() for a in grp] for grp in (ws, gs, ms, vs)]
    for k in range(len(sizes)):  # the single-tensor kernel, one tensor at a time
        cpu.adamw_step(ref[0][k], ref[1][k], ref[2][k], ref[3][k], lr=2e-3, step=7, weight_decay=wds[k],
                       grad_scale=0.25)
    g_before = [g.copy() for g in gs]
    cpu.adamw_tensors(ws, gs, ms, vs, wds, lr=2e-3, step=7, grad_scale=0.25, threads=threads)
    for got, want in zip((ws, ms, vs), (ref[0], ref[2], ref[3])):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)  # same arithmetic per element, any split
    for g, g0 in zip(gs, g_before):
        np.testing.assert_array_equal(g, g0)  # read only without zero_grad
    cpu.adamw_tensors(ws, gs, ms, vs, wds, lr=2e-3, step=8, zero_grad=True, threads=threads)
    assert all(not g.any() for g in gs)


def test_adamw_tensors_errors():
    z = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="as many grads"):
        cpu.adamw_tensors([z], [], [z], [z], [0.0], lr=1e-3, step=1)
    with pytest.raises(ValueError, match=r"m\[1\]: expected shape"):
        cpu.adamw_tensors([z, z.copy()], [z.copy(), z.copy()], [z.copy(), np.zeros(2, np.float32)],
                          [z.copy(), z.copy()], [0.0, 0.0], lr=1e-3, step=1)
    ro = z.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"grad\[0\]: output array is read-only"):
        cpu.adamw_tensors([z], [ro], [z.copy()], [z.copy()], [0.0], lr=1e-3, step=1, zero_grad=True)
    cpu.adamw_tensors([z], [ro], [z.copy()], [z.copy()], [0.0], lr=1e-3, step=1)  # read-only is fine without
    with pytest.raises(ValueError, match="1-based"):
        cpu.adamw_tensors([z], [z], [z], [z], [0.0], lr=1e-3, step=0)


def test_sumsq_tensors_any_thread_count_and_nonfinite():
    r = np.random.default_rng(9)
    arrs = [r.standard_normal(n).astype(np.float32) * 100 for n in (400_000, 3, 0, 131_073)]
    exact = math.fsum(float(v) for a in arrs for v in (a.astype(np.float64) ** 2))
    vals = {cpu.sumsq_tensors(arrs, threads=t) for t in (1, 2, 3, 4, 16)}
    assert len(vals) == 1  # fixed chunk order: bit-identical whatever the thread count
    assert vals.pop() == pytest.approx(exact, rel=1e-13)
    assert cpu.sumsq_tensors([arrs[0]]) == cpu.sumsq(arrs[0])  # one tensor: the same chunk order
    assert cpu.sumsq_tensors([]) == 0.0
    for bad in (np.inf, np.nan):
        b = [a.copy() for a in arrs]
        b[3][131_072] = bad  # the last element of the last chunk
        assert not math.isfinite(cpu.sumsq_tensors(b, threads=2))


def test_optimizer_threads_env(monkeypatch):
    monkeypatch.setenv("RUSTANE_OPT_THREADS", "3")
    assert cpu.optimizer_threads() == 3
    monkeypatch.setenv("RUSTANE_OPT_THREADS", "zero")
    with pytest.raises(ValueError, match="RUSTANE_OPT_THREADS"):
        cpu.optimizer_threads()
    monkeypatch.delenv("RUSTANE_OPT_THREADS")
    assert 1 <= cpu.optimizer_threads() <= 4


# ---- the simulator's one-pass sigmoid / silu / softmax ----

_SPECIALS = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 87.3, -87.3, 88.8, -88.8, 1e-45, -1e-45,
                      3.4e38, -3.4e38, 1e-8, -1e-8, 17.0, -17.0], np.float32)


def _sigmoid64(x):
    x = x.astype(np.float64)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _wide(n, seed):
    r = np.random.default_rng(seed)
    return np.concatenate([_SPECIALS, (r.standard_normal(n) * 30).astype(np.float32),
                           np.linspace(-100, 100, n, dtype=np.float32)])


def test_sigmoid_silu_vs_float64():
    x = _wide(100_000, 1)
    with np.errstate(invalid="ignore"):
        ref = _sigmoid64(x)
        ref_silu = ref * x.astype(np.float64)
    got, got_silu = cpu.sigmoid(x), cpu.silu(x)
    fin = np.isfinite(x)
    # within 4 fp32 ulp wherever the true value is a normal fp32; exp flushes e^x < 2^-126 to 0
    np.testing.assert_allclose(got[fin], ref[fin], rtol=4 * 2.0 ** -24, atol=1.2e-38)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(got_silu[fin], ref_silu[fin], rtol=5 * 2.0 ** -24,
                                   atol=float(np.abs(x[fin]).max()) * 1.2e-38)  # the same flush, times x
    assert got[x == np.inf] == 1 and got[x == -np.inf] == 0 and np.isnan(got[np.isnan(x)]).all()
    assert np.isnan(got_silu[np.isnan(x)]).all() and got_silu[x == np.inf] == np.inf
    assert got[x == 0][0] == 0.5 and (got[(x == 0)] == 0.5).all()


def test_row_ops_in_place_and_on_strided_rows():
    """The simulator hands in slices of wider buffers (contiguous rows at a larger stride) and
    runs ops in place: both must give the contiguous, out-of-place result."""
    r = np.random.default_rng(2)
    wide = (r.standard_normal((40, 300)) * 8).astype(np.float32)
    sl = wide[:, 17:17 + 256]  # rows of 256 at stride 300
    assert cpu.rows_view(sl) is not None and cpu.rows_view(sl).strides == (1200, 4)
    assert cpu.rows_view(sl.T) is None  # a transpose has no row view: callers fall back
    for fn in (cpu.sigmoid, cpu.silu, cpu.softmax_last):
        want = fn(np.ascontiguousarray(sl))
        np.testing.assert_array_equal(fn(sl), want)
        buf = wide.copy()
        view = buf[:, 17:17 + 256]
        fn(view, out=view)
        np.testing.assert_array_equal(view, want)
        np.testing.assert_array_equal(buf[:, :17], wide[:, :17])  # neighbours untouched
        np.testing.assert_array_equal(buf[:, 273:], wide[:, 273:])
    with pytest.raises(ValueError, match="last axis is contiguous"):
        cpu.sigmoid(sl.T)
    with pytest.raises(ValueError, match="last axis is contiguous"):
        cpu.softmax_last(sl, out=np.empty((40, 255), np.float32))


def _softmax64(a):
    a = a.astype(np.float64)
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (6, 256, 256), (2, 3, 1000), (5, 9)])
def test_softmax_vs_float64(shape):
    a = (np.random.default_rng(len(shape)).standard_normal(shape) * 6).astype(np.float32)
    got = cpu.softmax_last(a)
    ref = _softmax64(a)
    # fp32 x - max costs up to |x - max|·2^-24 relative in the exponent; the rest is a few ulp
    spread = float((a.max(axis=-1, keepdims=True) - a).max())
    np.testing.assert_allclose(got, ref, rtol=(4 + spread) * 2.0 ** -24, atol=1e-38)
    np.testing.assert_allclose(got.sum(axis=-1), 1.0, rtol=1e-6)


def test_softmax_nonfinite_rows():
    a = np.array([[1, np.nan, 2], [np.inf, 1, 2], [-np.inf] * 3, [0, -np.inf, 0], [-1e30, 0, -1e30]],
                 np.float32)
    got = cpu.softmax_last(a)
    with np.errstate(invalid="ignore"):
        ref = _softmax64(a)  # numpy's NaN conventions: a NaN or +inf, or all -inf, poisons the row
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got[3:], ref[3:], rtol=1e-7)


@pytest.mark.parametrize("S", [1, 31, 64, 200, 257])
def test_cross_entropy_threads_give_the_same_bits(S):
    """Positions split over threads (blocks of whole vectors, >= 32 each): loss and gradient
    bit-identical to one thread, and the one-thread result still matches float64."""
    r = np.random.default_rng(S)
    V = 300
    logits = (r.standard_normal((V, S)) * 4).astype(np.float32)
    t = r.integers(0, V, S).astype(np.int32)
    l1, d1 = cpu.cross_entropy(logits, t, grad_scale=3.0, threads=1)
    assert l1 == pytest.approx(np_ce(logits.astype(np.float64), t), rel=1e-6)
    for threads in (2, 3, 8):
        lt, dt = cpu.cross_entropy(logits, t, grad_scale=3.0, threads=threads)
        assert lt == l1
        np.testing.assert_array_equal(dt, d1)
    inplace = logits.copy()
    li, di = cpu.cross_entropy(inplace, t, grad_scale=3.0, dlogits=inplace, threads=2)
    assert li == l1 and di is inplace
    np.testing.assert_array_equal(inplace, d1)
