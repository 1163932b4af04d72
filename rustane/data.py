"""Token datasets: token files, text tokenization (with a cached byte-level BPE), the built-in
story corpus, deterministic batch sampling, and a held-out validation split.

Token files use the llama2.c / nanoGPT layout: a flat array of little-endian token ids with no
header, ``uint16`` when the vocabulary fits (``vocab_size <= 65536``), else ``uint32``. They are
memory-mapped, never read whole.

Entry point: ``open_dataset(source, cfg)`` returns a ``TokenData`` (train and validation token
arrays plus the tokenizer when one is known). ``source`` is

- ``None`` or ``"builtin"``: the built-in story corpus (``rustane.corpus``), tokenized with a BPE
  trained on it and cached in the user cache dir (``$RUSTANE_CACHE``, else
  ``$XDG_CACHE_HOME/rustane``, else ``~/.cache/rustane``);
- a ``.bin`` token file;
- a text file or a folder of ``.txt`` files, tokenized with ``tokenizer`` (a ``tokenizer.json``
  path) or, when none is given, a byte-level BPE of the config's vocab size trained on the text;
  the tokenizer and the token ids are cached in the user cache dir under ``text/`` (key: content
  hash + vocab size), never beside the text.

Every problem (missing file, empty folder, ids out of range, a file too short for one sequence,
a byte count that is not a whole number of ids) raises ``DataError`` before training starts,
naming the file and the fix.

Sampling: ``BatchSampler`` draws uniformly random windows from a seeded ``numpy`` PCG64
generator; ``state_dict()`` (JSON-safe) captures the generator state and a cursor, so a resumed
run draws exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

__all__ = [
    "DataError", "TokenData", "BatchSampler", "token_dtype", "write_tokens", "read_tokens",
    "check_tokens", "train_bpe", "load_tokenizer", "tokenize_texts", "open_dataset",
    "builtin_corpus", "cache_dir", "download_tinystories", "EOT",
]

EOT = "<|endoftext|>"  # document separator, id 0 in tokenizers trained here


from rustane.errors import DataError  # noqa: E402  (bad training data; the message names file and fix)


# ---------------------------------------------------------------------------------------------
# token files

def token_dtype(vocab_size: int) -> np.dtype:
    """On-disk id dtype for a vocabulary: uint16 up to 65536 ids, uint32 beyond."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _atomic_write_bytes(path: Path, writer) -> None:
    """Write via a temp file in the same directory, fsync, rename (readers never see a part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_tokens(path: str | os.PathLike, ids: Sequence[int] | np.ndarray, vocab_size: int) -> Path:
    """Write ids as a flat little-endian token file (atomically). Checks ids < vocab_size."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise DataError(f"write_tokens: expected a 1-D id array, got shape {arr.shape}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        raise DataError(f"write_tokens {path}: ids must lie in [0, {vocab_size}), got "
                        f"min {int(arr.min())} max {int(arr.max())}")
    out = np.ascontiguousarray(arr, dtype=token_dtype(vocab_size))
    _atomic_write_bytes(Path(path), lambda f: f.write(out.tobytes()))
    return Path(path)


