"""Prompt builders (zero-shot, few-shot from JSONL, chain of thought), chat templates
(render, save/load beside the model) and `tinylm generate --chat / --few-shot / --cot`."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from click.testing import CliRunner
from generate_helpers import tiny_hf_gpt

from tinylm.cli import cli
from tinylm.commands.generate import Stopping, chat_loop
from tinylm.errors import TinyLMError
from tinylm.generate import cut_at_stop, generate
from tinylm.prompts import (
    CHAT_TEMPLATE_FILE, ChatTemplate, chain_of_thought, few_shot, load_examples, message_turns,
    zero_shot,
)
from tinylm.sampling import SamplingConfig

TEXT = "User: the cat sat on the mat.\nAssistant: the dog ran to see what it was.\n" * 20


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, prog_name="tinylm")


# --------------------------------------------------------------------------- builders


def test_zero_shot():
    assert zero_shot("Translate to French.", "cat") == \
        "Translate to French.\n\nInput: cat\nOutput:"
    assert zero_shot("Name a colour.") == "Name a colour.\n\nOutput:"


def test_few_shot_exact_output_and_k():
    examples = [("cat", "chat"), {"input": "dog", "output": "chien"}, ("bird", "oiseau")]
    assert few_shot("Translate to French.", examples, "horse") == (
        "Translate to French.\n\n"
        "Input: cat\nOutput: chat\n\n"
        "Input: dog\nOutput: chien\n\n"
        "Input: bird\nOutput: oiseau\n\n"
        "Input: horse\nOutput:")
    assert few_shot("", examples, "horse", k=1) == \
        "Input: cat\nOutput: chat\n\nInput: horse\nOutput:"
    assert few_shot("T.", examples, "q", k=0) == "T.\n\nInput: q\nOutput:"
    a = few_shot("T.", examples, "q", k=2, seed=4)
    assert a == few_shot("T.", examples, "q", k=2, seed=4) and a.count("Input:") == 3
    with pytest.raises(TinyLMError, match="k=4 but there are 3"):
        few_shot("T.", examples, "q", k=4)
    with pytest.raises(TinyLMError, match="'output'"):
        few_shot("T.", [{"input": "x"}], "q")


def test_message_turns_checks_a_records_messages():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert message_turns(msgs, "messages", "f:1") == [("user", "hi"), ("assistant", "yo")]
    assert message_turns([], "chosen", "f:1", allow_empty=True) == []

    class Mine(TinyLMError):
        pass

    for bad, fragment in [
        ("hi", "f:1: 'messages' must be a non-empty list of"),
        ([], "f:1: 'messages' must be a non-empty list of"),
        ([msgs[0], {"role": "robot", "content": "x"}], "f:1: message 1 of 'messages' must"),
        ([{"role": "user", "content": 3}], "f:1: message 0 of 'messages'"),
        (["hi"], "f:1: message 0 of 'messages'"),
        ([{"role": "robot", "content": "x" * 1000}], "f:1: message 0"),
        (["x" * 1000], "f:1: message 0"),
    ]:
        with pytest.raises(Mine) as info:
            message_turns(bad, "messages", "f:1", error=Mine)
        message = str(info.value)
        assert message.startswith(fragment) and "\n" not in message and len(message) <= 300


def test_chain_of_thought():
    assert chain_of_thought("What is 2 + 3?") == \
        "Q: What is 2 + 3?\nA: Let's think step by step."
    assert chain_of_thought("Why?", trigger="Because") == "Q: Why?\nA: Because"


def test_load_examples(tmp_path):
    path = tmp_path / "ex.jsonl"
    path.write_text('{"input": "a", "output": "b"}\n\n{"input": 1, "output": 2, "x": 0}\n',
                    encoding="utf-8")
    assert load_examples(path) == [("a", "b"), ("1", "2")]
    other = tmp_path / "qa.jsonl"
    other.write_text('{"q": "a", "a": "b"}\n', encoding="utf-8")
    assert load_examples(other, input_key="q", output_key="a") == [("a", "b")]


@pytest.mark.parametrize("lines, match", [
    ('{"input": "a", "output": "b"}\n{"input": "a", "output"\n', r"line 2: not valid JSON"),
    ('{"input": "a"}\n', r"line 1: missing key 'output'"),
    ('{"input": "a", "output": "b"}\n\n[1, 2]\n', r"line 3: expected a JSON object"),
])
def test_load_examples_errors_name_the_file_and_line(tmp_path, lines, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(lines, encoding="utf-8")
    with pytest.raises(TinyLMError, match=match) as info:
        load_examples(path)
    assert str(path) in str(info.value)
    with pytest.raises(TinyLMError, match="does not exist"):
        load_examples(tmp_path / "missing.jsonl")


def test_a_binary_examples_file_is_one_error(tmp_path):
    path = tmp_path / "photo.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")  # was: UnicodeDecodeError
    with pytest.raises(TinyLMError, match="line 1 is not valid UTF-8"):
        load_examples(path)
    result = run("generate", "-m", tmp_path, "--few-shot", path, "-p", "q")
    assert result.exit_code == 2 and "not valid UTF-8" in result.output
    assert "Traceback" not in result.output and result.exception is None or \
        isinstance(result.exception, SystemExit)


# --------------------------------------------------------------------------- chat templates

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]


def test_builtin_templates_render():
    plain = ChatTemplate.builtin("plain")
    assert plain.render(CONVERSATION) == (
        "System: Be brief.\nUser: hi\nAssistant: hello\nUser: bye\nAssistant: ")
    assert plain.render(CONVERSATION[:2], add_generation_prompt=False) == \
        "System: Be brief.\nUser: hi\n"
    chatml = ChatTemplate.builtin("chatml")
    assert chatml.render(CONVERSATION) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nbye<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert "<|im_end|>" in chatml.stop
    assert chatml.render([("user", "x")], add_generation_prompt=False) == \
        "<|im_start|>user\nx<|im_end|>\n"
    with pytest.raises(TinyLMError, match="role 'tool'"):
        plain.render([{"role": "tool", "content": "x"}])
    with pytest.raises(TinyLMError, match="no built-in chat template 'nope'"):
        ChatTemplate.builtin("nope")
    ChatTemplate.builtin("plain").stop.append("X")  # built-ins are copies
    assert "X" not in ChatTemplate.builtin("plain").stop


def test_template_save_load_round_trip(tmp_path):
    custom = ChatTemplate(name="mine", user_prefix="[U] ", user_suffix="\n",
                          assistant_prefix="[A] ", assistant_suffix="\n",
                          generation_prefix="[A]", stop=["[U]"])
    path = custom.save(tmp_path / "run")
    assert path == str(tmp_path / "run" / CHAT_TEMPLATE_FILE)
    stored = json.loads((tmp_path / "run" / CHAT_TEMPLATE_FILE).read_text())
    assert stored["version"] == 1 and stored["name"] == "mine"
    loaded = ChatTemplate.load(tmp_path / "run")
    assert loaded == custom and ChatTemplate.load(path) == custom
    assert loaded.render([("user", "q")]) == "[U] q\n[A]"
    for name in ("plain", "chatml"):
        ChatTemplate.builtin(name).save(tmp_path / name)
        assert ChatTemplate.load(tmp_path / name) == ChatTemplate.builtin(name)
    # resolution: explicit spec, else the model's stored template, else plain
    assert ChatTemplate.resolve(None, tmp_path / "run") == custom
    assert ChatTemplate.resolve(None, tmp_path / "empty") == ChatTemplate.builtin("plain")
    assert ChatTemplate.resolve("chatml", tmp_path / "run").name == "chatml"
    assert ChatTemplate.resolve(path) == custom
    with pytest.raises(TinyLMError, match="neither a built-in"):
        ChatTemplate.resolve(str(tmp_path / "nothing.json"))
    (tmp_path / "bad.json").write_text('{"version": 99}')
    with pytest.raises(TinyLMError, match="not a tinylm chat template"):
        ChatTemplate.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(TinyLMError, match="not valid JSON"):
        ChatTemplate.load(tmp_path / "broken.json")


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_hf_gpt(tmp_path_factory.mktemp("chatmodel"), TEXT, max_positions=128)


def expected_reply(model, tok, template, messages, n):
    eot = tok.token_to_id("<|endoftext|>")
    ids = tok.encode(template.render(messages))
    out = generate(model, [ids], n, temperature=0, top_k=200, stop=template.stop,
                   tokenizer=tok, eos_id=eot)
    return cut_at_stop(tok.decode([t for t in out.tokens[0] if t != eot]), template.stop)


def test_chat_prints_the_reply_and_exits(model_dir):
    path, model, tok = model_dir
    plain = ChatTemplate.builtin("plain")
    reply = expected_reply(model, tok, plain, [{"role": "user", "content": "hi"}], 12)
    assert reply.strip()
    result = run("generate", "-m", path, "--chat", "-t", 0, "-n", 12,
                 input="hi\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    assert result.output == reply + "\n"
    eof = run("generate", "-m", path, "--chat", "-t", 0, "-n", 12, input="hi\n")
    assert eof.exit_code == 0 and eof.output == reply + "\n"


def test_chat_keeps_the_history_and_uses_the_stored_template(model_dir, tmp_path):
    path, model, tok = model_dir
    chatml = ChatTemplate.builtin("chatml")
    messages = chat_loop(model, tok, chatml, "Be brief.", stopping=Stopping(max_new_tokens=8),
                         sampling=SamplingConfig(temperature=0, top_k=200),
                         stdin=io.StringIO("the cat\n\nthe dog\n/exit\n"))
    first = expected_reply(model, tok, chatml, messages[:2], 8)
    second = expected_reply(model, tok, chatml, messages[:4], 8)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user",
                                             "assistant"]
    assert messages[2]["content"] == first and messages[4]["content"] == second
    # a model directory with a chat_template.json chats with it by default
    stored = tmp_path / "stored"
    shutil.copytree(path, stored)
    chatml.save(stored)
    expect = expected_reply(model, tok, chatml, [{"role": "system", "content": "S"},
                                                 {"role": "user", "content": "hi"}], 8)
    result = run("generate", "-m", stored, "--chat", "--system", "S", "-t", 0, "-n", 8,
                 input="hi\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.output == expect + "\n"
    named = run("generate", "-m", path, "--chat", "--chat-template", "chatml", "--system",
                "S", "-t", 0, "-n", 8, input="hi\n")
    assert named.output == result.output


def test_few_shot_and_cot_build_the_prompt(model_dir, tmp_path):
    path, _, _ = model_dir
    examples = tmp_path / "ex.jsonl"
    examples.write_text('{"input": "the cat", "output": "sat"}\n'
                        '{"input": "the dog", "output": "ran"}\n', encoding="utf-8")
    built = few_shot("", load_examples(examples), "the mat", k=1)
    assert built == "Input: the cat\nOutput: sat\n\nInput: the mat\nOutput:"
    result = run("generate", "-m", path, "--few-shot", examples, "--k", 1, "-p", "the mat",
                 "-n", 5, "-t", 0, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["prompt"] == built
    streamed = run("generate", "-m", path, "--few-shot", examples, "-p", "the mat", "-n", 5,
                   "-t", 0)
    assert streamed.output.startswith(few_shot("", load_examples(examples), "the mat"))
    cot = run("generate", "-m", path, "--cot", "-p", "why?", "-n", 5, "-t", 0, "--json")
    assert json.loads(cot.output)["prompt"] == chain_of_thought("why?")


def test_prompt_flag_usage_errors(model_dir, tmp_path):
    path, _, _ = model_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "x"}\n')
    missing = run("generate", "-m", path, "--few-shot", bad, "-p", "q")
    assert missing.exit_code == 2 and "line 1: missing key 'output'" in missing.output
    for args, match in [(("--few-shot", bad), "--prompt"),
                        (("--cot", "-p", "q", "--few-shot", bad), "not both"),
                        (("-p", "q", "--k", 2), "--k goes with --few-shot"),
                        (("--chat", "-p", "q"), "--chat reads"),
                        (("-p", "q", "--system", "s"), "go with --chat")]:
        result = run("generate", "-m", path, *args)
        assert result.exit_code == 2 and match in result.output, (args, result.output)
