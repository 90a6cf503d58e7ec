"""What every kernel launcher shares: a ``.cu`` compiled once per (options, device) with
its kernels looked up once, and outputs poisoned with NaN for tests.

    kern = kernel(SOURCE_PATH, options, "fz_norm_fwd", device_id)
    out = empty(xp, shape, np.float32, poison=poison_on())

Set ``TINYLM_POISON=1`` to fill every kernel output with NaN before the kernels run, so
an element a kernel fails to write shows up as NaN (the GPU tests set it).
"""

from __future__ import annotations

import os
from pathlib import Path

from tinylm import backend

# A quiet NaN per storage dtype, written through an integer view of the same width.
NAN_BITS = {"float32": 0x7FC00000, "float16": 0x7E00, "bfloat16": 0x7FC0}

_modules: dict = {}
_kernels: dict = {}


def kernel(source_path, options: tuple, name: str, device_id: int, setup=None):
    """Kernel ``name`` of ``source_path`` compiled with NVRTC ``options`` for device
    ``device_id``; compiled on first use (CuPy also keeps an on-disk cache).
    ``setup(kern)`` runs once on a freshly looked-up kernel (e.g. to opt in to more
    dynamic shared memory)."""
    key = (str(source_path), options, name, device_id)
    kern = _kernels.get(key)
    if kern is None:
        module_key = key[:2] + key[3:]
        mod = _modules.get(module_key)
        if mod is None:
            mod = _modules[module_key] = backend.raw_module(Path(source_path).read_text(),
                                                            options)
        kern = mod.get_function(name)
        if setup is not None:
            setup(kern)
        _kernels[key] = kern
    return kern


def poison_on(poison=None) -> bool:
    """``poison`` if given, else whether TINYLM_POISON=1."""
    return os.environ.get("TINYLM_POISON", "") == "1" if poison is None else bool(poison)


def empty(xp, shape, dtype, poison: bool, dtype_name: str | None = None):
    """``xp.empty``, filled with NaN when ``poison``. ``dtype_name`` names the storage
    when it is not ``dtype``'s own (bfloat16 held as uint16 bits)."""
    out = xp.empty(shape, dtype=dtype)
    if poison:
        nan = NAN_BITS[dtype_name or out.dtype.name]
        out.view(xp.uint32 if out.dtype.itemsize == 4 else xp.uint16).fill(nan)
    return out