def read_tokens(path: str | os.PathLike, vocab_size: int, *, min_tokens: int = 0,
                dtype: np.dtype | str | None = None, check_ids: bool = True) -> np.ndarray:
    """Memory-map a token file, validating size, byte count and (optionally) id range."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"token file {p} does not exist (check the --data path)")
    if p.is_dir():
        raise DataError(f"token file {p} is a directory; pass a .bin file, or a folder of .txt files")
    dt = np.dtype(dtype) if dtype is not None else token_dtype(vocab_size)
    nbytes = p.stat().st_size
    if nbytes % dt.itemsize:
        raise DataError(
            f"token file {p}: {nbytes} bytes is not a multiple of {dt.itemsize} ({dt.name} ids for "
            f"vocab_size {vocab_size}); the file is truncated or was written with another id width")
    n = nbytes // dt.itemsize
    if n < max(min_tokens, 1):
        raise DataError(f"token file {p}: too short, needs at least {max(min_tokens, 1)} tokens "
                        f"(seq_len + 1 per sequence), got {n}")
    arr = np.memmap(p, dtype=dt, mode="r")
    if check_ids:
        check_tokens(arr, vocab_size, name=str(p))
    return arr


def check_tokens(arr: np.ndarray, vocab_size: int, *, name: str = "tokens") -> None:
    """Raise if any id is >= vocab_size (scans in chunks; fine on memmaps)."""
    chunk = 1 << 24
    mx = 0
    for i in range(0, len(arr), chunk):
        mx = max(mx, int(np.max(arr[i:i + chunk])))
    if len(arr) and mx >= vocab_size:
        first = int(np.argmax(np.asarray(arr) >= vocab_size))
        raise DataError(f"{name}: token id {mx} (first bad id at position {first}) is out of range "
                        f"for vocab_size {vocab_size}; use a model config with vocab_size > {mx} "
                        f"or the tokenizer the file was made with")


# ---------------------------------------------------------------------------------------------
# tokenizers

def cache_dir() -> Path:
    """User cache directory for derived data (tokenized corpora, trained tokenizers)."""
    env = os.environ.get("RUSTANE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rustane"


def train_bpe(texts: Sequence[str], vocab_size: int):
    """Train a byte-level BPE (``tokenizers``) with ``EOT`` as id 0. Deterministic in its input."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < 257 + 1:
        raise DataError(f"train_bpe: vocab_size {vocab_size} is too small for a byte-level BPE "
                        f"(needs 256 byte tokens + {EOT}); use vocab_size >= 258")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | os.PathLike):
    """Load a Hugging Face ``tokenizer.json``."""
    from tokenizers import Tokenizer
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.exists():
        raise DataError(f"tokenizer {p} does not exist (pass a tokenizer.json file)")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"tokenizer {p} could not be loaded: {exc}") from exc


def _cached_bpe(texts: Sequence[str], vocab_size: int, cache_path: Path):
    from tokenizers import Tokenizer
    if cache_path.exists():
        try:
            return Tokenizer.from_file(str(cache_path))
        except Exception:
            pass  # a damaged cache entry is rebuilt below
    tok = train_bpe(texts, vocab_size)
    data = tok.to_str().encode()
    _atomic_write_bytes(cache_path, lambda f: f.write(data))
    return tok


