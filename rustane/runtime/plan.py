"""The vocabulary of a kernel plan, for any model family: blocks, taps, kernel specs.

A model family's plan (``rustane.models.<family>.plan``) says for every kernel which template it
renders with which placeholder values, how its single input ``[1, C, 1, W]`` is packed
(:class:`Block`), which taps its single output ``[1, C_out, 1, S]`` carries (:class:`Tap`) and
which BLOBFILE consts it needs. The runtime packs and unpacks through these descriptions and never
computes an offset by hand (docs/design.md, "Kernel plan").

Packing rules (binding, design.md):

- weight-bearing kernels pack along the spatial axis: every block has all C channels and the
  blocks sit side by side in columns (activations first, then staged weights);
- weight-free kernels stack blocks along channels, every block S columns wide;
- taps are concatenated along channels in the listed order.

Weights are described in their natural orientation ``W [OUT, IN]``; ``Block.transpose`` says the
kernel stages ``Wᵀ`` instead of ``W``, and ``Block.param`` names the parameter (within a layer) a
weight block carries, so the runtime stages weights without knowing the family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import numpy as np

from rustane.mil.blob import blob_key


@dataclass(frozen=True)
class Block:
    """One region of a kernel input ``[C, W]``: channels ``[c0, c1)``, columns ``[col0, col1)``.

    ``kind`` is ``"act"`` (rewritten every micro-step) or ``"weight"`` (staged after each optimizer
    step from the layer's parameter ``param``). The array handed to :func:`pack_input` has shape
    :attr:`source_shape`; it is stored transposed when ``transpose`` is true.
    """

    name: str
    kind: str
    c0: int
    c1: int
    col0: int
    col1: int
    transpose: bool = False
    param: str | None = None

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
    template: str  # file stem in template_dir
    params: Mapping[str, str]  # placeholder -> text
    in_shape: tuple[int, int, int, int]  # (1, C, 1, W)
    out_shape: tuple[int, int, int, int]  # (1, C_out, 1, S)
    blocks: tuple[Block, ...]
    taps: tuple[Tap, ...]
    blobs: Mapping[str, bytes] = field(default_factory=dict)  # blob_key(name) -> blob file
    template_dir: Path | None = None  # the family's templates folder
    #: the forward kernels keep one output buffer per layer: their taps are read in the backward
    per_layer_output: bool = False

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

    @property
    def weight_blocks(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.kind == "weight")


# -- layout builders (a family's plan composes these) -----------------------------------------


def spatial(channels: int, items) -> tuple[Block, ...]:
    """Blocks side by side along columns, all ``channels`` tall: (name, kind, width, transpose[,
    param])."""
    out, col = [], 0
    for name, kind, width, tr, *param in items:
        out.append(Block(name, kind, 0, channels, col, col + width, tr, *param))
        col += width
    return tuple(out)


def stacked(seq: int, items: list[tuple[str, int]]) -> tuple[Block, ...]:
    """Activation blocks stacked along channels, all ``seq`` wide: (name, channels)."""
    out, ch = [], 0
    for name, c in items:
        out.append(Block(name, "act", ch, ch + c, 0, seq, False))
        ch += c
    return tuple(out)


def taps(items: list[tuple[str, int]]) -> tuple[Tap, ...]:
    out, ch = [], 0
    for name, c in items:
        out.append(Tap(name, ch, ch + c))
        ch += c
    return tuple(out)


def make_spec(name, blocks, tap_list, seq, params, blobs, blob_names, *, template=None, template_dir=None,
              per_layer_output=False) -> KernelSpec:
    in_c = max(b.c1 for b in blocks)
    in_w = max(b.col1 for b in blocks)
    return KernelSpec(
        name=name,
        template=template or name,
        params=MappingProxyType({k: str(v) for k, v in params.items()}),
        in_shape=(1, in_c, 1, in_w),
        out_shape=(1, tap_list[-1].c1, 1, seq),
        blocks=blocks,
        taps=tap_list,
        blobs=MappingProxyType({blob_key(n): blobs[blob_key(n)] for n in blob_names}),
        template_dir=template_dir,
        per_layer_output=per_layer_output,
    )


def columns(blocks: tuple[Block, ...], **names: str) -> dict[str, int]:
    """Placeholder -> first column of a block, e.g. COL_WQ='wq'."""
    by = {b.name: b for b in blocks}
    return {ph: by[n].col0 for ph, n in names.items()}


def channels(blocks: tuple[Block, ...], **names: str) -> dict[str, int]:
    """Placeholder -> first channel of a block, e.g. CH_K='k_rope'."""
    by = {b.name: b for b in blocks}
    return {ph: by[n].c0 for ph, n in names.items()}


def fp16_literal(x: float) -> str:
    """Text for an ``fp16(...)`` MIL const holding ``x`` rounded to fp16 (exact decimal)."""
    v = np.float16(x)
    if not np.isfinite(v) or (x != 0 and v == 0):
        raise ValueError(f"{x!r} is not representable as a finite non-zero fp16 constant")
    return repr(float(v))


def fp32_literal(x: float) -> str:
    """Text for an ``fp32(...)`` MIL const holding ``x`` rounded to fp32."""
    return repr(float(np.float32(x)))


# -- rendering and compiling --------------------------------------------------------------------


def render(spec: KernelSpec) -> str:
    """The MIL text of ``spec`` (its template, comments stripped, filled with its params)."""
    from rustane.mil.render import render as render_template

    return render_template(spec.template, template_dir=spec.template_dir, **spec.params)


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
