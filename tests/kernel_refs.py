"""Independent float64 numpy formulation of the math every fused kernel computes.

Written from the equations, not from the MIL: heads are handled one at a time in Python loops with
the GQA map ``kv = h // R`` spelled out, RoPE is a complex multiplication of the pair
``x[2i] + i·x[2i+1]`` by ``e^{iθ}``, the causal mask is ``-inf`` above the diagonal, and the
backward formulas are the textbook ones (checked against finite differences in test_kernels.py).

Layouts follow the engine: activations are channel-first ``[C, S]``; a head's slice is channels
``[h·HD, (h+1)·HD)``; weights are ``W [OUT, IN]`` with ``y = W x``. P and dP are ``[NH·S, S]``
(row ``h·S + i``: query i of head h; column j: key j).

The two fp16 constants of the kernels (the attention scale and the residual α) and the fp16 RoPE
tables are part of the kernel contract; callers pass the values to use (``scale``,
``alpha``, ``rope_fp16``) so fp32-mode comparisons can be tight.
"""

from __future__ import annotations

import numpy as np


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def silu(x):
    return x * sigmoid(x)


def silu_grad(x):
    """d/dx [x·σ(x)] = σ(x) + x·σ(x)·(1 − σ(x))."""
    s = sigmoid(x)
    return s + x * s * (1.0 - s)


# -- RoPE --------------------------------------------------------------------------------------


