"""``python -m rustane.bench train --preset stories15m --json``: training throughput, side by side.

In one process, on the same model shape and the same token batch:

- the engine on the simulator in fp32 and fp16 (tokens/s and the per-phase ms split),
- PyTorch CPU eager training of the same Llama (``rustane.testing.torch_llama``, fp32, AdamW),
- the engine on the null backend (kernel evals cost nothing), giving the Python orchestration
  time per kernel eval.

Ratios are against the PyTorch run measured here and now, never against stored numbers, so the
JSON can gate CI on any machine. Figures are measured, not asserted: tests never time anything.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from rustane.config import preset, preset_names

GOAL_SIM_FP32_VS_TORCH = 1.0  # tokens/s ratio, sim fp32 / PyTorch eager
GOAL_ORCHESTRATION_US = 15.0  # Python orchestration per kernel eval (null backend)


def _batch(cfg, accum: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, cfg.vocab_size, size=(accum, cfg.seq_len + 1))
    return t[:, :-1].astype(np.int32), t[:, 1:].astype(np.int32)


def _engine_run(cfg, backend: str, precision: str, batch, steps: int, warmup: int) -> dict:
    from rustane.engine import Engine, TrainConfig

    eng = Engine(cfg, backend=backend, precision=precision, seed=0,
                 train=TrainConfig(steps=steps + warmup, warmup=1, lr=1e-4, accum=len(batch[0])))
    try:
        for _ in range(warmup):
            eng.train_step(batch)
        hist = [eng.train_step(batch) for _ in range(steps)]
        policy = eng.model.threads.describe()
    finally:
        eng.close()
    ms_step = 1e3 * float(np.median([h.seconds for h in hist]))
    phases = {p: float(np.median([h.ms[p] for h in hist])) for p in hist[0].ms}
    return {"tokens_per_s": batch[0].size / (ms_step / 1e3), "ms_per_step": ms_step, "ms": phases,
            "evals_per_step": hist[0].evals, "compile_s": eng.model.compile_seconds,
            "loss_first": hist[0].loss, "loss_last": hist[-1].loss,
            "cpu_policy": policy}


def _torch_run(cfg, batch, steps: int, warmup: int) -> dict:
    import torch

    from rustane.model import init_params
    from rustane.testing.torch_llama import forward

    params = {k: torch.tensor(v, requires_grad=True) for k, v in init_params(cfg, 0).items()}
    decay = [p for k, p in params.items() if not k.endswith("norm.weight")]
    no_decay = [p for k, p in params.items() if k.endswith("norm.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    x, y = batch

    def step() -> float:
        t0 = time.perf_counter()
        for i in range(len(x)):
            loss, _ = forward(params, cfg, x[i], y[i])
            (loss / len(x)).backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        return time.perf_counter() - t0

    for _ in range(warmup):
        step()
    secs = [step() for _ in range(steps)]
    ms_step = 1e3 * float(np.median(secs))
    return {"tokens_per_s": x.size / (ms_step / 1e3), "ms_per_step": ms_step, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _null_run(cfg, accum: int, steps: int, warmup: int) -> dict:
    """Python orchestration per kernel eval: the preset's layers, heads and kernel set at minimal
    widths on the null backend, so evals, data movement and CPU math all cost ~nothing and what
    remains of a step is the engine's own Python (locking, staging calls, dispatch, dW submits)."""
    small = cfg.replace(dim=2 * cfg.n_heads, hidden_dim=8, head_dim=2, seq_len=8, vocab_size=16)
    runs = 5 * steps  # cheap steps: take more of them
    # best of three medians: a fixed per-eval cost is what is measured, so interference from other
    # processes (or the collector cleaning up the big runs before) should not count
    r = min((_engine_run(small, "null", "fp16", _batch(small, accum), runs, warmup) for _ in range(3)),
            key=lambda res: res["ms_per_step"])
    ms, n = r["ms"], r["evals_per_step"]
    orchestration = r["ms_per_step"] - ms["optimizer"] - ms["dw_wait"]
    return {"shape": {k: getattr(small, k) for k in ("n_layers", "n_heads", "n_kv_heads", "dim", "seq_len")},
            "evals_per_step": n, "us_per_eval_orchestration": 1e3 * orchestration / n,
            "ms_per_step": r["ms_per_step"], "ms": ms, "steps_measured": runs, "repeats": "best median of 3"}


