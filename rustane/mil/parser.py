"""Strict recursive-descent parser: MIL text -> ``rustane.mil.ast.Program``.

Accepts the dialect of docs/ane-runtime.md#mil-text (coremlc's ``model.mil`` text): ``program(1.x)``, the buildInfo
dictionary in its short (``dict<string, string>``) and verbose (``dict<tensor<string, []>, ...>``)
forms, functions with typed parameters and a return tuple, and statements
``type name = op(arg = value, ...)[attr = literal, ...];``.

Beyond the grammar, parsing enforces what would make the program meaningless: duplicate value,
argument, attribute or function names, use of a name before its definition, a ``name`` attribute
that is not a string, a ``const`` without ``val`` or whose ``val`` type differs from the declared
type, and tensor literals whose element count does not match the shape. Everything that is legal MIL
but risky on the ANE (inline bools, missing ``interleave``, undefined return names, identifiers
outside MIL.proto's charset, ...) is left to ``rustane.mil.check``.

Identifiers are lexed from ``[A-Za-z_][A-Za-z0-9_@.$]*``, wider than MIL.proto's
``[A-Za-z_][A-Za-z0-9_@]*``, so ``x.1`` parses and the checker's ``identifier-charset`` rule reports
it precisely. Dtype names, ``tensor``, ``true``/``false``, ``BLOBFILE``, ``dict``, ``func`` and
``program`` are reserved and cannot name values.

Lenient spots, on purpose: bare ``true``/``false`` as argument or attribute values (they become
``bool`` literals); rank > 1 tensor literals written flat (``[1, 2, 3, 4]`` for ``[2, 2]``) besides
nested; ``inf``/``nan`` as float elements. Bare numbers are rejected (their dtype would be a guess).

Every failure is a ``MilSyntaxError`` with line, column and an excerpt; input size and nesting
depth are bounded so arbitrary input can neither hang the parser nor exhaust the stack.
"""

from __future__ import annotations

import math

import numpy as np

from .ast import (
    DTYPES,
    STRING,
    BlobRef,
    Function,
    Literal,
    Loc,
    Param,
    Program,
    Ref,
    Statement,
    TensorType,
    TupleValue,
    Value,
)
from .errors import MilSyntaxError
from .lexer import Source, Token, tokenize

#: Deepest nesting of tuples / tensor-literal brackets accepted.
MAX_DEPTH = 32
#: Largest tensor dimension accepted in a type (int32 range, as in MIL shapes).
MAX_DIM = 2**31 - 1
#: Largest tensor literal (elements) written inline; bigger data belongs in a BLOBFILE.
MAX_INLINE_ELEMENTS = 1 << 24

DTYPE_NAMES = frozenset(DTYPES) | {STRING}
#: Words that cannot name a value: they would make ``type name`` / ``value`` ambiguous.
RESERVED = DTYPE_NAMES | {"tensor", "true", "false", "BLOBFILE", "dict", "func", "program"}
_FLOAT_DTYPES = frozenset({"fp16", "fp32", "fp64"})
_SPECIAL_FLOATS = {"inf": math.inf, "nan": math.nan}


def parse(text: str) -> Program:
    """Parse MIL ``text`` into a Program; raises MilSyntaxError (with line/column) on any problem."""
    tokens, src = tokenize(text)
    return _Parser(tokens, src).program()


def _describe(tok: Token) -> str:
    if tok.kind == "eof":
        return "end of input"
    if tok.kind == "string":
        shown = tok.text if len(tok.text) <= 20 else tok.text[:20] + "..."
        return f"string {shown!r}"
    shown = tok.text if len(tok.text) <= 30 else tok.text[:30] + "..."
    return f"'{shown}'"


