"""The family-neutral description of an imported model: a Hugging Face style config.

Every importer (Hugging Face folder, GGUF, llama2.c) produces an ``Imported`` model: an HF
``config.json`` dict, fp32 tensors under Hugging Face names with q/k rows in HF's rotate_half
order, and the tokenizer. ``ArchSpec`` reads the config once, checks it, and says which tensors
must exist with which shapes, so every importer refuses a bad model the same way.

Families: ``llama`` (Llama 1-3, TinyLlama, SmolLM2; optional ``rope_scaling`` of type
``llama3`` or ``linear``) and ``qwen3`` (per-head RMSNorm on q and k before RoPE; ``head_dim``
is free, so ``n_heads * head_dim`` may differ from ``dim``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from rustane.errors import RustaneError

__all__ = ["FormatError", "ArchSpec", "Imported", "FAMILIES", "rope_inv_freq", "inv_freq", "rope_from_hf"]

FAMILIES = ("llama", "qwen3")
_ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_ROPE_TYPES = ("default", "llama3", "linear")


class FormatError(RustaneError, ValueError):
    """An input model that cannot be imported; the message names the problem and the way out."""


@dataclass
class ArchSpec:
    model_type: str
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    tie_embeddings: bool
    max_position: int
    rope_scaling: dict[str, Any] | None = None
    residual_scale: float = 1.0  # rustane's optional residual scaling (no HF equivalent)

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    # ---- config.json ---------------------------------------------------------------------

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], where: str = "config.json") -> "ArchSpec":
        mt = d.get("model_type")
        if mt not in FAMILIES:
            archs = d.get("architectures")
            raise FormatError(f"{where}: model_type {mt!r}{f' ({archs})' if archs else ''} is not "
                              f"supported; rustane imports the families {list(FAMILIES)} "
                              f"(convert the model to one of them, or open an issue for its family)")
        if d.get("hidden_act", "silu") != "silu":
            raise FormatError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise FormatError(f"{where}: {flag}=true is not supported (the families here have no "
                                  f"biases)")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in d]
        if missing:
            raise FormatError(f"{where}: missing required field(s) {missing}")
        n_heads = int(d["num_attention_heads"])
        rope = rope_from_hf(d, where)
        spec = cls(
            model_type=mt, dim=int(d["hidden_size"]), hidden_dim=int(d["intermediate_size"]),
            n_layers=int(d["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // n_heads),
            vocab_size=int(d["vocab_size"]), norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.pop("rope_theta")),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),  # transformers default
            max_position=int(d.get("max_position_embeddings", 2048)),
            rope_scaling=rope or None)
        if (d.get("rustane") or {}).get("residual_scaling"):
            spec.residual_scale = 1.0 / math.sqrt(2 * spec.n_layers)
        return spec.check(where)

    def check(self, where: str) -> "ArchSpec":
        errs = [f"{k} must be a positive integer, got {getattr(self, k)!r}"
                for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                          "vocab_size", "max_position") if getattr(self, k) <= 0]
        if not errs and self.n_heads % self.n_kv_heads:
            errs.append(f"num_attention_heads {self.n_heads} is not a multiple of "
                        f"num_key_value_heads {self.n_kv_heads}")
        if not errs and self.head_dim % 2:
            errs.append(f"head_dim {self.head_dim} is odd (RoPE rotates pairs)")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1):
            errs.append(f"rope_theta must be a finite number > 1, got {self.rope_theta}")
        if errs:
            raise FormatError(f"{where}: " + "; ".join(errs))
        return self

    def to_hf(self) -> dict[str, Any]:
        """A config.json that transformers loads as this family's own class."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        d = {
            "architectures": [_ARCH_CLASS[self.model_type]],
            "model_type": self.model_type,
            "hidden_size": self.dim, "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_position,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
            # transformers < 5 reads rope_theta + rope_scaling; 5.x reads rope_parameters
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
            "attention_bias": False, "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            d["mlp_bias"] = False
        return d

    # ---- tensors -------------------------------------------------------------------------

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor under its Hugging Face name ([out, in] for linear layers)."""
        D, H, V, QD, KVD = self.dim, self.hidden_dim, self.vocab_size, self.q_dim, self.kv_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (D,),
                p + "self_attn.q_proj.weight": (QD, D), p + "self_attn.k_proj.weight": (KVD, D),
                p + "self_attn.v_proj.weight": (KVD, D), p + "self_attn.o_proj.weight": (D, QD),
                p + "post_attention_layernorm.weight": (D,),
                p + "mlp.gate_proj.weight": (H, D), p + "mlp.up_proj.weight": (H, D),
                p + "mlp.down_proj.weight": (D, H)})
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (self.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (self.head_dim,)
        shapes["model.norm.weight"] = (D,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (V, D)
        return shapes

    def check_tensors(self, tensors: Mapping[str, np.ndarray], where: str) -> None:
        want = self.param_shapes()
        missing = [k for k in want if k not in tensors]
        if missing:
            raise FormatError(f"{where}: missing tensor(s) {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                              f"that a {self.model_type} model with this config needs (is the file "
                              f"complete, and does its config match the weights?)")
        bad = [f"{k} is {tuple(np.shape(tensors[k]))}, config says {want[k]}" for k in want
               if tuple(np.shape(tensors[k])) != want[k]]
        if bad:
            raise FormatError(f"{where}: tensor shape(s) disagree with the config: " + "; ".join(bad[:4])
                              + " (the config and weights come from different models?)")
        extra = [k for k in tensors if k not in want]
        if extra:
            raise FormatError(f"{where}: unexpected tensor(s) {extra[:6]} for a {self.model_type} model "
                              f"(an architecture feature rustane does not implement)")


def rope_from_hf(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"rope_theta": ..., [rope_type + its parameters]}`` from either transformers spelling."""
    rp = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
    theta = rp.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
    rtype = rp.pop("rope_type", None) or rp.pop("type", None) or "default"
    rp.pop("type", None)
    if rtype not in _ROPE_TYPES:
        raise FormatError(f"{where}: rope type {rtype!r} is not supported (supported: {list(_ROPE_TYPES)})")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rtype == "llama3":
        need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if any(k not in rp for k in need):
            raise FormatError(f"{where}: llama3 rope scaling needs {list(need)}, got {sorted(rp)}")
        out.update(rope_type="llama3", **{k: float(rp[k]) for k in need[:3]},
                   original_max_position_embeddings=int(rp[need[3]]))
    elif rtype == "linear":
        out.update(rope_type="linear", factor=float(rp["factor"]))
    return out


