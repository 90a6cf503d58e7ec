"""``tinylm generate``: sample text from a model that ``tinylm train`` wrote, or from a
Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json).

    tinylm generate --model runs/demo --prompt "The " --max-new-tokens 300
    tinylm generate -m hf/gpt2 --prompt-file prompt.txt -t 0 --stop "\\n\\n" --json
    tinylm generate -m runs/demo --chat --chat-template chatml --system "Be brief."
    tinylm generate -m runs/demo --few-shot examples.jsonl --k 3 -p "the query"

Text streams to stdout as tokens are produced (a character cut between tokens waits
for its last byte). ``--json`` prints one JSON object at the end instead: the text,
each token with its id, text and log-probability under the model, and why it stopped.
"""

from __future__ import annotations

import json
import os
import sys

import click


def load_for_generation(path, device: str = "cpu"):
    """(model, tokenizer) of a tinylm run directory or a Hugging Face directory."""
    from tinylm.errors import CheckpointError
    from tinylm.train import load_model_dir

    path = os.fspath(path)
    if not os.path.exists(os.path.join(path, "tokenizer.txt")) and os.path.isdir(path) \
            and os.path.exists(os.path.join(path, "config.json")):
        from tinylm.models.hf import load_pretrained
        from tinylm.tokenizers import from_file

        for name in ("tokenizer.json", "vocab.json"):
            if os.path.exists(os.path.join(path, name)):
                return load_pretrained(path).to(device), from_file(os.path.join(path, name))
        raise CheckpointError(f"{path} has a config.json but no tokenizer (tokenizer.txt, "
                              f"tokenizer.json or vocab.json + merges.txt); add one")
    return load_model_dir(path, device)


@click.command(name="generate")
@click.option("-m", "--model", "model_dir", required=True,
              help="A run directory written by `tinylm train` (its --out), or a Hugging "
                   "Face checkpoint directory with its tokenizer.json.")
@click.option("-p", "--prompt", default=None,
              help="Text to continue [default: the start of a document].")
@click.option("--prompt-file", type=click.File("r", encoding="utf-8"), default=None,
              help="Read the prompt from this file ('-' for stdin).")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=0), default=200,
              show_default=True)
@click.option("-t", "--temperature", type=click.FloatRange(min=0), default=0.8,
              show_default=True, help="0 picks the most likely token every time.")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Nucleus sampling: keep the most likely tokens covering this mass.")
@click.option("--min-p", type=click.FloatRange(0, 1), default=None,
              help="Keep tokens at least this fraction as likely as the top one.")
@click.option("--repetition-penalty", type=click.FloatRange(min=0, min_open=True),
              default=1.0, show_default=True)
@click.option("--frequency-penalty", type=float, default=0.0, show_default=True)
@click.option("--presence-penalty", type=float, default=0.0, show_default=True)
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@click.option("--num-beams", type=click.IntRange(min=1), default=1, show_default=True,
              help="Beam search with this many beams (deterministic; ignores sampling "
                   "options; prints when done).")
@click.option("--length-penalty", type=float, default=1.0, show_default=True,
              help="Beam search: a finished beam scores sum(log p) / length ** this.")
@click.option("--draft-model", "draft_dir", default=None,
              help="Speculative decoding: a small model with the same tokenizer proposes "
                   "tokens that --model checks; the output is distributed exactly as "
                   "--model's own sampling (with -t 0: its greedy output).")
@click.option("--draft-tokens", type=click.IntRange(min=1), default=4, show_default=True,
              help="Speculative decoding: tokens the draft proposes per step.")
@click.option("--seed", type=click.IntRange(min=0), default=1337, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object with per-token log-probabilities.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--chat", is_flag=True,
              help="Interactive chat: read user lines from stdin until EOF or /exit and "
                   "stream each reply, rendering the conversation with a chat template.")
@click.option("--chat-template", "chat_template", default=None, metavar="NAME|FILE",
              help="--chat: a built-in template (plain, chatml) or a JSON file [default: "
                   "the model's chat_template.json, else plain].")
@click.option("--system", "system_text", default=None,
              help="--chat: a system message that opens the conversation.")
@click.option("--few-shot", "few_shot_file", type=click.Path(dir_okay=False), default=None,
              help="Build a few-shot prompt: solved examples from this JSONL file "
                   "({\"input\": ..., \"output\": ...} per line), then --prompt as the query.")
@click.option("--k", "k_shots", type=click.IntRange(min=0), default=None,
              help="--few-shot: use the first K examples [default: all].")
@click.option("--cot", is_flag=True,
              help="Chain of thought: ask --prompt as 'Q: ...' and start the answer with "
                   "\"Let's think step by step.\"")
