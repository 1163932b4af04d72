"""The failures rustane expects, as typed exceptions.

Every expected failure (a bad flag, unreadable data, a damaged checkpoint, a run that diverged)
is a ``RustaneError`` whose message is one line naming the problem and the fix. The API raises
them as they are; the command-line tools (``rustane.cli.run``) print the message as one
``error:`` line and exit with code 2. Anything else is a bug and keeps its traceback under
``--debug``.

Each class also derives from the builtin its callers caught before it existed (``ValueError``
for bad values, ``RuntimeError`` for bad state), so ``except ValueError`` keeps working.

This module imports nothing from rustane: every layer may raise these.
"""

from __future__ import annotations

__all__ = [
    "RustaneError", "UsageError", "ConfigError", "DataError", "CheckpointError", "ResumeError",
    "OutputDirError", "BackendUnavailable", "Diverged", "one_line",
]


class RustaneError(Exception):
    """An expected failure; ``str(exc)`` names the problem and the fix."""


class UsageError(RustaneError, ValueError):
    """A flag or API argument of the wrong type or out of range."""


class ConfigError(RustaneError, ValueError):
    """An invalid or mismatched model configuration (the message names field and fix)."""


class DataError(RustaneError, ValueError):
    """Training data that cannot be used as given (missing, wrong format, too short)."""


class CheckpointError(RustaneError, RuntimeError):
    """A missing, corrupted or mismatched checkpoint (the message names the file/field)."""


class ResumeError(CheckpointError):
    """A checkpoint that loads as weights but cannot continue a run (state missing or inconsistent,
    or the run's data/settings differ from the ones given now)."""


class OutputDirError(RustaneError, RuntimeError):
    """An output folder that would mix two runs."""


class BackendUnavailable(RustaneError, RuntimeError):
    """The requested compute backend does not exist on this machine."""


class Diverged(RustaneError, RuntimeError):
    """Training produced a loss the loss scaler cannot explain; ``checkpoint`` is the last good
    save (or None when nothing could be saved)."""

    def __init__(self, message: str, checkpoint=None, step: int | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.step = step


def one_line(message: str) -> str:
    """``message`` folded onto one line (multi-line details joined with ``; ``)."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    if not parts:
        return ""
    out = parts[0]
    for p in parts[1:]:
        out += " " if out.endswith((":", ";", ",")) else "; "
        out += p
    return out
