"""SmolLM2-135M-Instruct from its Q4_1 GGUF file, in tinylm, against transformers.

Reference (a) of issue 13: every tensor dequantized with gguf.quants, the q/k row
permutation undone here (spelled independently of tinylm's code), loaded into
transformers' LlamaForCausalLM with a config built from the GGUF metadata. tinylm's
``load_model`` of the file must give the same logits within 1e-5 relative (float32 on
both sides; relative = max |tinylm - transformers| / max |transformers|, over every
position and vocabulary entry) and the same 64 greedy tokens. The tokenizer: the ChatML
tokens are their ids, a multilingual text round-trips byte for byte, and the ids equal
those of a Hugging Face ``tokenizers`` BPE built from the file's vocabulary and merges
with SmolLM's pre-tokenizer (Digits + ByteLevel, as its tokenizer.json has it). The
file is fetched like tests/test_gguf_smollm2.py does (skipped with the reason offline).
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_gguf_smollm2 import smollm2_path  # noqa: E402,F401  (the fetching fixture)
from tinylm.generate import generate  # noqa: E402
from tinylm.loading import load_model  # noqa: E402

pytestmark = pytest.mark.slow  # about 40 s: two 135M models, 64 greedy tokens each

PROMPT = ("<|im_start|>user\nWhat is the capital of France? Answer in one sentence."
          "<|im_end|>\n<|im_start|>assistant\n")
MULTILINGUAL = ("English: the quick brown fox, 1234 jumps!\nFrançais : où est l'hôtel ?\n"
                "Deutsch: Größe, Straße. 日本語のテキスト。中文：你好，世界。 Русский: привет, мир. "
                "العربية: مرحبا 🙂👍🏽  tabs\tand   spaces\n\n")


def unpermute(w, n_head):
    """Undo convert_hf_to_gguf.py's permute: rows (head, pair, 2) -> (head, 2, pair)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(
        0, 2, 1, *range(3, w.ndim + 2)).reshape(w.shape)


def reference_model(path):
    """transformers' LlamaForCausalLM with the file's dequantized weights."""
    r = gguf.GGUFReader(path)
    m = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    heads, kv = m["llama.attention.head_count"], m["llama.attention.head_count_kv"]
    config = transformers.LlamaConfig(
        vocab_size=len(m["tokenizer.ggml.tokens"]), hidden_size=m["llama.embedding_length"],
        intermediate_size=m["llama.feed_forward_length"],
        num_hidden_layers=m["llama.block_count"], num_attention_heads=heads,
        num_key_value_heads=kv, max_position_embeddings=m["llama.context_length"],
        rope_theta=m["llama.rope.freq_base"],
        rms_norm_eps=m["llama.attention.layer_norm_rms_epsilon"], tie_word_embeddings=True,
        bos_token_id=m["tokenizer.ggml.bos_token_id"],
        eos_token_id=m["tokenizer.ggml.eos_token_id"])
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    state = {}
    for t in r.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape)))
        if t.name == "token_embd.weight":
            state["model.embed_tokens.weight"] = state["lm_head.weight"] = w
        elif t.name == "output_norm.weight":
            state["model.norm.weight"] = w
        else:
            _, i, kind, _ = t.name.split(".")
            w = unpermute(w, heads) if kind == "attn_q" else unpermute(w, kv) \
                if kind == "attn_k" else w
            state[f"model.layers.{i}.{names[kind]}.weight"] = w
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))
                           for k, v in state.items()})
    return model.float().eval()


@pytest.fixture(scope="module")
def loaded(smollm2_path):  # noqa: F811
    return load_model(smollm2_path, dequantize=True)  # float32: the oracle is float


@pytest.fixture(scope="module")
def reference(smollm2_path):  # noqa: F811
    return reference_model(smollm2_path)


