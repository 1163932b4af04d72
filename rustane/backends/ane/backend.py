"""The ``ane`` backend: MIL programs on the Apple Neural Engine through the private framework.

``rustane._ane`` (Cython over csrc/ane_runtime.m) does the Objective-C work; this module gives it
the Backend protocol of ``base.py``: one compiled model per kernel, buffers that are IOSurfaces
exposed as numpy views while locked, requests built once and reused.

Where it is available:

- macOS on Apple silicon, when the private framework loads.
- Linux, for tests only: when the package was built with ``-Dane_fake=true`` the runtime talks to a
  fake framework (``libfakeane.so``, built from tests/fakeane into the build folder, never
  installed) whose evaluate runs the MIL through the fp16 simulator. Opt in with
  ``RUSTANE_ANE_FAKE=<path to libfakeane.so>``, so ``auto`` never picks the fake by accident.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from ..base import Backend, Buffer, Kernel, Request, TensorSpec
from .errors import AneError

FAKE_ENV = "RUSTANE_ANE_FAKE"
FAKE_LIBRARY = "libfakeane.so"

__all__ = ["AneError", "AneBackend", "unavailable_reason", "fake_library_path", "FAKE_ENV"]


def _runtime():
    """The compiled runtime module, or raise ImportError with the reason."""
    from rustane import _ane

    return _ane


def fake_library_path() -> str | None:
    """The test fake framework: the file ``RUSTANE_ANE_FAKE`` names, else the one a
    ``-Dane_fake=true`` build left in its build folder (``tests/fakeane/libfakeane.so``, recorded in
    the runtime: the fake is test scaffolding and never installed with the package)."""
    path = os.environ.get(FAKE_ENV)
    if not path:
        try:
            path = getattr(_runtime(), "FAKE_LIBRARY_PATH", "")
        except ImportError:
            return None
    return path if path and Path(path).is_file() else None


_init_lock = threading.Lock()


def unavailable_reason() -> str | None:
    """None when the ``ane`` backend can run here, else why not (one line, with the fix if any)."""
    try:
        _ane = _runtime()
    except ImportError as e:
        if sys.platform == "darwin":
            return f"the ANE runtime extension rustane._ane failed to import: {e}"
        return ("not macOS: no Apple Neural Engine here (on Linux the ANE runtime is built only for the "
                "contract tests, with -Csetup-args=-Dane_fake=true)")
    if sys.platform == "darwin":
        if platform.machine() != "arm64":
            return f"not Apple silicon ({platform.machine()}): the Neural Engine needs an arm64 Mac"
        path = None
    else:
        if not _ane.BUILT_WITH_FAKE:  # pragma: no cover - the Linux build always carries the fake
            return "not macOS: no Apple Neural Engine here"
        path = os.environ.get(FAKE_ENV)
        if not path:
            hint = fake_library_path() or f"<build dir>/tests/fakeane/{FAKE_LIBRARY}"
            return (f"not macOS: no Apple Neural Engine here (this build carries the test fake framework; "
                    f"set {FAKE_ENV}={hint} to use it)")
    with _init_lock:
        try:
            _ane.init(path)
        except AneError as e:
            what = "fake framework" if path else "framework"
            return f"{what} failed to load: {e.message}"
        if path:
            from .fake import install_sim_evaluator

            install_sim_evaluator(_ane)
    return None


# ---- MIL signature -> tensor specs -------------------------------------------------------------------
def parse_signature(mil_text: str, function: str = "main"):
    """(program, inputs, outputs): the parsed program and its specs, each sorted by name (the
    order the ANE binds surfaces in, docs/ane-runtime.md#surfaces)."""
    from rustane.mil.parser import parse

    program = parse(mil_text)
    if function not in program.functions:
        raise ValueError(f"MIL program has no function {function!r} (has {', '.join(program.functions) or 'none'})")
    fn = program.functions[function]
    types = {p.name: p.type for p in fn.params}
    types.update({st.name: st.type for st in fn.body})

    def spec(name, t) -> TensorSpec:
        if t.dtype not in ("fp16", "fp32", "int32", "int8", "uint8", "int16", "uint16"):
            raise ValueError(f"{name}: a {t.dtype} tensor cannot be an ANE input or output")
        return TensorSpec(name, np.dtype(t.np_dtype), tuple(int(d) for d in t.shape))

    inputs = tuple(sorted((spec(p.name, p.type) for p in fn.params), key=lambda s: s.name))
    outputs = tuple(sorted((spec(r.name, types[r.name]) for r in fn.returns), key=lambda s: s.name))
    return program, inputs, outputs


def _run_checker(program, target: str, name: str) -> list:
    """The ANE rule checker: errors raise MilCheckError before anything reaches the framework
    (a rejected program can fail silently there); warnings are returned."""
    from rustane.mil.check import check_or_raise

    return [d for d in check_or_raise(program, target, name=name or None) if not d.is_error]


# ---- Backend protocol ------------------------------------------------------------------------------
class AneBuffer(Buffer):
    """An IOSurface holding one tensor; ``lock()`` yields a numpy view of the locked surface."""

    def __init__(self, spec: TensorSpec, surface):
        self.spec = spec
        self.surface = surface

    @contextlib.contextmanager
    def lock(self, readonly: bool = False) -> Iterator[np.ndarray]:
        raw = self.surface.lock(readonly)
        try:
            yield raw[: self.spec.nbytes].view(self.spec.dtype).reshape(self.spec.view_shape)
        finally:
            self.surface.unlock()


class AneRequest(Request):
    def __init__(self, native, inputs: Sequence[AneBuffer], outputs: Sequence[AneBuffer]):
        self._native = native
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)

    def eval(self) -> None:
        try:
            self._native.eval()
        except AneError as e:
            _ane = _runtime()
            if e.code != getattr(_ane, "FAKE_EVALUATOR_RAISED", None):
                raise
            # the fake framework's evaluator (the simulator) raised: say what it said
            cause = _ane.last_fake_evaluator_error()
            raise AneError(e.code, e.stage, f"{e.message}; the simulator raised {type(cause).__name__}: {cause}") from cause


