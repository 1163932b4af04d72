"""Backends found by name: ``rustane.backends.get("sim" | "ane" | "null" | "auto", precision=...)``.

A backend is one module (or subpackage) of this package that defines ``BACKEND``, a
``base.BackendInfo``, and ``unavailable_reason()`` (None when it can run here, else one line saying
why not). The registry finds them by listing the package, so adding a backend is adding its
module: the CLIs' ``--backend`` choices, ``auto`` and the precision rules follow from the infos.

Every rule about which backend runs which precision, which may build models that break ANE rules
and what ``auto`` picks lives in ``get`` below and nowhere else (the engine and the CLIs call it).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

from .base import Backend, BackendInfo, Buffer, HostBuffer, Kernel, Request, TensorSpec

__all__ = ["Backend", "BackendInfo", "Buffer", "HostBuffer", "Kernel", "Request", "TensorSpec",
           "available", "cli_choices", "get", "info", "names", "precisions", "resolve"]

log = logging.getLogger("rustane.backends")

#: modules of this package that are not backends
_NOT_BACKENDS = frozenset({"base"})

_modules: dict | None = None


def _registry() -> dict:
    """name -> backend module, found once by listing this package."""
    global _modules
    if _modules is None:
        found = {}
        for m in pkgutil.iter_modules(__path__):
            if m.name.startswith("_") or m.name in _NOT_BACKENDS:
                continue
            mod = importlib.import_module(f"{__name__}.{m.name}")
            spec = getattr(mod, "BACKEND", None)
            if isinstance(spec, BackendInfo) and callable(getattr(mod, "unavailable_reason", None)):
                found[spec.name] = mod
        _modules = dict(sorted(found.items()))
    return _modules


def names() -> tuple[str, ...]:
    """Every backend name, available here or not (sorted)."""
    return tuple(_registry())


def info(name: str) -> BackendInfo:
    mods = _registry()
    if name not in mods:
        raise ValueError(f"unknown backend {name!r}: choose one of auto, {', '.join(mods)}")
    return mods[name].BACKEND


def available() -> dict[str, str]:
    """Backend name -> '' if usable here, else the reason it is not."""
    return {name: mod.unavailable_reason() or "" for name, mod in _registry().items()}


def cli_choices() -> list[str]:
    """The ``--backend`` choices of the CLIs: ``auto`` and every backend meant for users."""
    return ["auto"] + [name for name, mod in _registry().items() if mod.BACKEND.cli]


def precisions(name: str | None = None) -> tuple[str, ...]:
    """The precisions backend ``name`` computes in (its default first); without a name, every
    precision some user-facing backend offers (the ``--precision`` choices)."""
    if name is not None and name != "auto":
        return info(name).precisions
    out: list[str] = []
    for mod in _registry().values():
        if mod.BACKEND.cli:
            out += [p for p in mod.BACKEND.precisions if p not in out]
    return tuple(out)


def resolve(name: str = "auto") -> str:
    """The backend ``name`` stands for: ``auto`` is the available backend of highest ``auto_rank``."""
    if name != "auto":
        info(name)
        return name
    ranked = sorted(((mod.BACKEND.auto_rank, n) for n, mod in _registry().items()
                     if mod.BACKEND.auto_rank is not None), reverse=True)
    reasons = []
    for _, n in ranked:
        reason = _registry()[n].unavailable_reason()
        if reason is None:
            log.info("backend auto -> %s%s", n, f" ({'; '.join(reasons)})" if reasons else "")
            return n
        reasons.append(f"{n}: {reason}")
    raise RuntimeError(f"no backend is available here ({'; '.join(reasons)})")  # pragma: no cover - sim always is


def get(name: str = "auto", *, precision: str | None = None, ane_rules: bool = True, **options) -> Backend:
    """A backend instance.

    ``precision``: the arithmetic, one of ``precisions(name)`` (None: the backend's default);
    "fp32" is exact math on the simulator, the ANE computes in fp16. ``ane_rules=False`` admits
    models whose kernels break ANE rules, on backends that can run them (docs/ane-rules.md).
    ``options`` go to the backend constructor (e.g. ``check=False``, ``io_dtype="fp32"``).
    """
    if name != "auto":
        info(name)  # unknown names fail first, naming the choices
    all_precisions = precisions()
    if precision is not None and precision not in all_precisions:
        raise ValueError(f"--precision must be one of {', '.join(all_precisions)}, got {precision!r}")
    research = [n for n, mod in _registry().items() if mod.BACKEND.research and mod.BACKEND.cli]
    if not ane_rules and (name == "auto" or not info(name).research):
        raise ValueError(f"configs that break ANE rules run on the simulator only: use --backend "
                         f"{' or '.join(research)} (see docs/ane-rules.md)")
    chosen = resolve(name)
    spec = info(chosen)
    if precision is not None and precision not in spec.precisions:
        offer = [n for n, mod in _registry().items() if mod.BACKEND.cli and precision in mod.BACKEND.precisions]
        picked = " (picked by --backend auto)" if name == "auto" else ""
        raise ValueError(f"--precision {precision} is not offered by the {chosen} backend{picked}, which computes in "
                         f"{', '.join(spec.precisions)}: use --backend {' or '.join(offer)}")
    if name != "auto":
        reason = _registry()[chosen].unavailable_reason()
        if reason is not None:
            here = [n for n, r in available().items() if not r and info(n).cli]
            from rustane.errors import BackendUnavailable

            raise BackendUnavailable(f"the {chosen} backend is not available here: {reason}. "
                               f"Use --backend {' or '.join(here)}.")
    return spec.create(precision=precision or spec.precisions[0], ane_rules=ane_rules, **options)
