"""LoRA adapters in PEFT's on-disk format, and merging them into a model's weights.

A LoRA adapter on a linear layer ``W [out, in]`` is ``A [r, in]`` and ``B [out, r]``; the adapted
layer computes ``(W + s·B·A)·x`` with ``s = lora_alpha / r`` (PEFT's ``scaling``). PEFT writes

- ``adapter_config.json``: ``peft_type`` "LORA", ``task_type`` "CAUSAL_LM", ``r``,
  ``lora_alpha``, ``target_modules`` (module names such as ``q_proj``), ``layers_to_transform``
  (the adapted blocks, or null for all), ``lora_dropout``, ``bias`` "none", ...;
- ``adapter_model.safetensors``: for a transformers causal LM, tensors named
  ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` ``[r, in]`` and
  ``...lora_B.weight`` ``[out, r]`` (PEFT saves without its adapter name).

Inside rustane, adapter tensors live in the model family's conventions (for Llama/Qwen3, q/k
projection rows in interleaved RoPE order), so ``B`` of ``q_proj``/``k_proj`` has its rows moved
at this boundary exactly like the weight it adapts (``to_hf_params``); ``A`` acts on the input
side, which has no such order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from rustane.errors import RustaneError
from rustane.models.llama import params as P

__all__ = ["TARGETS", "LoraConfig", "AdapterError", "peft_name", "save_adapter", "load_adapter",
           "merge_into", "init_adapters", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
#: module name (PEFT ``target_modules``) -> the weight's name below the layer prefix
TARGETS = {"q_proj": P.WQ, "k_proj": P.WK, "v_proj": P.WV, "o_proj": P.WO,
           "gate_proj": P.W1, "up_proj": P.W3, "down_proj": P.W2}


class AdapterError(RustaneError, ValueError):
    """A bad or mismatched adapter (the message names the file and the fix)."""


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    layers: tuple[int, ...] | None = None  # adapted blocks; None = all

    def __post_init__(self):
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise AdapterError(f"--lora-targets: unknown {bad or 'empty list'}; choose from {', '.join(TARGETS)}")
        if self.rank < 1:
            raise AdapterError(f"--lora-rank must be >= 1, got {self.rank}")
        if self.layers is not None:
            self.layers = tuple(sorted(int(i) for i in self.layers))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def layer_ids(self, n_layers: int) -> list[int]:
        ids = list(range(n_layers)) if self.layers is None else list(self.layers)
        bad = [i for i in ids if not 0 <= i < n_layers]
        if bad:
            raise AdapterError(f"adapter layers {bad} are outside the model's {n_layers} layers")
        return ids

    def to_peft(self, base: str | None = None) -> dict:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                "target_modules": list(self.targets), "layers_to_transform": None if self.layers is None else list(self.layers),
                "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
                "base_model_name_or_path": base, "revision": None}

    @classmethod
    def from_peft(cls, d: Mapping, where: str = ADAPTER_CONFIG) -> "LoraConfig":
        if d.get("peft_type") != "LORA":
            raise AdapterError(f"{where}: peft_type {d.get('peft_type')!r} is not LORA")
        unsupported = [k for k, bad in (("use_dora", True), ("use_rslora", True), ("fan_in_fan_out", True))
                       if d.get(k) == bad]
        if d.get("bias", "none") != "none":
            unsupported.append(f"bias={d['bias']}")
        if d.get("rank_pattern") or d.get("alpha_pattern"):
            unsupported.append("rank_pattern/alpha_pattern")
        if unsupported:
            raise AdapterError(f"{where}: adapter options rustane does not implement: {', '.join(unsupported)}")
        tm = d.get("target_modules")
        if isinstance(tm, str):
            raise AdapterError(f"{where}: target_modules as a regex is not supported; list the module names")
        layers = d.get("layers_to_transform")
        if isinstance(layers, int):
            layers = [layers]
        return cls(rank=int(d["r"]), alpha=float(d["lora_alpha"]), targets=tuple(tm or ()),
                   layers=None if layers is None else tuple(layers))


def peft_name(layer: int, module: str, which: str) -> str:
    """PEFT's tensor name of an adapter matrix (``which`` is "A" or "B")."""
    w = TARGETS[module]
    return f"base_model.model.{P.layer_prefix(layer)}{w[:-len('.weight')]}.lora_{which}.weight"


def _weight_name(layer: int, module: str) -> str:
    return P.layer_prefix(layer) + TARGETS[module]


