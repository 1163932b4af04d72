"""Program -> canonical MIL text, in the spacing of coremlc / the proven training kernels (docs/ane-runtime.md#mil-text).

Layout: ``program(1.3)``, the ``[buildInfo = ...]`` line (always written, possibly empty), ``{``,
each function indented 4 spaces with its statements at 8, ``    } -> (a, b);`` and ``}``.
Separators are ``, `` and `` = ``: ``tensor<fp16, [1, 768, 1, 256]>``, ``add(x = a, y = b)``,
``[name = string("y")]``, ``tensor<int32, [4]>([0, 0, 0, 256])``.

Arguments and attributes keep their source order. Float scalars keep their original spelling
(``fp16(0x1p-3)`` stays hex) when the parser recorded one; otherwise floats are written as the
shortest text that reads back to the same value. Bare ``true``/``false`` arguments become
``bool(true)``/``bool(false)``; tensor values are written nested, one bracket level per dimension.
In the verbose (program(1.0)) dialect, i.e. when buildInfo was verbose, BLOBFILE fields are written
verbosely too (``offset = tensor<uint64, []>(64)``, docs/ane-runtime.md#mil-text).
"""

from __future__ import annotations

import math

import numpy as np

from .ast import STRING, BlobRef, Function, Literal, Program, Ref, Statement, TensorType, TupleValue, Value

_FLOAT_DTYPES = ("fp16", "fp32", "fp64")
_INDENT = "    "


def emit(program: Program) -> str:
    """Return the canonical MIL text of ``program`` (ends with a newline)."""
    lines = [f"program({program.version})", _build_info(program), "{"]
    for fn in program.functions.values():
        lines.extend(_function(fn, program.build_info_form == "verbose"))
    lines.append("}")
    return "\n".join(lines) + "\n"


def format_type(t: TensorType) -> str:
    """``fp16`` (bare scalar) or ``tensor<fp16, [1, 64, 1, 32]>``."""
    if t.scalar_form and not t.shape:
        return t.dtype
    return f"tensor<{t.dtype}, [{', '.join(str(int(d)) for d in t.shape)}]>"


def format_string(s: str) -> str:
    out = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return f'"{out}"'


def format_number(v, dtype: str) -> str:
    """One element of dtype ``dtype`` as MIL text."""
    if dtype == "bool":
        return "true" if bool(v) else "false"
    if dtype not in _FLOAT_DTYPES:
        return str(int(v))
    f = float(v)
    if math.isnan(f):
        return "nan"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if f.is_integer() and abs(f) < 1e16:
        return f"{int(f)}.0" if f != 0 or math.copysign(1.0, f) > 0 else "-0.0"
    # numpy's str() is the shortest text that reads back to the same value *in this dtype*.
    return str(np.dtype({"fp16": np.float16, "fp32": np.float32, "fp64": np.float64}[dtype]).type(f))


def format_literal(lit: Literal, verbose_blob: bool = False) -> str:
    """``lit`` as MIL text; ``verbose_blob`` writes BLOBFILE fields as ``tensor<uint64, []>(64)``."""
    t = lit.type
    value = lit.value
    if isinstance(value, BlobRef):
        path, offset = format_string(value.path), int(value.offset)
        if verbose_blob:
            fields = f"path = tensor<string, []>({path}), offset = tensor<uint64, []>({offset})"
        else:
            fields = f"path = string({path}), offset = uint64({offset})"
        return f"{format_type(t)}(BLOBFILE({fields}))"
    if isinstance(value, str) or t.dtype == STRING:
        return f"{format_type(t)}({format_string(str(value))})"
    arr = np.asarray(value)
    if not t.shape:
        if t.dtype in _FLOAT_DTYPES and lit.text is not None:
            text = lit.text
        else:
            text = format_number(arr.reshape(()).item(), t.dtype)
        return f"{format_type(t)}({text})"
    arr = arr.reshape(t.shape)
    return f"{format_type(t)}({_nested(arr, t.dtype)})"


