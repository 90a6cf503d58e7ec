"""The run folder: what ``tinylm train --out DIR`` writes, and opening it safely.

A run folder holds::

    config.json             the model config          (tinylm generate --model DIR
    tokenizer.txt           the tokenizer               loads these two and the weights)
    model.safetensors       the weights
    optimizer.safetensors   AdamW's moment estimates
    trainer_state.json      step, RNG states, data position, optimizer hyper-parameters,
                            the run's TrainConfig, and each file's size and SHA-256
    metrics.jsonl           one JSON record per log line / evaluation (appended)
    .lock                   while a process trains here: its pid and host

A checkpoint is written as a set: into ``DIR/ckpt.tmp-XXXX/`` first, then renamed to
``DIR/ckpt.new/`` (one atomic rename: the set is now complete), then each file moved
over its old copy, ``trainer_state.json`` last, and ``ckpt.new`` removed. A crash
before the rename leaves the previous checkpoint untouched; a crash after it is
rolled forward the next time the folder is opened. Loading checks every file's size
and SHA-256 against ``trainer_state.json``, so a truncated or damaged file is a
``CheckpointError`` naming it, never silently wrong weights.

``open_run(DIR)`` is how a training run takes the folder: it creates it (or checks
that it is a folder it may write in), takes ``DIR/.lock`` (``fcntl.flock``: a second
process training in DIR fails with the pid holding it; the lock dies with its
process, even on SIGKILL), finishes an interrupted commit, and reads and verifies the
checkpoint to resume, once. A non-empty folder that holds no checkpoint (a Hugging
Face folder, a run whose trainer_state.json is gone) is refused unless
``overwrite``, and even then only tinylm's own file names are removed. A folder the
run created is removed again if the run fails before writing anything into it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np

from tinylm import backend, checkpoint
from tinylm.atomic import write_atomic
from tinylm.errors import CheckpointError, TinyLMError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not protected from each other
    fcntl = None

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", \
    "trainer_state.json"
CONFIG_FILE, TOKENIZER_FILE, METRICS_FILE = "config.json", "tokenizer.txt", "metrics.jsonl"
CHECKPOINT_FILES = (CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE, OPTIMIZER_FILE)  # + STATE_FILE
RUN_FILES = (*CHECKPOINT_FILES, STATE_FILE, METRICS_FILE)  # every file a run writes
LOCK_FILE, NEW_DIR, TMP_PREFIX = ".lock", "ckpt.new", "ckpt.tmp-"
STATE_VERSION = 1


class RunInUse(TinyLMError, RuntimeError):
    """Another process is training in this run folder."""


# --------------------------------------------------------------------------- the lock


class RunLock:
    """``DIR/.lock``, held with ``fcntl.flock`` by the one process training in DIR.

    Re-entrant within a process (the trainer re-takes what the command took). The
    file holds the holder's pid and host, for the error the next process gets; it is
    removed on release (a process that opened it just before checks that what it
    locked is still the file at that path)."""

    _held: dict = {}  # real path -> [fd, count]
    _guard = threading.Lock()

    def __init__(self, folder):
        self.path = os.path.join(os.fspath(folder), LOCK_FILE)
        self.key = os.path.realpath(self.path)

    def acquire(self) -> "RunLock":
        with self._guard:
            if self.key in self._held:
                self._held[self.key][1] += 1
                return self
            fd = self._lock() if fcntl is not None else None
            self._held[self.key] = [fd, 1]
        return self

    def _lock(self) -> int:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise TinyLMError(f"cannot write in {os.path.dirname(self.path)}: "
                                  f"{e.strerror or e}; pick a folder you may write to") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise TinyLMError(f"cannot lock {self.path}: {e.strerror or e}") from None
                raise RunInUse(f"{os.path.dirname(self.path)} is in use: {holder} is training "
                               f"there (it holds {self.path}); wait for it to finish or stop "
                               f"it, or pick another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed it as we opened it: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        return fd

    def release(self) -> None:
        with self._guard:
            entry = self._held.get(self.key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._held[self.key]
            if entry[0] is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
                os.close(entry[0])

    @property
    def held(self) -> bool:
        return self.key in self._held

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# --------------------------------------------------------------------------- opening a run


@dataclass
class Run:
    """An open run folder: locked, checked, its checkpoint (if any) read and verified.

    ``state``: the trainer state to resume from (None: a fresh run)."""

    path: str
    state: dict | None = None
    created: bool = False


@contextlib.contextmanager
def open_run(path, *, overwrite: bool = False, resume="auto"):
    """The run folder ``path``, locked for the ``with`` block (see the module docstring).

    ``resume``: "auto" (resume a checkpoint if there is one), True (there must be one)
    or False (there must be none); ``overwrite``: start over, removing tinylm's files."""
    path = os.fspath(path)
    top = _make_folder(path)
    lock = RunLock(path).acquire()
    try:
        run = Run(path, _read_for_open(path, overwrite, resume), created=top is not None)
        yield run
    except BaseException:
        if top is not None:
            _remove_if_unused(path, top)
        raise
    finally:
        lock.release()


