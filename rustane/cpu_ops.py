"""CPU-side training ops (C, GIL released): RMSNorm, RoPE, cross-entropy, embedding, AdamW, norms.

Layout: activations are channel-first ``[C, S]`` fp32 (element (c, s) at ``c*S + s``), like the
ANE buffers (docs/design.md). All arrays must be C-contiguous; float arrays fp32, token ids
int32 (``as_tokens`` converts). Each function allocates its outputs unless ``out=`` style
arguments are given, so hot loops can reuse buffers.

The math (verified against finite differences and PyTorch autograd in tests/test_cpu_ops.py):

- RMSNorm: ``r[s] = 1/sqrt(mean_c x[c,s]^2 + eps)``, ``y = x·r·w``.
  Backward ``dx = r·(w·dy − x·r²/C·Σ_c(dy·w·x))``, ``dw += Σ_s dy·x·r``. (The upstream ANE code
  has ``w·r·(dy − …)``, wrong when w ≠ 1; docs/ane-runtime.md#reference-bugs)
- RoPE: interleaved pairs ``(2i, 2i+1)`` of each head rotate by ``s·theta^(−2i/HD)``; the
  backward is the inverse rotation.
- Cross-entropy over the full vocabulary on logits ``[V, S]``: mean over positions;
  ``dlogits = (softmax − onehot)·grad_scale/S``.
- AdamW: PyTorch semantics (decoupled decay ``w ← w·(1 − lr·wd)`` then the bias-corrected Adam
  update); ``grad_scale`` multiplies the gradient first (fold in ``1/loss_scale`` and clipping).
"""

from __future__ import annotations

import math
import os

import numpy as np

from rustane import array_views
from rustane.cpu_threads import usable_cpus

try:
    from rustane import _cpu
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "rustane._cpu (the compiled CPU ops) is not available: build the package "
        "(pip install --no-build-isolation . , or a private --prefix install for development) "
        f"and import it from the install, not the source tree ({exc})"
    ) from exc

__all__ = [
    "as_tokens",
    "rmsnorm_forward",
    "rmsnorm_backward",
    "rope_forward",
    "rope_backward",
    "cross_entropy",
    "embedding_forward",
    "embedding_backward",
    "adamw_step",
    "adamw_tensors",
    "sumsq",
    "sumsq_tensors",
    "global_norm",
    "optimizer_threads",
    "sigmoid",
    "silu",
    "softmax_last",
    "rows_view",
]


def as_tokens(tokens) -> np.ndarray:
    """Token ids as a contiguous int32 vector (the dtype the C ops take)."""
    t = np.asarray(tokens)
    if t.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D sequence of ids, got shape {t.shape}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"tokens: expected integer ids, got dtype {t.dtype}")
    if t.size and (int(t.max()) > np.iinfo(np.int32).max or int(t.min()) < 0):
        raise ValueError(f"tokens: ids must lie in [0, 2**31), got min {t.min()} max {t.max()}")
    return np.ascontiguousarray(t, dtype=np.int32)


def _empty(shape) -> np.ndarray:
    return np.empty(shape, dtype=np.float32)


