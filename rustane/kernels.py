"""The fused kernel plan (docs/design.md, "Kernel plan"): one description per kernel.

For a model shape, :func:`plan_for` says for every kernel which template in ``mil_templates/`` it
renders, with which placeholder values, how its single fp16 input ``[1, C, 1, W]`` is packed
(:class:`Block`), which taps its single output ``[1, C_out, 1, S]`` carries (:class:`Tap`) and
which BLOBFILE consts it needs (RoPE tables, causal mask). Model code packs and unpacks through
these descriptions and never computes an offset by hand.

Packing rules (binding, design.md):

- weight-bearing kernels pack along the spatial axis: every block has all C channels and the
  blocks sit side by side in columns (activations first, then staged weights);
- weight-free kernels (sdpaBwd1/2) stack blocks along channels, every block S columns wide;
- taps are concatenated along channels in the listed order.

Weights are described in their natural orientation ``W [OUT, IN]``; ``Block.transpose`` says the
kernel stages ``Wᵀ`` (forward q/k/v/w1/w3) instead of ``W`` (Wo, W2 in the forward — the kernel
multiplies them untransposed — and every backward dx kernel).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np

from rustane.mil.blob import blob_key, write_blob

#: the forward kernels, in call order, for every model
FORWARD_KERNELS = ("sdpaFwd", "ffnFused")
_BACKWARD_COMMON = ("ffnBwdW2t", "ffnBwdW13t", "wotBwd", "sdpaBwd1", "sdpaBwd2")
#: fp16 "minus infinity" of the additive causal mask (finite, so softmax never sees NaN)
MASK_NEG = -65504.0


@dataclass(frozen=True)
class KernelShape:
    """The model dims the kernels depend on (rustane.config converts its config to this)."""

    dim: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    seq: int
    rope_theta: float = 10000.0
    residual_alpha: float = 1.0
    #: compute/I-O dtype of the rendered programs: 'fp16' is what the ANE runs (and the simulator's
    #: fp16 mode); 'fp32' renders the same programs in fp32 — consts and RoPE tables included — so
    #: the simulator's fp32 mode is exact math end to end (gradient checks against PyTorch).
    dtype: str = "fp16"

    def __post_init__(self) -> None:
        for f in ("dim", "hidden", "n_heads", "n_kv_heads", "head_dim", "seq"):
            v = getattr(self, f)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"KernelShape.{f} must be a positive int, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) for GQA"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for interleaved-pair RoPE, got {self.head_dim}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta must be a positive finite number, got {self.rope_theta!r}")
        if self.dtype not in ("fp16", "fp32"):
            raise ValueError(f"KernelShape.dtype must be 'fp16' or 'fp32', got {self.dtype!r}")
        fp16_literal(self.residual_alpha)  # raises if it is not representable in fp16

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group(self) -> int:
        """R: q-heads per kv-head; q-head h uses kv-head h // R."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_mha(self) -> bool:
        return self.n_heads == self.n_kv_heads


@dataclass(frozen=True)
class Block:
    """One region of a kernel input ``[C, W]``: channels ``[c0, c1)``, columns ``[col0, col1)``.

    ``kind`` is ``"act"`` (rewritten every micro-step) or ``"weight"`` (staged after each optimizer
    step). The array handed to :func:`pack_input` has shape :attr:`source_shape`; it is stored
    transposed when ``transpose`` is true.
    """

    name: str
    kind: str
    c0: int
    c1: int
    col0: int
    col1: int
    transpose: bool = False

    @property
    def staged_shape(self) -> tuple[int, int]:
        return (self.c1 - self.c0, self.col1 - self.col0)

    @property
    def source_shape(self) -> tuple[int, int]:
        r, c = self.staged_shape
        return (c, r) if self.transpose else (r, c)


@dataclass(frozen=True)
class Tap:
    """One output: channels ``[c0, c1)`` of the kernel output ``[C_out, S]``."""

    name: str
    c0: int
    c1: int


