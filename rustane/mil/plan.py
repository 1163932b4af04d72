"""What a planned MIL statement is: the vocabulary shared by the interpreter and its op builders.

``rustane.mil.interp`` plans programs and ``rustane.mil.ops`` holds one builder per MIL op; both
need the value descriptions, the plan error and the storage rule below. Keeping them here lets
``ops`` depend on this module instead of on the interpreter that imports it, so the two form no
import cycle (tests/test_import_graph.py).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from . import ast as A

__all__ = ["F16", "F32", "PRECISIONS", "MilPlanError", "Node", "ValueInfo", "literal_value", "storage_dtype",
           "type_str"]

PRECISIONS = ("fp16", "fp32")
F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)


class MilPlanError(ValueError):
    """A MIL program the interpreter cannot plan: unknown op, shape/dtype mismatch, bad argument."""

    def __init__(self, message: str, loc: A.Loc | None = None, stmt: str | None = None):
        where = ""
        if stmt is not None:
            where += f"statement {stmt!r}"
        if loc is not None:
            where += (" " if where else "") + f"at line {loc.line}, column {loc.col}"
        super().__init__(f"{where}: {message}" if where else message)
        self.loc = loc
        self.stmt = stmt


def storage_dtype(mil_dtype: str, precision: str) -> np.dtype:
    """The numpy dtype a value of MIL dtype ``mil_dtype`` is kept in under ``precision``."""
    if mil_dtype == A.STRING:
        raise ValueError("string values have no numpy storage")
    if precision == "fp32" and mil_dtype == "fp16":
        return F32
    return A.DTYPES[mil_dtype]


def type_str(dtype: str, shape: Sequence[int]) -> str:
    return f"tensor<{dtype}, [{', '.join(str(int(s)) for s in shape)}]>"


@dataclasses.dataclass
class ValueInfo:
    """What compile time knows about one named value."""

    name: str
    dtype: str  # MIL dtype name ('fp16', 'int32', 'bool', 'string', ...)
    shape: tuple[int, ...]
    storage: np.dtype | None  # None for strings
    const: np.ndarray | str | None = None  # in storage dtype (read-only), if known at compile time
    raw: np.ndarray | str | None = None  # the constant in its MIL dtype (for static arguments)

    @property
    def is_const(self) -> bool:
        return self.const is not None


@dataclasses.dataclass
class Node:
    """One planned statement. ``make`` builds its run-time steps at bind time.

    kind 'compute': ``make(ins, out, bctx)`` returns a callable or a list of callables that fill
    ``out`` (shape ``shape``, dtype storage) from the input arrays ``ins``.
    kind 'view': ``make(ins, bctx)`` returns an array (normally a view of ``ins[0]``) or None
    when a view is impossible (the binder then falls back to ``copy_make``).
    """

    name: str
    op: str
    inputs: tuple[str, ...]
    dtype: str
    shape: tuple[int, ...]
    kind: str
    make: Callable
    loc: A.Loc | None = None
    #: what a fusion pass needs to know of the op beyond its inputs (rustane/mil/fuse_rows.py):
    #: ``{"axis": a}`` for softmax, ``{"axes": ..., "keep": ...}`` for reductions, ``{"rows_fn":
    #: name}`` for unary ops with a native row function
    meta: dict | None = None


def literal_value(lit: A.Literal, blobs: Mapping[str, bytes], st: A.Statement | None = None):
    """A Literal's value as a numpy array of its declared dtype/shape (BLOBFILE resolved) or str."""
    v = lit.value
    loc = lit.loc or (st.loc if st else None)
    name = st.name if st else None
    if isinstance(v, A.BlobRef):
        if v.path not in blobs:
            raise MilPlanError(
                f"BLOBFILE {v.path!r} was not supplied; pass it in blobs= (have: {sorted(blobs) or 'none'})",
                loc,
                name,
            )
        from .blob import read_blob

        try:
            arr = read_blob(blobs[v.path], v.offset, lit.type.np_dtype, tuple(lit.type.shape))
        except Exception as e:  # the blob reader's message says what is wrong with the file
            raise MilPlanError(f"BLOBFILE {v.path!r} offset {v.offset}: {e}", loc, name) from e
        return np.asarray(arr).reshape(lit.type.shape)
    if isinstance(v, str):
        return v
    return np.asarray(v, dtype=lit.type.np_dtype).reshape(lit.type.shape)
