"""Training LoRA adapters over the fused kernels of a frozen model.

Where the weights live (docs/finetune.md, "LoRA on the kernels"). Every linear weight is staged
twice: a forward copy (``sdpaFwd``/``ffnFused``) and a backward copy (the dx kernels). With
adapters,

- the backward copies hold the frozen base ``W`` and are never written again: they are the
  base's only storage, in the precision the kernels compute in (no fp32 master is kept);
- the forward copies of adapted weights hold ``W + s·B·A``, re-staged after each update from
  the backward copy with one ``[out, r] x [r, in]`` sgemm and one pass over the weight;
- the backward kernels therefore give ``Wᵀ·dy``; the adapter's share of dx, ``s·Aᵀ·(Bᵀ·dy)``,
  is added on the CPU (``r`` is small: ``2·r·(in+out)·S`` FLOPs per adapted weight).

Gradients (``y = W·x + s·B·A·x``): with ``u = s·Bᵀ·dy`` and ``v = s·A·x`` (both ``[r, S]``),
``dB = dy·vᵀ`` and ``dA = u·xᵀ``; both are queued on the dW queue like any weight gradient. The
frozen weight's own ``dW`` is never computed. The optimizer holds moments for A and B only.
"""

from __future__ import annotations

import numpy as np

from rustane.lora import TARGETS, LoraConfig, peft_name
from rustane.runtime.kernel_set import put

__all__ = ["LoraTrainer"]


class LoraTrainer:
    """The trained adapters of one ``rustane.runtime.Model`` (attached to its step)."""

    def __init__(self, model, lcfg: LoraConfig, adapters: dict):
        self.model = model
        self.lcfg = lcfg
        self.s = np.float32(lcfg.scale)
        self.adapters = adapters  # (layer, module) -> (A [r, in], B [out, r]), fp32
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self._by_weight: dict[tuple[int, str], tuple] = {}
        for (layer, m), (a, b) in adapters.items():
            ga, gb = np.zeros_like(a), np.zeros_like(b)
            ka, kb = peft_name(layer, m, "A"), peft_name(layer, m, "B")
            self.params[ka], self.params[kb] = a, b
            self.grads[ka], self.grads[kb] = ga, gb
            self._by_weight[(layer, TARGETS[m])] = (a, b, ga, gb)
        self._layers = frozenset(layer for (layer, _) in adapters)
        self._base, self._fwd = self._find_blocks()
        self._tmp: dict[tuple[int, int], np.ndarray] = {}
        model.math.lora = self
        self.restage()

    def _find_blocks(self):
        """Per adapted weight: the backward block holding the base, the forward blocks to merge into."""
        plan = self.model.kernels_set.plan
        base, fwd = {}, {}
        for wname in {w for (_, w) in self._by_weight}:
            for kname, spec in plan.items():
                for b in spec.weight_blocks:
                    if b.param != wname:
                        continue
                    if spec.per_layer_output:  # a forward kernel (its taps feed the backward)
                        fwd.setdefault(wname, []).append((kname, b))
                    else:
                        base.setdefault(wname, (kname, b))
            if wname not in base or wname not in fwd:
                raise RuntimeError(f"LoRA: the kernel plan has no forward and backward copy of {wname}")
        return base, fwd

    # ---- staging ------------------------------------------------------------------------------

    def restage(self) -> None:
        """Write ``W + s·B·A`` into the forward copies of every adapted weight."""
        ks = self.model.kernels_set
        for (layer, wname), (a, b, _, _) in self._by_weight.items():
            kname, blk = self._base[wname]
            shape = (b.shape[0], a.shape[1])
            tmp = self._tmp.get(shape)
            if tmp is None:
                tmp = self._tmp[shape] = np.empty(shape, dtype=np.float32)
            np.matmul(b * self.s, a, out=tmp)
            with ks.inb[kname][layer].lock(readonly=True) as view:
                w = view[blk.c0:blk.c1, blk.col0:blk.col1]
                tmp += w.T if blk.transpose else w
            for fk, fb in self._fwd[wname]:
                with ks.inb[fk][layer].lock() as view:
                    put(view, tmp, fb)

    # ---- backward -----------------------------------------------------------------------------

    def backward(self, layer: int, wname: str, dy: np.ndarray, x: np.ndarray) -> np.ndarray | None:
        """For an adapted weight: queue dA, dB and return the adapter's dx share ``s·Aᵀ·Bᵀ·dy``
        ``[in, S]``; None for a weight without an adapter. ``dy``, ``x`` stay unchanged until
        the queue is waited on (the step's contract for every dW)."""
        ent = self._by_weight.get((layer, wname))
        if ent is None:
            return None
        a, b, ga, gb = ent
        # an fp16 overflow (inf in dy) reaches the gradients as inf/NaN, and the loss scaler
        # skips that update: no warning for it
        with np.errstate(invalid="ignore", over="ignore"):
            u = b.T @ dy
            u *= self.s
        v = a @ x
        v *= self.s
        self.model.dw(gb, dy, v)
        self.model.dw(ga, u, x)
        with np.errstate(invalid="ignore", over="ignore"):
            return a.T @ u

    def has(self, layer: int, wname: str) -> bool:
        return (layer, wname) in self._by_weight

    def in_layer(self, layer: int) -> bool:
        """Some weight of ``layer`` carries an adapter."""
        return layer in self._layers

    # ---- one update ---------------------------------------------------------------------------

    def zero_grads(self) -> None:
        for g in self.grads.values():
            g.fill(0)

    def optimizer_step(self, optimizer, scaler, lr: float, *, max_norm: float | None = 1.0, accum: int = 1):
        """Like ``Model.optimizer_step``, over the adapters; re-stages the merged forward weights."""
        from rustane.optim import apply_update

        self.model.finish_gradients()
        with self.model.timer.phase("optimizer"):
            info = apply_update(optimizer, self.grads, scaler, lr, max_norm=max_norm, accum=accum, zero_grads=True)
            if info.applied:
                self.restage()
            else:
                self.zero_grads()
        return info

    def base_bytes(self) -> int:
        """Bytes of staged weight buffers (the frozen base's storage, both copies)."""
        ks = self.model.kernels_set
        total = 0
        for kname, spec in ks.plan.items():
            n = sum((b.c1 - b.c0) * (b.col1 - b.col0) for b in spec.weight_blocks)
            total += n * len(ks.inb[kname]) * (2 if self.model.shape.dtype == "fp16" else 4)
        return total
