"""MIL text toolchain: render templates, parse, check ANE rules, emit canonical text, blob files.

``rustane.mil.interp`` (the simulator) is a separate submodule, imported on demand only.
"""

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
from .blob import BlobError, blob_key, read_blob, write_blob, write_multi_blob
from .check import RULES, TARGETS, check, check_or_raise
from .emit import emit, same_program, structure
from .errors import Diagnostic, MilCheckError, MilSyntaxError, MilTemplateError
from .parser import parse
from .render import render, render_text, strip_comments

__all__ = [
    "DTYPES", "STRING", "BlobRef", "Function", "Literal", "Loc", "Param", "Program", "Ref", "Statement",
    "TensorType", "TupleValue", "Value",
    "BlobError", "blob_key", "read_blob", "write_blob", "write_multi_blob",
    "RULES", "TARGETS", "check", "check_or_raise",
    "emit", "same_program", "structure",
    "Diagnostic", "MilCheckError", "MilSyntaxError", "MilTemplateError",
    "parse", "render", "render_text", "strip_comments",
]