def rope_inv_freq(spec: ArchSpec) -> np.ndarray:
    """RoPE angular frequency per rotated pair ``[head_dim/2]`` (float64) of ``spec``."""
    return inv_freq(spec.head_dim, spec.rope_theta, spec.rope_scaling)


def inv_freq(head_dim: int, rope_theta: float, rope_scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """RoPE angular frequency per rotated pair ``[head_dim/2]`` (float64), scaling applied.

    The one definition of the RoPE frequencies: the CPU decoder, the training kernels' cos/sin
    tables and the CPU RoPE backward all take them from here. ``rope_scaling`` is the
    ``rope_from_hf`` form without ``rope_theta`` (None or {} for plain RoPE).

    llama3 scaling (Llama 3.1/3.2): wavelengths longer than ``original_max / low_freq_factor``
    are slowed by ``factor``, those shorter than ``original_max / high_freq_factor`` kept, and
    the band between blended linearly in ``original_max / wavelength``.
    """
    hd = head_dim
    inv = 1.0 / rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    rs = rope_scaling or {}
    if rs.get("rope_type") == "linear":
        return inv / rs["factor"]
    if rs.get("rope_type") == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        blend = np.clip((ctx / wavelen - lo) / (hi - lo), 0.0, 1.0)
        # blend 0 (long waves) -> inv/factor, blend 1 (short waves) -> inv
        return inv / factor * (1 - blend) + inv * blend
    return inv


@dataclass
class Imported:
    """A model read from outside: HF config, fp32 HF-named tensors (rotate_half q/k order),
    tokenizer (a ``tokenizers`` JSON string or None) and tokenizer settings (chat template,
    special tokens) in ``tokenizer_config.json`` form."""

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tokenizer_json: str | None = None
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    spec: ArchSpec = field(init=False)

    def __post_init__(self) -> None:
        self.spec = ArchSpec.from_hf(self.config, where=self.source or "config")
        if self.spec.tie_embeddings:
            self.tensors.pop("lm_head.weight", None)  # some exports store the tied head too
        self.spec.check_tensors(self.tensors, self.source or "weights")

    def tokenizer(self):
        """The ``tokenizers.Tokenizer``, or None when the source carried none."""
        if self.tokenizer_json is None:
            return None
        from tokenizers import Tokenizer
        return Tokenizer.from_str(self.tokenizer_json)

    @property
    def eos_ids(self) -> list[int]:
        """Token ids that end generation (from the tokenizer settings)."""
        ids = self.tokenizer_config.get("eos_token_ids")
        if ids:
            return [int(i) for i in ids]
        tok = self.tokenizer()
        name = self.tokenizer_config.get("eos_token")
        if isinstance(name, dict):
            name = name.get("content")
        if tok is not None and name:
            i = tok.token_to_id(name)
            return [] if i is None else [i]
        return []
