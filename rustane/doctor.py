"""A report on how rustane runs on this machine: ``python -m rustane.doctor [--preset P] [--json] [--out DIR]``.

It runs the probe, compiles every training kernel of the preset and checks each one against the
fp16 simulator (the self-check, rustane/selfcheck.py), trains a few steps on the Neural Engine and
on the simulator (fp16 and exact fp32) from the same weights and tokens and compares losses and
weights, and writes ``doctor.json`` and ``doctor.md`` into ``--out`` (default ``rustane-doctor``).
Attach both to a bug report. Every field is described in docs/doctor.md.

Without a Neural Engine (Linux, Intel Macs) the ANE parts say why they were skipped and the rest
runs on the simulator; a build that carries the test fake framework (``-Dane_fake=true``) runs the
ANE parts through the fake, and the report says so.

Exit status: 0 report written, nothing wrong found (or no ANE here); 3 report written, the ANE
disagreed with the simulator or failed (the report says where); 2 the doctor could not run (one
``error:`` line, rustane.cli); 1 a bug in the doctor (one ``error: internal error`` line).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rustane.errors import RustaneError

__all__ = ["main", "run_doctor", "DoctorError", "REPORT_VERSION", "LOSS_RTOL", "EXIT_PROBLEMS"]

REPORT_VERSION = 1
#: ANE vs fp16 simulator after the training steps: a loss differing by more than this (relative)
#: is reported as a problem. The fake framework must be exact (0); on hardware a few fp16 roundings
#: per op, compounded over 3 steps, stay far below 2% while a broken kernel moves the loss by more.
LOSS_RTOL = 0.02
DEFAULT_OUT = "rustane-doctor"


#: exit status when the report lists problems (0, 1 and 2 are taken: ok, a bug, a usage error)
EXIT_PROBLEMS = 3


class DoctorError(RustaneError):
    """The doctor cannot run (bad arguments, unwritable output): one ``error:`` line, exit 2."""


# ---- pieces of the report ------------------------------------------------------------------------
def _ane_status() -> dict:
    """Whether the ANE backend runs here; on Linux, use the test fake when this build carries it."""
    from rustane.backends import ane

    fake = False
    if sys.platform != "darwin" and not os.environ.get(ane.FAKE_ENV):
        path = ane.fake_library_path()
        try:
            from rustane import _ane  # noqa: F401  (only the -Dane_fake=true build has it on Linux)

            built_with_fake = bool(_ane.BUILT_WITH_FAKE)
        except ImportError:
            built_with_fake = False
        if path and built_with_fake:
            os.environ[ane.FAKE_ENV] = path
    reason = ane.unavailable_reason()
    if reason is None and sys.platform != "darwin":
        fake = True
    return {"available": reason is None, "reason": reason, "fake_framework": fake}


def _probe(available: bool) -> dict:
    from rustane import probe

    t0 = time.perf_counter()
    try:
        result = probe.probe(refresh=True) if available else probe.probe(cache=False)
    except Exception as e:  # a probe crash is a finding, not a reason to stop the report
        return {"ane": False, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    result = dict(result)
    result["seconds"] = time.perf_counter() - t0
    checks = result.pop("checks", None)
    if isinstance(checks, dict):
        result["checks"] = [dict(v, name=k) for k, v in checks.items()]
    return result


def _profile_dict(p) -> dict:
    return {"name": p.name, "chip": p.chip, "os": p.os, "min_surface_bytes": p.min_surface_bytes,
            "min_width": p.min_width, "zero_width": p.zero_width, "width_multiple": p.width_multiple,
            "max_width": p.max_width, "max_dim": p.max_dim, "matmul_inner_multiple": p.matmul_inner_multiple,
            "compile_budget": p.compile_budget, "rejected_ops": sorted(p.rejected_ops),
            "dialects": list(p.dialects), "enforced": sorted(p.enforced)}


def _guard(cfg, profile) -> dict:
    from rustane import ane_guard

    try:
        warnings = ane_guard.require_config(cfg, profile)
        return {"ok": True, "errors": [], "warnings": warnings}
    except ane_guard.AneRuleError as e:
        lines = [ln.strip() for ln in str(e).splitlines()[1:-1]]
        return {"ok": False, "errors": lines, "warnings": []}


def _kernel_rows(plan, backend, ane: bool) -> tuple[list[dict], list[str]]:
    """Compile every kernel on ``backend``; on the ANE self-check each against the fp16 simulator."""
    from rustane import selfcheck
    from rustane.runtime.plan import compile_spec

    rows, problems, kernels = [], [], {}
    for name, spec in plan.items():
        row = {"name": name, "template": spec.template, "in_shape": list(spec.in_shape),
               "out_shape": list(spec.out_shape), "in_bytes": math.prod(spec.in_shape) * 2,
               "out_bytes": math.prod(spec.out_shape) * 2, "backend": backend.name, "compile_seconds": None,
               "ane_eval_seconds": None, "sim_eval_seconds": None, "status": None, "max_abs_err": None,
               "worst": None, "error": None}
        t0 = time.perf_counter()
        try:
            kernels[name] = compile_spec(backend, spec)
            row["compile_seconds"] = time.perf_counter() - t0
        except Exception as e:
            row.update(status="compile-error", error=f"{type(e).__name__}: {e}")
            problems.append(f"kernel {name} does not compile: {row['error']}")
        rows.append(row)
    try:
        if ane:
            ok_plan = {n: s for n, s in plan.items() if n in kernels}
            for r in selfcheck.check_kernels(ok_plan, kernels):
                row = next(x for x in rows if x["name"] == r.kernel)
                row.update(ane_eval_seconds=r.ane_seconds, sim_eval_seconds=r.sim_seconds, max_abs_err=r.max_abs_err,
                           error=r.error)
                if r.worst is not None:
                    idx, got, want = r.worst
                    row["worst"] = {"index": list(idx), "got": got, "expected": want, "bound": r.worst_bound}
                row["status"] = "ok" if r.ok else ("eval-error" if r.error else "mismatch")
                if not r.ok:
                    problems.append(f"self-check: {r.describe()}")
        else:
            for name, k in kernels.items():
                row = next(x for x in rows if x["name"] == name)
                x = selfcheck.random_inputs(k, 0, name)
                _, dt = selfcheck._eval_once(k, x)
                row.update(sim_eval_seconds=dt, status="not-checked")
    finally:
        for k in kernels.values():
            k.close()
    return rows, problems


def _tokens(cfg, steps: int, seed: int) -> np.ndarray:
    """The training tokens: ``steps`` sequences of seq_len+1 ids from numpy's default_rng(seed)."""
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(steps, cfg.seq_len + 1))


