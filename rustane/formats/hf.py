"""Import a Hugging Face model folder and export one (the format checkpoints already use).

A folder holds ``config.json``, weights in ``model.safetensors`` or shards listed by
``model.safetensors.index.json``, and optionally ``tokenizer.json`` plus
``tokenizer_config.json`` (special tokens and the chat template).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from rustane.formats.arch import FormatError, Imported

__all__ = ["load_hf_folder", "save_hf_folder", "read_safetensors"]

_TOKENIZER_SETTINGS = ("chat_template", "bos_token", "eos_token", "pad_token", "unk_token",
                       "add_bos_token", "add_eos_token")


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{p}: not readable JSON ({exc})") from exc


_ST_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}


def read_safetensors(p: Path) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as fp32 numpy arrays (F16/BF16/F64 converted).

    Read here rather than through ``safetensors`` because numpy has no bfloat16, and so every
    way a file can be damaged gets a message that names it. Layout: u64 little-endian header
    length, a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}}``, the data.
    """
    import struct
    size = p.stat().st_size

    def bad(why: str) -> FormatError:
        return FormatError(f"{p}: corrupted or truncated safetensors file ({why}); re-download or re-save it")

    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the header length field")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise bad(f"header length {n} exceeds the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data = np.memmap(p, dtype=np.uint8, mode="r", offset=8 + n, shape=(size - 8 - n,)) if size > 8 + n else \
        np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dt, shape, (a, b) = info["dtype"], [int(x) for x in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise bad(f"entry {name!r} is malformed") from exc
        if dt not in _ST_DTYPES:
            raise FormatError(f"{p}: tensor {name} has dtype {dt}; rustane imports F32, F16, BF16 and F64 "
                              f"weights (re-save the model in one of those)")
        width = _ST_DTYPES[dt].itemsize
        count = int(np.prod(shape, dtype=np.int64))
        if not (0 <= a <= b) or b - a != count * width:
            raise bad(f"tensor {name}: offsets {a}..{b} do not hold shape {shape} of {dt}")
        if b > data.size:
            raise bad(f"tensor {name} ends {b - data.size} bytes past the end of the file")
        arr = data[a:b].view(_ST_DTYPES[dt])
        if dt == "BF16":  # bfloat16 is the top half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.array(arr, dtype=np.float32).reshape(shape)
    return out


def load_hf_folder(path: str | os.PathLike) -> Imported:
    d = Path(path)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{d}: no config.json (a Hugging Face model folder needs config.json and "
                          f"model.safetensors)")
    config = _read_json(cfg_path)
    tensors: dict[str, np.ndarray] = {}
    index = d / "model.safetensors.index.json"
    if (d / "model.safetensors").is_file():
        tensors = read_safetensors(d / "model.safetensors")
    elif index.is_file():
        wmap = _read_json(index).get("weight_map")
        if not isinstance(wmap, dict):
            raise FormatError(f"{index}: has no 'weight_map' object")
        for shard in sorted(set(wmap.values())):
            sp = d / shard
            if not sp.is_file():
                raise FormatError(f"{index}: shard {shard} is missing from {d}")
            tensors.update(read_safetensors(sp))
    else:
        found = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = (f" (found {found}: PyTorch pickles are not read, for safety; re-save with "
                f"save_pretrained(..., safe_serialization=True))" if found else "")
        raise FormatError(f"{d}: no model.safetensors or model.safetensors.index.json{hint}")
    tok_json = None
    if (d / "tokenizer.json").is_file():
        tok_json = (d / "tokenizer.json").read_text(encoding="utf-8")
    tok_cfg: dict[str, Any] = {}
    if (d / "tokenizer_config.json").is_file():
        raw = _read_json(d / "tokenizer_config.json")
        tok_cfg = {k: raw[k] for k in _TOKENIZER_SETTINGS if k in raw}
    if "chat_template" not in tok_cfg and (d / "chat_template.jinja").is_file():
        tok_cfg["chat_template"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
    gen = d / "generation_config.json"
    if gen.is_file():
        eos = _read_json(gen).get("eos_token_id")
        if eos is not None:
            tok_cfg["eos_token_ids"] = eos if isinstance(eos, list) else [eos]
    return Imported(config=config, tensors=tensors, tokenizer_json=tok_json, tokenizer_config=tok_cfg,
                    source=str(d))


def save_hf_folder(model: Imported, path: str | os.PathLike) -> Path:
    """Write ``model`` as a folder ``transformers`` loads as the family's own class."""
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.spec.to_hf(), indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in model.tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    if model.tokenizer_json is not None:
        (out / "tokenizer.json").write_text(model.tokenizer_json, encoding="utf-8")
    settings = {k: v for k, v in model.tokenizer_config.items() if k != "eos_token_ids"}
    if settings:
        settings.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return out