@dataclass(frozen=True)
class KernelSpec:
    name: str
    template: str  # file stem in mil_templates/
    params: Mapping[str, str]  # placeholder -> text
    in_shape: tuple[int, int, int, int]  # (1, C, 1, W)
    out_shape: tuple[int, int, int, int]  # (1, C_out, 1, S)
    blocks: tuple[Block, ...]
    taps: tuple[Tap, ...]
    blobs: Mapping[str, bytes] = field(default_factory=dict)  # blob_key(name) -> blob file

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"kernel {self.name} has no input block {name!r}; blocks: {[b.name for b in self.blocks]}")

    def tap(self, name: str) -> Tap:
        for t in self.taps:
            if t.name == name:
                return t
        raise KeyError(f"kernel {self.name} has no output tap {name!r}; taps: {[t.name for t in self.taps]}")

    @property
    def weight_bearing(self) -> bool:
        return any(b.kind == "weight" for b in self.blocks)


def fp16_literal(x: float) -> str:
    """Text for an ``fp16(...)`` MIL const holding ``x`` rounded to fp16 (exact decimal)."""
    v = np.float16(x)
    if not np.isfinite(v) or (x != 0 and v == 0):
        raise ValueError(f"{x!r} is not representable as a finite non-zero fp16 constant")
    return repr(float(v))


def fp32_literal(x: float) -> str:
    """Text for an ``fp32(...)`` MIL const holding ``x`` rounded to fp32."""
    return repr(float(np.float32(x)))


def attention_scale(head_dim: int, dtype: str = "fp16") -> float:
    """The const the kernels use for 1/sqrt(head_dim), already rounded to ``dtype``."""
    return float(np.dtype(np.float16 if dtype == "fp16" else np.float32).type(1.0 / math.sqrt(head_dim)))


