"""Preference pairs (tinylm.align.preferences): the rows equal TRL 1.16's RewardTrainer's
tokenized chosen/rejected sequences (texts with eos, conversations through the chat
template, explicit and implicit prompts), the prompt boundary equals TRL's DPOTrainer's,
extract_prompt equals TRL's, the batch layout, the resumable batcher, and bad records
as one-line errors naming file:line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from chat_helpers import SPECIALS, TEXT, tok, tok_file  # noqa: F401 (fixtures)

from tinylm.align.preferences import (
    Pairs, PreferenceError, extract_prompt, read_preferences, tokenize_pair,
)
from tinylm.instruct import IGNORE, ExampleBatcher, Formatting, InstructError, in_order
from tinylm.prompts import ChatTemplate


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


TEXTS = [
    {"prompt": "the cat", "chosen": " sat on a mat.", "rejected": " ran to see"},
    {"prompt": "Hello there!", "chosen": " How are you?<|endoftext|>", "rejected": " I am fine."},
    {"prompt": "tea", "chosen": "tea for two", "rejected": " then both"},  # merges across
    {"chosen": "Hello there! How are you?", "rejected": "Hello there! I am fine."},  # implicit
]
CHATS = [
    {"prompt": [user("Hello there!")], "chosen": [assistant("How are you?")],
     "rejected": [assistant("I am fine.")]},
    {"chosen": [user("tea"), assistant("the cat sat"), user("the dog"), assistant("ran")],
     "rejected": [user("tea"), assistant("the cat sat"), user("the dog"), assistant("sat")]},
]


def fmt_for(tok, max_length=512, template="chatml"):
    return Formatting(tok, tok.token_to_id("<|endoftext|>"), max_length,
                      ChatTemplate.builtin(template))


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- TRL as the oracle


def chat_jinja(t: ChatTemplate) -> str:
    """A Jinja chat template that renders as ``t`` does."""
    q = json.dumps
    parts = ["{%- for message in messages -%}"]
    for role in ("system", "user", "assistant"):
        parts.append(f"{{%- if message['role'] == {q(role)} -%}}"
                     f"{{{{- {q(getattr(t, role + '_prefix'))} + message['content'] + "
                     f"{q(getattr(t, role + '_suffix'))} -}}}}{{%- endif -%}}")
    parts.append("{%- endfor -%}{%- if add_generation_prompt -%}"
                 f"{{{{- {q(t.generation_prompt)} -}}}}{{%- endif -%}}")
    return "".join(parts)


def hf_tokenizer(tok_file):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_file),
                                              eos_token="<|endoftext|>")
    hf.chat_template = chat_jinja(ChatTemplate.builtin("chatml"))
    return hf


def trl_rows(tok_file, records, tmp_path, trainer="reward"):
    """TRL's prepared dataset of ``records``: RewardTrainer's (chosen_ids, rejected_ids)
    or DPOTrainer's (prompt_ids, chosen_ids, rejected_ids)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    hf = hf_tokenizer(tok_file)
    config = dict(vocab_size=len(hf), n_embd=8, n_layer=1, n_head=2, n_positions=64,
                  eos_token_id=0, bos_token_id=0, pad_token_id=0)
    out = str(tmp_path / "trl")
    dataset = datasets.Dataset.from_list(records)
    if trainer == "reward":
        model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
            num_labels=1, **config))
        t = trl.RewardTrainer(model=model, args=trl.RewardConfig(
            output_dir=out, report_to=[], use_cpu=True), processing_class=hf,
            train_dataset=dataset)
        return [(r["chosen_ids"], r["rejected_ids"]) for r in t.train_dataset]
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    ref = transformers.GPT2LMHeadModel(model.config)
    t = trl.DPOTrainer(model=model, ref_model=ref, processing_class=hf,
                       args=trl.DPOConfig(output_dir=out, report_to=[], use_cpu=True),
                       train_dataset=dataset)
    return [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in t.train_dataset]


def one_kind(records):
    """TRL's datasets hold one kind per column: a record set with the same fields."""
    return [{k: r[k] for k in ("prompt", "chosen", "rejected") if k in r} for r in records]


@pytest.mark.parametrize("records", [TEXTS[:3], TEXTS[3:], CHATS[:1], CHATS[1:]],
                         ids=["text", "implicit-text", "chat", "implicit-chat"])
