"""Test tiers that need optional toolchains (qemu, cross gcc, GNUstep, torch).

A missing toolchain skips the tier with a reason that says what to install, except when
``RUSTANE_REQUIRE_ALL_TIERS=1`` (CI), where it fails: CI must never pass by skipping.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

REQUIRE_ALL = os.environ.get("RUSTANE_REQUIRE_ALL_TIERS") == "1"


def unavailable(reason: str) -> None:
    """Skip (or fail under RUSTANE_REQUIRE_ALL_TIERS=1) with ``reason``."""
    if REQUIRE_ALL:
        pytest.fail(f"required test tier unavailable: {reason} (RUSTANE_REQUIRE_ALL_TIERS=1)", pytrace=False)
    pytest.skip(reason)


def require_tools(*tools: str, hint: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)}; install with: {hint}")


def require_module(name: str, hint: str) -> None:
    if importlib.util.find_spec(name) is None:
        unavailable(f"Python module {name!r} not installed; install with: {hint}")