def rope_tables(seq: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin ``[seq, head_dim]`` float64; pair i's value at columns 2i and 2i+1.

    Angle of pair i at position p: ``p · theta^(−2i/head_dim)`` (interleaved pairs, llama2.c).
    """
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.arange(seq, dtype=np.float64)[:, None] * inv_freq[None, :]  # [S, HD/2]
    ang = np.repeat(ang, 2, axis=1)  # [S, HD]
    return np.cos(ang), np.sin(ang)


def causal_mask(seq: int) -> np.ndarray:
    """Additive mask ``[seq, seq]`` fp16: 0 where key j <= query i, −65504 elsewhere."""
    m = np.full((seq, seq), MASK_NEG, dtype=np.float16)
    m[np.tril_indices(seq)] = 0
    return m


def _blob_files(shape: KernelShape) -> dict[str, bytes]:
    cos, sin = rope_tables(shape.seq, shape.head_dim, shape.rope_theta)
    s, hd = shape.seq, shape.head_dim
    dt = np.float16 if shape.dtype == "fp16" else np.float32
    return {
        blob_key("rope_cos"): write_blob(cos.reshape(1, 1, s, hd), dt),
        blob_key("rope_sin"): write_blob(sin.reshape(1, 1, s, hd), dt),
        blob_key("mask"): write_blob(causal_mask(s).reshape(1, 1, s, s), dt),
    }


# -- layout builders ---------------------------------------------------------------------------


def _spatial(channels: int, items: list[tuple[str, str, int, bool]]) -> tuple[Block, ...]:
    """Blocks side by side along columns, all ``channels`` tall: (name, kind, width, transpose)."""
    out, col = [], 0
    for name, kind, width, tr in items:
        out.append(Block(name, kind, 0, channels, col, col + width, tr))
        col += width
    return tuple(out)


def _stacked(seq: int, items: list[tuple[str, int]]) -> tuple[Block, ...]:
    """Activation blocks stacked along channels, all ``seq`` wide: (name, channels)."""
    out, ch = [], 0
    for name, c in items:
        out.append(Block(name, "act", ch, ch + c, 0, seq, False))
        ch += c
    return tuple(out)


def _taps(items: list[tuple[str, int]]) -> tuple[Tap, ...]:
    out, ch = [], 0
    for name, c in items:
        out.append(Tap(name, ch, ch + c))
        ch += c
    return tuple(out)


def _spec(name, blocks, taps, seq, params, blobs, blob_names) -> KernelSpec:
    in_c = max(b.c1 for b in blocks)
    in_w = max(b.col1 for b in blocks)
    out_c = taps[-1].c1
    p = {k: str(v) for k, v in params.items()}
    return KernelSpec(
        name=name,
        template=name,
        params=MappingProxyType(p),
        in_shape=(1, in_c, 1, in_w),
        out_shape=(1, out_c, 1, seq),
        blocks=blocks,
        taps=taps,
        blobs=MappingProxyType({blob_key(n): blobs[blob_key(n)] for n in blob_names}),
    )


def _cols(blocks: tuple[Block, ...], **names: str) -> dict[str, int]:
    """Placeholder -> first column of a block, e.g. COL_WQ='wq'."""
    by = {b.name: b for b in blocks}
    return {ph: by[n].col0 for ph, n in names.items()}


def _chans(blocks: tuple[Block, ...], **names: str) -> dict[str, int]:
    by = {b.name: b for b in blocks}
    return {ph: by[n].c0 for ph, n in names.items()}


def _linear_dx(name, ic, oc, seq, act, w, tap, ic_ph, oc_ph) -> KernelSpec:
    """One dx = Wᵀ·dy kernel: input ``[IC, S + OC]`` = (dy [IC, S], W [IC, OC]) -> [OC, S]."""
    blocks = _spatial(ic, [(act, "act", seq, False), (w, "weight", oc, False)])
    params = {ic_ph: ic, oc_ph: oc, "SEQ": seq, "IN_W": seq + oc, "COL_W": seq}
    return _spec(name, blocks, _taps([(tap, oc)]), seq, params, {}, ())


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
        raise TypeError(f"plan_for needs a KernelShape (rustane.config converts a model config), got {type(shape).__name__}")
    return dict(_plan(shape))


@functools.lru_cache(maxsize=32)
def _plan(shape: KernelShape) -> tuple[tuple[str, KernelSpec], ...]:
    D, H, S, HD = shape.dim, shape.hidden, shape.seq, shape.head_dim
    NH, NKV, QD, KVD, R = shape.n_heads, shape.n_kv_heads, shape.q_dim, shape.kv_dim, shape.group
    literal = fp16_literal if shape.dtype == "fp16" else fp32_literal
    alpha, scale = literal(shape.residual_alpha), literal(attention_scale(HD, shape.dtype))
    blobs = _blob_files(shape)
    heads = {"NH": NH, "NKV": NKV, "HD": HD, "QD": QD, "KVD": KVD, "RS": R * S}
    plan: dict[str, KernelSpec] = {}

    b = _spatial(D, [("xn", "act", S, False), ("x", "act", S, False), ("wq", "weight", QD, True),
                     ("wk", "weight", KVD, True), ("wv", "weight", KVD, True), ("wo", "weight", QD, False)])
    t = _taps([("x2", D), ("attn", QD), ("q_rope", QD), ("k_rope", KVD), ("v", KVD)])
    params = dict(DIM=D, SEQ=S, IN_W=b[-1].col1, OUT_C=t[-1].c1, PAIRS=S * HD // 2, ALPHA=alpha, SCALE=scale,
                  **heads, **_cols(b, COL_X="x", COL_WQ="wq", COL_WK="wk", COL_WV="wv", COL_WO="wo"))
    plan["sdpaFwd"] = _spec("sdpaFwd", b, t, S, params, blobs, ("rope_cos", "rope_sin", "mask"))

    b = _spatial(D, [("x2n", "act", S, False), ("x2", "act", S, False), ("w1", "weight", H, True),
                     ("w3", "weight", H, True), ("w2", "weight", H, False)])
    t = _taps([("x_next", D), ("h1", H), ("h3", H), ("gate", H)])
    params = dict(DIM=D, HIDDEN=H, SEQ=S, IN_W=b[-1].col1, OUT_C=t[-1].c1, ALPHA=alpha,
                  **_cols(b, COL_X="x2", COL_W1="w1", COL_W3="w3", COL_W2="w2"))
    plan["ffnFused"] = _spec("ffnFused", b, t, S, params, blobs, ())

    plan["ffnBwdW2t"] = _linear_dx("ffnBwdW2t", D, H, S, "df", "w2", "dgate", "DIM", "HIDDEN")

    b = _spatial(H, [("dgate", "act", S, False), ("h1", "act", S, False), ("h3", "act", S, False),
                     ("w1", "weight", D, False), ("w3", "weight", D, False)])
    t = _taps([("dx2n", D), ("dh1", H), ("dh3", H)])
    params = dict(DIM=D, HIDDEN=H, SEQ=S, IN_W=b[-1].col1, OUT_C=t[-1].c1,
                  **_cols(b, COL_H1="h1", COL_H3="h3", COL_W1="w1", COL_W3="w3"))
    plan["ffnBwdW13t"] = _spec("ffnBwdW13t", b, t, S, params, blobs, ())

    plan["wotBwd"] = _linear_dx("wotBwd", D, QD, S, "dx2s", "wo", "da", "DIM", "QD")

    b = _stacked(S, [("q_rope", QD), ("k_rope", KVD), ("v", KVD), ("da", QD)])
    t = _taps([("dv", KVD), ("P", NH * S), ("dP", NH * S)])
    params = dict(SEQ=S, IN_C=b[-1].c1, OUT_C=t[-1].c1, NHS=NH * S, SCALE=scale, **heads,
                  **_chans(b, CH_K="k_rope", CH_V="v", CH_DA="da"))
    plan["sdpaBwd1"] = _spec("sdpaBwd1", b, t, S, params, blobs, ("mask",))

    b = _stacked(S, [("P", NH * S), ("dP", NH * S), ("q_rope", QD), ("k_rope", KVD)])
    t = _taps([("dq_rope", QD), ("dk_rope", KVD)])
    params = dict(SEQ=S, IN_C=b[-1].c1, OUT_C=t[-1].c1, NHS=NH * S, SCALE=scale, **heads,
                  **_chans(b, CH_DP="dP", CH_Q="q_rope", CH_K="k_rope"))
    plan["sdpaBwd2"] = _spec("sdpaBwd2", b, t, S, params, blobs, ())

    if shape.is_mha:
        b = _spatial(QD, [("dq", "act", S, False), ("dk", "act", S, False), ("dv", "act", S, False),
                          ("wq", "weight", D, False), ("wk", "weight", D, False), ("wv", "weight", D, False)])
        params = dict(QD=QD, DIM=D, SEQ=S, IN_W=b[-1].col1,
                      **_cols(b, COL_DK="dk", COL_DV="dv", COL_WQ="wq", COL_WK="wk", COL_WV="wv"))
        plan["qkvBwd"] = _spec("qkvBwd", b, _taps([("dx", D)]), S, params, blobs, ())
    else:
        plan["qBwd"] = _linear_dx("qBwd", QD, D, S, "dq", "wq", "dxq", "QD", "DIM")
        b = _spatial(KVD, [("dk", "act", S, False), ("dv", "act", S, False),
                           ("wk", "weight", D, False), ("wv", "weight", D, False)])
        params = dict(KVD=KVD, DIM=D, SEQ=S, IN_W=b[-1].col1, **_cols(b, COL_DV="dv", COL_WK="wk", COL_WV="wv"))
        plan["kvBwd"] = _spec("kvBwd", b, _taps([("dxkv", D)]), S, params, blobs, ())
    # every template spells its tensor/const dtype as $DT
    return tuple((n, dataclasses.replace(sp, params=MappingProxyType({**sp.params, "DT": shape.dtype})))
                 for n, sp in plan.items())


def backward_kernels(shape: KernelShape) -> tuple[str, ...]:
    """The backward kernels of one layer, in call order."""
    return _BACKWARD_COMMON + (("qkvBwd",) if shape.is_mha else ("qBwd", "kvBwd"))


def evals_per_layer(shape: KernelShape) -> int:
    """Kernel evaluations per layer per training step (MHA 8, GQA 9; design.md)."""
    return len(FORWARD_KERNELS) + len(backward_kernels(shape))


def render(spec: KernelSpec) -> str:
    """The MIL text of ``spec`` (template filled with its params)."""
    from rustane.mil.render import render as _render

    return _render(spec.template, **spec.params)


def compile_spec(backend, spec: KernelSpec):
    """Render and compile ``spec`` on ``backend`` (a rustane.backends.Backend)."""
    return backend.compile(render(spec), dict(spec.blobs), name=spec.name)


# -- packing (reference quality; the hot path stages through rustane.native) -------------------


def pack_input(
    spec: KernelSpec, arrays: Mapping[str, np.ndarray], out: np.ndarray | None = None, dtype=np.float16
) -> np.ndarray:
    """Pack named arrays into the kernel input ``[C, W]`` (fp16; ``dtype=np.float32`` for a
    simulator with fp32 I/O).

    Each array has its block's ``source_shape`` (weights as ``W [OUT, IN]``, activations
    ``[C, S]``) and is transposed here when the block stages ``Wᵀ``. Without ``out`` every block
    is required and a new array is returned; with ``out`` (e.g. a locked input buffer view) only
    the named blocks are written, so weights can be staged once and activations per micro-step.
    """
    _, c, _, w = spec.in_shape
    known = {b.name for b in spec.blocks}
    unknown = set(arrays) - known
    if unknown:
        raise KeyError(f"{spec.name}: no input block named {sorted(unknown)}; blocks are {[b.name for b in spec.blocks]}")
    if out is None:
        missing = [b.name for b in spec.blocks if b.name not in arrays]
        if missing:
            raise KeyError(f"{spec.name}: missing input arrays {missing} (pass out= to update only some blocks)")
        out = np.empty((c, w), dtype=dtype)
    elif out.shape != (c, w) or out.dtype not in (np.float16, np.float32):
        raise ValueError(f"{spec.name}: out must be an fp16 (or fp32) array of shape {(c, w)}, got {out.dtype} {out.shape}")
    for blk in spec.blocks:
        if blk.name not in arrays:
            continue
        a = np.asarray(arrays[blk.name])
        if a.shape != blk.source_shape:
            how = " (a weight in its natural [OUT, IN] orientation; it is transposed when staged)" if blk.transpose else ""
            raise ValueError(f"{spec.name}: block {blk.name!r} expects shape {blk.source_shape}{how}, got {a.shape}")
        out[blk.c0:blk.c1, blk.col0:blk.col1] = a.T if blk.transpose else a
    return out


def unpack_outputs(spec: KernelSpec, out: np.ndarray) -> dict[str, np.ndarray]:
    """Split the kernel output ``[C_out, S]`` (or ``[1, C_out, 1, S]``) into fp32 taps."""
    _, c, _, s = spec.out_shape
    a = np.asarray(out)
    if a.shape == spec.out_shape:
        a = a.reshape(c, s)
    if a.shape != (c, s):
        raise ValueError(f"{spec.name}: output must be {(c, s)} (or {spec.out_shape}), got {a.shape}")
    return {t.name: a[t.c0:t.c1].astype(np.float32) for t in spec.taps}
