"""Fill MIL templates (``mil_templates/<name>.mil``) with shapes and constants.

Templates use ``string.Template`` placeholders: ``$DIM``, ``${SEQ}``; ``$$`` is a literal ``$``.
Every placeholder a template uses must be given; a missing one raises ``MilTemplateError`` naming
the template, the placeholder and its line. Extra parameters are **allowed and ignored**, so a caller
can pass one shape dictionary (DIM, SEQ, HD, ...) to every kernel template.

Value formatting: ``bool`` -> ``true``/``false`` (MIL spelling), ``float`` -> ``repr`` (exact),
everything else (int, numpy scalars, str) -> ``str``.

Templates directory: ``<installed rustane>/mil_templates`` (meson installs it there); in a source
checkout, ``<repo>/mil_templates``. Pass ``template_dir=`` to use another one.
"""

from __future__ import annotations

import string
from pathlib import Path

from .errors import MilTemplateError


def templates_dir() -> Path:
    """The directory holding the kernel templates (installed copy first, then the source checkout)."""
    import rustane

    pkg = Path(rustane.__file__).resolve().parent
    for cand in (pkg / "mil_templates", pkg.parent / "mil_templates"):
        if cand.is_dir():
            return cand
    raise MilTemplateError(
        f"no mil_templates directory found (looked in {pkg / 'mil_templates'} and {pkg.parent / 'mil_templates'}); "
        "pass template_dir="
    )


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


def render(name: str, template_dir: str | Path | None = None, **params) -> str:
    """Render template ``name`` (``<name>.mil`` in the templates dir) with ``params``."""
    directory = Path(template_dir) if template_dir is not None else templates_dir()
    fname = name if name.endswith(".mil") else name + ".mil"
    path = directory / fname
    if not path.is_file():
        available = sorted(p.stem for p in directory.glob("*.mil")) if directory.is_dir() else []
        raise MilTemplateError(
            f"no MIL template {fname!r} in {directory}; available: {', '.join(available) or 'none'}"
        )
    return render_text(path.read_text(encoding="utf-8"), _template_name=fname, **params)
