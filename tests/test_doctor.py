"""``python -m rustane.doctor`` on Linux (no Neural Engine): the report, its documented fields, and
values checked against computations written here (a PyTorch forward for the first loss, shapes for
the surface sizes). The fake-ANE run of the doctor is in tests/test_ane_contract.py."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from doctor_fields import documented_fields, undocumented
from tiers import require_module

REPO = Path(__file__).resolve().parent.parent


def _doctor(*args, cwd=None, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "RUSTANE_ANE_FAKE"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "rustane.doctor", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=600)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("doctor")
    r = _doctor("--json", "--out", str(out), env_extra={"RUSTANE_CACHE": str(out / "cache")})
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    written = json.loads((out / "doctor.json").read_text())
    assert printed == written
    return written, out


def test_every_field_is_documented(report):
    rep, _ = report
    assert undocumented(rep) == []
    assert len(documented_fields()) > 100


def test_machine_and_config_are_this_machine_and_the_preset(report):
    from rustane.config import preset

    rep, _ = report
    assert rep["machine"]["system"] == platform.system() and rep["machine"]["machine"] == platform.machine()
    assert rep["preset"] == "tiny" and rep["config"] == json.loads(json.dumps(asdict(preset("tiny"))))
    assert rep["status"] == "no-ane" and rep["problems"] == []
    assert rep["ane"]["available"] is False and "not macOS" in rep["ane"]["reason"]
    assert rep["probe"]["ane"] is False
    assert rep["profile"]["name"] == "any-macos0" and rep["guard"]["ok"]
    assert rep["profile"]["min_surface_bytes"] == 49152  # docs/ane-rules.md, min-surface


def test_kernels_are_the_plan_with_their_surface_sizes(report):
    from rustane import models
    from rustane.config import preset

    rep, _ = report
    cfg = preset("tiny")
    fam = models.family_for(cfg)
    plan = fam.plan_for(fam.kernel_shape(cfg, "fp16"))
    assert [k["name"] for k in rep["kernels"]] == list(plan)
    for k in rep["kernels"]:
        assert k["in_bytes"] == 2 * math.prod(k["in_shape"]) and k["out_bytes"] == 2 * math.prod(k["out_shape"])
        assert k["in_bytes"] >= 49152 and k["out_bytes"] >= 49152  # the preset obeys min-surface
        assert k["status"] == "not-checked" and k["backend"] == "sim" and k["compile_seconds"] > 0
    assert rep["selfcheck"]["ran"] is False


def _torch_first_loss(cfg, seed: int) -> float:
    """The step-1 loss written from the math: PyTorch float64 forward from the engine's initial
    weights on the doctor's documented tokens."""
    import torch

    from rustane import models
    from rustane.testing.torch_llama import forward, params_to_torch

    params = models.family_for(cfg).init_params(cfg, seed)
    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(3, cfg.seq_len + 1))
    with torch.no_grad():
        loss, _ = forward(params_to_torch(params, requires_grad=False), cfg, tokens[0, :-1], tokens[0, 1:])
    return float(loss)


def test_losses_match_an_independent_forward_and_the_differences_add_up(report):
    require_module("torch", hint="pip install torch")
    from rustane.config import preset

    rep, _ = report
    t = rep["training"]
    runs = {r["name"]: r for r in t["runs"]}
    assert set(runs) == {"sim-fp16", "sim-fp32"} and t["steps"] == 3
    assert "default_rng(0)" in t["tokens"]
    want = _torch_first_loss(preset("tiny"), 0)
    assert abs(runs["sim-fp32"]["losses"][0] - want) < 1e-4 * want
    assert abs(runs["sim-fp16"]["losses"][0] - want) < 1e-2 * want
    assert abs(want - math.log(512)) < 0.2  # near-uniform predictions at init
    for r in runs.values():
        assert len(r["losses"]) == 3 and r["error"] is None and all(s > 0 for s in r["step_seconds"])
    (d,) = t["differences"]
    assert (d["a"], d["b"]) == ("sim-fp16", "sim-fp32")
    diffs = np.array(runs["sim-fp16"]["losses"]) - np.array(runs["sim-fp32"]["losses"])
    np.testing.assert_allclose(d["loss_diffs"], diffs, rtol=0, atol=1e-12)
    assert d["max_loss_diff"] == pytest.approx(np.abs(diffs).max())
    # fp16 rounding makes a difference, a small one
    assert not d["identical"] and 0 < d["max_weight_diff"] < 0.05 and d["worst_param"].startswith("model.")


def test_markdown_report_names_every_kernel_and_run(report):
    rep, out = report
    md = (out / "doctor.md").read_text()
    assert md.startswith("# rustane doctor report (no-ane)")
    for k in rep["kernels"]:
        assert f"| {k['name']} |" in md
    assert "sim-fp16 vs sim-fp32" in md and "docs/doctor.md" in md


@pytest.mark.parametrize("args, words", [
    (["--preset", "nope"], "nope"),
    (["--steps", "0"], "--steps"),
    (["--bogus"], "--bogus"),
])
def test_bad_arguments_are_one_error_line_and_exit_2(tmp_path, args, words):
    r = _doctor(*args, "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr
    assert r.stdout == "" and not (tmp_path / "o").exists()


def test_out_that_is_a_file_is_refused_and_kept(tmp_path):
    f = tmp_path / "taken"
    f.write_text("mine")
    r = _doctor("--out", str(f))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert r.stderr.startswith("error: --out") and f.read_text() == "mine"