def rope_angles(seq: int, head_dim: int, theta: float) -> np.ndarray:
    """θ[p, i] = p · theta^(−2i/HD), shape [S, HD/2]."""
    i = np.arange(head_dim // 2, dtype=np.float64)
    return np.arange(seq, dtype=np.float64)[:, None] * np.power(float(theta), -2.0 * i / head_dim)[None, :]


def rope_factor(seq: int, head_dim: int, theta: float, rope_fp16: bool) -> np.ndarray:
    """The complex rotation factor per (position, pair): cos θ + i sin θ, [S, HD/2].

    With ``rope_fp16`` the real and imaginary parts are rounded to fp16 (the kernel's tables).
    """
    ang = rope_angles(seq, head_dim, theta)
    c, s = np.cos(ang), np.sin(ang)
    if rope_fp16:
        c = c.astype(np.float16).astype(np.float64)
        s = s.astype(np.float16).astype(np.float64)
    return c + 1j * s


def rope_head(x_sd: np.ndarray, factor: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Rotate one head ``[S, HD]``: pair i of position p is the complex number x[p,2i] + i·x[p,2i+1].

    ``inverse=True`` multiplies by the conjugate factor: the transpose of the forward rotation,
    i.e. the RoPE backward (exactly, even when fp16 rounding made |factor| ≠ 1).
    """
    z = x_sd[:, 0::2] + 1j * x_sd[:, 1::2]
    z = z * (np.conj(factor) if inverse else factor)
    out = np.empty_like(x_sd)
    out[:, 0::2] = z.real
    out[:, 1::2] = z.imag
    return out


def rope_channels(x: np.ndarray, n_heads: int, head_dim: int, factor: np.ndarray, inverse: bool = False) -> np.ndarray:
    """RoPE on a channel-first ``[n_heads·HD, S]`` activation, head by head."""
    x = _f64(x)
    out = np.empty_like(x)
    for h in range(n_heads):
        sl = slice(h * head_dim, (h + 1) * head_dim)
        out[sl] = rope_head(x[sl].T, factor, inverse).T
    return out


# -- attention ---------------------------------------------------------------------------------


def _head(x: np.ndarray, h: int, hd: int) -> np.ndarray:
    """Head h of a channel-first [n·HD, S] tensor as [S, HD]."""
    return x[h * hd:(h + 1) * hd].T


def causal_softmax(scores: np.ndarray) -> np.ndarray:
    s = scores.copy()
    s[np.triu_indices(s.shape[0], k=1)] = -np.inf
    s -= s.max(axis=1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=1, keepdims=True)


def attention(q_rope, k_rope, v, n_heads: int, n_kv_heads: int, head_dim: int, scale: float):
    """Causal attention on rotated q/k: returns (attn [NH·HD, S], P [NH·S, S])."""
    q_rope, k_rope, v = _f64(q_rope), _f64(k_rope), _f64(v)
    r = n_heads // n_kv_heads
    seq = q_rope.shape[1]
    attn = np.empty((n_heads * head_dim, seq))
    probs = np.empty((n_heads * seq, seq))
    for h in range(n_heads):
        g = h // r
        qh, kh, vh = _head(q_rope, h, head_dim), _head(k_rope, g, head_dim), _head(v, g, head_dim)
        p = causal_softmax(scale * (qh @ kh.T))
        attn[h * head_dim:(h + 1) * head_dim] = (p @ vh).T
        probs[h * seq:(h + 1) * seq] = p
    return attn, probs


def sdpa_fwd(xn, x, wq, wk, wv, wo, *, n_heads, n_kv_heads, head_dim, theta, alpha, scale, rope_fp16=True):
    """Taps of sdpaFwd: x2 = x + α·Wo·attn, attn, q_rope, k_rope, v."""
    xn, x = _f64(xn), _f64(x)
    seq = xn.shape[1]
    factor = rope_factor(seq, head_dim, theta, rope_fp16)
    q = _f64(wq) @ xn
    k = _f64(wk) @ xn
    v = _f64(wv) @ xn
    q_rope = rope_channels(q, n_heads, head_dim, factor)
    k_rope = rope_channels(k, n_kv_heads, head_dim, factor)
    attn, _ = attention(q_rope, k_rope, v, n_heads, n_kv_heads, head_dim, scale)
    x2 = x + alpha * (_f64(wo) @ attn)
    return {"x2": x2, "attn": attn, "q_rope": q_rope, "k_rope": k_rope, "v": v}


def sdpa_bwd1(q_rope, k_rope, v, da, *, n_heads, n_kv_heads, head_dim, scale):
    """dv = Σ_{h in group} Pₕᵀ dAₕ (per kv-head), P, dP = dA·Vᵀ (per q-head)."""
    q_rope, k_rope, v, da = map(_f64, (q_rope, k_rope, v, da))
    r = n_heads // n_kv_heads
    seq = q_rope.shape[1]
    _, probs = attention(q_rope, k_rope, v, n_heads, n_kv_heads, head_dim, scale)
    dv = np.zeros((n_kv_heads * head_dim, seq))
    dprobs = np.empty((n_heads * seq, seq))
    for h in range(n_heads):
        g = h // r
        p = probs[h * seq:(h + 1) * seq]
        dah = _head(da, h, head_dim)
        dv[g * head_dim:(g + 1) * head_dim] += (p.T @ dah).T
        dprobs[h * seq:(h + 1) * seq] = dah @ _head(v, g, head_dim).T
    return {"dv": dv, "P": probs, "dP": dprobs}


def sdpa_bwd2(P, dP, q_rope, k_rope, *, n_heads, n_kv_heads, head_dim, scale):
    """Softmax backward dS = P ⊙ (dP − rowsum(P ⊙ dP)); dq = scale·dS·K, dk = scale·Σ dSᵀ·Q."""
    P, dP, q_rope, k_rope = map(_f64, (P, dP, q_rope, k_rope))
    r = n_heads // n_kv_heads
    seq = q_rope.shape[1]
    dq = np.empty((n_heads * head_dim, seq))
    dk = np.zeros((n_kv_heads * head_dim, seq))
    for h in range(n_heads):
        g = h // r
        p, dp = P[h * seq:(h + 1) * seq], dP[h * seq:(h + 1) * seq]
        ds = p * (dp - (p * dp).sum(axis=1, keepdims=True))
        dq[h * head_dim:(h + 1) * head_dim] = (scale * ds @ _head(k_rope, g, head_dim)).T
        dk[g * head_dim:(g + 1) * head_dim] += (scale * ds.T @ _head(q_rope, h, head_dim)).T
    return {"dq_rope": dq, "dk_rope": dk}


# -- FFN and the linear dx kernels ------------------------------------------------------------


def ffn_fwd(x2n, x2, w1, w3, w2, *, alpha):
    """SwiGLU: h1 = W1·x2n, h3 = W3·x2n, gate = silu(h1)·h3, x_next = x2 + α·W2·gate."""
    x2n = _f64(x2n)
    h1 = _f64(w1) @ x2n
    h3 = _f64(w3) @ x2n
    gate = silu(h1) * h3
    return {"x_next": _f64(x2) + alpha * (_f64(w2) @ gate), "h1": h1, "h3": h3, "gate": gate}


def linear_dx(dy, w):
    """dx of y = W x: Wᵀ·dy."""
    return _f64(w).T @ _f64(dy)


def ffn_bwd_w2t(df, w2):
    return {"dgate": linear_dx(df, w2)}


def ffn_bwd_w13t(dgate, h1, h3, w1, w3):
    dgate, h1, h3 = map(_f64, (dgate, h1, h3))
    dh1 = dgate * h3 * silu_grad(h1)
    dh3 = dgate * silu(h1)
    return {"dx2n": linear_dx(dh1, w1) + linear_dx(dh3, w3), "dh1": dh1, "dh3": dh3}


def wot_bwd(dx2s, wo):
    return {"da": linear_dx(dx2s, wo)}


def q_bwd(dq, wq):
    return {"dxq": linear_dx(dq, wq)}


def kv_bwd(dk, dv, wk, wv):
    return {"dxkv": linear_dx(dk, wk) + linear_dx(dv, wv)}


def qkv_bwd(dq, dk, dv, wq, wk, wv):
    return {"dx": linear_dx(dq, wq) + linear_dx(dk, wk) + linear_dx(dv, wv)}


# -- finite differences -----------------------------------------------------------------------


def numerical_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central-difference gradient of scalar ``f`` at ``x`` (float64), element by element."""
    x = _f64(x).copy()
    g = np.empty_like(x)
    flat, gf = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        flat[i] = old
        gf[i] = (fp - fm) / (2 * eps)
    return g