def rmsnorm_forward(x: np.ndarray, w: np.ndarray, eps: float = 1e-5, *,
                    out: np.ndarray | None = None,
                    rrms: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``x [C, S]``, ``w [C]`` → ``(out [C, S], rrms [S])``. ``out`` may be ``x`` (in place)."""
    C, S = np.shape(x) if np.ndim(x) == 2 else (0, 0)
    out = _empty((C, S)) if out is None else out
    rrms = _empty((S,)) if rrms is None else rrms
    _cpu.rmsnorm_fwd(x, w, out, rrms, float(eps))
    return out, rrms


def rmsnorm_backward(dy: np.ndarray, x: np.ndarray, w: np.ndarray, rrms: np.ndarray,
                     dw: np.ndarray, *, dx: np.ndarray | None = None) -> np.ndarray:
    """Returns ``dx [C, S]`` (written; may be ``dy``) and ACCUMULATES ``dw [C] += Σ dy·x·r``."""
    dx = _empty(np.shape(x)) if dx is None else dx
    _cpu.rmsnorm_bwd(dy, x, w, rrms, dx, dw)
    return dx


def rope_forward(x: np.ndarray, n_heads: int, head_dim: int, theta: float = 10000.0, *,
                 inv_freq: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Rotate ``x [n_heads·head_dim, S]`` at positions 0..S−1. ``out`` may be ``x``.

    ``inv_freq [head_dim/2]`` (e.g. ``ModelConfig.inv_freq``, with rope scaling) overrides the
    plain ``theta^(−2i/head_dim)`` frequencies."""
    out = _empty(np.shape(x)) if out is None else out
    if inv_freq is None:
        _cpu.rope(x, out, int(n_heads), int(head_dim), float(theta), False)
    else:
        _cpu.rope_freq(x, out, int(n_heads), int(head_dim), inv_freq, False)
    return out


def rope_backward(dy: np.ndarray, n_heads: int, head_dim: int, theta: float = 10000.0, *,
                  inv_freq: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """Gradient through ``rope_forward``: the inverse rotation of ``dy``."""
    out = _empty(np.shape(dy)) if out is None else out
    if inv_freq is None:
        _cpu.rope(dy, out, int(n_heads), int(head_dim), float(theta), True)
    else:
        _cpu.rope_freq(dy, out, int(n_heads), int(head_dim), inv_freq, True)
    return out


def cross_entropy(logits: np.ndarray, targets, grad_scale: float = 1.0, *,
                  dlogits: np.ndarray | None = None, threads: int = 1) -> tuple[float, np.ndarray]:
    """Full-vocabulary softmax CE on ``logits [V, S]`` → ``(mean loss, dlogits [V, S])``.

    ``dlogits = (softmax − onehot)·grad_scale/S``; pass ``dlogits=logits`` to overwrite the
    logits in place (the loss is still exact: target logits are read first). The loss is NaN if a
    column holds NaN or +inf; a −inf logit has probability 0 (the loss is +inf if it is the
    target's). Positions are split over ``threads`` threads; the result is the same bits for
    any count.
    """
    dlogits = _empty(np.shape(logits)) if dlogits is None else dlogits
    loss = _cpu.cross_entropy(logits, as_tokens(targets), dlogits, float(grad_scale), int(threads))
    return float(loss), dlogits


def cross_entropy_weighted(logits: np.ndarray, targets, weights, grad_scale: float = 1.0, *,
                           dlogits: np.ndarray | None = None, threads: int = 1) -> tuple[float, np.ndarray]:
    """Loss-masked CE: ``(Σ_s weights[s]·loss[s], dlogits)`` with column ``s`` of dlogits
    ``(softmax − onehot)·grad_scale·weights[s]``. Weights ``1/n`` over the ``n`` positions that
    carry loss (0 elsewhere) give their mean; a zero weight contributes nothing, not even NaN."""
    dlogits = _empty(np.shape(logits)) if dlogits is None else dlogits
    w = np.ascontiguousarray(weights, dtype=np.float32)
    loss = _cpu.cross_entropy_weighted(logits, as_tokens(targets), w, dlogits, float(grad_scale), int(threads))
    return float(loss), dlogits


def embedding_forward(E: np.ndarray, tokens, *, out: np.ndarray | None = None) -> np.ndarray:
    """Gather rows of ``E [V, D]`` for ``tokens [S]`` into channel-first ``[D, S]``."""
    tok = as_tokens(tokens)
    out = _empty((np.shape(E)[1] if np.ndim(E) == 2 else 0, tok.shape[0])) if out is None else out
    _cpu.embedding_fwd(E, tok, out)
    return out


def embedding_backward(dx: np.ndarray, tokens, dE: np.ndarray) -> np.ndarray:
    """Scatter-add ``dE[tok[s], :] += dx[:, s]`` (accumulates; returns ``dE``)."""
    _cpu.embedding_bwd(dx, as_tokens(tokens), dE)
    return dE


def adamw_step(w: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, *, lr: float,
               step: int, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
               weight_decay: float = 0.0, grad_scale: float = 1.0) -> None:
    """One in-place AdamW update of ``w``, ``m``, ``v`` (``step`` is 1-based)."""
    _cpu.adamw_step(w, grad, m, v, float(lr), float(beta1), float(beta2), float(eps),
                    float(weight_decay), float(grad_scale), int(step))


def optimizer_threads() -> int:
    """Threads for the memory-bound passes over big arrays (optimizer, cross-entropy): the CPUs
    this process may use, at most 4 (more add little memory bandwidth); ``RUSTANE_OPT_THREADS``
    overrides."""
    env = os.environ.get("RUSTANE_OPT_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"RUSTANE_OPT_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"RUSTANE_OPT_THREADS must be a positive integer, got {env!r}")
        return n
    return max(1, min(4, usable_cpus()))


def adamw_tensors(ws, grads, ms, vs, weight_decays, *, lr: float, step: int, beta1: float = 0.9,
                  beta2: float = 0.95, eps: float = 1e-8, grad_scale: float = 1.0,
                  zero_grad: bool = False, threads: int | None = None) -> None:
    """``adamw_step`` on every tensor of the lists at once, split over ``threads`` threads
    (default ``optimizer_threads()``); with ``zero_grad`` each gradient is zeroed once read.
    The result does not depend on the thread count."""
    _cpu.adamw_tensors(list(ws), list(grads), list(ms), list(vs), [float(d) for d in weight_decays],
                       float(lr), float(beta1), float(beta2), float(eps), float(grad_scale), int(step),
                       bool(zero_grad), optimizer_threads() if threads is None else int(threads))


def sumsq_tensors(arrays, threads: int | None = None) -> float:
    """Σ over arrays of Σx² in double, on ``threads`` threads; the same value for any count."""
    return float(_cpu.sumsq_tensors(list(arrays), optimizer_threads() if threads is None else int(threads)))


def rows_view(a: np.ndarray) -> np.ndarray | None:
    """An fp32 ``a`` as a 2-D ``[rows, last axis]`` view (``rustane.array_views.rows_view``), or
    None when it is not fp32 or has no such view; the C row ops take these."""
    return array_views.rows_view(a) if a.dtype == np.float32 else None


def _rows_call(fn, x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    out = _empty(np.shape(x)) if out is None else out
    xv, ov = rows_view(np.asarray(x)), rows_view(out)
    if xv is None or ov is None or np.shape(x) != out.shape:
        raise ValueError(f"expected fp32 arrays of one shape whose last axis is contiguous, got x "
                         f"{np.asarray(x).dtype} {np.shape(x)} and out {out.dtype} {out.shape}")
    fn(xv, ov)
    return out


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """fp32 sigmoid in one pass (the simulator's op; ``out`` may be ``x``)."""
    return _rows_call(_cpu.sigmoid_rows, x, out)


def silu(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """fp32 ``x·sigmoid(x)`` in one pass (``out`` may be ``x``)."""
    return _rows_call(_cpu.silu_rows, x, out)


def softmax_last(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """fp32 softmax over the last axis (``out`` may be ``x``)."""
    return _rows_call(_cpu.softmax_rows, x, out)


def sumsq(x: np.ndarray) -> float:
    """Σx² in double precision; inf or NaN exactly when ``x`` holds inf or NaN."""
    return float(_cpu.sumsq(x))


def global_norm(arrays) -> float:
    """L2 norm over several arrays (``inf``/``nan`` if any element is non-finite)."""
    total = sumsq_tensors(arrays)
    return math.sqrt(total) if math.isfinite(total) else total