def _train(cfg, name: str, backend: str, precision: str, steps: int, seed: int) -> tuple[dict, dict | None]:
    """(run record, final params) of ``steps`` one-sequence steps from the seed's weights."""
    from rustane.engine import Engine, TrainConfig

    run = {"name": name, "backend": backend, "precision": precision, "losses": [], "step_seconds": [],
           "compile_seconds": None, "skipped_steps": 0, "error": None}
    tokens = _tokens(cfg, steps, seed)
    try:
        eng = Engine(cfg, backend=backend, precision=precision, seed=seed,
                     train=TrainConfig(lr=1e-3, warmup=0, steps=steps))
    except Exception as e:
        run["error"] = f"{type(e).__name__}: {e}"
        return run, None
    try:
        run["compile_seconds"] = eng.model.compile_seconds
        for i in range(steps):
            st = eng.train_step((tokens[i:i + 1, :-1], tokens[i:i + 1, 1:]))
            run["losses"].append(st.loss)
            run["step_seconds"].append(st.seconds)
            run["skipped_steps"] += int(st.skipped)
        params = {k: v.copy() for k, v in eng.model.params.items()}
    except Exception as e:
        run["error"] = f"{type(e).__name__}: {e}"
        return run, None
    finally:
        eng.model.close()
    return run, params


def _difference(a: dict, pa: dict, b: dict, pb: dict) -> dict:
    la, lb = np.array(a["losses"], np.float64), np.array(b["losses"], np.float64)
    worst, worst_abs, worst_rel = None, 0.0, 0.0
    for k in pa:
        d = float(np.max(np.abs(pa[k].astype(np.float64) - pb[k].astype(np.float64))))
        scale = float(np.max(np.abs(pb[k]))) or 1.0
        if worst is None or d / scale > worst_rel:
            worst, worst_rel = k, d / scale
        worst_abs = max(worst_abs, d)
    return {"a": a["name"], "b": b["name"], "loss_diffs": (la - lb).tolist(),
            "max_loss_diff": float(np.max(np.abs(la - lb))), "max_weight_diff": worst_abs,
            "max_weight_rel_diff": worst_rel, "worst_param": worst,
            "identical": bool(all(np.array_equal(pa[k], pb[k]) for k in pa) and np.array_equal(la, lb))}


