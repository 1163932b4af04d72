"""Backend registry: ``rustane.backends.get("sim" | "ane" | "auto" | "null", **options)``."""

from __future__ import annotations

import logging

from .base import Backend, Buffer, HostBuffer, Kernel, Request, TensorSpec

__all__ = ["Backend", "Buffer", "HostBuffer", "Kernel", "Request", "TensorSpec", "get", "available"]

log = logging.getLogger("rustane.backends")


def available() -> dict[str, str]:
    """Backend name -> '' if usable here, else the reason it is not."""
    from . import ane

    return {"sim": "", "null": "", "ane": ane.unavailable_reason() or ""}


def get(name: str = "auto", **options) -> Backend:
    """Return a backend instance.

    ``auto`` picks ``ane`` when the private framework loads (macOS arm64), else ``sim``, and logs
    which and why. ``options`` go to the backend constructor (e.g. ``precision="fp16"`` for sim).
    """
    if name == "auto":
        from . import ane

        reason = ane.unavailable_reason()
        if reason is None:
            log.info("backend auto -> ane (AppleNeuralEngine framework loaded)")
            options.pop("precision", None)
            return ane.AneBackend(**options)
        log.info("backend auto -> sim (%s)", reason)
        name = "sim"
    if name == "sim":
        from .sim import SimBackend

        return SimBackend(**options)
    if name == "ane":
        from . import ane

        reason = ane.unavailable_reason()
        if reason is not None:
            from rustane.errors import BackendUnavailable

            raise BackendUnavailable(f"the ane backend is not available here: {reason}. Use --backend sim.")
        options.pop("precision", None)
        return ane.AneBackend(**options)
    if name == "null":
        from .null import NullBackend

        return NullBackend(**options)
    raise ValueError(f"unknown backend {name!r}: choose one of auto, sim, ane, null")
