"""A small PyTorch Llama written from the math (not transformers, not rustane's kernels): the
autograd reference of the whole-model gradient tests and the PyTorch eager baseline of
``python -m rustane.bench train``. Needs torch (``pip install '.[test]'``).

It takes OUR parameter dict (Hugging Face names, q/k rows in the interleaved-pair RoPE
convention, see rustane/checkpoint.py) and token ids, and computes:

    x = E[tokens]
    per layer:  xn = rmsnorm(x, w_att);  q, k, v = Wq xn, Wk xn, Wv xn
                q, k = rope(q), rope(k)            interleaved pairs (2i, 2i+1), angle pos·θ^(−2i/HD)
                attn = softmax(q kᵀ/√HD + causal) v   q-head h uses kv-head h // (NH/NKV)
                x = x + α·Wo attn
                x2n = rmsnorm(x, w_ffn);  x = x + α·W2(silu(W1 x2n) ⊙ W3 x2n)
    logits = (E or lm_head) · rmsnorm(x, w_final);  loss = mean cross-entropy

with α = cfg.residual_alpha (1 unless residual scaling is on).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from rustane.config import ModelConfig


def params_to_torch(params: Mapping[str, np.ndarray], *, dtype=torch.float64,
                    requires_grad: bool = True) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(np.asarray(v), dtype=dtype, requires_grad=requires_grad)
            for k, v in params.items()}


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, heads, S, HD] -> rotated, interleaved pairs."""
    B, NH, S, HD = x.shape
    i = torch.arange(HD // 2, dtype=torch.float64)
    ang = torch.arange(S, dtype=torch.float64)[:, None] * theta ** (-2.0 * i / HD)[None, :]
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).reshape(B, NH, S, HD)


def forward(params: Mapping[str, torch.Tensor], cfg: ModelConfig, tokens, targets=None):
    """tokens [S] or [B, S] -> (mean CE loss or None, logits [B, S, V])."""
    tok = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    if tok.ndim == 1:
        tok = tok[None]
    B, S = tok.shape
    NH, NKV, HD = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    R, a = NH // NKV, cfg.residual_alpha
    E = params["model.embed_tokens.weight"]
    x = E[tok]  # [B, S, D]
    mask = torch.full((S, S), float("-inf"), dtype=x.dtype).triu(1)
    for l in range(cfg.n_layers):
        p = f"model.layers.{l}."
        xn = rmsnorm(x, params[p + "input_layernorm.weight"], cfg.norm_eps)
        q = (xn @ params[p + "self_attn.q_proj.weight"].T).view(B, S, NH, HD).transpose(1, 2)
        k = (xn @ params[p + "self_attn.k_proj.weight"].T).view(B, S, NKV, HD).transpose(1, 2)
        v = (xn @ params[p + "self_attn.v_proj.weight"].T).view(B, S, NKV, HD).transpose(1, 2)
        q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
        k, v = k.repeat_interleave(R, dim=1), v.repeat_interleave(R, dim=1)  # head h -> h // R
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HD) + mask, dim=-1) @ v
        att = att.transpose(1, 2).reshape(B, S, NH * HD)
        x = x + a * (att @ params[p + "self_attn.o_proj.weight"].T)
        x2n = rmsnorm(x, params[p + "post_attention_layernorm.weight"], cfg.norm_eps)
        h1 = x2n @ params[p + "mlp.gate_proj.weight"].T
        h3 = x2n @ params[p + "mlp.up_proj.weight"].T
        x = x + a * ((torch.nn.functional.silu(h1) * h3) @ params[p + "mlp.down_proj.weight"].T)
    xf = rmsnorm(x, params["model.norm.weight"], cfg.norm_eps)
    head = E if cfg.tie_embeddings else params["lm_head.weight"]
    logits = xf @ head.T
    loss = None
    if targets is not None:
        tg = torch.as_tensor(np.asarray(targets), dtype=torch.long).reshape(B, S)
        loss = torch.nn.functional.cross_entropy(logits.reshape(B * S, -1), tg.reshape(-1))
    return loss, logits


def init_params(cfg: ModelConfig, seed: int = 0, *, norm_jitter: float = 0.0) -> dict[str, np.ndarray]:
    """Random fp32 parameters for tests (normal(0, 0.02) matrices, norms 1 + jitter)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in cfg.param_shapes().items():
        if len(shape) == 1:
            out[name] = (1.0 + norm_jitter * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return out
