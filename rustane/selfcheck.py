"""The first run of a kernel set on a Neural Engine proves itself against the fp16 simulator.

Nobody at Apple documents the in-memory compiler, and the limits we know come from other people's
machines (docs/ane-rules.md). Several of them fail *silently*: the program runs and returns wrong
numbers. So the first time a set of kernels runs on the ANE of a given chip + OS + kernel text,
every compiled kernel is evaluated once on seeded random inputs and compared element by element
with the fp16 simulator running the same MIL. A mismatch stops training before the first step with
the kernel, its worst element and the way out; a pass is cached, so later runs skip the check.

The bound (``bound()``): an element passes when

    |ane - sim| <= TOL * (|sim| + row_scale),   TOL = 2**-6, row_scale = max |sim| over its channel

The simulator rounds every op's result to fp16 (unit roundoff u = 2**-11) and accumulates matmuls
in fp32; the ANE's internal accumulation width and op order are not documented, so the two may
differ by a few roundings per op along a chain of ~10 ops, plus accumulation-order differences in
matmuls of up to a few thousand terms. Errors of that kind scale with the magnitude of the values
in a channel, not with each element (a small element can come from cancelling large products),
hence the row scale. 2**-6 is 32 u: a few ulps per op with margin, while the failures the rules
describe (zeros, shifted columns, garbage) are off by the order of the values themselves, 50 and
more times the bound. Inputs are N(0, 0.1²) in fp16, small enough that no kernel of a preset
overflows fp16 on them.

The cache lives in ``$RUSTANE_CACHE`` (default ``~/.cache/rustane``) under ``selfcheck/<key>.json``,
the key a SHA-256 of the machine (chip, OS), the MIL dialect and every kernel's text and weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rustane.errors import RustaneError

__all__ = ["SelfCheckError", "KernelCheck", "TOL", "INPUT_STD", "bound", "cache_dir", "selfcheck_key",
           "check_kernels", "ensure", "render_plan"]

VERSION = 1
#: the tolerance of ``bound()``, relative to an element's magnitude plus its channel's (see above)
TOL = 2.0 ** -6
#: standard deviation of the seeded random inputs
INPUT_STD = 0.1
CACHE_ENV = "RUSTANE_CACHE"
WAY_OUT = ("train with --backend sim (the fp16 simulator), and run python -m rustane.doctor for a "
           "report to attach to a bug report")


def cache_dir() -> Path:
    """``$RUSTANE_CACHE``, else ``~/.cache/rustane``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "rustane"


@dataclass
class KernelCheck:
    """One kernel's comparison. ``worst`` is (index into the [C, S] output, got, expected) of the
    element with the largest error relative to its bound."""

    kernel: str
    ok: bool
    max_abs_err: float | None = None
    worst: tuple | None = None
    worst_bound: float | None = None
    ane_seconds: float | None = None
    sim_seconds: float | None = None
    error: str | None = None

    def describe(self) -> str:
        if self.error:
            return f"kernel {self.kernel}: {self.error}"
        idx, got, want = self.worst
        return (f"kernel {self.kernel}: worst element out[{', '.join(map(str, idx))}] is {got:.6g} on the ANE, "
                f"{want:.6g} on the fp16 simulator (|diff| {abs(got - want):.3g} > bound {self.worst_bound:.3g})")


class SelfCheckError(RustaneError, RuntimeError):
    """A kernel gave different numbers on the ANE than on the fp16 simulator."""

    def __init__(self, failed: list[KernelCheck], n_kernels: int, report_path: Path | None):
        self.failed = failed
        self.report_path = report_path
        first = failed[0].describe()
        more = f"; {len(failed) - 1} more kernel(s) failed" if len(failed) > 1 else ""
        where = f"; details in {report_path}" if report_path else ""
        super().__init__(f"ANE self-check: {first} ({len(failed)} of {n_kernels} kernels differ{more}){where}; "
                         f"{WAY_OUT}")


def bound(want: np.ndarray) -> np.ndarray:
    """Per-element tolerance for an output ``want`` of shape [C, S] (fp32)."""
    a = np.abs(want.astype(np.float64))
    row = a.max(axis=-1, keepdims=True) if a.ndim >= 2 else a.max(keepdims=True)
    return TOL * (a + row)


def compare(kernel: str, got: np.ndarray, want: np.ndarray) -> KernelCheck:
    """``got`` (the ANE) against ``want`` (the simulator), both [C, S]."""
    g = got.astype(np.float64)
    w = want.astype(np.float64)
    if not np.all(np.isfinite(w)):
        return KernelCheck(kernel, False, error="the fp16 simulator produced non-finite outputs on the "
                                                "self-check inputs (a bug in the self-check, please report it)")
    err = np.abs(g - w)
    err = np.where(np.isfinite(err), err, np.inf)
    b = bound(w)
    # the worst element: largest error relative to its own bound (inf for a non-finite ANE value)
    ratio = err / np.maximum(b, np.finfo(np.float64).tiny)
    at = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    ok = bool(np.all(err <= b))
    return KernelCheck(kernel, ok, max_abs_err=float(err.max()),
                       worst=(tuple(int(i) for i in at), float(g[at]), float(w[at])), worst_bound=float(b[at]))


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def random_inputs(kernel, seed: int, name: str) -> list[np.ndarray]:
    """Seeded N(0, INPUT_STD²) fp16 arrays for each input of ``kernel``, in binding order."""
    rng = np.random.default_rng(_seed(seed, name))
    return [(rng.standard_normal(s.view_shape) * INPUT_STD).astype(s.dtype) for s in kernel.inputs]


