"""The parsed form of a MIL text program (the dialect of docs/ane-runtime.md#mil-text).

Shared by the parser (text -> Program), the checker (Program -> diagnostics), the emitter
(Program -> text) and the interpreter (Program -> plan). Nodes are plain frozen dataclasses
so every stage can pattern-match on them; every node that came from text keeps its 1-based
line and column so diagnostics can point at it.

Grammar sketch (what the parser accepts)::

    program   := 'program' '(' VERSION ')' [ '[' 'buildInfo' '=' dict ']' ] '{' function* '}'
    function  := 'func' NAME '<' OPSET '>' '(' [ param (',' param)* ] ')' '{' stmt* '}'
                 '->' '(' NAME (',' NAME)* ')' ';'
    param     := type NAME
    stmt      := type NAME '=' OPNAME '(' [ arg (',' arg)* ] ')' [ '[' attr (',' attr)* ']' ] ';'
    arg       := NAME '=' value          # value: a Ref, a literal, or a tuple of values
    attr      := NAME '=' literal
    type      := DTYPE                                   # scalar: fp16, fp32, int32, bool, string ...
               | 'tensor' '<' DTYPE ',' '[' [INT (',' INT)*] ']' '>'
    literal   := DTYPE '(' scalar ')'                    # bool(false), fp16(0x1p-3), string("x")
               | type '(' '[' ... ']' ')'                # tensor<int32, [4]>([0,0,0,256])
               | type '(' scalar ')'                     # verbose scalar: tensor<int32, []>(1)
               | type '(' 'BLOBFILE' '(' 'path' '=' string, 'offset' '=' uint64 ')' ')'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import numpy as np

#: MIL dtype name -> numpy dtype (strings have no numpy dtype; they stay Python str).
DTYPES: dict[str, np.dtype] = {
    "fp16": np.dtype(np.float16),
    "fp32": np.dtype(np.float32),
    "fp64": np.dtype(np.float64),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "int16": np.dtype(np.int16),
    "uint16": np.dtype(np.uint16),
    "int32": np.dtype(np.int32),
    "uint32": np.dtype(np.uint32),
    "int64": np.dtype(np.int64),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
}
STRING = "string"


@dataclass(frozen=True)
class Loc:
    line: int  # 1-based
    col: int  # 1-based


@dataclass(frozen=True)
class TensorType:
    """``tensor<fp16, [1, 64, 1, 32]>`` has dtype 'fp16' and shape (1, 64, 1, 32).

    A scalar type written bare (``fp16``, ``bool``, ``string``) has ``shape == ()`` and
    ``scalar_form == True``; the verbose scalar ``tensor<int32, []>`` has shape () and
    ``scalar_form == False`` so the emitter can reproduce what it read.
    """

    dtype: str
    shape: tuple[int, ...]
    scalar_form: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.np_dtype.itemsize


@dataclass(frozen=True)
class BlobRef:
    """``BLOBFILE(path=string("@model_path/weights/w.bin"), offset=uint64(64))``.

    ``offset`` is the byte offset of the chunk header inside the blob file (docs/ane-runtime.md#blob-files).
    """

    path: str
    offset: int


@dataclass(frozen=True, eq=False)
class Literal:
    """A typed constant: ``int32(1)``, ``tensor<int32, [4]>([0,0,0,256])``, ``string("valid")``.

    ``value`` is a numpy array of exactly ``type.shape`` and ``type.np_dtype`` (0-d for scalars),
    a Python ``str`` for strings, or a ``BlobRef`` for BLOBFILE data (resolved by the consumer).
    ``text`` keeps the literal's original spelling of the value (e.g. ``0x1p-3``) when there was one.
    """

    type: TensorType
    value: Union[np.ndarray, str, BlobRef]
    loc: Loc | None = None
    text: str | None = None


@dataclass(frozen=True)
class Ref:
    """A use of a named value (function input or statement output)."""

    name: str
    loc: Loc | None = None


@dataclass(frozen=True)
class TupleValue:
    """``(a, b, c)``, e.g. the ``values`` argument of concat."""

    items: tuple["Value", ...]
    loc: Loc | None = None


Value = Union[Ref, Literal, TupleValue]


@dataclass(frozen=True)
class Statement:
    """``tensor<fp16, [1,64,1,32]> y = add(x=a, y=b)[name=string("y")];``

    ``args`` are the call arguments in source order (name -> value); ``attrs`` the bracketed
    attributes (always Literals; ``name`` included). A ``const()`` statement has no args and
    its value in ``attrs['val']``.
    """

    type: TensorType
    name: str
    op: str
    args: dict[str, Value]
    attrs: dict[str, Literal]
    loc: Loc

    @property
    def is_const(self) -> bool:
        return self.op == "const"


@dataclass(frozen=True)
class Param:
    type: TensorType
    name: str
    loc: Loc


@dataclass(frozen=True)
class Function:
    name: str
    opset: str  # e.g. 'ios18'
    params: tuple[Param, ...]
    body: tuple[Statement, ...]
    returns: tuple[Ref, ...]
    loc: Loc


@dataclass(frozen=True)
class Program:
    version: str  # e.g. '1.3'
    build_info: dict[str, str]
    functions: dict[str, Function]
    loc: Loc = field(default_factory=lambda: Loc(1, 1))
    #: 'short' when buildInfo used ``dict<string, string>``, 'verbose' for
    #: ``dict<tensor<string, []>, tensor<string, []>>`` (the program(1.0)/ios16 dialect).
    build_info_form: str = "short"

    @property
    def main(self) -> Function:
        return self.functions["main"]
