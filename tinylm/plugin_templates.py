"""The files ``tinylm plugins new`` writes (``tinylm.plugin_skeleton``), as
``string.Template`` texts: ``${module}``, ``${short}``, ``${cls}``, ``${dist}``,
``${registry}``, ``${hook}``, ``${kind}`` are filled in. One module per kind of plugin
and its test; the package files and the entry-point test are shared.

Each module uses only tinylm's public API (docs/plugins.md, "The public API"), so what
an author starts from is what a published plugin may import.
"""

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "${dist}"
version = "0.1.0"
description = "A tinylm plugin (${kind}): ${short}"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["tinylm"]

[project.optional-dependencies]
test = ["pytest"]

# tinylm finds the plugin through this group: the entry-point name is the plugin's
# name, its value the module with the @hookimpl functions.
[project.entry-points.tinylm]
${short} = "${module}"

[tool.setuptools]
packages = ["${module}"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

README = '''\
# ${dist}

A [tinylm](https://github.com/) plugin that registers the ${kind} `${short}` through
the `${hook}` hook.

```console
$$ pip install ./${folder}          # or: pip install -e ./${folder} while you work on it
$$ tinylm plugins                   # lists ${short} and what it registers
$$ python -m pytest ${folder}/tests
```

The guide to growing this into a published package is tinylm's `docs/plugins.md`.
'''

TEST_HEADER = '''\
"""Tests of the ${short} plugin: registered programmatically (no install needed), and
found through its entry point once installed (`pip install .`)."""

import importlib.metadata
import json

import numpy as np
import pytest
from click.testing import CliRunner

import tinylm
from tinylm import plugins
from tinylm.cli import cli

import ${module}


@pytest.fixture(autouse=True)
def only_builtins(monkeypatch):
    """Each test starts from tinylm's built-ins: no installed plugin loads by accident."""
    monkeypatch.setenv("TINYLM_LOAD_PLUGINS", "")
    plugins.reset()
    yield
    plugins.reset()

'''

TEST_ENTRY_POINT = '''

def test_tinylm_finds_the_installed_package(monkeypatch):
    """After `pip install .`, tinylm loads the plugin through its entry point and
    `tinylm plugins` lists what it registers."""
    if not any(ep.name == "${short}" for ep in importlib.metadata.entry_points(group="tinylm")):
        pytest.skip("${dist} is not installed: run `pip install .` first")
    monkeypatch.setenv("TINYLM_LOAD_PLUGINS", "${short}")
    plugins.reset()
    assert plugins.registered_by("${registry}")["${short}"] == "${short}"
    listed = CliRunner().invoke(cli, ["plugins", "--json"])
    assert listed.exit_code == 0, listed.output
    mine = [p for p in json.loads(listed.output) if p["name"] == "${short}"]
    assert mine and mine[0]["registers"] == {"${registry}": ["${short}"]}
'''

# --------------------------------------------------------------------------- kinds

TOKENIZER = '''\
"""${short}: a tinylm tokenizer plugin (one token per UTF-8 byte, to start from)."""

from tinylm import hookimpl
from tinylm.tokenizers import Tokenizer, TokenizerError
from tinylm.tokenizers.base import atomic_write, bad_ids_error
from tinylm.tokenizers.formats import PlainReader, PlainWriter


class ${cls}Tokenizer(Tokenizer):
    """Text -> its UTF-8 bytes; no special tokens. The methods are tinylm's tokenizer
    interface (docs/plugins.md): replace the byte mapping with your algorithm."""

    name = "${short}"  # the registry name, and the name in its saved files
    vocab_size = 256

    def encode(self, text, *, allowed_special=(), disallowed_special="all"):
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, not {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids, *, skip_special_tokens=False):
        ids = list(ids)
        if not all(isinstance(i, int) and 0 <= i < 256 for i in ids):
            raise bad_ids_error(ids, self.vocab_size)
        return bytes(ids)  # decode() comes from Tokenizer: these bytes as UTF-8

    def token_to_id(self, token):
        data = token.encode("utf-8")
        return data[0] if len(data) == 1 else None

    def id_to_token(self, id):
        return chr(id) if isinstance(id, int) and 0 <= id < 128 else None

    def save(self, path, format=None):
        atomic_write(path, PlainWriter(self.name, 1).text())  # "tinylm-tokenizer ${short} 1"

    @classmethod
    def load(cls, path):
        PlainReader(path, cls.name).end()
        return cls()


@hookimpl
def register_tokenizers(register):
    register("${short}", ${cls}Tokenizer)
'''

TEST_TOKENIZER = '''\
def test_round_trip_and_files(tmp_path):
    from tinylm.tokenizers import from_file

    plugins.register_plugin(${module})
    cls = plugins.get_tokenizer_class("${short}")
    tok = cls()
    text = "héllo, wörld"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("A") == [65] and tok.id_to_token(65) == "A"
    tok.save(tmp_path / "tok.txt")
    assert isinstance(from_file(tmp_path / "tok.txt"), cls)
'''

POSITIONAL = '''\
"""${short}: a tinylm positional-encoding plugin (scaled sinusoidal, to start from)."""

import numpy as np

from tinylm import hookimpl, nn
from tinylm.positional import PositionalEncoding, sinusoidal_table


class ${cls}Positional(PositionalEncoding):
    """Sinusoidal waves times one learned scalar ("scaled sinusoidal", Hua et al. 2022):
    the model learns how loud positions are beside the tokens. A scheme overrides the
    hooks it needs: embed (absolute), rotation (rotary), position_bias (relative)."""

    def __init__(self, d_model: int, base: float = 10000.0):
        super().__init__()
        self.d_model, self.base = d_model, float(base)
        self.scale = nn.Parameter(np.full((1,), d_model ** -0.5, np.float32))

    @classmethod
    def from_dims(cls, dims, **options):  # dims: d_model, n_head, head_dim, max_positions
        return cls(dims.d_model, **options)

    def embed(self, x, positions):
        """x (B, T, d) + scale * PE[positions] (T, d) or (B, T, d)."""
        table = sinusoidal_table(positions, self.d_model, self.base, xp=x.xp)
        return x + self.scale * table.astype(x.dtype)


@hookimpl
def register_positional_encodings(register):
    register("${short}", ${cls}Positional)
'''

TEST_POSITIONAL = '''\
def test_a_model_uses_it_and_learns_its_scale():
    from tinylm.models import GPT2Config, build_model

    plugins.register_plugin(${module})
    tinylm.seed(0)
    config = GPT2Config(vocab_size=20, d_model=16, n_layer=1, n_head=2, max_positions=8,
                        positional="${short}")
    model = build_model(config)
    assert isinstance(model.transformer.pos, ${module}.${cls}Positional)
    ids = np.array([[3, 3, 3, 3]])
    logits = model(ids).logits.numpy()  # (1, 4, 20)
    assert logits.shape == (1, 4, 20)
    assert not np.allclose(logits[0, 1], logits[0, 2])  # same token, other position
    model(ids, targets=ids).loss.backward()
    assert model.transformer.pos.scale.grad is not None
'''

OBJECTIVE = '''\
"""${short}: a tinylm training-objective plugin (causal LM on the last half, to start from)."""

from tinylm import hookimpl
from tinylm.objectives import IGNORE, Objective


class ${cls}Objective(Objective):
    """Causal LM that only learns to predict the later part of each window."""

    name = "${short}"
    kinds = ("decoder",)  # model kinds it trains: decoder, encoder, encoder-decoder
    options = {"start": 0.5}  # tinylm train --set objective_options.start=0.25

    def make_batch(self, windows, rng):
        """windows (B, block + 1) int64 -> inputs (B, block) and targets (B, block)."""
        targets = windows[:, 1:].copy()
        targets[:, : int(targets.shape[1] * self.start)] = IGNORE
        return {"ids": windows[:, :-1], "targets": targets}

    def loss(self, model, batch):
        return model(batch["ids"], targets=batch["targets"]).loss


@hookimpl
def register_objectives(register):
    register("${short}", ${cls}Objective)
'''

TEST_OBJECTIVE = '''\
def test_batches_and_loss():
    from tinylm.models import GPT2Config, build_model
    from tinylm.objectives import IGNORE

    plugins.register_plugin(${module})
    objective = plugins.get_objective("${short}")(start=0.25)
    windows = np.random.default_rng(0).integers(0, 20, (3, 9))
    batch = objective.make_batch(windows, np.random.default_rng(1))
    assert batch["ids"].shape == batch["targets"].shape == (3, 8)
    assert (batch["targets"][:, :2] == IGNORE).all() and (batch["targets"][:, 2:] >= 0).all()
    tinylm.seed(0)
    model = build_model(GPT2Config(vocab_size=20, d_model=16, n_layer=1, n_head=2,
                                   max_positions=8))
    loss = objective.loss(model, batch)
    loss.backward()
    assert np.isfinite(float(loss.item())) and model.tok_emb.weight.grad is not None
'''

PEFT = '''\
"""${short}: a tinylm PEFT-method plugin (a learned scale per output, to start from)."""

import dataclasses

import numpy as np

from tinylm import hookimpl, nn, peft


@dataclasses.dataclass(frozen=True)
class ${cls}Config(peft.PeftConfig):
    """The method's options (frozen; validate them in __post_init__)."""

    target_modules: tuple = ("lm_head",)


class ${cls}Adapter(peft.Adapter):
    """y -> y * s: one trainable number per output feature of the host Linear."""

    method = "${short}"

    def __init__(self, name, n):
        super().__init__(name)
        self.s = nn.Parameter(np.ones(n, np.float32))

    def after(self, host, args, kwargs, y):
        return y * self.s


class ${cls}Method(peft.PeftMethod):
    name, config_class = "${short}", ${cls}Config

    def attach(self, model, config, adapter_name):
        targets = peft.resolve(model, config.target_modules)  # every target, then install
        for t in targets:
            peft.install(t.host, ${cls}Adapter(adapter_name, t.host.out_features))
        return [t.host_name for t in targets]


@hookimpl
def register_peft_methods(register):
    register("${short}", ${cls}Method)
'''

TEST_PEFT = '''\
def test_adapter_starts_as_identity_and_trains_alone():
    from tinylm import peft
    from tinylm.models import GPT2Config, build_model

    plugins.register_plugin(${module})
    tinylm.seed(0)
    model = build_model(GPT2Config(vocab_size=20, d_model=16, n_layer=1, n_head=2,
                                   max_positions=8, tie_embeddings=False))
    ids = np.array([[1, 2, 3]])
    before = model(ids).logits.numpy()
    model = peft.apply(model, "${short}")
    np.testing.assert_array_equal(model(ids).logits.numpy(), before)
    assert peft.trainable_parameters(model).trainable == 20  # one scale per vocab entry
    model(ids, targets=ids).loss.backward()
    assert model.tok_emb.weight.grad is None  # the base is frozen
'''

ARCHITECTURE = '''\
"""${short}: a tinylm architecture plugin (a Llama-shaped decoder with ALiBi, to start from)."""

from dataclasses import dataclass
from typing import ClassVar

from tinylm import hookimpl
from tinylm.models import Architecture, Decoder, LlamaConfig


@dataclass
class ${cls}Config(LlamaConfig):
    """Llama's blocks (RMSNorm, SwiGLU, no biases) with ALiBi instead of RoPE, and small
    defaults. The model class is tinylm's Decoder; a family of your own subclasses
    tinylm.models.Model and sets ``kind``."""

    architecture: ClassVar[str] = "${short}"
    vocab_size: int = 256
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_ff: int | None = 172
    max_positions: int = 256
    positional: str = "alibi"


@hookimpl
def register_architectures(register):
    register("${short}", Architecture(${cls}Config, Decoder))
'''

TEST_ARCHITECTURE = '''\
def test_configs_build_the_family():
    from tinylm.models import build_model, config_from_dict

    plugins.register_plugin(${module})
    config = config_from_dict({"architecture": "${short}", "n_layer": 1})
    assert isinstance(config, ${module}.${cls}Config) and config.n_layer == 1
    tinylm.seed(0)
    model = build_model(config)
    logits = model(np.array([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 256)
'''

COMMAND = '''\
"""${short}: a tinylm command plugin (`tinylm ${short} TEXT`, to start from)."""

from tinylm import hookimpl


@hookimpl
def register_commands(cli):
    import click

    from tinylm import TinyLMError

    @cli.command(name="${short}")
    @click.argument("text")
    def ${module}_command(text):
        """Print how many characters and UTF-8 bytes TEXT has."""
        if not text:
            raise TinyLMError("TEXT is empty; give some text to count")
        click.echo(f"{len(text)} characters, {len(text.encode('utf-8'))} bytes")
'''

TEST_COMMAND = '''\
def test_the_command_runs_and_fails_in_one_line():
    plugins.register_plugin(${module})
    runner = CliRunner()
    assert "${short}" in runner.invoke(cli, ["--help"]).output
    result = runner.invoke(cli, ["${short}", "héllo"])
    assert result.exit_code == 0 and result.output == "5 characters, 6 bytes\\n"
    empty = runner.invoke(cli, ["${short}", ""])
    assert empty.exit_code == 2 and empty.stderr.startswith("Error: TEXT is empty")
'''

REWARD = '''\
"""${short}: a tinylm reward-function plugin (for `tinylm align grpo --reward ${short}`)."""

from tinylm import hookimpl


def ${module}_reward(prompts, completions, completion_ids, **fields):
    """1.0 for a completion that ends a sentence, else 0.0: one finite number per
    completion. A conversational completion is a list of messages: its last one counts."""
    rewards = []
    for completion in completions:
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        rewards.append(1.0 if text.rstrip().endswith((".", "!", "?")) else 0.0)
    return rewards


@hookimpl
def register_reward_functions(register):
    register("${short}", ${module}_reward)
'''

TEST_REWARD = '''\
def test_rewards():
    plugins.register_plugin(${module})
    reward = plugins.get_reward_function("${short}")
    completions = ["It is 4.", "it is", [{"role": "assistant", "content": "Yes!"}]]
    assert reward(["q"] * 3, completions, [[1], [2], [3]]) == [1.0, 0.0, 1.0]
'''

MODULES = {"tokenizer": (TOKENIZER, TEST_TOKENIZER), "positional": (POSITIONAL, TEST_POSITIONAL),
           "objective": (OBJECTIVE, TEST_OBJECTIVE), "peft": (PEFT, TEST_PEFT),
           "architecture": (ARCHITECTURE, TEST_ARCHITECTURE), "command": (COMMAND, TEST_COMMAND),
           "reward": (REWARD, TEST_REWARD)}
