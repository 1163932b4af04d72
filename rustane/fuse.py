"""``python -m rustane.fuse --model SRC --adapter-path P --out DIR``: merge LoRA adapters into the
base model (``W + s·B·A``, fp32) and write a Hugging Face folder that ``transformers`` and
``rustane`` load as a plain model (tokenizer and chat template included)."""

from __future__ import annotations

import sys
from pathlib import Path

from rustane.cli import ArgumentParser


def merged_model(src, adapter_path):
    """The imported model of ``src`` with the adapters in ``adapter_path`` merged into its tensors."""
    from rustane import checkpoint, models
    from rustane.formats import load_model, resolve_source
    from rustane.lora import load_adapter, merge_into

    m = load_model(resolve_source(src))
    cfg = models.config_from_hf(m.config)
    lcfg, adapters = load_adapter(adapter_path, cfg)
    params = merge_into(checkpoint.from_hf_params(m.tensors, cfg), lcfg, adapters)
    m.tensors = checkpoint.to_hf_params(params, cfg)
    return m


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m rustane.fuse", description="Merge LoRA adapters into a model.")
    p.add_argument("--model", required=True, help="the base model the adapters were trained on")
    p.add_argument("--adapter-path", required=True, help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--out", required=True, help="output folder (Hugging Face layout)")
    p.add_argument("--debug", action="store_true", help="tracebacks instead of error: lines")
    args = p.parse_args(argv)
    from rustane.errors import OutputDirError
    from rustane.formats.hf import save_hf_folder
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise OutputDirError(f"--out {out} exists and is not empty; choose a new folder")
    m = merged_model(args.model, args.adapter_path)
    save_hf_folder(m, out)
    print(f"[fused {args.adapter_path} into {args.model} -> {out}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from rustane.cli import run

    run(main)
