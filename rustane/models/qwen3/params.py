"""Qwen3's parameters: Llama's plus ``self_attn.{q,k}_norm.weight [head_dim]`` per layer.

The norm weights index a head's channels, so they follow the q/k rows into our interleaved-pair
RoPE order (``rustane.models.llama.params.permute_for_hf``) at the Hugging Face boundary.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from rustane.models.llama import params as llama
from rustane.models.llama.params import init_params, layer_prefix  # noqa: F401  (Llama's, norms = 1)

Q_NORM, K_NORM = "self_attn.q_norm.weight", "self_attn.k_norm.weight"


def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
    shapes = llama.param_shapes(cfg)
    for i in range(cfg.n_layers):
        shapes[layer_prefix(i) + Q_NORM] = (cfg.head_dim,)
        shapes[layer_prefix(i) + K_NORM] = (cfg.head_dim,)
    return shapes


def _head_vector(name: str, v: np.ndarray, move) -> np.ndarray:
    a = np.ascontiguousarray(v, dtype=np.float32)
    return move(a.reshape(-1, 1), 1).reshape(-1) if name.endswith((Q_NORM, K_NORM)) else a


def to_hf_params(params: Mapping[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    out = llama.to_hf_params(params, cfg)
    return {k: _head_vector(k, v, llama.permute_for_hf) for k, v in out.items()}


def from_hf_params(tensors: Mapping[str, np.ndarray], cfg) -> dict[str, np.ndarray]:
    out = llama.from_hf_params(tensors, cfg)
    return {k: _head_vector(k, v, llama.unpermute_from_hf) for k, v in out.items()}
