"""``python -m rustane.train``: train or fine-tune a Llama-family model on the ANE or the simulator.

With no flags it trains the ``tiny`` preset on the built-in story corpus, shows progress, saves a
checkpoint under ``runs/tiny`` and prints a sample. All training logic lives in
``rustane.engine``; this module only parses flags, reports progress and prints the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path

from rustane import backends, checkpoint, run_dir
from rustane.cli import EXIT_INTERRUPTED, ArgumentParser, HelpFormatter
from rustane.config import preset, preset_names
from rustane.data import open_dataset
from rustane.errors import UsageError
from rustane.divergence import DEFAULT_MAX_NONFINITE
from rustane.interrupts import Interrupted

DEFAULT_STEPS = 1200


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m rustane.train",
        description="Train a Llama-family model on the Apple Neural Engine (or its simulator).",
        formatter_class=HelpFormatter)
    m = p.add_argument_group("model and data")
    m.add_argument("--preset", default=None, choices=preset_names(),
                   help="model shape (default: tiny, or the checkpoint's when resuming)")
    m.add_argument("--model", default=None,
                   help="fine-tune a pretrained model: a Hugging Face folder, a .gguf file, a llama2.c .bin "
                        "or a rustane checkpoint (its tokenizer comes along)")
    m.add_argument("--seq-len", type=int, default=None,
                   help="training context in tokens (default: the preset's; with --model, the model's, at most 256)")
    m.add_argument("--data", default="builtin",
                   help="'builtin' (generated stories), a token file (.bin: flat uint16/uint32), "
                        "a text file, or a folder of .txt files")
    m.add_argument("--tokenizer", default=None,
                   help="tokenizer.json for text data (default: train a byte-level BPE, cached beside the text)")
    m.add_argument("--val-fraction", type=float, default=0.05, help="held-out tail of the data for validation")
    r = p.add_argument_group("runtime")
    r.add_argument("--backend", default="auto", choices=backends.cli_choices(),
                   help="auto = ANE when available, else the simulator")
    r.add_argument("--precision", default="fp16", choices=backends.precisions(),
                   help="simulator arithmetic: fp16 models the ANE, fp32 is exact math")
    r.add_argument("--seed", type=int, default=None, help="initialisation and data-sampling seed (default 0)")
    r.add_argument("--research", action="store_true",
                   help="simulator only: allow model shapes that break ANE rules (docs/ane-rules.md)")
    o = p.add_argument_group("optimisation (defaults: the checkpoint's when resuming)")
    o.add_argument("--steps", type=int, default=None, help=f"optimizer steps in total (default {DEFAULT_STEPS})")
    o.add_argument("--accum", type=int, default=None, help="sequences per optimizer step (default 1)")
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    o.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr/10)")
    o.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default 50)")
    o.add_argument("--clip", type=float, default=None, help="global gradient-norm clip (default 1.0)")
    o.add_argument("--weight-decay", type=float, default=None, help="AdamW decoupled weight decay (default 0.1)")
    o.add_argument("--loss-scale", default=None,
                   help="'dynamic' (default: halve on overflow, grow after clean steps) or a fixed number")
    c = p.add_argument_group("checkpoints, evaluation, output")
    c.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    c.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    c.add_argument("--keep", type=int, default=3, help="keep the N newest checkpoints (0 keeps all)")
    c.add_argument("--resume", default=None, help="checkpoint directory, or 'auto' for the latest in --out")
    c.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one (deletes its checkpoints and metrics)")
    c.add_argument("--allow-changes", action="store_true",
                   help="resume although data, model or settings differ from the run's (run.json)")
    c.add_argument("--max-nonfinite", type=int, default=DEFAULT_MAX_NONFINITE,
                   help="stop after N consecutive steps with a non-finite loss (fp32: the first); 0: never")
    c.add_argument("--eval-every", type=int, default=200, help="validation loss every N steps (0: never)")
    c.add_argument("--eval-batches", type=int, default=8, help="validation sequences per evaluation")
    c.add_argument("--sample", type=int, default=120, help="generate N tokens at the end (0: none)")
    c.add_argument("--prompt", default="Once upon a time", help="prompt for the sample")
    c.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    return p


def _train_config(args, saved):
    from rustane.engine import TrainConfig

    base = saved or TrainConfig(steps=DEFAULT_STEPS)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if "loss_scale" in given and given["loss_scale"] != "dynamic":
        try:
            given["loss_scale"] = float(given["loss_scale"])
        except ValueError:
            pass  # TrainConfig names the problem
    return TrainConfig(**{**asdict(base), **given}).validate()


def _resolve_resume(args, out: Path) -> Path | None:
    if args.resume is None:
        return None
    if args.resume == "auto":
        found = checkpoint.latest(out)
        if found is None:
            print(f"--resume auto: no checkpoint in {out}; starting fresh", file=sys.stderr)
        return found
    return Path(args.resume)


def _resume_command(argv: list[str] | None, out: Path) -> str:
    """The command line that continues this run: the same flags with ``--resume auto``."""
    args = list(sys.argv[1:] if argv is None else argv)
    keep: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--resume", "--out"):
            skip = True
            continue
        if a.startswith(("--resume=", "--out=")) or a in ("--overwrite", "--debug"):
            continue
        keep.append(a)
    return shlex.join(["python", "-m", "rustane.train", *keep, "--out", str(out), "--resume", "auto"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, v in (("--save-every", args.save_every), ("--keep", args.keep), ("--eval-every", args.eval_every),
                    ("--sample", args.sample), ("--eval-batches", args.eval_batches),
                    ("--max-nonfinite", args.max_nonfinite)):
        if v < 0:
            raise UsageError(f"{name} must be >= 0, got {v}")
    from rustane.engine import Engine, saved_train_config

    if args.model and args.preset:
        raise UsageError("--model and --preset both choose the model; pass one of them")
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len must be >= 1, got {args.seq_len}")
    if args.eval_every and args.eval_batches < 1:
        raise UsageError(f"--eval-batches must be >= 1 when evaluating, got {args.eval_batches} "
                         f"(pass --eval-every 0 to skip validation)")
    if args.seed is not None and args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1), got {args.val_fraction} (e.g. 0.05: the last 5% "
                         f"of the tokens)")
    out = Path(args.out or f"runs/{args.preset or (Path(args.model).stem if args.model else 'tiny')}")
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite deletes it; pass one of them")
    resume = _resolve_resume(args, out)
    # a new run never mixes with another in the same folder (rustane.run_dir); with --overwrite
    # the old one is deleted only once this one has been built, so a bad flag loses nothing
    start_over = args.overwrite or (args.resume == "auto" and resume is None)
    if resume is None and not start_over:
        run_dir.check_new_run(out)
    tokenizer = args.tokenizer
    if resume is not None:
        expected = preset(args.preset) if args.preset else None
        ck_state = checkpoint.check_resumable(resume)  # the tensors are read once, by from_checkpoint
        saved = saved_train_config(ck_state, resume)
        tc = _train_config(args, saved)
        eng = Engine.from_checkpoint(resume, backend=args.backend, precision=args.precision, train=tc,
                                     expected=expected, ane_rules=not args.research)
        print(f"resumed from {resume} at step {eng.step}")
    elif args.model:
        tc = _train_config(args, None)
        eng = Engine.from_pretrained(args.model, backend=args.backend, precision=args.precision,
                                     seq_len=args.seq_len, seed=0 if args.seed is None else args.seed,
                                     train=tc, ane_rules=not args.research)
    else:
        tc = _train_config(args, None)
        cfg = preset(args.preset or "tiny", **({"seq_len": args.seq_len} if args.seq_len else {}))
        eng = Engine(cfg, backend=args.backend, precision=args.precision,
                     seed=0 if args.seed is None else args.seed, train=tc, ane_rules=not args.research)
    if start_over:
        for p in run_dir.overwrite(out):
            print(f"removed {p} (--overwrite)" if args.overwrite else
                  f"removed {p} (a run without any checkpoint)", file=sys.stderr)
    if tokenizer is None and eng.tokenizer_json is not None:
        # the model's own tokenizer (imported, or saved in the checkpoint) tokenizes text data
        out.mkdir(parents=True, exist_ok=True)
        tokenizer = out / "tokenizer.json"
        if not tokenizer.is_file() or tokenizer.read_text(encoding="utf-8") != eng.tokenizer_json:
            tokenizer.write_text(eng.tokenizer_json, encoding="utf-8")
    source = args.data
    if args.model and source == "builtin":
        # a pretrained model reads the generated stories through its own tokenizer
        from rustane.corpus import generate_stories
        source = out / "builtin-stories.txt"
        if not source.exists():
            source.write_text("\n\n".join(generate_stories(2000, seed=0)) + "\n", encoding="utf-8")
    data = open_dataset(source, eng.config, val_fraction=args.val_fraction, tokenizer=tokenizer)
    provenance = run_dir.describe_data(source, data)
    record = dict(data=provenance, model=eng.config.to_dict(), train=asdict(eng.train_config), seed=eng.seed,
                  precision=eng.precision)
    if resume is not None:
        accepted = run_dir.check_resume(out, **record, allow_changes=args.allow_changes, ck_state=ck_state)
        if accepted:
            print(f"--allow-changes: resuming with {'; '.join(accepted)} (not the same run bit for bit)",
                  file=sys.stderr)
    eng.data_sha256 = provenance["sha256"]
    run_dir.write_run(out, argv=list(sys.argv[1:] if argv is None else argv), **record,
                      resumed_from=str(resume) if resume is not None else None)

    cfg = eng.config
    label = args.preset or ("from checkpoint" if resume is not None else args.model or "tiny")
    print(f"model {label}: {cfg.n_params / 1e6:.2f}M params, {cfg.n_layers} layers, "
          f"dim {cfg.dim}, heads {cfg.n_heads}/{cfg.n_kv_heads}, seq {cfg.seq_len}, vocab {cfg.vocab_size}")
    print(f"backend {eng.backend.name} ({eng.precision}); {eng.model.evals_per_step_per_sequence} kernel evals "
          f"per sequence; kernels compiled in {eng.model.compile_seconds:.2f} s")
    print(f"data {data.describe()}")
    if eng.step >= tc.steps:
        print(f"already at step {eng.step} of {tc.steps}: nothing to train (raise --steps)")
    eng.use_tokenizer_of(data)  # saved in every checkpoint from here on

    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=eng.step, unit="step", dynamic_ncols=True)
        except ImportError:
            bar = None
    last_val: list[float] = []

    def on_step(st) -> None:
        info = {"loss": f"{st.loss:.3f}", "tok/s": f"{st.tokens_per_second:.0f}"}
        if st.skipped:
            info["skip"] = f"overflow, scale {st.loss_scale:g}"
        if last_val:
            info["val"] = f"{last_val[-1]:.3f}"
        if bar is not None:
            bar.set_postfix(info, refresh=False)
            bar.update(1)
        elif st.step % 10 == 0 or st.step == tc.steps:
            print(f"step {st.step}/{tc.steps} " + " ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    def on_eval(step: int, val: float) -> None:
        last_val.append(val)
        msg = f"step {step}: val loss {val:.4f}"
        (bar.write(msg) if bar is not None else print(msg, flush=True))

    try:
        result = eng.fit(data, out=out, save_every=args.save_every, keep=args.keep or None,
                         eval_every=args.eval_every, eval_batches=args.eval_batches,
                         on_step=on_step, on_eval=on_eval, max_nonfinite=args.max_nonfinite)
    except Interrupted as stop:
        if bar is not None:
            bar.close()
        print(f"{stop.signame}: stopped after step {stop.step}; checkpoint saved to {stop.checkpoint}\n"
              f"resume with: {_resume_command(argv, out)}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        last = checkpoint.latest(out)
        print(f"aborted during step {eng.step + 1} without saving it; "
              + (f"the last complete checkpoint is {last}; resume with: {_resume_command(argv, out)}"
                 if last is not None else "no checkpoint was written"), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        if bar is not None:
            bar.close()

    rep = result["report"]
    if rep:
        print("\nefficiency (mean per optimizer step, first step excluded):")
        print(f"  {rep['ms_per_step']:.1f} ms/step, {rep['tokens_per_s']:.0f} tokens/s, "
              f"{rep['evals_per_step']:.0f} kernel evals/step, kernel {rep['kernel_tflops'] * 1e3:.2f} GFLOPS")
        print("  " + ", ".join(f"{k} {v:.1f} ms" for k, v in rep["ms"].items()))
        (out / "report.json").write_text(json.dumps(rep, indent=2))
    if result["evals"]:
        first, last = result["evals"][0], result["evals"][-1]
        print(f"validation loss: {first[1]:.4f} (step {first[0]}) -> {last[1]:.4f} (step {last[0]})")
    _plot(out)
    ck = checkpoint.latest(out)
    if ck is not None:
        print(f"checkpoint: {ck}")
    if args.sample:
        print("\nsample:")
        try:
            print(_sample(eng, data, args.prompt, args.sample))
        except ValueError as exc:  # non-finite logits (a diverged run kept going with --max-nonfinite 0)
            print(f"(no sample: {exc})")
    eng.close()
    return 0


def _sample(eng, data, prompt: str, n: int) -> str:
    """``n`` tokens after ``prompt`` from the CPU KV-cache decoder, with tokens/s."""
    from rustane.decoder import KVCacheDecoder

    model = eng.to_imported()
    tok = data.tokenizer or model.tokenizer()
    dec = KVCacheDecoder.from_imported(model, context=eng.config.seq_len)
    if tok is not None:
        ids = tok.encode(prompt).ids or [0]
        gen = dec.generate(ids, n, temperature=0.8, top_k=40, seed=eng.seed, stop_ids=model.eos_ids)
        print(f"[{len(gen.tokens)} tokens at {gen.tokens_per_second:.0f} tokens/s]")
        return tok.decode(ids + gen.tokens)
    ids = [int(t) for t in data.val[:8]]
    return " ".join(str(t) for t in ids + eng.generate(ids, n, temperature=0.8, top_k=40))


def _plot(out: Path) -> None:
    """loss.png from metrics.jsonl when matplotlib is installed (optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss.png not drawn: matplotlib is not installed (pip install matplotlib, or the "
              "rustane[plot] extra); the numbers are in metrics.jsonl", file=sys.stderr)
        return
    steps, losses, vsteps, vals = [], [], [], []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            steps.append(r["step"])
            losses.append(r["loss"])
        if "val_loss" in r:
            vsteps.append(r["step"])
            vals.append(r["val_loss"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.8, label="train")
    if vals:
        ax.plot(vsteps, vals, "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    print(f"loss curve: {out / 'loss.png'}")


if __name__ == "__main__":
    from rustane.cli import run

    run(main)
