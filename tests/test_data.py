from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rustane import data as D
from rustane.config import preset
from rustane.corpus import corpus_text, generate_stories


# ---- corpus ----

def test_corpus_deterministic_and_varied():
    a, b = generate_stories(50, seed=3), generate_stories(50, seed=3)
    assert a == b
    assert generate_stories(50, seed=4) != a
    assert len(set(a)) == 50  # no duplicate stories
    words = set(" ".join(a).split())
    assert 150 < len(words) < 2000
    assert corpus_text(2, 3) == a[0] + "\n\n" + a[1] + "\n"


# ---- token files ----

@settings(max_examples=25)
@given(st.lists(st.integers(0, 70000), max_size=200), st.sampled_from([70001, 1 << 20]))
def test_token_file_round_trip_uint32(tmp_path_factory, ids, vocab):
    p = tmp_path_factory.mktemp("t") / "x.bin"
    D.write_tokens(p, ids, vocab)
    assert p.stat().st_size == 4 * len(ids)
    if ids:
        got = D.read_tokens(p, vocab)
        assert got.dtype == np.dtype("<u4") and got.tolist() == ids


def test_token_file_uint16_layout_and_mmap(tmp_path):
    ids = [0, 1, 65535, 258, 7]
    p = D.write_tokens(tmp_path / "a.bin", ids, 65536)
    # independent check of the on-disk bytes: little-endian uint16, no header
    assert p.read_bytes() == b"".join(i.to_bytes(2, "little") for i in ids)
    got = D.read_tokens(p, 65536)
    assert isinstance(got, np.memmap) and got.dtype == np.dtype("<u2") and got.tolist() == ids
    assert D.token_dtype(65536) == np.uint16 and D.token_dtype(65537) == np.uint32


def test_token_file_errors(tmp_path):
    with pytest.raises(D.DataError, match=r"token file .*missing.bin does not exist"):
        D.read_tokens(tmp_path / "missing.bin", 512)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x00\x02")
    with pytest.raises(D.DataError, match=r"odd.bin: 3 bytes is not a multiple of 2"):
        D.read_tokens(odd, 512)
    six = tmp_path / "six.bin"
    six.write_bytes(bytes(6))
    with pytest.raises(D.DataError, match=r"six.bin: 6 bytes is not a multiple of 4 \(uint32"):
        D.read_tokens(six, 100000)
    big = D.write_tokens(tmp_path / "big.bin", [1, 2, 700, 3], 1000)
    with pytest.raises(D.DataError, match=r"big.bin: token id 700 .*position 2.*vocab_size 512"):
        D.read_tokens(big, 512, dtype=np.uint16)
    with pytest.raises(D.DataError, match=r"too short, needs at least 65 tokens .* got 4"):
        D.read_tokens(big, 1000, min_tokens=65)
    with pytest.raises(D.DataError, match=r"ids must lie in \[0, 10\)"):
        D.write_tokens(tmp_path / "w.bin", [3, 10], 10)
    with pytest.raises(D.DataError, match="is a directory"):
        D.read_tokens(tmp_path, 10)


def test_open_dataset_errors(tmp_path):
    cfg = preset("tiny")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match=r"empty contains no .txt files"):
        D.open_dataset(tmp_path / "empty", cfg)
    with pytest.raises(D.DataError, match="does not exist"):
        D.open_dataset(tmp_path / "nope.txt", cfg)
    n = cfg.seq_len + 36  # room for one sequence, not for one train + one val sequence
    short = D.write_tokens(tmp_path / "short.bin", np.arange(n) % 50, cfg.vocab_size)
    with pytest.raises(D.DataError, match=rf"needs at least {2 * (cfg.seq_len + 1)} tokens .* got {n}"):
        D.open_dataset(short, cfg)
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(D.DataError, match="text is empty"):
        D.open_dataset(tmp_path / "blank.txt", cfg)


# ---- sampling ----

