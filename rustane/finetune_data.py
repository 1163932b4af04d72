"""Fine-tuning data: JSONL rows -> token rows of the kernels' fixed ``seq_len`` with a loss mask.

Sources (``open_finetune_data``):

- a folder with ``train.jsonl`` and optionally ``valid.jsonl`` and ``test.jsonl`` (mlx-lm's
  layout);
- one ``.jsonl`` file, split into train and valid by a seeded permutation (``valid_fraction``).

Each row is a JSON object in one of three formats, detected per row by its keys:

- ``{"text": ...}``: every token carries loss;
- ``{"prompt": ..., "completion": ...}``: the prompt is tokenized with the tokenizer's special
  tokens (BOS), the completion without, and the two id lists are joined (so the model sees exactly
  prompt then completion, as TRL's prompt-completion rows); with ``mask_prompt`` only the
  completion's tokens carry loss;
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered by the model's chat template
  (``rustane.chat_template``) and tokenized without added special tokens (the template writes
  them); with ``mask_prompt`` only the last assistant turn carries loss.

An end-of-sequence token follows ``text`` and ``completion`` rows, so the model learns to stop
(chat templates end each turn themselves).

Fitting rows to ``seq_len`` (``fit``):

- ``"pad"`` (default): one example per row, padded; padded positions carry no loss. Attention is
  causal, so padding after an example never changes what the example computes.
- ``"pack"``: examples are concatenated into rows (an example is never split across rows). More
  of the computed tokens carry loss, but a later example in a row attends to the earlier ones
  (the kernels' causal mask is the only mask) and its RoPE positions start where the previous one
  ended: the model is trained on contexts that contain unrelated examples.

The loss of a step is the mean over the step's loss-carrying tokens (each token counts the same,
whichever row it is in). ``loss_token_share`` reports how many computed tokens carry loss.

Every problem — bad JSON, a row that is not an object, unknown or missing keys, a non-string
field, an empty completion or conversation, a row longer than ``seq_len + 1`` tokens when
``truncate`` is off, a conversation the chat template cannot mask — raises ``FinetuneDataError``
naming the file, the line and the problem, before anything is trained or written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from rustane.chat_template import ChatTemplateError, prompt_and_full, render
from rustane.errors import DataError

__all__ = ["FinetuneDataError", "Example", "FinetuneData", "RowSampler", "read_jsonl", "row_format",
           "encode_row", "load_examples", "fit_rows", "open_finetune_data", "FORMATS"]

#: row format -> its keys
FORMATS = {"text": ("text",), "completion": ("prompt", "completion"), "chat": ("messages",)}
_FIT_MODES = ("pad", "pack")


class FinetuneDataError(DataError):
    """A bad data file or row; the message starts with ``file:line:``."""


@dataclass
class Example:
    """One tokenized row: ``ids`` and, per token, whether predicting it carries loss."""

    ids: np.ndarray  # int32 [n]
    loss: np.ndarray  # bool [n]; loss[0] is never used (nothing predicts the first token)
    where: str  # "file:line"


@dataclass
class Tokenization:
    """What rows are encoded with: a ``tokenizers.Tokenizer`` and the model's tokenizer settings."""

    tokenizer: Any
    settings: Mapping[str, Any] = field(default_factory=dict)  # tokenizer_config (chat template, ...)
    eos_id: int | None = None

    @classmethod
    def of_model(cls, imported) -> "Tokenization":
        """From a ``rustane.formats.Imported`` (or anything with its tokenizer fields)."""
        tok = imported.tokenizer()
        if tok is None:
            raise FinetuneDataError("the model carries no tokenizer; fine-tuning on text needs the model's own "
                                    "tokenizer (import a model folder or GGUF that has one)")
        eos = imported.eos_ids
        return cls(tok, dict(imported.tokenizer_config), int(eos[0]) if eos else None)


# ---- reading rows ---------------------------------------------------------------------------------

