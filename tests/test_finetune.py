"""`tinylm finetune` end to end on a tiny random GPT-2 saved as a Hugging Face folder:
LoRA (with --merge), --full, QLoRA on a quantized base, bit-exact resume, `tinylm
generate --adapter`, and bad input (exit 2, one line, nothing written). Plus the
gradient check the issue asks for: a prompt token's logits get exactly zero gradient."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from cli_helpers import one_error_line, run

import tinylm
from tinylm import checkpoint, peft
from tinylm.instruct import IGNORE, Examples, Formatting, tokenize_record
from tinylm.models import Decoder, GPT2Config
from tinylm.prompts import ChatTemplate
from tinylm.tokenizers.bpe import BPETokenizer

TEXT = ("the cat sat on a mat and the dog ran to see what it was, then both went home for "
        "tea.\n") * 20
RECORDS = [
    {"prompt": "the cat", "completion": " sat on a mat."},
    {"prompt": "the dog", "completion": " ran home for tea."},
    {"messages": [{"role": "user", "content": "the cat"},
                  {"role": "assistant", "content": "sat on a mat"}]},
    {"text": "then both went home for tea."},
] * 4
FAST = ["--no-progress", "--batch-size", "4", "--log-every", "1", "--eval-every", "4",
        "--chat-template", "chatml", "--seed", "3"]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def tiny_base(path, d_model=32, n_layer=2):
    tok = BPETokenizer.train([TEXT], 300,
                             special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tinylm.seed(0)
    model = Decoder(GPT2Config(vocab_size=len(tok), d_model=d_model, n_layer=n_layer,
                               n_head=4, max_positions=64))
    model.save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base") / "gpt2")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", RECORDS)


def finetune(base, data, out, *args):
    result = run("finetune", "-m", base, "--data", data, "--out", out, *FAST, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def logits(model, ids):
    with tinylm.no_grad():
        return model(np.asarray([ids])).logits.numpy()


def losses(out):
    return [r["loss"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
            if "loss" in r]


# --------------------------------------------------------------------------- gradients


def test_prompt_tokens_get_exactly_zero_gradient(base):
    from tinylm.loading import load_model
    from tinylm.objectives import SFT

    model, tok = load_model(base)
    peft.apply(model.train(), "lora", r=4, target_modules=["c_attn"], init_lora_weights=False)
    fmt = Formatting(tok, tok.token_to_id("<|endoftext|>"), 64, ChatTemplate.builtin("chatml"))
    batch = Examples.from_lists([tokenize_record(r, fmt) for r in RECORDS[:3]]).batch(
        [0, 1, 2], 0)
    out = model(batch["ids"], targets=batch["targets"])
    out.logits.retain_grad()
    out.loss.backward()
    grad = out.logits.grad  # (B, T, V)
    masked = batch["targets"] == IGNORE  # prompt tokens and padding
    assert masked.any() and (~masked).any()
    assert (np.asarray(grad)[masked] == 0).all()  # exactly zero, not merely small
    assert (np.abs(np.asarray(grad)[~masked]).sum(axis=-1) > 0).all()
    assert all(p.grad is None for n, p in model.named_parameters() if ".peft." not in n)
    assert SFT(tok).loss(model, batch).item() == pytest.approx(out.loss.item(), rel=1e-6)


# --------------------------------------------------------------------------- end to end


def test_lora_finetune_writes_a_small_adapter_that_generate_loads(base, data, tmp_path):
    from tinylm.finetune import attach_adapter
    from tinylm.loading import load_model

    out = tmp_path / "lora"
    result = finetune(base, data, out, "--target", "c_attn", "--lora-r", "4", "--lr", "1e-2",
                      "--max-steps", "6", "--merge")
    assert "trainable params: 1,024 || all params:" in result.stderr
    assert "peak memory (estimate):" in result.stderr and "optimizer" in result.stderr
    assert f"--adapter {out}" in result.stderr
    assert len(losses(out)) == 6
    adapter = out / "adapter_model.safetensors"
    assert adapter.stat().st_size * 10 < (base / "model.safetensors").stat().st_size
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == str(base)

    ids = [1, 2, 3, 4, 5]
    plain, _ = load_model(base)
    adapted = attach_adapter(load_model(base)[0], out)
    merged, _ = load_model(out / "merged")
    assert np.abs(logits(adapted, ids) - logits(plain, ids)).max() > 1e-4  # it learned
    np.testing.assert_allclose(logits(merged, ids), logits(adapted, ids), rtol=1e-5, atol=1e-5)

    args = ["-p", "the cat", "-n", "12", "-t", "0"]
    with_adapter = run("generate", "-m", base, "--adapter", out, *args)
    from_merged = run("generate", "-m", out / "merged", *args)
    assert with_adapter.exit_code == from_merged.exit_code == 0, with_adapter.output
    assert with_adapter.stdout == from_merged.stdout


def test_full_finetune_writes_a_whole_model(base, data, tmp_path):
    from tinylm.loading import load_model

    out = tmp_path / "full"
    result = finetune(base, data, out, "--full", "--max-steps", "3", "--lr", "1e-3")
    assert "trainable%: 100.0000" in result.stderr
    assert f"generate --model {out}" in result.stderr
    tuned, plain = load_model(out)[0], load_model(base)[0]
    assert np.abs(logits(tuned, [1, 2, 3]) - logits(plain, [1, 2, 3])).max() > 1e-4
    assert run("generate", "-m", out, "-p", "the", "-n", "3").exit_code == 0


@pytest.mark.parametrize("name", ["q8", "q8.gguf"])  # a quantized folder, a GGUF file
def test_qlora_trains_on_packed_weights_and_merges_in_float(base, data, tmp_path, name):
    from tinylm.finetune import attach_adapter, is_quantized
    from tinylm.loading import load_model

    q8 = tmp_path / name
    assert run("quantize", base, "--to", "q8_0", "--out", q8).exit_code == 0
    out = tmp_path / "qlora"
    finetune(q8, data, out, "--target", "c_attn", "--max-steps", "3", "--lr", "1e-2",
             "--merge")
    model = attach_adapter(load_model(q8)[0], out)
    assert is_quantized(model)  # the base stayed packed: no float32 copy
    merged = load_model(out / "merged")[0]
    assert not is_quantized(merged)
    np.testing.assert_allclose(logits(merged, [1, 2, 3]), logits(model, [1, 2, 3]),
                               rtol=1e-4, atol=1e-4)


def test_an_interrupted_then_resumed_finetune_is_bit_identical(base, data, tmp_path):
    args = ["--target", "c_attn", "--lora-dropout", "0.1", "--packing", "--block-size", "32",
            "--lr", "1e-2", "--lr-decay-steps", "8", "--eval-every", "2"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    finetune(base, data, straight, *args, "--max-steps", "8")
    finetune(base, data, broken, *args, "--max-steps", "4")
    result = finetune(base, data, broken, *args, "--max-steps", "8")
    assert "resuming from step 4" in result.stderr
    assert losses(broken) == losses(straight) and len(losses(straight)) == 8
    for name in ("model.safetensors", "adapter_model.safetensors"):
        assert (broken / name).read_bytes() == (straight / name).read_bytes()
    saved = checkpoint.load_file(str(broken / "model.safetensors"))
    assert saved and all(".peft." in k for k in saved)  # the checkpoint: the adapter alone


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("records, args, fragments", [
    (RECORDS, ["--target", "nope"], ["nope", "c_attn"]),
    ([{"messages": [{"role": "user", "content": "hi"}]}], [], ["train.jsonl:1",
                                                             "no assistant turn"]),
    ([{"prompt": "the cat " * 30, "completion": "x"}], ["--block-size", "16"],
     ["train.jsonl:1", "context is 16"]),
    (RECORDS, ["--peft", "no-such-method"], ["no-such-method"]),
    (RECORDS, ["--full", "--merge"], ["--full"]),
    (RECORDS, ["--block-size", "100"], ["context (64 positions)"]),
])
def test_bad_input_is_one_line_and_writes_nothing(base, tmp_path, records, args, fragments):
    data = write_jsonl(tmp_path / "train.jsonl", records)
    out = tmp_path / "out"
    result = run("finetune", "-m", base, "--data", data, "--out", out, *FAST, *args)
    one_error_line(result, *fragments)
    assert not out.exists()


def test_a_quantized_base_cannot_be_fully_finetuned(base, data, tmp_path):
    q8 = tmp_path / "q8"
    assert run("quantize", base, "--to", "q8_0", "--out", q8).exit_code == 0
    result = run("finetune", "-m", q8, "--data", data, "--out", tmp_path / "o", "--full", *FAST)
    one_error_line(result, "--dequantize")
    assert not (tmp_path / "o").exists()


def test_an_adapter_for_another_base_and_other_settings_are_refused(base, data, tmp_path):
    out = tmp_path / "lora"
    finetune(base, data, out, "--target", "c_attn", "--max-steps", "1")
    other = tiny_base(tmp_path / "other", d_model=48)
    one_error_line(run("generate", "-m", other, "--adapter", out, "-p", "the"),
                   "another base", "d_model 32")
    one_error_line(run("generate", "-m", out, "-p", "the"), "--adapter")
    result = run("finetune", "-m", base, "--data", data, "--out", out, *FAST,
                 "--target", "c_attn", "--lora-r", "2", "--max-steps", "2")
    one_error_line(result, "other settings", "peft_options")


def test_generate_takes_the_checkpoint_of_a_run_that_wrote_no_adapter_yet(base, data, tmp_path):
    out = tmp_path / "lora"
    finetune(base, data, out, "--target", "c_attn", "--max-steps", "2", "--lr", "1e-2")
    args = ["-p", "the cat", "-n", "8", "-t", "0"]
    before = run("generate", "-m", base, "--adapter", out, *args).stdout
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (out / name).unlink()  # as a run stopped by Ctrl-C leaves it
    assert run("generate", "-m", base, "--adapter", out, *args).stdout == before
    result = finetune(base, data, out, "--target", "c_attn", "--max-steps", "3", "--overwrite")
    assert "resuming" not in result.stderr and len(losses(out)) == 3
    assert (out / "adapter_config.json").exists()


def test_ctrl_c_saves_a_checkpoint_writes_no_adapter_and_the_rerun_finishes(
        base, data, tmp_path, monkeypatch):
    from tinylm.train import Trainer

    step = Trainer.train_step

    def ctrl_c_after_two(self, batches):
        out = step(self, batches)
        if self.step == 1:  # about to become 2
            self.request_stop()
        return out

    out = tmp_path / "lora"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", ctrl_c_after_two)
        result = run("finetune", "-m", base, "--data", data, "--out", out, *FAST,
                     "--target", "c_attn", "--max-steps", "5")
    assert result.exit_code == 130 and "interrupted at step 2" in result.stderr
    assert not (out / "adapter_config.json").exists()
    result = finetune(base, data, out, "--target", "c_attn", "--max-steps", "5")
    assert "resuming from step 2" in result.stderr and (out / "adapter_config.json").exists()


# --------------------------------------------------------------------------- memory options


def test_gradient_checkpointing_flag_changes_memory_not_the_losses(base, data, tmp_path):
    args = ["--target", "c_attn", "--max-steps", "3", "--lr", "1e-2"]
    plain = finetune(base, data, tmp_path / "plain", *args)
    assert "gradient checkpointing: on" not in plain.stderr  # a float base: off by default
    on = finetune(base, data, tmp_path / "on", *args, "--gradient-checkpointing")
    assert "gradient checkpointing: on" in on.stderr
    assert losses(tmp_path / "on") == losses(tmp_path / "plain")  # bit for bit
    q8 = tmp_path / "q8"
    assert run("quantize", base, "--to", "q8_0", "--out", q8).exit_code == 0
    assert "gradient checkpointing: on" in finetune(q8, data, tmp_path / "q", *args).stderr
    off = finetune(q8, data, tmp_path / "q-off", *args, "--no-gradient-checkpointing")
    assert "gradient checkpointing: on" not in off.stderr
    assert losses(tmp_path / "q-off") == losses(tmp_path / "q")
    result = run("finetune", "-m", base, "--data", data, "--out", tmp_path / "c",
                 "--task", "classify", "--gradient-checkpointing", *FAST)
    one_error_line(result, "--gradient-checkpointing")


def test_qlora_flag_quantizes_a_float_base_with_a_bf16_embedding(data, tmp_path):
    from tinylm.finetune import FinetuneSpec, load_base
    from tinylm.quant import QuantEmbedding, QuantLinear, QuantTiedHead

    wide = tiny_base(tmp_path / "wide", d_model=64)  # NF4's blocks of 64
    model = load_base(FinetuneSpec(wide, qlora="nf4"))[0]
    assert isinstance(model.tok_emb, QuantEmbedding) and model.tok_emb.fmt == "bf16"
    assert isinstance(model.lm_head, QuantTiedHead)
    assert all(isinstance(b.attn.qkv, QuantLinear) and b.attn.qkv.fmt == "nf4"
               for b in model.transformer.blocks)
    f32 = load_base(FinetuneSpec(wide, qlora="nf4", qlora_embeddings="float32"))[0]
    assert type(f32.tok_emb).__name__ == "Embedding"
    args = ["--target", "c_attn", "--max-steps", "3", "--lr", "1e-2", "--qlora", "nf4"]
    result = finetune(wide, data, tmp_path / "bf16", *args)
    assert "gradient checkpointing: on" in result.stderr  # a quantized base: on
    finetune(wide, data, tmp_path / "f32", *args, "--qlora-embeddings", "float32")
    a, b = np.array(losses(tmp_path / "bf16")), np.array(losses(tmp_path / "f32"))
    assert 0 < np.max(np.abs(a - b) / b) < 1e-3  # bf16 storage of the embedding/head
    again = run("finetune", "-m", wide, "--data", data, "--out", tmp_path / "bf16", *FAST,
                *args[:-1], "q4_0", "--max-steps", "4")
    one_error_line(again, "qlora")  # resuming with another scheme is refused
    one_error_line(run("finetune", "-m", wide, "--data", data, "--out", tmp_path / "x",
                       "--qlora", "q3", *FAST), "unknown quantization scheme")
    one_error_line(run("finetune", "-m", wide, "--data", data, "--out", tmp_path / "y",
                       "--qlora", "nf4", "--full", *FAST), "--qlora")
