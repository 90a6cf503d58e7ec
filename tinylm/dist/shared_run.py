"""The run folder of a multi-rank run: opened by rank 0, its state sent to the others.

Only rank 0 takes the folder's lock, finishes an interrupted commit and reads and
verifies the checkpoint (``tinylm.rundir.open_run``); it then broadcasts the
trainer state (JSON, as bytes) or the error it met, so every rank resumes from the
same step or fails with the same message. The other ranks read the checkpoint's
weight files themselves (the folder is on a file system every rank sees, as on a
cluster's shared disk); only rank 0 ever writes there.
"""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np

from tinylm.dist.comm import DistError, ReportedElsewhere
from tinylm.rundir import Run, open_run

SETUP_TIMEOUT_S = 3600.0  # rank 0 may verify a large checkpoint or tokenize a corpus first


def setup_timeout() -> float:
    """``TINYLM_DIST_SETUP_TIMEOUT`` (seconds), else an hour: how long ranks wait
    for rank 0's one-off work (opening the run, tokenizing the data)."""
    text = os.environ.get("TINYLM_DIST_SETUP_TIMEOUT", "").strip()
    try:
        return float(text) if text else SETUP_TIMEOUT_S
    except ValueError:
        raise DistError(f"TINYLM_DIST_SETUP_TIMEOUT must be a number of seconds, got "
                        f"{text!r}") from None


@contextlib.contextmanager
def open_shared_run(comm, path, *, overwrite: bool = False, resume="auto"):
    """``open_run`` for every rank of ``comm`` (see the module docstring): a ``Run``
    with the same ``state`` on each, locked by rank 0 for the ``with`` block."""
    if comm.size == 1:
        with open_run(path, overwrite=overwrite, resume=resume) as run:
            yield run
        return
    if not comm.is_main:
        state = _receive(comm)
        yield Run(os.fspath(path), state)
        return
    try:
        opened = open_run(path, overwrite=overwrite, resume=resume)
        run = opened.__enter__()
    except Exception as e:
        _send(comm, {"error": " ".join(str(e).split()) or type(e).__name__})
        raise
    with contextlib.ExitStack() as stack:
        stack.push(opened)
        _send(comm, {"state": run.state})
        yield run


def _send(comm, message: dict) -> None:
    data = np.frombuffer(json.dumps(message).encode(), np.uint8)
    comm.broadcast(np.array([data.size], np.int64), timeout=setup_timeout())
    comm.broadcast(data.copy(), timeout=setup_timeout())


def _receive(comm) -> dict | None:
    size = comm.broadcast(np.zeros(1, np.int64), timeout=setup_timeout())
    data = comm.broadcast(np.zeros(int(size[0]), np.uint8), timeout=setup_timeout())
    message = json.loads(data.tobytes().decode())
    if "error" in message:
        raise ReportedElsewhere(f"rank 0 could not open the run folder: {message['error']}")
    return message["state"]
