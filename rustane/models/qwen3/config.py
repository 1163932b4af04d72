"""Qwen3's configuration: a Llama configuration whose family adds a per-head q/k RMSNorm.

Qwen3 (Hugging Face ``Qwen3ForCausalLM``) is Llama's block plus an RMSNorm over each head's
``head_dim`` channels of q and of k, between the projections and RoPE, with weights
``self_attn.{q,k}_norm.weight [head_dim]``; its ``head_dim`` need not be ``dim / n_heads`` (0.6B:
16 heads of 128 over dim 1024). Every field means what it means for Llama.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from rustane.models.errors import ConfigError
from rustane.models.llama.config import PRESETS as LLAMA_PRESETS
from rustane.models.llama.config import ModelConfig as LlamaConfig


@dataclass
class ModelConfig(LlamaConfig):
    model_type: ClassVar[str] = "qwen3"

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        from rustane.models.qwen3.params import param_shapes

        return param_shapes(self)

    def to_hf_dict(self, *, allow_residual_scaling: bool = False) -> dict[str, Any]:
        """A ``Qwen3Config``-compatible config.json dict."""
        d = super().to_hf_dict(allow_residual_scaling=allow_residual_scaling)
        d.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", use_sliding_window=False,
                 max_window_layers=self.n_layers)
        return d

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        if d.get("model_type") != "qwen3":
            raise ConfigError(f"config.json: model_type {d.get('model_type')!r} is not qwen3")
        if d.get("use_sliding_window"):
            raise ConfigError("config.json: use_sliding_window=true unsupported (full causal attention only)")
        base = LlamaConfig.from_hf_dict({**d, "model_type": "llama"})
        return cls(**base.to_dict()).validate()


#: Qwen3-0.6B's shape (tied embeddings, head_dim 128 over dim 1024), trained at seq 256
PRESETS: dict[str, dict[str, Any]] = {"qwen3-0.6b": dict(LLAMA_PRESETS["qwen3-0.6b"])}


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown qwen3 preset {name!r}; choose one of {list(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
