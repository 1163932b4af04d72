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
                                    "rustane.bench", "rustane.finetune", "rustane.fuse", "rustane.doctor"])
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
    assert_one_error_line(_cli("rustane.finetune", "--bogus", cwd=tmp_path), "--bogus")
    assert_one_error_line(_cli("rustane.fuse", cwd=tmp_path), "--model", "--adapter-path")


# ---- interrupts: finish the step, save, a second signal does not abandon the save -----------

import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

from rustane import checkpoint  # noqa: E402
from rustane.data import open_dataset  # noqa: E402
from rustane.interrupts import Interrupted  # noqa: E402

STEPS = 8
TC = dict(steps=STEPS, warmup=2, lr=3e-3)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An unbroken in-process run of STEPS steps: the reference every interrupted run must equal."""
    d = tmp_path_factory.mktemp("straight")
    tok = _token_file(d / "t.bin")
    data = open_dataset(tok, preset("tiny"))
    eng = Engine("tiny", backend="sim", precision="fp16", seed=5, train=TrainConfig(**TC))
    eng.fit(data, out=d / "run")
    params = {k: v.copy() for k, v in eng.model.params.items()}
    eng.close()
    return data, params


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_second_signal_during_the_save_does_not_abandon_it(straight, tmp_path, monkeypatch, sig):
    """10 randomized trials: the first signal after a random step, the second while a random file
    of the save is being written. Always a complete checkpoint of that step, and resuming from it
    gives weights bit-identical to the unbroken run."""
    data, ref = straight
    rng = np.random.default_rng(int(sig))
    real_json, real_st = checkpoint._write_json, checkpoint._write_safetensors
    for trial in range(10):
        k = int(rng.integers(1, STEPS))  # the step after which the first signal comes
        target = str(rng.choice([checkpoint.CONFIG_FILE, checkpoint.MODEL_FILE, checkpoint.OPTIM_FILE,
                                 checkpoint.STATE_FILE]))
        fired: list[str] = []

        def second_signal(path):
            if Path(path).name == target and not fired:
                fired.append(target)
                os.kill(os.getpid(), sig)  # arrives while this file is half written

        def write_json(p, obj):
            second_signal(p)
            real_json(p, obj)

        def write_st(p, tensors, meta):
            second_signal(p)
            real_st(p, tensors, meta)

        monkeypatch.setattr(checkpoint, "_write_json", write_json)
        monkeypatch.setattr(checkpoint, "_write_safetensors", write_st)
        out = tmp_path / f"t{trial}"
        eng = Engine("tiny", backend="sim", precision="fp16", seed=5, train=TrainConfig(**TC))

        def first_signal(st, k=k):
            if st.step == k:
                os.kill(os.getpid(), sig)

        with pytest.raises(Interrupted) as info:
            eng.fit(data, out=out, on_step=first_signal)
        eng.close()
        monkeypatch.undo()
        assert fired == [target], (trial, k, target)
        assert info.value.step == k and info.value.checkpoint == checkpoint.step_dir(out, k)
        assert _temps(out) == [], (trial, _temps(out))
        assert checkpoint.check_resumable(info.value.checkpoint)["step"] == k
        resumed = Engine.from_checkpoint(checkpoint.latest(out), backend="sim", precision="fp16")
        assert resumed.step == k
        resumed.fit(data, out=out)
        _assert_same_params(ref, resumed.model.params)
        resumed.close()


def test_third_signal_aborts_at_once_and_keeps_earlier_checkpoints(straight, tmp_path, monkeypatch):
    data, _ = straight
    real_st = checkpoint._write_safetensors
    calls: list[int] = []

    def write_st(p, tensors, meta):
        calls.append(1)
        if len(calls) == 3:  # the save of step 4 (step 2's wrote two files): signals 2 and 3 now
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        real_st(p, tensors, meta)

    monkeypatch.setattr(checkpoint, "_write_safetensors", write_st)
    eng = Engine("tiny", backend="sim", precision="fp16", seed=5, train=TrainConfig(**TC))

    def first(st):
        if st.step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as info:
        eng.fit(data, out=tmp_path / "run", save_every=2, on_step=first)
    eng.close()
    assert not isinstance(info.value, Interrupted)
    assert _temps(tmp_path / "run") == []
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "run")] == [2]
    checkpoint.check_resumable(checkpoint.latest(tmp_path / "run"))


def _popen_train(*args, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-P", "-m", "rustane.train", "--no-progress", "--backend", "sim",
                             "--sample", "0", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(cwd))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_double_signal_saves_says_how_to_resume_and_resumes_exactly(tmp_path, sig):
    tok = _token_file(tmp_path / "t.bin")
    common = ["--data", tok, "--steps", 40, "--eval-every", 0, "--seed", 2, "--lr", "3e-3", "--warmup", 2]
    p = _train(*common, "--out", tmp_path / "straight", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "run"
    proc = _popen_train(*common, "--out", out, cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.005)
    time.sleep(0.05)
    proc.send_signal(sig)
    time.sleep(0.002)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "checkpoint saved to" in err and "--resume auto" in err, err
    resume_cmd = err.split("resume with: ", 1)[1].splitlines()[0]
    assert resume_cmd.startswith("python -m rustane.train") and str(out) in resume_cmd
    ck = checkpoint.latest(out)
    assert ck is not None and checkpoint.check_resumable(ck)["step"] < 40
    assert _temps(out) == []
    p = _train(*common, "--out", out, "--resume", "auto", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    a = checkpoint.load(tmp_path / "straight" / "step-00000040").params
    b = checkpoint.load(out / "step-00000040").params
    _assert_same_params(a, b)


_KILL_DURING_SAVE = """
import os, signal, sys
from rustane import checkpoint, train
real, real_rename = checkpoint._write_safetensors, os.rename
WHEN = sys.argv.pop(1)
def write(p, tensors, meta):
    real(p, tensors, meta)
    if WHEN == "mid-save" and os.path.basename(str(p)) == checkpoint.OPTIM_FILE and "step-00000004" in str(p):
        os.kill(os.getpid(), signal.SIGKILL)  # dies with the temp folder half done
