"""``python -m rustane.bench compare BASELINE.json CURRENT.json [--tolerance 15%] [--update]``.

Prints a Markdown table of every metric (baseline, current, change, verdict) and exits 1 only for
a *ratio* metric that got worse by more than the tolerance **and** by more than the measured
spread (the larger of the two files' spreads): a gate on a shared machine must not fail on noise.
Absolute metrics are reported, not gated, unless the baseline was recorded for this very machine
class and says ``"gate_absolute": true`` (a dedicated runner). A gated metric missing from the
current run fails (it can no longer be checked); a new one is reported. ``--update`` writes the
current run as the new baseline. docs/benchmarks.md explains the policy.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HELP = "compare a result JSON against a baseline; Markdown table; exit 1 on a gated regression"
DEFAULT_TOLERANCE = 0.15


class CompareError(ValueError):
    """Bad input to compare (unreadable file, not a bench JSON, bad tolerance)."""


def parse_tolerance(text: str) -> float:
    """``15%``, ``15`` and ``0.15`` all mean 15 %."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise CompareError(f"--tolerance {text!r} is not a number; write e.g. 15% or 0.15") from None
    if not t.endswith("%") and v >= 1:
        v /= 100  # "15" means 15 %
    if not 0 <= v < 1:
        raise CompareError(f"--tolerance {text!r} must be between 0% and 100%")
    return v


def load(path: str | Path) -> dict:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise CompareError(f"{p}: no such file (record a baseline with: python -m rustane.bench "
                           "compare BASELINE CURRENT --update)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"{p}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict):
        raise CompareError(f"{p}: not a bench result (no 'metrics' object); produce one with "
                           "python -m rustane.bench --suite ci --out FILE")
    for name, m in doc["metrics"].items():
        for key in ("median", "direction", "kind"):
            if not isinstance(m, dict) or key not in m:
                raise CompareError(f"{p}: metric {name!r} has no {key!r}")
        if m["direction"] not in ("higher", "lower") or m["kind"] not in ("ratio", "absolute"):
            raise CompareError(f"{p}: metric {name!r} has direction {m['direction']!r} / kind {m['kind']!r}; "
                               "expected higher|lower and ratio|absolute")
    return doc


def compare(base: dict, cur: dict, tolerance: float = DEFAULT_TOLERANCE) -> list[dict]:
    """One row per metric name in either file, baseline order first, new ones after."""
    gate_abs = bool(base.get("gate_absolute")) and base.get("machine_class") == cur.get("machine_class")
    bm, cm = base["metrics"], cur["metrics"]
    rows = []
    for name in list(bm) + [n for n in cm if n not in bm]:
        b, c = bm.get(name), cm.get(name)
        ref = b or c
        gated = ref["kind"] == "ratio" or gate_abs
        row = {"name": name, "unit": ref.get("unit", ""), "direction": ref["direction"], "kind": ref["kind"],
               "gated": gated, "baseline": b["median"] if b else None, "current": c["median"] if c else None,
               "change": None, "worse_by": None, "noise": None, "regression": False}
        if b is None:
            row["verdict"] = "new (no baseline)"
        elif c is None:
            row["verdict"] = "MISSING" if gated else "missing (not gated)"
            row["regression"] = gated
        else:
            if b["median"] == 0:
                change = 0.0 if c["median"] == 0 else float("inf") * (1 if c["median"] > 0 else -1)
            else:
                change = (c["median"] - b["median"]) / abs(b["median"])
            worse = -change if ref["direction"] == "higher" else change
            noise = max(float(b.get("spread", 0.0)), float(c.get("spread", 0.0)))
            row.update(change=change, worse_by=worse, noise=noise)
            if worse > tolerance and worse > noise:
                row["regression"] = gated
                row["verdict"] = "REGRESSION" if gated else "worse (absolute: not gated)"
            elif worse > tolerance:
                row["verdict"] = "worse, within measured spread"
            elif worse < -tolerance:
                row["verdict"] = "better"
            else:
                row["verdict"] = "ok"
        rows.append(row)
    return rows


def _num(v) -> str:
    if v is None:
        return "—"
    return f"{v:.4g}"


def markdown(rows: list[dict], tolerance: float, base_name: str = "baseline", cur_name: str = "current") -> str:
    out = [f"| metric | unit | better | kind | {base_name} | {cur_name} | change | spread | verdict |",
           "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        ch = "—" if r["change"] is None else f"{r['change']:+.1%}"
        sp = "—" if r["noise"] is None else f"±{r['noise']:.1%}"
        kind = r["kind"] + ("" if r["gated"] else " (not gated)")
        out.append(f"| {r['name']} | {r['unit']} | {r['direction']} | {kind} | {_num(r['baseline'])} | "
                   f"{_num(r['current'])} | {ch} | {sp} | {r['verdict']} |")
    failed = [r["name"] for r in rows if r["regression"]]
    out.append("")
    out.append(f"Tolerance {tolerance:.0%}; a gated metric fails when worse by more than the tolerance and "
               f"than its measured spread. Result: **{'FAIL' if failed else 'PASS'}**"
               + (f" ({', '.join(failed)})" if failed else ""))
    return "\n".join(out) + "\n"


def add_arguments(p) -> None:
    p.add_argument("baseline", help="baseline JSON (bench/baselines/<os-arch-backend>.json)")
    p.add_argument("current", help="result JSON of this run")
    p.add_argument("--tolerance", default=f"{DEFAULT_TOLERANCE:.0%}", help="allowed worsening, e.g. 15%% (default)")
    p.add_argument("--update", action="store_true", help="write CURRENT as the new BASELINE (after printing)")
    p.add_argument("--markdown-out", default=None, help="also write the table to this file")


def run(args) -> int:
    tol = parse_tolerance(args.tolerance)
    cur = load(args.current)
    if args.update and not Path(args.baseline).exists():
        base = {"metrics": {}, "machine_class": cur.get("machine_class")}
    else:
        base = load(args.baseline)
    rows = compare(base, cur, tol)
    table = markdown(rows, tol, Path(args.baseline).name, Path(args.current).name)
    if base.get("machine_class") and cur.get("machine_class") and base["machine_class"] != cur["machine_class"]:
        table += (f"\nNote: baseline is for {base['machine_class']}, this run is {cur['machine_class']}; "
                  "ratios still compare, absolute figures do not.\n")
    sys.stdout.write(table)
    if args.markdown_out:
        Path(args.markdown_out).write_text(table)
    if args.update:
        new = dict(cur)
        new["gate_absolute"] = bool(base.get("gate_absolute", False))
        path = Path(args.baseline)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(new, indent=1) + "\n")
        os.replace(tmp, path)  # atomic: a half-written baseline would break every later gate
        print(f"baseline updated: {path}")
        return 0
    return 1 if any(r["regression"] for r in rows) else 0
