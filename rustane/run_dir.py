"""The output folder of a training run (``--out``): one run per folder, its history kept straight.

- A new run refuses a folder that already holds files, naming the ways out: continue that run
  (``--resume auto``), start over (``--overwrite`` deletes what rustane wrote there), or another
  folder. Re-running a command into the same folder would otherwise overwrite its checkpoints and
  append a second history to ``metrics.jsonl``.
- ``run.json`` records what the run is: the command line, the rustane version, the data (source
  path and a SHA-256 of its tokens), the model config, the training settings, seed and precision;
  each resume appends its command. A resume that would train on other data, another model or
  other settings is refused, naming each difference (``--allow-changes`` accepts deliberate ones,
  e.g. a longer ``--steps``; the resume is then no longer the same run bit for bit).
- On resume, ``metrics.jsonl`` keeps the rows up to the resumed step only, so every step appears
  once however often the run was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rustane.errors import OutputDirError, ResumeError

__all__ = ["RUN_FILE", "METRICS_FILE", "check_new_run", "overwrite", "describe_data", "write_run",
           "check_resume", "truncate_metrics", "read_run"]

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
FORMAT = 1
# what rustane writes into --out (``--overwrite`` deletes these and nothing else)
_OURS_FILES = (RUN_FILE, METRICS_FILE, "loss.png", "report.json", "tokenizer.json", "builtin-stories.txt")
_OURS_PREFIXES = ("step-", ".tmp-step-", ".old-step-")


def _ours(p: Path) -> bool:
    return p.name in _OURS_FILES or p.name.startswith(_OURS_PREFIXES)


def check_new_run(out: Path) -> None:
    """Refuse to start a new run in ``out`` when it already holds files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputDirError(f"--out {out} is a file, not a folder; pass a folder for the run")
    entries = sorted(out.iterdir())
    if not entries:
        return
    steps = sorted(p.name for p in entries if p.name.startswith("step-"))
    what = (f"a run ({len(steps)} checkpoint{'s' if len(steps) != 1 else ''}, latest {steps[-1]})" if steps
            else "a run" if any(_ours(p) for p in entries) else f"{len(entries)} other file(s)")
    ways = f"continue it with --resume auto, start over with --overwrite (deletes the run's checkpoints " \
           f"and metrics there), or pass a new --out folder"
    if not any(_ours(p) for p in entries):
        ways = "pass a new or empty --out folder"
    raise OutputDirError(f"--out {out} already holds {what}; {ways}")


def overwrite(out: Path) -> list[Path]:
    """Delete what rustane wrote into ``out`` (checkpoints, metrics, run.json, plots); leave other
    files alone. Returns the deleted paths."""
    gone = []
    if not out.is_dir():
        return gone
    for p in sorted(out.iterdir()):
        if _ours(p):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
            gone.append(p)
    return gone


def describe_data(source: str | os.PathLike, data) -> dict[str, Any]:
    """Provenance of a ``TokenData``: the source as given (absolute when a path), and the SHA-256
    of its training then validation tokens as stored (little-endian ids: what the run actually
    reads, whatever the source format; for a token file split into train and validation, the
    SHA-256 of the file)."""
    h = hashlib.sha256()
    for part in (data.train, data.val):
        arr = np.ascontiguousarray(part)
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        view = memoryview(arr).cast("B")
        for i in range(0, len(view), 1 << 24):  # a memmap is hashed in 16 MB pieces
            h.update(view[i:i + (1 << 24)])
    src = str(source)
    if src != "builtin" and Path(src).exists():
        src = str(Path(src).resolve())
    return {"source": src, "sha256": h.hexdigest(), "train_tokens": int(len(data.train)),
            "val_tokens": int(len(data.val))}


def read_run(out: Path) -> dict[str, Any] | None:
    p = out / RUN_FILE
    if not p.is_file():
        return None
    try:
        run = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputDirError(f"{p} is damaged ({exc}); move it away to resume without the checks it enables") \
            from None
    return run if isinstance(run, dict) else None


