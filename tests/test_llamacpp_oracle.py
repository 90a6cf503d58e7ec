"""llama.cpp (llama-cpp-python) as the outside oracle for tinylm's GGUF models.

- SmolLM2-135M-Instruct's tokenizer, built by tinylm from the file's ``tokenizer.ggml.*``,
  gives the ids llama.cpp's ``Llama.tokenize`` gives, on multilingual text, code and
  ChatML special tokens;
- SmolLM2's logits in tinylm (packed Q4_1 weights and dequantized float32) against
  llama.cpp on the same file: tinylm is no farther from llama.cpp than reference (a),
  the float computation on the dequantized weights, is (llama.cpp quantizes the
  activations to 8 bits inside its 4-bit dot products, so (a) differs from it too).
  Reference (a) here is tinylm's dequantized model, which tests/test_gguf_model.py
  shows computes transformers' logits on the same weights;
- SmolLM2 dequantized and exported by ``export_gguf`` in Q8_0, Q4_0 and Q4_1 has, tensor
  for tensor, the bytes llama.cpp's own quantizer writes requantizing the same file;
- GPT-2 and Llama models built in tinylm, exported by ``export_gguf`` in F32 and Q8_0
  with a BPE tokenizer trained here, load in llama.cpp with tinylm's logits (F32: llama.cpp
  keeps its KV cache in f16, so about 2e-4 relative; Q8_0: about 1e-2) and tokenize as
  tinylm does.

CI does not build llama.cpp, so these skip there (``importorskip``); SmolLM2 is fetched
like tests/test_gguf_smollm2.py does, and its tests skip with the reason when it cannot be.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

from test_gguf_smollm2 import smollm2_path  # noqa: E402,F401  (the fetch-into-cache fixture)
from tinylm import backend  # noqa: E402
from tinylm.formats.gguf import read_gguf  # noqa: E402
from tinylm.formats.gguf_model import export_gguf, load_gguf  # noqa: E402
from tinylm.formats.gguf_tokenizer import tokenizer_from_gguf  # noqa: E402
from tinylm.generate import inference  # noqa: E402
from tinylm.models import GPT2Config, LlamaConfig, build_model  # noqa: E402
from tinylm.tokenizers import BPETokenizer  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 12345 o'clock, isn't it?",
    "Le cœur a ses raisons que la raison ne connaît point. Où êtes-vous, Hélène ? «Déjà»",
    "Grüße aus Köln! Die Straße ist schön, aber das Mädchen weiß es nicht. ẞ ß",
    "我们今天去北京大学学习自然语言处理。你好，世界！",
    "日本語のテキスト：東京は晴れです。カタカナとひらがな、漢字。",
    "Emoji: 🤖🚀 👩‍💻 🇫🇷 ❤️ and digits 0 1 22 333 4444 55555 1234567890 3.14159",
    "def f(x):\n\tif x > 0:\n\t\treturn x ** 2  # square\n\treturn -x\n\n\nprint(f(-3))\r\n",
    "   leading spaces,  double  spaces,\ttabs\t\tand trailing   \n\n",
    "Привет, мир! مرحبا بالعالم. 안녕하세요 세계. नमस्ते दुनिया. e\u0301 caf\u00e9\u00a0bar",
    "I'LL say you've THEY'RE we'd it's ''quoted'' \"double\" __dunder__ x+=1 a.b.c(); {}[]",
]
CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Écris un haïku sur 東京 🌸<|im_end|>\n<|im_start|>assistant\n")


def rel(a, b) -> float:
    """max |a - b| / max |b| (b: the reference)."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def argmax_agreement(a, b) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def llamacpp_logits(path, ids, kv_f32: bool = False) -> np.ndarray:
    """llama.cpp's logits (T, V) for ``ids`` (one thread, every position); its KV cache in
    f16 (its default) or, with ``kv_f32``, float32."""
    kv = {"type_k": 0, "type_v": 0} if kv_f32 else {}          # 0: GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids) + 8), n_batch=len(ids),
                          n_threads=1, n_threads_batch=1, logits_all=True, verbose=False, **kv)
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def llamacpp_tokens(path, text: str, special: bool = False) -> list:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)


