"""CUDA kernels (*.cu) and their Python launchers; each kernel has a NumPy reference
that is its test oracle (see flash_attention.py). runtime.py holds what the launchers
share: the compiled-module cache and NaN-poisoned outputs. cpu.c and native.py are the
CPU's compiled kernels (the exact GELU, the norms, AdamW, softmax), built with the
system C compiler on first use; the NumPy paths they replace are their references."""
