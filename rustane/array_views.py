"""Layout questions about numpy views, shared by the CPU ops and the simulator's interpreter
(pure numpy: importable without the compiled extensions)."""

from __future__ import annotations

import numpy as np

__all__ = ["rows_view", "memory_root"]


def rows_view(a: np.ndarray) -> np.ndarray | None:
    """``a`` as a 2-D ``[rows, last axis]`` view without copying, or None when its layout does
    not allow one: rows must be contiguous and one fixed stride apart (slices of a wider buffer
    along the last axis qualify, transposes do not)."""
    if a.ndim == 0:
        return None
    n = a.shape[-1]
    v = a.view()
    try:
        v.shape = (-1, n) if n else (a.size, 0)
    except AttributeError:  # numpy: would need a copy
        return None
    if n > 1 and v.strides[1] != a.itemsize:
        return None
    return v


def memory_root(a: np.ndarray) -> np.ndarray:
    """The array that owns ``a``'s memory (the end of its ``.base`` chain)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a