def tinylm_logits(model, ids) -> np.ndarray:
    with inference(model):
        return model(np.asarray(ids, np.int64)[None]).logits.numpy()[0].astype(np.float64)


# --------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path):
    return tokenizer_from_gguf(read_gguf(smollm2_path))


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_smollm2_tokenizer_ids_are_llamacpps(smollm2_path, smollm2_tokenizer, i):
    assert smollm2_tokenizer.encode(TEXTS[i]) == llamacpp_tokens(smollm2_path, TEXTS[i])


def test_smollm2_tokenizer_all_texts_and_chatml_specials(smollm2_path, smollm2_tokenizer):
    text = "\n".join(TEXTS) + CHAT
    ours = smollm2_tokenizer.encode(text, allowed_special="all")
    assert ours == llamacpp_tokens(smollm2_path, text, special=True)
    assert smollm2_tokenizer.special_tokens["<|im_start|>"] in ours
    plain = smollm2_tokenizer.encode(CHAT, disallowed_special=())   # spelled out, as text
    assert plain == llamacpp_tokens(smollm2_path, CHAT, special=False)


@pytest.fixture(scope="module")
def smollm2_logits(smollm2_path, smollm2_tokenizer):
    """16 prompt ids and the logits of llama.cpp, tinylm packed and tinylm dequantized."""
    ids = smollm2_tokenizer.encode("The history of the printing press begins in Mainz, where "
                                   "Johannes Gutenberg set type by hand.")[:16]
    assert len(ids) == 16
    packed, _ = load_gguf(smollm2_path, dequantize=False)
    out = {"ids": ids, "llama.cpp": llamacpp_logits(smollm2_path, ids),
           "packed": tinylm_logits(packed, ids)}
    del packed
    out["dequantized"] = tinylm_logits(load_gguf(smollm2_path)[0], ids)
    return out


def test_smollm2_logits_no_farther_from_llamacpp_than_the_float_reference(smollm2_logits):
    ref = smollm2_logits["llama.cpp"]
    a, packed = smollm2_logits["dequantized"], smollm2_logits["packed"]
    err_a, err_packed = rel(a, ref), rel(packed, ref)
    agree_a, agree_packed = argmax_agreement(a, ref), argmax_agreement(packed, ref)
    print(f"\nSmolLM2 vs llama.cpp, 16 tokens: reference (a) rel {err_a:.3e}, argmax "
          f"{agree_a:.0%}; tinylm packed rel {err_packed:.3e}, argmax {agree_packed:.0%}; "
          f"packed vs (a) rel {rel(packed, a):.3e}")
    assert err_a < 0.1 and agree_a >= 0.75        # the same model (else: a mapping bug)
    assert rel(packed, a) < 1e-4                  # packed computes the dequantized model
    assert err_packed <= err_a * 1.01 + 1e-6
    assert agree_packed >= agree_a


LLAMA_FTYPES = {"q8_0": 7, "q4_0": 2, "q4_1": 3}                      # llama_ftype


@pytest.fixture(scope="module")
def smollm2_float(smollm2_path):
    return load_gguf(smollm2_path)


def llamacpp_quantize(src, dst, dtype: str) -> None:
    """llama.cpp's own quantizer (llama-quantize --allow-requantize), one thread."""
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = LLAMA_FTYPES[dtype], True, 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                          ctypes.byref(params)) == 0


@pytest.mark.parametrize("dtype", sorted(LLAMA_FTYPES))
def test_smollm2_export_has_the_bytes_of_llamacpps_quantizer(smollm2_path, smollm2_float, dtype,
                                                             tmp_path):
    """SmolLM2 dequantized, exported by tinylm in ``dtype``, against llama.cpp requantizing
    the same file: every tensor both write in the same type has the same bytes (llama.cpp
    keeps the token embedding in Q8_0 for its 4-bit types: that one is left out)."""
    ours, theirs = tmp_path / "tinylm.gguf", tmp_path / "llama.cpp.gguf"
    export_gguf(*smollm2_float, ours, dtype=dtype)
    llamacpp_quantize(smollm2_path, theirs, dtype)
    a, b = read_gguf(ours).tensors, read_gguf(theirs).tensors
    assert set(a) == set(b)
    same_type = [n for n in a if a[n].type == b[n].type]
    assert all(a[n].type == dtype.upper() for n in a if n.startswith("blk.") and
               a[n].type != "F32")
    assert len(same_type) >= len(a) - 1
    differ = [n for n in same_type if not np.array_equal(np.asarray(a[n].data),
                                                         np.asarray(b[n].data))]
    assert not differ, f"{len(differ)} of {len(same_type)} tensors differ, e.g. {differ[:3]}"


