"""``tinylm generate``: sample text from a model that ``tinylm train`` wrote.

    tinylm generate --model runs/demo --prompt "The " --max-new-tokens 300
"""

from __future__ import annotations

import click


@click.command(name="generate")
@click.option("-m", "--model", "model_dir", required=True,
              help="A run directory written by `tinylm train` (its --out).")
@click.option("-p", "--prompt", default=None,
              help="Text to continue [default: the start of a document].")
@click.option("-n", "--max-new-tokens", type=click.IntRange(min=0), default=200,
              show_default=True)
@click.option("-t", "--temperature", type=click.FloatRange(min=0), default=0.8,
              show_default=True, help="0 picks the most likely token every time.")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=1337, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def generate_command(model_dir, prompt, max_new_tokens, temperature, top_k, seed, device):
    """Continue --prompt with text sampled from the model in --model."""
    from tinylm.generate import sample
    from tinylm.objectives import EOT
    from tinylm.train import auto_threads, blas_threads, load_model_dir

    model, tokenizer = load_model_dir(model_dir, device)
    eot = tokenizer.token_to_id(EOT)
    if prompt:
        ids = tokenizer.encode(prompt)
    elif eot is not None:
        ids = [eot]
    else:
        raise click.UsageError("this tokenizer has no end-of-text token to start from; "
                               "give a --prompt")
    with blas_threads(auto_threads(model, device)):
        new = sample(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                     seed=seed)
    text = tokenizer.decode(new)
    click.echo((prompt or "") + text)
