"""Text generation on the CPU with a KV cache: the prompt is run once (prefill), then one
position per new token, each reading the cached keys and values of all earlier positions.

Plain numpy in fp32: every matrix product is one BLAS call, which releases the GIL, so a
decoder can run beside other Python threads. q/k/v and gate/up are fused into one weight each
so a decode step costs one matrix-vector product per projection group. Covers the families of
``rustane.formats`` (Llama with default/linear/llama3 RoPE, SmolLM2, Qwen3's per-head q/k
RMSNorm) and rustane's own residual scaling. RoPE pairs channels ``(i, i + head_dim/2)``, the
Hugging Face order every importer hands out.

    from rustane.formats import load_model
    dec = KVCacheDecoder.from_imported(load_model("model.gguf"))
    gen = dec.generate(ids, max_tokens=50, temperature=0)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from rustane.formats.arch import ArchSpec, Imported, rope_inv_freq
from rustane.sampling import Sampler

__all__ = ["KVCacheDecoder", "Generation"]


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop: str = "max_tokens"  # "eos" | "max_tokens"

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens after the first (the first comes from the prefill)."""
        n = len(self.tokens) - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


class _Layer:
    __slots__ = ("attn_norm", "wqkv", "q_norm", "k_norm", "wo", "ffn_norm", "wgu", "wdown", "k", "v")


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    ms = np.einsum("...i,...i->...", x, x) / np.float32(x.shape[-1])
    return x * (1.0 / np.sqrt(ms + np.float32(eps)))[..., None] * w


