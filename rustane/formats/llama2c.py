"""Import a llama2.c checkpoint (``.bin``) with its ``tokenizer.bin``.

Layouts (all little-endian, weights fp32, linear weights ``[out, in]`` row-major):

- v0 (legacy, no magic): seven int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads,
  vocab_size, seq_len`` (a negative vocab_size means the classifier is NOT shared with the
  embedding), then ``tok_embeddings``, every layer's attention norm, wq, wk, wv, wo, every
  layer's ffn norm, w1 (gate), w2 (down), w3 (up), the final norm, the two obsolete RoPE tables
  (``seq_len * head_dim / 2`` floats each), then the classifier when not shared.
- v1: uint32 magic ``0x616b3432`` ("ak42"), int32 version 1, the seven int32 parameters,
  uint8 shared_classifier, zero padding to 256 bytes; then every attention norm, every ffn
  norm, the final norm, tok_embeddings, wq..., wk..., wv..., wo..., w1..., w2..., w3..., and
  the classifier when not shared.

Version 2 (Q8_0) is not read. llama2.c rotates interleaved pairs, so wq/wk rows are put back in
Hugging Face order. ``tokenizer.bin``: int32 max_token_length, then per token float32 score,
int32 byte length, the UTF-8 bytes (llama2.c writes SentencePiece's ``▁`` as a space and
``<s>``/``</s>`` wrapped in newlines).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from rustane.models.llama.params import permute_for_hf
from rustane.formats.arch import FormatError, Imported
from rustane.formats.vocab import sentencepiece_bpe

__all__ = ["load_llama2c", "read_tokenizer_bin", "MAGIC"]

MAGIC = 0x616B3432
_HEADER_V1 = 256


def _layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {"att_norm": p + "input_layernorm.weight", "ffn_norm": p + "post_attention_layernorm.weight",
            "wq": p + "self_attn.q_proj.weight", "wk": p + "self_attn.k_proj.weight",
            "wv": p + "self_attn.v_proj.weight", "wo": p + "self_attn.o_proj.weight",
            "w1": p + "mlp.gate_proj.weight", "w2": p + "mlp.down_proj.weight",
            "w3": p + "mlp.up_proj.weight"}


def _order(version: int, n_layers: int, shared: bool) -> list[str]:
    """Tensor keys in file order ("L.key" per layer, or a global name)."""
    per = lambda k: [f"{i}.{k}" for i in range(n_layers)]  # noqa: E731
    if version == 0:
        keys = ["embed"] + per("att_norm") + per("wq") + per("wk") + per("wv") + per("wo") \
            + per("ffn_norm") + per("w1") + per("w2") + per("w3") + ["norm", "freq_real", "freq_imag"]
    else:
        keys = per("att_norm") + per("ffn_norm") + ["norm", "embed"] + per("wq") + per("wk") \
            + per("wv") + per("wo") + per("w1") + per("w2") + per("w3")
    return keys if shared else keys + ["lm_head"]


def load_llama2c(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Imported:
    p = Path(path)
    raw = p.read_bytes()
    if len(raw) < 28:
        raise FormatError(f"{p}: {len(raw)} bytes is too short for a llama2.c checkpoint header")
    (magic,) = struct.unpack_from("<I", raw, 0)
    if magic == MAGIC:
        (version,) = struct.unpack_from("<i", raw, 4)
        if version != 1:
            raise FormatError(f"{p}: llama2.c format version {version} is not supported (fp32 v0 "
                              f"and v1 are); re-export with llama2.c's export.py --version 1")
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack_from("<7i", raw, 8)
        shared = bool(raw[36])
        offset = _HEADER_V1
    else:
        version = 0
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq = struct.unpack_from("<7i", raw, 0)
        shared = vocab > 0
        vocab = abs(vocab)
        offset = 28
    params = (dim, hidden, n_layers, n_heads, n_kv, vocab, seq)
    if min(params) <= 0 or n_heads % n_kv or dim % n_heads or max(params) > 1 << 20:
        raise FormatError(f"{p}: header {dict(zip(('dim', 'hidden_dim', 'n_layers', 'n_heads', 'n_kv_heads', 'vocab_size', 'seq_len'), params))} "
                          f"is not a valid llama2.c model (not a llama2.c .bin, or corrupted)")
    hd = dim // n_heads
    shapes = {"embed": (vocab, dim), "norm": (dim,), "lm_head": (vocab, dim),
              "freq_real": (seq * hd // 2,), "freq_imag": (seq * hd // 2,),
              "att_norm": (dim,), "ffn_norm": (dim,), "wq": (dim, dim), "wk": (n_kv * hd, dim),
              "wv": (n_kv * hd, dim), "wo": (dim, dim), "w1": (hidden, dim), "w2": (dim, hidden),
              "w3": (hidden, dim)}
    keys = _order(version, n_layers, shared)
    need = offset + 4 * sum(int(np.prod(shapes[k.split(".")[-1]])) for k in keys)
    if len(raw) != need:
        raise FormatError(f"{p}: {len(raw)} bytes, but a v{version} llama2.c checkpoint with this "
                          f"header holds exactly {need} ({'truncated' if len(raw) < need else 'trailing data'}: "
                          f"the file is damaged, or not this format)")
    tensors: dict[str, np.ndarray] = {}
    globals_ = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    for k in keys:
        layer, _, name = k.rpartition(".")
        shape = shapes[name]
        n = int(np.prod(shape))
        w = np.frombuffer(raw, dtype="<f4", count=n, offset=offset).reshape(shape).astype(np.float32)
        offset += 4 * n
        if name in ("freq_real", "freq_imag"):
            continue
        if name in ("wq", "wk"):
            w = permute_for_hf(w, n_heads if name == "wq" else n_kv)
        tensors[globals_[name] if not layer else _layer_names(int(layer))[name]] = w
    config = {"model_type": "llama", "hidden_size": dim, "intermediate_size": hidden,
              "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
              "head_dim": hd, "vocab_size": vocab, "max_position_embeddings": seq, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": shared}
    tok_path = Path(tokenizer) if tokenizer is not None else p.parent / "tokenizer.bin"
    tok_json, settings = None, {}
    if tokenizer is not None or tok_path.is_file():
        tok_json = read_tokenizer_bin(tok_path, vocab)
        settings = {"bos_token": "<s>", "eos_token": "</s>", "eos_token_ids": [2], "add_bos_token": True}
    return Imported(config=config, tensors=tensors, tokenizer_json=tok_json, tokenizer_config=settings,
                    source=str(p))


def read_tokenizer_bin(path: str | os.PathLike, vocab_size: int) -> str:
    """llama2.c's ``tokenizer.bin`` (``vocab_size`` entries) as a ``tokenizer.json`` string."""
    p = Path(path)
    if not p.is_file():
        raise FormatError(f"{p}: tokenizer.bin not found (llama2.c ships it beside run.c; pass its path)")
    raw = p.read_bytes()
    pieces, scores, off = [], [], 4
    try:
        for _ in range(vocab_size):
            score, n = struct.unpack_from("<fi", raw, off)
            if not 0 <= n <= 1024:
                raise FormatError(f"{p}: token {len(pieces)} claims {n} bytes (corrupted tokenizer.bin)")
            piece = raw[off + 8:off + 8 + n].decode("utf-8")
            if len(piece.encode()) != n:
                raise struct.error("short read")
            off += 8 + n
            pieces.append(piece)
            scores.append(score)
    except (struct.error, UnicodeDecodeError) as exc:
        raise FormatError(f"{p}: truncated or corrupted after {len(pieces)} of {vocab_size} tokens "
                          f"({exc}); is it the tokenizer of this model?") from exc
    fixed = {"\n<s>\n": "<s>", "\n</s>\n": "</s>"}
    pieces = [fixed.get(s, s.replace(" ", "▁")) for s in pieces]
    return sentencepiece_bpe(pieces, scores, unk_id=0, bos_id=1, add_bos=True)
