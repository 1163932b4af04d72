"""Fine-tuning data (rustane.finetune_data, rustane.chat_template): every row format, prompt
masks, fitting to seq_len, splits, and one test per malformed-row error. Chat rendering is
checked against transformers' apply_chat_template; masks against the text the tokens decode to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rustane.finetune_data import (
    FinetuneDataError, Tokenization, encode_row, fit_rows, load_examples, open_finetune_data, row_format,
)

# ChatML, as SmolLM2-Instruct and Qwen use it (assistant turns in transformers' generation tags)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
          "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<s>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
         "hello world, user and assistant talk", "0123456789 numbers and letters abcdefghijklmnopqrstuvwxyz"]


@pytest.fixture(scope="module")
def tok():
    from tokenizers import processors

    from rustane.data import train_bpe
    t = train_bpe(TEXTS * 3, 320)
    t.add_special_tokens(SPECIALS[1:])
    bos = t.token_to_id("<s>")
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return t


@pytest.fixture(scope="module")
def tk(tok):
    return Tokenization(tok, {"chat_template": CHATML, "bos_token": "<s>", "eos_token": "<|im_end|>"},
                        eos_id=tok.token_to_id("<|im_end|>"))


def write_jsonl(path: Path, rows, raw: bool = False) -> Path:
    path.write_text("\n".join(r if raw else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def loss_text(tok, ex) -> str:
    return tok.decode([int(i) for i, m in zip(ex.ids[1:], ex.loss[1:]) if m], skip_special_tokens=False)


# ---- formats --------------------------------------------------------------------------------------

def test_text_rows_are_bos_text_eos_and_all_carry_loss(tok, tk):
    ex = encode_row({"text": "hello world"}, "text", tk, "f:1", mask_prompt=True)
    body = tok.encode("hello world", add_special_tokens=False).ids
    assert ex.ids.tolist() == [tok.token_to_id("<s>")] + body + [tk.eos_id]
    assert ex.loss.all()


def test_completion_rows_mask_exactly_the_prompt(tok, tk):
    row = {"prompt": "What is the capital of France?", "completion": " Paris."}
    p = tok.encode(row["prompt"]).ids
    c = tok.encode(row["completion"], add_special_tokens=False).ids
    masked = encode_row(row, "completion", tk, "f:1", mask_prompt=True)
    assert masked.ids.tolist() == p + c + [tk.eos_id]
    assert masked.loss.tolist() == [False] * len(p) + [True] * (len(c) + 1)
    assert loss_text(tok, masked) == " Paris.<|im_end|>"
    unmasked = encode_row(row, "completion", tk, "f:1", mask_prompt=False)
    assert unmasked.ids.tolist() == masked.ids.tolist() and unmasked.loss.all()


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "capital of France?"},
            {"role": "assistant", "content": "Paris"}]


@pytest.mark.parametrize("gen", [False, True])
def test_chat_rendering_equals_transformers_apply_chat_template(tok, gen):
    from transformers import PreTrainedTokenizerFast

    from rustane.chat_template import render
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")
    hf.chat_template = CHATML
    msgs = MESSAGES[:-1] if gen else MESSAGES
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert render(CHATML, msgs, {"bos_token": "<s>"}, add_generation_prompt=gen) == want


def test_chat_rows_mask_all_but_the_last_assistant_turn(tok, tk):
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>")
    hf.chat_template = CHATML
    ex = encode_row({"messages": MESSAGES}, "chat", tk, "f:1", mask_prompt=True)
    # transformers' tokens of the conversation; the prompt is transformers' tokens of the earlier
    # turns plus the generation prompt, and everything after it carries loss (the last turn's
    # text, its end token and the template's trailing newline)
    out = hf.apply_chat_template(MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert ex.ids.tolist() == list(out["input_ids"])
    last_start = len(hf.apply_chat_template(MESSAGES[:-1], tokenize=True, return_dict=True,
                                            add_generation_prompt=True)["input_ids"])
    assert ex.loss.tolist() == [i >= last_start for i in range(ex.ids.size)]
    # transformers' assistant mask (generation tags) of the last turn lies inside the trained part
    amask = np.asarray(out["assistant_masks"], dtype=bool)
    assert amask[last_start:].any() and (ex.loss | ~np.r_[np.zeros(last_start, bool), amask[last_start:]]).all()
    assert loss_text(tok, ex) == "Paris<|im_end|>\n"
    full = encode_row({"messages": MESSAGES}, "chat", tk, "f:1", mask_prompt=False)
    assert full.ids.tolist() == ex.ids.tolist() and full.loss.all()


def test_format_is_detected_per_row(tmp_path, tk):
    f = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "hello"}, {"prompt": "a", "completion": "b"},
                                               {"messages": MESSAGES[1:3]}])
    exs = load_examples(f, tk, 64, mask_prompt=True)
    assert [row_format(json.loads(line), "x") for line in f.read_text().splitlines()] == ["text", "completion", "chat"]
    assert [e.where for e in exs] == [f"{f}:1", f"{f}:2", f"{f}:3"]
    assert exs[0].loss.all() and not exs[1].loss.all() and not exs[2].loss.all()


# ---- splits, fitting, sampling --------------------------------------------------------------------

def test_folder_with_train_valid_test(tmp_path, tk):
    for name, n in (("train", 5), ("valid", 2), ("test", 3)):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": f"{name} row {i}"} for i in range(n)])
    d = open_finetune_data(tmp_path, tk, 16)
    assert (len(d.train), len(d.valid), len(d.test)) == (5, 2, 3)


def test_single_file_split_is_seeded_disjoint_and_complete(tmp_path, tk):
    f = write_jsonl(tmp_path / "all.jsonl", [{"text": f"hello {i} " * (i % 3 + 1)} for i in range(20)])
    a = open_finetune_data(f, tk, 32, valid_fraction=0.25, split_seed=3)
    b = open_finetune_data(f, tk, 32, valid_fraction=0.25, split_seed=3)
    assert (len(a.train), len(a.valid)) == (15, 5)
    assert np.array_equal(a.valid, b.valid) and np.array_equal(a.train, b.train)
    rows = sorted(r.tobytes() for r in np.concatenate([a.train, a.valid]))
    full = open_finetune_data(f, tk, 32, valid_fraction=0.0)
    assert rows == sorted(r.tobytes() for r in full.train)


def _examples(tk, n=9):
    return [encode_row({"prompt": "q " * (i % 4 + 1), "completion": "answer " * (i % 3 + 1)}, "completion",
                       tk, f"f:{i}", True) for i in range(n)]


def test_pad_rows_hold_one_example_and_padding_carries_no_loss(tk):
    exs = _examples(tk)
    rows = fit_rows(exs, 32, "pad", pad_id=tk.eos_id)
    assert rows.shape == (len(exs), 3, 32)
    for ex, r in zip(exs, rows):
        n = ex.ids.size - 1
        assert r[0, :n].tolist() == ex.ids[:-1].tolist() and r[1, :n].tolist() == ex.ids[1:].tolist()
        assert r[2, :n].tolist() == ex.loss[1:].astype(int).tolist() and not r[2, n:].any()
        assert (r[0, n:] == tk.eos_id).all()


def test_pack_rows_concatenate_whole_examples_in_order(tk):
    exs = _examples(tk, 20)
    rows = fit_rows(exs, 40, "pack", pad_id=0)
    # unpack: every example's (x, y, loss) appears once, in order, never split across rows
    stream = [(tuple(e.ids[:-1]), tuple(e.ids[1:]), tuple(e.loss[1:].astype(int))) for e in exs]
    k = 0
    for r in rows:
        c = 0
        while k < len(stream) and c + len(stream[k][0]) <= 40:
            x, y, w = stream[k]
            n = len(x)
            assert tuple(r[0, c:c + n]) == x and tuple(r[1, c:c + n]) == y and tuple(r[2, c:c + n]) == w
            c, k = c + n, k + 1
        assert not r[2, c:].any()
    assert k == len(stream) and len(rows) < len(exs)
    share_pack = rows[:, 2].sum() / rows[:, 2].size
    share_pad = fit_rows(exs, 40, "pad")[:, 2].mean()
    assert share_pack > share_pad
    assert rows[:, 2].sum() == sum(int(e.loss[1:].sum()) for e in exs)


def test_sampler_resumes_exactly_and_covers_each_epoch(tmp_path, tk):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(7)])
    d = open_finetune_data(f, tk, 16, valid_fraction=0)
    s = d.sampler(5)
    first = s.next_indices(7)
    assert sorted(first.tolist()) == list(range(7))
    s.next_indices(3)
    st_ = json.loads(json.dumps(s.state_dict()))
    want = s.next_indices(10)
    s2 = d.sampler(5)
    s2.load_state_dict(st_)
    assert s2.next_indices(10).tolist() == want.tolist()


# ---- malformed rows: one test each ------------------------------------------------------------------

def _err(tmp_path, tk, lines, raw=True, **kw) -> str:
    f = write_jsonl(tmp_path / "bad.jsonl", lines, raw=raw)
    with pytest.raises(FinetuneDataError) as ei:
        open_finetune_data(f, tk, kw.pop("seq_len", 64), valid_fraction=0, **kw)
    return str(ei.value)


GOOD = '{"text": "hello"}'


def test_error_bad_json_names_file_and_line(tmp_path, tk):
    msg = _err(tmp_path, tk, [GOOD, GOOD, '{"text": "unterminated'])
    assert f"{tmp_path / 'bad.jsonl'}:3: bad JSON" in msg


def test_error_row_not_an_object(tmp_path, tk):
    assert "bad.jsonl:2: a row must be a JSON object, got list" in _err(tmp_path, tk, [GOOD, '["text"]'])


def test_error_unknown_keys(tmp_path, tk):
    msg = _err(tmp_path, tk, [GOOD, '{"text": "a", "label": 1}'])
    assert "bad.jsonl:2: unknown keys 'label'" in msg and '{"prompt", "completion"}' in msg


def test_error_keys_matching_no_format(tmp_path, tk):
    assert "bad.jsonl:1: keys ['prompt'] match no format" in _err(tmp_path, tk, ['{"prompt": "a"}'])


def test_error_non_string_field(tmp_path, tk):
    assert 'bad.jsonl:1: "completion" must be a string, got int' in _err(
        tmp_path, tk, ['{"prompt": "a", "completion": 3}'])


def test_error_empty_completion(tmp_path, tk):
    assert 'bad.jsonl:2: empty "completion"' in _err(tmp_path, tk, [GOOD, '{"prompt": "a", "completion": ""}'])


def test_error_empty_text(tmp_path, tk):
    assert 'bad.jsonl:1: empty "text"' in _err(tmp_path, tk, ['{"text": ""}'])


def test_error_empty_messages(tmp_path, tk):
    assert 'bad.jsonl:1: "messages" must be a non-empty list' in _err(tmp_path, tk, ['{"messages": []}'])


def test_error_bad_message(tmp_path, tk):
    assert "bad.jsonl:1: messages[0] must be an object" in _err(tmp_path, tk, ['{"messages": [{"role": "user"}]}'])


def test_error_conversation_not_ending_in_assistant(tmp_path, tk):
    msg = _err(tmp_path, tk, [json.dumps({"messages": MESSAGES[:2]})])
    assert "bad.jsonl:1: the last message must be a non-empty 'assistant' turn" in msg


def test_error_messages_without_chat_template(tmp_path, tok):
    tk = Tokenization(tok, {}, eos_id=0)
    assert "bad.jsonl:1: \"messages\" rows need the model's chat template" in _err(
        tmp_path, tk, [json.dumps({"messages": MESSAGES})])


def test_error_template_that_cannot_be_masked(tmp_path, tok):
    # renders the number of messages first: the prompt's text is not a prefix of the whole
    t = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tk = Tokenization(tok, {"chat_template": t}, eos_id=0)
    msg = _err(tmp_path, tk, [json.dumps({"messages": MESSAGES})], mask_prompt=True)
    assert "bad.jsonl:1: the chat template does not render" in msg and "drop --mask-prompt" in msg


def test_error_row_too_long_without_truncation_and_truncation(tmp_path, tk):
    long = json.dumps({"text": "hello world " * 40})
    msg = _err(tmp_path, tk, [GOOD, long], seq_len=16)
    assert "bad.jsonl:2: the row is" in msg and "--seq-len 16 takes at most 17" in msg and "--truncate" in msg
    d = open_finetune_data(write_jsonl(tmp_path / "ok.jsonl", [GOOD, long], raw=True), tk, 16,
                           truncate=True, valid_fraction=0)
    assert d.train.shape == (2, 3, 16) and d.train[1, 2].all()


def test_error_truncation_leaving_no_loss(tmp_path, tk):
    row = json.dumps({"prompt": "hello world " * 20, "completion": "x"})
    assert "after truncation to 9 tokens no token carries loss" in _err(
        tmp_path, tk, [row], seq_len=8, truncate=True, mask_prompt=True)


def test_error_missing_train_file_and_wrong_suffix(tmp_path, tk):
    (tmp_path / "valid.jsonl").write_text(GOOD + "\n")
    with pytest.raises(FinetuneDataError, match="needs train.jsonl"):
        open_finetune_data(tmp_path, tk, 16)
    (tmp_path / "d.json").write_text(GOOD + "\n")
    with pytest.raises(FinetuneDataError, match="expected a .jsonl file"):
        open_finetune_data(tmp_path / "d.json", tk, 16)


# ---- property: the parser never accepts a bad row and always names its line ---------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(json_values, min_size=1, max_size=6))
def test_parser_accepts_only_well_formed_rows_and_names_the_line(tmp_path_factory, tk, rows):
    f = tmp_path_factory.mktemp("h") / "rows.jsonl"
    write_jsonl(f, rows)

    def well_formed(r) -> bool:  # the formats, written independently of the parser
        if not isinstance(r, dict):
            return False
        if set(r) == {"text"}:
            return isinstance(r["text"], str) and r["text"] != ""
        if set(r) == {"prompt", "completion"}:
            return isinstance(r["prompt"], str) and isinstance(r["completion"], str) and r["completion"] != ""
        if set(r) == {"messages"}:
            m = r["messages"]
            return (isinstance(m, list) and len(m) > 0
                    and all(isinstance(x, dict) and isinstance(x.get("role"), str) and isinstance(x.get("content"), str)
                            for x in m) and m[-1]["role"] == "assistant" and m[-1]["content"] != "")
        return False

    first_bad = next((i for i, r in enumerate(rows, 1) if not well_formed(r)), None)
    try:
        exs = load_examples(f, tk, 10_000, mask_prompt=False)
    except FinetuneDataError as exc:
        # a well-formed row can still fail later checks only if it encodes to no loss; none does here
        assert first_bad is not None and str(exc).startswith(f"{f}:{first_bad}:")
    else:
        assert first_bad is None and len(exs) == len(rows)
        for ex in exs:
            assert ex.ids.dtype == np.int32 and ex.ids.size == ex.loss.size >= 2
