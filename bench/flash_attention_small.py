"""One small forward+backward of every FlashAttention kernel family, for
compute-sanitizer (memcheck, racecheck) to watch:

    compute-sanitizer --tool memcheck python3 bench/flash_attention_small.py

By default d=64, T=100 (not a multiple of any tile), causal, GQA (4 query heads on 2 kv
heads); float32 (simt), float16 and bfloat16 (mma) and float16 (simt); ``--head-dims``,
``--cases``, ``--variant`` and ``--T`` pick others. Prints the relative error of each
output against the float64 reference; exit status 1 if one is too big.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tinylm import backend  # noqa: E402
from tinylm.kernels import flash_attention as fa  # noqa: E402


CASES = {"simt-float32": 1e-5, "mma-float16": 1e-2, "mma-bfloat16": 1e-2,
         "simt-float16": 1e-2}


def check(cp, D: int, impl: str, dtype: str, tol: float, variant=None, T=100) -> bool:
    """One fwd+bwd at head dim D, outputs poisoned first; print the relative errors."""
    B, H, Hkv, causal = 2, 4, 2, True
    rng = np.random.default_rng(D)
    host = [rng.standard_normal(s) for s in [(B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D),
                                             (B, H, T, D)]]
    bits = dtype == "bfloat16"
    if bits:
        dev = [cp.asarray(fa.to_bf16_bits(np, h)) for h in host]
        exact = [fa.from_bf16_bits(np, cp.asnumpy(d)).astype(np.float64) for d in dev]
    else:
        dev = [cp.asarray(h.astype(dtype)) for h in host]
        exact = [cp.asnumpy(d).astype(np.float64) for d in dev]
    q, k, v, do = dev
    kw = dict(impl=impl, bf16_bits=bits, poison=True, variant=variant)
    o, lse = fa.flash_attention_forward(q, k, v, causal, **kw)
    dq, dk, dv = fa.flash_attention_backward(q, k, v, o, lse, do, causal, **kw)
    cp.cuda.runtime.deviceSynchronize()

    def host64(a):
        a = cp.asnumpy(a)
        return fa.from_bf16_bits(np, a).astype(np.float64) if bits else a.astype(np.float64)

    want = fa.attention_reference(np, *exact[:3], causal)
    want += fa.attention_reference_backward(np, *exact, causal)
    got = (host64(o), cp.asnumpy(lse).astype(np.float64), host64(dq), host64(dk), host64(dv))
    errs = [np.inf if np.isnan(g).any() else np.linalg.norm(g - w) / np.linalg.norm(w)
            for g, w in zip(got, want)]
    good = all(e < tol for e in errs)
    plan = fa.kernel_plan(impl, dtype, D, 1.0, variant)
    print(f"d={D:<3} {impl:>4} {dtype:>8} {plan['fwd']}/{plan['dkdv']}/{plan['dq']}: "
          + " ".join(f"{n}={e:.2e}" for n, e in zip(("o", "lse", "dq", "dk", "dv"), errs))
          + (" ok" if good else " FAIL"))
    return good


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", default="64", help="comma-separated, e.g. 32,64,128")
    ap.add_argument("--cases", default=",".join(CASES), help=f"from {', '.join(CASES)}")
    ap.add_argument("--variant", default=None, help="v1 or v2 (default: the launcher's)")
    ap.add_argument("--T", type=int, default=100)
    args = ap.parse_args(argv)
    if not backend.cuda_available():
        print("flash_attention_small: no CuPy/GPU")
        return 0
    cp = backend.xp_for("cuda")
    ok = True
    for D in (int(d) for d in args.head_dims.split(",")):
        for case in args.cases.split(","):
            impl, dtype = case.split("-")
            ok &= check(cp, D, impl, dtype, CASES[case], args.variant, args.T)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
