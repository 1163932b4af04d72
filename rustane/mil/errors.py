"""Errors and diagnostics of the MIL text toolchain.

Every problem found in MIL text points at a 1-based line and column and shows the offending line
with a caret, so a template author can fix it without counting characters.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Lines longer than this are shown as a window around the column in excerpts.
_EXCERPT_WIDTH = 100
_EXCERPT_CONTEXT = 45


def excerpt(source_line: str | None, col: int) -> str:
    """Return the two excerpt lines (text, caret) indented by 4, or '' when there is no source.

    Long lines are cut to a window around ``col`` with ``...`` markers; tabs become spaces so the
    caret stays aligned.
    """
    if source_line is None:
        return ""
    text = source_line.replace("\t", " ").rstrip("\r\n")
    pos = max(0, col - 1)
    if len(text) > _EXCERPT_WIDTH:
        start = max(0, pos - _EXCERPT_CONTEXT)
        end = min(len(text), pos + _EXCERPT_CONTEXT)
        prefix = "..." if start > 0 else ""
        suffix = "..." if end < len(text) else ""
        text = prefix + text[start:end] + suffix
        pos = pos - start + len(prefix)
    # Control characters would break the alignment of the caret line.
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return f"    {text}\n    {' ' * pos}^"


class MilSyntaxError(ValueError):
    """MIL text that does not parse (or is semantically impossible, e.g. an undefined name).

    ``line``/``col`` are 1-based; ``msg`` is the short message without position; ``source_line``
    is the full offending line (or None).
    """

    def __init__(self, msg: str, line: int, col: int, source_line: str | None = None):
        self.msg = msg
        self.line = line
        self.col = col
        self.source_line = source_line
        text = f"line {line}, column {col}: {msg}"
        ex = excerpt(source_line, col)
        if ex:
            text += "\n" + ex
        super().__init__(text)


class MilTemplateError(ValueError):
    """A MIL template could not be found or rendered (missing placeholder, bad ``$`` use)."""


ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Diagnostic:
    """One finding of the ANE rule checker.

    ``rule`` is the stable rule id (e.g. ``sdpa-mask``), ``severity`` is ``"error"`` (the ANE
    rejects or silently miscomputes the program) or ``"warning"`` (unproven or fragile), ``fact``
    names the section of docs/ane-runtime.md or docs/ane-rules.md the rule comes from.
    """

    rule: str
    severity: str
    message: str
    line: int
    col: int
    fact: str

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    def __str__(self) -> str:
        return f"line {self.line}, column {self.col}: {self.severity} [{self.rule}] {self.message} ({self.fact})"


class MilCheckError(ValueError):
    """Raised by ``check_or_raise`` when the checker finds errors; lists every error."""

    def __init__(self, diagnostics: list[Diagnostic], name: str | None = None):
        self.diagnostics = list(diagnostics)
        errors = [d for d in self.diagnostics if d.is_error]
        head = f"{len(errors)} ANE rule error(s)" + (f" in {name}" if name else "")
        super().__init__(head + ":\n" + "\n".join(f"  {d}" for d in errors))