def _atomic_write_text(p: Path, text: str) -> None:
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def write_run(out: Path, *, argv: Sequence[str], data: Mapping[str, Any], model: Mapping[str, Any],
              train: Mapping[str, Any], seed: int, precision: str, resumed_from: str | None = None) -> None:
    """Write ``run.json`` for a new run, or append this resume to the existing one."""
    from rustane import __version__

    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    command = [Path(sys.executable).name, "-m", "rustane.train", *argv]
    run = read_run(out) if resumed_from is not None else None
    if run is None:
        run = {"format": FORMAT, "created": now, "command": command, "rustane_version": __version__,
               "data": dict(data), "model": dict(model), "train": dict(train), "seed": int(seed),
               "precision": precision, "resumes": []}
    else:
        run.setdefault("resumes", []).append({"at": now, "from": resumed_from, "command": command,
                                              "rustane_version": __version__})
        # what the run trains with from here on (equal unless --allow-changes)
        run.update(data=dict(data), model=dict(model), train=dict(train), seed=int(seed), precision=precision)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(out / RUN_FILE, json.dumps(run, indent=2, sort_keys=True) + "\n")


def _diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: run {a.get(k)!r}, now {b.get(k)!r}")
    return out


def check_resume(out: Path, *, data: Mapping[str, Any], model: Mapping[str, Any], train: Mapping[str, Any],
                 seed: int, precision: str, allow_changes: bool, ck_state: Mapping[str, Any] | None = None) -> list[str]:
    """Refuse a resume into ``out`` whose data, model, settings, seed or precision differ from the
    run's (``run.json``, and the checkpoint's own record of its data). Returns the differences
    accepted under ``allow_changes`` (empty when none)."""
    diffs: list[str] = []
    run = read_run(out)
    recorded_data = (ck_state or {}).get("data_sha256")
    if recorded_data is not None and recorded_data != data["sha256"]:
        diffs.append(f"data: the checkpoint was trained on tokens with SHA-256 {recorded_data[:12]}..., "
                     f"{data['source']} has {data['sha256'][:12]}...")
    if run is not None:
        rd = run.get("data", {})
        if rd.get("sha256") != data["sha256"] and recorded_data is None:
            diffs.append(f"data: the run trained on {rd.get('source')} ({rd.get('train_tokens')} + "
                         f"{rd.get('val_tokens')} tokens, SHA-256 {str(rd.get('sha256'))[:12]}...), now "
                         f"{data['source']} ({data['train_tokens']} + {data['val_tokens']} tokens, SHA-256 "
                         f"{data['sha256'][:12]}...)")
        diffs += _diff(run.get("model", {}), model, "model ")
        diffs += _diff(run.get("train", {}), train, "--")
        if run.get("seed") != seed:
            diffs.append(f"--seed: run {run.get('seed')!r}, now {seed!r}")
        if run.get("precision") != precision:
            diffs.append(f"--precision: run {run.get('precision')!r}, now {precision!r}")
    diffs = [d.replace("--min_lr", "--min-lr").replace("--weight_decay", "--weight-decay")
             .replace("--loss_scale", "--loss-scale") for d in diffs]
    if diffs and not allow_changes:
        raise ResumeError(f"resuming {out} with other settings than the run's ({'; '.join(diffs)}); "
                          f"resume with the run's own settings (drop those flags), pass --allow-changes to "
                          f"accept deliberate changes, or start a new run in another --out folder")
    return diffs


def truncate_metrics(out: Path, step: int) -> int:
    """Drop the rows of ``metrics.jsonl`` past ``step`` (the run resumes there and records them
    again); returns how many were dropped. A damaged row (a half-written last line of a killed
    run) is dropped too."""
    p = out / METRICS_FILE
    if not p.is_file():
        return 0
    kept, dropped = [], 0
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and int(row.get("step", -1)) <= step
        except (ValueError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        _atomic_write_text(p, "".join(ln + "\n" for ln in kept))
    return dropped
