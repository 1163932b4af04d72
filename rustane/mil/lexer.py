"""Tokenizer for MIL text.

Token kinds: ``ident``, ``int``, ``float``, ``string``, ``punct`` (one of ``( ) [ ] { } < > , = ;
- + ->``) and ``eof``. Whitespace and ``//`` comments are skipped. Numbers are lexed unsigned; the
parser applies a leading ``-``/``+``. ``>`` is always a single token so ``>>`` closing two type
brackets needs no special case.

Identifiers are lexed from a slightly wider set than MIL.proto allows (``[A-Za-z_][A-Za-z0-9_@.$]*``)
so that ``x.1`` or ``a$b`` reach the checker's ``identifier-charset`` rule with a precise message
instead of a vague syntax error.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from .errors import MilSyntaxError

#: Refuse texts above this size (characters): real kernels are tens of KB; this bounds memory and time.
MAX_TEXT_CHARS = 32 * 1024 * 1024
#: Longest number token accepted (also keeps int() under Python's digit limit).
MAX_NUMBER_CHARS = 256

_TOKEN_RE = re.compile(
    r"""
    (?P<ws>[ \t\r\n\f\v]+)
  | (?P<comment>//[^\n]*)
  | (?P<hex>0[xX][0-9A-Fa-f.]*(?:[pP][+-]?[0-9]+)?[A-Za-z0-9_@.$]*)
  | (?P<num>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[A-Za-z0-9_@.$]*)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_@.$]*)
  | (?P<string>")
  | (?P<arrow>->)
  | (?P<punct>[()\[\]{}<>,=;+\-])
    """,
    re.VERBOSE,
)
_DEC_INT = re.compile(r"[0-9]+\Z")
_DEC_FLOAT = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_HEX_INT = re.compile(r"0[xX][0-9A-Fa-f]+\Z")
_HEX_FLOAT = re.compile(r"0[xX](?:[0-9A-Fa-f]+(?:\.[0-9A-Fa-f]*)?|\.[0-9A-Fa-f]+)(?:[pP][+-]?[0-9]+)?\Z")
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}


@dataclass(frozen=True)
class Token:
    kind: str
    text: str  # source spelling (for strings: the decoded value)
    offset: int  # 0-based character offset of the first character
    value: object = None  # int / float for numbers


class Source:
    """Text plus line index, to turn offsets into 1-based (line, column) and excerpts."""

    def __init__(self, text: str):
        self.text = text
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def linecol(self, offset: int) -> tuple[int, int]:
        idx = bisect.bisect_right(self._starts, offset) - 1
        return idx + 1, offset - self._starts[idx] + 1

    def line_text(self, line: int) -> str:
        start = self._starts[line - 1]
        end = self._starts[line] - 1 if line < len(self._starts) else len(self.text)
        return self.text[start:end]

    def error(self, msg: str, offset: int) -> MilSyntaxError:
        line, col = self.linecol(offset)
        return MilSyntaxError(msg, line, col, self.line_text(line))


def _number(src: Source, text: str, offset: int) -> Token:
    if len(text) > MAX_NUMBER_CHARS:
        raise src.error(f"number literal longer than {MAX_NUMBER_CHARS} characters", offset)
    if not (_DEC_INT.match(text) or _HEX_INT.match(text) or _DEC_FLOAT.match(text) or _HEX_FLOAT.match(text)):
        raise src.error(f"malformed number {text!r}", offset)
    try:
        if _DEC_INT.match(text):
            return Token("int", text, offset, int(text))
        if _HEX_INT.match(text):
            return Token("int", text, offset, int(text, 16))
        value = float(text) if _DEC_FLOAT.match(text) else float.fromhex(text)
    except (ValueError, OverflowError):
        raise src.error(f"number {text!r} is out of range", offset) from None
    if value in (float("inf"), float("-inf")):
        raise src.error(f"number {text!r} is out of range (overflows to infinity)", offset)
    return Token("float", text, offset, value)


def _string(src: Source, offset: int) -> tuple[Token, int]:
    text = src.text
    pos = offset + 1
    out: list[str] = []
    while True:
        end = pos
        n = len(text)
        while end < n and text[end] not in '"\\\n':
            end += 1
        out.append(text[pos:end])
        if end >= n or text[end] == "\n":
            raise src.error("unterminated string literal (missing closing '\"' on this line)", offset)
        if text[end] == '"':
            return Token("string", "".join(out), offset), end + 1
        esc = text[end + 1 : end + 2]
        if esc not in _ESCAPES:
            raise src.error(f"unknown escape '\\{esc}' in string (allowed: \\\" \\\\ \\n \\t \\r)", end)
        out.append(_ESCAPES[esc])
        pos = end + 2


def tokenize(text: str) -> tuple[list[Token], Source]:
    """Split ``text`` into tokens (ending with one ``eof`` token); raises MilSyntaxError."""
    if not isinstance(text, str):
        raise TypeError(f"MIL text must be str, not {type(text).__name__}")
    if len(text) > MAX_TEXT_CHARS:
        raise MilSyntaxError(f"MIL text too large ({len(text)} characters, limit {MAX_TEXT_CHARS})", 1, 1, None)
    src = Source(text)
    tokens: list[Token] = []
    pos = 0
    n = len(text)
    match = _TOKEN_RE.match
    while pos < n:
        m = match(text, pos)
        if m is None:
            ch = text[pos]
            if ch == "$":
                ph = re.match(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", text[pos : pos + 64])
                if ph:
                    raise src.error(f"unrendered template placeholder {ph.group()}; render the template first", pos)
            raise src.error(f"unexpected character {ch!r}", pos)
        kind = m.lastgroup
        if kind == "ws" or kind == "comment":
            pos = m.end()
            continue
        if kind == "string":
            tok, pos = _string(src, pos)
            tokens.append(tok)
            continue
        word = m.group()
        if kind == "hex" or kind == "num":
            tokens.append(_number(src, word, pos))
        elif kind == "ident":
            tokens.append(Token("ident", word, pos))
        else:  # arrow, punct
            tokens.append(Token("punct", word, pos))
        pos = m.end()
    tokens.append(Token("eof", "", n))
    return tokens, src
