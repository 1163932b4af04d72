"""The simulator backend: runs MIL programs with the numpy interpreter (``rustane.mil.interp``).

``SimBackend(precision="fp16", check=True, target="m4", io_dtype=None)``

* ``precision="fp16"`` models the ANE: fp16 storage, every op computes in fp32 and rounds its
  result to fp16 (see ``rustane.mil.interp`` for the exact model and where hardware may differ).
  ``precision="fp32"`` is exact fp32 math: nothing is rounded inside the program.
* ``check=True`` runs the ANE rule checker (``rustane.mil.check``) for ``target`` at compile
  time: errors raise ``MilCheckError`` (the ANE would reject or miscompute the program, so the
  simulator refuses it too); warnings are kept on ``kernel.diagnostics``.
* ``split`` (default: when the process may use more than one CPU): big matmuls run half on a
  helper thread, with the same bits as whole (``rustane.mil.split``); ``split=False`` keeps every
  kernel on the calling thread.
* ``io_dtype``: the dtype of the I/O buffers. ``None`` (default) follows the MIL signature, as
  the ANE does: fp16-declared inputs/outputs are fp16 buffers. In fp32 precision that means the
  program computes in fp32 from fp16-valued inputs and its outputs are rounded to fp16 once, on
  the way out. ``io_dtype="fp32"`` exposes every fp16-declared input/output as an fp32 buffer
  instead, so fp32 precision runs exact math end to end (fp32 in, fp32 out; this is what
  gradient tests against PyTorch use). With ``precision="fp16"`` and ``io_dtype="fp32"``, inputs
  are rounded to fp16 on entry and outputs widened on exit (a convenience; the numbers equal the
  fp16-I/O run). Non-float I/O (int8, int32, bool) always keeps its MIL dtype.

Kernels bind buffers in alphabetical order of the MIL names (``Kernel.inputs``/``outputs``),
and a ``[1, C, 1, S]`` tensor's buffer is viewed as ``(C, S)``, exactly as on the ANE.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from .base import Backend, BackendInfo, Buffer, HostBuffer, Kernel, Request, TensorSpec

__all__ = ["SimBackend", "SimKernel", "SimRequest", "validate_buffers"]

_IO_DTYPES = (None, "fp16", "fp32")


def validate_buffers(kernel: Kernel, ins: Sequence[Buffer], outs: Sequence[Buffer]) -> None:
    """Check that ``ins``/``outs`` are host buffers matching ``kernel.inputs``/``outputs`` in
    order, shape and dtype, with no buffer bound twice. Raises ValueError/TypeError naming the
    tensor, what was expected and how to get it right."""
    for what, bufs, specs in (("input", ins, kernel.inputs), ("output", outs, kernel.outputs)):
        bufs = list(bufs)
        if len(bufs) != len(specs):
            raise ValueError(
                f"kernel {kernel.name!r} takes {len(specs)} {what}(s) in this order: "
                f"{', '.join(s.name for s in specs) or '(none)'}; got {len(bufs)} buffer(s)"
            )
        for i, (b, s) in enumerate(zip(bufs, specs)):
            if not isinstance(b, HostBuffer):
                raise TypeError(
                    f"kernel {kernel.name!r} {what} {i} ({s.name!r}): expected a HostBuffer from "
                    f"kernel.alloc(), got {type(b).__name__}"
                )
            bs = b.spec
            if bs.name != s.name and bs.name in {x.name for x in specs}:
                raise ValueError(
                    f"kernel {kernel.name!r} {what} {i} is the buffer of {bs.name!r}, but position {i} "
                    f"feeds {s.name!r}: the ANE binds surfaces in alphabetical order of the MIL names "
                    f"(io-order, see docs/ane-rules.md#io-order); pass the buffers in the order of "
                    f"kernel.{what}s ({', '.join(x.name for x in specs)})"
                )
            if tuple(bs.shape) != tuple(s.shape) or np.dtype(bs.dtype) != np.dtype(s.dtype):
                raise ValueError(
                    f"kernel {kernel.name!r} {what} {i} ({s.name!r}) needs a {np.dtype(s.dtype).name} "
                    f"buffer of MIL shape {list(s.shape)}, got {np.dtype(bs.dtype).name} {list(bs.shape)} "
                    f"(buffer allocated for {bs.name!r}); allocate with kernel.alloc(kernel.{what}s[{i}]) "
                    f"and pass buffers in the order of kernel.{what}s (alphabetical by MIL name)"
                )
    seen: dict[int, str] = {}
    for what, bufs in (("input", ins), ("output", outs)):
        for b in bufs:
            prev = seen.get(id(b))
            if prev is not None and (what == "output" or prev == "output"):
                raise ValueError(
                    f"kernel {kernel.name!r}: buffer for {b.spec.name!r} is bound as both {prev} and "
                    f"{what}; use separate buffers (the ANE reads inputs while writing outputs)"
                )
            seen[id(b)] = what


def _specs(plan, names: Sequence[str], io_dtype: str | None) -> tuple[TensorSpec, ...]:
    from rustane.mil.ast import DTYPES

    specs = []
    for n in sorted(names):
        info = plan.values[n]
        dt = DTYPES[info.dtype]
        if io_dtype is not None and info.dtype in ("fp16", "fp32"):
            dt = DTYPES[io_dtype]
        specs.append(TensorSpec(n, np.dtype(dt), tuple(info.shape)))
    return tuple(specs)


class SimRequest(Request):
    __slots__ = ("_runner", "_run")

    def __init__(self, runner):
        self._runner = runner
        self._run = runner.run

    def eval(self) -> None:
        self._run()


class SimKernel(Kernel):
    def __init__(self, name: str, plan, io_dtype: str | None, diagnostics: list, splitter=None):
        self.name = name
        self.plan = plan
        self.splitter = splitter
        self.diagnostics = list(diagnostics)
        self.inputs = _specs(plan, plan.input_names, io_dtype)
        self.outputs = _specs(plan, plan.output_names, io_dtype)
        if len(set(plan.output_names)) != len(plan.output_names):
            raise ValueError(f"kernel {name!r}: a name is returned twice in {plan.output_names}")
        self._closed = False

    def alloc(self, spec: TensorSpec) -> HostBuffer:
        if spec not in self.inputs and spec not in self.outputs:
            raise ValueError(
                f"kernel {self.name!r} has no input or output spec {spec}; use one of kernel.inputs / kernel.outputs"
            )
        return HostBuffer(spec)

    def request(self, inputs: Sequence[Buffer], outputs: Sequence[Buffer]) -> SimRequest:
        if self._closed:
            raise RuntimeError(f"kernel {self.name!r} is closed")
        validate_buffers(self, inputs, outputs)
        ins = {s.name: b._data for s, b in zip(self.inputs, inputs)}
        outs = {s.name: b._data for s, b in zip(self.outputs, outputs)}
        return SimRequest(self.plan.bind(ins, outs, splitter=self.splitter))

    def close(self) -> None:
        self._closed = True


class SimBackend(Backend):
    name = "sim"
    runs_on_cpu = True

    def __init__(self, precision: str = "fp16", check: bool = True, target: str = "m4", io_dtype: str | None = None,
                 ane_rules: bool = True, split: bool | None = None):
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
        if io_dtype not in _IO_DTYPES:
            raise ValueError(f"io_dtype must be None (follow the MIL signature), 'fp16' or 'fp32', got {io_dtype!r}")
        self.precision = precision
        self.check = check
        self.target = target
        self.io_dtype = io_dtype
        # Models built on the fp16 simulator (the ANE's stand-in) obey the ANE rules of every chip
        # (docs/ane-rules.md), so what trains here can train on a Neural Engine; ane_rules=False
        # admits research configs. The fp32 mode is exact math that no ANE runs: not guarded.
        from rustane.mil.ane_rules import CONSERVATIVE

        self.ane_profile = CONSERVATIVE if ane_rules and precision == "fp16" else None
        # big matmuls split over this thread and a helper (same bits; rustane/mil/split.py)
        from rustane.mil import split as _split

        self.splitter = (_split.default_splitter() if split is None else _split.Splitter() if split else None)

    def compile(self, mil_text: str, blobs: Mapping[str, bytes] | None = None, name: str = "") -> SimKernel:
        from rustane.mil.interp import compile_program
        from rustane.mil.parser import parse

        program = parse(mil_text)
        diagnostics: list = []
        if self.check:
            from rustane.mil.check import check
            from rustane.mil.errors import MilCheckError

            diagnostics = list(check(program, self.target))
            if any(d.is_error for d in diagnostics):
                raise MilCheckError(diagnostics, name or None)
        plan = compile_program(program, blobs or {}, self.precision)
        return SimKernel(name or "main", plan, self.io_dtype, [d for d in diagnostics if not d.is_error],
                         self.splitter)

    def __repr__(self) -> str:
        return (f"SimBackend(precision={self.precision!r}, check={self.check}, target={self.target!r}, "
                f"io_dtype={self.io_dtype!r}, ane_rules={self.ane_profile is not None}, "
                f"split={self.splitter is not None})")


def unavailable_reason() -> str | None:
    """The simulator is numpy only: it runs everywhere."""
    return None


def _create(precision: str, ane_rules: bool, **options) -> SimBackend:
    return SimBackend(precision=precision, ane_rules=ane_rules, **options)


BACKEND = BackendInfo(
    name="sim",
    summary="the MIL simulator (numpy): fp16 models the ANE's rounding, fp32 is exact math",
    create=_create,
    precisions=("fp16", "fp32"),
    auto_rank=0,
    research=True,
)