def generate_command(model_dir, prompt, prompt_file, max_new_tokens, temperature, top_k, top_p,
                     min_p, repetition_penalty, frequency_penalty, presence_penalty, stop,
                     num_beams, length_penalty, draft_dir, draft_tokens, seed, as_json, device,
                     chat=False, chat_template=None, system_text=None, few_shot_file=None,
                     k_shots=None, cot=False):
    """Continue --prompt with text sampled from the model in --model."""
    from tinylm.generate import (
        TextStream, beam_search, cut_at_stop, generate, speculative_sample,
    )
    from tinylm.objectives import EOT, model_kind
    from tinylm.threads import blas_threads
    from tinylm.train import auto_threads

    if prompt is not None and prompt_file is not None:
        raise click.UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        prompt = prompt_file.read()
    if chat:
        if prompt is not None or few_shot_file or cot or num_beams > 1 or draft_dir or as_json:
            raise click.UsageError("--chat reads the conversation from stdin: leave out "
                                   "--prompt, --few-shot, --cot, --num-beams, --draft-model "
                                   "and --json")
    elif chat_template is not None or system_text is not None:
        raise click.UsageError("--chat-template and --system go with --chat")
    if k_shots is not None and not few_shot_file:
        raise click.UsageError("--k goes with --few-shot")
    if few_shot_file or cot:
        from tinylm.prompts import chain_of_thought, few_shot, load_examples

        if few_shot_file and cot:
            raise click.UsageError("give --few-shot or --cot, not both")
        if not prompt:
            raise click.UsageError("give the question to ask with --prompt or --prompt-file")
        prompt = (few_shot("", load_examples(few_shot_file), prompt, k=k_shots)
                  if few_shot_file else chain_of_thought(prompt))
    model, tokenizer = load_for_generation(model_dir, device)
    if chat:
        from tinylm.prompts import ChatTemplate

        template = ChatTemplate.resolve(chat_template, model_dir)
        return chat_loop(model, tokenizer, template, system_text, max_new_tokens=max_new_tokens,
                         stop=stop, seed=seed, device=device, temperature=temperature,
                         top_k=top_k, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty,
                         frequency_penalty=frequency_penalty, presence_penalty=presence_penalty)
    eot = tokenizer.token_to_id(EOT)
    if prompt:
        ids = tokenizer.encode(prompt)
    elif eot is not None:
        ids = [eot]
    else:
        raise click.UsageError("this tokenizer has no end-of-text token to start from; "
                               "give a --prompt")
    echo = prompt if model_kind(model) == "decoder" and prompt else ""
    if num_beams > 1 or draft_dir is not None:
        if num_beams > 1 and draft_dir is not None:
            raise click.UsageError("give --num-beams or --draft-model, not both")
        extra = {}
        with blas_threads(auto_threads(model, device)):
            if num_beams > 1:
                found = beam_search(model, [ids], max_new_tokens, num_beams=num_beams,
                                    length_penalty=length_penalty, eos_id=eot)
                new, extra["score"] = found.tokens[0], found.scores[0]
            else:
                draft, _ = load_for_generation(draft_dir, device)
                found = speculative_sample(model, draft, ids, max_new_tokens, k=draft_tokens,
                                           temperature=temperature, seed=seed)
                new = found.tokens
                extra.update(proposed=found.proposed, accepted=found.accepted)
        text = cut_at_stop(tokenizer.decode(new), stop)
        if as_json:
            click.echo(json.dumps({"prompt": prompt or "", "text": text, **extra,
                                   "tokens": [{"id": t, "text": tokenizer.decode([t])}
                                              for t in new]}, ensure_ascii=False))
        else:
            click.echo(echo + text)
        return
    stream = TextStream(stop)

    def on_token(row, token, logprob):
        if not as_json:
            text = stream.feed(tokenizer.decode_bytes([token]))
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()

    if not as_json and echo:
        sys.stdout.write(echo)
        sys.stdout.flush()
    with blas_threads(auto_threads(model, device)):
        out = generate(model, [ids], max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
                       frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
                       stop=stop, tokenizer=tokenizer, seed=seed, on_token=on_token)
    tokens, logprobs = out.tokens[0], out.logprobs[0]
    if as_json:
        record = {
            "prompt": prompt or "",
            "text": cut_at_stop(tokenizer.decode(tokens), stop),
            "finish_reason": out.finish_reasons[0],
            "tokens": [{"id": t, "text": tokenizer.decode([t]), "logprob": lp}
                       for t, lp in zip(tokens, logprobs)],
        }
        click.echo(json.dumps(record, ensure_ascii=False))
        return
    sys.stdout.write(stream.finish() + "\n")
    sys.stdout.flush()


def chat_loop(model, tokenizer, template, system=None, *, max_new_tokens=200, stop=(),
              seed=None, device="cpu", stdin=None, **sampling):
    """``tinylm generate --chat``: read a user line, render the whole conversation with
    ``template``, stream the reply (cut at the template's and ``stop``'s strings), add
    it to the history; until EOF or ``/exit``. Returns the conversation."""
    import numpy as np

    from tinylm.generate import TextStream, cut_at_stop, generate
    from tinylm.objectives import EOT
    from tinylm.threads import blas_threads
    from tinylm.train import auto_threads

    stdin = stdin if stdin is not None else sys.stdin
    stops = list(template.stop) + [s for s in stop if s]
    eot = tokenizer.token_to_id(EOT)
    rng = np.random.default_rng(seed)
    messages = [{"role": "system", "content": system}] if system else []
    interactive = stdin.isatty()
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.rstrip("\r\n")
        if line.strip() == "/exit":
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.encode(template.render(messages, add_generation_prompt=True))
        stream = TextStream(stops)

        def on_token(row, token, logprob, stream=stream):
            if token == eot:
                return
            text = stream.feed(tokenizer.decode_bytes([token]))
            if text:
                sys.stdout.write(text)
                sys.stdout.flush()

        with blas_threads(auto_threads(model, device)):
            out = generate(model, [ids], max_new_tokens, stop=stops, tokenizer=tokenizer,
                           eos_id=eot, seed=rng, on_token=on_token, **sampling)
        sys.stdout.write(stream.finish() + "\n")
        sys.stdout.flush()
        reply = [t for t in out.tokens[0] if t != eot]
        messages.append({"role": "assistant",
                         "content": cut_at_stop(tokenizer.decode(reply), stops)})
    return messages
