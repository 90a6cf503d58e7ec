"""The corpus of the whole-corpus tokenizer tests (parity with tiktoken and Hugging
Face on every id, nanoGPT's character vocabulary): tinyshakespeare in full where the
benchmarks' ``../shared/data`` has it, else its first 2,000 lines kept in
``tests/data`` (53 KB), so that a fresh clone runs the same tests, on less text,
instead of skipping them. ``TINYLM_TEST_CORPUS=slice`` picks the slice anyway."""

import os
from pathlib import Path

FULL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
SLICE = Path(__file__).resolve().parent / "data" / "tinyshakespeare_head.txt"
SLICE_LINES = 2000

IS_FULL = FULL.exists() and os.environ.get("TINYLM_TEST_CORPUS") != "slice"
SHAKESPEARE = FULL if IS_FULL else SLICE
# A BPE vocabulary the corpus fills with merges that occur at least twice
# (the slice has about 2,000 such merges, the full text far more).
BPE_VOCAB = 4096 if IS_FULL else 2048