def test_logits_match_transformers_on_the_dequantized_weights(loaded, reference):
    model, tok = loaded
    ids = tok.encode(PROMPT, allowed_special="all")
    assert len(ids) > 20
    ours = model(np.array([ids])).logits.data
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits.numpy()
    rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert rel < 1e-5, rel
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_64_greedy_tokens_match_transformers(loaded, reference):
    model, tok = loaded
    ids = tok.encode(PROMPT, allowed_special="all")
    out = generate(model, [ids], 64, tokenizer=tok, eos_id=(), temperature=0.0)  # greedy
    # both go on past <|im_end|> (the reply ends after 8 tokens): 64 tokens of evidence
    reference.generation_config.eos_token_id = reference.config.eos_token_id = None
    config = transformers.GenerationConfig(max_new_tokens=64, do_sample=False,
                                           eos_token_id=None, pad_token_id=2)
    with torch.no_grad():
        want = reference.generate(torch.tensor([ids]), generation_config=config)
    want = want[0, len(ids):].tolist()
    assert len(want) == 64 and out.tokens[0] == want
    assert tok.decode(want).startswith("The capital of France is Paris.<|im_end|>")


def test_chatml_tokens_are_their_ids(loaded):
    _, tok = loaded
    assert {t: tok.special_tokens[t] for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")} \
        == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", allowed_special="all")[::4] == [1, 2]
    assert tok.encode(" 2024")[:2] == [tok.encode(" ")[0], tok.encode("2")[0]]  # digit by digit


def test_multilingual_text_round_trips_and_matches_a_hf_bpe_of_the_vocabulary(loaded,
                                                                            smollm2_path):  # noqa: F811
    tokenizers = pytest.importorskip("tokenizers")
    _, tok = loaded
    ids = tok.encode(MULTILINGUAL)
    assert tok.decode_bytes(ids) == MULTILINGUAL.encode("utf-8")
    r = gguf.GGUFReader(smollm2_path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    hf = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Digits(individual_digits=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    assert ids == hf.encode(MULTILINGUAL).ids


def test_packed_weights_hold_no_float32_copy(smollm2_path, loaded):  # noqa: F811
    import os

    from tinylm.formats.gguf_model import load_gguf

    packed, tok = load_gguf(smollm2_path, dequantize=False)
    held = sum(a.nbytes for a in packed.state_dict().values())
    assert held < 1.05 * os.path.getsize(smollm2_path)            # 98 MB, not 540 MB
    ids = np.array([tok.encode(PROMPT, allowed_special="all")])
    a, b = packed(ids).logits.data, loaded[0](ids).logits.data
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-4


def test_loading_packed_weights_peaks_near_the_file_size(smollm2_path):  # noqa: F811
    import os
    import subprocess
    import sys

    from tinylm import nn

    if not hasattr(nn, "skip_init"):
        pytest.skip("this tinylm builds models with initialised float32 weights")
    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the peak RSS from /proc/self/status (Linux)")
    # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's RSS
    code = ("import sys\nfrom tinylm.formats.gguf_model import load_gguf\n"
            "load_gguf(sys.argv[1], dequantize=False)\n"
            "print(next(line.split()[1] for line in open('/proc/self/status') "
            "if line.startswith('VmHWM')))")
    done = subprocess.run([sys.executable, "-c", code, smollm2_path], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    peak = int(done.stdout.split()[-1]) * 1024                    # kB
    # about 120 MB here (the float32 model would be 540 MB more); the bound is
    # twice llama.cpp's 175 MB peak on this file
    assert peak < 350e6 and peak < 2 * os.path.getsize(smollm2_path), peak


def test_tinylm_generate_chat_answers_with_the_models_chatml_template(smollm2_path):  # noqa: F811
    from click.testing import CliRunner

    from tinylm.cli import cli

    out = CliRunner().invoke(cli, ["generate", "-m", smollm2_path, "--chat", "--temperature",
                                   "0", "--max-new-tokens", "24"],
                             input="What is the capital of France?\n")
    assert out.exit_code == 0, out.output
    assert "Paris" in out.output and "plain template" not in out.output
    assert "<|im_end|>" not in out.output          # the reply stops at the template's end


def test_tinylm_info_reports_the_file(smollm2_path):  # noqa: F811
    from click.testing import CliRunner

    from tinylm.cli import cli

    out = CliRunner().invoke(cli, ["info", smollm2_path])
    assert out.exit_code == 0, out.output
    for line in ("architecture  llama", "Q4_1    210 tensors", "Q8_0      1 tensors",
                 "F32      61 tensors", "parameters    134,515,008", "chat template chatml",
                 "(pre smollm), 49,152 tokens"):
        assert line in out.output, line
