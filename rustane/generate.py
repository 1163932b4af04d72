"""``python -m rustane.generate --model SRC --prompt "..."``: generate text with a KV cache.

SRC is a Hugging Face folder, a ``.gguf`` file, a llama2.c ``.bin``, or a rustane checkpoint
(a ``step-N`` folder, or a run folder: its latest). ``--checkpoint DIR`` is the older spelling
of ``--model`` for checkpoints. Generation runs on the CPU in fp32 (``rustane.decoder``):
the prompt once, then one position per token; tokens/s goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rustane.cli import ArgumentParser, HelpFormatter
from rustane.errors import UsageError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m rustane.generate", description="Generate text from a model.",
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face folder, .gguf file, llama2.c .bin, or rustane checkpoint")
    src.add_argument("--checkpoint", help="rustane checkpoint (a step-N folder, or a run folder: its latest)")
    p.add_argument("--prompt", default="Once upon a time", help="text prompt (token ids with --ids)")
    p.add_argument("--ids", action="store_true", help="the prompt is space-separated token ids")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template "
                                                       "(instruct models)")
    p.add_argument("--max-tokens", "-n", dest="max_tokens", type=int, default=100,
                   help="most tokens to generate (stops earlier at end-of-sequence)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set reaching p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or llama2.c tokenizer.bin); default: the model's own")
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-sequence token")
    p.add_argument("--adapter-path", default=None, help="LoRA adapters (PEFT folder) applied to the model "
                                                        "in memory (rustane.fuse writes them into a copy)")
    # generation runs on the CPU; these were the training backend's settings and are accepted
    # so older command lines keep working
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 0:
        raise UsageError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    from rustane.decoder import KVCacheDecoder
    from rustane.formats import load_model, resolve_source
    from rustane.sampling import Sampler, render_chat

    Sampler(args.temperature, args.top_k or None, args.top_p)  # flag errors before loading
    src = resolve_source(args.model or args.checkpoint)
    t0 = time.perf_counter()
    if args.adapter_path:
        from rustane.fuse import merged_model
        model = merged_model(src, args.adapter_path)
    else:
        model = load_model(src, tokenizer=args.tokenizer if str(src).endswith(".bin") else None)
    load_s = time.perf_counter() - t0
    tok = model.tokenizer()
    if args.tokenizer and not str(args.tokenizer).endswith(".bin"):
        from rustane.data import load_tokenizer
        tok = load_tokenizer(args.tokenizer)
    vocab = model.spec.vocab_size
    if args.ids:
        try:
            ids = [int(t) for t in args.prompt.split()]
        except ValueError:
            raise UsageError(f"--ids expects space-separated integers, got {args.prompt!r}")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UsageError(f"token ids {bad[:5]} are outside [0, vocab_size={vocab})")
    else:
        if tok is None:
            raise UsageError(f"{src} carries no tokenizer; pass --tokenizer FILE, or --ids with token ids")
        text = args.prompt
        if args.chat:
            template = model.tokenizer_config.get("chat_template")
            if not template:
                raise UsageError(f"{src} has no chat template; drop --chat (base models take "
                                 f"plain prompts)")
            text = render_chat(template, [{"role": "user", "content": args.prompt}], model.tokenizer_config)
        ids = tok.encode(text, add_special_tokens=not args.chat).ids
    if not ids:
        raise UsageError("the prompt encodes to no tokens")
    dec = KVCacheDecoder.from_imported(model)
    stops = [] if args.no_stop else model.eos_ids
    gen = dec.generate(ids, args.max_tokens, temperature=args.temperature, top_k=args.top_k or None,
                       top_p=args.top_p, seed=args.seed, stop_ids=stops)
    out = [t for t in gen.tokens if t not in stops] if not args.ids else gen.tokens
    if tok is not None and not args.ids:
        print(tok.decode(out) if args.chat else tok.decode(ids + out))
    else:
        print(" ".join(map(str, ids + out)))
    print(f"[{len(gen.tokens)} tokens ({gen.stop}); prompt {gen.prompt_tokens} tokens in "
          f"{gen.prefill_seconds:.2f} s; decode {gen.tokens_per_second:.1f} tokens/s; "
          f"model loaded in {load_s:.1f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from rustane.cli import run

    run(main)
