"""Errors every model family raises."""


from rustane.errors import ConfigError

__all__ = ["ConfigError"]
