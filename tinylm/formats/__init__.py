"""Files in and out, beside the models (gguf.py and ggml_types.py import nothing above
NumPy and tinylm.errors; gguf_model.py builds models, gguf_tokenizer.py tokenizers).

    ggml_types.py   the GGML tensor types: id, name, weights per block, bytes per block
    gguf.py         GGUF (llama.cpp's file): memory-mapped reader and atomic writer
    gguf_model.py   GGUF models in and out: llama / gpt2 files <-> tinylm Decoders
    gguf_tokenizer.py  tokenizer.ggml.* <-> tinylm tokenizers (byte-level BPE, SentencePiece)

The safetensors reader and writer is ``tinylm/checkpoint.py``.
"""
