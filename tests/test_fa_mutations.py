"""The new FlashAttention kernel tests catch the two planted tile-skipping bugs of
issue 21 (tests/fa_mutations.py): each mutation, compiled into the CPU emulator from a
temporary copy of flash_attention.cu, fails the boundary sweep and the spike test of
both SIMT families (the float32 module, cheapest to build and run), which the unmutated
source passes (test_flash_attention_kernel.py runs the same functions on it).
bench/fa_mutations.py does the same for every family and records which of the older
tests notice (none did)."""

from __future__ import annotations

import shutil

import pytest

import test_flash_attention_kernel as fk
from fa_mutations import MUTATIONS, emulator_for, mutated_source

FAMILIES = [("simt", "v1", "float32", 32, "all"), ("simt", "v2", "float32", 32, "all")]


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_planted_tile_skipping_bugs_fail_the_new_tests(tmp_path, mutation):
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH")
    emu = emulator_for(fk.build_emulator, mutated_source(mutation, tmp_path), tmp_path)

    def run(dtype, impl, variant, shape, causal, host):
        got, exact, scale = fk.emulate(emu, dtype, impl, shape, causal, host, variant=variant)
        return got, exact, scale, fk.fa.kernel_plan(impl, dtype, shape[-1], scale, variant)

    for family in FAMILIES:
        with pytest.raises(AssertionError, match="cases fail"):
            fk.run_all(run, 2, fk.sweep_case, family, fk.family_shapes(family))
        with pytest.raises(AssertionError, match="cases fail"):
            fk.run_all(run, 2, fk.spike_case, family, fk.spike_cases(*family[:4]))
