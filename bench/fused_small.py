"""Every fused training-step kernel (tinylm/kernels/fused.cu) once, on small odd
shapes, for compute-sanitizer (memcheck, racecheck, synccheck) to watch:

    compute-sanitizer --tool memcheck python3 bench/fused_small.py

Values are checked by tests/test_fused_kernels.py; this only prints the largest
difference from the composed CuPy path of each op, and exits 1 if one is not finite
where the composed path is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import tinylm.ops as F  # noqa: E402
from tinylm import backend, optim  # noqa: E402
from tinylm.tensor import Tensor  # noqa: E402


def step(cp, enabled: bool):
    """Losses and gradients of a norm + cross-entropy graph and one AdamW step."""
    os.environ["TINYLM_FUSED_KERNELS"] = "1" if enabled else "0"
    rng = np.random.default_rng(0)
    x = Tensor(cp.asarray(rng.standard_normal((37, 300)).astype(np.float32)), requires_grad=True)
    w = Tensor(cp.asarray(rng.standard_normal(300).astype(np.float32)), requires_grad=True)
    b = Tensor(cp.asarray(rng.standard_normal(300).astype(np.float32)), requires_grad=True)
    t = cp.asarray(rng.integers(0, 300, 37))  # int64
    t[::5] = -100
    h = F.layer_norm(x, w, b) + F.rms_norm(x, w)
    loss = F.cross_entropy(h, Tensor(t), label_smoothing=0.1)
    loss.backward()
    opt = optim.AdamW([w, b], lr=0.1, weight_decay=0.1, amsgrad=True)
    opt.step()
    return [loss.data, x.grad, w.data, b.data]


def main() -> int:
    cp = backend.xp_for("cuda")
    fused, composed = step(cp, True), step(cp, False)
    bad = 0
    for name, a, c in zip(["loss", "dx", "w after AdamW", "b after AdamW"], fused, composed):
        a, c = cp.asnumpy(a), cp.asnumpy(c)
        diff = float(np.abs(a - c).max() / max(np.abs(c).max(), 1e-30))
        ok = np.isfinite(a).all() or not np.isfinite(c).all()
        bad += not ok
        print(f"{name:>14}: max rel diff {diff:.2e}{'' if ok else '  NOT FINITE'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
