"""The null backend: kernels whose evaluation does nothing.

Used to measure the engine's Python orchestration overhead per kernel eval (staging, locking,
request dispatch) without any compute. ``compile`` only scans the MIL text for the function
signature and the declared types of the returned names -- no full parse, no checker, no plan --
so the kernels have the same ``inputs``/``outputs`` (sorted by name) and buffers as the real
ones. Requests validate their buffers exactly like the simulator's.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from .base import Backend, BackendInfo, Buffer, HostBuffer, Kernel, Request, TensorSpec

__all__ = ["NullBackend", "NullKernel", "io_specs"]

_TYPE = r"tensor\s*<\s*(\w+)\s*,\s*\[([^\]]*)\]\s*>"
_FUNC = re.compile(r"\bfunc\s+(\w+)\s*<[^>]*>\s*\((.*?)\)\s*\{", re.S)
_PARAM = re.compile(_TYPE + r"\s*([A-Za-z_][\w@]*)")
_RETURNS = re.compile(r"\}\s*->\s*\(([^)]*)\)\s*;")


def _spec(name: str, dtype: str, dims: str) -> TensorSpec:
    from rustane.mil.ast import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    shape = tuple(int(d) for d in dims.split(",") if d.strip())
    return TensorSpec(name, np.dtype(DTYPES[dtype]), shape)


def io_specs(mil_text: str, function: str = "main") -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of ``function`` by a light regex scan, each sorted by name."""
    for m in _FUNC.finditer(mil_text):
        if m.group(1) == function:
            break
    else:
        raise ValueError(f"no 'func {function}<...>(...) {{' signature found in the MIL text")
    inputs = {n: _spec(n, dt, dims) for dt, dims, n in _PARAM.findall(m.group(2))}
    r = _RETURNS.search(mil_text, m.end())
    if r is None:
        raise ValueError(f"function {function!r} has no '}} -> (names);' return list")
    outputs = {}
    for n in (x.strip() for x in r.group(1).split(",")):
        if not n:
            continue
        if n in inputs:
            outputs[n] = inputs[n]
            continue
        d = re.search(_TYPE + r"\s*" + re.escape(n) + r"\s*=", mil_text[m.end(): r.start()])
        if d is None:
            raise ValueError(f"returned name {n!r} has no tensor statement in function {function!r}")
        outputs[n] = _spec(n, d.group(1), d.group(2))
    return (tuple(inputs[k] for k in sorted(inputs)), tuple(outputs[k] for k in sorted(outputs)))


class _NullRequest(Request):
    __slots__ = ()

    def eval(self) -> None:
        return None


class NullKernel(Kernel):
    def __init__(self, name: str, inputs, outputs):
        self.name = name
        self.inputs = inputs
        self.outputs = outputs

    def alloc(self, spec: TensorSpec) -> HostBuffer:
        if spec not in self.inputs and spec not in self.outputs:
            raise ValueError(f"kernel {self.name!r} has no input or output spec {spec}")
        return HostBuffer(spec)

    def request(self, inputs: Sequence[Buffer], outputs: Sequence[Buffer]) -> Request:
        from .sim import validate_buffers

        validate_buffers(self, inputs, outputs)
        return _NullRequest()


class NullBackend(Backend):
    name = "null"

    def __init__(self, **_ignored):
        pass

    def compile(self, mil_text: str, blobs: Mapping[str, bytes] | None = None, name: str = "") -> NullKernel:
        ins, outs = io_specs(mil_text)
        return NullKernel(name or "main", ins, outs)


def unavailable_reason() -> str | None:
    return None


def _create(precision: str, ane_rules: bool, **options) -> NullBackend:
    return NullBackend(**options)  # computes nothing, so neither setting changes anything


BACKEND = BackendInfo(
    name="null",
    summary="kernels that compute nothing: the bench's measure of Python orchestration per eval",
    create=_create,
    precisions=("fp16", "fp32"),
    cli=False,
)
