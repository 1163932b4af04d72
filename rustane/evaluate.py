"""``python -m rustane.evaluate --model SRC --data FILE``: perplexity of a model on a text file.

The file is tokenized whole, then scored with a fixed-stride sliding window: each window of
``--window`` tokens starts ``--stride`` tokens after the previous one, and only the tokens no
earlier window scored count, so every token after the first is predicted once with at least
``window - stride`` tokens of context (all of it when the file is shorter than a window).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from rustane.cli import ArgumentParser, HelpFormatter
from rustane.errors import UsageError

__all__ = ["Perplexity", "perplexity", "main"]


@dataclass
class Perplexity:
    tokens: int  # tokens scored
    mean_nll: float  # nats per token
    window: int
    stride: int
    seconds: float

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.mean_nll))


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    return lse - z[np.arange(len(targets)), targets]


def perplexity(decoder, ids: Sequence[int], window: int = 512, stride: int | None = None) -> Perplexity:
    """Sliding-window perplexity of ``ids`` under ``decoder`` (a ``KVCacheDecoder``)."""
    ids = np.asarray(ids, dtype=np.int64)
    stride = window // 2 if stride is None else stride
    if window < 2 or not 1 <= stride < window:
        # windows overlap by at least one token: a window's first token is context only
        raise UsageError(f"need --window >= 2 and 1 <= --stride < --window, got window {window}, stride {stride}")
    if ids.size < 2:
        raise ValueError(f"the text holds {ids.size} token(s); perplexity needs at least 2")
    t0 = time.perf_counter()
    total, count, scored_to = 0.0, 0, 1  # position 0 has no prediction
    start = 0
    while scored_to < ids.size:
        end = min(start + window, ids.size)
        decoder.reset()
        logits = decoder.forward(ids[start:end - 1], all_logits=True)  # predicts start+1 .. end-1
        first = scored_to - start - 1  # row predicting position scored_to
        total += float(_nll(logits[first:], ids[scored_to:end]).sum())
        count += end - scored_to
        scored_to = end
        start += stride
    return Perplexity(tokens=count, mean_nll=total / count, window=window, stride=stride,
                      seconds=time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rustane.evaluate", description="Perplexity of a model on a text file.",
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face folder, .gguf, llama2.c .bin, or rustane checkpoint")
    p.add_argument("--data", required=True, help="UTF-8 text file")
    p.add_argument("--window", type=int, default=512, help="tokens per window (capped at the model's context)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default window/2)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens of the file (0: all)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or tokenizer.bin); default: the model's own")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    from pathlib import Path

    from rustane.decoder import KVCacheDecoder
    from rustane.formats import FormatError, load_model, resolve_source

    src = resolve_source(args.model)
    model = load_model(src, tokenizer=args.tokenizer if str(src).endswith(".bin") else None)
    tok = model.tokenizer()
    if args.tokenizer and not str(args.tokenizer).endswith(".bin"):
        from rustane.data import load_tokenizer
        tok = load_tokenizer(args.tokenizer)
    if tok is None:
        raise FormatError(f"{src} carries no tokenizer; pass --tokenizer FILE")
    data = Path(args.data)
    if not data.is_file():
        raise FormatError(f"--data {data} does not exist (pass a UTF-8 text file)")
    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--data {data} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                         f"convert it, e.g. with iconv -t utf-8") from None
    ids = tok.encode(text).ids
    if args.max_tokens > 0:
        ids = ids[:args.max_tokens]
    window = min(args.window, model.spec.max_position)
    res = perplexity(KVCacheDecoder.from_imported(model), ids, window, args.stride)
    if args.json:
        print(json.dumps({**asdict(res), "perplexity": res.perplexity, "model": str(src), "data": str(data)}))
    else:
        print(f"{res.tokens} tokens, mean NLL {res.mean_nll:.4f} nats, perplexity {res.perplexity:.3f} "
              f"(window {res.window}, stride {res.stride}, {res.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    from rustane.cli import run

    run(main)
