"""The one narrow interface every backend implements (sim, ane, null), and what a backend module
declares to be found by name (``BackendInfo``).

A backend compiles MIL text (plus named weight blobs) into a ``Kernel``. A kernel allocates
``Buffer``s shaped like its inputs/outputs and binds them into ``Request``s; evaluating a
request runs the program from its input buffers into its output buffers. This mirrors the ANE:
one compiled model, many requests (one per layer's input surface), buffers that must be
locked around CPU access. The simulator honours the same rules so code written against it
runs unchanged on the ANE.

Buffer layout: a MIL tensor ``[1, C, 1, S]`` is a flat, packed, channel-major byte buffer:
element (c, s) at index ``c*S + s`` (docs/ane-runtime.md#surfaces). ``Buffer.lock()`` yields a numpy view of
it shaped ``(C, S)`` for rank-4 ``[1, C, 1, S]`` tensors and the full MIL shape otherwise.

Ordering: when a function has several inputs or outputs, the ANE binds surfaces in
alphabetical order of their MIL names (docs/ane-runtime.md#surfaces). ``Kernel.inputs``/``Kernel.outputs``
are therefore sorted by name, and requests take buffers in that order.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]  # the MIL shape, e.g. (1, C, 1, S)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def view_shape(self) -> tuple[int, ...]:
        """The numpy shape of a locked view: (C, S) for [1, C, 1, S], else the MIL shape."""
        s = self.shape
        if len(s) == 4 and s[0] == 1 and s[2] == 1:
            return (s[1], s[3])
        return s


class Buffer(abc.ABC):
    """A flat byte buffer bound to one tensor spec (an IOSurface on the ANE)."""

    spec: TensorSpec

    @abc.abstractmethod
    def lock(self, readonly: bool = False) -> contextlib.AbstractContextManager[np.ndarray]:
        """Context manager yielding a numpy view (``spec.view_shape``, ``spec.dtype``).

        The view is valid only inside the ``with`` block. ``readonly=True`` for reads of outputs.
        """

    def read(self) -> np.ndarray:
        """A copy of the contents (convenience for tests and cold paths)."""
        with self.lock(readonly=True) as a:
            return a.copy()

    def write(self, value: np.ndarray) -> None:
        """Copy ``value`` (any shape broadcastable to the view) into the buffer."""
        with self.lock() as a:
            a[...] = value


class Request(abc.ABC):
    """A kernel bound to fixed input and output buffers; build once, evaluate many times."""

    @abc.abstractmethod
    def eval(self) -> None:
        """Run the program synchronously: on return the output buffers hold the result."""


class Kernel(abc.ABC):
    name: str
    inputs: tuple[TensorSpec, ...]  # sorted by name (ANE binding order)
    outputs: tuple[TensorSpec, ...]  # sorted by name

    @abc.abstractmethod
    def alloc(self, spec: TensorSpec) -> Buffer:
        """A new zero-filled buffer for one of this kernel's input or output specs."""

    @abc.abstractmethod
    def request(self, inputs: Sequence[Buffer], outputs: Sequence[Buffer]) -> Request:
        """Bind buffers (in ``self.inputs`` / ``self.outputs`` order) into a reusable request."""

    def eval(self, inputs: Sequence[Buffer], outputs: Sequence[Buffer]) -> None:
        """One-off evaluation (builds a throwaway request)."""
        self.request(inputs, outputs).eval()

    def close(self) -> None:
        """Release backend resources (unload on the ANE). Idempotent."""


class Backend(abc.ABC):
    name: str
    # True when kernel evaluations compute on the host CPU (the simulator): the engine then
    # shares the cores between them and the dW queue (rustane.cpu_threads)
    runs_on_cpu: bool = False

    @abc.abstractmethod
    def compile(self, mil_text: str, blobs: Mapping[str, bytes] | None = None, name: str = "") -> Kernel:
        """Compile MIL text. ``blobs`` maps ``@model_path/weights/x.bin`` to the whole blob file
        (128-byte header included, docs/ane-runtime.md#blob-files). Compile errors raise with the MIL line/column
        where known."""


class _HostLock:
    """``with buf.lock() as a``: a plain class, not a generator context manager, because the
    engine locks buffers several times per kernel eval and this is its whole cost on the host."""

    __slots__ = ("_view",)

    def __init__(self, view: np.ndarray):
        self._view = view

    def __enter__(self) -> np.ndarray:
        return self._view

    def __exit__(self, *exc) -> None:
        return None


class HostBuffer(Buffer):
    """A buffer in ordinary host memory (sim and null backends): locking is a no-op view."""

    def __init__(self, spec: TensorSpec):
        self.spec = spec
        self._data = np.zeros(spec.view_shape, dtype=spec.dtype)
        self._ro = self._data.view()
        self._ro.flags.writeable = False
        # the lock objects hold nothing but the view, so one of each serves every lock()
        self._lock_rw, self._lock_ro = _HostLock(self._data), _HostLock(self._ro)

    def lock(self, readonly: bool = False) -> _HostLock:
        return self._lock_ro if readonly else self._lock_rw


@dataclass(frozen=True)
class BackendInfo:
    """What a backend module tells the registry (``rustane.backends``) about itself.

    Every module in ``rustane/backends/`` that defines ``BACKEND = BackendInfo(...)`` and
    ``unavailable_reason()`` is a backend, found by its ``name``; nothing else needs editing to
    add one. The registry alone turns a name, a precision and the ANE-rules switch into an
    instance (``rustane.backends.get``), so the special cases live there and here, not in callers.

    - ``create(precision, ane_rules, **options)`` builds the backend; ``precision`` is one of
      ``precisions`` (the first is the default) and ``ane_rules`` is False only when ``research``.
    - ``auto_rank``: ``auto`` picks the available backend with the highest rank (None: never).
    - ``cli``: listed in the ``--backend`` choices of the CLIs (the null backend is a bench tool).
    - ``research``: can build models whose kernels break ANE rules (docs/ane-rules.md).
    - ``on_hardware``: computes on an accelerator, so its rounding is the hardware's (the fp16
      simulator is its stand-in in tests).
    """

    name: str
    summary: str
    create: "object"  # Callable[..., Backend]; typed loosely so the dataclass stays hashable
    precisions: tuple[str, ...] = ("fp16",)
    auto_rank: int | None = None
    cli: bool = True
    research: bool = False
    on_hardware: bool = False