# ---- the whole report ----------------------------------------------------------------------------
def run_doctor(preset_name: str = "tiny", steps: int = 3, seed: int = 0, argv: list[str] | None = None) -> dict:
    from rustane import __version__
    from rustane.backends.ane.probe_cache import machine_key
    from rustane.config import preset
    from rustane.engine import make_backend
    from rustane.mil.ane_rules import CONSERVATIVE, profile_from_probe
    from rustane.models import family_for

    t_start = time.perf_counter()
    try:
        cfg = preset(preset_name)
    except Exception as e:
        raise DoctorError(f"--preset: {e}") from e
    if steps < 1:
        raise DoctorError(f"--steps must be >= 1, got {steps}")
    report: dict = {
        "report_version": REPORT_VERSION, "rustane_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": ["python", "-m", "rustane.doctor", *(argv or [])],
        "python": platform.python_version(), "numpy": np.__version__,
        "machine": machine_key(), "preset": preset_name, "config": asdict(cfg),
    }
    problems: list[str] = []
    status = _ane_status()
    report["ane"] = status
    report["probe"] = _probe(status["available"])
    profile = profile_from_probe(report["probe"]) if status["available"] else CONSERVATIVE
    report["profile"] = _profile_dict(profile)
    report["guard"] = _guard(cfg, profile)
    if status["available"] and report["probe"].get("dialect") is None:
        problems.append(f"probe: {report['probe'].get('error', 'no MIL dialect works')}")
    if not report["guard"]["ok"]:
        problems += [f"guard: {e}" for e in report["guard"]["errors"]]
    ane_ok = status["available"] and report["guard"]["ok"]

    family = family_for(cfg)
    plan = family.plan_for(family.kernel_shape(cfg, "fp16"))
    target = make_backend("ane") if ane_ok else make_backend("sim", "fp16")
    report["kernels"], kp = _kernel_rows(plan, target, ane_ok)
    problems += kp

    from rustane import selfcheck

    report["selfcheck"] = {"reference": "sim fp16", "tol": selfcheck.TOL, "input_std": selfcheck.INPUT_STD,
                           "seed": 0, "ran": ane_ok}
    runs, params = [], {}
    plan_runs = [("sim-fp16", "sim", "fp16"), ("sim-fp32", "sim", "fp32")]
    if ane_ok:
        plan_runs.insert(0, ("ane", "ane", "fp16"))
    for name, be, prec in plan_runs:
        run, p = _train(cfg, name, be, prec, steps, seed)
        runs.append(run)
        if p is not None:
            params[name] = p
        elif run["error"]:
            problems.append(f"training on {name}: {run['error']}")
    diffs = []
    by = {r["name"]: r for r in runs}
    for a, b in (("ane", "sim-fp16"), ("sim-fp16", "sim-fp32")):
        if a in params and b in params:
            diffs.append(_difference(by[a], params[a], by[b], params[b]))
    for d in diffs:
        if d["a"] == "ane":
            ref = max(1.0, max(abs(x) for x in by["sim-fp16"]["losses"]))
            if d["max_loss_diff"] > LOSS_RTOL * ref:
                problems.append(f"training: the ANE loss differs from the fp16 simulator's by {d['max_loss_diff']:.4g} "
                                f"(more than {LOSS_RTOL:.0%})")
            if status["fake_framework"] and not d["identical"]:
                problems.append("training: the fake ANE framework is not bit-identical to the fp16 simulator")
    report["training"] = {"steps": steps, "seed": seed, "tokens": f"numpy default_rng({seed}).integers(0, "
                          f"{cfg.vocab_size}, size=({steps}, {cfg.seq_len + 1}))", "lr": 1e-3, "runs": runs,
                          "differences": diffs}
    report["problems"] = problems
    report["status"] = "problems" if problems else ("ok" if ane_ok else "no-ane")
    report["seconds"] = time.perf_counter() - t_start
    return report