def _tokens(n=5000, vocab=300, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


def test_sampler_windows_and_determinism():
    toks = _tokens()
    a, b = D.BatchSampler(toks, 32, seed=7), D.BatchSampler(toks, 32, seed=7)
    xa, ya = a.next_batch(4)
    xb, yb = b.next_batch(4)
    np.testing.assert_array_equal(xa, xb)
    assert xa.dtype == np.int32 and xa.shape == (4, 32)
    np.testing.assert_array_equal(xa[:, 1:], ya[:, :-1])
    for x, y in zip(xa, ya):  # each window is a real slice of the data
        starts = [s for s in range(len(toks) - 32) if np.array_equal(toks[s:s + 32], x)]
        assert starts and np.array_equal(toks[starts[0] + 1:starts[0] + 33], y)
    c = D.BatchSampler(toks, 32, seed=8)
    assert not np.array_equal(c.next_batch(4)[0], xa)


def test_sampler_state_round_trip_through_json():
    toks = _tokens()
    s = D.BatchSampler(toks, 16, seed=123)
    for _ in range(5):
        s.next()
    state = json.loads(json.dumps(s.state_dict()))
    cont = [s.next()[0] for _ in range(6)]
    r = D.BatchSampler(toks, 16, seed=999)
    r.load_state_dict(state)
    assert r.cursor == 5
    for want in cont:
        np.testing.assert_array_equal(r.next()[0], want)
    with pytest.raises(D.DataError, match="resume with the same data"):
        D.BatchSampler(toks[:-1], 16, 0).load_state_dict(state)


def test_sampler_covers_last_window():
    toks = np.arange(40, dtype=np.uint16)
    s = D.BatchSampler(toks, 8, seed=0)
    starts = {int(s.next()[0][0]) for _ in range(2000)}
    assert starts == set(range(0, 40 - 8))  # every legal start, including the last


def test_val_batches_deterministic_and_disjoint():
    cfg = preset("tiny", vocab_size=300, seq_len=16)
    toks = _tokens(3000)
    train, val = D._split(toks, cfg.seq_len, 0.1, "x")
    assert len(train) + len(val) == len(toks) and len(val) == 300
    td = D.TokenData(train, val, 300, 16, "x")
    b1 = list(td.val_batches(batch_size=2))
    b2 = list(td.val_batches(batch_size=2))
    assert len(b1) == (299 // 16) // 2
    for (x1, y1), (x2, y2) in zip(b1, b2):
        np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(b1[0][0][0], toks[2700:2716])
    np.testing.assert_array_equal(b1[0][1][1], toks[2717:2733])
    assert len(list(td.val_batches(max_batches=3))) == 3


# ---- tokenizers and text ----

def test_text_file_bpe_trained_and_cached(tmp_path, monkeypatch):
    cfg = preset("tiny", seq_len=32)
    monkeypatch.setenv("RUSTANE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data").mkdir()
    txt = tmp_path / "data" / "story.txt"
    txt.write_text(corpus_text(150, seed=1))
    td = D.open_dataset(txt, cfg)
    assert td.tokenizer is not None and td.tokenizer.get_vocab_size() <= cfg.vocab_size
    # cached in the user cache (RUSTANE_CACHE), keyed by content; nothing beside the data
    assert td.tokenizer_path.exists() and td.tokenizer_path.parent == tmp_path / "cache" / "text"
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["story.txt"]
    all_ids = np.concatenate([td.train, td.val])
    text = td.tokenizer.decode(all_ids.tolist(), skip_special_tokens=True)
    assert text.split() == txt.read_text().split()  # lossless up to the EOT separators
    # second open: cache hit, no retraining
    def boom(*a, **k):
        raise AssertionError("retrained despite cache")
    monkeypatch.setattr(D, "train_bpe", boom)
    td2 = D.open_dataset(txt, cfg)
    np.testing.assert_array_equal(td2.train, td.train)
    # changed content -> new cache key -> retrain (boom)
    txt.write_text(corpus_text(150, seed=2))
    with pytest.raises(AssertionError, match="retrained"):
        D.open_dataset(txt, cfg)
    assert not list((tmp_path / "cache" / "text").glob(".*.tmp"))  # no temp leftovers
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["story.txt"]


def test_folder_and_given_tokenizer(tmp_path):
    cfg = preset("tiny", seq_len=16)
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text(corpus_text(40, 1))
    (tmp_path / "docs" / "sub" / "b.txt").write_text(corpus_text(40, 2))
    (tmp_path / "docs" / "ignored.md").write_text("zzz")
    tok = D.train_bpe(generate_stories(100, 5), 400)
    tok.save(str(tmp_path / "tokenizer.json"))
    td = D.open_dataset(tmp_path / "docs", cfg, tokenizer=tmp_path / "tokenizer.json")
    ids = np.concatenate([td.train, td.val]).tolist()
    want = D.tokenize_texts(tok, [corpus_text(40, 1), corpus_text(40, 2)]).tolist()
    assert ids == want
    with pytest.raises(D.DataError, match="has 400 ids but the model's vocab_size is 300"):
        D.open_dataset(tmp_path / "docs", preset("tiny", vocab_size=300),
                       tokenizer=tmp_path / "tokenizer.json")
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_tokenizer(tmp_path / "none.json")


def test_builtin_corpus_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RUSTANE_CACHE", str(tmp_path))
    cfg = preset("tiny")
    td = D.open_dataset(None, cfg, n_stories=200)
    assert "built-in" in td.source and len(td.train) > 10 * len(td.val) // 2
    assert int(max(td.train.max(), td.val.max())) < cfg.vocab_size
    text = td.tokenizer.decode(np.concatenate([td.train, td.val]).tolist(), skip_special_tokens=False)
    assert text.split(D.EOT) == generate_stories(200, 0) + [""]  # one EOT after each story
    monkeypatch.setattr(D, "train_bpe", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrain")))
    td2 = D.open_dataset("builtin", cfg, n_stories=200)
    np.testing.assert_array_equal(td2.train, td.train)


def test_val_path_separate_file(tmp_path):
    cfg = preset("tiny", seq_len=8, vocab_size=300)
    tr = D.write_tokens(tmp_path / "train.bin", _tokens(500), 300)
    va = D.write_tokens(tmp_path / "val.bin", _tokens(100, seed=1), 300)
    td = D.open_dataset(tr, cfg, val_path=va)
    assert len(td.train) == 500 and len(td.val) == 100