def test_rows_equal_trls_reward_and_dpo_tokenization(tok, tok_file, tmp_path, records):
    reward = trl_rows(tok_file, one_kind(records), tmp_path, "reward")
    dpo = trl_rows(tok_file, one_kind(records), tmp_path, "dpo")
    fmt = fmt_for(tok)
    for record, (c, r), (p, dc, dr) in zip(records, reward, dpo, strict=True):
        chosen, rejected, start = tokenize_pair(record, fmt)
        assert chosen == c and rejected == r  # the reward model's whole rows
        assert chosen == p + dc and rejected == p + dr  # DPO: the same rows ...
        assert start == len(p)  # ... and the same completion start


def test_the_end_of_sequence_token_is_appended_once_to_texts_only(tok):
    fmt = fmt_for(tok)
    eos = fmt.eos_id
    c, r, _ = tokenize_pair(TEXTS[1], fmt)
    assert c[-1] == eos and c[-2] != eos and r[-1] == eos
    c, r, _ = tokenize_pair(CHATS[0], fmt)
    assert eos not in c and eos not in r  # the template ends the turn


@pytest.mark.parametrize("chosen, rejected", [
    ("Hello there! How are you?", "Hello there! I am fine."),  # a space before the split
    ("abc", "abd"), ("xyz", "abc"), ("same start", "same start and more"),
    ([user("a"), assistant("b")], [user("a"), assistant("c")]),
    ([user("a"), assistant("b")], [user("x"), assistant("b")]),
])
def test_extract_prompt_equals_trls(chosen, rejected):
    trl = pytest.importorskip("trl")
    theirs = trl.extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (theirs["prompt"], theirs["chosen"],
                                                theirs["rejected"])


# --------------------------------------------------------------------------- batches


def test_a_batch_holds_chosen_rows_then_rejected_rows(tok, tmp_path):
    data = read_preferences([write_jsonl(tmp_path / "p.jsonl", TEXTS[:3])], fmt_for(tok))
    train, _ = data.split(0.0)
    b = train.batch([2, 0], data.pad_id)
    rows = [tokenize_pair(TEXTS[i], fmt_for(tok)) for i in (2, 0)]
    order = [rows[0][0], rows[1][0], rows[0][1], rows[1][1]]  # chosen 2, 0; rejected 2, 0
    T = max(map(len, order))
    assert b["ids"].shape == b["targets"].shape == b["attention_mask"].shape == (4, T)
    eos = data.pad_id  # pad = eos, as TRL pads a tokenizer without a pad token
    for k, (ids, start) in enumerate(zip(order, [rows[0][2], rows[1][2]] * 2)):
        n = len(ids)
        assert b["ids"][k, :n].tolist() == ids and (b["ids"][k, n:] == eos).all()
        assert b["attention_mask"][k].tolist() == [1] * n + [0] * (T - n)
        want = [ids[t + 1] if t + 1 >= start and t + 1 < n else IGNORE for t in range(T)]
        assert b["targets"][k].tolist() == want  # the completion's next tokens only
        assert b["last"][k] == n - 2  # the last id that is not the pad: before the eos
    assert b["n_tokens"] == sum(map(len, order)) and "margin" not in b


def test_a_pad_other_than_eos_scores_the_eos_and_margins_come_along(tok, tmp_path):
    records = [dict(r, margin=m) for r, m in zip(TEXTS[:3], (0.5, 1, -2.0))]
    pad = tok.token_to_id("<pad>")
    data = read_preferences([write_jsonl(tmp_path / "p.jsonl", records)], fmt_for(tok),
                            pad_id=pad)
    b = data.examples.batch([0, 1, 2], data.pad_id)
    lengths = b["attention_mask"].sum(axis=1)
    assert (b["last"] == lengths - 1).all()
    assert (b["ids"][np.arange(6), b["last"]] == fmt_for(tok).eos_id).all()
    assert b["margin"].tolist() == [0.5, 1.0, -2.0] and data.has_margin


