"""Prompt builders (zero-shot, few-shot, chain-of-thought) and chat templates.

    zero_shot("Translate to French.", "cat")
    few_shot("Translate to French.", load_examples("pairs.jsonl"), "dog", k=3)
    chain_of_thought("What is 12 * 3?")

    template = ChatTemplate.builtin("chatml")
    template.render([{"role": "user", "content": "hi"}])   # ends with the assistant prefix
    template.save("runs/demo")                              # runs/demo/chat_template.json
    ChatTemplate.load("runs/demo")

A prompt is laid out as blocks separated by a blank line: the instruction (left out
when empty), then each example as ``Input: ...`` / ``Output: ...`` lines, then the
query, whose ``Output:`` is left for the model to fill in.

A chat template wraps each message in its role's prefix and suffix; with
``add_generation_prompt`` the rendering ends with the assistant's generation prefix,
and the model's reply is cut at the first of the template's stop strings.
``tinylm generate --chat`` uses the ``chat_template.json`` stored beside the model
when there is one, or a GGUF model's ``tokenizer.chat_template``. That one is Jinja,
which tinylm does not run: ``from_jinja`` recognises ChatML (``<|im_start|>role\n
content<|im_end|>\n``, SmolLM2's and Qwen's), with the default system message a
template adds when the conversation has none; any other template falls back to
"plain", and ``resolve`` says so through its ``log``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
from dataclasses import dataclass, field

from tinylm.errors import TinyLMError

CHAT_TEMPLATE_FILE = "chat_template.json"
CHAT_TEMPLATE_VERSION = 1
ROLES = ("system", "user", "assistant")


# --------------------------------------------------------------------------- builders


def _example_block(input, output=None) -> str:
    out = "Output:" if output is None else f"Output: {output}"
    return f"Input: {input}\n{out}" if input is not None else out


def _join(instruction, blocks) -> str:
    return "\n\n".join(([instruction] if instruction else []) + list(blocks))


def zero_shot(instruction: str, input: str | None = None) -> str:
    """``instruction``, a blank line, then ``Input: input`` (when given) and
    ``Output:`` for the model to complete."""
    return _join(instruction, [_example_block(input)])


def _as_pair(example, i: int):
    if isinstance(example, dict):
        try:
            return str(example["input"]), str(example["output"])
        except KeyError as e:
            raise TinyLMError(f"few-shot example {i} has no {e.args[0]!r} key") from None
    try:
        input, output = example
    except (TypeError, ValueError):
        raise TinyLMError(f"few-shot example {i} is not an (input, output) pair or a dict "
                          f"with 'input' and 'output': {example!r}") from None
    return str(input), str(output)


def few_shot(instruction: str, examples, query: str, k: int | None = None,
             seed: int | None = None) -> str:
    """``instruction``, ``k`` solved examples (all when None; the first ``k``, or a
    random ``k`` drawn with ``seed`` when a seed is given), then ``query`` to solve.
    An example is an ``(input, output)`` pair or a dict with ``input`` and ``output``."""
    pairs = [_as_pair(e, i) for i, e in enumerate(examples)]
    if k is not None:
        if k < 0 or k > len(pairs):
            raise TinyLMError(f"few-shot k={k} but there are {len(pairs)} examples; "
                              f"give k between 0 and {len(pairs)}")
        pairs = random.Random(seed).sample(pairs, k) if seed is not None else pairs[:k]
    return _join(instruction, [_example_block(i, o) for i, o in pairs]
                 + [_example_block(query)])


def load_examples(jsonl_path, input_key: str = "input", output_key: str = "output") -> list:
    """The (input, output) pairs of a JSONL file: one JSON object per line, blank lines
    skipped. A bad line is a ``TinyLMError`` naming the file and the line number; so is
    a file that is not UTF-8 text."""
    from tinylm.tokenizers.formats import TEXT_FILE_HINT, decode_text, read_bytes

    path = os.fspath(jsonl_path)
    pairs = []
    text = decode_text(read_bytes(path, "few-shot examples file"), path, TEXT_FILE_HINT)
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise TinyLMError(f"{path}, line {n}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise TinyLMError(f"{path}, line {n}: expected a JSON object with "
                              f"{input_key!r} and {output_key!r}, got {type(record).__name__}")
        missing = [key for key in (input_key, output_key) if key not in record]
        if missing:
            raise TinyLMError(f"{path}, line {n}: missing key "
                              f"{' and '.join(repr(m) for m in missing)}")
        pairs.append((str(record[input_key]), str(record[output_key])))
    return pairs


def chain_of_thought(question: str, trigger: str = "Let's think step by step.") -> str:
    """``Q: question`` then ``A: trigger`` (zero-shot chain of thought)."""
    return f"Q: {question}\nA: {trigger}"


# --------------------------------------------------------------------------- messages


def message_turns(messages, field: str, where: str, *, error=TinyLMError,
                  allow_empty: bool = False) -> list:
    """[(role, content)] of a record's ``field``: a list of ``{"role": one of ROLES,
    "content": str}`` objects (non-empty unless ``allow_empty``), or ``error`` (a
    TinyLMError class) with a one-line message naming ``where`` and the bad message."""
    if not isinstance(messages, list) or not (messages or allow_empty):
        raise error(f"{where}: {field!r} must be a {'' if allow_empty else 'non-empty '}"
                    f"list of {{\"role\": ..., \"content\": ...}} messages, got "
                    f"{messages!r}"[:300])
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES \
                or not isinstance(m.get("content"), str):
            raise error(f"{where}: message {n} of {field!r} must be an object with a 'role' "
                        f"(one of {', '.join(ROLES)}) and a string 'content', got {m!r}"[:300])
    return [(m["role"], m["content"]) for m in messages]


# --------------------------------------------------------------------------- chat templates


@dataclass
class ChatTemplate:
    """How a conversation is laid out for the model: each role's prefix and suffix,
    the prefix that opens the assistant's reply, and where a reply stops."""

    name: str = "custom"
    system_prefix: str = ""
    system_suffix: str = ""
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    assistant_suffix: str = ""
    generation_prefix: str | None = None  # None: the assistant prefix
    stop: list = field(default_factory=list)
    default_system: str | None = None  # the system message when a conversation has none

    @property
    def generation_prompt(self) -> str:
        return self.assistant_prefix if self.generation_prefix is None \
            else self.generation_prefix

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        """The text of ``messages`` (dicts with ``role`` and ``content``, or
        ``(role, content)`` pairs), ending with the generation prefix if asked; the
        ``default_system`` message first when the first message is not a system one."""
        parts = []
        messages = list(messages)
        if self.default_system is not None and messages and _role(messages[0]) != "system":
            messages.insert(0, ("system", self.default_system))
        for i, message in enumerate(messages):
            if isinstance(message, dict):
                role, content = message.get("role"), message.get("content", "")
            else:
                role, content = message
            if role not in ROLES:
                raise TinyLMError(f"message {i} has role {role!r}; use one of "
                                  f"{', '.join(ROLES)}")
            parts.append(getattr(self, f"{role}_prefix") + str(content)
                         + getattr(self, f"{role}_suffix"))
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)

    def markup(self) -> list:
        """The template's own strings: every prefix and suffix."""
        return [getattr(self, f"{role}_{part}") for role in ROLES
                for part in ("prefix", "suffix")] + [self.generation_prompt]

    def special_tokens(self, tokenizer) -> set:
        """The special tokens of ``tokenizer`` that the markup spells (ChatML's
        ``<|im_start|>`` ...): a rendering encodes them as special tokens."""
        markup = self.markup()
        return {t for t in tokenizer.special_tokens if any(t in m for m in markup)}

    # ---- storage

    def to_dict(self) -> dict:
        data = {"version": CHAT_TEMPLATE_VERSION, **dataclasses.asdict(self)}
        if data["default_system"] is None:
            del data["default_system"]  # files stay readable by tinylm without the field
        return data

    @classmethod
    def from_dict(cls, data, source: str = "chat template") -> "ChatTemplate":
        if not isinstance(data, dict) or data.get("version") != CHAT_TEMPLATE_VERSION:
            raise TinyLMError(f"{source} is not a tinylm chat template (version "
                              f"{CHAT_TEMPLATE_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"version"})
        if unknown:
            raise TinyLMError(f"{source}: unknown field(s) {', '.join(unknown)}")
        values = {k: v for k, v in data.items() if k in names}
        stop = values.get("stop", [])
        values["stop"] = [stop] if isinstance(stop, str) else list(stop)
        return cls(**values)

    def save(self, run_dir) -> str:
        """Write ``run_dir/chat_template.json``; returns its path."""
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(os.fspath(run_dir), CHAT_TEMPLATE_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, ensure_ascii=False)
            f.write("\n")
        return path

    @classmethod
    def load(cls, path) -> "ChatTemplate":
        """The template in ``path``: a run directory's ``chat_template.json`` or that
        file itself."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CHAT_TEMPLATE_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise TinyLMError(f"no chat template at {path}") from None
        except ValueError as e:
            raise TinyLMError(f"chat template {path} is not valid JSON ({e})") from None
        return cls.from_dict(data, path)

    @classmethod
    def builtin(cls, name: str) -> "ChatTemplate":
        try:
            return dataclasses.replace(BUILTIN_TEMPLATES[name],
                                       stop=list(BUILTIN_TEMPLATES[name].stop))
        except KeyError:
            raise TinyLMError(f"no built-in chat template {name!r}; use one of "
                              f"{', '.join(BUILTIN_TEMPLATES)} or a JSON file") from None

    @classmethod
    def from_jinja(cls, text: str):
        """The template a Jinja chat template (a GGUF file's or a tokenizer_config's)
        spells, when tinylm recognises it (ChatML), else None."""
        if not isinstance(text, str) or not all(m in text for m in _CHATML_MARKS):
            return None
        template = dataclasses.replace(cls.builtin("chatml"), name="chatml")
        system = _JINJA_SYSTEM.search(text)
        if system and _NO_SYSTEM.search(text):
            template.default_system = system.group(1).replace("\\n", "\n")
        return template

    @classmethod
    def resolve(cls, spec=None, model_dir=None, log=None) -> "ChatTemplate":
        """``spec`` (a built-in name, a JSON file or a directory holding
        ``chat_template.json``); without one, the template stored in ``model_dir`` (a
        folder's ``chat_template.json``, a GGUF file's ``tokenizer.chat_template``),
        else "plain". ``log``: told when a GGUF template is not recognised."""
        if spec is None:
            if model_dir is not None and os.path.exists(
                    os.path.join(os.fspath(model_dir), CHAT_TEMPLATE_FILE)):
                return cls.load(model_dir)
            if model_dir is not None and os.path.isfile(model_dir):
                return cls._from_gguf(os.fspath(model_dir), log)
            return cls.builtin("plain")
        if spec in BUILTIN_TEMPLATES:
            return cls.builtin(spec)
        if os.path.exists(spec):
            return cls.load(spec)
        raise TinyLMError(f"chat template {spec!r} is neither a built-in "
                          f"({', '.join(BUILTIN_TEMPLATES)}) nor an existing file")


    @classmethod
    def _from_gguf(cls, path: str, log=None) -> "ChatTemplate":
        from tinylm.formats.gguf import GGUFError, read_gguf

        try:
            text = read_gguf(path).metadata.get("tokenizer.chat_template")
        except GGUFError:
            text = None
        template = cls.from_jinja(text)
        if template is None:
            if log is not None:
                what = "no chat template" if text is None else \
                    "a chat template tinylm does not recognise (it reads ChatML)"
                log(f"{path} has {what}; chatting with the plain template "
                    f"(pass --chat-template to choose one)")
            return cls.builtin("plain")
        return template


def _role(message):
    return message.get("role") if isinstance(message, dict) else message[0]


_CHATML_MARKS = ("<|im_start|>", "<|im_end|>", "<|im_start|>assistant", "add_generation_prompt")
# a literal system message inside a string of the template (no quote, no Jinja inside)
_JINJA_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)([^'\"{}]*?)<\|im_end\|>")
# ... that it adds when the first message is not a system one
_NO_SYSTEM = re.compile(r"""messages\[0\]\[['"]role['"]\]\s*!=\s*['"]system['"]""")


BUILTIN_TEMPLATES = {
    "plain": ChatTemplate(
        name="plain",
        system_prefix="System: ", system_suffix="\n",
        user_prefix="User: ", user_suffix="\n",
        assistant_prefix="Assistant: ", assistant_suffix="\n",
        stop=["\nUser:", "\nSystem:", "\nAssistant:"],
    ),
    "chatml": ChatTemplate(
        name="chatml",
        system_prefix="<|im_start|>system\n", system_suffix="<|im_end|>\n",
        user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n", assistant_suffix="<|im_end|>\n",
        stop=["<|im_end|>", "<|im_start|>"],
    ),
}
