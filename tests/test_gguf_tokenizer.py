"""GGUF tokenizers (tinylm.formats.gguf_tokenizer) and chat templates, against Hugging
Face ``tokenizers``, gguf.GGUFWriter / GGUFReader and jinja2: the pre-tokenizers GGUF
names cut text as their Hugging Face spellings do; a byte-level BPE that tokenizers
trained, written to GGUF by gguf.GGUFWriter, encodes in tinylm to tokenizers' ids;
tinylm's tokenizer metadata reads back through GGUFReader; ChatML templates render as
jinja2 renders them."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from tinylm.formats.gguf import GGUFError, read_gguf  # noqa: E402
from tinylm.formats.gguf_tokenizer import tokenizer_from_gguf, tokenizer_metadata  # noqa: E402
from tinylm.formats.gguf import write_gguf  # noqa: E402
from tinylm.prompts import ChatTemplate  # noqa: E402
from tinylm.tokenizers import BPETokenizer, PreTokenizer  # noqa: E402
from tinylm.tokenizers.formats import to_bytelevel  # noqa: E402

pt = tokenizers.pre_tokenizers
LLAMA3_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's tokenizer.json
HF_PRE = {
    "smollm": pt.Sequence([pt.Digits(individual_digits=True),
                           pt.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "llama-bpe": pt.Sequence([pt.Split(tokenizers.Regex(LLAMA3_HF), "isolated"),
                              pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
    "qwen2": pt.Sequence([pt.Split(tokenizers.Regex(LLAMA3_HF.replace(r"\p{N}{1,3}", r"\p{N}")),
                                   "isolated"),
                          pt.ByteLevel(add_prefix_space=False, use_regex=False)]),
}
PIECES = st.sampled_from(["a", "Zb", " ", "  ", "\t", "\n", "\r\n", "1", "23", "٣", "!", "'s",
                          "'LL", "é", "中文", "🙂", " x", "...", "\u00a0", "Ⅻ"])
TEXT = st.lists(PIECES, max_size=14).map("".join)
MULTILINGUAL = ("The 3 quick foxes' 2024 jumps!\nFrançais : où ? Größe, 日本語、中文。 "
                "Русский текст 🙂  tabs\tand   spaces 12345\n\n")
CORPUS = [MULTILINGUAL * 3, "hello world 123 lower lowest " * 40, "ça va? été! 世界 " * 20]


@pytest.mark.parametrize("name", sorted(HF_PRE))
@given(text=TEXT)
def test_pre_tokenizers_cut_as_their_hugging_face_spellings(name, text):
    ours = [to_bytelevel(p.encode("utf-8")) for p in PreTokenizer(name).split(text)]
    assert ours == [p for p, _ in HF_PRE[name].pre_tokenize_str(text)]


@pytest.fixture(scope="module")
def hf_bpe():
    """A byte-level BPE trained by tokenizers with SmolLM's pre-tokenizer (its decoder
    and alphabet: all 256 bytes) and two control tokens first, as SmolLM2 has them."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = HF_PRE["smollm"]
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pt.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_hf_bpe(tok, path, pre="smollm", drop_byte=None):
    """gguf.GGUFWriter's GGUF of ``tok`` (``drop_byte``: leave that byte's token out,
    as SmolLM2's vocabulary has no token for 21 bytes)."""
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    if drop_byte is not None:
        del vocab[to_bytelevel(bytes([drop_byte]))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    merges = [m for m in merges if all(x in vocab for x in m.split(" "))]
    tokens = sorted(vocab, key=vocab.get)
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return {t: i for i, t in enumerate(tokens)}


def test_a_gguf_writer_tokenizer_encodes_as_tokenizers_does(hf_bpe, tmp_path):
    write_hf_bpe(hf_bpe, tmp_path / "t.gguf")
    tok = tokenizer_from_gguf(read_gguf(tmp_path / "t.gguf"))
    assert tok.special_tokens == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for text in (MULTILINGUAL, "12 apples, 345 pears", "hello  \n\n world"):
        assert tok.encode(text) == hf_bpe.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    chat = "<|im_start|>user\nhi 42<|im_end|>\n"
    assert tok.encode(chat, allowed_special="all") == hf_bpe.encode(chat).ids


def test_a_byte_the_vocabulary_lacks_is_dropped_as_llama_cpp_drops_it(hf_bpe, tmp_path):
    ids = write_hf_bpe(hf_bpe, tmp_path / "t.gguf", drop_byte=0x04)
    tok = tokenizer_from_gguf(read_gguf(tmp_path / "t.gguf"))
    assert tok.encode("a\x04b") == [ids["a"], ids["b"]]       # pieces "a", "\x04", "b"
    ours = [tok.id_to_token(i) for i in tok.encode("hello world")]  # ids moved by one
    assert ours == hf_bpe.encode("hello world").tokens
    assert max(tok.encode(MULTILINGUAL + "\x04")) < len(ids)  # never an id past the vocab
    from tinylm.tokenizers import from_file

    tok.save(tmp_path / "tok.txt")                            # and so once saved and read
    back = from_file(tmp_path / "tok.txt")
    assert back.encode("a\x04b") == [ids["a"], ids["b"]] and back.n_vocab == len(ids)


def test_tinylm_tokenizer_metadata_reads_back_through_gguf_reader(tmp_path):
    tok = BPETokenizer.train(CORPUS, vocab_size=400, special_tokens=["<|endoftext|>"],
                             pattern="smollm")
    n = tok.vocab_size
    meta = tokenizer_metadata(tok, n + 10)
    write_gguf(tmp_path / "m.gguf", {"general.architecture": "llama", **meta}, {})
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 10)] and types[n:] == [5] * 10
    assert types[tok.special_tokens["<|endoftext|>"]] == 3
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert r.fields["tokenizer.ggml.merges"].contents()[0] == " ".join(
        tok.id_to_token(i) for i in tok.merges[0])
    back = tokenizer_from_gguf(read_gguf(tmp_path / "m.gguf"))
    assert back.encode(MULTILINGUAL) == tok.encode(MULTILINGUAL)