def _eval_once(kernel, inputs: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    ins = [kernel.alloc(s) for s in kernel.inputs]
    outs = [kernel.alloc(s) for s in kernel.outputs]
    for b, x in zip(ins, inputs):
        b.write(x)
    req = kernel.request(ins, outs)
    t0 = time.perf_counter()
    req.eval()
    dt = time.perf_counter() - t0
    result = [o.read().copy() for o in outs]
    del req
    return result, dt


def render_plan(plan) -> dict[str, tuple[str, dict]]:
    """name -> (MIL text, blobs) of every kernel, as compiled."""
    from rustane.runtime.plan import render

    return {name: (render(spec), dict(spec.blobs)) for name, spec in plan.items()}


def check_kernels(plan, kernels, seed: int = 0, sim=None) -> list[KernelCheck]:
    """Evaluate every compiled kernel (``kernels[name]``) once and compare with the fp16 simulator
    compiling the same text. Never raises for a mismatch; an ANE error is a failed check."""
    from rustane.backends import get

    sim = sim or get("sim", precision="fp16", check=False, ane_rules=False)
    texts = render_plan(plan)
    results = []
    for name in plan:
        k = kernels[name]
        text, blobs = texts[name]
        x = random_inputs(k, seed, name)
        try:
            got, t_ane = _eval_once(k, x)
        except Exception as e:  # an eval the ANE refuses is a failed check, reported like a mismatch
            results.append(KernelCheck(name, False, error=f"the ANE evaluation failed: {type(e).__name__}: {e}"))
            continue
        sk = sim.compile(text, blobs, name=name)
        try:
            want, t_sim = _eval_once(sk, x)
        finally:
            sk.close()
        worst = None
        for g, w in zip(got, want):
            r = compare(name, g, w)
            if worst is None or not r.ok or r.error:
                worst = r
            if not r.ok:
                break
        worst.ane_seconds, worst.sim_seconds = t_ane, t_sim
        results.append(worst)
    return results


def selfcheck_key(machine: dict, dialect: str, texts: dict[str, tuple[str, dict]]) -> str:
    """SHA-256 of what a pass is valid for: the chip + OS, the dialect, every kernel's text and weights."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": VERSION, "machine": machine, "dialect": dialect, "tol": TOL,
                         "input_std": INPUT_STD}, sort_keys=True).encode())
    for name in sorted(texts):
        text, blobs = texts[name]
        h.update(b"\0kernel\0" + name.encode() + b"\0" + text.encode())
        for key in sorted(blobs):
            h.update(b"\0blob\0" + key.encode() + b"\0" + hashlib.sha256(blobs[key]).digest())
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def ensure(plan, kernels, backend, seed: int = 0) -> dict | None:
    """Self-check ``kernels`` (compiled from ``plan`` on ``backend``) unless a pass for this machine
    and kernel text is cached. Returns the record ({"key", "cached", "kernels": [...]}) or None
    when the backend is not the ANE; raises SelfCheckError on a mismatch (the record is then written
    next to the cache as ``selfcheck/<key>.failed.json`` and not cached as a pass)."""
    if getattr(backend, "name", None) != "ane":
        return None
    from rustane.backends.ane.probe_cache import machine_key

    texts = render_plan(plan)
    machine = machine_key()
    key = selfcheck_key(machine, getattr(backend, "dialect", ""), texts)
    path = cache_dir() / "selfcheck" / f"{key}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == key and cached.get("ok"):
            cached["cached"] = True
            return cached
    except (OSError, ValueError):
        pass
    t0 = time.perf_counter()
    results = check_kernels(plan, kernels, seed)
    record = {"key": key, "version": VERSION, "machine": machine, "dialect": getattr(backend, "dialect", None),
              "tol": TOL, "input_std": INPUT_STD, "seed": seed, "ok": all(r.ok for r in results),
              "seconds": time.perf_counter() - t0, "kernels": [asdict(r) for r in results]}
    failed = [r for r in results if not r.ok]
    if failed:
        report = path.with_name(f"{key}.failed.json")
        try:
            _write_json(report, record)
        except OSError:
            report = None
        raise SelfCheckError(failed, len(results), report)
    try:
        _write_json(path, record)
    except OSError:  # an unwritable cache costs a re-check next time, nothing else
        pass
    record["cached"] = False
    return record
