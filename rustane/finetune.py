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

from rustane.finetune_engine import DEFAULTS  # noqa: E402  (every setting and its default)
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


def finetune(s: dict) -> int:
    """Run the job (``rustane.finetune_engine.run_job``) with progress on stderr, the report on stdout."""
    from rustane.finetune_engine import run_job

    def say(msg):
        print(f"[{msg}]", file=sys.stderr, flush=True)

    def on_step(st, eng):
        if s["progress"]:
            print(f"step {st.step:5d} | loss {st.loss:.4f} | lr {st.lr:.2e} | {st.tokens_per_second:7.1f} tok/s | "
                  f"trained tokens {eng.trained_tokens} | peak {st.peak_rss / 2**30:.2f} GiB"
                  f"{' | skipped (overflow)' if st.skipped else ''}", file=sys.stderr, flush=True)

    def on_eval(step, val):
        print(f"step {step:5d} | val loss {val:.4f}", file=sys.stderr, flush=True)

    res = run_job(s, say=say, on_step=on_step, on_eval=on_eval)
    print(json.dumps({"report": res["report"], "evals": res["evals"]}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Errors are raised (``rustane.cli.run`` prints them as one ``error:`` line, exit 2)."""
    return finetune(settings(argv))


if __name__ == "__main__":
    from rustane.cli import run as run_cli

    run_cli(main)
