"""PEFT's adapter format both ways: adapters rustane saves load with ``PeftModel.from_pretrained``
onto the transformers base and give the logits of rustane's own forward with adapters; adapters
PEFT trained-and-saved (``save_pretrained``) load into rustane and give PEFT's logits; merged
weights (``rustane.lora.merge_into``) written as a HF folder give the same logits in
transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiers import require_module

require_module("torch", hint="pip install torch==2.13.0")
require_module("transformers", hint="pip install transformers")
require_module("peft", hint="pip install peft==0.21.2")

import torch  # noqa: E402

from rustane import checkpoint  # noqa: E402
from rustane.engine import make_backend  # noqa: E402
from rustane.formats import Imported  # noqa: E402
from rustane.formats.hf import save_hf_folder  # noqa: E402
from rustane.lora import (  # noqa: E402
    ADAPTER_CONFIG, AdapterError, LoraConfig, load_adapter, merge_into, save_adapter,
)
from rustane.lora_train import LoraTrainer  # noqa: E402
from rustane.models import qwen3  # noqa: E402
from rustane.runtime.model import Model  # noqa: E402

CFG = qwen3.ModelConfig(dim=40, hidden_dim=72, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=67,
                        seq_len=12, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True)


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: ((1.0 + 0.3 * rng.standard_normal(s)) if len(s) == 1 else 0.15 * rng.standard_normal(s)).astype(np.float32)
            for k, s in CFG.param_shapes().items()}


def _base(tmp_path, params):
    from transformers import AutoModelForCausalLM
    d = tmp_path / "base"
    save_hf_folder(Imported(config=CFG.to_hf_dict(), tensors=checkpoint.to_hf_params(params, CFG)), d)
    return d, AutoModelForCausalLM.from_pretrained(d, dtype=torch.float64, attn_implementation="eager")


def _our_logits(params, lcfg, adapters, tokens):
    model = Model(CFG, make_backend("sim", "fp32", ane_rules=False), {k: v.copy() for k, v in params.items()},
                  trainable=(), keep_frozen=False)
    try:
        LoraTrainer(model, lcfg, adapters)
        return model.logits(tokens).T
    finally:
        model.close()


def _tokens(seed=1):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, CFG.seq_len)


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens[None], dtype=torch.long)).logits[0].numpy()


def _close(a, b, tol=1e-5):
    return np.abs(a - b).max() / np.abs(b).max() < tol


def test_peft_loads_our_adapters_and_agrees_with_our_forward(tmp_path):
    from peft import PeftModel
    params = _params()
    lcfg = LoraConfig(rank=4, alpha=12.0, targets=("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"), layers=(0, 2))
    rng = np.random.default_rng(3)
    from rustane.lora import init_adapters
    adapters = {k: (a, (0.3 * rng.standard_normal(b.shape)).astype(np.float32))
                for k, (a, b) in init_adapters(CFG, lcfg, seed=4).items()}
    save_adapter(tmp_path / "ad", CFG, lcfg, adapters)
    cfg_json = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    assert cfg_json["r"] == 4 and cfg_json["lora_alpha"] == 12.0 and cfg_json["layers_to_transform"] == [0, 2]
    _, base = _base(tmp_path, params)
    tokens = _tokens()
    plain = _hf_logits(base, tokens)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ad").double()
    ref = _hf_logits(peft_model, tokens)
    assert not _close(plain, ref, 1e-3)  # the adapters change the output
    assert _close(_our_logits(params, lcfg, adapters, tokens), ref)
    # and rustane reads back what it wrote
    lcfg2, back = load_adapter(tmp_path / "ad", CFG)
    assert lcfg2 == lcfg and all(np.array_equal(back[k][0], adapters[k][0]) and np.array_equal(back[k][1], adapters[k][1])
                                 for k in adapters)


def test_we_load_adapters_peft_saved_and_fused_folders_match_transformers(tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    params = _params(7)
    base_dir, base = _base(tmp_path, params)
    pm = get_peft_model(base, PeftLoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "v_proj", "gate_proj"],
                                             lora_dropout=0.0, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    tokens = _tokens(8)
    ref = _hf_logits(pm, tokens)
    lcfg, adapters = load_adapter(tmp_path / "peft", CFG)
    assert lcfg.rank == 3 and lcfg.scale == pytest.approx(5 / 3)
    assert _close(_our_logits(params, lcfg, adapters, tokens), ref)
    # fused: W + s·B·A written as a plain HF folder
    merged = merge_into({k: v.copy() for k, v in params.items()}, lcfg, adapters)
    save_hf_folder(Imported(config=CFG.to_hf_dict(), tensors=checkpoint.to_hf_params(merged, CFG)), tmp_path / "fused")
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "fused", dtype=torch.float64, attn_implementation="eager")
    assert _close(_hf_logits(fused, tokens), ref)


def test_adapter_errors_name_the_problem(tmp_path):
    lcfg = LoraConfig(rank=2, alpha=4.0, targets=("q_proj",))
    from rustane.lora import init_adapters
    save_adapter(tmp_path / "ad", CFG, lcfg, init_adapters(CFG, lcfg))
    other = qwen3.ModelConfig(dim=32, hidden_dim=56, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=67,
                              seq_len=12, norm_eps=1e-6, tie_embeddings=True)
    with pytest.raises(AdapterError, match="adapter made for another model"):
        load_adapter(tmp_path / "ad", other)
    with pytest.raises(AdapterError, match="not an adapter folder"):
        load_adapter(tmp_path, CFG)
    with pytest.raises(AdapterError, match="unknown"):
        LoraConfig(targets=("qkv",))
    d = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())
    d["use_dora"] = True
    (tmp_path / "ad" / ADAPTER_CONFIG).write_text(json.dumps(d))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(tmp_path / "ad", CFG)
