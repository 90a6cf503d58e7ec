"""``tinylm generate``: sample text from a model that ``tinylm train`` wrote, or from a
Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json).

    tinylm generate --model runs/demo --prompt "The " --max-new-tokens 300
    tinylm generate -m hf/gpt2 --prompt-file prompt.txt -t 0 --stop "\\n\\n" --json
    tinylm generate -m runs/demo --chat --chat-template chatml --system "Be brief."
    tinylm generate -m runs/demo --few-shot examples.jsonl --k 3 -p "the query"

Text streams to stdout as tokens are produced (a character cut between tokens waits
for its last byte). Generation ends at the model's end-of-sequence token (its
config's eos_token_id, else the tokenizer's end-of-text token) unless --ignore-eos;
special tokens are not printed unless --show-special. ``--json`` prints one JSON
object at the end instead: the text, each token with its id, text and
log-probability under the model, and why it stopped.

The options arrive in groups, each built once into the object the library takes
(``tinylm.commands.options.option_group``): the sampling options into a
``SamplingConfig``, the prompt options into a ``Prompt``, and so on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import click

from tinylm.commands.options import (check_utf8, finite_float, non_empty_strings, option_group,
                                     utf8_text)
from tinylm.sampling import SamplingConfig

# --------------------------------------------------------------------------- option groups


@dataclass(frozen=True)
class ModelSource:
    """--model, --device, --half, --dequantize, --adapter: where the model is, how it
    runs, and the fine-tuned adapter put on it."""

    path: str
    device: str = "cpu"
    half: bool = False
    dequantize: bool | None = None
    adapter: str | None = None

    def load(self, path=None):
        """(model, tokenizer) of ``path`` (default: --model, with --adapter on it) on
        the device."""
        from tinylm.loading import load_model

        model, tokenizer = load_model(self.path if path is None else path, self.device,
                                      dequantize=self.dequantize)
        if path is None and self.adapter is not None:
            from tinylm.finetune import attach_adapter

            model = attach_adapter(model, self.adapter).eval()
        return model, tokenizer

    def precision(self):
        """The context the model runs in: float16 matrix products with --half."""
        from tinylm import amp

        return amp.autocast("float16", enabled=self.half)


def _model_source(model_dir, device, half, dequantize, adapter_dir) -> ModelSource:
    if half and device != "cuda":
        raise click.UsageError("--half needs --device cuda (float16 matrix products are "
                               "for the GPU; on the CPU they would only be slower)")
    return ModelSource(model_dir, device, half, dequantize or None, adapter_dir)


@dataclass(frozen=True)
class Prompt:
    """The prompt's text (None: start a document) and whether special tokens in it
    are encoded as such (--allow-special)."""

    text: str | None = None
    allow_special: bool = False


def _prompt(prompt, prompt_file, few_shot_file, k_shots, cot, allow_special) -> Prompt:
    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        prompt = _read_prompt_file(prompt_file)
    if k_shots is not None and not few_shot_file:
        raise click.UsageError("--k goes with --few-shot")
    if few_shot_file or cot:
        from tinylm.prompts import chain_of_thought, few_shot, load_examples

        if few_shot_file and cot:
            raise click.UsageError("give --few-shot or --cot, not both")
        if not prompt:
            raise click.UsageError("give the question to ask with --prompt or --prompt-file")
        if few_shot_file:
            examples = load_examples(few_shot_file)
            if not examples:
                raise click.UsageError(f"--few-shot {few_shot_file} holds no examples; give "
                                       f"a JSONL file of {{\"input\": ..., \"output\": ...}} "
                                       f"lines, or leave --few-shot out")
            prompt = few_shot("", examples, prompt, k=k_shots)
        else:
            prompt = chain_of_thought(prompt)
    return Prompt(prompt, allow_special)


def _read_prompt_file(file) -> str:
    """The text of an open binary --prompt-file: UTF-8 (a byte order mark dropped);
    anything else is one error line, not a traceback."""
    from tinylm.tokenizers.formats import TEXT_FILE_HINT, decode_text

    name = getattr(file, "name", None)
    name = "<stdin>" if name in (None, "-", "<stdin>") or not isinstance(name, str) else name
    return decode_text(file.read(), name, f"--prompt-file takes text: {TEXT_FILE_HINT}")


@dataclass(frozen=True)
class Stopping:
    """What ends the continuation: --max-new-tokens, --stop strings, and the model's
    end-of-sequence token unless --ignore-eos."""

    max_new_tokens: int = 200
    stop: tuple = ()
    ignore_eos: bool = False

    @property
    def eos_id(self):
        """What ``generate``'s ``eos_id`` gets: None (the model's) or () (none)."""
        return () if self.ignore_eos else None


@dataclass(frozen=True)
class Search:
    """--num-beams / --draft-model: beam search or speculative decoding instead of
    plain sampling."""

    num_beams: int = 1
    length_penalty: float = 1.0
    draft_dir: str | None = None
    draft_tokens: int = 4

    @property
    def plain(self) -> bool:
        return self.num_beams == 1 and self.draft_dir is None


def _search(num_beams, length_penalty, draft_dir, draft_tokens) -> Search:
    if num_beams > 1 and draft_dir is not None:
        raise click.UsageError("give --num-beams or --draft-model, not both")
    return Search(num_beams, length_penalty, draft_dir, draft_tokens)


@dataclass(frozen=True)
class Output:
    """--json and --show-special: how the result is printed."""

    as_json: bool = False
    show_special: bool = False


@dataclass(frozen=True)
class Chat:
    """--chat with its --chat-template and --system."""

    template: str | None = None
    system: str | None = None


def _chat(chat, chat_template, system_text) -> Chat | None:
    if not chat and (chat_template is not None or system_text is not None):
        raise click.UsageError("--chat-template and --system go with --chat")
    return Chat(chat_template, system_text) if chat else None


model_options = option_group(
    "model", _model_source,
    click.option("-m", "--model", "model_dir", required=True,
                 help="A run directory written by `tinylm train` (its --out), a Hugging "
                      "Face checkpoint directory with its tokenizer.json, a .gguf file, or "
                      "a folder written by `tinylm quantize`."),
    click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu",
                 show_default=True),
    click.option("--half", is_flag=True,
                 help="float16 matrix products (needs --device cuda)."),
    click.option("--dequantize", is_flag=True,
                 help="A quantized model (.gguf, tinylm quantize folder) with float32 "
                      "weights: faster, 4-8x the memory [default: packed weights on the "
                      "CPU]."),
    click.option("--adapter", "adapter_dir", default=None, metavar="DIR",
                 help="A fine-tuned adapter to put on --model: the --out folder of `tinylm "
                      "finetune --peft ...` or a PEFT adapter folder."))

prompt_options = option_group(
    "prompt", _prompt,
    click.option("-p", "--prompt", default=None, callback=utf8_text,
                 help="Text to continue [default: the start of a document]."),
    click.option("--prompt-file", type=click.File("rb"), default=None,
                 help="Read the prompt from this UTF-8 file ('-' for stdin)."),
    click.option("--few-shot", "few_shot_file", type=click.Path(dir_okay=False), default=None,
                 help="Build a few-shot prompt: solved examples from this JSONL file "
                      "({\"input\": ..., \"output\": ...} per line), then --prompt as the "
                      "query."),
    click.option("--k", "k_shots", type=click.IntRange(min=0), default=None,
                 help="--few-shot: use the first K examples [default: all]."),
    click.option("--cot", is_flag=True,
                 help="Chain of thought: ask --prompt as 'Q: ...' and start the answer with "
                      "\"Let's think step by step.\""),
    click.option("--allow-special", is_flag=True,
                 help="Encode special tokens in the prompt (<|endoftext|> ...) as the "
                      "special tokens they name [default: refuse them]."))

stopping_options = option_group(
    "stopping", lambda stop, **kw: Stopping(stop=tuple(stop), **kw),
    click.option("-n", "--max-new-tokens", type=click.IntRange(min=0), default=200,
                 show_default=True),
    click.option("--stop", multiple=True,
                 callback=lambda c, p, v: utf8_text(c, p, non_empty_strings(c, p, v)),
                 help="Stop when this text appears (repeatable)."),
    click.option("--ignore-eos", is_flag=True,
                 help="Go on past the model's end-of-sequence token."))

sampling_options = option_group(
    "sampling", SamplingConfig,
    click.option("-t", "--temperature", type=finite_float(min=0), default=0.8,
                 show_default=True, help="0 picks the most likely token every time."),
    click.option("-k", "--top-k", type=click.IntRange(min=1), default=200, show_default=True,
                 help="Sample among the K most likely tokens."),
    click.option("--top-p", type=finite_float(0, 1, min_open=True), default=None,
                 help="Nucleus sampling: keep the most likely tokens covering this mass."),
    click.option("--min-p", type=finite_float(0, 1), default=None,
                 help="Keep tokens at least this fraction as likely as the top one."),
    click.option("--repetition-penalty", type=finite_float(min=0, min_open=True), default=1.0,
                 show_default=True,
                 help="Make tokens already in the text less likely (transformers'; 1: off)."),
    click.option("--frequency-penalty", type=finite_float(), default=0.0, show_default=True,
                 help="Subtract this times a token's count in the reply from its logit "
                      "(OpenAI's)."),
    click.option("--presence-penalty", type=finite_float(), default=0.0, show_default=True,
                 help="Subtract this from the logit of each token the reply has used "
                      "(OpenAI's)."))

search_options = option_group(
    "search", _search,
    click.option("--num-beams", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Beam search with this many beams (deterministic; ignores sampling "
                      "options; prints when done)."),
    click.option("--length-penalty", type=finite_float(), default=1.0, show_default=True,
                 help="Beam search: a finished beam scores sum(log p) / length ** this."),
    click.option("--draft-model", "draft_dir", default=None,
                 help="Speculative decoding: a small model with the same tokenizer proposes "
                      "tokens that --model checks; the output is distributed exactly as "
                      "--model's own sampling (with -t 0: its greedy output)."),
    click.option("--draft-tokens", type=click.IntRange(min=1), default=4, show_default=True,
                 help="Speculative decoding: tokens the draft proposes per step."))

output_options = option_group(
    "output", Output,
    click.option("--json", "as_json", is_flag=True,
                 help="Print one JSON object with per-token log-probabilities."),
    click.option("--show-special", is_flag=True,
                 help="Print special tokens (<|endoftext|>, <pad> ...) as their text."))

chat_options = option_group(
    "chat", _chat,
    click.option("--chat", is_flag=True,
                 help="Interactive chat: read user lines from stdin until EOF or /exit and "
                      "stream each reply, rendering the conversation with a chat template."),
    click.option("--chat-template", "chat_template", default=None, metavar="NAME|FILE",
                 help="--chat: a built-in template (plain, chatml) or a JSON file [default: "
                      "the model's chat_template.json, else plain]."),
    click.option("--system", "system_text", default=None, callback=utf8_text,
                 help="--chat: a system message that opens the conversation."))

# --------------------------------------------------------------------------- loading


# --------------------------------------------------------------------------- the command


@click.command(name="generate")
@model_options
@prompt_options
@stopping_options
@sampling_options
@search_options
@click.option("--seed", type=click.IntRange(min=0), default=1337, show_default=True,
              help="Seed of the sampling (the same seed gives the same text).")
@output_options
@chat_options
def generate_command(model: ModelSource, prompt: Prompt, stopping: Stopping,
                     sampling: SamplingConfig, search: Search, seed: int, output: Output,
                     chat: Chat | None):
    """Continue --prompt with text sampled from the model in --model."""
    from tinylm.threads import blas_threads
    from tinylm.train import auto_threads

    if chat is not None and (prompt.text is not None or not search.plain or output.as_json):
        raise click.UsageError("--chat reads the conversation from stdin: leave out "
                               "--prompt, --few-shot, --cot, --num-beams, --draft-model "
                               "and --json")
    lm, tokenizer = model.load()
    run = Run(lm, tokenizer, stopping, output)
    with model.precision(), blas_threads(auto_threads(lm, model.device)):
        if chat is not None:
            from tinylm.prompts import ChatTemplate

            template = ChatTemplate.resolve(chat.template, model.path,
                                            log=lambda m: click.echo(m, err=True))
            chat_loop(lm, tokenizer, template, chat.system, stopping=stopping,
                      sampling=sampling, seed=seed, show_special=output.show_special,
                      allow_special=prompt.allow_special)
        elif search.plain:
            run.sample(prompt, sampling, seed)
        else:
            run.search(prompt, search, sampling, seed, model)


# --------------------------------------------------------------------------- running


def encode_prompt(tokenizer, text: str, allow_special=False) -> list:
    """``tokenizer.encode(text)``; special tokens in it are refused unless
    ``allow_special`` (True: all; or a set of their texts), and the refusal names
    the flag that allows them."""
    from tinylm.tokenizers import TokenizerError

    allowed = "all" if allow_special is True else (allow_special or ())
    try:
        return tokenizer.encode(text, allowed_special=allowed)
    except TokenizerError as e:
        if e.option == "allowed_special":
            raise e.with_advice("pass --allow-special to encode it as that special token, "
                                "or take it out of the prompt") from None
        raise


def decode(tokenizer, tokens, show_special: bool = False) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=not show_special)


class Printer:
    """``on_token`` for ``generate``: writes each token's text to stdout as it comes
    (special tokens left out unless ``show_special``), holding back split characters
    and text that may be the start of a stop string."""

    def __init__(self, tokenizer, stop=(), show_special: bool = False):
        from tinylm.generate import TextStream

        self.tokenizer, self.show_special = tokenizer, show_special
        self.stream = TextStream(stop)

    def __call__(self, row, token, logprob=None):
        data = self.tokenizer.decode_bytes([token], skip_special_tokens=not self.show_special)
        self.write(self.stream.feed(data))

    def finish(self):
        self.write(self.stream.finish() + "\n")

    @staticmethod
    def write(text: str):
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()


@dataclass
class Run:
    """One ``tinylm generate`` (not --chat): the loaded model and how to stop and print."""

    model: object
    tokenizer: object
    stopping: Stopping
    output: Output

    def ids(self, prompt: Prompt) -> list:
        from tinylm.objectives import EOT

        if prompt.text:
            return encode_prompt(self.tokenizer, prompt.text, prompt.allow_special)
        eot = self.tokenizer.token_to_id(EOT)
        if eot is None:
            raise click.UsageError("this tokenizer has no end-of-text token to start from; "
                                   "give a --prompt")
        return [eot]

    def echo(self, prompt: Prompt) -> str:
        """The prompt as printed before a decoder's continuation (a decoder continues
        it; an encoder-decoder answers it)."""
        from tinylm.objectives import model_kind

        return (prompt.text or "") if model_kind(self.model) == "decoder" else ""

    def text(self, tokens) -> str:
        from tinylm.generate import cut_at_stop

        return cut_at_stop(decode(self.tokenizer, tokens, self.output.show_special),
                           self.stopping.stop)

    def sample(self, prompt: Prompt, sampling: SamplingConfig, seed: int) -> None:
        """Stream a sampled continuation (or print it as JSON at the end)."""
        from tinylm.generate import generate

        ids, s = self.ids(prompt), self.stopping
        printer = None if self.output.as_json else Printer(self.tokenizer, s.stop,
                                                           self.output.show_special)
        if printer is not None:
            printer.write(self.echo(prompt))
        out = generate(self.model, [ids], s.max_new_tokens, sampling=sampling, eos_id=s.eos_id,
                       stop=s.stop, tokenizer=self.tokenizer, seed=seed, on_token=printer)
        if printer is not None:
            printer.finish()
        else:
            self.report(prompt, out.tokens[0], out.finish_reasons[0], logprobs=out.logprobs[0])

    def search(self, prompt: Prompt, search: Search, sampling: SamplingConfig, seed: int,
               source: ModelSource) -> None:
        """Beam search or speculative decoding; prints when done."""
        from tinylm.generate import beam_search, speculative_sample

        ids, s, extra = self.ids(prompt), self.stopping, {}
        if search.num_beams > 1:
            found = beam_search(self.model, [ids], s.max_new_tokens, num_beams=search.num_beams,
                                length_penalty=search.length_penalty, eos_id=s.eos_id,
                                tokenizer=self.tokenizer)
            tokens, extra["score"] = found.tokens[0], found.scores[0]
        else:
            draft, _ = source.load(search.draft_dir)
            found = speculative_sample(self.model, draft, ids, s.max_new_tokens,
                                       k=search.draft_tokens, sampling=sampling, seed=seed,
                                       eos_id=s.eos_id, tokenizer=self.tokenizer)
            tokens = found.tokens
            extra.update(proposed=found.proposed, accepted=found.accepted)
        if self.output.as_json:
            self.report(prompt, tokens, self.finish_reason(tokens), **extra)
        else:
            click.echo(self.echo(prompt) + self.text(tokens))

    def finish_reason(self, tokens) -> str:
        from tinylm.generate import cut_at_stop, resolve_eos

        if tokens and tokens[-1] in resolve_eos(self.model, self.stopping.eos_id,
                                                 self.tokenizer):
            return "eos"
        full = self.tokenizer.decode(tokens)
        return "stop" if cut_at_stop(full, self.stopping.stop) != full else "length"

    def report(self, prompt: Prompt, tokens, finish_reason: str, logprobs=None, **extra):
        """The --json record: the text, why it stopped, and every token."""
        rows = [{"id": t, "text": self.tokenizer.decode([t])} for t in tokens]
        for row, lp in zip(rows, logprobs or ()):
            row["logprob"] = lp
        click.echo(json.dumps({"prompt": prompt.text or "", "text": self.text(tokens),
                               "finish_reason": finish_reason, **extra, "tokens": rows},
                              ensure_ascii=False))


# --------------------------------------------------------------------------- chat


def chat_loop(model, tokenizer, template, system=None, *, stopping: Stopping = Stopping(),
              sampling: SamplingConfig | None = None, seed=None, stdin=None,
              show_special: bool = False, allow_special: bool = False):
    """``tinylm generate --chat``: read a user line, render the whole conversation with
    ``template``, stream the reply (cut at the template's and ``stopping``'s strings,
    ended by the model's eos), add it to the history; until EOF or ``/exit``. Special
    tokens of the template's own markup are encoded as such; others in what the user
    types only with ``allow_special``. Returns the conversation."""
    import numpy as np

    from tinylm.generate import cut_at_stop, generate

    stdin = stdin if stdin is not None else sys.stdin
    stops = list(template.stop) + list(stopping.stop)
    allowed = True if allow_special else template.special_tokens(tokenizer)
    rng = np.random.default_rng(seed)
    messages = [{"role": "system", "content": system}] if system else []
    for line in _user_lines(stdin):
        messages.append({"role": "user", "content": line})
        ids = encode_prompt(tokenizer, template.render(messages, add_generation_prompt=True),
                            allowed)
        printer = Printer(tokenizer, stops, show_special)
        out = generate(model, [ids], stopping.max_new_tokens, sampling=sampling,
                       eos_id=stopping.eos_id, stop=stops, tokenizer=tokenizer, seed=rng,
                       on_token=printer)
        printer.finish()
        messages.append({"role": "assistant",
                         "content": cut_at_stop(decode(tokenizer, out.tokens[0]), stops)})
    return messages


def _user_lines(stdin):
    """The non-blank lines read from ``stdin`` (a "> " prompt on a terminal), until EOF
    or ``/exit``."""
    interactive = stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        line = check_utf8(line.rstrip("\r\n"), "a line read from standard input")
        if line.strip():
            yield line
