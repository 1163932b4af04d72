"""Checkpoints: one directory per save, loadable by Hugging Face ``transformers`` as is.

Layout of ``<out_dir>/step-<NNNNNNNN>/``:

- ``model.safetensors``: fp32 weights under Hugging Face Llama names
  (``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
  ``model.layers.{i}.mlp.{gate,up,down}_proj.weight`` (gate = W1, up = W3, down = W2),
  ``model.layers.{i}.{input,post_attention}_layernorm.weight``, ``model.norm.weight``,
  ``lm_head.weight`` only when untied). q_proj/k_proj rows are stored in HF's rotate_half order.
- ``config.json``: a ``LlamaConfig`` (``ModelConfig.to_hf_dict``).
- ``optimizer.safetensors``: optimizer tensors (e.g. Adam ``m.<name>``/``v.<name>``), plus JSON
  metadata (optimizer step, hyper-parameters) in the safetensors header.
- ``trainer_state.json``: format version, step, the exact ``ModelConfig`` and its hash, and
  whatever the trainer adds (sampler RNG state and cursor, loss-scaler state, ...).

In memory the engine keeps parameters in a dict keyed by the same HF names, fp32, but with
q/k rows in OUR RoPE convention (interleaved pairs). ``save`` permutes them with
``permute_for_hf`` and ``load`` undoes it with ``unpermute_from_hf``.

Writing is atomic: everything goes into a hidden temp directory beside the target, each file
and the directory are fsynced, then the directory is renamed into place (and the parent
fsynced). A crash leaves at most a ``.tmp-*`` directory, which ``latest`` never returns. No
pickle is used anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from rustane import models
from rustane.config import ModelConfig

__all__ = [
    "CheckpointError", "ResumeError", "Checkpoint", "check_resumable", "clean_stale_temps", "FORMAT_VERSION", "save", "load", "latest", "prune",
    "list_checkpoints", "step_dir", "permute_for_hf", "unpermute_from_hf", "to_hf_params",
    "from_hf_params",
]

FORMAT_VERSION = 1
MODEL_FILE, OPTIM_FILE = "model.safetensors", "optimizer.safetensors"
CONFIG_FILE, STATE_FILE = "config.json", "trainer_state.json"
OWNER_FILE = ".writer.json"  # inside a save's temp folder only: which process writes it
_STEP_RE = re.compile(r"^step-(\d+)$")
_TEMP_PREFIXES = (".tmp-step-", ".old-step-")
_OLD_RE = re.compile(r"^\.old-(step-\d+)-")
STALE_UNOWNED_SECONDS = 60.0


from rustane.errors import CheckpointError, ResumeError  # noqa: E402


@dataclass
class Checkpoint:
    path: Path
    config: ModelConfig
    params: dict[str, np.ndarray]  # HF names, fp32, OUR RoPE convention
    optimizer_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    optimizer_meta: dict[str, Any] = field(default_factory=dict)
    trainer_state: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.trainer_state.get("step", 0))


# ---- the family's parameter conventions at the HF boundary ---------------------------------

# the q/k row permutation is the Llama family's (rustane.models.llama.params); kept importable here
from rustane.models.llama.params import permute_for_hf, unpermute_from_hf  # noqa: E402


def to_hf_params(params: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our parameter dict -> HF tensors (the family's conventions, e.g. Llama's q/k row order)."""
    return models.family_for(cfg).to_hf_params(params, cfg)


