"""Llama model configuration: the ``ModelConfig`` dataclass, presets, and Hugging Face config.json I/O.

A config fully determines the parameter shapes (HF Llama names, see ``param_shapes``) and the
kernel shapes (``rustane.models.llama.plan.KernelShape.of``, the same dimension names).
``validate()`` is called by every constructor path here and gives errors that name the field and
the fix; :func:`dimension_errors` is the one check of the dimensions both classes share.

Presets (``PRESETS``, ``preset(name)``):

- ``tiny``: dim 128, hidden 256, 2 layers, 4 heads / 2 kv heads (exercises GQA), head_dim 32,
  seq 192, vocab 512 (the built-in corpus tokenizer). Small enough to show a falling loss on the
  simulator on 2 CPU cores within a couple of minutes, and inside every ANE rule: its smallest
  kernel tensor (a dim x seq fp16 output) is exactly the 49,152-byte minimum (docs/ane-rules.md).
- ``stories15m`` / ``stories42m`` / ``stories110m``: llama2.c TinyStories shapes, vocab 32000,
  tied embeddings, theta 1e4, eps 1e-5, seq 256. (llama2.c trained stories42m at seq 1024; 256 is
  used here so all three share the ANE kernel width and memory stays small; override seq_len
  to reproduce 1024.)
- ``smollm2-135m``: 30 layers, 576, 1536, 9 heads / 3 kv, theta 1e5, vocab 49152, tied.
- ``qwen3-0.6b``: the Qwen3-0.6B shape only (28 L, 1024, 3072, 16 / 8 kv, head_dim 128,
  vocab 151936, theta 1e6) without QK-norm, so it is a Llama with Qwen3's sizes, not Qwen3.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from rustane.formats.arch import FormatError, inv_freq, rope_from_hf
from rustane.models.errors import ConfigError

__all__ = ["ModelConfig", "ConfigError", "PRESETS", "preset", "preset_names", "HeadDims", "dimension_errors"]

#: the dimensions the kernels depend on; ``ModelConfig`` and ``KernelShape`` spell them alike
KERNEL_DIMS = ("dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "seq_len")


def dimension_errors(d) -> list[str]:
    """Every problem with the kernel dimensions of ``d`` (any object with the KERNEL_DIMS fields
    and ``rope_theta``), each naming the field and the fix."""
    errs: list[str] = []
    for name in KERNEL_DIMS:
        v = getattr(d, name)
        if isinstance(v, bool) or not isinstance(v, int):
            errs.append(f"{name}: must be an integer, got {v!r}")
        elif v <= 0:
            errs.append(f"{name}: must be > 0, got {v}")
    if errs:
        return errs
    if d.n_heads % d.n_kv_heads:
        errs.append(f"n_heads: {d.n_heads} is not divisible by n_kv_heads {d.n_kv_heads} "
                    f"(GQA needs an integer group size; pick n_kv_heads from the divisors "
                    f"of n_heads: {_divisors(d.n_heads)})")
    if d.head_dim % 2:
        errs.append(f"head_dim: {d.head_dim} is odd, but RoPE rotates channel pairs; use an "
                    f"even head_dim (dim={d.dim}, n_heads={d.n_heads})")
    if not (isinstance(d.rope_theta, (int, float)) and not isinstance(d.rope_theta, bool)
            and math.isfinite(d.rope_theta) and d.rope_theta > 1):
        errs.append(f"rope_theta: must be a finite number > 1, got {d.rope_theta!r}")
    return errs


class HeadDims:
    """Dimensions derived from the head counts, shared by ``ModelConfig`` and ``KernelShape``."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def gqa_ratio(self) -> int:
        """q-heads per kv-head; q-head h uses kv-head h // gqa_ratio."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_mha(self) -> bool:
        return self.n_heads == self.n_kv_heads


@dataclass
class ModelConfig(HeadDims):
    #: the family (``rustane.models.<model_type>``) that builds, trains and saves this config
    model_type: ClassVar[str] = "llama"

    dim: int = 96
    hidden_dim: int = 256
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 512
    seq_len: int = 64
    head_dim: int | None = None  # None -> dim // n_heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    residual_scaling: bool = False
    #: RoPE frequency scaling as sorted ``(key, value)`` pairs (hashable), in the form
    #: ``rustane.formats.arch.rope_from_hf`` reads (rope_type llama3 or linear + its parameters),
    #: or None for plain RoPE. A dict given here is converted; None is left out of ``to_dict`` so
    #: every config without scaling keeps its hash and checkpoints.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, Mapping):
            self.rope_scaling = tuple(sorted(self.rope_scaling.items()))
        elif isinstance(self.rope_scaling, list):
            self.rope_scaling = tuple(tuple(kv) for kv in self.rope_scaling)
        if self.head_dim is None and isinstance(self.dim, int) and isinstance(self.n_heads, int) \
                and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads

    # ---- validation ----
    def validate(self) -> "ModelConfig":
        """Raise ``ConfigError`` listing every problem; returns self for chaining."""
        errs: list[str] = []
        for name in ("n_layers", "vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                errs.append(f"{name}: must be an integer, got {v!r}")
            elif v <= 0:
                errs.append(f"{name}: must be > 0, got {v}")
        errs += dimension_errors(self)
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            errs.append(f"norm_eps: must be in (0, 1), got {self.norm_eps!r}")
        for name in ("tie_embeddings", "residual_scaling"):
            if not isinstance(getattr(self, name), bool):
                errs.append(f"{name}: must be true or false, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            try:
                if dict(rope_from_hf({"rope_scaling": self.rope_scaling_dict}, "rope_scaling")) \
                        != {"rope_theta": 10000.0, **self.rope_scaling_dict}:
                    raise FormatError(f"rope_scaling: {self.rope_scaling_dict!r} has unknown keys "
                                      "(llama3: factor, low_freq_factor, high_freq_factor, "
                                      "original_max_position_embeddings; linear: factor)")
            except (FormatError, KeyError, TypeError, ValueError) as exc:
                errs.append(f"rope_scaling: {exc}")
        if errs:
            raise ConfigError("invalid model config:\n  " + "\n  ".join(errs))
        return self

    # ---- derived ----
    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @property
    def inv_freq(self) -> "np.ndarray":
        """RoPE frequency per rotated pair ``[head_dim/2]`` float64, scaling applied."""
        return inv_freq(self.head_dim, self.rope_theta, self.rope_scaling_dict)

    @property
    def residual_alpha(self) -> float:
        return 1.0 / math.sqrt(2 * self.n_layers) if self.residual_scaling else 1.0

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every parameter, HF Llama name -> shape ([out, in] for linear layers)."""
        from rustane.models.llama.params import param_shapes

        return param_shapes(self)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())

    # ---- dict / hash ----
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope_scaling_dict
        if d["rope_scaling"] is None:
            del d["rope_scaling"]  # plain RoPE: the dict (and config_hash) predating rope_scaling
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**dict(d)).validate()

    def config_hash(self) -> str:
        """Short stable hash of the architecture (checkpoint compatibility check)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def diff(self, other: "ModelConfig") -> list[str]:
        """Fields that differ, as ``'name: self_value vs other_value'`` strings."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with fields changed (head_dim re-derived unless given)."""
        d = {"rope_scaling": None, **self.to_dict()}
        if ("dim" in changes or "n_heads" in changes) and "head_dim" not in changes \
                and d["head_dim"] == d["dim"] // d["n_heads"]:
            d["head_dim"] = None
        d.update(changes)
        return type(self).from_dict(d)

    # ---- Hugging Face config.json ----
    def to_hf_dict(self, *, allow_residual_scaling: bool = False) -> dict[str, Any]:
        """A ``LlamaConfig``-compatible config.json dict (transformers 4.x and 5.x).

        transformers' Llama has no residual scaling, so a model trained with it would load but
        compute something else. That raises unless ``allow_residual_scaling`` (then it warns);
        the flag is recorded under ``"rustane"`` either way.
        """
        self.validate()
        if self.residual_scaling:
            msg = ("residual_scaling=True: Hugging Face LlamaForCausalLM has no residual scaling "
                   f"(alpha={self.residual_alpha:.4f} on each branch), so transformers will load "
                   "this checkpoint but cannot reproduce its outputs")
            if not allow_residual_scaling:
                raise ConfigError(msg + "; pass allow_residual_scaling=True to export anyway")
            warnings.warn(msg, stacklevel=2)
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.seq_len,
            # transformers < 5 reads rope_theta; 5.x reads rope_parameters (and maps rope_theta).
            "rope_theta": float(self.rope_theta),
            "rope_parameters": {"rope_type": "default", "rope_theta": float(self.rope_theta),
                                **(self.rope_scaling_dict or {})},
            **({"rope_scaling": self.rope_scaling_dict} if self.rope_scaling is not None else {}),
            "rms_norm_eps": float(self.norm_eps),
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
            "rustane": {"residual_scaling": self.residual_scaling, "seq_len": self.seq_len},
        }

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """Read a Llama-style config.json dict (ours or a Hugging Face one)."""
        mt = d.get("model_type", "llama")
        if mt not in ("llama", "mistral", "qwen2", "smollm"):
            raise ConfigError(f"config.json: model_type {mt!r} is not a Llama-family model")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act {d['hidden_act']!r} unsupported (only silu)")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ConfigError(f"config.json: {flag}=true unsupported (rustane has no biases)")
        try:
            rope = rope_from_hf(d, "config.json")
        except FormatError as exc:
            raise ConfigError(str(exc)) from None
        except KeyError as exc:
            raise ConfigError(f"config.json: rope scaling is missing {exc}") from None
        theta = rope.pop("rope_theta")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "vocab_size") if k not in d]
        if missing:
            raise ConfigError(f"config.json: missing required field(s) {missing}")
        extra = d.get("rustane", {}) or {}
        n_heads = d["num_attention_heads"]
        return cls(
            dim=d["hidden_size"],
            hidden_dim=d["intermediate_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            vocab_size=d["vocab_size"],
            seq_len=extra.get("seq_len", d.get("max_position_embeddings", 256)),
            rope_theta=float(theta),
            norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
            residual_scaling=bool(extra.get("residual_scaling", False)),
            rope_scaling=rope or None,
        ).validate()


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _stories(dim: int, hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return dict(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=heads,
                vocab_size=32000, seq_len=256, rope_theta=10000.0, norm_eps=1e-5,
                tie_embeddings=True)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=128, hidden_dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                 seq_len=192, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True),
    "stories15m": _stories(288, 768, 6, 6),
    "stories42m": _stories(512, 1376, 8, 8),
    "stories110m": _stories(768, 2048, 12, 12),
    "smollm2-135m": dict(dim=576, hidden_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, vocab_size=49152, seq_len=256, rope_theta=100000.0,
                         norm_eps=1e-5, tie_embeddings=True),
    "qwen3-0.6b": dict(dim=1024, hidden_dim=3072, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, vocab_size=151936, seq_len=256, rope_theta=1000000.0,
                       norm_eps=1e-6, tie_embeddings=True),
}


def preset_names() -> list[str]:
    return list(PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A preset config, with optional field overrides (e.g. ``seq_len=128``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {preset_names()}")
    d = {**PRESETS[name], **overrides}
    return ModelConfig.from_dict(d)