@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.model": "t5"}, "tokenizer model 't5'.*'gpt2'.*'llama'"),
    ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.scores must hold one float per token"),
    ({"tokenizer.ggml.pre": "default"}, "pre-tokenizer 'default'"),
    ({"tokenizer.ggml.merges": ["Ġ nosuchtoken"]}, "merge 0 .* not in tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": "one string"}, "tokenizer.ggml.tokens is missing"),
])
def test_a_tokenizer_tinylm_cannot_build_is_one_error_naming_the_file(hf_bpe, tmp_path,
                                                                      change, message):
    write_hf_bpe(hf_bpe, tmp_path / "t.gguf")
    f = read_gguf(tmp_path / "t.gguf")
    fields = {k: v for k, v in f.fields.items() if k not in change}
    write_gguf(tmp_path / "bad.gguf", {**fields, **change}, {})
    with pytest.raises(GGUFError, match=message) as e:
        tokenizer_from_gguf(read_gguf(tmp_path / "bad.gguf"))
    assert str(tmp_path / "bad.gguf") in str(e.value)


def test_export_refuses_a_pattern_llama_cpp_cannot_name():
    tok = BPETokenizer.train(CORPUS, vocab_size=300, pattern="gpt4")
    with pytest.raises(GGUFError, match="no llama.cpp name"):
        tokenizer_metadata(tok, 300)


# ----------------------------------------------------------------------------- chat templates

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
           "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
           "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")
PLAIN_CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                "message['content'] + '<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA2 = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c\nd"}],
]


@pytest.mark.parametrize("source", [SMOLLM2, PLAIN_CHATML], ids=["smollm2", "chatml"])
def test_chatml_templates_render_as_jinja2_renders_them(source):
    jinja2 = pytest.importorskip("jinja2")
    ours = ChatTemplate.from_jinja(source)
    assert ours is not None and ours.name == "chatml"
    for messages in CONVERSATIONS:
        want = jinja2.Environment().from_string(source).render(messages=messages,
                                                                add_generation_prompt=True)
        assert ours.render(messages) == want


def test_a_template_tinylm_does_not_know_falls_back_to_plain_and_says_so(hf_bpe, tmp_path):
    assert ChatTemplate.from_jinja(LLAMA2) is None
    write_hf_bpe(hf_bpe, tmp_path / "t.gguf")
    f = read_gguf(tmp_path / "t.gguf")
    said = {}
    for text, name in ((LLAMA2, "plain"), (SMOLLM2, "chatml")):
        write_gguf(tmp_path / "c.gguf", {**f.fields, "tokenizer.chat_template": text}, {})
        said[name] = []
        template = ChatTemplate.resolve(None, str(tmp_path / "c.gguf"), log=said[name].append)
        assert template.name == name
    assert said["chatml"] == [] and len(said["plain"]) == 1
    assert "not recognise" in said["plain"][0] and "plain template" in said["plain"][0]


