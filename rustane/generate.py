"""``python -m rustane.generate --checkpoint DIR --prompt "..." -n 100``: sample from a checkpoint."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rustane import checkpoint


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rustane.generate", description="Generate text from a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (a step-N folder, or a run folder: its latest)")
    p.add_argument("--prompt", default="Once upon a time", help="text prompt (token ids with --ids)")
    p.add_argument("--ids", action="store_true", help="the prompt is space-separated token ids")
    p.add_argument("-n", type=int, default=100, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the one saved in the checkpoint)")
    p.add_argument("--backend", default="auto", choices=["auto", "sim", "ane"])
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])
    args = p.parse_args(argv)
    if args.n < 0:
        raise SystemExit(f"error: -n must be >= 0, got {args.n}")

    from rustane.data import load_tokenizer
    from rustane.engine import Engine

    path = Path(args.checkpoint)
    if not path.is_dir():
        raise SystemExit(f"error: checkpoint {path} does not exist or is not a directory "
                         f"(pass a step-N folder or a run folder from --out)")
    if path.is_dir() and not (path / "config.json").exists():
        latest = checkpoint.latest(path)
        if latest is None:
            raise SystemExit(f"error: {path} holds no checkpoint (no config.json, no step-N folders)")
        path = latest
    tok_path = Path(args.tokenizer) if args.tokenizer else path / "tokenizer.json"
    tok = None
    if not args.ids:
        if not tok_path.exists():
            raise SystemExit(f"error: no tokenizer at {tok_path}; pass --tokenizer FILE or --ids with token ids")
        tok = load_tokenizer(tok_path)
    try:
        eng = Engine.from_checkpoint(path, backend=args.backend, precision=args.precision, load_optimizer=False)
    except (checkpoint.CheckpointError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    if args.ids:
        try:
            ids = [int(t) for t in args.prompt.split()]
        except ValueError:
            raise SystemExit(f"error: --ids expects space-separated integers, got {args.prompt!r}")
        bad = [i for i in ids if not 0 <= i < eng.config.vocab_size]
        if bad:
            raise SystemExit(f"error: token ids {bad[:5]} are outside [0, vocab_size={eng.config.vocab_size})")
    else:
        ids = tok.encode(args.prompt).ids
    if not ids:
        raise SystemExit("error: the prompt encodes to no tokens")
    out = eng.generate(ids, args.n, temperature=args.temperature, top_k=args.top_k or None, seed=args.seed)
    print(tok.decode(ids + out) if tok is not None else " ".join(map(str, ids + out)))
    eng.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