# --------------------------------------------------------------------------- exported


@pytest.fixture(scope="module")
def bpe():
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics)[:40])
    return BPETokenizer.train(text, vocab_size=400, special_tokens=["<|endoftext|>"]), text


def small_model(family: str, vocab: int):
    common = dict(vocab_size=vocab, d_model=64, n_layer=2, max_positions=128, init_std=0.1,
                  norm_eps=1e-5)
    if family == "gpt2":
        config = GPT2Config(n_head=4, **common)
    else:
        config = LlamaConfig(n_head=4, n_kv_head=2, d_ff=128,
                             positional_options={"base": 10000.0}, **common)
    backend.seed(13)
    model = build_model(config)
    model.eval()
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exported_f32_model_runs_in_llamacpp_with_tinylms_logits(bpe, family, tmp_path):
    """With a float32 KV cache llama.cpp computes tinylm's Llama to float32 rounding; its
    GPT-2 differs by ggml's GELU, read from an f16 table (about 4e-4 here). With its
    default f16 KV cache, about 1e-3."""
    tokenizer, text = bpe
    model, ids, path = exported(family, "f32", bpe, tmp_path)
    ours = tinylm_logits(model, ids)
    f16_kv, f32_kv = llamacpp_logits(path, ids), llamacpp_logits(path, ids, kv_f32=True)
    print(f"\n{family} F32 file: llama.cpp vs tinylm rel {rel(ours, f16_kv):.3e} (f16 KV cache), "
          f"{rel(ours, f32_kv):.3e} (f32 KV cache)")
    assert rel(ours, f32_kv) < (1e-5 if family == "llama" else 1e-3)
    assert rel(ours, f16_kv) < 2e-3
    assert argmax_agreement(ours, f16_kv) == 1.0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_exported_q8_0_model_runs_in_llamacpp_with_tinylms_logits(bpe, family, tmp_path):
    """llama.cpp on the Q8_0 file against tinylm on the same weights (the file loaded back)
    and against the float model it was quantized from (llama.cpp also rounds the
    activations to Q8_0 blocks in its dot products)."""
    model, ids, path = exported(family, "q8_0", bpe, tmp_path)
    ref = llamacpp_logits(path, ids)
    ours, reloaded = tinylm_logits(model, ids), tinylm_logits(load_gguf(path)[0], ids)
    print(f"\n{family} Q8_0 file: llama.cpp vs tinylm on the file's weights rel "
          f"{rel(reloaded, ref):.3e}, argmax {argmax_agreement(reloaded, ref):.0%}; vs the float "
          f"model {rel(ours, ref):.3e}; tinylm file vs float {rel(reloaded, ours):.3e}")
    assert rel(reloaded, ref) < 3e-2 and argmax_agreement(reloaded, ref) >= 0.9
    assert rel(ours, ref) < 5e-2


def exported(family: str, dtype: str, bpe, tmp_path) -> tuple:
    """(model, 48 ids of held-back text, GGUF path) after export_gguf; llama.cpp tokenizes
    that text as tinylm does (the file's tokenizer is valid)."""
    tokenizer, text = bpe
    model = small_model(family, tokenizer.vocab_size + 16)   # padded rows: [PADi] tokens
    path = tmp_path / f"{family}-{dtype}.gguf"
    export_gguf(model, tokenizer, path, dtype=dtype)
    sample = text[1000:1400]
    assert llamacpp_tokens(path, sample) == tokenizer.encode(sample)
    return model, tokenizer.encode(sample)[:48], path
