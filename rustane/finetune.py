"""``python -m rustane.finetune --model SRC --data PATH``: LoRA or full fine-tuning (mlx-lm's flags).

    python -m rustane.finetune --model SmolLM2-135M-Instruct.Q4_1.gguf --data data/ \\
        --fine-tune-type lora --lora-rank 8 --mask-prompt --steps 200 --adapter-path adapters/
    python -m rustane.generate --model SmolLM2-135M-Instruct.Q4_1.gguf --adapter-path adapters/ --chat ...
    python -m rustane.fuse --model SmolLM2-135M-Instruct.Q4_1.gguf --adapter-path adapters/ --out fused/

``-c config.yaml`` holds the same settings (keys are the flag names, with ``-`` or ``_``); a flag
given on the command line overrides the file. YAML because mlx-lm's configs are YAML, so a user's
existing file mostly carries over (PyYAML, ``safe_load``; TOML would need a second spelling).

Nothing is written before the model loads and every data row is validated. ``--adapter-path``
receives the PEFT adapter files (LoRA) or ``model/`` (full), ``metrics.jsonl`` and
``checkpoints/step-N``; ``--resume`` continues from its newest checkpoint, bit-identically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rustane.cli import ArgumentParser

#: every setting and its default (the flags, the config file's keys)
DEFAULTS = {
    "model": None, "data": None, "fine_tune_type": "lora", "lora_rank": 8, "lora_alpha": None, "lora_scale": None,
    "lora_layers": None, "lora_targets": "q_proj,v_proj", "mask_prompt": False, "steps": 100, "accum": 1,
    "batch_size": 1, "seq_len": None, "learning_rate": 1e-4, "min_lr": None, "warmup": 10, "weight_decay": 0.0,
    "clip": 1.0, "loss_scale": "dynamic", "save_every": 100, "eval_every": 50, "eval_batches": None,
    "adapter_path": "adapters", "resume": False, "freeze_embeddings": False, "fit": "pad", "truncate": False,
    "valid_fraction": 0.1, "backend": "auto", "precision": "fp16", "seed": 0, "research": False, "keep": 3,
    "progress": True, "debug": False,
}
ALIASES = {"iters": "steps", "train_type": "fine_tune_type", "num_layers": "lora_layers", "grad_accumulation_steps": "accum"}


def build_parser() -> argparse.ArgumentParser:
    S = argparse.SUPPRESS
    p = ArgumentParser(prog="python -m rustane.finetune", argument_default=S,
                                description="Fine-tune a pretrained model (LoRA or full) on JSONL data.")
    p.add_argument("-c", "--config", help="YAML file of settings (flags override it)")
    p.add_argument("--model", help="Hugging Face folder, .gguf file, llama2.c .bin or rustane checkpoint")
    p.add_argument("--data", help="folder with train.jsonl (valid.jsonl, test.jsonl) or one .jsonl file")
    p.add_argument("--fine-tune-type", choices=("lora", "full"), help="lora (default) or full")
    p.add_argument("--lora-rank", type=int, help="adapter rank r (default 8)")
    p.add_argument("--lora-alpha", type=float, help="PEFT's lora_alpha; scale = alpha / rank (default 2·rank)")
    p.add_argument("--lora-scale", type=float, help="mlx-lm's scale (alpha = scale·rank); instead of --lora-alpha")
    p.add_argument("--lora-layers", type=int, help="adapt (or, full: train) only the last N blocks")
    p.add_argument("--lora-targets", help="comma-separated modules (default q_proj,v_proj; all: "
                                          "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)")
    p.add_argument("--mask-prompt", action="store_true", help="prompt tokens / earlier turns carry no loss")
    p.add_argument("--steps", "--iters", dest="steps", type=int, help="optimizer steps (default 100)")
    p.add_argument("--accum", type=int, help="batches accumulated per optimizer step (default 1)")
    p.add_argument("--batch-size", type=int, help="sequences per batch (default 1)")
    p.add_argument("--seq-len", type=int, help="kernel sequence length (default: model context, at most 256)")
    p.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, help="peak learning rate (1e-4)")
    p.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    p.add_argument("--warmup", type=int, help="warmup steps (default 10)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--clip", type=float, help="gradient norm clip (default 1.0)")
    p.add_argument("--loss-scale", help="dynamic (default) or a number (fp16 loss scaling)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default 100; 0: end only)")
    p.add_argument("--eval-every", type=int, help="validation loss every N steps (default 50; 0: never)")
    p.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default all)")
    p.add_argument("--adapter-path", help="output folder (default ./adapters)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --adapter-path")
    p.add_argument("--freeze-embeddings", action="store_true", help="full: do not train embeddings/classifier")
    p.add_argument("--fit", choices=("pad", "pack"), help="fit rows to --seq-len: pad (default) or pack")
    p.add_argument("--truncate", action="store_true", help="cut rows longer than --seq-len (default: refuse)")
    p.add_argument("--valid-fraction", type=float, help="single-file data: share held out (default 0.1)")
    from rustane import backends  # the registry: the choices are the backends found by name

    p.add_argument("--backend", choices=backends.cli_choices(), help="auto = ANE when available, else the simulator "
                   "(default auto)")
    p.add_argument("--precision", choices=backends.precisions(), help="simulator precision (default fp16)")
    p.add_argument("--seed", type=int, help="adapter init and data order (default 0)")
    p.add_argument("--research", action="store_true", help="simulator only: allow shapes that break ANE rules")
    p.add_argument("--keep", type=int, help="checkpoints kept (default 3)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no per-step log lines")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of error: lines")
    return p


def read_config(path: str) -> dict:
    import yaml
    try:
        d = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(d).__name__}")
    out = {}
    for k, v in d.items():
        key = ALIASES.get(str(k).replace("-", "_"), str(k).replace("-", "_"))
        if key == "lora_parameters" and isinstance(v, dict):  # mlx-lm's nested block
            for kk, vv in v.items():
                m = {"rank": "lora_rank", "scale": "lora_scale", "alpha": "lora_alpha", "keys": None}.get(kk, "?")
                if m == "?":
                    raise ValueError(f"{path}: unknown lora_parameters key {kk!r} (rank, alpha, scale)")
                if m:
                    out[m] = vv
            continue
        if key not in DEFAULTS or key in ("debug",):
            raise ValueError(f"{path}: unknown setting {k!r}; settings are the flag names: "
                             f"{', '.join(sorted(k for k in DEFAULTS if k != 'debug'))}")
        if isinstance(v, list) and key == "lora_targets":
            v = ",".join(map(str, v))
        out[key] = v
    return out


def settings(argv: list[str] | None) -> dict:
    """Defaults, then the config file, then the flags given."""
    ns = vars(build_parser().parse_args(argv))
    s = dict(DEFAULTS)
    cfg_path = ns.pop("config", None)
    if cfg_path:
        s.update(read_config(cfg_path))
    s.update(ns)
    for req in ("model", "data"):
        if not s.get(req):
            raise ValueError(f"--{req} is required (or set {req}: in the -c config file)")
    return s


def _lora_config(s: dict, n_layers: int):
    from rustane.lora import LoraConfig
    rank = int(s["lora_rank"])
    if s["lora_alpha"] is not None and s["lora_scale"] is not None:
        raise ValueError("give --lora-alpha or --lora-scale, not both (alpha = scale·rank)")
    alpha = (float(s["lora_alpha"]) if s["lora_alpha"] is not None
             else float(s["lora_scale"]) * rank if s["lora_scale"] is not None else 2.0 * rank)
    return LoraConfig(rank=rank, alpha=alpha, targets=tuple(t.strip() for t in str(s["lora_targets"]).split(",") if t.strip()),
                      layers=_last_layers(s["lora_layers"], n_layers))


def _last_layers(n, n_layers: int):
    if n is None:
        return None
    n = int(n)
    if not 1 <= n <= n_layers:
        raise ValueError(f"--lora-layers must be in 1..{n_layers} (the model's blocks), got {n}")
    return tuple(range(n_layers - n, n_layers))


def finetune(s: dict) -> int:
    from rustane import models
    from rustane.engine import TrainConfig
    from rustane.finetune_data import Tokenization, open_finetune_data
    from rustane.finetune_engine import FinetuneEngine, latest_checkpoint
    from rustane.formats import describe_source, load_model, resolve_source

    tc = TrainConfig(lr=float(s["learning_rate"]), min_lr=s["min_lr"], warmup=int(s["warmup"]), steps=int(s["steps"]),
                     accum=int(s["accum"]), clip=s["clip"], weight_decay=float(s["weight_decay"]),
                     loss_scale=s["loss_scale"]).validate()
    if int(s["batch_size"]) < 1:
        raise ValueError(f"--batch-size must be >= 1, got {s['batch_size']}")
    # 1. the model's description and tokenizer, 2. every data row: both before anything is written
    m = load_model(resolve_source(s["model"]))
    n_layers = m.spec.n_layers
    seq_len = int(s["seq_len"]) if s["seq_len"] is not None else min(m.spec.max_position, 256)
    data = open_finetune_data(s["data"], Tokenization.of_model(m), seq_len, mask_prompt=bool(s["mask_prompt"]),
                              truncate=bool(s["truncate"]), fit=s["fit"], valid_fraction=float(s["valid_fraction"]),
                              split_seed=int(s["seed"]))
    lora = _lora_config(s, n_layers) if s["fine_tune_type"] == "lora" else None
    layers = None if lora is not None else _last_layers(s["lora_layers"], n_layers)
    out = Path(s["adapter_path"])
    resume_from = latest_checkpoint(out) if s["resume"] else None
    if s["resume"] and resume_from is None:
        raise ValueError(f"--resume: no checkpoint in {out / 'checkpoints'} (run without --resume to start)")
    if not s["resume"] and (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
        raise ValueError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or choose "
                         f"another --adapter-path")
    models.config_from_hf(m.config)  # refuses what the kernels cannot train, before compiling
    print(f"[{describe_source(m)}]", file=sys.stderr)
    print(f"[data: {len(data.train)} train rows"
          f"{'' if data.valid is None else f', {len(data.valid)} valid rows'} of {seq_len} tokens ({data.fit}); "
          f"{100 * data.loss_token_share():.1f}% of computed tokens carry loss]", file=sys.stderr)
    eng = FinetuneEngine(s["model"], lora=lora, backend=s["backend"], precision=s["precision"], seq_len=seq_len,
                         seed=int(s["seed"]), train=tc, freeze_embeddings=bool(s["freeze_embeddings"]), layers=layers,
                         ane_rules=not s["research"], imported=m)
    del m
    try:
        if resume_from is not None:
            st = eng.load_trained(resume_from)
            print(f"[resumed from {resume_from} at step {st['step']}]", file=sys.stderr)
        trained = sum(v.size for v in eng.trained_params.values())
        print(f"[{s['fine_tune_type']}: {trained:,} trained parameters; backend {eng.backend.name} "
              f"{eng.precision}; compile {eng.model.compile_seconds:.1f} s]", file=sys.stderr)

        def on_step(st):
            if s["progress"]:
                print(f"step {st.step:5d} | loss {st.loss:.4f} | lr {st.lr:.2e} | {st.tokens_per_second:7.1f} tok/s | "
                      f"trained tokens {eng.trained_tokens} | peak {st.peak_rss / 2**30:.2f} GiB"
                      f"{' | skipped (overflow)' if st.skipped else ''}", file=sys.stderr, flush=True)

        def on_eval(step, val):
            print(f"step {step:5d} | val loss {val:.4f}", file=sys.stderr, flush=True)

        res = eng.fit(data, batch_size=int(s["batch_size"]), out=out, save_every=int(s["save_every"]),
                      keep=int(s["keep"]), eval_every=int(s["eval_every"]), eval_batches=s["eval_batches"],
                      on_step=on_step, on_eval=on_eval)
        print(json.dumps({"report": res["report"], "evals": res["evals"]}))
    finally:
        eng.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Errors are raised (``rustane.cli.run`` prints them as one ``error:`` line, exit 2)."""
    return finetune(settings(argv))


if __name__ == "__main__":
    from rustane.cli import run as run_cli

    run_cli(main)
