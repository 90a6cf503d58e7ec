"""Two planted off-by-one bugs in the causal tile skipping of flash_attention.cu, and the
machinery to build the CPU emulator from a mutated copy (issue 21, item 0).

    first_query_tile    r / BR  ->  (r + 1) / BR: dk/dv skips the query tile whose last
                        row is the first to see the block's first key (Tk - Tq = 1 mod BR)
    visible_key_tiles   last_key / BC + 1  ->  (last_key + BC - 1) / BC: the forward and
                        dq skip the last key's tile when that key starts a tile

Used by tests/test_fa_mutations.py (CI: the cheapest module) and bench/fa_mutations.py
(every family, both old and new tests, a table for bench/RESULTS.md).
"""

from __future__ import annotations

import threading
from pathlib import Path

from tinylm.kernels import flash_attention as fa

MUTATIONS = {
    "first_query_tile (r+1)/BR": ("    return r <= 0 ? 0 : r / BR;",
                                  "    return r <= 0 ? 0 : (r + 1) / BR;"),
    "visible_key_tiles skips the last key's tile": (
        "    return min(n_all, last_key / BC + 1);",
        "    return min(n_all, (last_key + BC - 1) / BC);"),
}


def mutated_source(name: str, directory: Path) -> Path:
    """A copy of flash_attention.cu with mutation `name` applied (exactly once)."""
    old, new = MUTATIONS[name]
    text = fa.SOURCE_PATH.read_text()
    assert text.count(old) == 1, f"mutation {name!r}: the line to change is not in the .cu once"
    path = Path(directory) / f"flash_attention_{abs(hash(name)) % 10**8}.cu"
    path.write_text(text.replace(old, new))
    return path


def emulator_for(build, source: Path, directory: Path):
    """An `emulator` fixture value (get, out) whose modules are built from `source`."""
    built, lock = {}, threading.Lock()  # runs go from several threads

    def get(dtype, d, ldmatrix):
        with lock:
            if (dtype, d, ldmatrix) not in built:
                exe = Path(directory) / f"emu_{source.stem}_{dtype}_{d}_{int(ldmatrix)}"
                built[(dtype, d, ldmatrix)] = build(source, dtype, d, ldmatrix, exe)
            return built[(dtype, d, ldmatrix)]

    return get, Path(directory)
