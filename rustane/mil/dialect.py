"""Rewrite programs between the two MIL text dialects the ANE accepts (docs/ane-runtime.md#mil-text).

Our templates are written in the ``program(1.3)`` / ``func main<ios18>`` dialect with short scalars
(``int32(1)``). Some chip/OS pairs (reported for M1/M2 on macOS 26) only compile the older
``program(1.0)`` / ``func main<ios16>`` form, where every scalar is written as a rank-0 tensor
(``tensor<int32, []>(1)``) and buildInfo is a ``dict<tensor<string, []>, tensor<string, []>>``.
``rustane.probe`` finds out which one this machine takes; the ANE backend converts with
:func:`to_dialect` before compiling. The program's meaning is unchanged: only spelling differs.
"""

from __future__ import annotations

import dataclasses

from .ast import Literal, Program, Statement, TensorType, TupleValue

DIALECTS = {"ios18": ("1.3", "short"), "ios16": ("1.0", "verbose")}
_IOS16_BUILD_INFO = {"coremlc-version": "3505.4.1"}


def _type(t: TensorType, verbose: bool) -> TensorType:
    if t.shape:
        return t
    return dataclasses.replace(t, scalar_form=not verbose)


def _value(v, verbose: bool):
    if isinstance(v, Literal):
        return dataclasses.replace(v, type=_type(v.type, verbose))
    if isinstance(v, TupleValue):
        return dataclasses.replace(v, items=tuple(_value(i, verbose) for i in v.items))
    return v


def _statement(st: Statement, verbose: bool) -> Statement:
    return dataclasses.replace(
        st, type=_type(st.type, verbose),
        args={k: _value(v, verbose) for k, v in st.args.items()},
        attrs={k: _value(v, verbose) for k, v in st.attrs.items()},
    )


def to_dialect(program: Program, dialect: str) -> Program:
    """``program`` spelled in ``dialect`` ('ios18' or 'ios16')."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown MIL dialect {dialect!r}; expected one of {sorted(DIALECTS)}")
    version, form = DIALECTS[dialect]
    verbose = form == "verbose"
    functions = {
        name: dataclasses.replace(
            fn, opset=dialect,
            params=tuple(dataclasses.replace(p, type=_type(p.type, verbose)) for p in fn.params),
            body=tuple(_statement(st, verbose) for st in fn.body))
        for name, fn in program.functions.items()
    }
    build_info = _IOS16_BUILD_INFO if verbose else program.build_info
    if not verbose and program.build_info_form == "verbose":
        build_info = program.build_info
    return dataclasses.replace(program, version=version, build_info=dict(build_info),
                               build_info_form=form, functions=functions)