def rename(a, b):
    if WHEN == "before-rename" and os.path.basename(str(b)) == "step-00000004":
        os.kill(os.getpid(), signal.SIGKILL)  # every file written and synced, not yet renamed in
    real_rename(a, b)
checkpoint._write_safetensors = write
checkpoint.os.rename = rename
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("when", ["mid-save", "before-rename"])
def test_sigkill_during_save_then_restart_leaves_no_temp_and_resumes_exactly(tmp_path, when):
    tok = _token_file(tmp_path / "t.bin")
    common = ["--data", tok, "--steps", 6, "--eval-every", 0, "--seed", 4, "--save-every", 2, "--keep", 0,
              "--backend", "sim", "--sample", 0, "--no-progress"]
    p = _train(*common, "--out", tmp_path / "straight", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-P", "-c", _KILL_DURING_SAVE, when, *map(str, common), "--out", str(out)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env(tmp_path))
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert [n for n in _temps(out) if n.startswith(".tmp-step-00000004")], _temps(out)
    assert checkpoint.latest(out).name == "step-00000002"
    p = _train(*common, "--out", out, "--resume", "auto", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert _temps(out) == []
    _assert_same_params(checkpoint.load(tmp_path / "straight" / "step-00000006").params,
                        checkpoint.load(out / "step-00000006").params)


# ---- stale temp folders: removed when their writer is gone, never a live writer's ---------------

def _fake_temp(out: Path, name: str, owner: dict | None, age: float = 0.0) -> Path:
    d = out / name
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"partial")
    if owner is not None:
        (d / checkpoint.OWNER_FILE).write_text(json.dumps(owner))
    if age:
        t = time.time() - age
        os.utime(d, (t, t))
    return d


def test_stale_temp_folders_are_removed_and_live_ones_kept(tmp_path):
    import socket

    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        out = tmp_path / "run"
        me = {"pid": os.getpid(), "host": host, "process_start": checkpoint._process_start(os.getpid())}
        keep = [
            _fake_temp(out, ".tmp-step-00000001-live", {"pid": live.pid, "host": host,
                                                         "process_start": checkpoint._process_start(live.pid)}),
            _fake_temp(out, ".tmp-step-00000002-mine", me),
            _fake_temp(out, ".tmp-step-00000003-fresh-unowned", None),
            _fake_temp(out, ".tmp-step-00000004-other-host", {"pid": 1, "host": host + "-elsewhere"}, age=3600),
        ]
        gone = [
            _fake_temp(out, ".tmp-step-00000005-dead", {"pid": dead.pid, "host": host, "process_start": "1"}),
            # the pid lives, but as a process younger than the folder's writer (pid reused)
            _fake_temp(out, ".tmp-step-00000006-reused", {"pid": live.pid, "host": host, "process_start": "-1"}),
            _fake_temp(out, ".tmp-step-00000007-old-unowned", None, age=600),
            _fake_temp(out, ".old-step-00000008-dead", {"pid": dead.pid, "host": host}),
        ]
        # killed between moving step 9 aside and renaming its replacement in: step 9 comes back
        aside = _fake_temp(out, ".old-step-00000009-abc", {"pid": dead.pid, "host": host})
        (aside / "x").mkdir()
        (aside / "x" / checkpoint.STATE_FILE).write_text("{}")
        removed = checkpoint.clean_stale_temps(out)
        assert sorted(removed) == sorted(gone + [aside])
        assert all(p.exists() for p in keep) and not any(p.exists() for p in gone + [aside])
        assert (out / "step-00000009" / checkpoint.STATE_FILE).exists()
    finally:
        live.kill()
        live.wait()


# ---- resume validation -----------------------------------------------------------------------

@pytest.fixture()
def saved_run(straight, tmp_path):
    data, _ = straight
    eng = Engine("tiny", backend="sim", precision="fp16", seed=5, train=TrainConfig(**{**TC, "steps": 2}))
    eng.fit(data, out=tmp_path / "run")
    eng.close()
    return tmp_path / "run" / "step-00000002"


def _edit_state(ck: Path, **changes) -> None:
    st = json.loads((ck / checkpoint.STATE_FILE).read_text())
    st.update(changes)
    (ck / checkpoint.STATE_FILE).write_text(json.dumps(st))


@pytest.mark.parametrize("damage, needle", [
    (lambda ck: (ck / checkpoint.STATE_FILE).unlink(), "has no trainer_state.json"),
    (lambda ck: _edit_state(ck, step=-7), "step must be a non-negative integer, got -7"),
    (lambda ck: _edit_state(ck, step="2"), "step must be a non-negative integer"),
    (lambda ck: _edit_state(ck, step=1), "optimizer step 2 does not fit trainer step 1"),
    (lambda ck: (ck / checkpoint.OPTIM_FILE).unlink(), "has no optimizer.safetensors"),
    (lambda ck: (ck / checkpoint.OPTIM_FILE).write_bytes(b"\x00" * 64), "optimizer.safetensors is damaged"),
    (lambda ck: _edit_state(ck, train={"lr": "fast"}), "bad training settings"),
], ids=["no-state", "negative-step", "string-step", "optimizer-ahead", "no-optimizer", "damaged-optimizer",
        "bad-settings"])
def test_broken_state_is_refused_for_resume_with_the_way_out(saved_run, damage, needle):
    ck = saved_run
    damage(ck)
    with pytest.raises(errors.ResumeError) as info:
        Engine.from_checkpoint(ck, backend="sim")
    assert needle in str(info.value)
    assert f"--model {ck}" in str(info.value) or "another checkpoint" in str(info.value)
    # the CLI says the same in one line and changes nothing
    before = _snapshot(ck.parent)
    p = _train("--resume", ck, "--steps", 3, "--out", ck.parent, "--eval-every", 0, cwd=ck.parent.parent)
    assert_one_error_line(p, needle)
    assert _snapshot(ck.parent) == before


def test_checkpoint_without_optimizer_still_loads_as_weights(saved_run):
    ck = saved_run
    want = checkpoint.load(ck).params
    (ck / checkpoint.OPTIM_FILE).unlink()
    eng = Engine.from_checkpoint(ck, backend="sim", load_optimizer=False)
    _assert_same_params(want, eng.model.params)
    eng.close()


# ---- output folders: one run per folder, its history straight ----------------------------------

def _metric_steps(out: Path) -> list[int]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def test_rerunning_into_the_same_out_is_refused_and_overwrite_starts_over(finished_run):
    d, tok = finished_run
    before = _snapshot(d / "run")
    p = _train("--data", tok, "--steps", 2, "--eval-every", 0, "--out", d / "run", cwd=d)
    assert_one_error_line(p, "already holds a run", "--resume auto", "--overwrite", "new --out")
    assert _snapshot(d / "run") == before
    # a folder of the user's own files is not ours to delete: only a new folder is offered
    (d / "mine").mkdir()
    (d / "mine" / "notes.txt").write_text("keep me")
    p = _train("--data", tok, "--steps", 2, "--out", d / "mine", "--overwrite", cwd=d)
    assert p.returncode == 0, p.stderr
    assert (d / "mine" / "notes.txt").read_text() == "keep me"
    p = _train("--data", tok, "--steps", 1, "--eval-every", 0, "--out", d / "mine", "--overwrite", cwd=d)
    assert p.returncode == 0, p.stderr
    assert [s for s, _ in checkpoint.list_checkpoints(d / "mine")] == [1]
    assert _metric_steps(d / "mine") == [1]
    assert (d / "mine" / "notes.txt").read_text() == "keep me"
    (d / "other").mkdir()
    (d / "other" / "a.txt").write_text("x")
    assert_one_error_line(_train("--data", tok, "--out", d / "other", cwd=d), "pass a new or empty --out")


def test_run_json_records_command_version_data_hash_and_config(finished_run):
    import rustane

    d, tok = finished_run
    run = json.loads((d / "run" / "run.json").read_text())
    assert run["command"][1:3] == ["-m", "rustane.train"] and "--steps" in run["command"]
    assert run["rustane_version"] == rustane.__version__
    assert run["data"]["source"] == str(tok.resolve())
    # the token file split into train + validation: together, the file's bytes
    assert run["data"]["sha256"] == hashlib.sha256(tok.read_bytes()).hexdigest()
    assert run["model"] == preset("tiny").to_dict()
    assert run["train"]["steps"] == 2 and run["seed"] == 0 and run["precision"] == "fp16"


def test_resume_with_other_data_or_settings_is_refused_naming_the_difference(tmp_path):
    tok = _token_file(tmp_path / "t.bin")
    other = _token_file(tmp_path / "other.bin", seed=9)
    out = tmp_path / "run"
    p = _train("--data", tok, "--steps", 2, "--eval-every", 0, "--out", out, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    before = _snapshot(out)
    p = _train("--data", other, "--steps", 2, "--eval-every", 0, "--out", out, "--resume", "auto", cwd=tmp_path)
    assert_one_error_line(p, "data:", "SHA-256", "--allow-changes")
    p = _train("--data", tok, "--steps", 4, "--eval-every", 0, "--out", out, "--resume", "auto", cwd=tmp_path)
    assert_one_error_line(p, "--steps: run 2, now 4", "--allow-changes")
    p = _train("--data", tok, "--steps", 4, "--lr", "2e-3", "--seed", 3, "--eval-every", 0, "--out", out,
               "--resume", "auto", cwd=tmp_path)
    line = assert_one_error_line(p, "--steps: run 2, now 4", "--lr: run 0.001, now 0.002")
    assert "--seed: run 0, now 3" not in line  # the seed comes from the checkpoint when resuming
    assert _snapshot(out) == before
    # the checkpoint itself remembers its data, for a resume into another folder
    p = _train("--data", other, "--steps", 2, "--eval-every", 0, "--out", tmp_path / "elsewhere",
               "--resume", out / "step-00000002", cwd=tmp_path)
    assert_one_error_line(p, "data: the checkpoint was trained on tokens with SHA-256")
    # a deliberate change is accepted, and recorded
    p = _train("--data", tok, "--steps", 4, "--eval-every", 0, "--out", out, "--resume", "auto",
               "--allow-changes", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["steps"] == 4 and len(run["resumes"]) == 1 and "--allow-changes" in run["resumes"][0]["command"]
    assert _metric_steps(out) == [1, 2, 3, 4]


def test_metrics_hold_each_step_once_after_kill_and_resume(tmp_path):
    tok = _token_file(tmp_path / "t.bin")
    out = tmp_path / "run"
    common = ["--data", tok, "--steps", 30, "--eval-every", 5, "--eval-batches", 1, "--save-every", 4,
              "--out", out]
    for attempt in range(2):  # killed twice at random points after a save, then finished
        proc = _popen_train(*common, *(["--resume", "auto"] if attempt else []), cwd=tmp_path)
        want = checkpoint.step_dir(out, 8 * (attempt + 1)) / checkpoint.STATE_FILE
        deadline = time.time() + 120
        while time.time() < deadline and not want.exists() and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(float(np.random.default_rng(attempt).uniform(0, 0.1)))
        proc.kill()
        proc.communicate()
        assert max(_metric_steps(out)) < 30, "finished before the kill"
    p = _train(*common, "--resume", "auto", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert _metric_steps(out) == list(range(1, 31))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    val_steps = [r["step"] for r in rows if "val_loss" in r]
    assert val_steps == [0, 5, 10, 15, 20, 25, 30]


# ---- divergence ---------------------------------------------------------------------------------

def test_lr_5_stops_within_n_steps_with_a_finite_checkpoint(tmp_path):
    tok = _token_file(tmp_path / "t.bin")
    out = tmp_path / "run"
    n = 4
    p = _train("--data", tok, "--steps", 200, "--lr", 5, "--warmup", 0, "--eval-every", 0, "--sample", 20,
               "--max-nonfinite", n, "--out", out, cwd=tmp_path)
    line = assert_one_error_line(p, "training diverged", "learning rate 5", "--lr 0.5", "saved in")
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    first_bad = next(i for i, v in enumerate(losses) if not np.isfinite(v))
    assert len(losses) == first_bad + n < 200  # stopped exactly N non-finite steps in
    ck = checkpoint.latest(out)
    assert ck is not None and str(ck) in line
    loaded = checkpoint.load(ck)
    assert loaded.step == len(losses)
    assert all(np.isfinite(w).all() for w in loaded.params.values())
    checkpoint.check_resumable(ck)


def test_divergence_guard_rules():
    from rustane.divergence import DivergenceGuard

    nan, inf = float("nan"), float("inf")
    g = DivergenceGuard(3, "fp16", lr=1e-3)
    # overflow now and then is the scaler's business: a finite loss resets the count
    assert [g.observe(s, v) for s, v in enumerate([5.0, nan, nan, 4.0, inf, nan], 1)] == [None] * 6
    assert "3 consecutive steps (steps 5-7)" in g.observe(7, nan)
    g = DivergenceGuard(3, "fp32", lr=1e-3)
    assert g.observe(1, 5.0) is None and "fp32" in g.observe(2, nan)
    assert "gradient norm" in DivergenceGuard(3, "fp32").observe(4, 5.0, grad_norm=nan)
    assert DivergenceGuard(3, "fp16").observe(4, 5.0, grad_norm=inf) is None  # an fp16 overflow
    g = DivergenceGuard(0, "fp32")
    assert all(g.observe(s, nan) is None for s in range(1, 50))
    assert "the data or the initial weights" in DivergenceGuard(1, "fp16").observe(1, nan)
    with pytest.raises(errors.UsageError):
        DivergenceGuard(-1)


# ---- caches and the small items -------------------------------------------------------------------

def test_text_data_caches_go_to_rustane_cache_not_the_data_folder(tmp_path):
    from rustane.corpus import generate_stories

    data = tmp_path / "data"
    data.mkdir()
    (data / "s.txt").write_text("\n\n".join(generate_stories(300, seed=1)))
    p = _train("--data", data / "s.txt", "--steps", 1, "--eval-every", 0, "--out", tmp_path / "run", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(q.name for q in data.iterdir()) == ["s.txt"]
    assert list((tmp_path / "cache" / "text").glob("s.txt-*"))  # RUSTANE_CACHE (set by _env)


_NO_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as if not installed
from rustane import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_missing_matplotlib_gives_a_hint(tmp_path):
    tok = _token_file(tmp_path / "t.bin")
    p = subprocess.run([sys.executable, "-P", "-c", _NO_MATPLOTLIB, "--data", str(tok), "--steps", "1",
                        "--eval-every", "0", "--sample", "0", "--no-progress", "--backend", "sim",
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=tmp_path,
                       env=_env(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "loss.png not drawn: matplotlib is not installed" in p.stderr and "pip install matplotlib" in p.stderr