def _make_folder(path: str) -> str | None:
    """Create ``path`` if needed; the topmost folder created (None: it existed)."""
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise TinyLMError(f"cannot write in the run folder {path}: permission denied; "
                              f"pick a folder you may write to")
        return None
    if os.path.lexists(path):
        raise TinyLMError(f"the run folder {path} is a file, not a folder; pick another --out")
    top = os.path.abspath(path)
    while not os.path.lexists(os.path.dirname(top)) and os.path.dirname(top) != top:
        top = os.path.dirname(top)
    try:
        os.makedirs(path)
    except OSError as e:
        raise TinyLMError(f"cannot create the run folder {path}: {e.strerror or e}; pick a "
                          f"folder you may write to") from None
    return top


def _remove_if_unused(path: str, top: str) -> None:
    """Remove the folders a failed run created, if it wrote nothing into them."""
    with contextlib.suppress(OSError):
        if set(os.listdir(path)) - {LOCK_FILE}:
            return
        shutil.rmtree(path)
        here = os.path.dirname(os.path.abspath(path))
        while len(here) >= len(top) and not os.listdir(here):
            os.rmdir(here)
            here = os.path.dirname(here)


def _read_for_open(path: str, overwrite: bool, resume) -> dict | None:
    recover_checkpoint(path)
    has_state = os.path.exists(os.path.join(path, STATE_FILE))
    if overwrite:
        if resume is True:
            raise CheckpointError(f"{path}: overwrite and resume exclude each other")
        if not has_state:
            _refuse_foreign(path, overwrite=True)
        clear_run(path)
        return None
    if has_state:
        if resume is False:
            raise CheckpointError(f"{path} already holds a checkpoint; resume it, pick "
                                  f"another --out, or pass --overwrite to start over")
        return read_checkpoint_state(path)
    if resume is True:
        raise CheckpointError(f"{path} has no checkpoint to resume")
    _refuse_foreign(path, overwrite=False)
    return None


def _refuse_foreign(path: str, overwrite: bool) -> None:
    """A folder with no checkpoint: refuse it if it holds anything (but a failed run's
    metrics); with ``overwrite``, only if a file a run would write there is not
    tinylm's (a Hugging Face config.json, model.safetensors ...)."""
    names = sorted(n for n in os.listdir(path) if n not in (LOCK_FILE, METRICS_FILE))
    if overwrite:
        theirs = [n for n in names if n in RUN_FILES and not _written_by_tinylm(path, n)]
        if theirs:
            raise CheckpointError(
                f"{path} holds {', '.join(theirs)}, which tinylm did not write (a Hugging Face "
                f"checkpoint?); training there would replace them, even with --overwrite: move "
                f"them away, or pick another --out")
        return
    if names:
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CheckpointError(
            f"{path} is not empty ({shown}) and holds no checkpoint to resume (no "
            f"{STATE_FILE}); pick another --out, or pass --overwrite to start a run there (it "
            f"removes only the files a run writes and keeps the others)")


