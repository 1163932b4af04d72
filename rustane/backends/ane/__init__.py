"""The ``ane`` backend: MIL programs on the Apple Neural Engine through the private framework.

- ``backend``: the Backend protocol over the compiled runtime ``rustane._ane``, and where it runs;
- ``errors``: ``AneError``, which the compiled runtime raises (it imports nothing);
- ``probe_cache``: the cached ``python -m rustane.probe`` result the backend reads;
- ``fake``: test scaffolding, the simulator evaluator of the fake framework (Linux tests only,
  loaded only when the fake framework is opened).
"""

from __future__ import annotations

from ..base import BackendInfo
from .backend import (  # noqa: F401
    FAKE_ENV, FAKE_LIBRARY, AneBackend, AneBuffer, AneKernel, AneRequest, fake_library_path, parse_signature,
    unavailable_reason,
)
from .errors import AneError

__all__ = ["AneError", "AneBackend", "BACKEND", "unavailable_reason", "fake_library_path", "FAKE_ENV",
           "parse_signature"]


def _create(precision: str, ane_rules: bool, **options) -> AneBackend:
    # the registry admits only fp16 and ane_rules=True here: the hardware has no other mode
    return AneBackend(**options)


BACKEND = BackendInfo(
    name="ane",
    summary="the Apple Neural Engine (macOS on Apple silicon; on Linux the test fake framework)",
    create=_create,
    precisions=("fp16",),
    auto_rank=10,
    on_hardware=True,
)
