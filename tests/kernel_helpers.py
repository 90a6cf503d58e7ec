"""What the CUDA kernel tests share: building a ``.cu`` module the way the GPU would
load it, with nvcc to PTX and then ptxas to machine code (ptxas checks the inline PTX
and reports each entry function's registers and spills), without a GPU.

    nvcc, ptxas = nvcc_tools()                    # or the test skips
    rc, log = nvcc_ptxas(nvcc, ptxas, source, ["--ptx", "-arch=sm_90"], options, ptx)
    assert_clean_build(rc, log, ["kernel_a", "kernel_b"])
"""

from __future__ import annotations

import shutil
import subprocess

import pytest


def nvcc_tools() -> tuple:
    """(nvcc, ptxas) on PATH; the test skips where either is missing."""
    nvcc, ptxas = shutil.which("nvcc"), shutil.which("ptxas")
    if nvcc is None or ptxas is None:
        pytest.skip("nvcc/ptxas not on PATH")
    return nvcc, ptxas


def nvcc_ptxas(nvcc, ptxas, source, flags, options, ptx) -> tuple:
    """``nvcc FLAGS OPTIONS SOURCE -o PTX`` (``flags`` name the target: ``--ptx`` and
    ``-arch=sm_XX``), then, if it worked, ``ptxas -arch=sm_XX -v PTX``: (the last
    return code, every command run with its output)."""
    arch = next(f for f in flags if f.startswith("-arch="))
    cmd = [nvcc, *flags, *options, str(source), "-o", str(ptx)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    log = f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}"
    if r.returncode == 0:
        cmd = [ptxas, arch, "-v", str(ptx), "-o", str(ptx.with_suffix(".cubin"))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        log += f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}"
    return r.returncode, log


def assert_clean_build(rc: int, log: str, names) -> None:
    """The build worked, without a warning, and assembled every entry ``names``."""
    assert rc == 0, f"the build failed:\n{log}"
    assert "warning" not in log.lower(), f"compiler warnings:\n{log}"
    for name in names:
        assert f"Compiling entry function '{name}'" in log, f"{name} missing:\n{log}"