def tokenize_texts(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Encode documents and join them with the EOT separator (if the tokenizer has one)."""
    sep = tokenizer.token_to_id(EOT)
    parts: list[np.ndarray] = []
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.int64))
        if sep is not None:
            parts.append(np.array([sep], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _read_texts(path: Path) -> tuple[list[str], list[Path]]:
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"data folder {path} contains no .txt files (put text in *.txt files, "
                            f"or pass a .bin token file)")
    else:
        files = [path]
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"text file {f} is not valid UTF-8 ({exc}); token files must end in .bin") from exc
    if not any(t.strip() for t in texts):
        raise DataError(f"data path {path}: the text is empty")
    return texts, files


def _hash_texts(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# datasets

@dataclass
class TokenData:
    """Train/validation token arrays (1-D, uint16/uint32, possibly memmaps) and provenance."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    seq_len: int
    source: str
    tokenizer: Any = None  # tokenizers.Tokenizer when known
    tokenizer_path: Path | None = None

    def sampler(self, seed: int) -> "BatchSampler":
        return BatchSampler(self.train, self.seq_len, seed)

    def val_batches(self, batch_size: int = 1, max_batches: int | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Deterministic validation batches: consecutive non-overlapping windows of the split."""
        return val_batches(self.val, self.seq_len, batch_size, max_batches)

    def describe(self) -> str:
        return (f"{self.source}: {len(self.train):,} train + {len(self.val):,} val tokens, "
                f"vocab {self.vocab_size}")


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int = 1,
                max_batches: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Windows ``[i·S, i·S + S]`` in order, grouped into batches ``(x [B, S], y [B, S])`` int32."""
    n_win = (len(tokens) - 1) // seq_len
    n_batches = n_win // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        xs, ys = [], []
        for k in range(batch_size):
            s = (b * batch_size + k) * seq_len
            w = np.asarray(tokens[s:s + seq_len + 1], dtype=np.int32)
            xs.append(w[:-1])
            ys.append(w[1:])
        yield np.stack(xs), np.stack(ys)


class BatchSampler:
    """Uniformly random training windows, reproducible from ``seed`` and resumable.

    ``next()`` returns ``(x [S], y [S])`` int32 with ``y`` the next-token targets;
    ``next_batch(B)`` stacks ``B`` of them. ``cursor`` counts windows drawn so far.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        if len(tokens) < seq_len + 1:
            raise DataError(f"training split too short: needs at least {seq_len + 1} tokens "
                            f"(seq_len + 1), got {len(tokens)}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = int(seed)
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.cursor = 0

    def _window(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        w = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)
        return w[:-1], w[1:]

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        # start in [0, n - S - 1] so the target window (start+1 .. start+S) is inside the data
        start = int(self.rng.integers(0, len(self.tokens) - self.seq_len))
        self.cursor += 1
        return self._window(start)

    def next_batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = [self.next() for _ in range(batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: generator state (big ints kept as decimal strings), seed, cursor."""
        st = self.rng.bit_generator.state
        return {"seed": self.seed, "cursor": self.cursor, "bit_generator": st["bit_generator"],
                "state": {k: str(v) for k, v in st["state"].items()},
                "has_uint32": int(st["has_uint32"]), "uinteger": int(st["uinteger"]),
                "n_tokens": int(len(self.tokens)), "seq_len": self.seq_len}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("bit_generator") != "PCG64":
            raise DataError(f"sampler state: unsupported generator {d.get('bit_generator')!r}")
        if d.get("n_tokens") not in (None, len(self.tokens)) or d.get("seq_len") not in (None, self.seq_len):
            raise DataError(f"sampler state was saved for {d.get('n_tokens')} training tokens at "
                            f"seq_len {d.get('seq_len')}, but this dataset has {len(self.tokens)} "
                            f"at seq_len {self.seq_len}; resume with the same data and config")
        self.seed = int(d["seed"])
        self.cursor = int(d["cursor"])
        self.rng.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {k: int(v) for k, v in d["state"].items()},
            "has_uint32": int(d["has_uint32"]), "uinteger": int(d["uinteger"]),
        }


def _split(tokens: np.ndarray, seq_len: int, val_fraction: float, name: str
           ) -> tuple[np.ndarray, np.ndarray]:
    need = 2 * (seq_len + 1)
    if len(tokens) < need:
        raise DataError(f"{name}: too short to hold one training and one validation sequence: "
                        f"needs at least {need} tokens (2 x (seq_len + 1)), got {len(tokens)}")
    n_val = max(int(len(tokens) * val_fraction), seq_len + 1)
    n_val = min(n_val, len(tokens) - (seq_len + 1))
    cut = len(tokens) - n_val
    return tokens[:cut], tokens[cut:]


def builtin_corpus(vocab_size: int, *, n_stories: int = 10000, seed: int = 0,
                   root: str | os.PathLike | None = None) -> tuple[np.ndarray, Any, Path]:
    """The generated story corpus as token ids, with its BPE tokenizer (both cached).

    Returns ``(tokens (memmap), tokenizer, tokenizer_path)``. The cache key covers the grammar
    version, story count, seed and vocab size; files are written atomically so concurrent or
    interrupted runs never see half a file.
    """
    from rustane.corpus import GRAMMAR_VERSION, generate_stories
    base = Path(root) if root is not None else cache_dir()
    d = base / f"builtin-g{GRAMMAR_VERSION}-n{n_stories}-s{seed}-v{vocab_size}"
    tok_path, bin_path = d / "tokenizer.json", d / "tokens.bin"
    if tok_path.exists() and bin_path.exists():
        try:
            tok = load_tokenizer(tok_path)
            return read_tokens(bin_path, vocab_size), tok, tok_path
        except DataError:
            pass  # damaged cache: rebuild
    stories = generate_stories(n_stories, seed)
    tok = _cached_bpe(stories, vocab_size, tok_path)
    ids = tokenize_texts(tok, stories)
    write_tokens(bin_path, ids, vocab_size)
    return read_tokens(bin_path, vocab_size), tok, tok_path


def open_dataset(source: str | os.PathLike | None, cfg, *, val_fraction: float = 0.05,
                 val_path: str | os.PathLike | None = None,
                 tokenizer: str | os.PathLike | None = None,
                 n_stories: int = 10000, cache: str | os.PathLike | None = None) -> TokenData:
    """Open training data for model config ``cfg`` (uses ``cfg.vocab_size`` and ``cfg.seq_len``).

    The validation split is ``val_path`` (a token file) when given, else the last
    ``val_fraction`` of the tokens (at least one sequence).
    """
    V, S = cfg.vocab_size, cfg.seq_len
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tok_obj, tok_path = None, None
    if source is None or str(source) == "builtin":
        tokens, tok_obj, tok_path = builtin_corpus(V, n_stories=n_stories, root=cache)
        name = f"built-in stories ({n_stories})"
    else:
        p = Path(source)
        name = str(p)
        if p.suffix == ".bin":
            tokens = read_tokens(p, V, min_tokens=S + 1)
        else:
            texts, _ = _read_texts(p)
            key = _hash_texts(texts)
            if tokenizer is not None:
                tok_obj = load_tokenizer(tokenizer)
                tok_path = Path(tokenizer)
                if tok_obj.get_vocab_size() > V:
                    raise DataError(f"tokenizer {tokenizer} has {tok_obj.get_vocab_size()} ids but "
                                    f"the model's vocab_size is {V}; raise vocab_size")
                tkey = hashlib.sha256(tok_obj.to_str().encode()).hexdigest()[:12]
            else:
                tkey = None
            # derived files go to the user cache, keyed by the text's content hash: never into the
            # user's data folder (which may be read-only, shared, or under version control)
            where = cache_dir() / "text" if cache is None else Path(cache)
            where.mkdir(parents=True, exist_ok=True)
            if tok_obj is None:
                tok_path = where / f"{p.name}-bpe-v{V}-{key}.json"
                tok_obj = _cached_bpe(texts, V, tok_path)
                tkey = "bpe"
            bin_path = where / f"{p.name}-tokens-v{V}-{key}-{tkey}.bin"
            if not bin_path.exists():
                write_tokens(bin_path, tokenize_texts(tok_obj, texts), V)
            tokens = read_tokens(bin_path, V, min_tokens=S + 1)
    if val_path is not None:
        train = tokens
        val = read_tokens(val_path, V, min_tokens=S + 1)
        if len(train) < S + 1:
            raise DataError(f"{name}: needs at least {S + 1} tokens, got {len(train)}")
    else:
        train, val = _split(tokens, S, val_fraction, name)
    return TokenData(train=train, val=val, vocab_size=V, seq_len=S, source=name,
                     tokenizer=tok_obj, tokenizer_path=tok_path)


def download_tinystories(dest: str | os.PathLike, *, vocab: int = 32000) -> Path:  # pragma: no cover
    """Download pretokenized TinyStories (llama2.c 32K tokenizer; ~1 GB archive, network).

    Optional convenience for users with a network; nothing in rustane needs it. Extracts the
    first shard as ``dest/tinystories_data00.bin`` (uint16, ~20.7M tokens).
    """
    import io
    import tarfile
    import urllib.request
    url = ("https://huggingface.co/datasets/enio/TinyStories/resolve/main/"
           f"tok{vocab}/TinyStories_tok{vocab}.tar.gz")
    out = Path(dest) / "tinystories_data00.bin"
    if out.exists():
        return out
    with urllib.request.urlopen(url) as r:  # noqa: S310 - fixed https URL
        with tarfile.open(fileobj=io.BufferedReader(r), mode="r|gz") as tf:
            for m in tf:
                if m.name.endswith("data00.bin"):
                    f = tf.extractfile(m)
                    assert f is not None
                    data = f.read()
                    _atomic_write_bytes(out, lambda w: w.write(data))
                    return out
    raise DataError(f"{url}: archive has no data00.bin")
