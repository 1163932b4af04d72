"""Fusing runs of fp16 elementwise ops into one row program (csrc/sim_rows.h).

In fp16 mode every op of the interpreter widens its fp16 operands into fp32 scratch, computes
and rounds its result into an fp16 tensor (``rustane.mil.ops``): three or four memory passes
per op. Over attention scores ([heads, S, S]) the chains ``scale, mask, softmax`` and
``P*dP, rowsum, dP-rowsum, P*., *scale`` cost more than the matmuls around them at seq 1024
(docs/benchmarks.md#fp16-row-programs). Here such a run becomes one step that walks the rows
once, keeping each intermediate in a row-sized fp32 register rounded to fp16 exactly where the
unfused op rounded it, so the bits are the same (the C file says why, op by op;
tests/test_fuse_rows.py checks every kernel of every preset against the unfused interpreter).

What is fused (fp16 precision only, all results fp16): add, sub, mul, real_div, softmax over
the last axis, silu and sigmoid (where the unfused op uses its native row function), and
reduce_sum over the last axis. A run is a stretch of such nodes in plan order that share one
row geometry: the same leading dimensions and row length (a row sum makes a one-value row).
Views that do not read the run's values may sit between its nodes; anything else ends it.
A value of the run is written out only when something outside the run reads it.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np

from rustane.array_views import memory_root

from .plan import F16, F32, Node

__all__ = ["RowRun", "row_runs", "bind_run"]

_BINARY = ("add", "sub", "mul", "real_div")
_ROWS_FN = {"silu_rows": "silu", "sigmoid_rows": "sigmoid"}
#: numpy's ufunc buffer (elements): a longer fp16 row is widened and summed in pieces of this
#: size, added one after another, which is not the pairwise order of the whole row
NUMPY_BUFSIZE = 8192
#: below this many element-instructions a run is not handed to the split helper (~45 µs hand-off)
MIN_SPLIT_WORK = 1 << 19


@dataclasses.dataclass
class RowRun:
    """Node indices of one fusible run (plan order), its row geometry and the names it exposes."""

    members: list[int]
    lead: tuple[int, ...]  # leading dimensions: rows = prod(lead)
    n: int  # row length
    escaping: set[str]  # member values read outside the run (stored to their fp16 arrays)


def _kind(node: Node, values) -> str | None:
    """The row-program op of ``node``, or None when it cannot join a run."""
    if node.kind != "compute" or values[node.name].storage != F16:
        return None
    if any(values[i].storage != F16 for i in node.inputs):
        return None
    meta = node.meta or {}
    if node.op in _BINARY:
        return node.op
    if node.op == "softmax" and meta.get("axis") == len(node.shape) - 1:
        return "softmax"
    if node.op in ("silu", "sigmoid") and meta.get("rows_fn") in _ROWS_FN:
        return _ROWS_FN[meta["rows_fn"]]
    if node.op == "reduce_sum" and len(node.inputs) == 1:
        return "reduce_sum"
    return None


def _geometry(node: Node, kind: str, values) -> tuple[tuple[int, ...], int] | None:
    """(leading dims, row length) of the rows ``node`` works on, or None."""
    if kind == "reduce_sum":
        xs = values[node.inputs[0]].shape
        if not xs or node.meta.get("axes") != (len(xs) - 1,):
            return None
        return tuple(xs[:-1]), xs[-1]
    if not node.shape:
        return None
    return tuple(node.shape[:-1]), node.shape[-1]


def _fits(node: Node, kind: str, lead: tuple, n: int, values) -> bool:
    """Every operand and the result of ``node`` map onto rows ``lead`` x (n or 1)."""
    shapes = [values[i].shape for i in node.inputs] + [node.shape]
    if kind == "reduce_sum":
        # keep_dims sums only (one value per row), of rows numpy sums in one piece
        return tuple(node.shape) == lead + (1,) and n <= NUMPY_BUFSIZE
    for s in shapes:
        try:
            if np.broadcast_shapes(s, lead + (n,)) != lead + (n,):
                return False
        except ValueError:
            return False
    return tuple(node.shape) in (lead + (n,), lead + (1,)) and (node.shape[-1] == n or kind in _BINARY)


def row_runs(nodes: list[Node], values, output_names) -> list[RowRun]:
    """The runs of ``nodes`` worth fusing (two or more members)."""
    readers: dict[str, set[int]] = {}
    for i, nd in enumerate(nodes):
        for name in nd.inputs:
            readers.setdefault(name, set()).add(i)
    runs: list[RowRun] = []
    cur: list[int] = []
    geo = None

    def close():
        nonlocal cur, geo
        if len(cur) >= 2:
            names = {nodes[i].name for i in cur}
            members = set(cur)
            esc = {nm for nm in names
                   if nm in output_names or readers.get(nm, set()) - members}
            runs.append(RowRun(list(cur), geo[0], geo[1], esc))
        cur, geo = [], None

    for i, nd in enumerate(nodes):
        if nd.kind == "view":
            if cur and any(nodes[j].name in nd.inputs for j in cur):
                close()
            continue
        kind = _kind(nd, values)
        g = _geometry(nd, kind, values) if kind else None
        if g is None or not _fits(nd, kind, g[0], g[1], values):
            close()
            continue
        if cur and g != geo:
            close()
        if cur and any(values[name].shape not in (geo[0] + (geo[1],), geo[0] + (1,))
                       for name in nd.inputs if name in {nodes[j].name for j in cur}):
            close()  # a member's value broadcast along leading axes: not a row operand
        if not cur:
            geo = g
        cur.append(i)
    close()
    return runs


def _operand(a: np.ndarray, lead: tuple[int, ...], n: int):
    """(root, width, col_stride, row_off) reading ``a`` broadcast onto rows ``lead``, or None."""
    width = n if a.ndim and a.shape[-1] == n and n != 1 else 1
    try:
        b = np.broadcast_to(a, lead + (width,))
    except ValueError:
        return None
    root = memory_root(a)
    if not isinstance(root, np.ndarray) or not root.flags.c_contiguous or root.dtype not in (F16, F32):
        return None
    item = root.itemsize
    start = b.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    if start % item or any(s % item for s in b.strides):
        return None
    off = np.full(lead, start // item, dtype=np.int64)
    for ax, (dim, st) in enumerate(zip(lead, b.strides[:-1])):
        shape = [1] * len(lead)
        shape[ax] = dim
        off += (np.arange(dim, dtype=np.int64) * (st // item)).reshape(shape)
    return root, width, (b.strides[-1] // item) if width > 1 else 0, np.ascontiguousarray(off.reshape(-1))


def bind_run(run: RowRun, nodes: list[Node], arrays: dict, splitter=None):
    """The step running ``run``: ``arrays`` maps every value name the run reads from outside to
    its bound array, and every escaping member to the fp16 array to fill. None when some
    operand's layout has no row form (the caller then binds the members one by one)."""
    from rustane import _cpu
    from .ops import whole_buffer_permutation
    from .split import _step

    lead, n = run.lead, run.n
    rows = int(np.prod(lead, dtype=np.int64))
    ops: list[tuple[int, int, int, int]] = []
    args: list[tuple] = []
    widths: list[int] = []
    reg: dict[str, int] = {}
    code = _cpu.ROW_OPS

    def new_reg(width: int) -> int:
        widths.append(width)
        return len(widths) - 1

    def arg_of(a: np.ndarray) -> int | None:
        o = _operand(a, lead, n)
        if o is None:
            return None
        args.append(o)
        return len(args) - 1

    for idx in run.members:
        nd = nodes[idx]
        kind = nd.op if nd.op in _BINARY or nd.op in ("softmax", "reduce_sum") else _ROWS_FN[nd.meta["rows_fn"]]
        srcs = []
        for name in nd.inputs:
            if name not in reg:
                a = arrays[name]
                if kind in ("softmax", "silu", "sigmoid") and whole_buffer_permutation(a) is not None:
                    return None  # unfused, this input widens to a strided view: numpy's softmax
                if kind == "reduce_sum" and not a.flags.c_contiguous:
                    return None  # numpy may sum a strided row in another order
                k = arg_of(a)
                if k is None:
                    return None
                reg[name] = new_reg(args[k][1])
                ops.append((code["load"], reg[name], k, 0))
            srcs.append(reg[name])
        if kind == "reduce_sum":
            dst = new_reg(1)
        elif kind in _BINARY:
            dst = new_reg(max(widths[s] for s in srcs))
        else:
            dst = new_reg(widths[srcs[0]])
        ops.append((code[kind], dst, srcs[0], srcs[1] if len(srcs) > 1 else 0))
        reg[nd.name] = dst
        if nd.name in run.escaping:
            k = arg_of(arrays[nd.name])
            if k is None or args[k][1] != widths[dst]:
                return None
            ops.append((code["store"], 0, k, dst))
    prog = _cpu.RowProgram(np.array(ops, dtype=np.int32).reshape(-1, 4), args, widths, rows, n)
    whole = prog.run
    if splitter is None or rows < 2 or rows * n * len(ops) < MIN_SPLIT_WORK:
        return whole
    half = rows // 2
    return partial(_step, splitter, whole, partial(prog.run, half, rows), partial(prog.run, 0, half))
