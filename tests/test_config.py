from __future__ import annotations

import json
import math

import pytest

from rustane.config import PRESETS, ConfigError, ModelConfig, preset
from tiers import require_module


def test_defaults_and_derived():
    c = preset("tiny")
    assert c.head_dim == c.dim // c.n_heads
    assert c.q_dim == c.n_heads * c.head_dim and c.kv_dim == c.n_kv_heads * c.head_dim
    assert c.gqa_ratio == 2 and c.n_kv_heads < c.n_heads  # tiny exercises GQA
    assert c.residual_alpha == 1.0
    assert c.replace(residual_scaling=True).residual_alpha == pytest.approx(1 / math.sqrt(4))


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_valid_and_param_counts(name):
    c = preset(name)
    c.validate()
    # independent count from the architecture description
    D, H, L, V = c.dim, c.hidden_dim, c.n_layers, c.vocab_size
    per_layer = D * c.q_dim + 2 * D * c.kv_dim + c.q_dim * D + 3 * D * H + 2 * D
    expect = V * D * (1 if c.tie_embeddings else 2) + L * per_layer + D
    assert c.n_params == expect


def test_known_param_counts():
    # published sizes: stories15M 15.19M, stories110M 109.53M (docs/ane-runtime.md#model-sizes), SmolLM2 134.5M
    assert preset("stories15m").n_params == 15_191_712
    assert preset("stories110m").n_params == 109_529_856
    assert preset("smollm2-135m").n_params == 134_515_008
    assert preset("qwen3-0.6b").head_dim == 128


@pytest.mark.parametrize("changes,needle", [
    (dict(n_heads=6, n_kv_heads=4, dim=96), "n_heads: 6 is not divisible by n_kv_heads 4"),
    (dict(dim=0), "dim: must be > 0"),
    (dict(vocab_size=-3), "vocab_size: must be > 0"),
    (dict(head_dim=7), "head_dim: 7 is odd"),
    (dict(rope_theta=0.5), "rope_theta"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(seq_len=2.5), "seq_len: must be an integer"),
    (dict(tie_embeddings="yes"), "tie_embeddings: must be true or false"),
])
def test_validate_errors_name_the_field(changes, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        preset("tiny", **changes)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown model preset 'nope'.*tiny"):
        preset("nope")
    with pytest.raises(ConfigError, match=r"unknown model config field\(s\) \['depth'\]"):
        ModelConfig.from_dict({**preset("tiny").to_dict(), "depth": 3})


def test_dict_round_trip_and_hash():
    c = preset("smollm2-135m")
    d = json.loads(json.dumps(c.to_dict()))
    assert ModelConfig.from_dict(d) == c
    assert c.config_hash() == ModelConfig.from_dict(d).config_hash()
    assert c.config_hash() != c.replace(seq_len=128).config_hash()
    assert c.diff(c.replace(dim=640, head_dim=64)) == ["dim: 576 vs 640"]


@pytest.mark.parametrize("name", ["tiny", "smollm2-135m", "qwen3-0.6b"])
def test_hf_round_trip(name):
    c = preset(name, tie_embeddings=(name != "tiny"))
    hf = json.loads(json.dumps(c.to_hf_dict()))
    assert hf["architectures"] == ["LlamaForCausalLM"] and hf["model_type"] == "llama"
    assert ModelConfig.from_hf_dict(hf) == c


def test_hf_export_refuses_residual_scaling():
    c = preset("tiny", residual_scaling=True)
    with pytest.raises(ConfigError, match="no residual scaling"):
        c.to_hf_dict()
    with pytest.warns(UserWarning, match="cannot reproduce"):
        hf = c.to_hf_dict(allow_residual_scaling=True)
    assert ModelConfig.from_hf_dict(hf).residual_scaling is True


def test_from_hf_rejects_unsupported():
    hf = preset("tiny").to_hf_dict()
    with pytest.raises(ConfigError, match="attention_bias"):
        ModelConfig.from_hf_dict({**hf, "attention_bias": True})
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_hf_dict({**hf, "hidden_act": "gelu"})
    bad = {k: v for k, v in hf.items() if k != "hidden_size"}
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf_dict(bad)


@pytest.mark.parametrize("name", ["tiny", "qwen3-0.6b"])
def test_transformers_loads_our_config(name, tmp_path):
    require_module("transformers", hint="pip install transformers")
    from transformers import AutoConfig
    c = preset(name)
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf_dict()))
    hf = AutoConfig.from_pretrained(tmp_path, local_files_only=True)
    assert type(hf).__name__ == "LlamaConfig"
    assert (hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers) == (c.dim, c.hidden_dim, c.n_layers)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (c.n_heads, c.n_kv_heads, c.head_dim)
    theta = getattr(hf, "rope_parameters", None) or {}
    theta = theta.get("rope_theta", getattr(hf, "rope_theta", None))
    assert theta == c.rope_theta
    assert hf.rms_norm_eps == c.norm_eps and hf.tie_word_embeddings == c.tie_embeddings
    # and what transformers writes back is read by us unchanged
    assert ModelConfig.from_hf_dict(hf.to_dict()).replace(seq_len=c.seq_len) == c
