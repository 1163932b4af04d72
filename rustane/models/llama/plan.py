"""The Llama kernel plan (docs/design.md, "Kernel plan"): one description per fused kernel.

For a model shape, :func:`plan_for` says for every kernel which template in ``templates/`` it
renders, with which placeholder values, how its single input is packed (blocks, each weight block
naming the parameter it carries), which taps its single output carries and which BLOBFILE consts
it needs (RoPE tables, causal mask); :func:`flops_per_sequence` is the matmul work of those
kernels. The runtime (``rustane.runtime``) packs and unpacks through these descriptions and never
computes an offset by hand. The vocabulary is ``rustane.runtime.plan``.

Weights are described in their natural orientation ``W [OUT, IN]``; a block with ``transpose``
stages ``Wᵀ`` (forward q/k/v/w1/w3) instead of ``W`` (Wo, W2 in the forward — the kernel
multiplies them untransposed — and every backward dx kernel).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from rustane.formats.arch import inv_freq as arch_inv_freq
from rustane.mil.blob import blob_key, write_blob
from rustane.models.llama import params as P
from rustane.models.llama.config import ConfigError, HeadDims, ModelConfig, dimension_errors
from rustane.runtime.plan import (
    KernelSpec, channels, columns, fp16_literal, fp32_literal, make_spec, spatial, stacked, taps,
)

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: the forward kernels, in call order, for every model
FORWARD_KERNELS = ("sdpaFwd", "ffnFused")
_BACKWARD_COMMON = ("ffnBwdW2t", "ffnBwdW13t", "wotBwd", "sdpaBwd1", "sdpaBwd2")
#: fp16 "minus infinity" of the additive causal mask (finite, so softmax never sees NaN)
MASK_NEG = -65504.0


@dataclass(frozen=True)
class KernelShape(HeadDims):
    """The model dimensions the kernels depend on, named as in ``ModelConfig`` (``of`` derives
    one from a config) and validated by the same :func:`dimension_errors`."""

    dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    seq_len: int
    rope_theta: float = 10000.0
    #: ``ModelConfig.rope_scaling`` (sorted pairs, hashable); None is plain RoPE
    rope_scaling: tuple | None = None
    residual_alpha: float = 1.0
    #: compute/I-O dtype of the rendered programs: 'fp16' is what the ANE runs (and the simulator's
    #: fp16 mode); 'fp32' renders the same programs in fp32 — consts and RoPE tables included — so
    #: the simulator's fp32 mode is exact math end to end (gradient checks against PyTorch).
    dtype: str = "fp16"

    def __post_init__(self) -> None:
        errs = dimension_errors(self)
        if errs:
            raise ConfigError("invalid kernel shape:\n  " + "\n  ".join(errs))
        if self.dtype not in ("fp16", "fp32"):
            raise ValueError(f"KernelShape.dtype must be 'fp16' or 'fp32', got {self.dtype!r}")
        fp16_literal(self.residual_alpha)  # raises if it is not representable in fp16

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: str = "fp16") -> "KernelShape":
        return cls(dim=cfg.dim, hidden_dim=cfg.hidden_dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                   head_dim=cfg.head_dim, seq_len=cfg.seq_len, rope_theta=float(cfg.rope_theta),
                   rope_scaling=cfg.rope_scaling, residual_alpha=cfg.residual_alpha, dtype=dtype)


def attention_scale(head_dim: int, dtype: str = "fp16") -> float:
    """The const the kernels use for 1/sqrt(head_dim), already rounded to ``dtype``."""
    return float(np.dtype(np.float16 if dtype == "fp16" else np.float32).type(1.0 / math.sqrt(head_dim)))


def rope_tables(seq: int, head_dim: int, theta: float,
                scaling: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin ``[seq, head_dim]`` float64; pair i's value at columns 2i and 2i+1.

    Angle of pair i at position p: ``p · theta^(−2i/head_dim)`` (interleaved pairs, llama2.c),
    the frequency scaled per ``scaling`` (llama3 / linear, ``rustane.formats.arch.inv_freq``).
    """
    inv_freq = arch_inv_freq(head_dim, theta, dict(scaling) if scaling else None)
    ang = np.arange(seq, dtype=np.float64)[:, None] * inv_freq[None, :]  # [S, HD/2]
    ang = np.repeat(ang, 2, axis=1)  # [S, HD]
    return np.cos(ang), np.sin(ang)


def causal_mask(seq: int) -> np.ndarray:
    """Additive mask ``[seq, seq]`` fp16: 0 where key j <= query i, −65504 elsewhere."""
    m = np.full((seq, seq), MASK_NEG, dtype=np.float16)
    m[np.tril_indices(seq)] = 0
    return m


