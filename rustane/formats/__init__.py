"""Import pretrained models from outside: a Hugging Face folder, a GGUF file, a llama2.c
checkpoint. ``load_model(src)`` picks the reader by what ``src`` is and returns one
family-neutral ``Imported`` (HF config, fp32 HF-named tensors, tokenizer)."""

from __future__ import annotations

import os
from pathlib import Path

from rustane.formats.arch import ArchSpec, FormatError, Imported, rope_inv_freq

__all__ = ["load_model", "resolve_source", "save_hf_folder", "ArchSpec", "FormatError", "Imported", "rope_inv_freq",
           "describe_source"]

_GGUF_MAGIC = b"GGUF"


def load_model(src: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Imported:
    """Read ``src``: a folder with config.json (Hugging Face, or a rustane checkpoint), a ``.gguf``
    file, or a llama2.c ``.bin`` (``tokenizer`` = its tokenizer.bin, default beside it)."""
    p = Path(src)
    if p.is_dir():
        from rustane.formats.hf import load_hf_folder
        return load_hf_folder(p)
    if not p.is_file():
        raise FormatError(f"model {p} does not exist (pass a Hugging Face folder, a .gguf file or a "
                          f"llama2.c .bin)")
    with open(p, "rb") as f:
        head = f.read(4)
    if head == _GGUF_MAGIC:
        from rustane.formats.gguf_file import load_gguf
        return load_gguf(p)
    if p.suffix == ".gguf":
        raise FormatError(f"{p}: does not start with the GGUF magic (corrupted or not a GGUF file)")
    if p.suffix == ".bin":
        from rustane.formats.llama2c import load_llama2c
        return load_llama2c(p, tokenizer)
    raise FormatError(f"{p}: unknown model file type (expected a folder, .gguf or llama2.c .bin)")


def save_hf_folder(model: Imported, path: str | os.PathLike) -> Path:
    from rustane.formats.hf import save_hf_folder as _save
    return _save(model, path)


def describe_source(model: Imported) -> str:
    s = model.spec
    return (f"{s.model_type} from {model.source}: {s.n_layers} layers, dim {s.dim}, heads "
            f"{s.n_heads}/{s.n_kv_heads} x {s.head_dim}, hidden {s.hidden_dim}, vocab {s.vocab_size}"
            f"{', tied' if s.tie_embeddings else ''}")


def resolve_source(src: str | os.PathLike) -> Path:
    """A rustane run folder (``step-N`` checkpoints, no config.json) stands for its newest
    checkpoint; anything else is returned as given."""
    p = Path(src)
    if p.is_dir() and not (p / "config.json").exists():
        from rustane import checkpoint
        latest = checkpoint.latest(p)
        if latest is None:
            raise FormatError(f"{p} holds no model (no config.json, no step-N checkpoints); pass a "
                              f"Hugging Face folder, a .gguf, a llama2.c .bin or a run folder from --out")
        return latest
    if not p.exists():
        raise FormatError(f"model {p} does not exist (pass a Hugging Face folder, a .gguf file, a "
                          f"llama2.c .bin, or a checkpoint / run folder from --out)")
    return p