class AneKernel(Kernel):
    def __init__(self, name: str, model, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]):
        self.name = name
        self._model = model
        self.inputs = inputs
        self.outputs = outputs

    @property
    def tmpdir(self) -> str | None:
        """Where model.mil and weights/ live while the model is loaded (None once closed)."""
        return self._model.tmpdir

    def alloc(self, spec: TensorSpec) -> AneBuffer:
        if spec not in self.inputs and spec not in self.outputs:
            raise ValueError(f"{self.name}: {spec} is not one of this kernel's inputs or outputs")
        return AneBuffer(spec, _runtime().Surface(spec.nbytes))

    def request(self, inputs: Sequence[Buffer], outputs: Sequence[Buffer]) -> AneRequest:
        _check_binding(self.name, "input", self.inputs, inputs)
        _check_binding(self.name, "output", self.outputs, outputs)
        native = _runtime().Request(self._model, [b.surface for b in inputs], [b.surface for b in outputs])
        return AneRequest(native, inputs, outputs)

    def close(self) -> None:
        self._model.close()


def _check_binding(kernel: str, what: str, specs: Sequence[TensorSpec], bufs: Sequence[Buffer]) -> None:
    if len(bufs) != len(specs):
        raise ValueError(f"{kernel}: {len(bufs)} {what} buffers given, the kernel has {len(specs)} "
                         f"({', '.join(s.name for s in specs)}, in name order)")
    names = {s.name for s in specs}
    for i, (spec, buf) in enumerate(zip(specs, bufs)):
        if not isinstance(buf, AneBuffer):
            raise TypeError(f"{kernel}: {what} {spec.name} must be a buffer from kernel.alloc() on the ane "
                            f"backend, got {type(buf).__name__}")
        if buf.spec.name != spec.name and buf.spec.name in names:
            # same shape or not, the ANE would feed this surface to spec.name: silent corruption
            raise ValueError(f"{kernel}: {what} {i} is the buffer of {buf.spec.name!r}, but the ANE feeds "
                             f"position {i} to {spec.name!r}: surfaces bind in alphabetical order of the MIL "
                             f"names (io-order, see docs/ane-rules.md#io-order); pass the buffers in the "
                             f"order of kernel.{what}s ({', '.join(s.name for s in specs)})")
        if buf.spec.shape != spec.shape or np.dtype(buf.spec.dtype) != np.dtype(spec.dtype):
            raise ValueError(f"{kernel}: {what} {spec.name} needs {spec.dtype} {spec.shape}, got buffer "
                             f"{buf.spec.name} {buf.spec.dtype} {buf.spec.shape}")


class AneBackend(Backend):
    """Compile MIL for the Neural Engine. ``check=True`` runs the ANE rule checker (for chip
    ``target``) first, like the sim backend.

    ``dialect``: the MIL spelling this chip/OS compiles, 'ios18' (program(1.3), what the templates
    are written in) or 'ios16' (program(1.0), verbose scalars). ``None`` takes it from the cached
    ``python -m rustane.probe`` result when there is one, else 'ios18'; programs are converted
    with ``rustane.mil.dialect.to_dialect`` before compiling."""

    name = "ane"

    def __init__(self, check: bool = True, target: str = "m4", dialect: str | None = None):
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"the ane backend is not available here: {reason}")
        self.check = check
        self.target = target
        from rustane.mil.ane_rules import profile_from_probe

        from .probe_cache import load_cached_probe

        cached = load_cached_probe()
        # the chip profile the guards check models against (docs/ane-rules.md): the probed chip and
        # OS when a probe is cached, else the conservative union of every profile
        self.ane_profile = profile_from_probe(cached)
        if dialect is None:
            dialect = (cached or {}).get("dialect") or "ios18"
        if dialect not in ("ios18", "ios16"):
            raise ValueError(f"dialect must be 'ios18' or 'ios16', got {dialect!r}")
        self.dialect = dialect
        # the fake framework (Linux tests) evaluates through the simulator, on this CPU
        self.runs_on_cpu = bool(_runtime().BUILT_WITH_FAKE)

    def compile(self, mil_text: str, blobs: Mapping[str, bytes] | None = None, name: str = "") -> AneKernel:
        _ane = _runtime()
        if self.dialect == "ios16" and "<ios16>" not in mil_text:
            from rustane.mil import emit, parse
            from rustane.mil.dialect import to_dialect

            mil_text = emit(to_dialect(parse(mil_text), "ios16"))
        program, inputs, outputs = parse_signature(mil_text)
        diagnostics = _run_checker(program, self.target, name) if self.check else []
        model = _ane.compile(mil_text.encode("utf-8"), dict(blobs or {}))
        n = _ane.compile_count()
        if n >= _ane.COMPILE_WARN_AT:
            warnings.warn(f"{n} ANE compiles in this process: the compiler allows about {_ane.COMPILE_BUDGET} per "
                          f"process before load fails with 0x50004; compile kernels once and reuse them",
                          RuntimeWarning, stacklevel=2)
        kernel = AneKernel(name or "main", model, inputs, outputs)
        kernel.diagnostics = diagnostics
        return kernel

    @staticmethod
    def compile_count() -> int:
        return _runtime().compile_count()