def bench_train(preset_name: str, accum: int, steps: int, warmup: int, torch_baseline: bool = True) -> dict:
    cfg = preset(preset_name)
    batch = _batch(cfg, accum)
    out: dict = {
        "bench": "train", "preset": preset_name, "params": cfg.n_params, "seq_len": cfg.seq_len,
        "accum": accum, "steps_measured": steps,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "numpy": np.__version__},
    }
    out["sim_fp32"] = _engine_run(cfg, "sim", "fp32", batch, steps, warmup)
    out["sim_fp16"] = _engine_run(cfg, "sim", "fp16", batch, steps, warmup)
    out["null"] = _null_run(cfg, accum, steps, warmup)
    gates = {"orchestration_us_per_eval": {"value": out["null"]["us_per_eval_orchestration"],
                                           "goal": f"<= {GOAL_ORCHESTRATION_US}",
                                           "pass": out["null"]["us_per_eval_orchestration"] <= GOAL_ORCHESTRATION_US}}
    if torch_baseline:
        try:
            out["torch_eager_fp32"] = _torch_run(cfg, batch, steps, warmup)
        except ImportError as exc:
            out["torch_eager_fp32"] = {"error": f"PyTorch not installed ({exc}); pip install torch==2.13.0"}
        else:
            ratio = out["sim_fp32"]["tokens_per_s"] / out["torch_eager_fp32"]["tokens_per_s"]
            out["ratio_sim_fp32_vs_torch"] = ratio
            out["ratio_sim_fp16_vs_torch"] = out["sim_fp16"]["tokens_per_s"] / out["torch_eager_fp32"]["tokens_per_s"]
            gates["sim_fp32_vs_torch"] = {"value": ratio, "goal": f">= {GOAL_SIM_FP32_VS_TORCH}",
                                          "pass": ratio >= GOAL_SIM_FP32_VS_TORCH}
    out["gates"] = gates
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rustane.bench", description="rustane benchmarks (JSON out)")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="training throughput: sim fp32/fp16 vs PyTorch eager, null-backend overhead")
    t.add_argument("--preset", default="stories15m", choices=preset_names())
    t.add_argument("--accum", type=int, default=1, help="sequences per step")
    t.add_argument("--steps", type=int, default=5, help="measured steps (median reported)")
    t.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    t.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    t.add_argument("--json", action="store_true", help="print one JSON object (default: a readable summary)")
    t.add_argument("--gate", action="store_true", help="exit 1 when a goal is missed (for CI)")
    g = sub.add_parser("generate", help="KV-cache decode tokens/s vs transformers generate; GGUF import time")
    g.add_argument("--model", default=None, help="model source (default: SmolLM2-135M-Instruct Q4_1 GGUF)")
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--runs", type=int, default=3, help="measured runs (median reported)")
    g.add_argument("--no-torch", action="store_true", help="skip the transformers baseline")
    g.add_argument("--json", action="store_true")
    g.add_argument("--gate", action="store_true", help="exit 1 when the goal is missed")
    args = p.parse_args(argv)
    if args.what == "generate":
        return _main_generate(args)
    for name in ("accum", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1")
    res = bench_train(args.preset, args.accum, args.steps, args.warmup, not args.no_torch)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for k in ("sim_fp32", "sim_fp16", "torch_eager_fp32"):
            if k in res and "tokens_per_s" in res[k]:
                print(f"{k:18s} {res[k]['tokens_per_s']:9.0f} tok/s  {res[k]['ms_per_step']:8.1f} ms/step")
        print(f"null backend: {res['null']['us_per_eval_orchestration']:.1f} us of Python orchestration per kernel eval")
        for name, g in res["gates"].items():
            print(f"gate {name}: {g['value']:.3f} (goal {g['goal']}) {'PASS' if g['pass'] else 'MISS'}")
    if args.gate and not all(g["pass"] for g in res["gates"].values()):
        return 1
    return 0


def _main_generate(args) -> int:
    from rustane.bench_generate import bench_generate

    if args.max_tokens < 2 or args.runs < 1:
        raise SystemExit("error: --max-tokens must be >= 2 and --runs >= 1")
    try:
        res = bench_generate(args.model, args.prompt, args.max_tokens, args.runs, not args.no_torch)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
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


if __name__ == "__main__":
    sys.exit(main())
