"""Errors every model family raises."""


class ConfigError(ValueError):
    """An invalid or mismatched model configuration (the message names field and fix)."""
