"""Chip profiles for the fake ANE framework: make it behave like the evidence in docs/ane-rules.md.

``install(lib, profile)`` hooks libfakeane.so (``fakeane_set_hook``) so that, for the chosen
``rustane.mil.ane_rules.Profile``:

- compile fails (code ``FAKE_COMPILE_REJECTED``) for what the profile rejects: a dialect it does
  not accept, ops it rejects, an I/O width or any dimension over its limit;
- load fails with 0x50004 once more programs were compiled than the profile's budget;
- evaluation fails with 0x1d for a surface under the minimum, a width under the minimum, or inputs
  (outputs) of different byte sizes;
- evaluation *succeeds with wrong numbers* where the hardware is silently wrong: zeros for fp16
  outputs narrower than ``zero_width``, corrupted columns when the width is not a multiple of
  ``width_multiple``, zeros for a matmul contraction dim the (strict) profile flags.

On every profile the fake binds a request's surfaces to the program's inputs and outputs in
alphabetical order of their MIL names (docs/ane-rules.md#io-order); that lives in its evaluator,
rustane/backends/ane/fake.py, since it decides which surface feeds which tensor.

Everything the hook decides comes from the Profile's fields and the rule table, never from
rustane's guards: the tests show the guards refuse these programs before the fake sees them.
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field

import numpy as np

from rustane.mil import ane_rules
from rustane.mil.ane_rules import Profile

HOOK = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                        ctypes.POINTER(ctypes.c_size_t), ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p),
                        ctypes.POINTER(ctypes.c_size_t))
COMPILE, LOAD, EVAL_BEFORE, EVAL_AFTER = range(4)


@dataclass
class _Program:
    dialect: str
    ops: set
    io: list  # (kind, name, shape, dtype itemsize) in binding (name) order
    dims: list
    inner_dims: list  # matmul contraction dims


def _describe(text: str) -> _Program:
    from rustane.mil.parser import parse

    fn = parse(text).functions["main"]
    types = {p.name: p.type for p in fn.params}
    consts: dict = {}
    ops: set = set()
    dims: list = []
    inner: list = []
    for st in fn.body:
        types[st.name] = st.type
        ops.add(st.op)
        dims.extend(st.type.shape)
        if st.is_const and "val" in st.attrs:
            consts[st.name] = st.attrs["val"].value
        if st.op == "matmul":
            from rustane.ane_guard import matmul_inner_dim

            k = matmul_inner_dim(st, types, consts)
            if k is not None:
                inner.append(k)
    io = [("input", p.name, tuple(p.type.shape), p.type.np_dtype.itemsize) for p in sorted(fn.params, key=lambda p: p.name)]
    io += [("output", r.name, tuple(types[r.name].shape), types[r.name].np_dtype.itemsize)
           for r in sorted(fn.returns, key=lambda r: r.name)]
    dims.extend(d for _, _, s, _ in io for d in s)
    return _Program("ios18" if "<ios18>" in text else "ios16", ops, io, dims, inner)


@dataclass
class ProfileHook:
    """The installed behaviour; ``events`` records what the fake did (rule, stage, detail)."""

    profile: Profile
    compiles: int = 0
    events: list = field(default_factory=list)
    _cache: dict = field(default_factory=dict)

    def program(self, text: str) -> _Program:
        p = self._cache.get(text)
        if p is None:
            p = self._cache[text] = _describe(text)
        return p

    def __call__(self, stage, mil, mil_len, n_in, in_sizes, n_out, out_ptrs, out_sizes) -> int:
        try:
            text = ctypes.string_at(mil, mil_len).decode()
            prog = self.program(text)
            if stage == COMPILE:
                self.compiles += 1
                return self.compile(prog)
            if stage == LOAD:
                return self.load()
            if stage == EVAL_BEFORE:
                return self.before_eval(prog, [in_sizes[i] for i in range(n_in)], [out_sizes[i] for i in range(n_out)])
            self.after_eval(prog, [(out_ptrs[i], out_sizes[i]) for i in range(n_out)])
            return 0
        except Exception as e:  # never raise through C; make the failure loud instead
            self.events.append(("hook-error", stage, repr(e)))
            return 0x7EAD

    def _fail(self, rule: str, stage: str, detail: str) -> int:
        self.events.append((rule, stage, detail))
        code = ane_rules.RULES[rule].code
        return int(code)

    # ---- compile / load ----
    def compile(self, prog: _Program) -> int:
        p = self.profile
        if prog.dialect not in p.dialects:
            return self._fail("dialect", "compile", f"<{prog.dialect}> text on {p.name}")
        for op in sorted(prog.ops & p.rejected_ops):
            return self._fail("cast-op" if op == "cast" else "matmul-op", "compile", f"{op} on {p.name}")
        for kind, name, shape, _ in prog.io:
            if shape[-1] > p.max_width:
                return self._fail("max-width", "compile", f"{kind} {name} width {shape[-1]}")
        big = [d for d in prog.dims if d > p.max_dim]
        if big:
            return self._fail("max-dim", "compile", f"dimension {big[0]}")
        return 0

    def load(self) -> int:
        if self.compiles > self.profile.compile_budget:
            return self._fail("compile-budget", "load", f"{self.compiles} compiles > {self.profile.compile_budget}")
        return 0

    # ---- evaluation ----
    def before_eval(self, prog: _Program, in_sizes: list, out_sizes: list) -> int:
        p = self.profile
        for kind, name, shape, itemsize in prog.io:
            nbytes = math.prod(shape) * itemsize
            if nbytes < p.min_surface_bytes:
                return self._fail("min-surface", "eval", f"{kind} {name} {nbytes} B")
            if p.zero_width <= shape[-1] < p.min_width:
                return self._fail("min-width", "eval", f"{kind} {name} width {shape[-1]}")
        for sizes, kind in ((in_sizes, "inputs"), (out_sizes, "outputs")):
            if len(set(sizes)) > 1:
                return self._fail("uniform-io-sizes", "eval", f"{kind} {sizes}")
        return 0

    def after_eval(self, prog: _Program, outs: list) -> None:
        p = self.profile
        shapes = [(s, isz) for kind, _, s, isz in prog.io if kind == "output"]
        flagged = [k for k in prog.inner_dims if k % p.matmul_inner_multiple] if p.enforces("matmul-inner") else []
        for (ptr, size), (shape, itemsize) in zip(outs, shapes):
            buf = (ctypes.c_uint8 * size).from_address(ptr)
            raw = np.frombuffer(buf, dtype=np.uint8)
            width = shape[-1]
            if width < p.zero_width and itemsize == 2:
                raw[:] = 0
                self.events.append(("zero-width", "eval", f"width {width}: zeros"))
            elif flagged:
                raw[:] = 0
                self.events.append(("matmul-inner", "eval", f"contraction dim {flagged[0]}: zeros"))
            elif width % p.width_multiple:
                _corrupt(raw, shape, itemsize, p.width_multiple)
                self.events.append(("width-multiple", "eval", f"width {width}: corrupted"))


def _corrupt(raw: np.ndarray, shape: tuple, itemsize: int, multiple: int) -> None:
    """Shift every row's tail (the columns past the last whole group of ``multiple``) by one
    column, as a misaligned read would: the numbers stay plausible and nothing fails."""
    width = shape[-1]
    rows = raw.size // (width * itemsize)
    view = raw[: rows * width * itemsize].reshape(rows, width * itemsize)
    start = (width // multiple) * multiple
    if start == 0:
        start = 1
    tail = view[:, (start - 1) * itemsize:].copy()
    view[:, start * itemsize:] = tail[:, : (width - start) * itemsize]


_installed: list = []


def install(lib_path: str, profile: Profile) -> ProfileHook:
    """Make the fake framework at ``lib_path`` behave like ``profile`` until ``uninstall``."""
    lib = ctypes.CDLL(lib_path)
    hook = ProfileHook(profile)
    cb = HOOK(hook)
    lib.fakeane_set_hook.argtypes = [HOOK]
    lib.fakeane_set_hook(cb)
    _installed[:] = [(lib, cb, hook)]  # keep the callback alive while C holds it
    return hook


def uninstall() -> None:
    for lib, _, _ in _installed:
        lib.fakeane_set_hook(ctypes.cast(None, HOOK))
    _installed.clear()
