"""Do the FlashAttention kernel tests catch the two planted tile-skipping bugs of issue 21?

For the unmutated flash_attention.cu and each mutation in tests/fa_mutations.py, builds the
CPU emulator from a temporary copy and runs (all on the CPU, no GPU needed):
  old     the 36 emulated cases that were there before (norm-relative error < 1e-2 / 1e-5)
  sweep   the boundary sweep, per kernel family (test_boundary_sweep's families)
  spike   the spike visibility test, per family (test_spike_visibility's families)
and prints, per source, how many cases / families fail. Expected: the original fails
nothing; each mutation fails no old case but fails sweep and spike in every family.

    PYTHONPATH=. python bench/fa_mutations.py [--quick]     # ~5 min on 2 loaded cores

--quick: one family per test group (a smoke run of the script itself).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_flash_attention_kernel as fk  # noqa: E402
from fa_mutations import MUTATIONS, emulator_for, mutated_source  # noqa: E402


def old_case_fails(emu, case) -> bool:
    impl, variant, dtype, shape, causal, order = case[:6]
    opts = case[6] if len(case) > 6 else {}
    try:
        res = fk.run_emulated(emu, dtype, impl, shape, causal, order, variant=variant, **opts)
    except AssertionError:  # the emulator itself failed
        return True
    return any(not fk.rel_err(g, w) < fk.TOL[dtype] for g, w in res.values())


def family_fails(run, fn, family, cases) -> str:
    try:
        fk.run_all(run, 1, fn, family, cases)
        return ""
    except AssertionError as e:
        return str(e).splitlines()[0]


def check(source: Path, work: Path, quick: bool) -> dict:
    emu = emulator_for(fk.build_emulator, source, work)

    def run(dtype, impl, variant, shape, causal, host):
        got, exact, scale = fk.emulate(emu, dtype, impl, shape, causal, host, variant=variant)
        return got, exact, scale, fk.fa.kernel_plan(impl, dtype, shape[-1], scale, variant)

    old = fk.EMU_CASES[:4] if quick else fk.EMU_CASES
    sweep = fk.SWEEP_FAMILIES[:1] if quick else fk.SWEEP_FAMILIES
    spike = fk.SPIKE_FAMILIES[:1] if quick else fk.SPIKE_FAMILIES
    workers = os.cpu_count() or 2
    with ThreadPoolExecutor(max_workers=workers) as pool:
        old_f = sum(pool.map(lambda c: old_case_fails(emu, c), old))
        sweep_f = list(pool.map(lambda f: family_fails(run, fk.sweep_case, f, fk.family_shapes(f)),
                                sweep))
        spike_f = list(pool.map(lambda f: family_fails(run, fk.spike_case, f,
                                                       fk.spike_cases(*f[:4])), spike))
    return {"old": (old_f, len(old)), "sweep": sweep_f, "spike": spike_f,
            "families": [fk._family_id(f) for f in sweep], "spike_families":
            [fk._family_id(f) for f in spike]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = {"original": fk.fa.SOURCE_PATH}
        sources.update({m: mutated_source(m, work) for m in MUTATIONS})
        print("| source | old emulated cases failing | sweep families failing | "
              "spike families failing | s |")
        print("|---|---|---|---|---|")
        for name, src in sources.items():
            t0 = time.perf_counter()
            r = check(src, work, args.quick)
            n_sw = sum(bool(x) for x in r["sweep"])
            n_sp = sum(bool(x) for x in r["spike"])
            print(f"| {name} | {r['old'][0]} of {r['old'][1]} | {n_sw} of {len(r['sweep'])} | "
                  f"{n_sp} of {len(r['spike'])} | {time.perf_counter() - t0:.0f} |", flush=True)
            for fam, why in zip(r["families"] + r["spike_families"], r["sweep"] + r["spike"]):
                if why:
                    print(f"    {why}")


if __name__ == "__main__":
    main()
