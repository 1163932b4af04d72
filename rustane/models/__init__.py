"""Model families, found by name: ``rustane.models.<model_type>`` is the package of a family.

A family package exports ``ModelConfig`` (whose ``model_type`` class attribute is the package's
name), ``kernel_shape``, ``plan_for``, ``param_shapes``, ``init_params``, ``to_hf_params`` /
``from_hf_params``, ``evals_per_layer``, ``flops_per_sequence``, ``Step`` (the CPU math of a
training step against ``rustane.runtime.Model``) and ``HF_MODEL_TYPES``. Adding a family is
adding a sibling package; nothing here or in the runtime names one.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any, Mapping

from rustane.models.errors import ConfigError


def names() -> list[str]:
    """Every family package under ``rustane.models``."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def family(name: str) -> ModuleType:
    if name not in names():
        raise ValueError(f"unknown model family {name!r}; known: {names()}")
    return importlib.import_module(f"{__name__}.{name}")


def family_for(cfg) -> ModuleType:
    """The family package that builds and trains ``cfg`` (by its class's ``model_type``)."""
    return family(type(cfg).model_type)


#: the family of checkpoints written before families existed (their trainer_state names none)
LEGACY_MODEL_TYPE = "llama"


def config_from_dict(d: Mapping[str, Any], model_type: str | None = None):
    """A config saved with ``to_dict`` (trainer_state.json), built by its family's class."""
    return family(model_type or LEGACY_MODEL_TYPE).ModelConfig.from_dict(d)


def config_from_hf(d: Mapping[str, Any]):
    """The config of a Hugging Face config.json dict, from the family that reads its model_type."""
    mt = d.get("model_type", "llama")
    for name in names():
        fam = family(name)
        if mt in fam.HF_MODEL_TYPES:
            return fam.ModelConfig.from_hf_dict(d)
    known = sorted(t for n in names() for t in family(n).HF_MODEL_TYPES)
    raise ConfigError(f"config.json: model_type {mt!r} is not a model family rustane trains (known: {known})")
