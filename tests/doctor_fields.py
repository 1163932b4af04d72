"""The fields of a doctor report against docs/doctor.md: every path the report emits must be
documented there (tests/test_doctor.py, tests/test_ane_contract.py)."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "doctor.md"


def documented_fields() -> list[str]:
    """The backticked paths in the first column of docs/doctor.md's field table."""
    return re.findall(r"^\| `([^`]+)` \|", DOC.read_text(), re.M)


def emitted_paths(obj, prefix: str = "") -> set[str]:
    """Every path of a JSON value: ``a.b`` for objects, ``a[]`` for lists of objects."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{prefix}.{k}" if prefix else k
            out.add(p)
            out |= emitted_paths(v, p)
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict):
                out |= emitted_paths(v, prefix + "[]")
    return out


def _pattern(field: str) -> re.Pattern:
    parts = re.split(r"(<[^>]+>)", field)
    rx = "".join(r"[^.\[\]]+" if p.startswith("<") else re.escape(p) for p in parts)
    return re.compile(rx + r"\Z")


def undocumented(report: dict) -> list[str]:
    pats = [_pattern(f) for f in documented_fields()]
    return sorted(p for p in emitted_paths(report) if not any(rx.match(p) for rx in pats))
