"""Importers (rustane.formats): Hugging Face folders, GGUF, llama2.c, against files written from
the formats' documentation and against transformers' logits; and the errors for bad input."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from model_files import (byte_level_vocab, hf_tensors, random_hf_llama, write_gguf, write_llama2c,
                         write_tokenizer_bin)
from rustane.decoder import KVCacheDecoder
from rustane.formats import FormatError, load_model, save_hf_folder

torch = pytest.importorskip("torch")


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _assert_close(got, ref, tol=1e-4):
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err < tol, f"relative error {err:.2e}"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    model, tensors = random_hf_llama(d / "hf", tie=False)
    return d, model, tensors


IDS = [5, 17, 250, 3, 99, 42, 7, 180, 11]


def test_hf_folder_imports_with_transformers_logits(llama):
    d, model, tensors = llama
    m = load_model(d / "hf")
    assert m.spec.model_type == "llama" and not m.spec.tie_embeddings
    _assert_close(KVCacheDecoder.from_imported(m).forward(IDS, all_logits=True), _hf_logits(model, IDS))


def test_hf_sharded_and_bf16(tmp_path):
    import torch
    model, _ = random_hf_llama(tmp_path / "a", tie=True)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "b", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    m = load_model(tmp_path / "b")
    ref = {k: v.float().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert sorted(m.tensors) == sorted(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(m.tensors[k], v)  # bf16 widens exactly


def test_gguf_imports_with_transformers_logits(llama, tmp_path):
    """q/k rows written in llama.cpp's interleaved order come back in HF order: logits equal."""
    d, model, tensors = llama
    write_gguf(tmp_path / "m.gguf", tensors, heads=4, kv_heads=2)
    m = load_model(tmp_path / "m.gguf")
    for k, v in tensors.items():
        np.testing.assert_array_equal(m.tensors[k], v)
    _assert_close(KVCacheDecoder.from_imported(m).forward(IDS, all_logits=True), _hf_logits(model, IDS))
    assert m.tokenizer_config["eos_token"] == "<|im_end|>" and m.eos_ids == [299]


