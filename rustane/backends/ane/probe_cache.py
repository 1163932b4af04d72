"""The cached result of ``python -m rustane.probe``: what this Mac's Neural Engine accepted.

The ANE backend reads it (MIL dialect, chip profile for the guards) and the probe writes it. It
lives with the backend so that the backend needs nothing from the probe CLI, which itself drives
the backend (no import cycle, tests/test_import_graph.py). One JSON file in the user cache dir,
valid only for the chip and OS build it was measured on.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

CACHE_VERSION = 2  # 2: per-rule probe records ("rules")

__all__ = ["CACHE_VERSION", "cache_path", "load_cached_probe", "machine_key", "save_probe"]


def cache_path() -> Path:
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rustane" / "probe.json"


def machine_key() -> dict:
    """What a cached probe is valid for: the chip and the OS build."""
    chip = platform.processor() or platform.machine()
    if sys.platform == "darwin":
        try:
            chip = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or chip
        except (OSError, subprocess.SubprocessError):
            pass
    return {"system": platform.system(), "os": platform.mac_ver()[0] or platform.release(),
            "machine": platform.machine(), "chip": chip}


def load_cached_probe(path: Path | None = None) -> dict | None:
    """The cached probe result for this machine, or None (absent, stale, other chip/OS, unreadable)."""
    p = path or cache_path()
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("cache_version") != CACHE_VERSION or data.get("machine") != machine_key():
        return None
    return data


def save_probe(result: dict, path: Path | None = None) -> Path:
    p = path or cache_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True))
    os.replace(tmp, p)
    return p
