"""One small forward+backward of every FlashAttention kernel family, for
compute-sanitizer (memcheck, racecheck) to watch:

    compute-sanitizer --tool memcheck python3 bench/flash_attention_small.py

d=64, T=100 (not a multiple of any tile), causal, GQA (4 query heads on 2 kv heads);
float32 (simt), float16 and bfloat16 (mma) and float16 (simt). Prints the relative
error of each output against the float64 reference; exit status 1 if one is too big.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from tinylm import backend  # noqa: E402
from tinylm.kernels import flash_attention as fa  # noqa: E402


def main() -> int:
    if not backend.cuda_available():
        print("flash_attention_small: no CuPy/GPU")
        return 0
    cp = backend.xp_for("cuda")
    B, H, Hkv, T, D, causal = 2, 4, 2, 100, 64, True
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(s) for s in [(B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, D),
                                             (B, H, T, D)]]
    ok = True
    for impl, dtype, tol in [("simt", "float32", 1e-5), ("mma", "float16", 1e-2),
                             ("mma", "bfloat16", 1e-2), ("simt", "float16", 1e-2)]:
        bits = dtype == "bfloat16"
        if bits:
            dev = [cp.asarray(fa.to_bf16_bits(np, h)) for h in host]
            exact = [fa.from_bf16_bits(np, cp.asnumpy(d)).astype(np.float64) for d in dev]
        else:
            dev = [cp.asarray(h.astype(dtype)) for h in host]
            exact = [cp.asnumpy(d).astype(np.float64) for d in dev]
        q, k, v, do = dev
        kw = dict(impl=impl, bf16_bits=bits, poison=True)
        o, lse = fa.flash_attention_forward(q, k, v, causal, **kw)
        dq, dk, dv = fa.flash_attention_backward(q, k, v, o, lse, do, causal, **kw)
        cp.cuda.runtime.deviceSynchronize()

        def host64(a):
            a = cp.asnumpy(a)
            return fa.from_bf16_bits(np, a).astype(np.float64) if bits else a.astype(np.float64)

        want = fa.attention_reference(np, *exact[:3], causal)
        want += fa.attention_reference_backward(np, *exact, causal)
        got = (host64(o), cp.asnumpy(lse).astype(np.float64), host64(dq), host64(dk), host64(dv))
        errs = []
        for g, w in zip(got, want):
            e = np.inf if np.isnan(g).any() else np.linalg.norm(g - w) / np.linalg.norm(w)
            errs.append(e)
        line = " ".join(f"{n}={e:.2e}" for n, e in zip(("o", "lse", "dq", "dk", "dv"), errs))
        good = all(e < tol for e in errs)
        ok &= good
        print(f"{impl:>4} {dtype:>8}: {line} {'ok' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