def _written_by_tinylm(folder: str, name: str) -> bool:
    """Whether the run file ``name`` in ``folder`` is one tinylm wrote (by its content)."""
    path = os.path.join(folder, name)
    try:
        if name == CONFIG_FILE:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return isinstance(data, dict) and "architecture" in data
        if name == TOKENIZER_FILE:
            with open(path, "rb") as f:
                return f.read(17) == b"tinylm-tokenizer "
        if name == MODEL_FILE:
            return checkpoint.read_metadata(path).get("format") == "np"
    except (OSError, ValueError, TinyLMError):
        return False
    return True  # optimizer.safetensors, trainer_state.json, metrics.jsonl: tinylm's names


def is_run_file(name: str) -> bool:
    """Whether ``name`` (in a run folder) is a file tinylm writes there."""
    if name in RUN_FILES or name in (LOCK_FILE, NEW_DIR) or name.startswith(TMP_PREFIX):
        return True
    # an atomic write's temporary file, left by a kill: .model.safetensors.XXXX.tmp
    return name.endswith(".tmp") and any(name.startswith(f".{n}.") for n in RUN_FILES)


def clear_run(path) -> None:
    """Remove the files a run writes from ``path`` (and nothing else)."""
    for name in os.listdir(path):
        if is_run_file(name) and name != LOCK_FILE:
            full = os.path.join(path, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full, ignore_errors=True)
            else:
                os.remove(full)


# --------------------------------------------------------------------------- checkpoints


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def has_checkpoint(out_dir) -> bool:
    settle(out_dir)
    return os.path.exists(os.path.join(out_dir, STATE_FILE))


def settle(out_dir, wait_s: float = 10.0) -> None:
    """For readers: finish an interrupted commit if no process trains in ``out_dir``
    (else wait, up to ``wait_s``, for its commit in progress to end)."""
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(os.path.join(out_dir, NEW_DIR)):
        return
    lock = RunLock(out_dir)
    deadline = time.monotonic() + wait_s
    while os.path.isdir(os.path.join(out_dir, NEW_DIR)):
        try:
            with lock:
                recover_checkpoint(out_dir)
            return
        except RunInUse:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        except TinyLMError:
            return  # a folder we may not write in: read what is there


def recover_checkpoint(out_dir) -> None:
    """Finish a checkpoint whose commit was interrupted (roll ``ckpt.new`` forward) and
    remove temporary folders of saves that never completed. Only for the process
    holding the run's lock (readers call ``settle``)."""
    if not os.path.isdir(out_dir):
        return
    new = os.path.join(out_dir, NEW_DIR)
    if os.path.isdir(new):
        if os.path.exists(os.path.join(new, STATE_FILE)):
            _commit(new, out_dir)
        else:  # cannot happen with our saves; never trust a set without its state
            shutil.rmtree(new, ignore_errors=True)
    for name in os.listdir(out_dir):
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def _commit(new: str, out_dir: str) -> None:
    for name in sorted(os.listdir(new), key=lambda n: n == STATE_FILE):  # state last
        os.replace(os.path.join(new, name), os.path.join(out_dir, name))
    os.rmdir(new)


def save_checkpoint(out_dir, model, optimizer, tokenizer, state: dict,
                    weights: dict | None = None) -> None:
    """Write a checkpoint set atomically (see the module docstring); ``state`` is the
    JSON-ready trainer state, completed here with the optimizer's hyper-parameters and
    every file's size and SHA-256. ``weights``: what the model file holds (default:
    ``model.state_dict()``; a PEFT run saves only its adapters)."""
    from tinylm.optim import flatten_state_dict

    os.makedirs(out_dir, exist_ok=True)
    recover_checkpoint(out_dir)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out_dir)
    try:
        model.config.save(os.path.join(tmp, CONFIG_FILE))
        tokenizer.save(os.path.join(tmp, TOKENIZER_FILE))
        weights = {k: np.ascontiguousarray(backend.to_numpy(v))
                   for k, v in (model.state_dict() if weights is None else weights).items()}
        checkpoint.save_file(weights, os.path.join(tmp, MODEL_FILE), metadata={"format": "np"})
        arrays, meta = flatten_state_dict(optimizer.state_dict())
        checkpoint.save_file(arrays, os.path.join(tmp, OPTIMIZER_FILE))
        files = {}
        for name in CHECKPOINT_FILES:
            path = os.path.join(tmp, name)
            files[name] = {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}
        state = {**state, "optimizer": meta, "files": files, "version": STATE_VERSION}
        write_atomic(os.path.join(tmp, STATE_FILE), json.dumps(state, indent=1) + "\n",
                     error=CheckpointError)
        new = os.path.join(out_dir, NEW_DIR)
        os.replace(tmp, new)  # the set is complete from here on
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(new, out_dir)