class _Parser:
    def __init__(self, tokens: list[Token], src: Source):
        self.toks = tokens
        self.src = src
        self.i = 0

    # ---- token helpers ----------------------------------------------------------------------
    @property
    def tok(self) -> Token:
        return self.toks[self.i]

    def peek(self, k: int = 1) -> Token:
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def loc(self, tok: Token | None = None) -> Loc:
        line, col = self.src.linecol((tok or self.tok).offset)
        return Loc(line, col)

    def error(self, msg: str, tok: Token | None = None) -> MilSyntaxError:
        return self.src.error(msg, (tok or self.tok).offset)

    def advance(self) -> Token:
        tok = self.toks[self.i]
        if tok.kind != "eof":
            self.i += 1
        return tok

    def is_punct(self, p: str, tok: Token | None = None) -> bool:
        tok = tok or self.tok
        return tok.kind == "punct" and tok.text == p

    def is_word(self, w: str, tok: Token | None = None) -> bool:
        tok = tok or self.tok
        return tok.kind == "ident" and tok.text == w

    def expect(self, p: str, where: str) -> Token:
        if not self.is_punct(p):
            raise self.error(f"expected '{p}' {where}, found {_describe(self.tok)}")
        return self.advance()

    def expect_word(self, w: str, where: str) -> Token:
        if not self.is_word(w):
            raise self.error(f"expected '{w}' {where}, found {_describe(self.tok)}")
        return self.advance()

    def ident(self, what: str) -> Token:
        if self.tok.kind != "ident":
            raise self.error(f"expected {what}, found {_describe(self.tok)}")
        return self.advance()

    def value_name(self, what: str) -> Token:
        tok = self.ident(what)
        if tok.text in RESERVED:
            raise self.error(f"'{tok.text}' is a reserved word and cannot be used as {what}", tok)
        return tok

    # ---- program ----------------------------------------------------------------------------
    def program(self) -> Program:
        start = self.expect_word("program", "at the start of a MIL program")
        self.expect("(", "after 'program'")
        vtok = self.tok
        if vtok.kind not in ("float", "int") or not all(p.isdigit() for p in vtok.text.split(".")):
            raise self.error(f"expected a program version like 1.3, found {_describe(vtok)}")
        self.advance()
        self.expect(")", "after the program version")
        build_info: dict[str, str] = {}
        form = "short"
        if self.is_punct("["):
            build_info, form = self.build_info()
        self.expect("{", "to open the program body")
        functions: dict[str, Function] = {}
        while not self.is_punct("}"):
            if self.tok.kind == "eof":
                raise self.error("expected 'func' or '}' to close the program, found end of input")
            ftok = self.tok
            fn = self.function()
            if fn.name in functions:
                raise self.error(f"duplicate function '{fn.name}'", ftok)
            functions[fn.name] = fn
        close = self.advance()
        if not functions:
            raise self.error("program has no functions (expected 'func main<ios18>(...) {...} -> (...);')", close)
        if self.tok.kind != "eof":
            raise self.error(f"unexpected {_describe(self.tok)} after the end of the program")
        return Program(vtok.text, build_info, functions, self.loc(start), form)

    def build_info(self) -> tuple[dict[str, str], str]:
        self.expect("[", "")
        self.expect_word("buildInfo", "in the program attributes")
        self.expect("=", "after 'buildInfo'")
        dtok = self.expect_word("dict", "as the buildInfo value")
        self.expect("<", "after 'dict'")
        ktype = self.type_()
        self.expect(",", "between the dict key and value types")
        vtype = self.type_()
        self.expect(">", "to close the dict type")
        if ktype.dtype != STRING or vtype.dtype != STRING or ktype.shape or vtype.shape:
            raise self.error("buildInfo must be a dict of strings to strings", dtok)
        if ktype.scalar_form != vtype.scalar_form:
            raise self.error("buildInfo dict mixes 'string' and 'tensor<string, []>' key/value types", dtok)
        form = "short" if ktype.scalar_form else "verbose"
        self.expect("(", "before the buildInfo entries")
        self.expect("{", "to open the buildInfo entries")
        info: dict[str, str] = {}
        if not self.is_punct("}"):
            while True:
                self.expect("{", "to open a buildInfo entry {\"key\", \"value\"}")
                ktok = self.string_token("a buildInfo key")
                self.expect(",", "between a buildInfo key and its value")
                vtok = self.string_token("a buildInfo value")
                self.expect("}", "to close a buildInfo entry")
                if ktok.text in info:
                    raise self.error(f"duplicate buildInfo key {ktok.text!r}", ktok)
                info[ktok.text] = vtok.text
                if self.is_punct(","):
                    self.advance()
                    continue
                if not self.is_punct("}"):
                    raise self.error(f"expected ',' or '}}' in the buildInfo entries, found {_describe(self.tok)}")
                break
        self.expect("}", "to close the buildInfo entries")
        self.expect(")", "after the buildInfo entries")
        self.expect("]", "to close the program attributes")
        return info, form

    def string_token(self, what: str) -> Token:
        if self.tok.kind != "string":
            raise self.error(f"expected {what} (a \"quoted string\"), found {_describe(self.tok)}")
        return self.advance()

    # ---- functions --------------------------------------------------------------------------
    def function(self) -> Function:
        ftok = self.expect_word("func", "to start a function")
        name = self.value_name("a function name")
        self.expect("<", "before the function opset (e.g. <ios18>)")
        opset = self.ident("an opset name like ios18")
        self.expect(">", "after the function opset")
        self.expect("(", "to open the parameter list")
        params: list[Param] = []
        defined: set[str] = set()
        if not self.is_punct(")"):
            while True:
                ptype_tok = self.tok
                ptype = self.type_()
                ptok = self.value_name("a parameter name")
                if ptok.text in defined:
                    raise self.error(f"duplicate parameter '{ptok.text}'", ptok)
                defined.add(ptok.text)
                params.append(Param(ptype, ptok.text, self.loc(ptype_tok)))
                if self.is_punct(","):
                    self.advance()
                    continue
                if not self.is_punct(")"):
                    raise self.error(f"expected ',' or ')' in the parameter list, found {_describe(self.tok)}")
                break
        self.advance()
        self.expect("{", "to open the function body")
        body: list[Statement] = []
        while not self.is_punct("}"):
            if self.tok.kind == "eof":
                raise self.error("expected a statement or '}' to close the function body, found end of input")
            body.append(self.statement(defined))
        self.advance()
        self.expect("->", "after the function body (the return tuple '-> (out);')")
        self.expect("(", "to open the return tuple")
        returns: list[Ref] = []
        while True:
            rtok = self.ident("a returned value name")
            returns.append(Ref(rtok.text, self.loc(rtok)))
            if self.is_punct(","):
                self.advance()
                continue
            if not self.is_punct(")"):
                raise self.error(f"expected ',' or ')' in the return tuple, found {_describe(self.tok)}")
            break
        self.advance()
        self.expect(";", "after the return tuple")
        return Function(name.text, opset.text, tuple(params), tuple(body), tuple(returns), self.loc(ftok))

    def statement(self, defined: set[str]) -> Statement:
        stok = self.tok
        stype = self.type_()
        ntok = self.value_name("the statement's output name")
        if ntok.text in defined:
            raise self.error(f"duplicate name '{ntok.text}' (already defined above)", ntok)
        self.expect("=", f"after the output name '{ntok.text}'")
        otok = self.ident("an operation name")
        self.expect("(", f"after the operation name '{otok.text}'")
        args: dict[str, Value] = {}
        if not self.is_punct(")"):
            while True:
                atok = self.ident("an argument name")
                if atok.text in args:
                    raise self.error(f"duplicate argument '{atok.text}'", atok)
                self.expect("=", f"after the argument name '{atok.text}'")
                args[atok.text] = self.value(defined, 0)
                if self.is_punct(","):
                    self.advance()
                    continue
                if not self.is_punct(")"):
                    raise self.error(f"expected ',' or ')' in the argument list, found {_describe(self.tok)}")
                break
        self.advance()
        attrs: dict[str, Literal] = {}
        name_tok: Token | None = None
        if self.is_punct("["):
            self.advance()
            while True:
                atok = self.ident("an attribute name")
                if atok.text in attrs:
                    raise self.error(f"duplicate attribute '{atok.text}'", atok)
                self.expect("=", f"after the attribute name '{atok.text}'")
                lit_tok = self.tok
                if atok.text == "name":
                    name_tok = lit_tok
                lit = self.literal_value()
                if lit is None:
                    raise self.error(
                        f"attribute '{atok.text}' needs a typed literal (e.g. string(\"x\"), int32(1)), "
                        f"found {_describe(lit_tok)}",
                        lit_tok,
                    )
                attrs[atok.text] = lit
                if self.is_punct(","):
                    self.advance()
                    continue
                if not self.is_punct("]"):
                    raise self.error(f"expected ',' or ']' in the attribute list, found {_describe(self.tok)}")
                break
            self.advance()
        self.expect(";", "at the end of the statement")
        name_attr = attrs.get("name")
        if name_attr is not None and name_attr.type.dtype != STRING:
            raise self.error("the 'name' attribute must be a string, e.g. name = string(\"y\")", name_tok)
        if otok.text == "const":
            self.check_const(stype, ntok, args, attrs, otok)
        defined.add(ntok.text)
        return Statement(stype, ntok.text, otok.text, args, attrs, self.loc(stok))

    def check_const(self, stype: TensorType, ntok: Token, args: dict, attrs: dict, otok: Token) -> None:
        if args:
            raise self.error(f"const '{ntok.text}' takes no arguments; put its value in [val = ...]", otok)
        val = attrs.get("val")
        if val is None:
            raise self.error(f"const '{ntok.text}' has no 'val' attribute", otok)
        if val.type.dtype != stype.dtype or val.type.shape != stype.shape:
            raise self.error(
                f"const '{ntok.text}' is declared {_type_str(stype)} but its val is {_type_str(val.type)}", ntok
            )

    # ---- values -----------------------------------------------------------------------------
    def value(self, defined: set[str], depth: int) -> Value:
        tok = self.tok
        if depth > MAX_DEPTH:
            raise self.error(f"values nested deeper than {MAX_DEPTH} levels")
        if self.is_punct("("):
            self.advance()
            items: list[Value] = []
            if not self.is_punct(")"):
                while True:
                    items.append(self.value(defined, depth + 1))
                    if self.is_punct(","):
                        self.advance()
                        continue
                    if not self.is_punct(")"):
                        raise self.error(f"expected ',' or ')' in the tuple, found {_describe(self.tok)}")
                    break
            self.advance()
            return TupleValue(tuple(items), self.loc(tok))
        lit = self.literal_value()
        if lit is not None:
            return lit
        if tok.kind == "ident":
            self.advance()
            if tok.text not in defined:
                raise self.error(f"undefined name '{tok.text}' (values must be defined before they are used)", tok)
            return Ref(tok.text, self.loc(tok))
        if tok.kind in ("int", "float") or self.is_punct("-") or self.is_punct("+"):
            raise self.error("bare number; write a typed literal such as int32(1) or fp16(0.5)")
        if tok.kind == "string":
            raise self.error("bare string; write a typed literal such as string(\"valid\")")
        raise self.error(f"expected a value (name, literal or tuple), found {_describe(tok)}")

    def literal_value(self) -> Literal | None:
        """A typed literal or bare true/false at the cursor, or None if the cursor is not at one."""
        tok = self.tok
        if tok.kind != "ident":
            return None
        if tok.text in ("true", "false"):
            self.advance()
            ltype = TensorType("bool", (), True)
            return Literal(ltype, np.array(tok.text == "true", dtype=np.bool_), self.loc(tok), tok.text)
        if tok.text == "tensor" and self.is_punct("<", self.peek()):
            ltype = self.type_()
            return self.literal_body(ltype, tok)
        if tok.text in DTYPE_NAMES and self.is_punct("(", self.peek()):
            ltype = self.type_()
            return self.literal_body(ltype, tok)
        return None

    def literal_body(self, ltype: TensorType, start: Token) -> Literal:
        loc = self.loc(start)
        self.expect("(", f"after the literal type {_type_str(ltype)}")
        if self.is_word("BLOBFILE"):
            if ltype.dtype == STRING:
                raise self.error("a string tensor cannot come from a BLOBFILE")
            blob = self.blobfile()
            self.expect(")", "after BLOBFILE(...)")
            return Literal(ltype, blob, loc)
        if ltype.dtype == STRING:
            if ltype.shape:
                raise self.error("string tensors of rank > 0 are not supported; use a string scalar")
            stok = self.string_token("a string value")
            self.expect(")", "after the string value")
            return Literal(ltype, stok.text, loc)
        if self.is_punct("["):
            if not ltype.shape:
                raise self.error(f"{_type_str(ltype)} is a scalar type; write its value without brackets")
            flat, tokens, nested_shape = self.element_list(ltype)
            self.expect(")", "after the tensor value")
            array = self.to_array(flat, tokens, ltype)
            # With a zero-sized dimension the nesting below it is invisible ([[]] for [1, 0, 0]).
            if nested_shape is not None and nested_shape != ltype.shape and array.size:
                raise self.error(
                    f"tensor value has nested shape {list(nested_shape)} but the type says {list(ltype.shape)}",
                    start,
                )
            return Literal(ltype, array.reshape(ltype.shape), loc)
        if ltype.shape:
            raise self.error(f"{_type_str(ltype)} needs a bracketed value list like [1, 2]")
        etok = self.tok
        elem, text = self.element()
        self.expect(")", "after the scalar value")
        array = self.to_array([elem], [etok], ltype)
        return Literal(ltype, array.reshape(()), loc, text)

    def blobfile(self) -> BlobRef:
        btok = self.advance()
        self.expect("(", "after 'BLOBFILE'")
        fields: dict[str, Literal] = {}
        while True:
            ftok = self.ident("'path' or 'offset' in BLOBFILE(...)")
            if ftok.text not in ("path", "offset"):
                raise self.error(f"unknown BLOBFILE field '{ftok.text}' (expected 'path' or 'offset')", ftok)
            if ftok.text in fields:
                raise self.error(f"duplicate BLOBFILE field '{ftok.text}'", ftok)
            self.expect("=", f"after '{ftok.text}'")
            vtok = self.tok
            lit = self.literal_value()
            if lit is None:
                raise self.error(f"BLOBFILE {ftok.text} needs a typed literal, found {_describe(vtok)}", vtok)
            if ftok.text == "path" and (lit.type.dtype != STRING or not isinstance(lit.value, str)):
                raise self.error("BLOBFILE path must be a string, e.g. string(\"@model_path/weights/w.bin\")", vtok)
            if ftok.text == "offset" and (lit.type.dtype not in ("uint64", "int64", "uint32", "int32") or lit.type.shape):
                raise self.error("BLOBFILE offset must be an integer scalar, e.g. uint64(64)", vtok)
            fields[ftok.text] = lit
            if self.is_punct(","):
                self.advance()
                continue
            if not self.is_punct(")"):
                raise self.error(f"expected ',' or ')' in BLOBFILE(...), found {_describe(self.tok)}")
            break
        self.advance()
        for f in ("path", "offset"):
            if f not in fields:
                raise self.error(f"BLOBFILE(...) is missing '{f}'", btok)
        offset = int(fields["offset"].value)
        if offset < 0:
            raise self.error("BLOBFILE offset must not be negative", btok)
        return BlobRef(str(fields["path"].value), offset)

    def element(self) -> tuple[object, str]:
        """One scalar element: number (optionally signed), true/false, inf/nan. Returns (value, text)."""
        tok = self.tok
        sign = ""
        if self.is_punct("-") or self.is_punct("+"):
            sign = tok.text
            self.advance()
        etok = self.tok
        if etok.kind in ("int", "float"):
            self.advance()
            value = etok.value
            return (-value if sign == "-" else value), sign + etok.text
        if etok.kind == "ident" and etok.text in _SPECIAL_FLOATS:
            self.advance()
            value = _SPECIAL_FLOATS[etok.text]
            return (-value if sign == "-" else value), sign + etok.text
        if etok.kind == "ident" and etok.text in ("true", "false") and not sign:
            self.advance()
            return etok.text == "true", etok.text
        raise self.error(f"expected a number, true or false, found {_describe(etok)}", etok)

    def element_list(self, ltype: TensorType):
        """A bracketed (possibly nested) list. Returns (flat values, their tokens, nested shape or None)."""
        flat: list[object] = []
        toks: list[Token] = []
        limit = MAX_INLINE_ELEMENTS

        def walk(depth: int) -> tuple[int, ...] | None:
            if depth > MAX_DEPTH:
                raise self.error(f"tensor value nested deeper than {MAX_DEPTH} levels")
            self.expect("[", "")
            sub: list[tuple[int, ...] | None] = []
            count = 0
            if not self.is_punct("]"):
                while True:
                    if self.is_punct("["):
                        sub.append(walk(depth + 1))
                    else:
                        toks.append(self.tok)
                        flat.append(self.element()[0])
                        sub.append(())
                        if len(flat) > limit:
                            raise self.error(f"inline tensor value has more than {limit} elements; use a BLOBFILE")
                    count += 1
                    if self.is_punct(","):
                        self.advance()
                        continue
                    if not self.is_punct("]"):
                        raise self.error(f"expected ',' or ']' in the tensor value, found {_describe(self.tok)}")
                    break
            self.advance()
            # A regular nesting has the same sub-shape everywhere; anything else is reported as None.
            if any(s is None for s in sub) or len(set(sub)) > 1:
                return None
            return (count,) + (sub[0] if sub else ())

        start = self.tok
        shape = walk(0)
        if shape is None:
            raise self.error("tensor value has ragged nesting (rows of different lengths or depths)", start)
        expected = math.prod(ltype.shape)
        if len(flat) != expected:
            raise self.error(
                f"tensor value has {len(flat)} elements but {_type_str(ltype)} needs {expected}", start
            )
        return flat, toks, shape if len(shape) > 1 else None

    def to_array(self, values: list, tokens: list[Token], ltype: TensorType) -> np.ndarray:
        dt = ltype.dtype
        np_dt = DTYPES[dt]
        if dt == "bool":
            for v, t in zip(values, tokens):
                if not isinstance(v, bool):
                    raise self.error(f"{dt} values must be true or false", t)
            return np.array(values, dtype=np.bool_)
        if dt in _FLOAT_DTYPES:
            for v, t in zip(values, tokens):
                if isinstance(v, bool):
                    raise self.error(f"{dt} values must be numbers, not true/false", t)
            floats = []
            for v, t in zip(values, tokens):
                try:
                    floats.append(float(v))
                except OverflowError:
                    raise self.error(f"value {v!r} is out of range for {dt}", t) from None
            src = np.array(floats, dtype=np.float64)
            with np.errstate(over="ignore", invalid="ignore"):
                out = src.astype(np_dt)
            bad = np.isfinite(src) & ~np.isfinite(out)
            if bad.any():
                k = int(np.argmax(bad))
                raise self.error(f"value {values[k]!r} is out of range for {dt}", tokens[k])
            return out
        info = np.iinfo(np_dt)
        for v, t in zip(values, tokens):
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.error(f"{dt} values must be integers", t)
            if not info.min <= v <= info.max:
                raise self.error(f"value {v} is out of range for {dt} [{info.min}, {info.max}]", t)
        return np.array(values, dtype=np_dt)

    # ---- types ------------------------------------------------------------------------------
    def type_(self) -> TensorType:
        tok = self.ident("a type (e.g. fp16 or tensor<fp16, [1, 64, 1, 32]>)")
        if tok.text in DTYPE_NAMES:
            return TensorType(tok.text, (), True)
        if tok.text != "tensor":
            raise self.error(
                f"unknown type '{tok.text}' (expected tensor<...> or one of {', '.join(sorted(DTYPE_NAMES))})", tok
            )
        self.expect("<", "after 'tensor'")
        dtok = self.ident("a dtype")
        if dtok.text not in DTYPE_NAMES:
            raise self.error(f"unknown dtype '{dtok.text}' (known: {', '.join(sorted(DTYPE_NAMES))})", dtok)
        self.expect(",", "after the tensor dtype")
        self.expect("[", "to open the tensor shape")
        dims: list[int] = []
        if not self.is_punct("]"):
            while True:
                d = self.tok
                if d.kind != "int":
                    raise self.error(f"expected a non-negative integer dimension, found {_describe(d)}")
                if d.value > MAX_DIM:
                    raise self.error(f"dimension {d.text} is larger than {MAX_DIM}")
                dims.append(d.value)
                self.advance()
                if len(dims) > MAX_DEPTH:
                    raise self.error(f"tensor rank above {MAX_DEPTH}")
                if self.is_punct(","):
                    self.advance()
                    continue
                if not self.is_punct("]"):
                    raise self.error(f"expected ',' or ']' in the tensor shape, found {_describe(self.tok)}")
                break
        self.advance()
        self.expect(">", "to close the tensor type")
        return TensorType(dtok.text, tuple(dims), False)


def _type_str(t: TensorType) -> str:
    if t.scalar_form:
        return t.dtype
    return f"tensor<{t.dtype}, [{', '.join(map(str, t.shape))}]>"
