"""CUDA kernels (*.cu) and their Python launchers; each kernel has a NumPy reference
that is its test oracle (see flash_attention.py). runtime.py holds what the launchers
share: the compiled-module cache and NaN-poisoned outputs."""