def _nested(arr: np.ndarray, dtype: str) -> str:
    if arr.ndim == 1:
        return "[" + ", ".join(format_number(v, dtype) for v in arr.tolist()) + "]"
    return "[" + ", ".join(_nested(sub, dtype) for sub in arr) + "]"


def format_value(v: Value, verbose_blob: bool = False) -> str:
    if isinstance(v, Ref):
        return v.name
    if isinstance(v, TupleValue):
        return "(" + ", ".join(format_value(i, verbose_blob) for i in v.items) + ")"
    if isinstance(v, Literal):
        return format_literal(v, verbose_blob)
    raise TypeError(f"not a MIL value: {v!r}")


def format_statement(st: Statement, verbose_blob: bool = False) -> str:
    """One statement without indentation; ``verbose_blob`` as in ``format_literal``."""
    args = ", ".join(f"{k} = {format_value(v, verbose_blob)}" for k, v in st.args.items())
    text = f"{format_type(st.type)} {st.name} = {st.op}({args})"
    if st.attrs:
        text += "[" + ", ".join(f"{k} = {format_literal(v, verbose_blob)}" for k, v in st.attrs.items()) + "]"
    return text + ";"


def _build_info(program: Program) -> str:
    if program.build_info_form == "verbose":
        dtype = "dict<tensor<string, []>, tensor<string, []>>"
    else:
        dtype = "dict<string, string>"
    entries = ", ".join(f"{{{format_string(k)}, {format_string(v)}}}" for k, v in program.build_info.items())
    return f"[buildInfo = {dtype}({{{entries}}})]"


def _function(fn: Function, verbose_blob: bool) -> list[str]:
    params = ", ".join(f"{format_type(p.type)} {p.name}" for p in fn.params)
    lines = [f"{_INDENT}func {fn.name}<{fn.opset}>({params}) {{"]
    lines.extend(_INDENT * 2 + format_statement(st, verbose_blob) for st in fn.body)
    lines.append(f"{_INDENT}}} -> ({', '.join(r.name for r in fn.returns)});")
    return lines


# ---- structural comparison (round-trip tests, caching) ------------------------------------------
def structure(program: Program):
    """A hashable, location-free description of ``program``: equal for programs that mean the same.

    Literal values compare by dtype, shape and exact bits (so ``-0.0 != 0.0`` and NaN == NaN);
    the original spelling of literals (``Literal.text``) and bare-vs-``bool(...)`` are ignored.
    """
    return (
        program.version,
        program.build_info_form,
        tuple(program.build_info.items()),
        tuple((name, _fn_key(fn)) for name, fn in program.functions.items()),
    )


def _type_key(t: TensorType):
    return (t.dtype, tuple(int(d) for d in t.shape), bool(t.scalar_form and not t.shape))


def _value_key(v):
    if isinstance(v, Ref):
        return ("ref", v.name)
    if isinstance(v, TupleValue):
        return ("tuple", tuple(_value_key(i) for i in v.items))
    if isinstance(v, Literal):
        val = v.value
        if isinstance(val, BlobRef):
            vk = ("blob", val.path, int(val.offset))
        elif isinstance(val, str):
            vk = ("str", val)
        else:
            arr = np.ascontiguousarray(val)
            vk = ("array", arr.dtype.str, arr.shape, arr.tobytes())
        return ("lit", _type_key(v.type), vk)
    raise TypeError(f"not a MIL value: {v!r}")


def _fn_key(fn: Function):
    return (
        fn.name,
        fn.opset,
        tuple((_type_key(p.type), p.name) for p in fn.params),
        tuple(
            (
                _type_key(st.type),
                st.name,
                st.op,
                tuple((k, _value_key(v)) for k, v in st.args.items()),
                tuple((k, _value_key(v)) for k, v in st.attrs.items()),
            )
            for st in fn.body
        ),
        tuple(r.name for r in fn.returns),
    )


def same_program(a: Program, b: Program) -> bool:
    """True when ``a`` and ``b`` are structurally equal (see ``structure``)."""
    return structure(a) == structure(b)