def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line; bad JSON raises naming the line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FinetuneDataError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise FinetuneDataError(f"{p}: cannot read ({exc.strerror or exc})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise FinetuneDataError(f"{p}:{n}: bad JSON ({exc.msg} at column {exc.colno})") from None
    return rows


def row_format(row: Any, where: str) -> str:
    """The format of ``row`` ("text", "completion" or "chat"), or an error naming what is wrong."""
    if not isinstance(row, dict):
        raise FinetuneDataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    keys = set(row)
    for fmt, need in FORMATS.items():
        if keys == set(need):
            return fmt
    known = {k for need in FORMATS.values() for k in need}
    unknown = sorted(keys - known)
    expected = "; ".join("{" + ", ".join(f'"{k}"' for k in need) + "}" for need in FORMATS.values())
    if unknown:
        raise FinetuneDataError(f"{where}: unknown keys {', '.join(map(repr, unknown))}; a row is one of {expected}")
    raise FinetuneDataError(f"{where}: keys {sorted(keys)} match no format; a row is one of {expected}")


def _string(row: Mapping, key: str, where: str, allow_empty: bool = True) -> str:
    v = row[key]
    if not isinstance(v, str):
        raise FinetuneDataError(f"{where}: \"{key}\" must be a string, got {type(v).__name__}")
    if not allow_empty and not v:
        raise FinetuneDataError(f"{where}: empty \"{key}\" (nothing to train on)")
    return v


def _messages(row: Mapping, where: str) -> list[dict]:
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise FinetuneDataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FinetuneDataError(f"{where}: messages[{i}] must be an object with string \"role\" and \"content\"")
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"]:
        raise FinetuneDataError(f"{where}: the last message must be a non-empty 'assistant' turn (the one trained)")
    return msgs


def encode_row(row: Mapping, fmt: str, tk: Tokenization, where: str, mask_prompt: bool) -> Example:
    """Tokenize one row of a known format."""
    tok = tk.tokenizer
    eos = [] if tk.eos_id is None else [tk.eos_id]
    if fmt == "text":
        ids = tok.encode(_string(row, "text", where, allow_empty=False), add_special_tokens=True).ids + eos
        loss = [True] * len(ids)
    elif fmt == "completion":
        p = tok.encode(_string(row, "prompt", where), add_special_tokens=True).ids
        c = tok.encode(_string(row, "completion", where, allow_empty=False), add_special_tokens=False).ids + eos
        ids = p + c
        loss = [not mask_prompt] * len(p) + [True] * len(c)
    else:
        template = tk.settings.get("chat_template")
        if not template:
            raise FinetuneDataError(f"{where}: \"messages\" rows need the model's chat template, and this model has "
                                    f"none; use {{\"prompt\", \"completion\"}} rows")
        msgs = _messages(row, where)
        try:
            if mask_prompt:
                prompt, full = prompt_and_full(template, msgs, tk.settings)
            else:
                prompt, full = "", render(template, msgs, tk.settings)
        except ChatTemplateError as exc:
            raise FinetuneDataError(f"{where}: {exc}") from None
        enc = tok.encode(full, add_special_tokens=False)
        ids = list(enc.ids)
        # a token carries loss when it ends past the prompt's text (a token straddling the
        # boundary is predicted from the prompt and belongs to the answer)
        cut = len(prompt)
        loss = [end > cut for _, end in enc.offsets] if mask_prompt else [True] * len(ids)
    if len(ids) < 2 or not any(loss[1:]):
        raise FinetuneDataError(f"{where}: no token carries loss (the row encodes to {len(ids)} tokens)")
    return Example(np.asarray(ids, dtype=np.int32), np.asarray(loss, dtype=bool), where)


def load_examples(path: str | os.PathLike, tk: Tokenization, seq_len: int, *, mask_prompt: bool = False,
                  truncate: bool = False) -> list[Example]:
    """Every row of a JSONL file, tokenized and checked against ``seq_len``."""
    p = Path(path)
    out = []
    for n, row in read_jsonl(p):
        where = f"{p}:{n}"
        ex = encode_row(row, row_format(row, where), tk, where, mask_prompt)
        if ex.ids.size > seq_len + 1:
            if not truncate:
                raise FinetuneDataError(f"{where}: the row is {ex.ids.size} tokens; --seq-len {seq_len} takes at most "
                                        f"{seq_len + 1} (inputs plus the last target): raise --seq-len, shorten the row, "
                                        f"or pass --truncate")
            ex = Example(ex.ids[:seq_len + 1], ex.loss[:seq_len + 1], where)
            if not ex.loss[1:].any():
                raise FinetuneDataError(f"{where}: after truncation to {seq_len + 1} tokens no token carries loss "
                                        f"(the prompt fills the sequence); raise --seq-len")
        out.append(ex)
    if not out:
        raise FinetuneDataError(f"{p}: no rows")
    return out


# ---- fitting to seq_len ---------------------------------------------------------------------------

def fit_rows(examples: Sequence[Example], seq_len: int, fit: str = "pad", pad_id: int = 0) -> np.ndarray:
    """Rows ``[n, 3, seq_len]`` int32 of (inputs, targets, loss 0/1)."""
    if fit not in _FIT_MODES:
        raise ValueError(f"--fit must be one of {', '.join(_FIT_MODES)}, got {fit!r}")
    S = seq_len
    pieces = []  # per example: (x, y, w) of length len(ids) - 1
    for ex in examples:
        pieces.append((ex.ids[:-1], ex.ids[1:], ex.loss[1:]))
    rows: list[list[tuple]] = []
    if fit == "pad":
        rows = [[p] for p in pieces]
    else:
        cur, used = [], 0
        for p in pieces:
            if used + len(p[0]) > S and cur:
                rows.append(cur)
                cur, used = [], 0
            cur.append(p)
            used += len(p[0])
        if cur:
            rows.append(cur)
    out = np.zeros((len(rows), 3, S), dtype=np.int32)
    out[:, 0, :] = pad_id
    out[:, 1, :] = pad_id
    for i, parts in enumerate(rows):
        c = 0
        for x, y, w in parts:
            n = len(x)
            out[i, 0, c:c + n], out[i, 1, c:c + n], out[i, 2, c:c + n] = x, y, w
            c += n
    return out


# ---- the data set ---------------------------------------------------------------------------------

class RowSampler:
    """Rows in a seeded random order, epoch after epoch; ``state_dict`` resumes exactly."""

    def __init__(self, n_rows: int, seed: int):
        self.n, self.seed = n_rows, int(seed)
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.n)

    def next_indices(self, k: int) -> np.ndarray:
        out = []
        for _ in range(k):
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            out.append(int(self._order[self.pos]))
            self.pos += 1
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"kind": "rows", "n": self.n, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, st: Mapping) -> None:
        if st.get("kind") != "rows" or int(st["n"]) != self.n:
            raise ValueError(f"data sampler state is for {st.get('n')} rows, this data has {self.n}: "
                             f"resume with the same --data, --seq-len and --fit")
        self.seed, self.epoch, self.pos = int(st["seed"]), int(st["epoch"]), int(st["pos"])
        self._order = self._perm(self.epoch)


