"""The one atomic file writer: every file tinylm saves goes through here.

    with atomic_open("out/model.safetensors", "wb") as f:   # streamed writes
        f.write(header); f.write(body)
    write_atomic("out/config.json", text)                    # str or bytes at once
    with atomic_folder("out/hf") as tmp:                     # a whole folder
        model.save_pretrained(tmp)

The bytes go to a temporary file in the destination's folder (``.NAME.XXXX.tmp``),
are flushed and fsynced, the file gets the permissions a plain ``open`` would give
it (0666 minus the umask; ``mkstemp`` makes 0600), and it is renamed over ``path``
in one step. An error or interrupt at any point removes the temporary file and
leaves the previous ``path`` as it was. A missing or unwritable folder is a
``TinyLMError`` (subclass ``error``) naming the path, not an ``OSError``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from tinylm.errors import TinyLMError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb", *, error=TinyLMError):
    """A file opened for writing ("w" text, UTF-8 with "\\n" newlines, or "wb") that
    replaces ``path`` only when the ``with`` block ends without an error."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes only ('w' or 'wb'), got mode {mode!r}")
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=directory)
    except OSError as e:
        raise error(f"cannot write {path}: {e.strerror or e}; pick a folder that exists and "
                    f"that you may write to") from None
    try:
        if mode == "w":
            f = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        else:
            f = os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, TinyLMError):
            raise error(f"cannot write {path}: {e.strerror or e}") from None
        raise


def write_atomic(path, data, *, error=TinyLMError) -> None:
    """Write ``data`` (str: UTF-8 text; bytes) to ``path`` atomically."""
    with atomic_open(path, "w" if isinstance(data, str) else "wb", error=error) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_folder(path):
    """A new empty folder beside ``path`` (``.NAME.XXXX``) for the ``with`` block to
    fill; when the block ends without an error it replaces ``path`` (a folder that
    was there is removed first), else it is removed and ``path`` stays as it was."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=parent)
    try:
        yield tmp
        if os.path.isdir(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
