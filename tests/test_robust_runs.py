"""A training run that never loses work and never shows a traceback (issue 13).

Bad input: one ``error:`` line, exit code 2, nothing in ``--out`` touched. API arguments of the
wrong type or range: typed exceptions with the same messages.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rustane import cli, errors
from rustane.config import preset
from rustane.data import write_tokens
from rustane.engine import Engine, TrainConfig

TINY_VOCAB = preset("tiny").vocab_size


def _token_file(path: Path, vocab: int = TINY_VOCAB, n: int = 20000, seed: int = 0) -> Path:
    # a learnable stream: a noisy repeating pattern
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(vocab), n // vocab + 1)[:n]
    ids = np.where(rng.random(n) < 0.2, rng.integers(0, vocab, n), base)
    return write_tokens(path, ids, vocab)


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.pop("RUSTANE_DEBUG", None)
    env["RUSTANE_CACHE"] = str(tmp_path / "cache")
    return env


def _cli(module: str, *args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=_env(cwd))


def _train(*args, cwd: Path) -> subprocess.CompletedProcess:
    return _cli("rustane.train", "--no-progress", "--backend", "sim", "--sample", "0", *args, cwd=cwd)


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: content hash and mtime (ns)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_error_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 2, f"exit {p.returncode}, expected 2\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr
    assert "internal error" not in lines[0], lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---- the API: typed exceptions ----------------------------------------------------------------

@pytest.mark.parametrize("kwargs, flag", [
    ({"lr": "fast"}, "--lr must be a number"),
    ({"lr": float("inf")}, "--lr must be a finite number"),
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"lr": -1e-3}, "--lr must be > 0"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"lr": True}, "--lr must be a number"),
    ({"steps": 0}, "--steps must be >= 1"),
    ({"steps": 2.5}, "--steps must be an integer"),
    ({"steps": "10"}, "--steps must be an integer"),
    ({"accum": 0}, "--accum must be >= 1"),
    ({"warmup": -1}, "--warmup must be >= 0"),
    ({"clip": 0.0}, "--clip must be > 0"),
    ({"weight_decay": float("-inf")}, "--weight-decay must be a finite number"),
    ({"beta1": 1.0}, "--beta1 must be < 1"),
    ({"eps": 0}, "--eps must be > 0"),
    ({"min_lr": 1.0, "lr": 1e-3}, "--min-lr must be in [0"),
    ({"loss_scale": 0}, "--loss-scale must be 'dynamic' or a positive finite number"),
    ({"loss_scale": "lots"}, "--loss-scale must be 'dynamic' or a positive number, got 'lots'"),
    ({"loss_scale": float("inf")}, "--loss-scale must be 'dynamic' or a positive finite number"),
])
def test_train_config_refuses_wrong_types_and_ranges(kwargs, flag):
    with pytest.raises(errors.UsageError) as info:
        TrainConfig(**kwargs)
    assert isinstance(info.value, errors.RustaneError) and isinstance(info.value, ValueError)
    assert flag in str(info.value)
    assert "\n" not in str(info.value)


def test_train_config_accepts_numpy_scalars_and_numeric_loss_scale():
    tc = TrainConfig(lr=np.float32(2e-3), steps=np.int64(7), warmup=3.0, loss_scale="512")
    assert tc.steps == 7 and tc.schedule()(0) == pytest.approx(0.0, abs=1e-3)
    # several errors are reported together, so one run of the command shows them all
    with pytest.raises(errors.UsageError, match=r"--lr .*; --steps"):
        TrainConfig(lr="x", steps=0)


@pytest.mark.parametrize("kwargs, needle", [
    ({"config": 42}, "config must be a preset name or a ModelConfig"),
    ({"precision": "fp8"}, "precision must be one of fp16, fp32"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"seed": 1.5}, "seed must be a non-negative integer"),
    ({"train": {"lr": 1e-3}}, "train must be a TrainConfig"),
    ({"backend": "gpu"}, "backend must be one of auto, "),
    ({"ane_rules": "yes"}, "ane_rules must be True or False"),
    ({"config": "enormous"}, "enormous"),
])
def test_engine_refuses_bad_arguments_with_typed_errors(kwargs, needle):
    args = {"config": "tiny", "backend": "sim", **kwargs}
    with pytest.raises(errors.RustaneError) as info:
        Engine(**args)
    assert needle in str(info.value)


def test_unavailable_ane_backend_is_a_typed_error():
    from rustane import backends

    reason = backends.available()["ane"]
    if not reason:
        pytest.skip("the ANE is available here")
    with pytest.raises(errors.BackendUnavailable, match="--backend sim"):
        backends.get("ane")


def test_existing_error_classes_share_the_base():
    from rustane.checkpoint import CheckpointError
    from rustane.config import ConfigError
    from rustane.data import DataError
    from rustane.formats import FormatError

    for cls, builtin in ((ConfigError, ValueError), (DataError, ValueError), (FormatError, ValueError),
                         (CheckpointError, RuntimeError), (errors.ResumeError, RuntimeError)):
        assert issubclass(cls, errors.RustaneError) and issubclass(cls, builtin), cls


# ---- cli.run: the exit-code contract, in process ------------------------------------------

def _run_in_process(main, argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli.run(main, argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_cli_run_maps_outcomes_to_exit_codes(capsys, monkeypatch):
    monkeypatch.delenv("RUSTANE_DEBUG", raising=False)

    def ok(argv):
        print("fine", argv)
        return 0

    def expected(argv):
        raise errors.DataError("data.bin holds 3 tokens;\n  pass a longer file")

    def bug(argv):
        return {}["missing"]

    def old_style(argv):
        raise SystemExit("error: --x must be >= 0")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert _run_in_process(ok, ["a", "--debug", "b"], capsys)[:2] == (0, "fine ['a', 'b']\n")
    code, _, err = _run_in_process(expected, [], capsys)
    assert (code, err) == (2, "error: data.bin holds 3 tokens; pass a longer file\n")
    code, _, err = _run_in_process(old_style, [], capsys)
    assert (code, err) == (2, "error: --x must be >= 0\n")
    code, _, err = _run_in_process(bug, [], capsys)
    assert code == 1 and err.startswith("error: internal error (KeyError") and "--debug" in err
    assert "Traceback" not in err and err.count("\n") == 1
    code, _, err = _run_in_process(interrupted, [], capsys)
    assert code == 130 and "Traceback" not in err
    # --debug (or RUSTANE_DEBUG=1) lets the exception through, for its traceback
    with pytest.raises(KeyError):
        cli.run(bug, ["--debug"])
    monkeypatch.setenv("RUSTANE_DEBUG", "1")
    with pytest.raises(errors.DataError):
        cli.run(expected, [])
    # the argument after "--" is data, not the flag
    monkeypatch.delenv("RUSTANE_DEBUG")
    assert _run_in_process(ok, ["--", "--debug"], capsys)[:2] == (0, "fine ['--', '--debug']\n")


@pytest.mark.parametrize("module", ["rustane.train", "rustane.generate", "rustane.evaluate", "rustane.probe",
                                    "rustane.bench"])
def test_help_lists_each_default_once_and_debug(module, tmp_path):
    p = _cli(module, "--help", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "--debug" in p.stdout
    # one help entry per flag: the lines from "  --flag" up to the next flag
    entries, cur = [], None
    for ln in p.stdout.splitlines():
        if ln.lstrip().startswith("-") and ln.startswith("  "):
            cur = [ln]
            entries.append(cur)
        elif cur is not None and ln.startswith("   "):
            cur.append(ln)
        else:
            cur = None
    assert entries
    for e in entries:
        text = " ".join(x.strip() for x in e)
        assert text.lower().count("default") <= 1, text


# ---- the command line: bad input is one error line, exit 2, --out untouched ---------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run; the bad commands below point at its --out."""
    d = tmp_path_factory.mktemp("bad-input")
    tok = _token_file(d / "t.bin")
    p = _train("--data", tok, "--steps", 2, "--eval-every", 0, "--out", d / "run", cwd=d)
    assert p.returncode == 0, p.stderr
    return d, tok


