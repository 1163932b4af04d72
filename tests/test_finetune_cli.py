"""``python -m rustane.finetune`` / ``rustane.fuse`` / ``rustane.generate --adapter-path`` as a user
runs them: a LoRA run killed with SIGKILL resumes to the bits of an unbroken run; a config file
is read and flags override it; bad data or settings give one ``error:`` line and write nothing;
full fine-tuning trains only what it is asked to; fuse and generate use the adapters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiers import require_module

require_module("torch", hint="pip install torch==2.13.0")
require_module("transformers", hint="pip install transformers")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from model_files import random_hf_llama, write_gguf
    d = tmp_path_factory.mktemp("ft")
    _, tensors = random_hf_llama(d / "hf", vocab=300, dim=64, hidden=96, heads=4, kv_heads=2, tie=True)
    write_gguf(d / "m.gguf", tensors, heads=4, kv_heads=2, context=128)
    rows = [{"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(48)]
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


def _cli(module, *args, cwd, check=True, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=600, **kw)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


COMMON = ("--model", "m.gguf", "--data", "data.jsonl", "--backend", "sim", "--precision", "fp32", "--seq-len", "32",
          "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "--mask-prompt",
          "--learning-rate", "5e-3", "--batch-size", "4", "--no-progress")


def _tensors(path: Path) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(path))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_sigkill_then_resume_is_bit_identical(model_and_data, kind):
    d = model_and_data
    steps = 40
    extra = ("--fine-tune-type", "full", "--learning-rate", "1e-3") if kind == "full" else ()
    straight, killed = f"straight-{kind}", f"killed-{kind}"
    _cli("rustane.finetune", *COMMON, *extra, "--steps", steps, "--save-every", 5, "--eval-every", 0,
         "--adapter-path", straight, cwd=d)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rustane.finetune", *COMMON, *map(str, extra), "--steps", str(steps),
                             "--save-every", "5", "--eval-every", "0", "--adapter-path", killed], cwd=d, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = d / killed / "checkpoints" / "step-00000005" / "trainer_state.json"
    t0 = time.time()
    while not first.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (d / killed / "checkpoints" / f"step-{steps:08d}").exists()
    r = _cli("rustane.finetune", *COMMON, *extra, "--steps", steps, "--save-every", 5, "--eval-every", 0,
             "--adapter-path", killed, "--resume", cwd=d)
    assert "resumed from" in r.stderr
    _assert_same_run(d / straight, d / killed, steps, kind)


def _assert_same_run(a_dir: Path, b_dir: Path, steps: int, kind: str) -> None:
    """The last checkpoints of two runs hold the same bits (trained tensors, optimizer, state),
    and the training moved the tensors."""
    trained = "adapter_model.safetensors" if kind == "lora" else "trained.safetensors"
    for f in (trained, "optimizer.safetensors"):
        a = _tensors(a_dir / "checkpoints" / f"step-{steps:08d}" / f)
        b = _tensors(b_dir / "checkpoints" / f"step-{steps:08d}" / f)
        assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a), f
    sa = json.loads((a_dir / "checkpoints" / f"step-{steps:08d}" / "trainer_state.json").read_text())
    sb = json.loads((b_dir / "checkpoints" / f"step-{steps:08d}" / "trainer_state.json").read_text())
    assert Path(sa.pop("src")).name == Path(sb.pop("src")).name  # the model, named relatively or not
    assert sa == sb
    if kind == "lora":  # the adapters moved away from their start (B starts at zero)
        assert any(np.abs(v).max() > 0 for k, v in _tensors(a_dir / "adapter_model.safetensors").items()
                   if "lora_B" in k)
    else:  # the trained weights differ from the model's
        from rustane.formats import load_model
        base, tuned = load_model(a_dir.parent / "m.gguf"), load_model(a_dir / "model")
        assert any(not np.array_equal(base.tensors[k], tuned.tensors[k]) for k in base.tensors)


def test_sigint_saves_a_checkpoint_atomically_and_resumes_bit_identically(model_and_data):
    """Ctrl-C: the run stops at the next step boundary with a checkpoint (no temp folder left,
    exit status 130, no traceback); --resume ends with the bits of an unbroken run."""
    d = model_and_data
    steps = 30
    args = (*COMMON, "--steps", steps, "--save-every", 1000, "--eval-every", 0)
    _cli("rustane.finetune", *args, "--adapter-path", "sigint-straight", cwd=d)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = d / "sigint-run"
    proc = subprocess.Popen([sys.executable, "-m", "rustane.finetune", *map(str, args), "--adapter-path", str(out)],
                            cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 300 and proc.poll() is None:  # a few steps in (one line per step)
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted" in err
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("step-"), saved
    stopped_at = int(saved[0].name.split("-")[1])
    assert 3 <= stopped_at < steps
    # atomic: only finished folders, each complete (no temp names anywhere in the output)
    assert not [p for p in out.rglob("*") if "tmp" in p.name], list(out.rglob("*"))
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["step"] == stopped_at
    r = _cli("rustane.finetune", *args, "--adapter-path", out, "--resume", cwd=d)
    assert f"at step {stopped_at}" in r.stderr
    _assert_same_run(d / "sigint-straight", out, steps, "lora")


def test_engine_finetune_is_the_cli(model_and_data, tmp_path):
    """``Engine.finetune`` (scripts) runs the job of ``python -m rustane.finetune``: the same
    settings give the same adapter and optimizer bits."""
    from rustane.engine import Engine
    d = model_and_data
    _cli("rustane.finetune", *COMMON, "--steps", 6, "--save-every", 3, "--eval-every", 3, "--adapter-path",
         tmp_path / "cli", cwd=d)
    res = Engine.finetune(d / "m.gguf", d / "data.jsonl", backend="sim", precision="fp32", seq_len=32,
                          lora_targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", mask_prompt=True,
                          learning_rate=5e-3, batch_size=4, steps=6, save_every=3, eval_every=3,
                          adapter_path=tmp_path / "api")
    assert [h.step for h in res["history"]] == list(range(1, 7)) and [s for s, _ in res["evals"]] == [0, 3, 6]
    _assert_same_run(tmp_path / "cli", tmp_path / "api", 6, "lora")
    cli_metrics = [json.loads(x) for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [m["val_loss"] for m in cli_metrics if "val_loss" in m] == [v for _, v in res["evals"]]
    with pytest.raises(ValueError, match="unknown fine-tuning settings lora_rnak"):
        Engine.finetune(d / "m.gguf", d / "data.jsonl", lora_rnak=4)


def test_config_file_with_flag_override(model_and_data, tmp_path):
    d = model_and_data
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m.gguf\ndata: data.jsonl\nbackend: sim\nprecision: fp32\nseq_len: 32\niters: 5\n"
                   "lora_parameters:\n  rank: 4\n  scale: 3.0\nlora_targets: [q_proj, down_proj]\n"
                   "save_every: 0\neval_every: 0\n")
    _cli("rustane.finetune", "-c", cfg, "--steps", 2, "--adapter-path", tmp_path / "o", "--no-progress", cwd=d)
    ac = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert ac["r"] == 4 and ac["lora_alpha"] == 12.0 and ac["target_modules"] == ["q_proj", "down_proj"]
    st_ = json.loads((tmp_path / "o" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert st_["step"] == 2 and st_["train"]["steps"] == 2  # the flag beat iters: 5


@pytest.mark.parametrize("case", ["bad_row", "unknown_key", "too_long", "bad_yaml_key", "no_resume"])
def test_errors_are_one_line_and_write_nothing(model_and_data, tmp_path, case):
    d = model_and_data
    out = tmp_path / "o"
    args = list(COMMON)
    if case == "bad_row":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "fine"}\n{"prompt": "a", "completion": ""}\n')
        args[3], want = bad, f"{bad}:2: empty \"completion\""
    elif case == "unknown_key":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "fine", "meta": 1}\n')
        args[3], want = bad, f"{bad}:1: unknown keys 'meta'"
    elif case == "too_long":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": "many words here " * 30}) + "\n")
        args[3], want = bad, f"{bad}:1: the row is"
    elif case == "bad_yaml_key":
        c = tmp_path / "c.yaml"
        c.write_text("lora_rnak: 4\n")
        args += ["-c", c]
        want = "unknown setting 'lora_rnak'"
    else:
        args += ["--resume"]
        want = "--resume: no checkpoint"
    r = _cli("rustane.finetune", *args, "--adapter-path", out, "--steps", 1, cwd=d, check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and want in lines[-1] and "Traceback" not in r.stderr
    assert not out.exists()


def test_full_finetune_trains_only_the_chosen_layers(model_and_data, tmp_path):
    from rustane.formats import load_model
    d = model_and_data
    _cli("rustane.finetune", *COMMON, "--fine-tune-type", "full", "--lora-layers", 1, "--freeze-embeddings",
         "--steps", 3, "--save-every", 0, "--eval-every", 0, "--adapter-path", tmp_path / "o", cwd=d)
    base, tuned = load_model(d / "m.gguf"), load_model(tmp_path / "o" / "model")
    changed = {k for k in base.tensors if not np.array_equal(base.tensors[k], tuned.tensors[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)
    trained = _tensors(tmp_path / "o" / "checkpoints" / "step-00000003" / "trained.safetensors")
    assert set(trained) == {k for k in base.tensors if k.startswith("model.layers.1.")}


def test_fuse_and_generate_with_adapters_agree(model_and_data, tmp_path):
    d = model_and_data
    _cli("rustane.finetune", *COMMON, "--steps", 4, "--save-every", 0, "--eval-every", 0,
         "--learning-rate", "5e-2", "--adapter-path", tmp_path / "a", cwd=d)
    _cli("rustane.fuse", "--model", "m.gguf", "--adapter-path", tmp_path / "a", "--out", tmp_path / "f", cwd=d)
    ids = "1 50 60 70 80 90"
    with_adapter = _cli("rustane.generate", "--model", "m.gguf", "--adapter-path", tmp_path / "a",
                        "--prompt", ids, "--ids", "-n", 8, "--temperature", 0, "--no-stop", cwd=d).stdout
    fused = _cli("rustane.generate", "--model", tmp_path / "f", "--prompt", ids, "--ids", "-n", 8, "--temperature", 0,
                 "--no-stop", cwd=d).stdout
    base = _cli("rustane.generate", "--model", "m.gguf", "--prompt", ids, "--ids", "-n", 8, "--temperature", 0,
                "--no-stop", cwd=d).stdout
    assert with_adapter == fused and with_adapter != base
    r = _cli("rustane.fuse", "--model", "m.gguf", "--adapter-path", tmp_path, "--out", tmp_path / "g", cwd=d, check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not an adapter folder" in r.stderr


SETTING_KEYS = ["steps", "lora_rank", "learning_rate", "fit", "mask_prompt", "seq_len"]


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(SETTING_KEYS + ["bogus", "lora-rank", "iters"]),
                       st.integers(1, 64), max_size=5))
def test_config_keys_property(tmp_path_factory, d):
    """Known keys (with - or _, and mlx-lm's aliases) are read as the flags; any other is refused by name."""
    import yaml

    from rustane.finetune import read_config
    f = tmp_path_factory.mktemp("c") / "c.yaml"
    f.write_text(yaml.safe_dump(d))
    if "bogus" in d:
        with pytest.raises(ValueError, match="unknown setting 'bogus'"):
            read_config(str(f))
        return
    got = read_config(str(f))
    for k, v in d.items():
        key = {"iters": "steps"}.get(k, k.replace("-", "_"))
        assert got[key] in [v] + [d.get(a) for a in ("iters", "steps", "lora-rank", "lora_rank")]
