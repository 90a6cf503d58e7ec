"""Instruction data (tinylm.instruct): the label masks against TRL 1.16's SFTTrainer (the
oracle: the labels of its prepared dataset, for the same records and the same
tokenizer), packing against TRL's best-fit-decreasing packer and padding-free collator,
batches, the resumable example batcher, and bad records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tinylm.instruct import (
    IGNORE, ExampleBatcher, ExampleData, Examples, Formatting, InstructError, fit_length,
    in_order, pack, tokenize_record,
)
from tinylm.prompts import ChatTemplate

TEXT = ("the cat sat on a mat and the dog ran to see what it was, then both went home for "
        "tea. Hello there! How are you? I am fine.\n") * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

PROMPT_COMPLETION = [
    {"prompt": "the cat sat", "completion": " on a mat."},
    {"prompt": "Hello there!", "completion": " How are you?<|endoftext|>"},  # eos already there
    {"prompt": "tea", "completion": "tea for two"},  # "tea" + "tea" merge across the boundary
    {"prompt": "the dog", "completion": ""},
]
CHATS = [
    {"messages": [{"role": "user", "content": "Hello there!"},
                  {"role": "assistant", "content": "How are you?"},
                  {"role": "user", "content": "the cat"},
                  {"role": "assistant", "content": "sat on a mat."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "tea"},
                  {"role": "assistant", "content": "I am fine."}]},
]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    from tinylm.tokenizers.bpe import BPETokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer.train([TEXT], 400, special_tokens=SPECIALS).save(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_file):
    from tinylm.tokenizers import from_file

    return from_file(tok_file)


def fmt_for(tok, template="chatml", max_length=512):
    return Formatting(tok, tok.token_to_id("<|endoftext|>"), max_length,
                      ChatTemplate.builtin(template))


# --------------------------------------------------------------------------- TRL as the oracle


def generation_jinja(t: ChatTemplate) -> str:
    """A Jinja chat template that renders as ``t`` does, with TRL's {% generation %}
    markers around each assistant reply's content and suffix."""
    q = json.dumps
    parts = ["{%- for message in messages -%}"]
    for role in ("system", "user"):
        parts.append(f"{{%- if message['role'] == {q(role)} -%}}"
                     f"{{{{- {q(getattr(t, role + '_prefix'))} + message['content'] + "
                     f"{q(getattr(t, role + '_suffix'))} -}}}}{{%- endif -%}}")
    parts.append(f"{{%- if message['role'] == 'assistant' -%}}{{{{- {q(t.assistant_prefix)} "
                 f"-}}}}{{%- generation -%}}{{{{- message['content'] + "
                 f"{q(t.assistant_suffix)} -}}}}{{%- endgeneration -%}}{{%- endif -%}}")
    parts.append("{%- endfor -%}{%- if add_generation_prompt -%}"
                 f"{{{{- {q(t.generation_prompt)} -}}}}{{%- endif -%}}")
    return "".join(parts)