def _blob_files(shape: KernelShape) -> dict[str, bytes]:
    cos, sin = rope_tables(shape.seq_len, shape.head_dim, shape.rope_theta, shape.rope_scaling)
    s, hd = shape.seq_len, shape.head_dim
    dt = np.float16 if shape.dtype == "fp16" else np.float32
    return {
        blob_key("rope_cos"): write_blob(cos.reshape(1, 1, s, hd), dt),
        blob_key("rope_sin"): write_blob(sin.reshape(1, 1, s, hd), dt),
        blob_key("mask"): write_blob(causal_mask(s).reshape(1, 1, s, s), dt),
    }


def _spec(name, blocks, tap_list, seq, params, blobs, blob_names, template=None) -> KernelSpec:
    return make_spec(name, blocks, tap_list, seq, params, blobs, blob_names, template=template,
                     template_dir=TEMPLATES, per_layer_output=name in FORWARD_KERNELS)


def _linear_dx(name, ic, oc, seq, act, w, param, tap) -> KernelSpec:
    """One dx = Wᵀ·dy kernel (template linearDx): input ``[IC, S + OC]`` = (dy [IC, S], W [IC, OC])
    -> [OC, S]. ``act``/``w`` name the blocks and the program's values."""
    blocks = spatial(ic, [(act, "act", seq, False), (w, "weight", oc, False, param)])
    params = {"IC": ic, "OC": oc, "SEQ": seq, "IN_W": seq + oc, "COL_W": seq, "ACT": act, "W": w}
    return _spec(name, blocks, taps([(tap, oc)]), seq, params, {}, (), template="linearDx")


def plan_for(shape: KernelShape | None = None, **dims) -> dict[str, KernelSpec]:
    """Every kernel a training step uses, for ``shape`` (or ``KernelShape(**dims)``).

    Returns name -> KernelSpec in call order: forward, then backward (``qkvBwd`` for MHA,
    ``qBwd`` + ``kvBwd`` for GQA).
    """
    if shape is None:
        shape = KernelShape(**dims)
    elif dims:
        raise TypeError("plan_for takes a KernelShape or keyword dims, not both")
    elif not isinstance(shape, KernelShape):
        raise TypeError(f"plan_for needs a KernelShape (KernelShape.of(config)), got {type(shape).__name__}")
    return dict(_plan(shape))


