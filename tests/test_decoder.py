"""KV-cache generation (rustane.decoder) against transformers for each family, and sampling."""

from __future__ import annotations

import numpy as np
import pytest

from model_files import random_hf_llama
from rustane.decoder import KVCacheDecoder
from rustane.formats import load_model
from rustane.sampling import Sampler, render_chat

torch = pytest.importorskip("torch")


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _check_prefill_and_decode(model, path, ids, n_prefill):
    """Prefill ``n_prefill`` tokens, then feed the rest one at a time: every position's logits
    equal transformers' full forward over the whole sequence."""
    dec = KVCacheDecoder.from_imported(load_model(path))
    ref = _hf_logits(model, ids)
    got = [dec.forward(ids[:n_prefill], all_logits=True)]
    got += [dec.forward([t])[None] for t in ids[n_prefill:]]
    got = np.concatenate(got)
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err < 1e-4, f"relative error {err:.2e}"
    return dec


@pytest.mark.parametrize("tie", [True, False])
def test_qwen3_matches_transformers(tmp_path, tie):
    """Per-head q/k RMSNorm, head_dim * n_heads != dim, theta 1e6, tied or untied."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                      max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    model = Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape))
    model.save_pretrained(tmp_path, safe_serialization=True)
    ids = list(np.random.default_rng(1).integers(0, 200, 24))
    dec = _check_prefill_and_decode(model, tmp_path, ids, 10)
    assert dec.spec.qk_norm and dec.spec.q_dim == 128 != dec.spec.dim


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    # a short original context puts every RoPE band (kept, blended, slowed) into 64 head dims
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    model, _ = random_hf_llama(tmp_path, rope_scaling=scaling, rope_theta=500000.0, dim=128, heads=2, kv_heads=1)
    from rustane.formats import rope_inv_freq
    spec = load_model(tmp_path).spec
    plain = 1 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    ratio = plain / rope_inv_freq(spec)
    assert ratio.min() == 1 and ratio.max() == 8 and np.any((ratio > 1) & (ratio < 8))
    _check_prefill_and_decode(model, tmp_path, list(range(3, 90)), 40)


def test_smollm2_shape_gqa_tied_matches_transformers(tmp_path):
    model, _ = random_hf_llama(tmp_path, dim=96, heads=3, kv_heads=1, rope_theta=1e5, tie=True)
    _check_prefill_and_decode(model, tmp_path, list(range(5, 40)), 1)


def test_generation_stops_at_eos_and_window_slides(tmp_path):
    model, _ = random_hf_llama(tmp_path)
    dec = KVCacheDecoder.from_imported(load_model(tmp_path), context=16)
    g = dec.generate([1, 2, 3], 40, temperature=0)
    assert len(g.tokens) == 40 and g.stop == "max_tokens" and dec.length <= 16
    # greedy equals argmax of transformers' logits over the same 16-token window
    ids = [1, 2, 3] + g.tokens
    for i in range(13):  # before the window first fills
        assert int(np.argmax(_hf_logits(model, ids[:3 + i])[-1])) == g.tokens[i]
    stop = g.tokens[4]
    g2 = dec.generate([1, 2, 3], 40, temperature=0, stop_ids=[stop])
    assert g2.stop == "eos" and g2.tokens[-1] == stop and len(g2.tokens) == g.tokens.index(stop) + 1


def test_sampler_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    s = Sampler(temperature=1.0, top_p=0.75, seed=0)
    np.testing.assert_allclose(s.probabilities(logits), [0.625, 0.375, 0, 0])
    s = Sampler(temperature=1.0, top_k=3, seed=0)
    np.testing.assert_allclose(s.probabilities(logits), np.array([0.5, 0.3, 0.15, 0]) / 0.95)
    s = Sampler(temperature=2.0, seed=0)
    p = np.sqrt([0.5, 0.3, 0.15, 0.05])
    np.testing.assert_allclose(s.probabilities(logits), p / p.sum())
    draws = np.bincount([Sampler(1.0, seed=i)(logits) for i in range(2000)], minlength=4) / 2000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.15, 0.05], atol=0.04)
    assert Sampler(0.0)(logits) == 0
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampler(**{"temperature": 1.0, **bad})


def test_chat_template_renders_like_transformers(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    template = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                "Be brief.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), eos_token="<|im_end|>")
    tok.chat_template = template
    msgs = [{"role": "user", "content": "Hi there"}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert render_chat(template, msgs, {"eos_token": "<|im_end|>"}) == want
