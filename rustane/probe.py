"""What this Mac's Neural Engine accepts: ``python -m rustane.probe [--json] [--refresh]``.

Private-API behaviour differs across chips and macOS releases (ANE_FACTS §3.1, §8, §13), so the
engine asks the hardware instead of guessing. The probe compiles a handful of tiny kernels and
checks their results against numpy:

- dialect: ``program(1.3)`` / ``func main<ios18>`` with short scalars, or the older
  ``program(1.0)`` / ``<ios16>`` with verbose ``tensor<T, []>(v)`` scalars;
- ops that some generations reject: ``cast`` (fp32 I/O), ``matmul`` of two runtime tensors, ``concat``;
- requests with several inputs of different byte sizes (reported 0x1d) and the smallest surface
  that evaluates;
- eval dispatch latency (median of a tiny kernel) and an fp16 matmul throughput estimate.

About 12 compiles, well inside the per-process budget. The result is cached as JSON in the user
cache dir, keyed by chip and OS version; ``load_cached_probe()`` returns it for the engine (which
picks its MIL dialect from ``result["dialect"]``). Without an ANE (Linux, Intel Macs) it prints
a JSON object with ``"ane": false`` and the reason, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

# the cache lives with the ANE backend that reads it; re-exported for the CLI and old callers
from rustane.backends.ane.probe_cache import (  # noqa: F401
    CACHE_VERSION, cache_path, load_cached_probe, machine_key, save_probe,
)

SURFACE_SIZES = (64, 256, 1024, 4096, 16384, 49152, 65536)  # bytes, for the minimum-surface search


# ---- tiny MIL programs in either dialect -------------------------------------------------------------
DIALECTS = ("ios18", "ios16")


def _header(dialect: str) -> str:
    if dialect == "ios18":
        return ("program(1.3)\n[buildInfo = dict<string, string>({{\"coremlc-component-MIL\", \"3510.2.1\"}, "
                "{\"coremlc-version\", \"3505.4.1\"}, {\"coremltools-component-milinternal\", \"\"}, "
                "{\"coremltools-version\", \"9.0\"}})]\n")
    return ("program(1.0)\n[buildInfo = dict<tensor<string, []>, tensor<string, []>>("
            "{{\"coremlc-version\", \"3505.4.1\"}})]\n")


def _t(shape, dtype="fp16") -> str:
    return f"tensor<{dtype}, [{', '.join(map(str, shape))}]>"


def _scalar(dtype: str, value: str, dialect: str) -> str:
    """``int32(1)`` in the ios18 dialect, ``tensor<int32, []>(1)`` in ios16 (ANE_FACTS §3.1)."""
    return f"{dtype}({value})" if dialect == "ios18" else f"tensor<{dtype}, []>({value})"


class _Prog:
    def __init__(self, dialect: str):
        self.dialect = dialect
        self.params: list[str] = []
        self.lines: list[str] = []

    def input(self, name: str, shape, dtype="fp16") -> str:
        self.params.append(f"{_t(shape, dtype)} {name}")
        return name

    def const(self, name: str, dtype: str, value: str) -> str:
        s = _scalar(dtype, value, self.dialect)
        ty = dtype if self.dialect == "ios18" else f"tensor<{dtype}, []>"
        self.lines.append(f"{ty} {name} = const()[name={_scalar('string', repr_str(name), self.dialect)}, val={s}];")
        return name

    def op(self, name: str, shape, op: str, out_dtype="fp16", **args) -> str:
        a = ", ".join(f"{k}={v}" for k, v in args.items())
        self.lines.append(f"{_t(shape, out_dtype)} {name} = {op}({a})[name={_scalar('string', repr_str(name), self.dialect)}];")
        return name

    def text(self, outputs) -> str:
        body = "\n".join("        " + ln for ln in self.lines)
        return (_header(self.dialect) + "{\n"
                f"    func main<{self.dialect}>({', '.join(self.params)}) {{\n{body}\n"
                f"    }} -> ({', '.join(outputs)});\n}}\n")


def repr_str(s: str) -> str:
    return f'"{s}"'


def add_program(dialect: str, c: int, s: int) -> str:
    p = _Prog(dialect)
    x = p.input("x", (1, c, 1, s))
    p.op("z", (1, c, 1, s), "add", x=x, y=x)
    return p.text(["z"])


def cast_program(dialect: str, c: int = 16, s: int = 64) -> str:
    p = _Prog(dialect)
    x = p.input("x", (1, c, 1, s), "fp32")
    to16 = p.const("to16", "string", '"fp16"')
    to32 = p.const("to32", "string", '"fp32"')
    h = p.op("h", (1, c, 1, s), "cast", dtype=to16, x=x)
    d = p.op("d", (1, c, 1, s), "add", x=h, y=h)
    p.op("z", (1, c, 1, s), "cast", "fp32", dtype=to32, x=d)
    return p.text(["z"])


def matmul_program(dialect: str, heads: int, n: int) -> str:
    p = _Prog(dialect)
    a = p.input("a", (1, heads, n, n))
    b = p.input("b", (1, heads, n, n))
    tf = p.const("tf", "bool", "false")
    p.op("z", (1, heads, n, n), "matmul", transpose_x=tf, transpose_y=tf, x=a, y=b)
    return p.text(["z"])


def concat_program(dialect: str, c: int = 16, s: int = 64) -> str:
    p = _Prog(dialect)
    x = p.input("x", (1, c, 1, s))
    ax = p.const("ax", "int32", "1")
    il = p.const("il", "bool", "false")
    y = p.op("y", (1, c, 1, s), "add", x=x, y=x)
    p.op("z", (1, 2 * c, 1, s), "concat", axis=ax, interleave=il, values=f"({x}, {y})")
    return p.text(["z"])


def broadcast_add_program(dialect: str, c: int = 16, s: int = 64) -> str:
    """Two inputs of different byte sizes: a [1,C,1,S] and b [1,C,1,1]."""
    p = _Prog(dialect)
    a = p.input("a", (1, c, 1, s))
    b = p.input("b", (1, c, 1, 1))
    p.op("z", (1, c, 1, s), "add", x=a, y=b)
    return p.text(["z"])


# ---- running a check ---------------------------------------------------------------------------------
def _run(backend, mil: str, inputs: dict[str, np.ndarray], name: str):
    """Compile, bind, evaluate once; returns (kernel, request, {output name: array})."""
    k = backend.compile(mil, {}, name)
    ins = [k.alloc(s) for s in k.inputs]
    outs = [k.alloc(s) for s in k.outputs]
    for buf in ins:
        buf.write(inputs[buf.spec.name])
    req = k.request(ins, outs)
    req.eval()
    return k, req, {o.spec.name: o.read() for o in outs}


def _check(backend, mil, inputs, want, name, tol=1e-2) -> dict:
    """{"ok": bool, "error"/"max_abs_err": ...} for one kernel against the numpy result ``want``."""
    try:
        k, _, out = _run(backend, mil, inputs, name)
    except Exception as e:  # the point is to record what this chip rejects
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    unload_error = None
    try:
        k.close()
    except Exception as e:  # an unload failure says nothing about whether the program works
        unload_error = f"{type(e).__name__}: {e}"
    got = out["z"].astype(np.float32)
    err = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    ok = err <= tol * max(1.0, float(np.max(np.abs(want))))
    r = {"ok": bool(ok), "max_abs_err": err}
    if unload_error:
        r["unload_error"] = unload_error
    if not ok:
        r["error"] = "wrong result (evaluated without error but does not match numpy)"
    return r


def _rand(rng, shape, dtype=np.float16):
    return (rng.standard_normal(shape) * 0.5).astype(dtype)


def run_probe(backend, quick: bool = False) -> dict:
    """Probe ``backend`` (an AneBackend). ``quick`` shortens the timing loops (tests, fakes)."""
    rng = np.random.default_rng(0)
    checks: dict[str, dict] = {}
    c, s = 16, 64

    x = _rand(rng, (c, s))
    want = x.astype(np.float32) * 2
    for d in DIALECTS:
        checks[f"dialect_{d}"] = _check(backend, add_program(d, c, s), {"x": x}, want, f"probe_{d}")
    ok_dialects = [d for d in DIALECTS if checks[f"dialect_{d}"]["ok"]]
    dialect = ok_dialects[0] if ok_dialects else None
    result: dict = {"cache_version": CACHE_VERSION, "machine": machine_key(), "ane": True, "dialect": dialect,
                    "dialects_ok": ok_dialects, "checks": checks}
    if dialect is None:
        result["error"] = "no MIL dialect compiled and evaluated correctly; the ANE path cannot be used"
        return result

    xf = (rng.standard_normal((c, s)) * 0.5).astype(np.float32)
    checks["cast"] = _check(backend, cast_program(dialect, c, s), {"x": xf},
                            xf.astype(np.float16).astype(np.float32) * 2, "probe_cast")
    a, b = _rand(rng, (1, 2, 32, 32)), _rand(rng, (1, 2, 32, 32))
    checks["matmul"] = _check(backend, matmul_program(dialect, 2, 32), {"a": a, "b": b},
                              a.astype(np.float32) @ b.astype(np.float32), "probe_matmul", tol=2e-2)
    checks["concat"] = _check(backend, concat_program(dialect, c, s), {"x": x},
                              np.concatenate([x, x * np.float16(2)]).astype(np.float32), "probe_concat")
    bb = _rand(rng, (c, 1))
    checks["multi_input_different_sizes"] = _check(
        backend, broadcast_add_program(dialect, c, s), {"a": x, "b": bb},
        x.astype(np.float32) + bb.astype(np.float32), "probe_multisize")

    min_bytes = None
    for nbytes in SURFACE_SIZES:
        cc = max(1, nbytes // 2 // 16)
        xs = _rand(rng, (cc, 16))
        r = _check(backend, add_program(dialect, cc, 16), {"x": xs}, xs.astype(np.float32) * 2, f"probe_sz{nbytes}")
        checks[f"surface_{nbytes}"] = r
        if r["ok"]:
            min_bytes = nbytes
            break
    result["min_surface_bytes"] = min_bytes

    result["eval_latency_ms"] = _latency(backend, dialect, 8 if quick else 300)
    result["fp16_matmul_tflops"] = _throughput(backend, dialect, quick)
    return result


def _latency(backend, dialect: str, n: int) -> float | None:
    try:
        k, req, _ = _run(backend, add_program(dialect, 32, 32), {"x": np.ones((32, 32), np.float16)}, "probe_lat")
    except Exception:
        return None
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        req.eval()
        times.append(time.perf_counter() - t0)
    k.close()
    return float(np.median(times) * 1e3)


def _throughput(backend, dialect: str, quick: bool) -> dict | None:
    """fp16 matmul throughput of one [1,H,N,N] @ [1,H,N,N] kernel (a lower bound on peak)."""
    heads, n = (1, 32) if quick else (16, 512)
    try:
        ones = np.ones((1, heads, n, n), np.float16) * np.float16(0.01)
        k, req, _ = _run(backend, matmul_program(dialect, heads, n), {"a": ones, "b": ones}, "probe_peak")
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    iters = 2 if quick else 50
    t0 = time.perf_counter()
    for _ in range(iters):
        req.eval()
    dt = (time.perf_counter() - t0) / iters
    k.close()
    flops = 2.0 * heads * n ** 3
    return {"shape": [1, heads, n, n], "seconds_per_eval": dt, "tflops": flops / dt / 1e12}


# ---- CLI ---------------------------------------------------------------------------------------------
def probe(refresh: bool = False, cache: bool = True) -> dict:
    """The probe result for this machine: cached unless ``refresh``; ``{"ane": False, ...}`` without an ANE."""
    from rustane.backends import ane

    reason = ane.unavailable_reason()
    if reason is not None:
        return {"cache_version": CACHE_VERSION, "machine": machine_key(), "ane": False, "reason": reason}
    fake = sys.platform != "darwin"  # only the test fake makes the backend available off macOS
    if cache and not refresh and not fake:
        cached = load_cached_probe()
        if cached is not None:
            cached["cached"] = True
            return cached
    result = run_probe(ane.AneBackend(check=False), quick=fake)
    result["fake_framework"] = fake
    if cache and not fake:
        result["cache_file"] = str(save_probe(result))
    return result


def main(argv=None) -> int:
    from rustane.cli import ArgumentParser

    ap = ArgumentParser(prog="python -m rustane.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the result as JSON (default: a short summary)")
    ap.add_argument("--refresh", action="store_true", help="ignore the cache and probe again")
    ap.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    args = ap.parse_args(argv)
    result = probe(refresh=args.refresh, cache=not args.no_cache)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif not result["ane"]:
        print(f"no Apple Neural Engine: {result['reason']}")
    else:
        print(f"dialect: {result['dialect']}  min surface: {result.get('min_surface_bytes')} B  "
              f"eval latency: {result.get('eval_latency_ms')} ms")
        for name, r in result["checks"].items():
            print(f"  {name:32s} {'ok' if r['ok'] else 'FAIL: ' + r.get('error', '')}")
    return 0


if __name__ == "__main__":
    from rustane.cli import run

    run(main)