def from_hf_params(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensors -> our parameter dict."""
    return models.family_for(cfg).from_hf_params(tensors, cfg)


# ---- low-level file helpers -----------------------------------------------------------------

def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(p: Path, obj: Any) -> None:
    with open(p, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_safetensors(p: Path, tensors: Mapping[str, np.ndarray], meta: dict[str, str]) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(p), metadata=meta)
    _fsync_path(p)


def _read_safetensors(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors import safe_open
    if not p.exists():
        raise CheckpointError(f"checkpoint file {p} is missing")
    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises SafetensorError / OSError on damage
        raise CheckpointError(f"checkpoint file {p} is corrupted or not a safetensors file: {exc}") from exc
    return tensors, meta


def _read_json(p: Path) -> Any:
    if not p.exists():
        raise CheckpointError(f"checkpoint file {p} is missing")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {p} is corrupted (invalid JSON: {exc})") from exc


# ---- save / load ----------------------------------------------------------------------------

def step_dir(out_dir: str | os.PathLike, step: int) -> Path:
    return Path(out_dir) / f"step-{step:08d}"


def save(path: str | os.PathLike, cfg: ModelConfig, params: Mapping[str, np.ndarray], *,
         step: int, optimizer_tensors: Mapping[str, np.ndarray] | None = None,
         optimizer_meta: Mapping[str, Any] | None = None,
         trainer_state: Mapping[str, Any] | None = None,
         extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing one that exists).

    ``extra_files`` (file name -> bytes, e.g. ``tokenizer.json``) are written inside the same
    atomic directory.

    ``params`` are in our convention and must match ``cfg.param_shapes()`` exactly.
    ``trainer_state`` must be JSON-serializable (NaN/inf are refused).
    """
    cfg.validate()
    target = Path(path)
    _check_params(params, cfg, where="save")
    state = dict(trainer_state or {})
    state.update(format_version=FORMAT_VERSION, step=int(step), config=cfg.to_dict(),
                 config_hash=cfg.config_hash(), model_type=type(cfg).model_type)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        _write_owner(tmp)
        with warnings.catch_warnings():
            # residual-scaled models still get a config.json; trainer_state.json has the truth
            warnings.simplefilter("ignore")
            hf_cfg = cfg.to_hf_dict(allow_residual_scaling=True)
        _write_json(tmp / CONFIG_FILE, hf_cfg)
        _write_safetensors(tmp / MODEL_FILE, to_hf_params(params, cfg), {"format": "pt"})
        if optimizer_tensors is not None or optimizer_meta is not None:
            meta = {"format": "pt", "rustane": json.dumps(dict(optimizer_meta or {}), allow_nan=False)}
            _write_safetensors(tmp / OPTIM_FILE, dict(optimizer_tensors or {}), meta)
        for fname, data in (extra_files or {}).items():
            if Path(fname).name != fname or fname in (CONFIG_FILE, MODEL_FILE, OPTIM_FILE, STATE_FILE):
                raise CheckpointError(f"extra checkpoint file name {fname!r} must be a plain, unreserved file name")
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _write_json(tmp / STATE_FILE, state)  # written last: its presence marks a complete dir
        _fsync_path(tmp)
        if target.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            _write_owner(old)
            os.rename(target, old / "x")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        # the owner file goes only now: a temp folder without one would look like a live save
        # for a minute (_stale), so a kill just before the rename must still find it there
        (target / OWNER_FILE).unlink(missing_ok=True)
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temp folder beside ``path``; on success it replaces ``path`` in one rename (the old
    folder, if any, moved aside first), so readers see the old folder or the complete new one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                _fsync_path(f)
        _fsync_path(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
            os.rename(target, old / "x")
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_params(params: Mapping[str, np.ndarray], cfg: ModelConfig, where: str) -> None:
    want = cfg.param_shapes()
    missing = [k for k in want if k not in params]
    extra = [k for k in params if k not in want]
    bad = [f"{k}: {tuple(np.shape(params[k]))} (expected {want[k]})" for k in want
           if k in params and tuple(np.shape(params[k])) != want[k]]
    if missing or extra or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}")
        if bad:
            parts.append("wrong shapes " + "; ".join(bad[:8]))
        raise CheckpointError(f"{where}: parameters do not match the model config: " + ", ".join(parts))


def load(path: str | os.PathLike, expected: ModelConfig | None = None, *,
         load_optimizer: bool = True, ignore_fields: tuple[str, ...] = ()) -> Checkpoint:
    """Load a checkpoint directory (ours, or an HF Llama folder with config.json + safetensors).

    With ``expected``, refuses a checkpoint whose config differs, naming each differing field
    (``dim: checkpoint 64, requested 128``); ``ignore_fields`` lists fields allowed to differ
    (e.g. ``("seq_len",)`` to fine-tune at another length).
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist or is not a directory")
    state: dict[str, Any] = {}
    if (p / STATE_FILE).exists():
        state = _read_json(p / STATE_FILE)
        ver = state.get("format_version")
        if ver != FORMAT_VERSION:
            raise CheckpointError(f"{p / STATE_FILE}: format_version {ver!r} is not supported "
                                  f"(this rustane reads version {FORMAT_VERSION})")
        try:
            cfg = models.config_from_dict(state["config"], state.get("model_type"))
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{p / STATE_FILE}: bad 'config' entry: {exc}") from exc
        if state.get("config_hash") not in (None, cfg.config_hash()):
            raise CheckpointError(f"{p / STATE_FILE}: config_hash does not match its config (edited?)")
    else:
        try:
            cfg = models.config_from_hf(_read_json(p / CONFIG_FILE))
        except ValueError as exc:
            raise CheckpointError(f"{p / CONFIG_FILE}: {exc}") from exc
    if expected is not None:
        a, b = cfg.to_dict(), expected.to_dict()
        diffs = [f"{k}: checkpoint {a[k]!r}, requested {b[k]!r}" for k in a
                 if a[k] != b[k] and k not in ignore_fields]
        if diffs:
            raise CheckpointError(f"checkpoint {p} was saved for a different model:\n  "
                                  + "\n  ".join(diffs))
        for k in ignore_fields:
            setattr(cfg, k, getattr(expected, k))
    tensors, _ = _read_safetensors(p / MODEL_FILE)
    if cfg.tie_embeddings and "lm_head.weight" in tensors:
        # some HF exports store the tied head explicitly; the embedding is the one we train
        tensors.pop("lm_head.weight")
    _check_params(tensors, cfg, where=str(p / MODEL_FILE))
    params = from_hf_params(tensors, cfg)
    opt_t: dict[str, np.ndarray] = {}
    opt_m: dict[str, Any] = {}
    if load_optimizer and (p / OPTIM_FILE).exists():
        opt_t, meta = _read_safetensors(p / OPTIM_FILE)
        try:
            opt_m = json.loads(meta.get("rustane", "{}"))
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{p / OPTIM_FILE}: corrupted metadata: {exc}") from exc
    return Checkpoint(path=p, config=cfg, params=params, optimizer_tensors=opt_t,
                      optimizer_meta=opt_m, trainer_state=state)


def check_resumable(path: str | os.PathLike) -> dict[str, Any]:
    """Refuse a checkpoint that cannot continue a run exactly; returns its trainer state.

    Resuming needs ``trainer_state.json`` (a non-negative integer step, the training settings)
    and ``optimizer.safetensors`` whose step and tensors agree with it. A folder holding weights
    only (an HF export, a checkpoint saved without optimizer state) is refused with the way
    to use it: as the starting weights of a new run (``--model``). Reads no tensor data.
    """
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist or is not a directory")
    weights_only = f"start a new run from its weights with --model {p} instead"
    if not (p / STATE_FILE).is_file():
        raise ResumeError(f"{p} has no {STATE_FILE}, so it holds weights only and cannot be resumed; "
                          f"{weights_only}")
    state = _read_json(p / STATE_FILE)
    if not isinstance(state, dict):
        raise ResumeError(f"{p / STATE_FILE} is not a JSON object (damaged?); resume from another checkpoint "
                          f"or {weights_only}")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ResumeError(f"{p / STATE_FILE}: step must be a non-negative integer, got {step!r} (edited or "
                          f"damaged); resume from another checkpoint or {weights_only}")
    if not (p / OPTIM_FILE).is_file():
        raise ResumeError(f"{p} has no {OPTIM_FILE} (saved without optimizer state), so it cannot be resumed "
                          f"exactly; {weights_only}")
    from safetensors import safe_open
    try:
        with safe_open(str(p / OPTIM_FILE), framework="numpy") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
        opt = json.loads(meta.get("rustane", "{}"))
    except Exception as exc:  # damaged file: safetensors raises its own error types
        raise ResumeError(f"{p / OPTIM_FILE} is damaged ({exc}); resume from another checkpoint or "
                          f"{weights_only}") from exc
    opt_step = opt.get("step") if isinstance(opt, dict) else None
    # skipped (overflow) steps do not advance the optimizer, so it may lag the trainer, never lead
    if isinstance(opt_step, bool) or not isinstance(opt_step, int) or not 0 <= opt_step <= step:
        raise ResumeError(f"{p / OPTIM_FILE}: optimizer step {opt_step!r} does not fit trainer step {step} "
                          f"(files from different saves?); resume from another checkpoint or {weights_only}")
    if not keys or any(not k.startswith(("m.", "v.")) for k in keys):
        raise ResumeError(f"{p / OPTIM_FILE} does not hold Adam moments (m.*, v.*); {weights_only}")
    return state


def trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json`` without reading any tensors ({} when the directory
    has none, e.g. a plain HF folder, or does not exist: ``load`` then names the problem)."""
    p = Path(path) / STATE_FILE
    return _read_json(p) if p.is_file() else {}


# ---- directory management -------------------------------------------------------------------

def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``out_dir`` as ``(step, path)``, oldest first.

    Complete means a ``step-N`` directory holding ``trainer_state.json`` (written last); temp
    directories from interrupted saves (``.tmp-*``) are never listed.
    """
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).exists() and (child / MODEL_FILE).exists():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``out_dir`` (for ``--resume auto``), or None."""
    ck = list_checkpoints(out_dir)
    return ck[-1][1] if ck else None


def prune(out_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints, and stale temp dirs of dead
    saves. Returns the removed checkpoint paths. ``keep <= 0`` keeps everything."""
    removed: list[Path] = []
    if keep <= 0:
        return removed
    for _, p in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(p)
        removed.append(p)
    clean_stale_temps(out_dir)
    return removed


def clean_stale_temps(out_dir: str | os.PathLike) -> list[Path]:
    """Remove the temp folders of saves whose writer died (killed mid-save) under ``out_dir``;
    returns them. A folder a live writer owns is never touched (see ``_stale``)."""
    d = Path(out_dir)
    removed: list[Path] = []
    if not d.is_dir():
        return removed
    for child in d.iterdir():
        if child.is_dir() and child.name.startswith(_TEMP_PREFIXES) and _stale(child):
            m = _OLD_RE.match(child.name)
            if m and (child / "x" / STATE_FILE).is_file() and not (d / m.group(1)).exists():
                # killed between moving the previous copy aside and renaming the new one in:
                # the aside copy is the only one, put it back
                os.rename(child / "x", d / m.group(1))
            shutil.rmtree(child, ignore_errors=True)
            if not child.exists():
                removed.append(child)
    return removed


def _write_owner(tmp: Path) -> None:
    # who is writing this temp folder: a later start removes it once that process is gone
    info = {"pid": os.getpid(), "host": socket.gethostname(), "process_start": _process_start(os.getpid())}
    with open(tmp / OWNER_FILE, "w", encoding="utf-8") as f:
        json.dump(info, f)


def _process_start(pid: int) -> str | None:
    """An identifier of when process ``pid`` started (None: unknown or no such process); tells a
    writer from a later process that reused its pid."""
    if os.path.isdir("/proc/self"):
        return _proc_start(pid)
    if sys.platform == "darwin":  # no /proc: ask ps
        try:
            out = subprocess.run(["ps", "-o", "lstart=,stat=", "-p", str(pid)], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"
        if not out or out.split()[-1].startswith("Z"):
            return None
        return " ".join(out.split()[:-1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        pass
    return "?"  # alive, start time unknown


def _proc_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        fields_after_name = stat[stat.rindex(")") + 2:].split()
        if fields_after_name[0] == "Z":  # a zombie has finished writing for good
            return None
        return fields_after_name[19]  # field 22: start time in clock ticks since boot
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        return "?"


def _stale(p: Path) -> bool:
    """Whether temp folder ``p`` belongs to no live save: its writer (pid in the owner file) is
    gone, or that pid now names a younger process; folders without an owner file (interrupted
    in the instant after creation, or written by an older rustane) once they are a minute old;
    folders written on another host (a shared file system) only after a day."""
    try:
        age = time.time() - p.stat().st_mtime
    except FileNotFoundError:
        return False
    try:
        info = json.loads((p / OWNER_FILE).read_text(encoding="utf-8"))
        pid, host, started = int(info["pid"]), str(info["host"]), info.get("process_start")
    except (OSError, ValueError, KeyError, TypeError):
        return age > STALE_UNOWNED_SECONDS
    if host != socket.gethostname():
        return age > 86400
    now = _process_start(pid)
    if now is None:
        return True
    return started not in (None, "?") and now != "?" and now != started
