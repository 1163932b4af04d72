"""What this Mac's Neural Engine accepts: ``python -m rustane.probe [--json] [--refresh]``.

The limits we ship come from other people's machines (docs/ane-rules.md), and several of them fail
silently, so the engine asks the hardware too. The probe compiles small programs and checks every
result against numpy, recording per rule what this chip and OS do:

- **dialect**: ``program(1.3)`` / ``<ios18>`` with short scalars, or ``program(1.0)`` / ``<ios16>``;
- **min-surface**: byte sizes from 2 KB to 64 KB at a fixed, safe width of 64;
- **min-width** / **zero-width**: widths 16..128 at a fixed 96 KB;
- **width-multiple**: widths 65, 66, 68, 72, 80 (multiples of 1, 2, 4, 8, 16) at >= 64 KB;
- **max-width**: widths 16,384, 16,400 and 32,768 at >= 64 KB;
- **matmul-op** and **matmul-inner**: a matmul of two runtime tensors contracting over 64, then 80;
- **uniform-io-sizes**: two inputs of equal, then of different sizes (each above every minimum);
- **cast-op** (fp32 I/O) and concat.

Every program except the one rule it measures stays inside every known limit (at least 49,152
bytes per tensor, width >= 64 and a multiple of 16, matmul inner dims a multiple of 32, equal
input sizes), so a limit cannot make a different check fail and be misread: the old probe's 2 KB
dialect programs would have reported "no dialect works" on a Mac with the 49 KB minimum. Each
outcome is one of ``ok``, ``compile-error``, ``load-error``, ``eval-error`` (with the code),
``zeros`` or ``wrong`` (evaluated without error, numbers differ from numpy).

About 32 compiles, well inside the per-process budget. The result is cached as JSON in the user
cache dir, keyed by chip and OS version. ``rustane.mil.ane_rules.profile_from_probe`` turns a
cached result into the chip profile the checker and the guards use: the profile of the chip
generation, tightened by every limit this Mac measured stricter. Without an ANE (Linux, Intel
Macs) it prints a JSON object with ``"ane": false`` and the reason, and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

# the cache lives with the ANE backend that reads it; re-exported for the CLI and old callers
from rustane.backends.ane.probe_cache import (  # noqa: F401
    CACHE_VERSION, cache_path, load_cached_probe, machine_key, save_probe,
)

#: a shape inside every known limit: 512 x 64 fp16 = 64 KB, width 64 (docs/ane-rules.md)
SAFE_C, SAFE_W = 512, 64
#: min-surface ladder: bytes at width 64 (each size / 128 channels)
SURFACE_SIZES = (2048, 4096, 8192, 12288, 16384, 24576, 32768, 49152, 65536)
#: min-width / zero-width ladder: widths at a fixed 98,304 bytes (each divides 49,152 elements)
WIDTHS = (16, 32, 48, 64, 128)
WIDTH_BYTES = 98304
#: width-multiple ladder: widths above the minimum that are multiples of 1, 2, 4, 8 and 16 only
MULTIPLE_WIDTHS = (65, 66, 68, 72, 80)
MULTIPLE_MIN_BYTES = 65536
#: max-width ladder
MAX_WIDTHS = (16384, 16400, 32768)
#: matmul contraction dims: a multiple of 32, and one of 16 only
MATMUL_INNER = (64, 80)

# ---- small MIL programs in either dialect ------------------------------------------------------------
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
    """``int32(1)`` in the ios18 dialect, ``tensor<int32, []>(1)`` in ios16 (docs/ane-rules.md#dialect)."""
    return f"{dtype}({value})" if dialect == "ios18" else f"tensor<{dtype}, []>({value})"


class _Prog:
    def __init__(self, dialect: str):
        self.dialect = dialect
        self.params: list[str] = []
        self.lines: list[str] = []

    def input(self, name: str, shape, dtype="fp16") -> str:
        self.params.append(f"{_t(shape, dtype)} {name}")
        return name

    def _name(self, name: str) -> str:
        return _scalar("string", repr_str(name), self.dialect)

    def const(self, name: str, dtype: str, value: str) -> str:
        s = _scalar(dtype, value, self.dialect)
        ty = dtype if self.dialect == "ios18" else f"tensor<{dtype}, []>"
        self.lines.append(f"{ty} {name} = const()[name={self._name(name)}, val={s}];")
        return name

    def vector(self, name: str, dtype: str, values) -> str:
        ty = _t((len(values),), dtype)
        self.lines.append(f"{ty} {name} = const()[name={self._name(name)}, val={ty}([{', '.join(map(str, values))}])];")
        return name

    def op(self, name: str, shape, op: str, out_dtype="fp16", **args) -> str:
        a = ", ".join(f"{k}={v}" for k, v in args.items())
        self.lines.append(f"{_t(shape, out_dtype)} {name} = {op}({a})[name={self._name(name)}];")
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


def cast_program(dialect: str, c: int = SAFE_C, s: int = SAFE_W) -> str:
    p = _Prog(dialect)
    x = p.input("x", (1, c, 1, s), "fp32")
    to16 = p.const("to16", "string", '"fp16"')
    to32 = p.const("to32", "string", '"fp32"')
    h = p.op("h", (1, c, 1, s), "cast", dtype=to16, x=x)
    d = p.op("d", (1, c, 1, s), "add", x=h, y=h)
    p.op("z", (1, c, 1, s), "cast", "fp32", dtype=to32, x=d)
    return p.text(["z"])


def matmul_program(dialect: str, heads: int, n: int, k: int | None = None) -> str:
    """z [1,H,N,N] = a [1,H,N,K] @ b [1,H,K,N]: contracts over K; a and b have equal sizes."""
    k = n if k is None else k
    p = _Prog(dialect)
    a = p.input("a", (1, heads, n, k))
    b = p.input("b", (1, heads, k, n))
    tf = p.const("tf", "bool", "false")
    p.op("z", (1, heads, n, n), "matmul", transpose_x=tf, transpose_y=tf, x=a, y=b)
    return p.text(["z"])


def concat_program(dialect: str, c: int = SAFE_C, s: int = SAFE_W) -> str:
    p = _Prog(dialect)
    x = p.input("x", (1, c, 1, s))
    ax = p.const("ax", "int32", "1")
    il = p.const("il", "bool", "false")
    y = p.op("y", (1, c, 1, s), "add", x=x, y=x)
    p.op("z", (1, 2 * c, 1, s), "concat", axis=ax, interleave=il, values=f"({x}, {y})")
    return p.text(["z"])


def two_input_program(dialect: str, c: int = SAFE_C, s: int = SAFE_W, s_b: int = SAFE_W) -> str:
    """z = a + b[..., :s] with a [1,C,1,s] and b [1,C,1,s_b]: inputs of equal (s_b == s) or
    different byte sizes, every tensor above the minimums either way."""
    p = _Prog(dialect)
    a = p.input("a", (1, c, 1, s))
    b = p.input("b", (1, c, 1, s_b))
    if s_b != s:
        beg = p.vector("beg", "int32", [0, 0, 0, 0])
        size = p.vector("sz", "int32", [1, c, 1, s])
        b = p.op("bs", (1, c, 1, s), "slice_by_size", x=b, begin=beg, size=size)
    p.op("z", (1, c, 1, s), "add", x=a, y=b)
    return p.text(["z"])


def io_order_program(dialect: str, c: int = SAFE_C, s: int = SAFE_W) -> str:
    """Inputs declared (b, a), outputs returned (z, y): both out of alphabetical order, every tensor
    the same size and above the minimums. z = b - a, y = a + a. Bound by name, as rustane binds, z
    is b - a where the Mac binds surfaces in name order (docs/ane-rules.md#io-order); a Mac binding
    in declaration order would give a - b (inputs) or 2a (outputs) there."""
    p = _Prog(dialect)
    b = p.input("b", (1, c, 1, s))
    a = p.input("a", (1, c, 1, s))
    p.op("z", (1, c, 1, s), "sub", x=b, y=a)
    p.op("y", (1, c, 1, s), "add", x=a, y=a)
    return p.text(["z", "y"])


# ---- running a check ---------------------------------------------------------------------------------
def _run(backend, mil: str, inputs: dict[str, np.ndarray], name: str):
    """Compile, bind, evaluate once; returns (kernel, request, {output name: array})."""
    k = backend.compile(mil, {}, name)
    try:
        ins = [k.alloc(s) for s in k.inputs]
        outs = [k.alloc(s) for s in k.outputs]
        for buf in ins:
            buf.write(inputs[buf.spec.name])
        req = k.request(ins, outs)
        req.eval()
        return k, req, {o.spec.name: o.read() for o in outs}
    except BaseException:
        try:
            k.close()
        except Exception:  # the first failure is the one to report
            pass
        raise


def _failure(e: Exception) -> dict:
    stage = getattr(e, "stage", None)
    result = {"compile": "compile-error", "load": "load-error", "eval": "eval-error"}.get(stage, "error")
    r = {"ok": False, "result": result, "error": f"{type(e).__name__}: {e}"}
    if getattr(e, "code", None) is not None:
        r["code"] = int(e.code)
    return r


def _check(backend, mil, inputs, want, name, tol=1e-2) -> dict:
    """One program against the numpy result ``want``: {"ok", "result", "max_abs_err" | "error", "code"}."""
    try:
        k, _, out = _run(backend, mil, inputs, name)
    except Exception as e:  # the point is to record what this chip rejects
        return _failure(e)
    unload_error = None
    try:
        k.close()
    except Exception as e:  # an unload failure says nothing about whether the program works
        unload_error = f"{type(e).__name__}: {e}"
    got = out["z"].astype(np.float32)
    err = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("inf")
    ok = err <= tol * max(1.0, float(np.max(np.abs(want))))
    r = {"ok": bool(ok), "result": "ok", "max_abs_err": err}
    if unload_error:
        r["unload_error"] = unload_error
    if not ok:
        r["result"] = "zeros" if not got.any() else "wrong"
        r["error"] = ("evaluated without error but returned zeros" if r["result"] == "zeros"
                      else "wrong result (evaluated without error but does not match numpy)")
    return r


def _rand(rng, shape, dtype=np.float16):
    return (rng.standard_normal(shape) * 0.5).astype(dtype)


def _double(backend, dialect: str, c: int, w: int, name: str, rng) -> dict:
    x = _rand(rng, (c, w))
    return _check(backend, add_program(dialect, c, w), {"x": x}, x.astype(np.float32) * 2, name)


def _matmul(backend, dialect: str, k: int, rng, name: str, heads: int = 4, n: int = 192) -> dict:
    a, b = _rand(rng, (1, heads, n, k)), _rand(rng, (1, heads, k, n))
    return _check(backend, matmul_program(dialect, heads, n, k), {"a": a, "b": b},
                  a.astype(np.float32) @ b.astype(np.float32), name, tol=2e-2)


# ---- per-rule summaries of the checks ---------------------------------------------------------------
def _ladder(checks: dict, prefix: str, values) -> list[dict]:
    return [{"value": v, "result": checks[f"{prefix}{v}"]["result"]} for v in values if f"{prefix}{v}" in checks]


def _smallest_from_which_all_pass(tested: list[dict]) -> int | None:
    """The smallest tested value such that it and every larger tested value passed."""
    best = None
    for t in sorted(tested, key=lambda t: -t["value"]):
        if t["result"] != "ok":
            break
        best = t["value"]
    return best


def _largest_up_to_which_all_pass(tested: list[dict]) -> int | None:
    best = None
    for t in sorted(tested, key=lambda t: t["value"]):
        if t["result"] != "ok":
            break
        best = t["value"]
    return best


def _accepted_multiple(tested: list[dict]) -> int | None:
    """The smallest m in 1, 2, 4, ... 64 such that every tested width that is a multiple of m passed."""
    for m in (1, 2, 4, 8, 16, 32, 64):
        hits = [t for t in tested if t["value"] % m == 0]
        if hits and all(t["result"] == "ok" for t in hits):
            return m
    return None


def summarize_rules(checks: dict, dialects_ok: list) -> dict:
    """What this chip/OS accepted, per rule of docs/ane-rules.md, from the checks."""
    surface = _ladder(checks, "surface_", SURFACE_SIZES)
    widths = _ladder(checks, "width_", WIDTHS)
    multiples = [t for t in _ladder(checks, "width_", (*WIDTHS, *MULTIPLE_WIDTHS)) if t["value"] >= SAFE_W]
    max_w = _ladder(checks, "max_width_", MAX_WIDTHS)
    inner = _ladder(checks, "matmul_inner_", MATMUL_INNER)
    refused = [t["value"] for t in max_w if t["result"] != "ok"]
    rules = {
        "dialect": {"accepted": list(dialects_ok)},
        "min-surface": {"width": SAFE_W, "tested": surface, "accepted_min": _smallest_from_which_all_pass(surface)},
        "min-width": {"bytes": WIDTH_BYTES, "tested": widths, "accepted_min": _smallest_from_which_all_pass(widths)},
        "zero-width": {"zeros_at": [t["value"] for t in widths if t["result"] == "zeros"]},
        "width-multiple": {"tested": multiples, "accepted_multiple": _accepted_multiple(multiples)},
        "max-width": {"tested": max_w, "accepted_max": _largest_up_to_which_all_pass(max_w),
                      "refused_from": min(refused) if refused else None},
        "matmul-inner": {"tested": inner, "accepted_multiple": _accepted_multiple(inner)},
    }
    for rule, name in (("matmul-op", "matmul_inner_64"), ("cast-op", "cast")):
        if name in checks:
            rules[rule] = {"result": checks[name]["result"]}
    if "io_order" in checks:
        rules["io-order"] = {"result": checks["io_order"]["result"]}
    if "inputs_equal_sizes" in checks:
        rules["uniform-io-sizes"] = {"equal": checks["inputs_equal_sizes"]["result"],
                                     "different": checks["inputs_different_sizes"]["result"]}
    return rules


def run_probe(backend, quick: bool = False) -> dict:
    """Probe ``backend`` (an AneBackend). ``quick`` shortens the timing loops (tests, fakes)."""
    rng = np.random.default_rng(0)
    checks: dict[str, dict] = {}
    for d in DIALECTS:
        checks[f"dialect_{d}"] = _double(backend, d, SAFE_C, SAFE_W, f"probe_{d}", rng)
    ok_dialects = [d for d in DIALECTS if checks[f"dialect_{d}"]["ok"]]
    dialect = ok_dialects[0] if ok_dialects else None
    result: dict = {"cache_version": CACHE_VERSION, "machine": machine_key(), "ane": True, "dialect": dialect,
                    "dialects_ok": ok_dialects, "checks": checks}
    if dialect is None:
        result["error"] = "no MIL dialect compiled and evaluated correctly; the ANE path cannot be used"
        result["rules"] = summarize_rules(checks, ok_dialects)
        return result

    xf = (rng.standard_normal((SAFE_C, SAFE_W)) * 0.5).astype(np.float32)
    checks["cast"] = _check(backend, cast_program(dialect), {"x": xf}, xf.astype(np.float16).astype(np.float32) * 2,
                            "probe_cast")
    for k in MATMUL_INNER:
        checks[f"matmul_inner_{k}"] = _matmul(backend, dialect, k, rng, f"probe_matmul{k}")
    x = _rand(rng, (SAFE_C, SAFE_W))
    checks["concat"] = _check(backend, concat_program(dialect), {"x": x},
                              np.concatenate([x, x * np.float16(2)]).astype(np.float32), "probe_concat")
    for key, s_b in (("inputs_equal_sizes", SAFE_W), ("inputs_different_sizes", 2 * SAFE_W)):
        a, b = _rand(rng, (SAFE_C, SAFE_W)), _rand(rng, (SAFE_C, s_b))
        checks[key] = _check(backend, two_input_program(dialect, SAFE_C, SAFE_W, s_b), {"a": a, "b": b},
                             a.astype(np.float32) + b[:, :SAFE_W].astype(np.float32), f"probe_{key}")
    a, b = _rand(rng, (SAFE_C, SAFE_W)), _rand(rng, (SAFE_C, SAFE_W))
    checks["io_order"] = _check(backend, io_order_program(dialect), {"a": a, "b": b},
                                b.astype(np.float32) - a.astype(np.float32), "probe_io_order")
    for nbytes in SURFACE_SIZES:  # byte size varies, width fixed at 64
        checks[f"surface_{nbytes}"] = _double(backend, dialect, nbytes // 2 // SAFE_W, SAFE_W, f"probe_sz{nbytes}", rng)
    for w in WIDTHS:  # width varies, byte size fixed
        checks[f"width_{w}"] = _double(backend, dialect, WIDTH_BYTES // 2 // w, w, f"probe_w{w}", rng)
    for w in MULTIPLE_WIDTHS:
        checks[f"width_{w}"] = _double(backend, dialect, math.ceil(MULTIPLE_MIN_BYTES / 2 / w), w, f"probe_w{w}", rng)
    for w in MAX_WIDTHS:
        checks[f"max_width_{w}"] = _double(backend, dialect, max(1, math.ceil(MULTIPLE_MIN_BYTES / 2 / w)), w,
                                           f"probe_maxw{w}", rng)
    rules = summarize_rules(checks, ok_dialects)
    result["rules"] = rules
    result["min_surface_bytes"] = rules["min-surface"]["accepted_min"]
    result["eval_latency_ms"] = _latency(backend, dialect, 8 if quick else 300)
    result["fp16_matmul_tflops"] = _throughput(backend, dialect, quick)
    return result


def _latency(backend, dialect: str, n: int) -> float | None:
    try:
        k, req, _ = _run(backend, add_program(dialect, SAFE_C, SAFE_W),
                         {"x": np.ones((SAFE_C, SAFE_W), np.float16)}, "probe_lat")
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
    heads, n = (2, 128) if quick else (16, 512)
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