BAD_TRAIN_INPUT = [
    (["--backend", "ane"], ["ane backend is not available", "--backend sim"]),
    (["--eval-batches", "0"], ["--eval-batches must be >= 1", "--eval-every 0"]),
    (["--lr", "inf"], ["--lr must be a finite number"]),
    (["--lr", "nan"], ["--lr must be a finite number"]),
    (["--lr", "-0.5"], ["--lr must be > 0"]),
    (["--lr", "fast"], ["--lr", "'fast'"]),
    (["--loss-scale", "0"], ["--loss-scale must be 'dynamic' or a positive finite number", "0.0"]),
    (["--steps", "0"], ["--steps must be >= 1"]),
    (["--seed", "-3"], ["--seed must be >= 0"]),
    (["--val-fraction", "1.5"], ["--val-fraction"]),
    (["--keep", "-2"], ["--keep must be >= 0"]),
    (["--data", "/nonexistent/tokens.bin"], ["/nonexistent/tokens.bin"]),
    (["--resume", "/nonexistent/ckpt"], ["/nonexistent/ckpt", "does not exist"]),
]


@pytest.mark.parametrize("args, needles", BAD_TRAIN_INPUT, ids=[" ".join(a) for a, _ in BAD_TRAIN_INPUT])
def test_bad_train_input_is_one_error_line_and_out_is_untouched(finished_run, args, needles):
    d, tok = finished_run
    if args[:2] == ["--backend", "ane"]:
        from rustane import backends
        if backends.available()["ane"] == "":
            pytest.skip("the ANE is available here")
    before = _snapshot(d / "run")
    base = ["--data", tok, "--steps", 4, "--eval-every", 2, "--out", d / "run", "--resume", "auto"]
    if "--resume" in args:
        base = base[:-2]
    p = _train(*base, *args, cwd=d)
    assert_one_error_line(p, *needles)
    assert _snapshot(d / "run") == before


def test_other_tools_report_bad_input_as_one_line(tmp_path):
    assert_one_error_line(_cli("rustane.generate", "--model", tmp_path / "nope", cwd=tmp_path), "does not exist")
    assert_one_error_line(_cli("rustane.generate", "--model", tmp_path, "-n", "-4", cwd=tmp_path),
                          "--max-tokens must be >= 0")
    assert_one_error_line(_cli("rustane.evaluate", "--model", tmp_path / "nope", "--data", tmp_path / "x.txt",
                               cwd=tmp_path), "does not exist")
    assert_one_error_line(_cli("rustane.bench", "train", "--steps", "0", cwd=tmp_path), "--steps must be >= 1")
    assert_one_error_line(_cli("rustane.bench", cwd=tmp_path), "subcommand")
    assert_one_error_line(_cli("rustane.probe", "--bogus", cwd=tmp_path), "--bogus")
