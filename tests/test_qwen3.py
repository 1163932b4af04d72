"""The Qwen3 family (per-head q/k RMSNorm before RoPE, head_dim·n_heads != dim) against Hugging Face
``transformers.Qwen3ForCausalLM`` with the same random weights, in float64 autograd.

The reference shares nothing with rustane but the weights (exported through the family's HF
conversion, i.e. the q/k row permutation and the norm weights' place in it) and the tokens:
logits and whole-model gradients of the fp32 simulator must match to 1e-4 relative, and a saved
checkpoint must load into transformers and give the same logits. The shapes are research-sized,
below the ANE's minimum surface, so they run on the simulator with ``ane_rules=False``.
"""

from __future__ import annotations

import numpy as np
import pytest

from tiers import require_module

require_module("torch", hint="pip install torch==2.13.0")
require_module("transformers", hint="pip install transformers")

import torch  # noqa: E402

from rustane import models  # noqa: E402
from rustane.engine import Engine, make_backend  # noqa: E402
from rustane.models import qwen3  # noqa: E402
from rustane.runtime.model import Model  # noqa: E402

CONFIGS = {
    # GQA 2, tied (as Qwen3-0.6B), head_dim 16 with 4 heads over dim 40: QD = 64 != dim
    "gqa": qwen3.ModelConfig(dim=40, hidden_dim=72, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                             vocab_size=67, seq_len=12, rope_theta=1e6, norm_eps=1e-6, tie_embeddings=True),
    # MHA (qkvBwd), untied, head_dim 8 with 6 heads over dim 32: QD = 48
    "mha": qwen3.ModelConfig(dim=32, hidden_dim=56, n_layers=2, n_heads=6, n_kv_heads=6, head_dim=8,
                             vocab_size=53, seq_len=10, rope_theta=1e4, norm_eps=1e-6, tie_embeddings=False),
}


def _params(cfg, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = {}
    for k, shape in cfg.param_shapes().items():
        if len(shape) == 1:  # norm weights away from 1, so a mis-indexed q/k norm weight shows
            p[k] = (1.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            p[k] = (0.15 * rng.standard_normal(shape)).astype(np.float32)
    return p


def _hf_model(cfg, params):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf_cfg = Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("rustane", "architectures")},
                         attn_implementation="eager")
    model = Qwen3ForCausalLM(hf_cfg).double()
    state = {k: torch.tensor(v, dtype=torch.float64) for k, v in qwen3.to_hf_params(params, cfg).items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def _reference(cfg, params, tokens, targets):
    model = _hf_model(cfg, params)
    total = 0
    logits0 = None
    for x, y in zip(tokens, targets):
        logits = model(torch.tensor(x[None], dtype=torch.long)).logits[0]  # [S, V]
        logits0 = logits.detach().numpy() if logits0 is None else logits0
        total = total + torch.nn.functional.cross_entropy(logits, torch.tensor(y, dtype=torch.long))
    total.backward()
    grads = {k: p.grad.numpy().astype(np.float32) for k, p in model.named_parameters()}
    if cfg.tie_embeddings:
        grads.pop("lm_head.weight", None)
    return logits0, qwen3.from_hf_params(grads, cfg)


def _batch(cfg, seed, n):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, cfg.vocab_size, size=(n, cfg.seq_len + 1))
    return t[:, :-1], t[:, 1:]


def test_the_family_is_found_from_the_config():
    cfg = CONFIGS["gqa"]
    assert models.family_for(cfg) is qwen3
    assert models.config_from_hf(cfg.to_hf_dict()) == cfg
    assert cfg.q_dim != cfg.dim


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_logits_and_gradients_match_transformers(name):
    cfg = CONFIGS[name]
    params = _params(cfg, seed=3)
    x, y = _batch(cfg, seed=4, n=3)  # three micro-steps: the workspace's drain rule runs too
    ref_logits, ref = _reference(cfg, params, x, y)
    model = Model(cfg, make_backend("sim", "fp32", ane_rules=False), {k: v.copy() for k, v in params.items()})
    try:
        got_logits = model.logits(x[0]).T
        for xi, yi in zip(x, y):
            model.forward_backward(xi, yi)
        got = model.finish_gradients()
    finally:
        model.close()
    assert np.max(np.abs(got_logits - ref_logits)) / np.max(np.abs(ref_logits)) < 1e-5
    assert set(got) == set(ref)
    for k in ref:
        err = np.linalg.norm(got[k] - ref[k]) / np.linalg.norm(ref[k])
        assert err <= 1e-4, f"{name}: gradient of {k} off by {err:.2e} relative"


def test_gradients_detect_a_wrong_norm_weight():
    """The comparison has teeth for the new parameters: perturb one q_norm weight after the
    reference and its gradient (and q_proj's) moves past the tolerance."""
    cfg = CONFIGS["gqa"]
    params = _params(cfg, seed=5)
    x, y = _batch(cfg, seed=6, n=1)
    _, ref = _reference(cfg, params, x, y)
    name = "model.layers.1.self_attn.q_norm.weight"
    bad = dict(params)
    bad[name] = params[name].copy()
    bad[name][3] += 0.5
    model = Model(cfg, make_backend("sim", "fp32", ane_rules=False), {k: v.copy() for k, v in bad.items()})
    try:
        model.forward_backward(x[0], y[0])
        got = model.finish_gradients()
    finally:
        model.close()
    err = np.linalg.norm(got[name] - ref[name]) / np.linalg.norm(ref[name])
    assert err > 1e-3


def test_fp16_gradients_point_the_same_way():
    cfg = CONFIGS["gqa"]
    params = _params(cfg, seed=7)
    x, y = _batch(cfg, seed=8, n=1)
    _, ref = _reference(cfg, params, x, y)
    model = Model(cfg, make_backend("sim", "fp16", ane_rules=False), {k: v.copy() for k, v in params.items()})
    try:
        model.forward_backward(x[0], y[0], loss_scale=256.0)
        got = {k: g / 256.0 for k, g in model.finish_gradients().items()}
    finally:
        model.close()
    for k in ref:
        cos = float(np.dot(got[k].ravel(), ref[k].ravel()) / (np.linalg.norm(got[k]) * np.linalg.norm(ref[k])))
        assert cos >= 0.99, f"fp16 gradient of {k} has cosine {cos:.5f} to the reference"


def test_a_trained_checkpoint_loads_into_transformers(tmp_path):
    from transformers import Qwen3ForCausalLM

    cfg = CONFIGS["gqa"]
    eng = Engine(cfg, backend="sim", precision="fp32", seed=1, ane_rules=False)
    try:
        x, y = _batch(cfg, seed=9, n=2)
        eng.train_step((x, y))
        path = eng.save(tmp_path / "ck")
        ours = eng.forward(x[0])  # [S, V]
    finally:
        eng.close()
    hf = Qwen3ForCausalLM.from_pretrained(str(path), attn_implementation="eager").double()
    with torch.no_grad():
        theirs = hf(torch.tensor(x[0][None], dtype=torch.long)).logits[0].numpy()
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 1e-5
    back = Engine.from_checkpoint(path, backend="sim", precision="fp32", ane_rules=False)
    try:
        assert type(back.config) is qwen3.ModelConfig and back.config == cfg
    finally:
        back.close()
