"""Files in and out, beside the models (they import nothing above NumPy and tinylm.errors).

    ggml_types.py   the GGML tensor types: id, name, weights per block, bytes per block
    gguf.py         GGUF (llama.cpp's file): memory-mapped reader and atomic writer

The safetensors reader and writer is ``tinylm/checkpoint.py``.
"""