@dataclass
class FinetuneData:
    """Fitted rows of each split (``[n, 3, seq_len]``: inputs, targets, loss 0/1)."""

    seq_len: int
    fit: str
    train: np.ndarray
    valid: np.ndarray | None = None
    test: np.ndarray | None = None
    sources: dict[str, str] = field(default_factory=dict)

    def sampler(self, seed: int) -> RowSampler:
        return RowSampler(len(self.train), seed)

    def batch(self, rows: np.ndarray, idx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = rows[np.asarray(idx)]
        return r[:, 0].copy(), r[:, 1].copy(), r[:, 2].astype(np.float32)

    def batches(self, split: str = "valid", batch_size: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        rows = getattr(self, split)
        if rows is None:
            return
        for i in range(0, len(rows), batch_size):
            yield self.batch(rows, np.arange(i, min(i + batch_size, len(rows))))

    def loss_token_share(self, split: str = "train") -> float:
        rows = getattr(self, split)
        return float(rows[:, 2].sum()) / rows[:, 2].size

    def loss_tokens(self, split: str = "train") -> int:
        return int(getattr(self, split)[:, 2].sum())


def open_finetune_data(path: str | os.PathLike, tk: Tokenization, seq_len: int, *, mask_prompt: bool = False,
                       truncate: bool = False, fit: str = "pad", valid_fraction: float = 0.1,
                       split_seed: int = 0) -> FinetuneData:
    """Read, tokenize, validate and fit a data folder or a single ``.jsonl`` (see module doc)."""
    if fit not in _FIT_MODES:
        raise FinetuneDataError(f"--fit must be one of {', '.join(_FIT_MODES)}, got {fit!r}")
    p = Path(path)
    pad = tk.eos_id if tk.eos_id is not None else 0
    kw = dict(mask_prompt=mask_prompt, truncate=truncate)
    if p.is_dir():
        if not (p / "train.jsonl").is_file():
            raise FinetuneDataError(f"{p}: a data folder needs train.jsonl (and valid.jsonl, optionally test.jsonl)")
        splits = {}
        for name in ("train", "valid", "test"):
            f = p / f"{name}.jsonl"
            if f.is_file():
                splits[name] = fit_rows(load_examples(f, tk, seq_len, **kw), seq_len, fit, pad)
        return FinetuneData(seq_len, fit, splits["train"], splits.get("valid"), splits.get("test"),
                            {k: str(p / f"{k}.jsonl") for k in splits})
    if not p.is_file():
        raise FinetuneDataError(f"{p}: no such file or folder (pass a folder with train.jsonl, or a .jsonl file)")
    if p.suffix != ".jsonl":
        raise FinetuneDataError(f"{p}: expected a .jsonl file or a folder with train.jsonl")
    if not 0 <= valid_fraction < 1:
        raise FinetuneDataError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    examples = load_examples(p, tk, seq_len, **kw)
    n_valid = math.ceil(len(examples) * valid_fraction) if valid_fraction > 0 else 0
    if n_valid >= len(examples):
        raise FinetuneDataError(f"{p}: {len(examples)} rows are too few to split off a validation set; add rows "
                                f"or pass --valid-fraction 0")
    order = np.random.Generator(np.random.PCG64(split_seed)).permutation(len(examples))
    valid_idx, train_idx = sorted(order[:n_valid]), sorted(order[n_valid:])
    train = fit_rows([examples[i] for i in train_idx], seq_len, fit, pad)
    valid = fit_rows([examples[i] for i in valid_idx], seq_len, fit, pad) if n_valid else None
    return FinetuneData(seq_len, fit, train, valid, None, {"train": str(p), "valid": str(p)})
