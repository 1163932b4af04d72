"""Pretrained models into training: Engine.from_pretrained / train --model (kernels compiled
for --seq-len, logits equal transformers), the tokenizer carried in every checkpoint, and the
CPU KV-cache path behind generate and the end-of-training sample."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from model_files import random_hf_llama, write_gguf
from rustane.engine import Engine, TrainConfig

torch = pytest.importorskip("torch")


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("pre")
    # the tiny preset's shape: its kernels keep every ANE rule at seq_len 192 (the simulator checks)
    model, tensors = random_hf_llama(d / "hf", vocab=512, dim=128, hidden=256, heads=4, kv_heads=2, tie=True,
                                     max_position_embeddings=512)
    write_gguf(d / "m.gguf", tensors, heads=4, kv_heads=2, context=512)
    return d, model


@pytest.mark.parametrize("seq_len", [192, 256])
def test_from_pretrained_kernels_match_transformers(tiny_gguf, seq_len):
    """The training kernels, compiled for seq_len, compute the imported model (fp32 simulator)."""
    d, model = tiny_gguf
    eng = Engine.from_pretrained(d / "m.gguf", backend="sim", precision="fp32", seq_len=seq_len)
    assert eng.config.seq_len == seq_len and eng.tokenizer_json is not None
    ids = list(np.random.default_rng(0).integers(0, 512, seq_len))
    got = eng.forward(ids)
    ref = _hf_logits(model, ids)
    assert np.max(np.abs(got - ref)) / np.max(np.abs(ref)) < 1e-4
    # and the KV-cache decoder over the engine's weights generates what transformers' argmax says
    out = eng.generate(ids[:5], 4, temperature=0)
    seq = ids[:5]
    for t in out:
        assert int(np.argmax(_hf_logits(model, seq)[-1])) == t
        seq.append(t)
    eng.close()


def test_from_pretrained_qwen3_kernels_match_transformers(tmp_path):
    """Qwen3 (q/k-norm, head_dim * n_heads != dim) imports into the training kernels."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                         rope_theta=1e6, tie_word_embeddings=False)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn(p.shape))
    model.save_pretrained(tmp_path / "q")
    eng = Engine.from_pretrained(tmp_path / "q", backend="sim", precision="fp32", seq_len=16, ane_rules=False)
    ids = list(np.random.default_rng(0).integers(0, 64, 16))
    ref = _hf_logits(model, ids)
    assert np.max(np.abs(eng.forward(ids) - ref)) / np.max(np.abs(ref)) < 1e-4
    eng.close()


