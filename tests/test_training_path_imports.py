"""The training path loads neither torch nor test scaffolding.

A fresh interpreter imports ``rustane.train`` (and then builds a backend through the registry,
which imports every backend module); the modules it loaded are checked against what only tests
and the bench may load: torch, ``rustane.testing``, the fake ANE evaluator, anything from tests/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent

#: package modules that are test scaffolding (never on the training path)
SCAFFOLDING = ("rustane.testing", "rustane.torch_llama", "rustane.backends.ane.fake")


def _loaded_after(code: str) -> list[dict]:
    probe = (code + "\nimport json, sys\n"
             "print(json.dumps([{'name': n, 'file': getattr(m, '__file__', None) or ''}"
             " for n, m in sorted(sys.modules.items())]))")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RUSTANE_ANE_FAKE")}
    r = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def offenders(mods: list[dict]) -> list[str]:
    bad = []
    for m in mods:
        name, file = m["name"], m["file"]
        if name == "torch" or name.startswith("torch."):
            bad.append(name)
        elif any(name == s or name.startswith(s + ".") for s in SCAFFOLDING):
            bad.append(name)
        elif file and Path(file).resolve().is_relative_to(TESTS):
            bad.append(f"{name} ({file})")
    return bad


def test_import_train_loads_no_torch_and_no_test_modules():
    mods = _loaded_after("import rustane.train\nimport rustane.engine  # what train.main() imports")
    names = {m["name"] for m in mods}
    assert "rustane.train" in names and "rustane.engine" in names
    assert offenders(mods) == []


def test_building_a_backend_loads_no_scaffolding():
    """The registry imports every backend module to find them; the fake evaluator and the
    PyTorch reference must still stay out."""
    mods = _loaded_after("import rustane.train\nfrom rustane.engine import make_backend\n"
                         "make_backend('auto')\nmake_backend('sim', 'fp32')")
    names = {m["name"] for m in mods}
    assert {"rustane.backends.sim", "rustane.backends.ane.backend", "rustane.backends.null"} <= names
    assert offenders(mods) == []


def test_the_check_sees_scaffolding_when_it_loads():
    """The detector itself: the compatibility name of the PyTorch reference loads torch and the
    testing package once used; a tests/ module on the path is flagged by its file."""
    mods = _loaded_after("import rustane.train, rustane.torch_llama\nrustane.torch_llama.forward\n"
                         f"import sys; sys.path.insert(0, {str(TESTS)!r}); import kernel_refs")
    bad = offenders(mods)
    assert "torch" in bad and "rustane.testing.torch_llama" in bad
    assert any(b.startswith("kernel_refs (") for b in bad)