# error bound of each block format against the original values: scale / levels (rounding to
# the nearest of 2^bits levels over each block's range)
QUANT_TOL = {"F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.02, "Q5_0": 0.15, "Q5_1": 0.12, "Q4_0": 0.3, "Q4_1": 0.25}


@pytest.mark.parametrize("qtype", sorted(QUANT_TOL))
def test_gguf_quant_types_dequantize(llama, tmp_path, qtype):
    d, model, tensors = llama
    name = "model.layers.1.mlp.gate_proj.weight"
    write_gguf(tmp_path / "m.gguf", tensors, heads=4, kv_heads=2, quant={name: qtype})
    got = load_model(tmp_path / "m.gguf").tensors[name]
    ref = tensors[name]
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert 0 < err < QUANT_TOL[qtype] or (qtype in ("F16",) and err < QUANT_TOL[qtype])


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_gguf_k_quants_dequantize(tmp_path, qtype):
    """k-quant blocks encoded here from chosen codes and scales (ggml's block layouts) import as
    the values those codes stand for."""
    from model_files import decode_q4_k_reference, decode_q6_k_reference, encode_q4_k, encode_q6_k
    _, tensors = random_hf_llama(tmp_path / "hf", dim=256, hidden=96, layers=1)
    name = "model.layers.0.mlp.gate_proj.weight"  # [96, 256]: one block per row
    rng = np.random.default_rng(5)
    n = 96
    d = rng.uniform(1e-3, 3e-3, n).astype(np.float16)
    if qtype == "Q4_K":
        codes, sc, mins = rng.integers(0, 16, (n, 256)), rng.integers(0, 64, (n, 8)), rng.integers(0, 64, (n, 8))
        dmin = rng.uniform(1e-3, 2e-3, n).astype(np.float16)
        blocks, want = encode_q4_k(codes, sc, mins, d, dmin), decode_q4_k_reference(codes, sc, mins, d, dmin)
    else:
        codes, sc = rng.integers(0, 64, (n, 256)), rng.integers(-128, 128, (n, 16))
        blocks, want = encode_q6_k(codes, sc, d), decode_q6_k_reference(codes, sc, d)
    write_gguf(tmp_path / "m.gguf", tensors, heads=4, kv_heads=2, raw={name: (blocks, qtype)})
    got = load_model(tmp_path / "m.gguf").tensors[name]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_gguf_tokenizer_round_trips_text(llama, tmp_path):
    d, model, tensors = llama
    write_gguf(tmp_path / "m.gguf", tensors, heads=4, kv_heads=2)
    tok = load_model(tmp_path / "m.gguf").tokenizer()
    toks, merges, _ = byte_level_vocab(300)
    enc = tok.encode("the cat in the hat, 2024!")
    assert "Ġthe" in enc.tokens and enc.tokens.count("2") == 2  # merges applied; digits split one by one
    assert tok.decode(enc.ids) == "the cat in the hat, 2024!"
    assert tok.encode("<|im_start|>hi").ids[0] == toks.index("<|im_start|>")


@settings(max_examples=25)
@given(st.text(max_size=60))
def test_gguf_byte_level_tokenizer_round_trips_any_text(text):
    from rustane.formats.vocab import byte_level_bpe
    from tokenizers import Tokenizer
    toks, merges, types = byte_level_vocab(300)
    tok = _TOK_CACHE.setdefault("t", Tokenizer.from_str(byte_level_bpe(toks, merges, pre="smollm", types=types)))
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


_TOK_CACHE: dict = {}


def test_gguf_llama3_rope_freqs_become_rope_scaling(tmp_path):
    """A Llama 3.x GGUF keeps llama3 scaling as frequency divisors; the import names the
    scaling and the model then matches transformers with that rope_scaling."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    model, tensors = random_hf_llama(tmp_path / "hf", rope_scaling=scaling, rope_theta=500000.0,
                                     dim=128, heads=2, kv_heads=1)
    hd = 64
    inv = 1.0 / 500000.0 ** (np.arange(0, hd, 2) / hd)
    wavelen = 2 * np.pi / inv
    # Meta's published divisors, computed here per wavelength band
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    div = np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    write_gguf(tmp_path / "m.gguf", tensors, heads=2, kv_heads=1, theta=500000.0, rope_freqs=div)
    m = load_model(tmp_path / "m.gguf")
    assert m.spec.rope_scaling["rope_type"] == "llama3" and m.spec.rope_scaling["factor"] == 8.0
    ids = list(range(1, 60))
    _assert_close(KVCacheDecoder.from_imported(m).forward(ids, all_logits=True), _hf_logits(model, ids))


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tie", [True, False])
def test_llama2c_checkpoint_round_trips(tmp_path, version, tie):
    model, tensors = random_hf_llama(tmp_path / "hf", tie=tie, vocab=300)
    write_llama2c(tmp_path / "m.bin", tensors, heads=4, kv_heads=2, seq_len=64, version=version)
    m = load_model(tmp_path / "m.bin")
    assert m.spec.tie_embeddings == tie and m.spec.max_position == 64 and m.tokenizer_json is None
    for k, v in tensors.items():
        np.testing.assert_array_equal(m.tensors[k], v)
    _assert_close(KVCacheDecoder.from_imported(m).forward(IDS, all_logits=True), _hf_logits(model, IDS))
    # damaged: cut short, or bytes appended
    raw = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(raw[:-10])
    with pytest.raises(FormatError, match="truncated"):
        load_model(tmp_path / "cut.bin")
    (tmp_path / "long.bin").write_bytes(raw + b"\0" * 8)
    with pytest.raises(FormatError, match="trailing data"):
        load_model(tmp_path / "long.bin")


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    spm_lib = pytest.importorskip("sentencepiece")
    from pathlib import Path
    d = tmp_path_factory.mktemp("spm")
    text = Path(__file__).parent.parent.joinpath("rustane", "corpus.py").read_text()
    from rustane.corpus import generate_stories
    (d / "train.txt").write_text("\n".join(generate_stories(300, seed=0)) + "\n" + text)
    spm_lib.SentencePieceTrainer.train(input=str(d / "train.txt"), model_prefix=str(d / "sp"), vocab_size=400,
                                       model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                       bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                       # as Llama 2's tokenizer: no normalization, spaces kept
                                       normalization_rule_name="identity", remove_extra_whitespaces=False)
    sp = spm_lib.SentencePieceProcessor(model_file=str(d / "sp.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
    return d, sp, pieces, scores


def test_llama2c_tokenizer_matches_sentencepiece(tmp_path, spm):
    """tokenizer.bin from a SentencePiece BPE model encodes exactly as SentencePiece does."""
    d, sp, pieces, scores = spm
    model, tensors = random_hf_llama(tmp_path / "hf", vocab=len(pieces))
    write_llama2c(tmp_path / "m.bin", tensors, heads=4, kv_heads=2, seq_len=64, version=1)
    write_tokenizer_bin(tmp_path / "tokenizer.bin", pieces, scores)
    tok = load_model(tmp_path / "m.bin").tokenizer()
    for text in ["Once upon a time, there was a dog named Max.", "The moral of the story: be kind!",
                 "zebra quokka 12345 ünïcödé ☃", "  two  spaces\nnew line"]:
        want = [1] + sp.encode(text)
        assert tok.encode(text).ids == want, text
        assert tok.decode(want) == sp.decode(want[1:])


def test_export_hf_folder_loads_in_transformers(llama, tmp_path):
    d, model, tensors = llama
    write_gguf(tmp_path / "m.gguf", tensors, heads=4, kv_heads=2)
    m = load_model(tmp_path / "m.gguf")
    save_hf_folder(m, tmp_path / "out")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    _assert_close(_hf_logits(back, IDS), _hf_logits(model, IDS), tol=1e-6)
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.decode(tok("the hat").input_ids) == "the hat"


# ---- bad input -------------------------------------------------------------------------------

def _folder(tmp_path, llama, **cfg_changes):
    d, model, tensors = llama
    import shutil
    out = tmp_path / "f"
    shutil.copytree(d / "hf", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(cfg_changes)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), "model_type 'gpt2'"),
    (dict(model_type="qwen3"), "missing tensor"),
    (dict(intermediate_size=100), "disagree with the config"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None), "rope type 'yarn'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(num_attention_heads=3), "not a multiple|disagree"),
])
def test_hf_folder_bad_config_is_named(tmp_path, llama, changes, message):
    with pytest.raises(FormatError, match=message):
        load_model(_folder(tmp_path, llama, **changes))


def test_hf_folder_missing_pieces(tmp_path, llama):
    f = _folder(tmp_path, llama)
    (f / "model.safetensors").rename(f / "pytorch_model.bin")
    with pytest.raises(FormatError, match="pickles are not read"):
        load_model(f)
    with pytest.raises(FormatError, match="does not exist"):
        load_model(tmp_path / "nope")


@settings(max_examples=20)
@given(st.floats(0.0, 0.999), st.integers(0, 255), st.integers(0, 10_000))
def test_damaged_safetensors_gives_format_error(cut, byte, where):
    raw = _ST_BYTES["raw"]
    bad = bytearray(raw[:max(1, int(len(raw) * cut))]) if cut > 0.01 else bytearray(raw)
    if cut <= 0.01:  # corrupt instead: overwrite one header byte
        bad[8 + where % 200] = byte
    import tempfile
    from pathlib import Path
    from rustane.formats.hf import read_safetensors
    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "model.safetensors"
        p.write_bytes(bytes(bad))
        try:
            got = read_safetensors(p)
        except FormatError as exc:
            assert "safetensors" in str(exc) or "truncated" in str(exc)
        else:  # a flipped byte inside a value string can still leave a valid file
            assert set(got) <= set(_ST_BYTES["names"]) or len(got) <= len(_ST_BYTES["names"])


_ST_BYTES: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _safetensors_sample(tmp_path_factory):
    from safetensors.numpy import save_file
    p = tmp_path_factory.mktemp("st") / "x.safetensors"
    t = {f"w{i}": np.arange(40, dtype=np.float32).reshape(8, 5) * i for i in range(4)}
    save_file(t, str(p))
    _ST_BYTES.update(raw=p.read_bytes(), names=list(t))


@settings(max_examples=15)
@given(st.floats(0.0, 0.99))
def test_truncated_gguf_gives_format_error(frac):
    raw = _GGUF["raw"]
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as t:
        p = Path(t) / "m.gguf"
        p.write_bytes(raw[:max(4, int(len(raw) * frac))])
        with pytest.raises(FormatError):
            load_model(p)


_GGUF: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _gguf_sample(tmp_path_factory, llama):
    p = tmp_path_factory.mktemp("g") / "m.gguf"
    write_gguf(p, llama[2], heads=4, kv_heads=2)
    _GGUF["raw"] = p.read_bytes()
    _GGUF["path"] = p


def test_gguf_bad_pieces_are_named(tmp_path, llama):
    raw = bytearray(_GGUF["raw"])
    (tmp_path / "x.gguf").write_bytes(b"GGUX" + raw[4:])
    with pytest.raises(FormatError, match="GGUF magic"):
        load_model(tmp_path / "x.gguf")
    d, model, tensors = llama
    t = dict(tensors)
    del t["model.layers.1.mlp.up_proj.weight"]
    write_gguf(tmp_path / "m.gguf", t, heads=4, kv_heads=2)
    with pytest.raises(FormatError, match="missing tensor.*up_proj"):
        load_model(tmp_path / "m.gguf")
    write_gguf(tmp_path / "a.gguf", tensors, heads=4, kv_heads=2, arch="gpt2")
    with pytest.raises(FormatError, match="architecture 'gpt2'"):
        load_model(tmp_path / "a.gguf")
    _, wide = random_hf_llama(tmp_path / "wide", dim=256, layers=1)  # TQ1_0 packs rows of 256
    write_gguf(tmp_path / "t.gguf", wide, heads=4, kv_heads=2,
               quant={"model.layers.0.mlp.up_proj.weight": "TQ1_0"})
    with pytest.raises(FormatError, match="TQ1_0.*re-quantize"):
        load_model(tmp_path / "t.gguf")
    write_gguf(tmp_path / "h.gguf", tensors, heads=8, kv_heads=2)
    with pytest.raises(FormatError, match="disagree|heads"):
        load_model(tmp_path / "h.gguf")


def test_llama2c_bad_headers(tmp_path):
    (tmp_path / "a.bin").write_bytes(struct.pack("<7i", 64, 96, 2, 3, 2, 300, 64))
    with pytest.raises(FormatError, match="not a valid llama2.c"):
        load_model(tmp_path / "a.bin")
    (tmp_path / "b.bin").write_bytes(struct.pack("<Ii7iB", 0x616B3432, 2, 64, 96, 2, 4, 2, 300, 64, 1) + b"\0" * 300)
    with pytest.raises(FormatError, match="version 2 is not supported"):
        load_model(tmp_path / "b.bin")
    (tmp_path / "c.bin").write_bytes(b"\1\2")
    with pytest.raises(FormatError, match="too short"):
        load_model(tmp_path / "c.bin")
    (tmp_path / "tokenizer.bin").write_bytes(struct.pack("<i", 8) + struct.pack("<fi", 0.0, 3) + b"ab")
    with pytest.raises(FormatError, match="truncated or corrupted"):
        from rustane.formats.llama2c import read_tokenizer_bin
        read_tokenizer_bin(tmp_path / "tokenizer.bin", 10)
