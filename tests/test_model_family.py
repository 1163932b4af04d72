"""The model layer's seams (issue 10): the runtime knows no family, families are found by name,
one vocabulary for the model dimensions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rustane import models
from rustane.config import ConfigError, ModelConfig, preset
from rustane.models.llama.plan import KernelShape

RUNTIME = Path(__file__).resolve().parent.parent / "rustane" / "runtime"


def test_runtime_never_names_a_family():
    """No module of rustane.runtime imports a family package or spells a family's name."""
    families = models.names()
    assert "llama" in families
    for path in sorted(RUNTIME.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("rustane.models."), f"{path.name} imports {node.module}"
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert not a.name.startswith("rustane.models."), f"{path.name} imports {a.name}"
        words = path.read_text().lower()
        for fam in families:
            assert fam not in words, f"{path.name} names the {fam!r} family"


def test_family_is_found_from_the_config():
    fam = models.family_for(preset("tiny"))
    assert fam.__name__ == "rustane.models.llama" and fam.ModelConfig is ModelConfig
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        models.family("nope")


def test_hf_config_goes_to_the_family_reading_its_model_type():
    d = preset("tiny").to_hf_dict()
    assert models.config_from_hf(d) == preset("tiny")
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not a model family"):
        models.config_from_hf({**d, "model_type": "gpt2"})


@pytest.mark.parametrize("name", ["tiny", "stories15m", "smollm2-135m", "qwen3-0.6b"])
def test_kernel_shape_uses_the_config_names(name):
    cfg = preset(name)
    shape = KernelShape.of(cfg)
    for f in ("dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "seq_len", "q_dim", "kv_dim",
              "gqa_ratio", "is_mha"):
        assert getattr(shape, f) == getattr(cfg, f), f


@pytest.mark.parametrize("bad, msg", [
    (dict(n_kv_heads=3), "n_heads: 4 is not divisible by n_kv_heads 3"),
    (dict(head_dim=7), "head_dim: 7 is odd"),
    (dict(rope_theta=0.5), "rope_theta: must be a finite number > 1"),
    (dict(seq_len=0), "seq_len: must be > 0"),
])
def test_one_validation_for_both_vocabularies(bad, msg):
    """ModelConfig and KernelShape reject the same dimensions with the same message."""
    dims = dict(dim=96, hidden_dim=256, n_heads=4, n_kv_heads=2, head_dim=24, seq_len=64, rope_theta=1e4)
    dims.update(bad)
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(n_layers=2, vocab_size=512, **dims).validate()
    with pytest.raises(ConfigError, match=msg):
        KernelShape(**dims)


def test_a_dropped_model_is_freed_at_once():
    """The runtime and its family step hold no reference cycle: a model (its buffers, its dW
    queue) is freed when the last reference goes, not whenever the cyclic collector runs."""
    import gc
    import weakref

    from rustane.engine import make_backend
    from rustane.runtime.model import Model

    gc.disable()
    try:
        model = Model(preset("tiny"), make_backend("sim", "fp32"))
        model.close()
        ref = weakref.ref(model)
        del model
        assert ref() is None
    finally:
        gc.enable()


def test_a_config_import_stays_light():
    """Configs and plans are plain Python: importing them loads no native extension."""
    import subprocess
    import sys

    code = ("import sys, rustane.config, rustane.models.qwen3.plan; "
            "print(sorted(m for m in sys.modules if m.startswith('rustane.') and m.split('.')[-1].startswith('_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
