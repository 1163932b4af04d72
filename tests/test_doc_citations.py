"""Comments cite documents inside this repository, and those documents say what is cited.

Scans every comment (and Python string, which is where docstrings live) in rustane/, csrc/ and
tests/ plus the meson.build files:

- nothing may cite a path outside the repository (``../shared/...``, the design notes that live
  next to the repository, absolute paths on the machine that wrote them);
- every ``docs/<file>.md`` it cites exists, and so does the ``#anchor`` (a heading of that file);
- a comment that states a measured figure names the command that re-measures it.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("rustane", "csrc", "tests")
SOURCE_SUFFIXES = {".py", ".pyx", ".c", ".h", ".m", ".S", ".mil"}
THIS = Path(__file__).resolve()

#: citations of documents outside the repository (the names are split so this file does not match)
OUTSIDE = re.compile("|".join([
    r"\.\./" + "shared", r"\bshared/" + r"(?:reviews|data)\b", "ANE_" + "FACTS", "ARCHI" + r"TECTURE\.md",
    "TOOL" + r"CHAIN\.md", r"(?<![\w.])/work/", r"(?<![\w.])/home/\w+", r"(?<![\w.])/Users/\w+",
]))
DOC_CITE = re.compile(r"(?<![\w/])(docs/[\w.-]+\.md)(#[\w-]+)?")
#: a figure with a unit of time, speed or ratio ...
FIGURE = re.compile(r"\d(?:[\d.,]*\d)?\s?(?:ns|us|µs|ms|s|x|×|%|GB/s|MB/s|GFLOP/s|TFLOPS|tok/s)\b"
                    r"|\d\s?(?:x|×)\s+(?:faster|slower)")
#: ... stated as measured on some machine
MEASURED = re.compile(r"\b(?:measured|observed|here|this (?:VM|machine|box))\b", re.I)
#: what names a re-measure command
COMMAND = re.compile(r"python -m [\w.]+|pytest\b|\bbench/\w+\.py|python3? [\w/]+\.py|\bmake\b|tests/test_\w+\.py")


def _source_files() -> list[Path]:
    files = [p for root in ROOTS for p in (REPO / root).rglob("*")
             if p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts and p.resolve() != THIS]
    files += [p for p in REPO.rglob("meson.build") if ".git" not in p.parts and not _in_build_dir(p)]
    return sorted(files)


def _in_build_dir(p: Path) -> bool:
    return any(part in ("build", "builddir") or part.startswith(".") for part in p.relative_to(REPO).parts[:-1])


def comments(path: Path) -> list[tuple[int, str]]:
    """(first line, text) of every comment block of the file; Python docstrings (string
    statements) count as comments, other strings (messages, data) do not."""
    text = path.read_text(encoding="utf-8", errors="replace")
    out: list[tuple[int, str]] = []
    if path.suffix in (".py", ".pyx"):
        try:
            toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
        except (tokenize.TokenError, IndentationError, SyntaxError):  # Cython syntax: fall back to lines
            return [(i, line) for i, line in enumerate(text.splitlines(), 1) if "#" in line or '"' in line]
        block: list[str] = []
        start = 0
        prev_line = -2
        prev_sig = tokenize.NEWLINE
        for tok in toks:
            if tok.type == tokenize.COMMENT:
                if tok.start[0] != prev_line + 1 and block:
                    out.append((start, " ".join(block)))
                    block = []
                if not block:
                    start = tok.start[0]
                block.append(tok.string.lstrip("#").strip())
                prev_line = tok.start[0]
            elif tok.type == tokenize.STRING and prev_sig in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                out.append((tok.start[0], tok.string))  # a string statement: a docstring
            if tok.type not in (tokenize.COMMENT, tokenize.NL):
                prev_sig = tok.type
        if block:
            out.append((start, " ".join(block)))
        return out
    if path.name == "meson.build":
        return [(i, line.split("#", 1)[1]) for i, line in enumerate(text.splitlines(), 1) if "#" in line]
    # C, Objective-C, assembly, MIL templates: /* ... */ blocks and runs of // lines
    for m in re.finditer(r"/\*.*?\*/", text, re.S):
        out.append((text.count("\n", 0, m.start()) + 1, m.group(0)))
    run: list[str] = []
    start = 0
    for i, line in enumerate(text.splitlines(), 1):
        idx = line.find("//")
        if idx >= 0 and not line[:idx].count('"') % 2:
            if not run:
                start = i
            run.append(line[idx + 2:].strip())
        elif run:
            out.append((start, " ".join(run)))
            run = []
    if run:
        out.append((start, " ".join(run)))
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def missing_target(cite: str, repo: Path = REPO) -> str | None:
    """None when ``docs/x.md#anchor`` (anchor optional) exists in ``repo``, else what is missing.
    Anchors are headings (GitHub's slugs) or explicit ``<a id="...">`` tags."""
    path, _, anchor = cite.partition("#")
    doc = repo / path
    if not doc.is_file():
        return f"{path} does not exist"
    if anchor:
        text = doc.read_text(encoding="utf-8")
        slugs = {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}
        slugs |= set(re.findall(r"<a (?:id|name)=\"([\w-]+)\"", text))
        if anchor not in slugs:
            return f"{path} has no heading with anchor #{anchor}"
    return None


def _scan():
    for path in _source_files():
        for line, text in comments(path):
            yield path.relative_to(REPO), line, text


def test_no_comment_cites_a_path_outside_the_repository():
    bad = [f"{p}:{line}: {m.group(0)!r} in {text.strip()[:100]!r}"
           for p, line, text in _scan() for m in [OUTSIDE.search(text)] if m]
    assert not bad, "comments citing documents outside the repository:\n  " + "\n  ".join(bad)


#: documents that work in progress cites before it lands them (the LoRA and bench issues);
#: checked like any other as soon as they exist
PENDING = {"docs/benchmarks.md", "docs/finetune.md"}


def test_the_documents_cite_nothing_outside_the_repository():
    """The documents the comments point to stand on their own too."""
    bad = [f"{d.relative_to(REPO)}:{i}: {m.group(0)!r}"
           for d in sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
           for i, line in enumerate(d.read_text(encoding="utf-8").splitlines(), 1)
           for m in [OUTSIDE.search(line)] if m]
    assert not bad, "documents citing paths outside the repository:\n  " + "\n  ".join(bad)


def test_cited_documents_and_sections_exist():
    cited, bad = 0, []
    for p, line, text in _scan():
        for m in DOC_CITE.finditer(text):
            cited += 1
            cite = m.group(1) + (m.group(2) or "")
            if m.group(1) in PENDING and not (REPO / m.group(1)).exists():
                continue
            problem = missing_target(cite)
            if problem:
                bad.append(f"{p}:{line}: {cite}: {problem}")
    assert cited > 50  # the scan sees the citations (ane-runtime.md alone is cited ~70 times)
    assert not bad, "citations of missing documents or sections:\n  " + "\n  ".join(bad)


def test_measured_figures_name_their_command():
    bad = [f"{p}:{line}: {' '.join(text.split())[:160]!r}" for p, line, text in _scan()
           if FIGURE.search(text) and MEASURED.search(text) and not COMMAND.search(text)]
    assert not bad, ("comments stating a measured figure without the command that re-measures it:\n  "
                     + "\n  ".join(bad))


def test_the_scanners_catch_what_they_must(tmp_path):
    c = tmp_path / "x.c"
    c.write_text('/* see ../' 'shared/ANE_' 'FACTS.md */\nint a; // ~3 ms measured here\n// (python -m rustane.bench sim)\n')
    (tmp_path / "y.py").write_text('"""doc: docs/nowhere.md#x"""\n# 1.5x faster here\nx = 1  # fine\n')
    found = comments(c) + comments(tmp_path / "y.py")
    texts = [t for _, t in found]
    assert any(OUTSIDE.search(t) for t in texts)
    measured = [t for t in texts if FIGURE.search(t) and MEASURED.search(t)]
    assert len(measured) == 2 and COMMAND.search(measured[0]) and not COMMAND.search(measured[1])
    assert missing_target("docs/nowhere.md") == "docs/nowhere.md does not exist"
    assert missing_target("docs/ane-runtime.md#surfaces") is None
    assert "no heading" in missing_target("docs/ane-runtime.md#no-such-section")
    assert _slug("Kernel plan (dynamic weights, compiled once, shared by all layers)") == \
        "kernel-plan-dynamic-weights-compiled-once-shared-by-all-layers"
