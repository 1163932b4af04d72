"""Compatibility: the model configuration moved to ``rustane.models.llama.config``."""

from rustane.models.llama.config import (  # noqa: F401
    KERNEL_DIMS, PRESETS, ConfigError, HeadDims, ModelConfig, dimension_errors, preset, preset_names,
)

__all__ = ["ModelConfig", "ConfigError", "PRESETS", "preset", "preset_names"]
