"""Fill MIL templates (``<name>.mil`` in a model family's ``templates/``) with shapes and constants.

Templates use ``string.Template`` placeholders: ``$DIM``, ``${SEQ}``; ``$$`` is a literal ``$``.
``//`` comments (a template's header: its equation, input blocks and output taps) are stripped
before anything else: a line that is only a comment disappears, a trailing comment is cut with the
spaces before it, and ``//`` inside a string literal is kept. So comments never reach the compiler
and the text it gets does not depend on them.
Every placeholder a template uses must be given; a missing one raises ``MilTemplateError`` naming
the template, the placeholder and its line. Extra parameters are **allowed and ignored**, so a caller
can pass one shape dictionary (DIM, SEQ, HD, ...) to every kernel template.

Value formatting: ``bool`` -> ``true``/``false`` (MIL spelling), ``float`` -> ``repr`` (exact),
everything else (int, numpy scalars, str) -> ``str``.

Each model family keeps its templates beside its plan (``rustane/models/<family>/templates``) and
passes ``template_dir=``.
"""

from __future__ import annotations

import string
from pathlib import Path

from .errors import MilTemplateError


def strip_comments(text: str) -> str:
    """``text`` without ``//`` comments (outside string literals); comment-only lines removed."""
    if "//" not in text:
        return text
    out = []
    for line in text.splitlines(keepends=True):
        cut = _comment_start(line)
        if cut < 0:
            out.append(line)
        elif line[:cut].strip():
            end = "\n" if line.endswith("\n") else ""
            out.append(line[:cut].rstrip() + end)
    return "".join(out)


def _comment_start(line: str) -> int:
    """Index of the ``//`` opening a comment in ``line``, or -1 (MIL strings are double-quoted
    and have no escapes)."""
    in_string = False
    for i, ch in enumerate(line):
        if ch == '"':
            in_string = not in_string
        elif ch == "/" and not in_string and line.startswith("//", i):
            return i
    return -1


def _format(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def render_text(text: str, _template_name: str = "<text>", **params) -> str:
    """Substitute ``params`` into template ``text``; see the module docstring for the rules."""
    text = strip_comments(text)
    tpl = string.Template(text)
    values = {k: _format(v) for k, v in params.items()}
    missing: list[str] = []
    for m in tpl.pattern.finditer(text):
        if m.group("invalid") is not None:
            off = m.start()  # the "$" itself
            line = _line_of(text, off)
            col = off - (text.rfind("\n", 0, off) + 1) + 1
            raise MilTemplateError(
                f"template {_template_name}: line {line}, column {col}: '$' not followed by a placeholder name "
                "(write $NAME, ${NAME}, or $$ for a literal '$')"
            )
        key = m.group("named") or m.group("braced")
        if key is not None and key not in values:
            missing.append(f"${key} (line {_line_of(text, m.start())})")
    if missing:
        seen = list(dict.fromkeys(missing))
        raise MilTemplateError(
            f"template {_template_name}: missing placeholder value(s): {', '.join(seen)}; "
            f"given: {', '.join(sorted(params)) or 'none'}"
        )
    return tpl.substitute(values)


def render(name: str, template_dir: str | Path, **params) -> str:
    """Render template ``name`` (``<name>.mil`` in ``template_dir``) with ``params``."""
    if template_dir is None:
        raise MilTemplateError(f"render({name!r}): pass template_dir= (a model family's templates folder)")
    directory = Path(template_dir)
    fname = name if name.endswith(".mil") else name + ".mil"
    path = directory / fname
    if not path.is_file():
        available = sorted(p.stem for p in directory.glob("*.mil")) if directory.is_dir() else []
        raise MilTemplateError(
            f"no MIL template {fname!r} in {directory}; available: {', '.join(available) or 'none'}"
        )
    return render_text(path.read_text(encoding="utf-8"), _template_name=fname, **params)
