"""Writers for model files in outside formats, built from the formats' documentation (GGUF's
spec via the ``gguf`` package's writer, llama2.c's export layouts), so importer tests start from
files made independently of rustane's readers. Weights start as Hugging Face tensors of a random
``transformers`` model, which is also the reference the imports are compared against."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def random_hf_llama(tmp: Path, *, vocab=300, dim=64, hidden=96, layers=2, heads=4, kv_heads=2,
                    tie=True, seed=0, **extra):
    """A random ``LlamaForCausalLM`` saved to ``tmp`` (safetensors); returns (model, tensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      tie_word_embeddings=tie, rms_norm_eps=1e-5, **{"max_position_embeddings": 128, **extra})
    model = LlamaForCausalLM(cfg).float().eval()
    _perturb_norms(model, seed)
    model.save_pretrained(tmp, safe_serialization=True)
    return model, hf_tensors(model)


def hf_tensors(model) -> dict:
    """The model's tensors as numpy, without the tied head (it is the embedding)."""
    t = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        t.pop("lm_head.weight", None)
    return t


def _perturb_norms(model, seed):
    import torch
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms start at ones: move them so every one matters
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def interleave_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate_half rows -> interleaved pairs (what llama.cpp and llama2.c store): row
    ``i + half*hd/2`` of a head goes to ``2i + half``."""
    hd = w.shape[0] // heads
    return w.reshape(heads, 2, hd // 2, -1).swapaxes(1, 2).reshape(w.shape)


# ---- GGUF ------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-ins for bytes (the byte-level BPE alphabet)
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_level_vocab(vocab: int) -> tuple[list[str], list[str], list[int]]:
    """``vocab`` tokens: 256 bytes, merges of common pairs, then control tokens at the end."""
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    merges = []
    for a, b in [(" ", "t"), ("h", "e"), (" t", "he"), ("i", "n"), (" ", "a"), ("e", "r"), (" ", "s"),
                 ("o", "n"), (" ", "w"), ("a", "n")]:
        ua, ub = "".join(b2u[c] for c in a.encode()), "".join(b2u[c] for c in b.encode())
        merges.append(f"{ua} {ub}")
        tokens.append(ua + ub)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    n_fill = vocab - len(tokens) - len(specials)
    tokens += [f"<unused{i}>" for i in range(n_fill)] + specials
    types = [1] * (vocab - len(specials)) + [3] * len(specials)
    return tokens, merges, types


def write_gguf(path: Path, tensors: dict, *, heads: int, kv_heads: int, eps=1e-5, theta=10000.0,
               quant: dict | None = None, arch="llama", head_dim=None, tokenizer=True,
               rope_freqs: np.ndarray | None = None, qk_interleave=True, context=128,
               raw: dict | None = None) -> None:
    """Write HF ``tensors`` as a llama.cpp-style GGUF (names, metadata, q/k row order).
    ``raw`` maps an HF name to ``(block bytes [rows, bytes per row], qtype name)`` written as is."""
    import gguf
    from gguf.quants import quantize

    quant = quant or {}
    w = gguf.GGUFWriter(str(path), arch)
    emb = tensors["model.embed_tokens.weight"]
    vocab, dim = emb.shape
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("model.layers."))
    hidden = tensors["model.layers.0.mlp.gate_proj.weight"].shape[0]
    w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(eps)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(1)
    if tokenizer:
        toks, merges, types = byte_level_vocab(vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(toks)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(vocab - 2)
        w.add_eos_token_id(vocab - 1)
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
             "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for k, v in tensors.items():
        if k in glob:
            name = glob[k]
        else:
            parts = k.split(".")
            name = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.weight"
        a = np.asarray(v, np.float32)
        if qk_interleave and arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            a = interleave_rows(a, heads if "attn_q" in name else kv_heads)
        qt = quant.get(k, "F32") if a.ndim == 2 else "F32"
        if raw and k in raw:
            data, qt = raw[k]
            w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qt])
            continue
        qtype = gguf.GGMLQuantizationType[qt]
        data = quantize(a, qtype) if qt != "F32" else np.ascontiguousarray(a)
        w.add_tensor(name, data, raw_shape=a.shape if qt in ("F32", "F16") else None, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- llama2.c --------------------------------------------------------------------------------

def write_llama2c(path: Path, tensors: dict, *, heads: int, kv_heads: int, seq_len: int, version: int) -> None:
    """llama2.c's export layouts (v0 legacy and v1, see rustane/formats/llama2c.py's docstring
    for the byte layout; written here from that description, field by field)."""
    emb = tensors["model.embed_tokens.weight"]
    vocab, dim = emb.shape
    layers = 1 + max(int(k.split(".")[2]) for k in tensors if k.startswith("model.layers."))
    hidden = tensors["model.layers.0.mlp.gate_proj.weight"].shape[0]
    shared = "lm_head.weight" not in tensors
    L = lambda n: [tensors[f"model.layers.{i}.{n}"] for i in range(layers)]  # noqa: E731
    wq = [interleave_rows(w, heads) for w in L("self_attn.q_proj.weight")]
    wk = [interleave_rows(w, kv_heads) for w in L("self_attn.k_proj.weight")]
    hd = dim // heads
    if version == 0:
        header = struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq_len)
        ang = np.arange(seq_len)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)
        order = [emb, *L("input_layernorm.weight"), *wq, *wk, *L("self_attn.v_proj.weight"),
                 *L("self_attn.o_proj.weight"), *L("post_attention_layernorm.weight"),
                 *L("mlp.gate_proj.weight"), *L("mlp.down_proj.weight"), *L("mlp.up_proj.weight"),
                 tensors["model.norm.weight"], np.cos(ang), np.sin(ang)]
    else:
        header = struct.pack("<Ii7iB", 0x616B3432, 1, dim, hidden, layers, heads, kv_heads, vocab, seq_len,
                             int(shared))
        header += b"\0" * (256 - len(header))
        order = [*L("input_layernorm.weight"), *L("post_attention_layernorm.weight"),
                 tensors["model.norm.weight"], emb, *wq, *wk, *L("self_attn.v_proj.weight"),
                 *L("self_attn.o_proj.weight"), *L("mlp.gate_proj.weight"), *L("mlp.down_proj.weight"),
                 *L("mlp.up_proj.weight")]
    if not shared:
        order.append(tensors["lm_head.weight"])
    with open(path, "wb") as f:
        f.write(header)
        for a in order:
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def write_tokenizer_bin(path: Path, pieces: list[str], scores: list[float]) -> None:
    """llama2.c's tokenizer.bin: max length, then (score, length, bytes) per token, with ``▁``
    written as a space and <s>/</s> wrapped in newlines (as llama2.c's tokenizer.py exports)."""
    out = []
    for p in pieces:
        if p == "<s>":
            p = "\n<s>\n"
        elif p == "</s>":
            p = "\n</s>\n"
        out.append(p.replace("▁", " ").encode())
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(b) for b in out)))
        for b, s in zip(out, scores):
            f.write(struct.pack("<fi", s, len(b)))
            f.write(b)