def trl_labels(tok_file, records, tmp_path, chat_template=None, **config):
    """TRL's SFTTrainer dataset preparation: [(input_ids, labels)] of ``records``."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_file),
                                              eos_token="<|endoftext|>")
    if chat_template is not None:
        hf.chat_template = chat_template
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(hf), n_embd=8, n_layer=1, n_head=2, n_positions=64,
        bos_token_id=0, eos_token_id=0))
    args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_length=512, report_to=[],
                         use_cpu=True, **config)
    trainer = trl.SFTTrainer(model=model, args=args, processing_class=hf,
                             train_dataset=datasets.Dataset.from_list(records))
    return [(row["input_ids"], row["labels"]) for row in trainer.train_dataset], hf


def test_prompt_completion_masks_equal_trls(tok, tok_file, tmp_path):
    theirs, hf = trl_labels(tok_file, PROMPT_COMPLETION, tmp_path)
    fmt = fmt_for(tok)
    for record, (ids, labels) in zip(PROMPT_COMPLETION, theirs, strict=True):
        text = record["prompt"] + record["completion"]
        assert hf(text)["input_ids"] == tok.encode(text, allowed_special="all")  # same ids
        mine = tokenize_record(record, fmt)
        assert mine[0].tolist() == ids
        assert mine[1].tolist() == labels
    assert theirs[2][1][0] == IGNORE and theirs[3][1][-1] != IGNORE  # eos is trained on


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_assistant_only_masks_equal_trls(tok, tok_file, tmp_path, template):
    t = ChatTemplate.builtin(template)
    theirs, _ = trl_labels(tok_file, CHATS, tmp_path, chat_template=generation_jinja(t),
                           assistant_only_loss=True)
    fmt = fmt_for(tok, template)
    for record, (ids, labels) in zip(CHATS, theirs, strict=True):
        mine = tokenize_record(record, fmt)
        assert mine[0].tolist() == ids
        assert mine[1].tolist() == labels
        assert any(label == IGNORE for label in labels)  # the prompts are masked


def test_text_records_train_on_every_token_with_eos_as_trl(tok, tok_file, tmp_path):
    records = [{"text": "the cat sat on a mat."}, {"text": "tea<|endoftext|>"}]
    theirs, _ = trl_labels(tok_file, records, tmp_path)
    for record, (ids, labels) in zip(records, theirs, strict=True):
        mine = tokenize_record(record, fmt_for(tok))
        assert (mine[0].tolist(), mine[1].tolist()) == (ids, labels)


def test_packing_equals_trls_bfd_and_padding_free_collator(tok):
    pytest.importorskip("torch")
    datasets = pytest.importorskip("datasets")
    trl_data = pytest.importorskip("trl.data_utils")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    fmt, max_length = fmt_for(tok), 40
    pairs = [fit_length(*tokenize_record(r, fmt), max_length)[:2]
             for r in PROMPT_COMPLETION * 3 + CHATS * 2]
    examples = Examples.from_lists(pairs)
    packed = pack(examples, max_length)
    ds = datasets.Dataset.from_dict({"input_ids": [p[0].tolist() for p in pairs],
                                     "labels": [p[1].tolist() for p in pairs]})
    rows = trl_data.pack_dataset(ds, max_length, strategy="bfd")
    assert len(rows) == len(packed)
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    for i, row in enumerate(rows):
        ids, labels = packed.item(i)
        assert ids.tolist() == row["input_ids"]
        out = collate([row])  # positions restart per example, the first labels masked
        assert labels.tolist() == out["labels"][0].tolist()
        a, b = packed.offsets[i], packed.offsets[i + 1]
        assert packed.positions[a:b].tolist() == out["position_ids"][0].tolist()
    assert len(packed) < len(examples) and packed.lengths.max() <= max_length


# --------------------------------------------------------------------------- batches


def test_a_batch_feeds_all_but_the_last_token_and_predicts_the_shifted_labels(tok):
    fmt = fmt_for(tok)
    pairs = [tokenize_record(r, fmt) for r in PROMPT_COMPLETION]
    ex = Examples.from_lists(pairs)
    batch = ex.batch([2, 0], pad_id=99)
    lengths = [len(pairs[2][0]), len(pairs[0][0])]
    T = max(lengths) - 1
    assert batch["ids"].shape == batch["targets"].shape == (2, T)
    for row, i in enumerate([2, 0]):
        ids, labels = pairs[i]
        n = len(ids) - 1
        assert batch["ids"][row, :n].tolist() == ids[:-1].tolist()
        assert batch["targets"][row, :n].tolist() == labels[1:].tolist()
        assert (batch["ids"][row, n:] == 99).all() and (batch["targets"][row, n:] == IGNORE).all()
    assert batch["n_tokens"] == sum(lengths) - 2 and "positions" not in batch
    assert "positions" in pack(ex, 64).batch([0], 0)


def test_example_batcher_resumes_the_same_sequence_and_visits_every_item_per_epoch(tok):
    pairs = [tokenize_record({"text": w}, fmt_for(tok)) for w in TEXT.split()[:11]]
    ex = Examples.from_lists(pairs)
    b = ExampleBatcher(ex, 4, seed=[3, 1])
    first = [b.next() for _ in range(2)]
    state = json.loads(json.dumps(b.state_dict()))
    after = [b.next()["ids"].tolist() for _ in range(5)]
    c = ExampleBatcher(ex, 4, seed=[9, 9])
    c.load_state_dict(state)
    assert [c.next()["ids"].tolist() for _ in range(5)] == after
    d = ExampleBatcher(ex, 11, seed=0)  # one batch = one epoch: every item once
    rows = sorted(map(tuple, d.next()["ids"].tolist()))
    assert rows == sorted(map(tuple, ex.batch(np.arange(11), 0)["ids"].tolist()))
    assert len(first) == 2


def test_split_is_seeded_and_eval_pass_covers_every_validation_example(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"the cat {w}"}) for w in TEXT.split()[:20]))
    data = ExampleData.read([path], fmt_for(tok), seed=5)
    train, val = data.split(0.2)
    assert (len(train), len(val)) == (16, 4)
    again = ExampleData.read([path], fmt_for(tok), seed=5).split(0.2)[1]
    assert np.array_equal(again.tokens, val.tokens)
    batches = list(in_order(val, 3))
    assert [b["ids"].shape[0] for b in batches] == [3, 1]


# --------------------------------------------------------------------------- bad records


@pytest.mark.parametrize("line, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"prompt": "' + "the cat " * 40 + '", "completion": "x"}', "context is 16"),
    ('{"prompt": "hi"}', "'completion' is missing"),
    ('{"input": "hi"}', "no 'prompt' + 'completion', 'messages' or 'text' field"),
    ('[1, 2]', "expected a JSON object"),
    ('{"prompt": 1, "completion": "x"}', "not a string"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role"),
    ('{"text": ', "not a JSON line"),
])
def test_a_bad_record_is_an_error_naming_its_line(tok, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "the cat"}\n\n' + line + "\n")
    with pytest.raises(InstructError, match="bad.jsonl:3") as info:
        ExampleData.read([path], fmt_for(tok, max_length=16))
    assert message in str(info.value)


def test_a_long_completion_is_cut_and_counted(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "the cat", "completion": " sat" * 40}))
    data = ExampleData.read([path], fmt_for(tok, max_length=16))
    assert data.n_cut == 1 and data.examples.lengths.tolist() == [16]
