"""One Llama training step over the fused kernels (docs/design.md, "One training step").

The math of a step, written against the runtime (``rustane.runtime.Model``: its kernel set, its
workspace and its dW queue): CPU work — RMSNorm, RoPE backward, the classifier, cross-entropy,
embeddings — runs in C (``rustane.cpu_ops``); every weight gradient is an sgemm on the dW queue
that overlaps the next kernel evaluations. Parameter names come from ``params``; which kernel
carries which weight is the plan's business (``plan.py``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from rustane import cpu_ops
from rustane.models.llama import params as P


@dataclass
class Saved:
    """What one layer's backward needs from its forward (all fp32 ``[C, S]`` / ``[S]``)."""

    x: np.ndarray
    xn: np.ndarray
    rrms_att: np.ndarray  # 1/rms of x, from the attention RMSNorm
    x2: np.ndarray
    x2n: np.ndarray
    rrms_ffn: np.ndarray  # 1/rms of x2, from the FFN RMSNorm


class LlamaStep:
    """Forward, backward and logits of one Llama model on a runtime ``rt``."""

    def __init__(self, rt):
        # a proxy: the runtime owns this step, and a cycle would leave a dropped model (its
        # buffers, its queue) to the cyclic collector instead of freeing it at once
        self.rt = weakref.proxy(rt)
        cfg = self.cfg = rt.cfg
        self.ks = rt.kernels_set
        self.head_name = P.head_name(cfg)
        self.is_mha = cfg.is_mha
        self._layer_params = P.by_layer(rt.params, cfg.n_layers)
        self._layer_grads = P.by_layer(rt.grads, cfg.n_layers)
        # the embedding scatter-add runs on this thread while the dW queue may be writing the
        # classifier's dE: with tied weights they accumulate apart and meet after the wait
        g_embed = rt.grads.get(P.EMBED)
        self._g_embed_in = (np.zeros_like(g_embed) if cfg.tie_embeddings and g_embed is not None else g_embed)
        #: LoRA adapters being trained (``rustane.lora_train.LoraTrainer``), or None
        self.lora = None
        self._scratch: dict = {}  # gradients of frozen vectors, computed on the way and dropped

    def layer_param(self, layer: int, name: str) -> np.ndarray | None:
        return self._layer_params[layer].get(name)

    def release_frozen(self, layer: int, trainable) -> list[str]:
        """Forget this layer's frozen matrices (the kernels hold them); returns their full names."""
        pre, lp = P.layer_prefix(layer), self._layer_params[layer]
        names = [k for k, v in lp.items() if v.ndim == 2 and pre + k not in trainable]
        for k in names:
            del lp[k]
        return [pre + k for k in names]

    def grad_of(self, layer: int | None, name: str, like: np.ndarray) -> np.ndarray:
        """The gradient accumulator of a vector parameter, or a scratch one when it is frozen."""
        g = self.rt.grads.get(name) if layer is None else self._layer_grads[layer].get(name)
        if g is None:
            g = self._scratch.get(like.shape)
            if g is None:
                g = self._scratch[like.shape] = np.zeros_like(like)
        return g

    def weight_grad(self, layer: int, name: str, dy: np.ndarray, x: np.ndarray) -> np.ndarray | None:
        """Queue the gradient of ``W·x`` (``y`` = its output, ``dy`` its gradient): ``dW += dy·xᵀ``
        when W trains; the adapters' gradients when it carries one (returning their share of dx,
        which the frozen W's kernel does not include); nothing when it is frozen."""
        if self.lora is not None and self.lora.has(layer, name):
            return self.lora.backward(layer, name, dy, x)
        g = self._layer_grads[layer].get(name)
        if g is not None:
            self.rt.dw(g, dy, x)
        return None

    def first_trained_layer(self) -> int:
        """The lowest layer whose backward feeds a gradient: 0 when the embedding trains, else
        the lowest layer with a trained parameter or an adapter (``n_layers`` if none)."""
        if self._g_embed_in is not None:
            return 0
        for layer in range(self.cfg.n_layers):
            if self._layer_grads[layer] or (self.lora is not None and self.lora.in_layer(layer)):
                return layer
        return self.cfg.n_layers

    def layer_grad(self, layer: int, name: str) -> np.ndarray:
        return self._layer_grads[layer][name]

    # ---- gradients the step keeps apart ---------------------------------------------------------

    def fold_gradients(self) -> None:
        """After the dW queue drained: add the embedding-input gradient to the (tied) embedding's."""
        if self._g_embed_in is not None and self._g_embed_in is not self.rt.grads[P.EMBED]:
            self.rt.grads[P.EMBED] += self._g_embed_in
            self._g_embed_in.fill(0)

    def zero_gradients(self) -> None:
        if self._g_embed_in is not None and self._g_embed_in is not self.rt.grads[P.EMBED]:
            self._g_embed_in.fill(0)

    # ---- forward ---------------------------------------------------------------------------------

    def forward_layers(self, tokens: np.ndarray, keep: bool) -> tuple[np.ndarray, list[Saved | None]]:
        """With a workspace ring (LoRA) nothing is kept: the backward reads x and x2 again from
        the forward kernels' per-layer outputs and recomputes the norms (``saved_again``), so the
        forward's fp32 arrays are one set for all layers."""
        cfg, ks, buf, cpu = self.cfg, self.ks, self.rt.ws.get, self.rt.timer.phase("cpu")
        D, S = cfg.dim, cfg.seq_len
        ring = self.rt.ws.ring is not None
        with cpu:
            x = cpu_ops.embedding_forward(self.rt.params[P.EMBED], tokens, out=buf("x0", (D, S)))  # [D, S]
        saved: list[Saved | None] = []
        for layer in range(cfg.n_layers):
            w = self._layer_params[layer]
            at = "fwd" if ring else layer  # the workspace key of this layer's arrays
            with cpu:
                xn, r1 = cpu_ops.rmsnorm_forward(x, w[P.ATTN_NORM], cfg.norm_eps,
                                                 out=buf(("xn", at), (D, S)), rrms=buf(("r1", at), (S,)))
            ks.stage("sdpaFwd", layer, xn=xn, x=x)
            ks.eval("sdpaFwd", layer)
            (x2,) = ks.read("sdpaFwd", layer, "x2", slot="fwd") if ring else ks.read("sdpaFwd", layer, "x2")
            with cpu:
                x2n, r2 = cpu_ops.rmsnorm_forward(x2, w[P.FFN_NORM], cfg.norm_eps,
                                                  out=buf(("x2n", at), (D, S)), rrms=buf(("r2", at), (S,)))
            ks.stage("ffnFused", layer, x2n=x2n, x2=x2)
            ks.eval("ffnFused", layer)
            if keep:
                saved.append(None if ring else Saved(x, xn, r1, x2, x2n, r2))
            (x,) = (ks.read("ffnFused", layer, "x_next", slot="fwd") if ring
                    else ks.read("ffnFused", layer, "x_next"))
        return x, saved

    def saved_again(self, layer: int, slot) -> Saved:
        """What ``forward_layers`` would have kept for ``layer``, rebuilt in its backward slot:
        x and x2 read again from the kernels' outputs (the same values: those buffers are not
        written until the next forward) and the norms recomputed by the same function on the
        same inputs, so the backward sees the same bits."""
        cfg, ks, buf = self.cfg, self.ks, self.rt.ws.get
        D, S = cfg.dim, cfg.seq_len
        w = self._layer_params[layer]
        if layer == 0:
            x = buf("x0", (D, S))
        else:
            (x,) = ks.read("ffnFused", layer - 1, "x_next", slot=slot)
        (x2,) = ks.read("sdpaFwd", layer, "x2", slot=slot)
        with self.rt.timer.phase("cpu"):
            xn, r1 = cpu_ops.rmsnorm_forward(x, w[P.ATTN_NORM], cfg.norm_eps,
                                             out=buf(("xn", ("slot", slot)), (D, S)), rrms=buf(("r1", ("slot", slot)), (S,)))
            x2n, r2 = cpu_ops.rmsnorm_forward(x2, w[P.FFN_NORM], cfg.norm_eps, out=buf(("x2n", ("slot", slot)), (D, S)),
                                              rrms=buf(("r2", ("slot", slot)), (S,)))
        return Saved(x, xn, r1, x2, x2n, r2)

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Forward only: logits ``[V, S]`` (fp32)."""
        x, _ = self.forward_layers(tokens, keep=False)
        xf, _ = cpu_ops.rmsnorm_forward(x, self.rt.params[P.FINAL_NORM], self.cfg.norm_eps)
        return self.rt.params[self.head_name] @ xf

    # ---- one micro-step ----------------------------------------------------------------------------

    def forward_backward(self, tokens: np.ndarray, targets: np.ndarray, loss_scale: float,
                         weights: np.ndarray | None = None) -> float:
        """``weights`` (per position, e.g. a loss mask over the step's loss-token count): the
        loss is ``Σ weights·CE`` instead of the mean CE."""
        rt, cfg = self.rt, self.cfg
        D, S, V = cfg.dim, cfg.seq_len, cfg.vocab_size
        buf, threads, params, grads = rt.ws.get, rt.threads, rt.params, rt.grads
        alpha = np.float32(cfg.residual_alpha)
        x, saved = self.forward_layers(tokens, keep=True)

        # head: final norm, classifier, full-vocabulary cross-entropy (all CPU, fp32)
        with rt.timer.phase("cpu"):
            w_head = params[self.head_name]
            xf, rf = cpu_ops.rmsnorm_forward(x, params[P.FINAL_NORM], cfg.norm_eps,
                                             out=buf("xf", (D, S)), rrms=buf("rf", (S,)))
            # no dW of this micro-step is queued yet, so the classifier and the CE may use every core
            # (CE: positions over up to 4 threads, the same bits for any count)
            logits = threads.matmul_rows(w_head, xf, out=buf("logits", (V, S)))  # [V, S]
            if weights is None:
                loss, dlogits = cpu_ops.cross_entropy(logits, targets, grad_scale=loss_scale, dlogits=logits,
                                                      threads=cpu_ops.optimizer_threads())
            else:
                loss, dlogits = cpu_ops.cross_entropy_weighted(logits, targets, weights, grad_scale=loss_scale,
                                                               dlogits=logits, threads=cpu_ops.optimizer_threads())
            # dx before the classifier's dW is queued: on the simulator the second core is still free
            # for it then, and the queue absorbs the dW while the layers' backward runs
            dxf = threads.matmul_rows(w_head.T, dlogits, out=buf("dxf", (D, S)))
            if self.head_name in grads:
                rt.dw(grads[self.head_name], dlogits, xf)
            dy = cpu_ops.rmsnorm_backward(dxf, x, params[P.FINAL_NORM], rf,
                                          self.grad_of(None, P.FINAL_NORM, params[P.FINAL_NORM]), dx=dxf)

        # below the lowest layer with something to train, the backward computes nothing that is
        # used: stop there (LoRA or full fine-tuning of the last N blocks, frozen embedding)
        for layer in reversed(range(self.first_trained_layer(), cfg.n_layers)):
            dy = self.backward_layer(layer, saved[layer], dy, alpha)

        if self._g_embed_in is not None:
            with rt.timer.phase("cpu"):
                cpu_ops.embedding_backward(dy, tokens, self._g_embed_in)
        return loss

    def qk_backward(self, layer: int, dq_rope: np.ndarray, dk_rope: np.ndarray,
                    slot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Gradients of the rotated q/k -> of the projections Wq·xn, Wk·xn (in place): the RoPE
        backward. A variant that transforms q/k between projection and RoPE extends this (its
        taps read into the layer's backward ``slot``, ``Workspace.backward_slot``)."""
        cfg = self.cfg
        with self.rt.timer.phase("cpu"):
            # scaled RoPE: the frequencies the kernels' cos/sin tables were built from
            inv = cfg.inv_freq if cfg.rope_scaling is not None else None
            dq = cpu_ops.rope_backward(dq_rope, cfg.n_heads, cfg.head_dim, cfg.rope_theta, inv_freq=inv, out=dq_rope)
            dk = cpu_ops.rope_backward(dk_rope, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta, inv_freq=inv,
                                       out=dk_rope)
        return dq, dk

    def backward_layer(self, layer: int, s: Saved | None, dy: np.ndarray, alpha: np.float32) -> np.ndarray:
        """dy = dL/d(layer output) -> dL/d(layer input); queues this layer's dW sgemms."""
        cfg, ks, rt = self.cfg, self.ks, self.rt
        buf, dw, cpu = rt.ws.get, self.weight_grad, rt.timer.phase("cpu")
        w = self._layer_params[layer]
        # this layer's backward arrays: its own, or a ring slot shared with other layers (LoRA)
        slot = rt.ws.backward_slot(layer, cfg.n_layers, rt._wait_queue)
        if s is None:
            s = self.saved_again(layer, slot)

        # FFN: x_next = x2 + α·W2·(silu(W1·x2n) ⊙ W3·x2n)
        df = np.multiply(dy, alpha, out=buf(("df", slot), dy.shape)) if alpha != 1 else dy
        ks.stage("ffnBwdW2t", layer, df=df)
        ks.eval("ffnBwdW2t", layer)
        ks.copy("ffnBwdW13t", layer, (("ffnBwdW2t", 0, "dgate", "dgate"),
                                      ("ffnFused", layer, "h1", "h1"), ("ffnFused", layer, "h3", "h3")))
        (gate,) = ks.read("ffnFused", layer, "gate", slot=slot)
        extra = dw(layer, P.W2, df, gate)
        if extra is not None:  # the adapter's share of d(gate): the kernel multiplied by W2 only
            # read into layer 0's arrays: used here and now only (the dW queue never holds them)
            (dgate,) = ks.read("ffnBwdW2t", 0, "dgate")
            dgate += extra
            ks.stage("ffnBwdW13t", layer, dgate=dgate)
        ks.eval("ffnBwdW13t", layer)
        dx2n, dh1, dh3 = ks.read("ffnBwdW13t", layer, "dx2n", "dh1", "dh3", slot=slot)
        for name, d in ((P.W1, dh1), (P.W3, dh3)):
            extra = dw(layer, name, d, s.x2n)
            if extra is not None:
                dx2n += extra
        with cpu:
            dx2 = cpu_ops.rmsnorm_backward(dx2n, s.x2, w[P.FFN_NORM], s.rrms_ffn,
                                           self.grad_of(layer, P.FFN_NORM, w[P.FFN_NORM]), dx=dx2n)
            dx2 += dy

        # attention: x2 = x + α·Wo·attn(rope(Wq·xn), rope(Wk·xn), Wv·xn)
        # nothing writes dx2 after this point
        dx2s = np.multiply(dx2, alpha, out=buf(("dx2s", slot), dx2.shape)) if alpha != 1 else dx2
        ks.stage("wotBwd", layer, dx2s=dx2s)
        ks.eval("wotBwd", layer)
        (attn,) = ks.read("sdpaFwd", layer, "attn", slot=slot)
        extra = dw(layer, P.WO, dx2s, attn)
        ks.copy("sdpaBwd1", 0, (("sdpaFwd", layer, "q_rope", "q_rope"), ("sdpaFwd", layer, "k_rope", "k_rope"),
                                ("sdpaFwd", layer, "v", "v"), ("wotBwd", 0, "da", "da")))
        if extra is not None:  # the adapter's share of d(attn)
            (da,) = ks.read("wotBwd", 0, "da")
            da += extra
            ks.stage("sdpaBwd1", 0, da=da)
        ks.eval("sdpaBwd1", layer)
        ks.copy("sdpaBwd2", 0, (("sdpaBwd1", 0, "P", "P"), ("sdpaBwd1", 0, "dP", "dP"),
                                ("sdpaFwd", layer, "q_rope", "q_rope"), ("sdpaFwd", layer, "k_rope", "k_rope")))
        ks.eval("sdpaBwd2", layer)
        (dv,) = ks.read("sdpaBwd1", layer, "dv", slot=slot)
        dq_r, dk_r = ks.read("sdpaBwd2", layer, "dq_rope", "dk_rope", slot=slot)
        dq, dk = self.qk_backward(layer, dq_r, dk_r, slot)
        extras = [e for e in (dw(layer, P.WQ, dq, s.xn), dw(layer, P.WK, dk, s.xn), dw(layer, P.WV, dv, s.xn))
                  if e is not None]
        if self.is_mha:
            ks.stage("qkvBwd", layer, dq=dq, dk=dk, dv=dv)
            ks.eval("qkvBwd", layer)
            (dxa,) = ks.read("qkvBwd", layer, "dx", slot=slot)
        else:
            ks.stage("qBwd", layer, dq=dq)
            ks.eval("qBwd", layer)
            ks.stage("kvBwd", layer, dk=dk, dv=dv)
            ks.eval("kvBwd", layer)
            (dxa,) = ks.read("qBwd", layer, "dxq", slot=slot)
            (dxkv,) = ks.read("kvBwd", layer, "dxkv", slot=slot)
            dxa += dxkv
        for e in extras:
            dxa += e
        with cpu:
            dx = cpu_ops.rmsnorm_backward(dxa, s.x, w[P.ATTN_NORM], s.rrms_att,
                                          self.grad_of(layer, P.ATTN_NORM, w[P.ATTN_NORM]), dx=dxa)
            dx += dx2
        return dx