# ---- writing -------------------------------------------------------------------------------------
def _fmt(x, spec=".3g") -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def render_markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# rustane doctor report ({r['status']})", "",
             f"rustane {r['rustane_version']}, Python {r['python']}, numpy {r['numpy']}; created {r['created']}; "
             f"`{' '.join(r['command'])}`", "",
             f"- machine: {m.get('chip')} ({m.get('machine')}), {m.get('system')} {m.get('os')}",
             f"- ANE: {'available' if r['ane']['available'] else 'not available: ' + str(r['ane']['reason'])}"
             + (" (the test fake framework, not hardware)" if r["ane"]["fake_framework"] else ""),
             f"- chip profile for the guards: {r['profile']['name']}",
             f"- preset {r['preset']}: dim {r['config'].get('dim')}, hidden {r['config'].get('hidden_dim')}, "
             f"{r['config'].get('n_layers')} layers, seq {r['config'].get('seq_len')}",
             f"- took {r['seconds']:.1f} s", ""]
    lines += ["## Problems", ""]
    lines += [f"- {p}" for p in r["problems"]] or ["none found"]
    p = r["probe"]
    lines += ["", "## Probe", ""]
    if p.get("ane"):
        lines += [f"dialect {p.get('dialect')}, eval latency {_fmt(p.get('eval_latency_ms'))} ms", "",
                  "| check | ok | detail |", "|---|---|---|"]
        for c in p.get("checks", []):
            lines.append(f"| {c['name']} | {'yes' if c.get('ok') else 'NO'} | {c.get('error', '') or ''} |")
    else:
        lines.append(f"not run: {p.get('reason') or p.get('error')}")
    lines += ["", "## Guard", ""]
    lines += [f"- refused: {e}" for e in r["guard"]["errors"]] + [f"- warning: {w}" for w in r["guard"]["warnings"]]
    if r["guard"]["ok"] and not r["guard"]["warnings"]:
        lines.append(f"every kernel inside every enforced rule of {r['profile']['name']}")
    lines += ["", "## Kernels", "", "| kernel | in | out | status | compile s | ANE eval s | sim eval s | max abs err | worst |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k in r["kernels"]:
        w = k["worst"]
        ws = f"[{', '.join(map(str, w['index']))}] got {w['got']:.4g}, expected {w['expected']:.4g}" if w else ""
        lines.append(f"| {k['name']} | {k['in_shape']} | {k['out_shape']} | {k['status']} | {_fmt(k['compile_seconds'])} "
                     f"| {_fmt(k['ane_eval_seconds'])} | {_fmt(k['sim_eval_seconds'])} | {_fmt(k['max_abs_err'])} | {ws} |")
    t = r["training"]
    lines += ["", f"## Training ({t['steps']} steps, seed {t['seed']})", "",
              "| run | losses | seconds per step | error |", "|---|---|---|---|"]
    for run in t["runs"]:
        lines.append(f"| {run['name']} | {', '.join(f'{x:.6f}' for x in run['losses'])} | "
                     f"{', '.join(f'{x:.3f}' for x in run['step_seconds'])} | {run['error'] or ''} |")
    lines += ["", "| compared | max loss diff | max weight diff | max weight rel diff | worst param | identical |",
              "|---|---|---|---|---|---|"]
    for d in t["differences"]:
        lines.append(f"| {d['a']} vs {d['b']} | {d['max_loss_diff']:.3g} | {d['max_weight_diff']:.3g} | "
                     f"{d['max_weight_rel_diff']:.3g} | {d['worst_param']} | {'yes' if d['identical'] else 'no'} |")
    lines += ["", "Fields: docs/doctor.md.", ""]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DoctorError(f"--out {out}: cannot create the directory ({e.strerror or e}); pass a writable folder")
    paths = []
    for name, text in (("doctor.json", json.dumps(report, indent=2, sort_keys=True) + "\n"),
                       ("doctor.md", render_markdown(report))):
        p = out / name
        tmp = out / f".{name}.tmp{os.getpid()}"
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, p)
        except OSError as e:
            raise DoctorError(f"--out {out}: cannot write {name} ({e.strerror or e}); pass a writable folder")
        paths.append(p)
    return paths[0], paths[1]


# ---- CLI -----------------------------------------------------------------------------------------
def build_parser():
    from rustane.cli import ArgumentParser

    ap = ArgumentParser(prog="python -m rustane.doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="the model preset whose kernels are checked (default tiny)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per backend (default 3)")
    ap.add_argument("--json", action="store_true", help="print doctor.json to stdout instead of a summary")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"folder for doctor.json and doctor.md (default {DEFAULT_OUT})")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DoctorError(f"--out {out} is a file; pass a folder (doctor.json and doctor.md are written into it)")
    report = run_doctor(args.preset, steps=args.steps, argv=argv)
    js, md = write_report(report, out)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(f"status: {report['status']}")
        for p in report["problems"]:
            print(f"  problem: {p}")
        print(f"report: {js} and {md} (attach both to a bug report)")
    return EXIT_PROBLEMS if report["status"] == "problems" else 0


if __name__ == "__main__":
    from rustane.cli import run

    run(main)
