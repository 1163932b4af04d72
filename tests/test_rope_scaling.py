"""Llama-3 rope scaling (rope_type llama3, Llama 3.1/3.2) in the training kernels: a random
transformers LlamaForCausalLM with llama3 scaling imports through Engine.from_pretrained and its
logits and whole-model gradients equal transformers' (PyTorch autograd, float64)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model_files import random_hf_llama
from rustane import checkpoint, models
from rustane.engine import Engine

torch = pytest.importorskip("torch")

# original_max_position_embeddings 64 with head_dim 16 and theta 5e5: wavelengths 6.3 (kept, < 64/4),
# 32.5 (inside the blend band 16..64) and >= 168 (slowed by factor 8) all occur at seq_len 32.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SEQ = 32


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("l3") / "hf"
    random_hf_llama(d, vocab=96, dim=64, hidden=96, heads=4, kv_heads=2, tie=False, rope_scaling=dict(LLAMA3),
                    rope_theta=500000.0)
    return d


def _hf_double(folder, **overrides):
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(folder, **overrides)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM.from_pretrained(folder, config=cfg, torch_dtype=torch.float64).eval()


def _batch(seed, n, vocab=96):
    t = np.random.default_rng(seed).integers(0, vocab, size=(n, SEQ + 1))
    return t[:, :-1], t[:, 1:]


def test_llama3_logits_and_gradients_match_transformers(llama3_folder):
    eng = Engine.from_pretrained(llama3_folder, backend="sim", precision="fp32", seq_len=SEQ, ane_rules=False)
    cfg = eng.config
    assert cfg.rope_scaling_dict == LLAMA3  # (transformers adds rope_theta to the dict it is given: a copy)
    model = _hf_double(llama3_folder)
    x, y = _batch(seed=5, n=2)
    total, ref_logits = 0, None
    for xi, yi in zip(x, y):
        logits = model(torch.tensor(xi[None])).logits[0]
        ref_logits = logits.detach().numpy() if ref_logits is None else ref_logits
        total = total + torch.nn.functional.cross_entropy(logits, torch.tensor(yi))
    total.backward()
    ref = checkpoint.from_hf_params({k: p.grad.numpy().astype(np.float32) for k, p in model.named_parameters()},
                                    cfg)
    try:
        got_logits = eng.forward(list(x[0]))
        for xi, yi in zip(x, y):
            eng.model.forward_backward(xi, yi)
        got = eng.model.finish_gradients()
    finally:
        eng.close()
    err = np.max(np.abs(got_logits - ref_logits)) / np.max(np.abs(ref_logits))
    assert err < 1e-4, f"logits off by {err:.2e} relative"
    # the scaling matters at this length: unscaled RoPE gives logits far outside that tolerance
    plain = _hf_double(llama3_folder, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with torch.no_grad():
        plain_logits = plain(torch.tensor(x[0][None])).logits[0].numpy()
    gap = np.max(np.abs(got_logits - plain_logits)) / np.max(np.abs(ref_logits))
    assert gap > 1e-3
    assert set(got) == set(ref)
    for k in ref:
        rel = np.linalg.norm(got[k] - ref[k]) / np.linalg.norm(ref[k])
        assert rel <= 1e-4, f"gradient of {k} off by {rel:.2e} relative"


@pytest.mark.parametrize("scaling", [LLAMA3, {"rope_type": "linear", "factor": 4.0}])
def test_rope_scaling_round_trips_through_config_json(scaling):
    from transformers import LlamaConfig

    hf = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=dict(scaling))
    cfg = models.config_from_hf(json.loads(hf.to_json_string()))
    assert cfg.rope_scaling_dict == scaling and cfg.rope_theta == 500000.0
    out = cfg.to_hf_dict()
    back = LlamaConfig(**{k: v for k, v in out.items() if k != "rustane"})
    rs = getattr(back, "rope_scaling", None) or back.rope_parameters
    assert {k: rs[k] for k in scaling} == scaling
    assert models.config_from_hf(out) == cfg
    # a config without scaling keeps the dict (and so the hash) it had before rope_scaling existed
    plain = cfg.replace(rope_scaling=None)
    assert "rope_scaling" not in plain.to_dict() and "rope_scaling" not in plain.to_hf_dict()


def test_unknown_rope_types_are_refused(tmp_path):
    """Neither the kernels nor the CPU decoder compute dynamic/yarn scaling: one error naming it."""
    random_hf_llama(tmp_path / "y", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match=r"rope type 'dynamic' is not supported \(supported: \['default', 'llama3'"):
        Engine.from_pretrained(tmp_path / "y", backend="sim")
    with pytest.raises(ValueError, match="rope_scaling: .*rope type 'yarn'"):
        models.config_from_hf({"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "vocab_size": 96}).replace(
            rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_cpu_rope_with_given_frequencies_matches_numpy():
    """The CPU RoPE the backward uses, given scaled frequencies: an interleaved-pair rotation
    written here in numpy (forward), and its inverse (backward)."""
    from rustane import cpu_ops
    from rustane.formats.arch import inv_freq

    nh, hd, S = 3, 16, 40
    freq = inv_freq(hd, 500000.0, LLAMA3)
    x = np.random.default_rng(2).standard_normal((nh * hd, S)).astype(np.float32)
    ang = np.arange(S)[None, :] * freq[:, None]  # [hd/2, S]
    a, b = x.reshape(nh, hd // 2, 2, S)[:, :, 0], x.reshape(nh, hd // 2, 2, S)[:, :, 1]
    want = np.stack([a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)], axis=2).reshape(nh * hd, S)
    got = cpu_ops.rope_forward(x, nh, hd, inv_freq=freq)
    np.testing.assert_allclose(got, want, atol=2e-6)
    np.testing.assert_allclose(cpu_ops.rope_backward(got, nh, hd, inv_freq=freq), x, atol=2e-6)
