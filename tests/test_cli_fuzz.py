"""Random flag combinations never produce a traceback: a run (exit 0) or one ``error:`` line (exit 2).

Drives ``rustane.cli.run`` in process (a subprocess per example would cost a second of start-up
each) with hypothesis-drawn command lines for ``rustane.train``: valid and invalid values of the
training, data, output and resume flags, mixed. An internal error (exit 1: an exception nobody
expected) fails the test like a traceback would.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rustane import cli, train
from rustane.config import preset
from rustane.data import write_tokens

VOCAB = preset("tiny").vocab_size

# flag -> values: valid ones (small, so a run takes well under a second) and broken ones
FLAGS: dict[str, list[str]] = {
    "--steps": ["1", "2", "0", "-1", "x", "1.5"],
    "--lr": ["1e-3", "3e-3", "5", "inf", "nan", "-1", "0", "fast", "1e400"],
    "--min-lr": ["0", "1e-4", "1", "-1", "nan"],
    "--warmup": ["0", "1", "-2"],
    "--accum": ["1", "2", "0", "-1"],
    "--clip": ["1.0", "0", "-1", "inf"],
    "--weight-decay": ["0", "0.1", "-0.1", "nan"],
    "--loss-scale": ["dynamic", "1024", "0", "-1", "inf", "lots", "nan"],
    "--seq-len": ["64", "128", "0", "-1", "x", "7"],
    "--preset": ["tiny", "bogus"],
    "--precision": ["fp16", "fp32", "fp8"],
    "--backend": ["sim", "auto", "ane", "gpu"],
    "--seed": ["0", "7", "-1", "x"],
    "--eval-every": ["0", "1", "-1"],
    "--eval-batches": ["1", "0", "-3"],
    "--save-every": ["0", "1", "-1"],
    "--keep": ["0", "1", "-2"],
    "--val-fraction": ["0.05", "0.5", "0", "1", "2", "nan"],
    "--max-nonfinite": ["5", "1", "0", "-1"],
    "--sample": ["0", "3", "-1"],
    "--prompt": ["hi", "", "\u00e9\u00e8"],
}
SWITCHES = ["--research", "--overwrite", "--allow-changes", "--no-progress"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    write_tokens(d / "t.bin", rng.integers(0, VOCAB, 6000), VOCAB)
    (d / "odd.bin").write_bytes(b"\x01\x00\x02")
    (d / "big-ids.bin").write_bytes(np.full(3000, VOCAB + 3, dtype="<u2").tobytes())
    (d / "text.txt").write_text("a tiny story. " * 800)
    (d / "empty.txt").write_text("")
    (d / "folder").mkdir()
    return d


def _data_values(d: Path) -> list[str]:
    return [str(d / n) for n in ("t.bin", "odd.bin", "big-ids.bin", "text.txt", "empty.txt", "folder",
                                 "missing.bin")]


@settings(max_examples=int(os.environ.get("RUSTANE_FUZZ_EXAMPLES", "30")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_train_cli_random_flags_run_or_give_one_error_line(workspace, data, capsys, monkeypatch):
    monkeypatch.setenv("RUSTANE_CACHE", str(workspace / "cache"))
    monkeypatch.delenv("RUSTANE_DEBUG", raising=False)
    monkeypatch.chdir(workspace)
    chosen = data.draw(st.lists(st.sampled_from(sorted(FLAGS)), unique=True, max_size=7), label="flags")
    argv = ["--no-progress", "--steps", "2", "--eval-every", "0", "--sample", "0", "--backend", "sim"]
    for f in chosen:
        argv += [f, data.draw(st.sampled_from(FLAGS[f]), label=f)]
    argv += data.draw(st.lists(st.sampled_from(SWITCHES), unique=True, max_size=2), label="switches")
    argv += ["--data", data.draw(st.sampled_from(_data_values(workspace)), label="--data")]
    # an output folder: fresh, or one earlier examples wrote into (a run to refuse or to resume)
    out = data.draw(st.sampled_from(["new", "shared"]), label="out")
    n = len(list(workspace.glob("out-*")))
    argv += ["--out", str(workspace / (f"out-{n}" if out == "new" else "shared"))]
    argv += data.draw(st.sampled_from([[], ["--resume", "auto"], ["--resume", str(workspace / "nope")]]),
                      label="resume")
    with pytest.raises(SystemExit) as info:
        cli.run(train.main, argv)
    code = info.value.code
    _, err = capsys.readouterr()
    assert "Traceback" not in err, (argv, err)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    event("ran" if code == 0 else f"error: {errors[0][7:40] if errors else '?'}")
    if code == 0:
        assert not errors, (argv, err)
    else:
        assert code == 2, (argv, code, err[-2000:])
        assert len(errors) == 1 and "internal error" not in errors[0], (argv, err[-2000:])