# ---- k-quant blocks (ggml's block_q4_K / block_q6_K layouts, 256 values per block) -------------

def encode_q4_k(codes: np.ndarray, sc: np.ndarray, mins: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """Blocks ``[n]`` of Q4_K from 4-bit ``codes [n, 256]``, 6-bit sub-block scales and mins
    ``[n, 8]`` and fp16 super-scales ``d``, ``dmin`` ``[n]``. Value ``i`` of sub-block ``j`` is
    ``d * sc[j] * code - dmin * mins[j]``. Layout: d, dmin (fp16), 12 bytes of packed 6-bit
    scales/mins, 128 bytes of nibbles (each 64 values: low nibbles first 32, high nibbles next)."""
    n = codes.shape[0]
    packed = np.zeros((n, 12), np.uint8)
    for j in range(4):
        packed[:, j] = (sc[:, j] & 63) | ((sc[:, j + 4] >> 4) << 6)
        packed[:, j + 4] = (mins[:, j] & 63) | ((mins[:, j + 4] >> 4) << 6)
        packed[:, j + 8] = (sc[:, j + 4] & 15) | ((mins[:, j + 4] & 15) << 4)
    c = codes.reshape(n, 4, 2, 32)
    qs = (c[:, :, 0] | (c[:, :, 1] << 4)).astype(np.uint8).reshape(n, 128)
    head = np.stack([d, dmin], axis=1).astype("<f2").view(np.uint8)
    return np.concatenate([head, packed, qs], axis=1)


def decode_q4_k_reference(codes, sc, mins, d, dmin) -> np.ndarray:
    sub = np.repeat(np.arange(8), 32)
    return (d.astype(np.float32)[:, None] * sc[:, sub] * codes
            - dmin.astype(np.float32)[:, None] * mins[:, sub]).astype(np.float32)


def encode_q6_k(codes: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Blocks of Q6_K from 6-bit ``codes [n, 256]``, int8 scales ``[n, 16]`` (one per 16 values)
    and fp16 ``d``: value = ``d * sc[i // 16] * (code - 32)``. Layout: 128 bytes of low nibbles,
    64 bytes of 2-bit high parts, 16 int8 scales, d. Each half of 128 values: value ``l`` (l < 32)
    and ``l + 64`` share low-nibble byte ``l``, ``l + 32`` and ``l + 96`` share byte ``l + 32``;
    their high bits sit at shifts 0, 4, 2, 6 of byte ``l`` of that half's qh."""
    n = codes.shape[0]
    ql = np.zeros((n, 128), np.uint8)
    qh = np.zeros((n, 64), np.uint8)
    for half in range(2):
        y = codes[:, 128 * half:128 * (half + 1)].astype(np.uint8)
        a, b, c_, e = y[:, 0:32], y[:, 32:64], y[:, 64:96], y[:, 96:128]
        ql[:, 64 * half:64 * half + 32] = (a & 15) | ((c_ & 15) << 4)
        ql[:, 64 * half + 32:64 * half + 64] = (b & 15) | ((e & 15) << 4)
        qh[:, 32 * half:32 * half + 32] = (a >> 4) | ((b >> 4) << 2) | ((c_ >> 4) << 4) | ((e >> 4) << 6)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d.astype("<f2")[:, None].view(np.uint8)],
                          axis=1)


def decode_q6_k_reference(codes, sc, d) -> np.ndarray:
    return (d.astype(np.float32)[:, None] * sc[:, np.arange(256) // 16] * (codes.astype(np.float32) - 32))
