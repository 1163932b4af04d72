"""Import a GGUF file (llama.cpp's format): metadata -> HF config, tensors dequantized to fp32,
the vocabulary -> a ``tokenizers`` JSON.

llama.cpp's converter stores a Llama's q/k projection rows in interleaved-pair RoPE order
(pairs ``(2i, 2i+1)`` of a head); Hugging Face pairs ``(i, i + head_dim/2)``. The rows are put
back in HF order here, so every importer hands out the same convention. Qwen3 GGUFs use NEOX
RoPE (HF's order already) and are not touched.

Llama 3.x GGUFs do not store ``rope_scaling``; llama.cpp keeps the per-pair frequency divisors
as a ``rope_freqs.weight`` tensor instead. The importer recognises the divisors of Meta's
published llama3 settings and refuses others.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from rustane.models.llama.params import permute_for_hf as interleaved_to_hf_rows
from rustane.formats.arch import ArchSpec, FormatError, Imported, rope_inv_freq
from rustane.formats.vocab import byte_level_bpe, sentencepiece_bpe

__all__ = ["load_gguf", "SUPPORTED_QUANTS"]

SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K",
                    "Q4_K", "Q5_K", "Q6_K")
_ARCH_FAMILY = {"llama": "llama", "qwen3": "qwen3"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_BLK = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
# Meta's published llama3 rope settings (Llama 3.1: factor 8, Llama 3.2: factor 32)
_LLAMA3_CANDIDATES = [dict(rope_type="llama3", factor=f, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192) for f in (8.0, 16.0, 32.0)]


def _open(path: Path):
    import gguf
    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # ValueError/IndexError/struct errors on a damaged file
        raise FormatError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc}); it is "
                          f"truncated or corrupted, re-download it") from exc


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    import gguf
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8", errors="surrogateescape") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def _config(reader, path: Path, tensor_names: set[str]) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCH_FAMILY:
        raise FormatError(f"{path}: GGUF architecture {arch!r} is not supported (supported: "
                          f"{sorted(_ARCH_FAMILY)})")
    a = arch + "."
    need = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count"]
    missing = [a + k for k in need if _field(reader, a + k) is None]
    if missing:
        raise FormatError(f"{path}: GGUF metadata lacks {missing}")
    n_heads = int(_field(reader, a + "attention.head_count"))
    dim = int(_field(reader, a + "embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, a + "vocab_size") or (len(tokens.data) if tokens is not None else None)
    cfg = {
        "model_type": _ARCH_FAMILY[arch],
        "hidden_size": dim, "intermediate_size": int(_field(reader, a + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, a + "block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, a + "attention.head_count_kv", n_heads)),
        "head_dim": int(_field(reader, a + "attention.key_length", dim // n_heads)),
        "vocab_size": int(vocab) if vocab else None,
        "rms_norm_eps": float(np.float32(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5))),
        "rope_theta": float(_field(reader, a + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, a + "context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    kind = _field(reader, a + "rope.scaling.type")
    if kind == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(_field(reader, a + "rope.scaling.factor"))}
    elif kind not in (None, "none"):
        raise FormatError(f"{path}: GGUF rope scaling {kind!r} is not supported (default, linear, llama3)")
    return cfg


def _llama3_scaling(cfg: dict[str, Any], freq_divisors: np.ndarray, path: Path) -> dict[str, Any]:
    base = ArchSpec.from_hf(cfg, where=str(path))
    plain = rope_inv_freq(base)
    for cand in _LLAMA3_CANDIDATES:
        spec = ArchSpec.from_hf({**cfg, "rope_scaling": cand}, where=str(path))
        if np.allclose(plain / rope_inv_freq(spec), freq_divisors, rtol=1e-3):
            return cand
    raise FormatError(f"{path}: rope_freqs.weight holds frequency divisors that match none of the "
                      f"llama3 rope settings rustane knows ({_LLAMA3_CANDIDATES}); import the "
                      f"model's Hugging Face folder instead, whose config.json names them")


def _dequantize(t, path: Path) -> np.ndarray:
    from gguf.quants import dequantize
    qtype = t.tensor_type.name
    if qtype not in SUPPORTED_QUANTS:
        raise FormatError(f"{path}: tensor {t.name} is quantized as {qtype}, which rustane does not "
                          f"import (supported: {', '.join(SUPPORTED_QUANTS)}); re-quantize the model "
                          f"with llama.cpp's llama-quantize to one of those")
    try:
        # a copy: F32 tensors come back as views of the read-only file mapping
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
    except Exception as exc:
        raise FormatError(f"{path}: tensor {t.name} ({qtype}) could not be dequantized: {exc}") from exc
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists ne0 (innermost) first
    if w.size != int(np.prod(shape)):
        raise FormatError(f"{path}: tensor {t.name} holds {w.size} values, its shape {shape} needs "
                          f"{int(np.prod(shape))} (truncated or corrupted file)")
    return w.reshape(shape)


def _tokenizer(reader, path: Path) -> tuple[str | None, dict[str, Any]]:
    model = _field(reader, "tokenizer.ggml.model")
    if model is None:
        return None, {}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    settings: dict[str, Any] = {}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        settings["chat_template"] = template
    if bos is not None:
        settings["bos_token"] = tokens[bos]
    if eos is not None:
        settings["eos_token"] = tokens[eos]
        settings["eos_token_ids"] = [int(eos)]
    if model == "gpt2":
        add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
        js = byte_level_bpe(tokens, _field(reader, "tokenizer.ggml.merges") or [],
                            pre=_field(reader, "tokenizer.ggml.pre"), types=types, bos_id=bos,
                            add_bos=add_bos)
    elif model == "llama":
        add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", True))
        js = sentencepiece_bpe(tokens, _field(reader, "tokenizer.ggml.scores"), types=types,
                               unk_id=int(_field(reader, "tokenizer.ggml.unknown_token_id", 0)),
                               bos_id=bos, add_bos=add_bos)
    else:
        raise FormatError(f"{path}: GGUF tokenizer model {model!r} is not supported (gpt2 or llama); "
                          f"use the model's Hugging Face folder with its tokenizer.json")
    settings["add_bos_token"] = add_bos
    return js, settings


def _hf_rows(w: np.ndarray, heads: int, name: str, path: Path) -> np.ndarray:
    try:
        return interleaved_to_hf_rows(w, heads)
    except ValueError as exc:
        raise FormatError(f"{path}: tensor {name} of shape {w.shape} disagrees with the metadata's "
                          f"{heads} heads ({exc})") from exc


def load_gguf(path: str | os.PathLike) -> Imported:
    p = Path(path)
    reader = _open(p)
    by_name = {t.name: t for t in reader.tensors}
    cfg = _config(reader, p, set(by_name))
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    tensors: dict[str, np.ndarray] = {}
    for name, t in by_name.items():
        if name == "rope_freqs.weight":
            cfg["rope_scaling"] = _llama3_scaling(cfg, _dequantize(t, p).ravel(), p)
            continue
        m = _BLK.match(name)
        if m and m.group(2) in _LAYER_NAMES:
            hf = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
        elif name in _GLOBAL_NAMES:
            hf = _GLOBAL_NAMES[name]
        else:
            raise FormatError(f"{p}: tensor {name!r} belongs to no part of a {cfg['model_type']} "
                              f"model rustane implements")
        w = _dequantize(t, p)
        if cfg["model_type"] == "llama" and m and m.group(2) in ("attn_q", "attn_k"):
            w = _hf_rows(w, n_heads if m.group(2) == "attn_q" else n_kv, name, p)
        tensors[hf] = w
    if cfg["vocab_size"] is None:
        cfg["vocab_size"] = tensors["model.embed_tokens.weight"].shape[0]
    tok_json, settings = _tokenizer(reader, p)
    return Imported(config=cfg, tensors=tensors, tokenizer_json=tok_json, tokenizer_config=settings,
                    source=str(p))