def test_from_pretrained_trains_llama3_rope_scaling(tmp_path):
    """Llama-3.2-style rope scaling is no longer refused: the kernels compute it (fp32 simulator);
    gradients against PyTorch autograd are in tests/test_rope_scaling.py."""
    model, _ = random_hf_llama(tmp_path / "l3", rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    eng = Engine.from_pretrained(tmp_path / "l3", backend="sim", precision="fp32", seq_len=48, ane_rules=False)
    assert eng.config.rope_scaling_dict["rope_type"] == "llama3"
    ids = list(np.random.default_rng(1).integers(0, 300, 48))
    ref = _hf_logits(model, ids)
    assert np.max(np.abs(eng.forward(ids) - ref)) / np.max(np.abs(ref)) < 1e-4
    eng.close()


def test_api_checkpoints_carry_the_tokenizer(tiny_gguf, tmp_path):
    d, model = tiny_gguf
    eng = Engine.from_pretrained(d / "m.gguf", backend="sim", precision="fp32", seq_len=192)
    eng.save(tmp_path / "ck")
    assert (tmp_path / "ck" / "tokenizer.json").read_text() == eng.tokenizer_json
    assert "chat_template" in json.loads((tmp_path / "ck" / "tokenizer_config.json").read_text())
    eng.close()
    back = Engine.from_checkpoint(tmp_path / "ck", backend="sim", precision="fp32")
    assert back.tokenizer_json == eng.tokenizer_json and back.tokenizer_config["eos_token"] == "<|im_end|>"
    back.close()
    # a model trained from scratch on text through the API: fit() adopts the data's tokenizer
    from rustane.data import open_dataset
    from rustane.corpus import generate_stories
    (tmp_path / "t.txt").write_text("\n\n".join(generate_stories(60, seed=1)))
    tiny = Engine("tiny", backend="sim", precision="fp32", train=TrainConfig(steps=1, warmup=0))
    data = open_dataset(tmp_path / "t.txt", tiny.config, cache=tmp_path / "cache")
    tiny.fit(data, out=tmp_path / "run")
    saved = next((tmp_path / "run").glob("step-*")) / "tokenizer.json"
    assert saved.read_text() == data.tokenizer.to_str()
    tiny.close()


def _cli(module, *args, cwd):
    return subprocess.run([sys.executable, "-P", "-m", module, *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_train_model_then_resume_and_generate_without_tokenizer(tiny_gguf, tmp_path):
    d, model = tiny_gguf
    from rustane.corpus import generate_stories
    (tmp_path / "t.txt").write_text("\n\n".join(generate_stories(80, seed=2)))
    common = ["--data", tmp_path / "t.txt", "--backend", "sim", "--precision", "fp32", "--eval-every", "0",
              "--out", tmp_path / "run", "--no-progress", "--lr", "1e-4", "--warmup", "0"]
    p = _cli("rustane.train", "--model", d / "m.gguf", "--seq-len", 192, "--steps", 2, "--sample", 5, *common,
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "tokens/s]" in p.stdout and "seq 192" in p.stdout
    step2 = tmp_path / "run" / "step-00000002"
    assert (step2 / "tokenizer.json").exists()
    p = _cli("rustane.train", "--model", d / "m.gguf", "--resume", "auto", "--steps", 3, "--allow-changes", "--sample", 0, *common,
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stdout and (tmp_path / "run" / "step-00000003" / "tokenizer.json").exists()
    p = _cli("rustane.generate", "--model", tmp_path / "run", "--prompt", "the hat", "-n", 4, "--temperature", 0,
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("the hat") and "tokens/s" in p.stderr
    p = _cli("rustane.evaluate", "--model", tmp_path / "run", "--data", tmp_path / "t.txt", "--max-tokens", 200,
             "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["tokens"] == 199


def test_generate_and_evaluate_cli_errors(tiny_gguf, tmp_path):
    d, model = tiny_gguf
    p = _cli("rustane.generate", "--model", tmp_path / "nope.gguf", cwd=tmp_path)
    assert p.returncode != 0 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    p = _cli("rustane.generate", "--model", d / "hf", "--prompt", "hi", cwd=tmp_path)
    assert p.returncode != 0 and "no tokenizer" in p.stderr
    p = _cli("rustane.generate", "--model", d / "m.gguf", "--top-p", 2, cwd=tmp_path)
    assert p.returncode != 0 and "--top-p" in p.stderr
    p = _cli("rustane.generate", "--model", d / "m.gguf", "--prompt", "the", "--chat", "-n", 3, "--temperature", 0,
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = _cli("rustane.evaluate", "--model", d / "m.gguf", "--data", tmp_path / "missing.txt", cwd=tmp_path)
    assert p.returncode != 0 and "does not exist" in p.stderr


def test_perplexity_windows_score_each_token_once(tiny_gguf):
    """Sliding windows vs one direct pass: with window >= the text both equal transformers'
    mean NLL; with shorter windows every token is still scored exactly once."""
    from rustane.decoder import KVCacheDecoder
    from rustane.evaluate import perplexity
    from rustane.formats import load_model
    d, model = tiny_gguf
    ids = list(np.random.default_rng(3).integers(0, 512, 40))
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(torch.tensor(_hf_logits(model, ids)[:-1]), torch.tensor(ids[1:]))
    dec = KVCacheDecoder.from_imported(load_model(d / "m.gguf"))
    full = perplexity(dec, ids, window=64)
    assert full.tokens == 39 and abs(full.mean_nll - float(ref)) < 1e-4
    for window, stride in [(10, 5), (16, 15), (7, 1)]:
        r = perplexity(dec, ids, window=window, stride=stride)
        # every token after the first scored once, each from the window that first reaches it
        # (context: that window's start up to the token), summed here from transformers
        want, scored_to, start = 0.0, 1, 0
        while scored_to < len(ids):
            end = min(start + window, len(ids))
            lg = torch.tensor(_hf_logits(model, ids[start:end])[:-1])
            nll = torch.nn.functional.cross_entropy(lg, torch.tensor(ids[start + 1:end]), reduction="none")
            want += float(nll[scored_to - start - 1:].sum())
            scored_to, start = end, start + stride
        assert r.tokens == 39 and abs(r.mean_nll - want / 39) < 1e-4
    for window, stride in [(8, 9), (8, 8), (1, 1)]:
        with pytest.raises(ValueError):
            perplexity(dec, ids, window=window, stride=stride)