def read_checkpoint_state(out_dir, verify: bool = True) -> dict:
    """The trainer state of ``out_dir``'s checkpoint, after checking that every file
    it lists is there with its recorded size and SHA-256."""
    settle(out_dir)
    path = os.path.join(out_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{out_dir} has no checkpoint ({STATE_FILE} is missing)") from None
    except ValueError as e:
        raise CheckpointError(f"checkpoint file {path} is damaged or truncated ({e}); "
                              f"restore it, or retrain (tinylm train --overwrite)") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path} is not a tinylm trainer state (version "
                              f"{STATE_VERSION})")
    if verify:
        for name, want in state.get("files", {}).items():
            verify_file(os.path.join(out_dir, name), want)
    return state


def verify_file(path, want: dict) -> None:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint file {path} is missing; restore it, or retrain "
                              f"(tinylm train --overwrite)")
    size = os.path.getsize(path)
    if size != want["bytes"]:
        what = "truncated" if size < want["bytes"] else "longer than it was saved"
        raise CheckpointError(f"checkpoint file {path} is {what}: {size} bytes, the "
                              f"checkpoint recorded {want['bytes']}; the save was interrupted "
                              f"or the file damaged: restore it, or retrain "
                              f"(tinylm train --overwrite)")
    if sha256_file(path) != want["sha256"]:
        raise CheckpointError(f"checkpoint file {path} is damaged: its SHA-256 differs from "
                              f"the one recorded when it was saved; restore it, or retrain "
                              f"(tinylm train --overwrite)")


def load_model_dir(path, device: str = "cpu"):
    """(model, tokenizer) of a run folder (or any folder with config.json,
    tokenizer.txt and model.safetensors), checked against its trainer state if any.
    Most callers want ``tinylm.loading.load_model``, which reads any source."""
    from tinylm.models import build_model, config_from_dict
    from tinylm.models.config import read_config_file
    from tinylm.tokenizers import from_file

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory; pass the --out folder of a "
                              f"`tinylm train` run")
    settle(path)
    if os.path.exists(os.path.join(path, STATE_FILE)):
        state = read_checkpoint_state(path, verify=False)
        if state.get("weights") == "trainable":  # a PEFT run: its adapters alone
            base = (state.get("extra") or {}).get("base", "its base model")
            raise CheckpointError(f"{path} holds a fine-tuned adapter, not a whole model; "
                                  f"load it on its base: --model {base} --adapter {path}")
        for name in (CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE):
            if name in state.get("files", {}):
                verify_file(os.path.join(path, name), state["files"][name])
    for name in (CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE):
        if not os.path.exists(os.path.join(path, name)):
            raise CheckpointError(f"{path} has no {name}; is it the --out folder of a "
                                  f"`tinylm train` run?")
    config = config_from_dict(read_config_file(os.path.join(path, CONFIG_FILE)))
    model = build_model(config)
    model.load_state_dict(checkpoint.load_file(os.path.join(path, MODEL_FILE)))
    tokenizer = from_file(os.path.join(path, TOKENIZER_FILE))
    return model.to(device), tokenizer


# --------------------------------------------------------------------------- metrics


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended as training goes."""

    def __init__(self, path):
        self.path = path

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run writes them again)."""
        if not os.path.exists(self.path):
            return
        keep = [line for line in read_metrics(self.path, raw=True) if line[0]["step"] <= step]
        write_atomic(self.path, "".join(text for _, text in keep), error=CheckpointError)


def read_metrics(path, raw: bool = False) -> list:
    """The records of a metrics.jsonl (a torn last line, from a kill, is skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                out.append((record, line) if raw else record)
    return out
