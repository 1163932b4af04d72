"""Llama parameters: names and shapes (Hugging Face Llama names), initialisation, and the q/k row
permutation between our RoPE convention and Hugging Face's.

In memory, parameters are fp32 master weights in a dict keyed by HF names, but with q/k rows in
OUR RoPE convention (interleaved pairs, as llama2.c); checkpoints store HF's rotate_half order, so
``to_hf_params``/``from_hf_params`` permute at that boundary.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
    from rustane.models.llama.config import ModelConfig

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
FINAL_NORM = "model.norm.weight"
#: names of one layer's parameters below ``layer_prefix(i)``
ATTN_NORM = "input_layernorm.weight"
FFN_NORM = "post_attention_layernorm.weight"
WQ, WK, WV, WO = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight")
W1, W3, W2 = "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"  # gate, up, down
_QK = re.compile(r"^model\.layers\.\d+\.self_attn\.(q|k)_proj\.weight$")


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def head_name(cfg: ModelConfig) -> str:
    """The classifier's weight: the embedding itself when tied."""
    return EMBED if cfg.tie_embeddings else HEAD


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """One layer's parameters, name below the layer prefix -> shape ([out, in] for linear layers)."""
    D, H, QD, KVD = cfg.dim, cfg.hidden_dim, cfg.q_dim, cfg.kv_dim
    return {WQ: (QD, D), WK: (KVD, D), WV: (KVD, D), WO: (D, QD), W1: (H, D), W3: (H, D), W2: (D, H),
            ATTN_NORM: (D,), FFN_NORM: (D,)}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter, HF Llama name -> shape ([out, in] for linear layers)."""
    shapes: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, cfg.dim)}
    per_layer = layer_shapes(cfg)
    for i in range(cfg.n_layers):
        p = layer_prefix(i)
        shapes.update({p + k: s for k, s in per_layer.items()})
    shapes[FINAL_NORM] = (cfg.dim,)
    if not cfg.tie_embeddings:
        shapes[HEAD] = (cfg.vocab_size, cfg.dim)
    return shapes


def init_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh fp32 weights: N(0, 0.02) matrices and embedding, output projections (o_proj,
    down_proj) further scaled by 1/sqrt(2·n_layers) as in GPT-2, norm weights 1."""
    rng = np.random.Generator(np.random.PCG64(seed))
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    params = {}
    for name, shape in cfg.param_shapes().items():
        if name.endswith("norm.weight"):
            params[name] = np.ones(shape, dtype=np.float32)
            continue
        std = 0.02 * (out_scale if name.endswith((WO, W2)) else 1.0)
        params[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(np.float32)
    return params


def by_layer(tensors: Mapping[str, np.ndarray], n_layers: int) -> list[dict[str, np.ndarray]]:
    """Per-layer views of a parameter (or gradient) dict keyed by the name below the layer prefix:
    the step looks them up dozens of times per layer, and formatting full names each time showed
    up in the orchestration time."""
    out = []
    for layer in range(n_layers):
        pre = layer_prefix(layer)
        out.append({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    return out


# ---- RoPE convention permutation ------------------------------------------------------------

def permute_for_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection ``[n_heads·HD, IN]`` from interleaved pairs to rotate_half.

    Ours pairs rows ``(2i, 2i+1)`` of a head; HF pairs ``(i, i + HD/2)``. So HF row ``i`` is our
    row ``2i`` and HF row ``i + HD/2`` is our row ``2i + 1``.
    """
    rows, cols = w.shape
    hd = rows // n_heads
    if rows % n_heads or hd % 2:
        raise ValueError(f"permute_for_hf: {rows} rows do not split into {n_heads} heads of even size")
    return np.ascontiguousarray(w.reshape(n_heads, hd // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols))


def unpermute_from_hf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of ``permute_for_hf``."""
    rows, cols = w.shape
    hd = rows // n_heads
    if rows % n_heads or hd % 2:
        raise ValueError(f"unpermute_from_hf: {rows} rows do not split into {n_heads} heads of even size")
    return np.ascontiguousarray(w.reshape(n_heads, 2, hd // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols))


def _heads_for(name: str, cfg: ModelConfig) -> int:
    return cfg.n_heads if ".q_proj." in name else cfg.n_kv_heads


def to_hf_params(params: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameter dict -> HF tensors (q/k rows permuted, fp32, contiguous)."""
    out = {}
    for k, v in params.items():
        a = np.ascontiguousarray(v, dtype=np.float32)
        out[k] = permute_for_hf(a, _heads_for(k, cfg)) if _QK.match(k) else a
    return out


def from_hf_params(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensors -> our parameter dict (q/k rows un-permuted, fp32)."""
    out = {}
    for k, v in tensors.items():
        a = np.ascontiguousarray(v, dtype=np.float32)
        out[k] = unpermute_from_hf(a, _heads_for(k, cfg)) if _QK.match(k) else a
    return out
