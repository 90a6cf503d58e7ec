"""tinylm/kernels/runtime.py: the kernel cache and NaN-poisoned outputs the launchers share."""

import numpy as np

from tinylm import backend
from tinylm.kernels import runtime


def test_empty_poisons_each_storage_with_nan(monkeypatch):
    assert np.isnan(runtime.empty(np, (3,), np.float32, True)).all()
    assert np.isnan(runtime.empty(np, (3,), np.float16, True)).all()
    bits = runtime.empty(np, (3,), np.uint16, True, "bfloat16")  # bfloat16 as raw bits
    assert np.isnan((bits.astype(np.uint32) << 16).view(np.float32)).all()
    monkeypatch.setenv("TINYLM_POISON", "1")
    assert runtime.poison_on() and not runtime.poison_on(False)
    monkeypatch.setenv("TINYLM_POISON", "0")
    assert not runtime.poison_on() and runtime.poison_on(True)


def test_kernel_compiles_a_module_once_per_options_and_device(monkeypatch, tmp_path):
    compiled = []

    class Module:
        def __init__(self, source, options):
            compiled.append((source, options))

        def get_function(self, name):
            return object()

    monkeypatch.setattr(backend, "raw_module", Module)
    monkeypatch.setattr(runtime, "_modules", {})
    monkeypatch.setattr(runtime, "_kernels", {})
    cu = tmp_path / "k.cu"
    cu.write_text("// kernels")
    setups = []
    a = runtime.kernel(cu, ("-DX=1",), "a", 0, setups.append)
    assert runtime.kernel(cu, ("-DX=1",), "a", 0, setups.append) is a  # cached
    runtime.kernel(cu, ("-DX=1",), "b", 0)  # same module
    runtime.kernel(cu, ("-DX=2",), "a", 0)  # other options: another module
    runtime.kernel(cu, ("-DX=1",), "a", 1)  # other device: another module
    assert compiled == [("// kernels", ("-DX=1",)), ("// kernels", ("-DX=2",)),
                        ("// kernels", ("-DX=1",))]
    assert setups == [a]


def test_every_cuda_source_has_an_sm90_compile_test():
    """Every .cu under tinylm/kernels is compiled by `nvcc --ptx -arch=sm_90` in the
    ordinary test run: some tests/test_*.py imports its launcher (or names the file) and
    runs nvcc --ptx for sm_90 (those tests skip only where nvcc is not installed)."""
    from pathlib import Path

    kernels = Path(runtime.__file__).parent
    tests = {p.name: p.read_text() for p in Path(__file__).parent.glob("test_*.py")}
    sources = sorted(kernels.glob("*.cu"))
    assert {"flash_attention.cu", "fused.cu"} <= {s.name for s in sources}
    for cu in sources:
        names = (cu.name, f"kernels import {cu.stem}", f"kernels.{cu.stem}")
        covering = [t for t, text in tests.items()
                    if '"--ptx"' in text and "sm_90" in text and any(n in text for n in names)]
        assert covering, f"{cu.name}: no test compiles it with nvcc --ptx -arch=sm_90"