# ----------------------------------------------------------------------------- SentencePiece

SP = "\u2581"
SPM_CORPUS = ("The quick brown fox jumps over the lazy dog. " * 5
              + "Les élèves où vont-ils? Größe 日本語 " * 3 + "hello  world 12345\n\ttabs ")
SPM_TEXTS = [SPM_CORPUS, "Hello world", " leading space", "日本語 and x", "a<s>b", "  two",
             "\n\n", "über straße 42", "x", "ab</s>", "5€ ok"]


def write_spm(path):
    """A 'llama' (SentencePiece) vocabulary: <unk> <s> </s>, the 256 byte tokens, the
    corpus' characters but three (left to the byte fallback) and its frequent n-grams,
    scored by frequency rank; with the llama hyper-parameters llama.cpp wants."""
    import collections

    text = (" " + SPM_CORPUS).replace(" ", SP)
    counts = collections.Counter(text[i:i + n] for n in range(2, 7)
                                 for i in range(len(text) - n + 1))
    chars = sorted(set(text) - set("日本語"))
    pieces = [p for p, c in counts.most_common(300) if c > 1]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + chars + pieces
    w = gguf.GGUFWriter(path, "llama")
    for key, value in [("context_length", 64), ("embedding_length", 32), ("block_count", 1),
                       ("feed_forward_length", 64), ("head_count", 4)]:
        getattr(w, f"add_{key}")(value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-100.0 - i for i in range(len(chars))]
                       + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (len(chars) + len(pieces)))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()


def test_a_sentencepiece_vocabulary_encodes_as_llama_cpp_does(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    write_spm(tmp_path / "spm.gguf")
    tok = tokenizer_from_gguf(read_gguf(tmp_path / "spm.gguf"))
    llm = llama_cpp.Llama(str(tmp_path / "spm.gguf"), vocab_only=True, verbose=False)
    for text in SPM_TEXTS:
        ours = tok.encode(text, disallowed_special=())
        assert ours == llm.tokenize(text.encode(), add_bos=False, special=False), text
        assert tok.encode(text, allowed_special="all") == \
            llm.tokenize(text.encode(), add_bos=False, special=True), text
        assert tok.decode(ours) == text


def test_a_sentencepiece_tokenizer_round_trips_and_saves(tmp_path):
    from tinylm.tokenizers import from_file

    write_spm(tmp_path / "spm.gguf")
    tok = tokenizer_from_gguf(read_gguf(tmp_path / "spm.gguf"))
    assert tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    ids = tok.encode(SPM_CORPUS)
    assert tok.decode_bytes(ids) == SPM_CORPUS.encode()
    euro = tok.encode("5€")                              # no token has €: its bytes
    assert [tok.id_to_token(i) for i in euro[-3:]] == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert tok.decode(euro) == "5€"
    assert [tok.id_to_token(i) for i in tok.encode("the lazy")][0].startswith(SP)
    tok.save(tmp_path / "tok.txt")
    back = from_file(tmp_path / "tok.txt")
    assert type(back) is type(tok) and back.encode(SPM_CORPUS) == ids


def test_a_sentencepiece_tokenizer_exports_and_reads_back(tmp_path):
    write_spm(tmp_path / "spm.gguf")
    tok = tokenizer_from_gguf(read_gguf(tmp_path / "spm.gguf"))
    write_gguf(tmp_path / "out.gguf", {"general.architecture": "llama",
                                       **tokenizer_metadata(tok, tok.vocab_size)}, {})
    r = gguf.GGUFReader(tmp_path / "out.gguf")
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    assert r.fields["tokenizer.ggml.tokens"].contents() == tok.tokens
    assert r.fields["tokenizer.ggml.scores"].contents() == pytest.approx(tok.scores)
    back = tokenizer_from_gguf(read_gguf(tmp_path / "out.gguf"))
    assert back.encode(SPM_CORPUS) == tok.encode(SPM_CORPUS)
