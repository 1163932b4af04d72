"""MIL interpreter: a parsed ``Program`` becomes a ``Plan`` once; running it is numpy calls only.

Compile (``compile_program``) does all the thinking: it resolves every ``const`` (BLOBFILE data
through ``rustane.mil.blob.read_blob``), infers the shape and dtype of every statement and checks
them against the declared type (a mismatch names the statement, its line/column, declared and
inferred types), folds statements whose operands are all constant, and picks for each op a
builder from ``rustane.mil.ops``. Binding (``Plan.bind``) turns the plan plus concrete input and
output arrays into a ``Runner``: a flat list of zero-argument callables (mostly
``functools.partial`` of numpy ufuncs with ``out=`` buffers). View ops (reshape, transpose,
slice, expand_dims, squeeze) cost nothing at run time: their views are made at bind time.
``Runner.run()`` is ``for step in steps: step()``: no parsing, no string dispatch, no dict
lookups, no allocations beyond what numpy does inside a few composite ops.

Numerics (``precision``)
------------------------
``"fp32"``: exact math in fp32. Every value declared fp16 is *stored* as fp32 (fp16 constants
widen exactly), every op computes in fp32, nothing is rounded to fp16 -- including ``cast`` to
fp16, which becomes a plain copy. Inputs given as fp16 arrays are widened on entry; outputs
bound to fp16 arrays are rounded on exit (the only fp16 roundings in this mode).

``"fp16"``: a model of the ANE. Values are stored in their declared dtype (fp16 tensors as
fp16). Every op reads its fp16 operands, computes in fp32 and rounds its *result* to fp16
(round-to-nearest-even, numpy's cast). Reductions -- matmul, conv, reduce_*, softmax --
accumulate in fp32 inside the op and round once at the end. Composite ops (softmax, sigmoid,
silu, gelu, rsqrt with epsilon, ...) keep their internal temporaries in fp32 and round once.
For ``add/sub/mul/real_div/sqrt`` this is the correctly rounded fp16 result.

Where the hardware may differ: the ANE may accumulate dot products at another precision or
order (results can differ in the last fp16 bit or more for long reductions), may fuse chains
of elementwise ops without rounding in between, may flush fp16 subnormals to zero, and its
transcendental units (exp, sigmoid, pow) are approximations. Treat fp16 results as a model of
the rounding the ANE does, not a bit-exact emulation.

Concurrency: a plan's intermediate buffers are shared by all runners bound from it (one set of
scratch memory per compiled kernel, however many requests), so runners of the same plan must
not run concurrently. Kernel evaluation is synchronous, which is how the engine uses them.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from . import ast as A
from .plan import (  # noqa: F401  (re-exported: the interpreter's public vocabulary)
    F16, F32, PRECISIONS, MilPlanError, Node, ValueInfo, literal_value, storage_dtype, type_str,
)

__all__ = ["MilPlanError", "ValueInfo", "Plan", "Runner", "compile_program", "storage_dtype", "PRECISIONS"]


class BindContext:
    """Handed to op builders at bind time: constness of inputs and pooled scratch memory."""

    def __init__(self, plan: "Plan", node_index: int, consts: tuple[bool, ...], splitter=None):
        self._plan = plan
        self._node = node_index
        self._n = 0
        self.consts = consts
        #: ``rustane.mil.split.Splitter`` for big matmuls, or None (everything on this thread)
        self.splitter = splitter

    def scratch(self, shape: Sequence[int], dtype) -> np.ndarray:
        """A scratch array shared with every other binding of this plan (same op, same call)."""
        key = (self._node, self._n)
        self._n += 1
        shape = tuple(int(s) for s in shape)
        dtype = np.dtype(dtype)
        a = self._plan._pool.get(key)
        if a is None or a.shape != shape or a.dtype != dtype:
            a = np.empty(shape, dtype)
            self._plan._pool[key] = a
        return a


class Runner:
    """A plan bound to concrete input/output arrays. ``run()`` is the hot path."""

    __slots__ = ("steps", "outputs", "_plan")

    def __init__(self, plan: "Plan", steps: list, outputs: dict[str, np.ndarray]):
        self._plan = plan
        self.steps = tuple(steps)
        self.outputs = outputs

    def run(self) -> None:
        for step in self.steps:
            step()


class Plan:
    """A compiled MIL function. Build with ``compile_program``."""

    def __init__(self, fn: A.Function, precision: str, values: dict[str, ValueInfo], nodes: list[Node]):
        self.function = fn
        self.precision = precision
        self.values = values
        self.nodes = nodes
        self.input_names = tuple(p.name for p in fn.params)
        self.output_names = tuple(r.name for r in fn.returns)
        self._pool: dict = {}  # scratch/intermediate arrays shared by all bindings
        self._default: tuple[dict, Runner] | None = None
        self._materialize_cache: frozenset | None = None
        self._row_runs_cache: list | None = None

    # -- info ---------------------------------------------------------------------------
    def input_info(self, name: str) -> ValueInfo:
        return self.values[name]

    def output_info(self, name: str) -> ValueInfo:
        return self.values[name]

    # -- binding ------------------------------------------------------------------------
    def bind(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], splitter=None,
             fuse_rows: bool | None = None) -> Runner:
        """Bind arrays: ``inputs``/``outputs`` map every function input/output name to an array
        with the same number of elements as the MIL type (any float dtype; it is converted on
        entry/exit when it differs from the storage dtype). Input arrays are read at each
        ``run()``; output arrays are written. Arrays must be C-contiguous. ``splitter``
        (``rustane.mil.split.Splitter``) lets big matmuls use a helper thread (same bits).
        ``fuse_rows`` (default: on unless ``RUSTANE_FUSE_ROWS=0``) runs fp16 elementwise runs as
        row programs (``rustane.mil.fuse_rows``; same bits, fewer passes)."""
        steps: list = []
        arrays: dict[str, np.ndarray] = {}
        for name in self.input_names:
            info = self.values[name]
            if name not in inputs:
                raise ValueError(f"missing input {name!r} ({type_str(info.dtype, info.shape)})")
            arr = _as_shape(inputs[name], info, "input")
            if arr.dtype != info.storage:
                staged = self._pooled(("in", name), info.shape, info.storage)
                steps.append(_copier(staged, arr))
                arr = staged
            arrays[name] = arr
        for name, info in self.values.items():
            if info.is_const and not isinstance(info.const, str):
                arrays[name] = info.const
        direct = self._direct_outputs(outputs)
        run_of = {i: run for run in self._row_runs(fuse_rows) for i in run.members}
        for idx, node in enumerate(self.nodes):
            info = self.values[node.name]
            run = run_of.get(idx)
            if run is not None:
                # a fused run: its values get arrays only where read outside it, and its one
                # step is bound at its last member (every outside reader comes later)
                out = direct.get(node.name)
                if out is None and node.name in run.escaping:
                    out = self._pooled(("node", idx), info.shape, info.storage)
                arrays[node.name] = out
                if idx == run.members[-1]:
                    steps.extend(self._bind_run(run, arrays, splitter))
                continue
            ins = [arrays[n] for n in node.inputs]
            bctx = BindContext(self, idx, tuple(self.values[n].is_const for n in node.inputs), splitter)
            if node.kind == "view":
                v = node.make(ins, bctx)
                if v is None or (node.name in self._materialize and not v.flags.c_contiguous):
                    # a reshape of a non-contiguous view, or a transpose read by elementwise ops
                    # or reshapes: one copy into memory order here, instead of strided reads in
                    # every consumer (and a copy in each reshape of it)
                    out = self._pooled(("node", idx), info.shape, info.storage)
                    steps.append(_copier(out.reshape(ins[0].shape) if v is None else out, ins[0] if v is None else v))
                    v = out
                arrays[node.name] = v
            else:
                out = direct.get(node.name)
                if out is None:
                    out = self._pooled(("node", idx), info.shape, info.storage)
                made = node.make(ins, out, bctx)
                if isinstance(made, (list, tuple)):
                    steps.extend(made)
                else:
                    steps.append(made)
                arrays[node.name] = out
        bound_out: dict[str, np.ndarray] = {}
        for name in self.output_names:
            info = self.values[name]
            if name not in outputs:
                raise ValueError(f"missing output {name!r} ({type_str(info.dtype, info.shape)})")
            if name in direct:
                bound_out[name] = direct[name]
                continue
            dst = _as_shape(outputs[name], info, "output")
            steps.append(_copier(dst, arrays[name]))
            bound_out[name] = dst
        return Runner(self, steps, bound_out)

    def _row_runs(self, fuse_rows: bool | None) -> list:
        if fuse_rows is None:
            fuse_rows = os.environ.get("RUSTANE_FUSE_ROWS", "1") != "0"
        if not fuse_rows or self.precision != "fp16":
            return []
        if self._row_runs_cache is None:
            from . import fuse_rows as F
            from .ops import _extension

            cpu = _extension("_cpu")
            ok = cpu is not None and hasattr(cpu, "RowProgram")
            self._row_runs_cache = F.row_runs(self.nodes, self.values, set(self.output_names)) if ok else []
        return self._row_runs_cache

    def _bind_run(self, run, arrays: dict, splitter) -> list:
        """The fused step of ``run``, or (an operand without a row layout) its members' own steps."""
        from .fuse_rows import bind_run

        step = bind_run(run, self.nodes, arrays, splitter)
        if step is not None:
            return [step]
        steps: list = []
        for j in run.members:
            node = self.nodes[j]
            info = self.values[node.name]
            if arrays[node.name] is None:
                arrays[node.name] = self._pooled(("node", j), info.shape, info.storage)
            bctx = BindContext(self, j, tuple(self.values[n].is_const for n in node.inputs), splitter)
            made = node.make([arrays[n] for n in node.inputs], arrays[node.name], bctx)
            steps.extend(made if isinstance(made, (list, tuple)) else [made])
        return steps

    def _direct_outputs(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs a compute node can write in place of its pooled array (saving the final copy):
        computed (not a view, input or constant), and the bound array has the storage dtype."""
        computed = {n.name for n in self.nodes if n.kind == "compute"}
        direct = {}
        for name in self.output_names:
            info = self.values[name]
            if name in computed and name in outputs:
                dst = _as_shape(outputs[name], info, "output")
                if dst.dtype == info.storage:
                    direct[name] = dst
        return direct

    @property
    def _materialize(self) -> frozenset:
        """Transpose views worth copying once at run time: those read by anything but matmul
        (BLAS takes a transposed operand for free; elementwise ops and reshapes do not)."""
        if self._materialize_cache is None:
            readers: dict[str, set] = {}
            for n in self.nodes:
                for i in n.inputs:
                    readers.setdefault(i, set()).add(n.op)
            for r in self.output_names:
                readers.setdefault(r, set()).add("return")
            self._materialize_cache = frozenset(
                n.name for n in self.nodes
                if n.kind == "view" and n.op == "transpose" and readers.get(n.name, set()) - {"matmul"})
        return self._materialize_cache

    def _pooled(self, key, shape, dtype) -> np.ndarray:
        a = self._pool.get(key)
        if a is None or a.shape != tuple(shape) or a.dtype != dtype:
            a = np.empty(shape, dtype)
            self._pool[key] = a
        return a

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Convenience (cold path): evaluate on ``inputs`` and return fresh output arrays in
        their storage dtype (fp16 outputs come back fp16 in fp16 mode, fp32 in fp32 mode)."""
        if self._default is None:
            ins = {n: np.zeros(self.values[n].shape, self.values[n].storage) for n in self.input_names}
            outs = {n: np.zeros(self.values[n].shape, self.values[n].storage) for n in self.output_names}
            self._default = (ins, self.bind(ins, outs))
        ins, runner = self._default
        for name in self.input_names:
            if name not in inputs:
                info = self.values[name]
                raise ValueError(f"missing input {name!r} ({type_str(info.dtype, info.shape)})")
            src = np.asarray(inputs[name])
            if src.shape != ins[name].shape and src.size != ins[name].size:
                raise ValueError(f"input {name!r}: expected shape {ins[name].shape}, got {src.shape}")
            np.copyto(ins[name], src.reshape(ins[name].shape), casting="unsafe")
        runner.run()
        return {n: a.copy() for n, a in runner.outputs.items()}


def _as_shape(arr: np.ndarray, info: ValueInfo, what: str) -> np.ndarray:
    arr = np.asarray(arr)
    n = int(np.prod(info.shape, dtype=np.int64))
    if arr.size != n:
        raise ValueError(
            f"{what} {info.name!r}: array of shape {arr.shape} has {arr.size} elements, "
            f"{type_str(info.dtype, info.shape)} needs {n}"
        )
    if not arr.flags.c_contiguous:
        raise ValueError(f"{what} {info.name!r}: array must be C-contiguous (got strides {arr.strides})")
    return arr.reshape(info.shape)


def _copier(dst: np.ndarray, src: np.ndarray):
    def copy(_dst=dst, _src=src, _copyto=np.copyto):
        _copyto(_dst, _src, casting="unsafe")

    return copy


# ---------------------------------------------------------------------------------------
# compile


def compile_program(
    program: A.Program,
    blobs: Mapping[str, bytes] | None = None,
    precision: str = "fp16",
    function: str = "main",
) -> Plan:
    """Plan ``program.functions[function]`` for ``precision`` ('fp16' or 'fp32').

    ``blobs`` maps BLOBFILE paths (``@model_path/weights/x.bin``) to whole blob files.
    Raises ``MilPlanError`` naming the statement and its line/column on any problem.
    """
    from . import ops  # noqa: F401  (registers the op builders)

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if function not in program.functions:
        raise MilPlanError(f"the program has no function {function!r} (has {sorted(program.functions)})")
    fn = program.functions[function]
    blobs = dict(blobs or {})
    values: dict[str, ValueInfo] = {}
    nodes: list[Node] = []

    for p in fn.params:
        if p.name in values:
            raise MilPlanError(f"duplicate parameter name {p.name!r}", p.loc, p.name)
        if p.type.dtype == A.STRING:
            raise MilPlanError("string function inputs are not supported", p.loc, p.name)
        values[p.name] = ValueInfo(p.name, p.type.dtype, tuple(p.type.shape), storage_dtype(p.type.dtype, precision))

    for st in fn.body:
        if st.name in values:
            raise MilPlanError(f"name {st.name!r} is defined twice", st.loc, st.name)
        if st.op == "const":
            values[st.name] = _plan_const(st, blobs, precision)
            continue
        builder = ops.BUILDERS.get(st.op)
        if builder is None:
            raise MilPlanError(
                f"unknown op {st.op!r}; the simulator implements: {', '.join(sorted(ops.BUILDERS))}",
                st.loc,
                st.name,
            )
        oc = ops.OpCompiler(st, values, precision, blobs)
        node = builder(oc)
        oc.check_unused()
        if isinstance(node, ValueInfo):  # folded at compile time (constexpr ops)
            _check_type(st, node.dtype, node.shape)
            values[st.name] = node
            continue
        node.loc = st.loc
        _check_type(st, node.dtype, node.shape)
        info = ValueInfo(st.name, node.dtype, node.shape, storage_dtype(node.dtype, precision))
        if all(values[n].is_const for n in node.inputs) and node.inputs:
            info.const = _fold(node, values, info)
            info.raw = info.const
        else:
            nodes.append(node)
        values[st.name] = info

    for r in fn.returns:
        if r.name not in values:
            raise MilPlanError(f"returned name {r.name!r} is not defined", r.loc or fn.loc, r.name)
        if values[r.name].dtype == A.STRING:
            raise MilPlanError("a function cannot return a string", r.loc or fn.loc, r.name)
    return Plan(fn, precision, values, nodes)


def _check_type(st: A.Statement, dtype: str, shape: tuple[int, ...]) -> None:
    decl = st.type
    if tuple(decl.shape) != tuple(shape) or decl.dtype != dtype:
        raise MilPlanError(
            f"{st.op} declared {type_str(decl.dtype, decl.shape)} but its operands give "
            f"{type_str(dtype, shape)}",
            st.loc,
            st.name,
        )


def _fold(node: Node, values: dict[str, ValueInfo], info: ValueInfo) -> np.ndarray:
    """Evaluate a statement whose operands are all constants, once, at compile time."""
    scratch = Plan.__new__(Plan)
    scratch._pool = {}
    ins = [values[n].const for n in node.inputs]
    bctx = BindContext(scratch, 0, tuple(True for _ in ins))
    if node.kind == "view":
        v = node.make(ins, bctx)
        out = np.array(ins[0].reshape(info.shape) if v is None else v, dtype=info.storage, copy=True)
    else:
        out = np.empty(info.shape, info.storage)
        made = node.make(ins, out, bctx)
        for step in made if isinstance(made, (list, tuple)) else [made]:
            step()
    out.flags.writeable = False
    return out


def _plan_const(st: A.Statement, blobs: Mapping[str, bytes], precision: str) -> ValueInfo:
    lit = st.attrs.get("val")
    if lit is None:
        raise MilPlanError("const() needs a val=... attribute", st.loc, st.name)
    decl = st.type
    if lit.type.dtype != decl.dtype or tuple(lit.type.shape) != tuple(decl.shape):
        raise MilPlanError(
            f"const declared {type_str(decl.dtype, decl.shape)} but its value is "
            f"{type_str(lit.type.dtype, lit.type.shape)}",
            st.loc,
            st.name,
        )
    raw = literal_value(lit, blobs, st)
    if isinstance(raw, str):
        return ValueInfo(st.name, A.STRING, (), None, const=raw, raw=raw)
    sto = storage_dtype(decl.dtype, precision)
    const = np.array(raw, dtype=sto, copy=True)
    const.flags.writeable = False
    return ValueInfo(st.name, decl.dtype, tuple(decl.shape), sto, const=const, raw=raw)
