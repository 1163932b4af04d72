"""Build a Hugging Face ``tokenizers`` tokenizer from a bare vocabulary.

GGUF files and llama2.c's ``tokenizer.bin`` carry a vocabulary, not a ``tokenizer.json``. Two
kinds exist:

- byte-level BPE (GPT-2 style: SmolLM2, Llama 3, Qwen3): tokens, merges, and a pre-tokenizer
  named by GGUF's ``tokenizer.ggml.pre`` (which regex splits the text before BPE);
- SentencePiece BPE (Llama 2, TinyLlama, llama2.c): pieces with ``▁`` for spaces and a score
  per piece, bytes as ``<0xNN>`` pieces. SentencePiece merges the adjacent pair whose joined
  piece scores highest, which is BPE with merges ranked by the joined piece's score, so the
  merge list is derived from the scores.
"""

from __future__ import annotations

from typing import Sequence

from rustane.formats.arch import FormatError

__all__ = ["byte_level_bpe", "sentencepiece_bpe", "PRE_TOKENIZERS"]

# The split regexes of the byte-level tokenizers GGUF names (tokenizer.ggml.pre). GPT-2's own
# regex is ByteLevel's built-in one.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": "gpt2", "gpt2": "gpt2", "smollm": "digits", "starcoder": "digits",
                  "refact": "digits", "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT,
                  "qwen2": _QWEN2_SPLIT}

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers as pt
    kind = PRE_TOKENIZERS.get(pre or "default")
    if kind is None:
        raise FormatError(f"tokenizer pre-tokenizer {pre!r} is not known to rustane (known: "
                          f"{sorted(PRE_TOKENIZERS)}); use the model's Hugging Face folder, whose "
                          f"tokenizer.json spells it out")
    if kind == "gpt2":
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits":
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pt.Sequence([pt.Split(Regex(kind), behavior="isolated", invert=False),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])


def _specials(tokens: Sequence[str], types: Sequence[int] | None) -> list[str]:
    if types is None:
        return []
    return [t for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED)]


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str], *, pre: str | None,
                   types: Sequence[int] | None = None, bos_id: int | None = None,
                   add_bos: bool = False) -> str:
    """A byte-level BPE ``tokenizer.json`` string (tokens are in GPT-2's byte-to-unicode form)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise FormatError(f"tokenizer merge {m!r} is not two tokens separated by a space")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=PRE_TOKENIZERS.get(pre or "")
                               == _LLAMA3_SPLIT))
    tok.pre_tokenizer = _pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    specials = _specials(tokens, types)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def sentencepiece_bpe(pieces: Sequence[str], scores: Sequence[float], *,
                      types: Sequence[int] | None = None, unk_id: int = 0, bos_id: int | None = 1,
                      add_bos: bool = True) -> str:
    """A ``tokenizer.json`` string equivalent to a SentencePiece BPE model's pieces + scores."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    if types is None:  # llama2.c: <unk>, <s>, </s> then bytes <0x00>..<0xFF>, then pieces
        types = [BYTE if p.startswith("<0x") and p.endswith(">") and len(p) == 6 else NORMAL
                 for p in pieces]
        types = list(types)
        for i in (unk_id, bos_id, 2):
            if i is not None and i < len(types):
                types[i] = UNKNOWN if i == unk_id else CONTROL
    vocab = {p: i for i, p in enumerate(pieces)}
    mergeable = {p for p, k in zip(pieces, types) if k in (NORMAL, USER_DEFINED)}
    ranked = []
    for p in mergeable:
        for cut in range(1, len(p)):
            a, b = p[:cut], p[cut:]
            if a in mergeable and b in mergeable:
                ranked.append((-scores[vocab[p]], vocab[p], vocab[a], (a, b)))
    ranked.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[r[3] for r in ranked], unk_token=pieces[unk_id],
                               fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = [p for p, k in zip(pieces, types) if k in (CONTROL, UNKNOWN, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if add_bos and bos_id is not None:
        bos = pieces[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    return tok.to_str()