def init_adapters(cfg, lcfg: LoraConfig, seed: int = 0) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """PEFT's default initialisation: ``A`` Kaiming-uniform (bound ``1/sqrt(in)``, what
    ``kaiming_uniform_(a=sqrt(5))`` gives), ``B`` zero, so the adapted model starts as the base."""
    rng = np.random.Generator(np.random.PCG64([seed, 0x10AA]))
    shapes = P.layer_shapes(cfg)
    out = {}
    for layer in lcfg.layer_ids(cfg.n_layers):
        for m in lcfg.targets:
            o, i = shapes[TARGETS[m]]
            bound = 1.0 / np.sqrt(i)
            a = rng.uniform(-bound, bound, size=(lcfg.rank, i)).astype(np.float32)
            out[(layer, m)] = (a, np.zeros((o, lcfg.rank), dtype=np.float32))
    return out


def _b_to_hf(cfg, layer: int, module: str, b: np.ndarray) -> np.ndarray:
    from rustane import checkpoint
    name = _weight_name(layer, module)
    return checkpoint.to_hf_params({name: b}, cfg)[name]


def _b_from_hf(cfg, layer: int, module: str, b: np.ndarray) -> np.ndarray:
    from rustane import checkpoint
    name = _weight_name(layer, module)
    return checkpoint.from_hf_params({name: b}, cfg)[name]


def save_adapter(path: str | os.PathLike, cfg, lcfg: LoraConfig, adapters, base: str | None = None,
                 extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write a PEFT adapter folder atomically (a temp folder renamed into place)."""
    from safetensors.numpy import save_file

    from rustane.checkpoint import atomic_dir

    tensors = {}
    for (layer, m), (a, b) in adapters.items():
        tensors[peft_name(layer, m, "A")] = np.ascontiguousarray(a, dtype=np.float32)
        tensors[peft_name(layer, m, "B")] = np.ascontiguousarray(_b_to_hf(cfg, layer, m, b), dtype=np.float32)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(lcfg.to_peft(base), indent=2), encoding="utf-8")
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
    return Path(path)


def load_adapter(path: str | os.PathLike, cfg) -> tuple[LoraConfig, dict]:
    """Read a PEFT adapter folder for a model of config ``cfg`` (shapes checked, names too)."""
    from safetensors.numpy import load_file

    d = Path(path)
    if not (d / ADAPTER_CONFIG).is_file() or not (d / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{d}: not an adapter folder (needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        lcfg = LoraConfig.from_peft(json.loads((d / ADAPTER_CONFIG).read_text(encoding="utf-8")), str(d / ADAPTER_CONFIG))
        raw = load_file(str(d / ADAPTER_WEIGHTS))
    except (KeyError, ValueError, OSError) as exc:
        if isinstance(exc, AdapterError):
            raise
        raise AdapterError(f"{d}: unreadable adapter ({exc})") from exc
    # PEFT may save with the adapter name in the key (".lora_A.default.weight"); accept both
    raw = {k.replace(".default.weight", ".weight"): v for k, v in raw.items()}
    shapes = P.layer_shapes(cfg)
    adapters, used = {}, set()
    for layer in lcfg.layer_ids(cfg.n_layers):
        for m in lcfg.targets:
            na, nb = peft_name(layer, m, "A"), peft_name(layer, m, "B")
            if na not in raw or nb not in raw:
                raise AdapterError(f"{d / ADAPTER_WEIGHTS}: missing {na if na not in raw else nb}")
            a, b = raw[na].astype(np.float32), raw[nb].astype(np.float32)
            o, i = shapes[TARGETS[m]]
            if a.shape != (lcfg.rank, i) or b.shape != (o, lcfg.rank):
                raise AdapterError(f"{d / ADAPTER_WEIGHTS}: {m} of layer {layer} has A {a.shape}, B {b.shape}; "
                                   f"this model needs A {(lcfg.rank, i)}, B {(o, lcfg.rank)} (adapter made for "
                                   f"another model?)")
            adapters[(layer, m)] = (np.ascontiguousarray(a), _b_from_hf(cfg, layer, m, b))
            used |= {na, nb}
    extra = sorted(set(raw) - used)
    if extra:
        raise AdapterError(f"{d / ADAPTER_WEIGHTS}: tensors not described by its config: {extra[:3]}")
    return lcfg, adapters


def merge_into(params: dict[str, np.ndarray], lcfg: LoraConfig, adapters) -> dict[str, np.ndarray]:
    """``W + s·B·A`` for every adapted weight of a parameter dict in rustane's conventions (in place)."""
    s = np.float32(lcfg.scale)
    for (layer, m), (a, b) in adapters.items():
        name = _weight_name(layer, m)
        w = params[name]
        params[name] = (w + (s * b) @ a).astype(np.float32)
    return params
