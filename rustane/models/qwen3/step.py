"""Qwen3's step: Llama's, plus the backward of the per-head q/k RMSNorm on the CPU.

The forward norm runs inside ``sdpaFwd``. Backward, after the RoPE backward gives the gradients
of the normalised q/k, each head's RMSNorm is undone on the CPU between the attention kernels and
the q/k dx kernels: the head's channels are laid out as rows of a ``[head_dim, heads·S]`` array,
so the C RMSNorm (which reduces over rows per column) is exactly the per-head norm, and its
weight gradient sums over heads and positions.
"""

from __future__ import annotations

import numpy as np

from rustane import cpu_ops
from rustane.models.llama.step import LlamaStep
from rustane.models.qwen3.params import K_NORM, Q_NORM


class Qwen3Step(LlamaStep):
    def qk_backward(self, layer: int, dq_rope: np.ndarray, dk_rope: np.ndarray,
                    slot: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        dqn, dkn = super().qk_backward(layer, dq_rope, dk_rope, slot)  # gradients of the normalised q, k
        q_pre, k_pre = self.ks.read("sdpaFwd", layer, "q_pre", "k_pre", slot=slot)
        w = self._layer_params[layer]
        gq, gk = self.grad_of(layer, Q_NORM, w[Q_NORM]), self.grad_of(layer, K_NORM, w[K_NORM])
        with self.rt.timer.phase("cpu"):
            # the norm's scratch arrays are used within this call only: one set for all layers
            self._head_norm_backward(("q",), dqn, q_pre, w[Q_NORM], gq, self.cfg.n_heads)
            self._head_norm_backward(("k",), dkn, k_pre, w[K_NORM], gk, self.cfg.n_kv_heads)
        return dqn, dkn

    def _head_norm_backward(self, key, dy: np.ndarray, x: np.ndarray, w: np.ndarray, dw: np.ndarray,
                            heads: int) -> None:
        """``dy [heads·HD, S]`` (in place) from the gradient of ``rmsnorm_per_head(x)·w`` to that of x."""
        hd, s = self.cfg.head_dim, self.cfg.seq_len
        buf = self.rt.ws.get
        xt = buf(key + ("x",), (hd, heads * s))
        dyt = buf(key + ("dy",), (hd, heads * s))
        # [heads, HD, S] -> [HD, heads, S]: a head's channels become the rows the C norm reduces over
        np.copyto(xt.reshape(hd, heads, s), x.reshape(heads, hd, s).transpose(1, 0, 2))
        np.copyto(dyt.reshape(hd, heads, s), dy.reshape(heads, hd, s).transpose(1, 0, 2))
        _, rrms = cpu_ops.rmsnorm_forward(xt, w, self.cfg.norm_eps, out=buf(key + ("n",), (hd, heads * s)),
                                          rrms=buf(key + ("r",), (heads * s,)))
        cpu_ops.rmsnorm_backward(dyt, xt, w, rrms, dw, dx=dyt)
        np.copyto(dy.reshape(heads, hd, s), dyt.reshape(hd, heads, s).transpose(1, 0, 2))