class KVCacheDecoder:
    def __init__(self, spec: ArchSpec, tensors: Mapping[str, np.ndarray], context: int | None = None):
        """``tensors``: HF names, rotate_half q/k order (what ``rustane.formats`` returns).
        ``context``: most positions kept; a longer generation re-runs the newest half."""
        self.spec = spec
        self.context = int(context or spec.max_position)
        f32 = lambda n: np.ascontiguousarray(tensors[n], dtype=np.float32)  # noqa: E731
        self.embed = f32("model.embed_tokens.weight")
        self.head = self.embed if spec.tie_embeddings else f32("lm_head.weight")
        self.final_norm = f32("model.norm.weight")
        self.layers: list[_Layer] = []
        for i in range(spec.n_layers):
            p = f"model.layers.{i}."
            L = _Layer()
            L.attn_norm = f32(p + "input_layernorm.weight")
            L.wqkv = np.ascontiguousarray(np.concatenate(
                [f32(p + f"self_attn.{n}_proj.weight") for n in "qkv"], axis=0))
            L.wo = f32(p + "self_attn.o_proj.weight")
            L.q_norm = f32(p + "self_attn.q_norm.weight") if spec.qk_norm else None
            L.k_norm = f32(p + "self_attn.k_norm.weight") if spec.qk_norm else None
            L.ffn_norm = f32(p + "post_attention_layernorm.weight")
            L.wgu = np.ascontiguousarray(np.concatenate(
                [f32(p + "mlp.gate_proj.weight"), f32(p + "mlp.up_proj.weight")], axis=0))
            L.wdown = f32(p + "mlp.down_proj.weight")
            self.layers.append(L)
        self.inv_freq = rope_inv_freq(spec)
        self.length = 0
        self._alloc(min(self.context, 256))

    @classmethod
    def from_imported(cls, model: Imported, context: int | None = None) -> "KVCacheDecoder":
        return cls(model.spec, model.tensors, context)

    # ---- cache ---------------------------------------------------------------------------

    def _alloc(self, capacity: int) -> None:
        s = self.spec
        for L in self.layers:
            k = np.zeros((s.n_kv_heads, capacity, s.head_dim), np.float32)
            v = np.zeros_like(k)
            if self.length and getattr(L, "k", None) is not None:
                k[:, :self.length] = L.k[:, :self.length]
                v[:, :self.length] = L.v[:, :self.length]
            L.k, L.v = k, v
        self.capacity = capacity

    def reset(self) -> None:
        self.length = 0

    # ---- forward -------------------------------------------------------------------------

    def _rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Rotate ``x [T, heads, hd]`` at positions ``pos [T]`` (pairs i, i + hd/2)."""
        ang = (pos[:, None].astype(np.float64) * self.inv_freq[None, :]).astype(np.float32)
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``ids`` to the cached sequence; logits ``[vocab]`` of the last position (or
        ``[T, vocab]`` for all new positions with ``all_logits``)."""
        s = self.spec
        ids = np.asarray(ids, dtype=np.int64).ravel()
        T, start = ids.size, self.length
        if T == 0:
            raise ValueError("forward: no tokens")
        if np.any(ids < 0) or np.any(ids >= s.vocab_size):
            raise ValueError(f"forward: token ids must be in [0, {s.vocab_size})")
        if start + T > self.capacity:
            self._alloc(max(start + T, min(2 * self.capacity, max(self.context, start + T))))
        pos = np.arange(start, start + T)
        nh, nkv, hd, g = s.n_heads, s.n_kv_heads, s.head_dim, s.n_heads // s.n_kv_heads
        qd, kvd = s.q_dim, s.kv_dim
        end = start + T
        scale = np.float32(1.0 / np.sqrt(hd))
        alpha = np.float32(s.residual_scale)
        x = self.embed[ids]
        mask = None
        if T > 1:  # causal: new position t sees cached positions and new positions <= t
            mask = np.where(np.arange(end)[None, :] > pos[:, None], -np.inf, 0).astype(np.float32)
        for L in self.layers:
            xn = _rms_norm(x, L.attn_norm, s.norm_eps)
            qkv = xn @ L.wqkv.T
            q = qkv[:, :qd].reshape(T, nh, hd)
            k = qkv[:, qd:qd + kvd].reshape(T, nkv, hd)
            if L.q_norm is not None:
                q = _rms_norm(q, L.q_norm, s.norm_eps)
                k = _rms_norm(k, L.k_norm, s.norm_eps)
            q = self._rope(q, pos)
            L.k[:, start:end] = self._rope(k, pos).transpose(1, 0, 2)
            L.v[:, start:end] = qkv[:, qd + kvd:].reshape(T, nkv, hd).transpose(1, 0, 2)
            # [kv head, group, T, hd] x [kv head, 1, hd, end] -> scores [kv, g, T, end]
            qg = q.reshape(T, nkv, g, hd).transpose(1, 2, 0, 3)
            att = (qg * scale) @ L.k[:, None, :end].transpose(0, 1, 3, 2)
            if mask is not None:
                att += mask
            att -= att.max(axis=-1, keepdims=True)
            np.exp(att, out=att)
            att /= att.sum(axis=-1, keepdims=True)
            o = (att @ L.v[:, None, :end]).transpose(2, 0, 1, 3).reshape(T, qd)
            x = x + alpha * (o @ L.wo.T) if alpha != 1 else x + o @ L.wo.T
            xn = _rms_norm(x, L.ffn_norm, s.norm_eps)
            gu = xn @ L.wgu.T
            gate, up = gu[:, :s.hidden_dim], gu[:, s.hidden_dim:]
            h = gate / (1.0 + np.exp(-gate)) * up
            x = x + alpha * (h @ L.wdown.T) if alpha != 1 else x + h @ L.wdown.T
        self.length = end
        xn = _rms_norm(x if all_logits else x[-1:], self.final_norm, s.norm_eps)
        logits = xn @ self.head.T
        return logits if all_logits else logits[0]

    # ---- generation ----------------------------------------------------------------------

    def generate(self, prompt: Sequence[int], max_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None) -> Generation:
        """Prefill ``prompt`` once, then sample up to ``max_tokens`` tokens one position at a
        time, stopping after a token in ``stop_ids``. When the sequence reaches ``context``
        positions the newest half is re-prefilled (a sliding window)."""
        sampler = Sampler(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("generate: the prompt must hold at least one token")
        gen = Generation(prompt_tokens=len(ids))
        if max_tokens <= 0:
            return gen
        stops = set(int(i) for i in stop_ids)
        self.reset()
        t0 = time.perf_counter()
        logits = self.forward(ids[-self.context:])
        gen.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        while True:
            nxt = sampler(logits)
            gen.tokens.append(nxt)
            ids.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if nxt in stops:
                gen.stop = "eos"
                break
            if len(gen.tokens) >= max_tokens:
                break
            if self.length >= self.context:
                self.reset()
                logits = self.forward(ids[-max(1, self.context // 2):])
            else:
                logits = self.forward([nxt])
        gen.decode_seconds = time.perf_counter() - t0
        return gen