@functools.lru_cache(maxsize=32)
def _plan(shape: KernelShape) -> tuple[tuple[str, KernelSpec], ...]:
    D, H, S, HD = shape.dim, shape.hidden_dim, shape.seq_len, shape.head_dim
    NH, NKV, QD, KVD, R = shape.n_heads, shape.n_kv_heads, shape.q_dim, shape.kv_dim, shape.gqa_ratio
    literal = fp16_literal if shape.dtype == "fp16" else fp32_literal
    alpha, scale = literal(shape.residual_alpha), literal(attention_scale(HD, shape.dtype))
    blobs = _blob_files(shape)
    heads = {"NH": NH, "NKV": NKV, "HD": HD, "QD": QD, "KVD": KVD, "RS": R * S}
    plan: dict[str, KernelSpec] = {}

    b = spatial(D, [("xn", "act", S, False), ("x", "act", S, False), ("wq", "weight", QD, True, P.WQ),
                    ("wk", "weight", KVD, True, P.WK), ("wv", "weight", KVD, True, P.WV),
                    ("wo", "weight", QD, False, P.WO)])
    t = taps([("x2", D), ("attn", QD), ("q_rope", QD), ("k_rope", KVD), ("v", KVD)])
    params = dict(DIM=D, SEQ=S, IN_W=b[-1].col1, OUT_C=t[-1].c1, PAIRS=S * HD // 2, ALPHA=alpha, SCALE=scale,
                  **heads, **columns(b, COL_X="x", COL_WQ="wq", COL_WK="wk", COL_WV="wv", COL_WO="wo"))
    plan["sdpaFwd"] = _spec("sdpaFwd", b, t, S, params, blobs, ("rope_cos", "rope_sin", "mask"))

    b = spatial(D, [("x2n", "act", S, False), ("x2", "act", S, False), ("w1", "weight", H, True, P.W1),
                    ("w3", "weight", H, True, P.W3), ("w2", "weight", H, False, P.W2)])
    t = taps([("x_next", D), ("h1", H), ("h3", H), ("gate", H)])
    params = dict(DIM=D, HIDDEN=H, SEQ=S, IN_W=b[-1].col1, OUT_C=t[-1].c1, ALPHA=alpha,
                  **columns(b, COL_X="x2", COL_W1="w1", COL_W3="w3", COL_W2="w2"))
    plan["ffnFused"] = _spec("ffnFused", b, t, S, params, blobs, ())

    plan["ffnBwdW2t"] = _linear_dx("ffnBwdW2t", D, H, S, "df", "w2", P.W2, "dgate")

    b = spatial(H, [("dgate", "act", S, False), ("h1", "act", S, False), ("h3", "act", S, False),
                    ("w1", "weight", D, False, P.W1), ("w3", "weight", D, False, P.W3)])
    t = taps([("dx2n", D), ("dh1", H), ("dh3", H)])
    params = dict(DIM=D, HIDDEN=H, SEQ=S, IN_W=b[-1].col1, OUT_C=t[-1].c1,
                  **columns(b, COL_H1="h1", COL_H3="h3", COL_W1="w1", COL_W3="w3"))
    plan["ffnBwdW13t"] = _spec("ffnBwdW13t", b, t, S, params, blobs, ())

    plan["wotBwd"] = _linear_dx("wotBwd", D, QD, S, "dx2s", "wo", P.WO, "da")

    b = stacked(S, [("q_rope", QD), ("k_rope", KVD), ("v", KVD), ("da", QD)])
    t = taps([("dv", KVD), ("P", NH * S), ("dP", NH * S)])
    params = dict(SEQ=S, IN_C=b[-1].c1, OUT_C=t[-1].c1, NHS=NH * S, SCALE=scale, **heads,
                  **channels(b, CH_K="k_rope", CH_V="v", CH_DA="da"))
    plan["sdpaBwd1"] = _spec("sdpaBwd1", b, t, S, params, blobs, ("mask",))

    b = stacked(S, [("P", NH * S), ("dP", NH * S), ("q_rope", QD), ("k_rope", KVD)])
    t = taps([("dq_rope", QD), ("dk_rope", KVD)])
    params = dict(SEQ=S, IN_C=b[-1].c1, OUT_C=t[-1].c1, NHS=NH * S, SCALE=scale, **heads,
                  **channels(b, CH_DP="dP", CH_Q="q_rope", CH_K="k_rope"))
    plan["sdpaBwd2"] = _spec("sdpaBwd2", b, t, S, params, blobs, ())

    if shape.is_mha:
        b = spatial(QD, [("dq", "act", S, False), ("dk", "act", S, False), ("dv", "act", S, False),
                         ("wq", "weight", D, False, P.WQ), ("wk", "weight", D, False, P.WK),
                         ("wv", "weight", D, False, P.WV)])
        params = dict(QD=QD, DIM=D, SEQ=S, IN_W=b[-1].col1,
                      **columns(b, COL_DK="dk", COL_DV="dv", COL_WQ="wq", COL_WK="wk", COL_WV="wv"))
        plan["qkvBwd"] = _spec("qkvBwd", b, taps([("dx", D)]), S, params, blobs, ())
    else:
        plan["qBwd"] = _linear_dx("qBwd", QD, D, S, "dq", "wq", P.WQ, "dxq")
        b = spatial(KVD, [("dk", "act", S, False), ("dv", "act", S, False),
                          ("wk", "weight", D, False, P.WK), ("wv", "weight", D, False, P.WV)])
        params = dict(KVD=KVD, DIM=D, SEQ=S, IN_W=b[-1].col1, **columns(b, COL_DV="dv", COL_WK="wk", COL_WV="wv"))
        plan["kvBwd"] = _spec("kvBwd", b, taps([("dxkv", D)]), S, params, blobs, ())
    # every template spells its tensor/const dtype as $DT
    return tuple((n, dataclasses.replace(sp, params=MappingProxyType({**sp.params, "DT": shape.dtype})))
                 for n, sp in plan.items())


def backward_kernels(shape: KernelShape) -> tuple[str, ...]:
    """The backward kernels of one layer, in call order."""
    return _BACKWARD_COMMON + (("qkvBwd",) if shape.is_mha else ("qBwd", "kvBwd"))


def evals_per_layer(shape: KernelShape) -> int:
    """Kernel evaluations per layer per training step (MHA 8, GQA 9; design.md)."""
    return len(FORWARD_KERNELS) + len(backward_kernels(shape))


def flops_per_sequence(cfg: ModelConfig) -> float:
    """Matmul FLOPs of all kernel evals for one sequence (forward + backward dx, no dW)."""
    S, D, H, QD, KVD = cfg.seq_len, cfg.dim, cfg.hidden_dim, cfg.q_dim, cfg.kv_dim
    linear = 2 * S * (D * QD + 2 * D * KVD + QD * D + 3 * D * H)  # q,k,v,o + w1,w3,w2
    attn_fwd = 4 * S * S * QD  # scores + P·V
    attn_bwd = 10 * S * S * QD  # recomputed scores, dV, dP, dQ, dK
    return float(cfg.n_layers * (2 * linear + attn_fwd + attn_bwd))