def test_the_batcher_resumes_and_evaluation_sees_every_pair_once(tok, tmp_path):
    data = read_preferences([write_jsonl(tmp_path / "p.jsonl", TEXTS * 3)], fmt_for(tok),
                            seed=3)
    train, val = data.split(0.25)
    assert isinstance(train, Pairs) and len(train) + len(val) == 12 and len(val) == 3
    a = ExampleBatcher(train, 2, data.pad_id, seed=1)
    a.next()
    b = ExampleBatcher(train, 2, data.pad_id, seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(6):
        x, y = a.next(), b.next()
        assert all(np.array_equal(x[k], y[k]) for k in x if k != "n_tokens")
    assert sum(len(batch["last"]) // 2 for batch in in_order(val, 2, data.pad_id)) == 3
    assert data.sample_prompt(val) == val.prompt(0)


def test_truncation_keeps_the_start_as_trls_dpo(tok, tmp_path):
    record = {"prompt": "the cat", "chosen": " sat on a mat and the dog ran to see",
              "rejected": " ran"}
    full = tokenize_pair(record, fmt_for(tok))
    cut = tokenize_pair(record, fmt_for(tok, max_length=6), truncate=True)
    assert cut == (full[0][:6], full[1][:6], full[2])
    path = write_jsonl(tmp_path / "p.jsonl", [record, OK])
    assert read_preferences([path], fmt_for(tok, max_length=6), truncate=True).n_cut == 1
    with pytest.raises(PreferenceError, match="prompt takes"):
        tokenize_pair(record, fmt_for(tok, max_length=full[2]), truncate=True)


# --------------------------------------------------------------------------- bad records


OK = {"prompt": "the cat", "chosen": " sat", "rejected": " ran"}


@pytest.mark.parametrize("line, fragments", [
    ({"prompt": "the", "chosen": " cat", "rejected": " cat"}, ["identical"]),
    ({"chosen": "the cat sat", "rejected": "the cat sat"}, ["identical"]),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]},
     ["identical"]),
    ({"prompt": "the", "chosen": "", "rejected": " cat"}, ["chosen completion is empty"]),
    ({"prompt": "the", "chosen": " cat", "rejected": "   "}, ["rejected completion is empty"]),
    ({"prompt": [user("a")], "chosen": [], "rejected": [assistant("b")]}, ["empty"]),
    ({"prompt": [user("a")], "chosen": [assistant("")], "rejected": [assistant("b")]},
     ["empty"]),
    ({"prompt": "the cat " * 40, "chosen": " sat", "rejected": " ran"}, ["--block-size"]),
    ("{not json", ["not a JSON line"]),
    ("[1, 2]", ["expected a JSON object"]),
    ({"prompt": "the", "chosen": " cat"}, ["'rejected' is missing"]),
    ({"prompt": "the", "chosen": 3, "rejected": " cat"}, ["'chosen' field is a int"]),
    ({"prompt": "the", "chosen": [assistant("x")], "rejected": " cat"},
     ["'prompt' field is a str", "lists of messages in every field"]),
    ({"chosen": [{"role": "robot", "content": "x"}], "rejected": [assistant("y")]},
     ["message 0 of 'chosen'", "'role' (one of system, user, assistant)"]),
    (dict(OK, margin="big"), ["'margin' must be a finite number"]),
    (dict(OK, margin=float("nan")), ["'margin' must be a finite number"]),
    (dict(OK, margin=True), ["'margin' must be a finite number"]),
])
def test_a_bad_record_is_one_line_naming_file_and_line(tok, tmp_path, line, fragments):
    path = write_jsonl(tmp_path / "prefs.jsonl", [OK, line])
    with pytest.raises(InstructError) as e:  # PreferenceError, or instruct's for bad JSON
        read_preferences([path], fmt_for(tok, max_length=32))
    message = str(e.value)
    assert message.startswith(f"{path}:2") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_margins_on_some_records_only_and_no_records_are_refused(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [dict(OK, margin=1.0), OK])
    with pytest.raises(PreferenceError, match=r"p\.jsonl:2: no 'margin' here, but one at"):
        read_preferences([path], fmt_for(tok))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(PreferenceError, match="no records"):
        read_preferences([empty], fmt_for(tok))
    chat = write_jsonl(tmp_path / "chat.jsonl", CHATS[:1])
    no_template = Formatting(tok, fmt_for(tok).eos_id, 64, None)
    with pytest.raises(PreferenceError, match=r"chat\.jsonl:1: .*chat template"):
        read_preferences([chat], no_template)
