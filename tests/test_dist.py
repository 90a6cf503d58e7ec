"""tinylm.dist: collectives over MPI on loopback, data parallel and ZeRO-1 training of
the nanoGPT character recipe against one process, resuming on another number of
ranks, and a rank that dies, stops or raises.

Ranks are subprocesses of ``mpiexec -n N`` (the mpich wheel's, from the dist extra),
one BLAS thread each. The recipe (examples/shakespeare_char.toml) is shrunk by
overrides (1 layer, 32 wide, block 16) and trains on tests/data's Shakespeare
head with packed sampling, so that a global batch of B windows is exactly the B/N
windows each of N micro-batches would take.

Tolerances. N ranks on a global batch of B give the losses of one process on the
same batch within rtol 1e-5 (float32 sums in another order). They are bit for bit
(==) the losses of one process that accumulates the ranks' shards as micro-batches
(batch B/N, grad_accum N): with two ranks in any reduction order (a sum of two terms
does not depend on the order), with three under ``reduce_order = "fixed"``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dist_helpers import _env

from tinylm import dist
from tinylm.dist import data_parallel, launch
from tinylm.errors import TinyLMError

HERE = Path(__file__).parent
RECIPE = HERE.parent / "examples" / "shakespeare_char.toml"
HEAD = HERE / "data" / "tinyshakespeare_head.txt"
ENTRY = launch.ENTRY
RTOL = 1e-5


def _mpiexec():
    pytest.importorskip("mpi4py", reason="the dist extra is not installed: "
                                         "pip install -e '.[dist]'")
    try:
        return launch.find_mpiexec()
    except dist.DistError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def mpiexec():
    return _mpiexec()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _json_objects(text: str) -> list:
    """Every JSON object in ``text``: the ranks share one stdout, so their lines may run
    together ('{...}{...}') or split; each object is decoded where it starts."""
    decoder, objects, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        obj, end = decoder.raw_decode(text, i)
        objects.append(obj)
        i = text.find("{", end)
    return objects




def _recipe_args(out, cache, *extra) -> list:
    return ["train", "--config", str(RECIPE), "--data", str(HEAD), "--out", str(out),
            "--cache-dir", cache, "--n-layer", "1", "--d-model", "32", "--n-head", "2",
            "--block-size", "16", "-s", "model.max_positions=16", "--sampling", "packed",
            "--eval-every", "3", "--eval-iters", "2", "--log-every", "1", "--sample-tokens",
            "0", "--warmup-steps", "1", "--lr-decay-steps", "6", "--no-progress", *extra]


def _train(mpiexec, n: int, out, cache, *extra, env=None):
    """``tinylm train`` on ``n`` ranks (n = 1: no mpiexec); the metrics records."""
    head = [sys.executable, "-c", ENTRY] if n == 1 else [mpiexec, "-n", str(n),
                                                        sys.executable, "-c", ENTRY]
    done = subprocess.run(head + _recipe_args(out, cache, *extra), env=env or _env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def _losses(records) -> list:
    return [r["loss"] for r in records if "loss" in r]


def _vals(records) -> list:
    return [r["val_loss"] for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def one(mpiexec, cache, tmp_path_factory):
    """One process: the global batch of 4, and the same 4 windows as 2 micro-batches."""
    root = tmp_path_factory.mktemp("one")
    whole = _train(mpiexec, 1, root / "whole", cache, "--batch-size", "4", "--max-steps", "6")
    acc = _train(mpiexec, 1, root / "acc", cache, "--batch-size", "2", "--grad-accum", "2",
                 "--max-steps", "6")
    return {"whole": whole, "acc": acc, "root": root}


# --------------------------------------------------------------------------- one rank, no MPI


def test_one_rank_needs_no_mpi():
    code = ("import sys, numpy as np; from tinylm import dist; c = dist.world(); "
            "x = np.arange(6.0).reshape(3, 2); "
            "assert (c.rank, c.size) == (0, 1); assert np.array_equal(c.all_reduce(x), x); "
            "assert np.array_equal(c.all_gather(x, axis=1), x); "
            "assert np.array_equal(c.reduce_scatter(x), x); c.broadcast(x); c.barrier(); "
            "print('mpi4py' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_launcher_environment():
    assert dist.launched_size({}) == 1
    assert dist.launched_size({"PMI_SIZE": "4", "PMI_RANK": "3"}) == 4
    assert dist.launched_rank({"OMPI_COMM_WORLD_RANK": "2"}) == 2
    assert dist.launched_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    with pytest.raises(TinyLMError, match="not a number of ranks"):
        dist.launched_size({"PMI_SIZE": "many"})
    assert launch.child_args(["train", "--nproc", "2", "--out", "x", "--nproc=3"]) == [
        "train", "--out", "x"]


def test_rows_of_a_global_batch_cover_it_once():
    for n in (1, 2, 3, 7, 12):
        for size in (1, 2, 3, 4):
            cuts = [data_parallel._rows(n, r, size) for r in range(size)]
            assert [hi - lo for lo, hi in cuts] == [len(a) for a in
                                                    np.array_split(np.arange(n), size)]
            assert cuts[0][0] == 0 and cuts[-1][1] == n
            assert all(cuts[i][1] == cuts[i + 1][0] for i in range(size - 1))


class _TwoRanks:
    """A stand-in host engine of rank 0 of 2 (for the checks that need no traffic)."""

    rank, size, world_ranks = 0, 2, [0, 1]


def test_settings_that_cannot_split_over_ranks(tmp_path):
    from tinylm.train import TrainConfig

    comm = dist.Comm(_TwoRanks())
    config = TrainConfig(out_dir=str(tmp_path / "r"), data=[str(HEAD)], batch_size=1)
    with pytest.raises(TinyLMError, match="batch_size = 1 is the global batch"):
        dist.DataParallel.from_config(config, comm)
    dp = dist.DataParallel.from_config(TrainConfig(out_dir=str(tmp_path / "r"),
                                                   data=[str(HEAD)]), comm)
    with pytest.raises(TinyLMError, match="pairs or groups the rows"):
        dp.check_objective(object(), "dpo")
    with pytest.raises(TinyLMError, match="zero must be 0 or 1"):
        TrainConfig(out_dir=str(tmp_path / "r"), data=[str(HEAD)], zero=2)


def test_nproc_without_the_dist_extra_says_how_to_install(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from tinylm.cli import cli

    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: None)
    result = CliRunner().invoke(cli, ["train", "--nproc", "2", "--out", str(tmp_path / "r"),
                                      "--data", str(HEAD)])
    assert result.exit_code == 2
    assert "pip install -e '.[dist]'" in result.output


# --------------------------------------------------------------------------- collectives


COLLECTIVES = r"""
import sys
import numpy as np
from tinylm import dist
c = dist.world(); r, n = c.rank, c.size
terms = [np.random.default_rng(k).standard_normal((5, 3)).astype(np.float32) for k in range(n)]
x = terms[r]
in_order = terms[0].copy()
for t in terms[1:]:
    in_order += t
f = c.with_options(fixed_order=True)
assert np.array_equal(f.all_reduce(x), in_order)                # the bits of rank order
assert np.allclose(c.all_reduce(x), in_order, rtol=1e-6, atol=1e-6)
assert np.array_equal(c.all_reduce(x, "max"), np.max(terms, axis=0))
y = np.concatenate([x] * n)                                      # (5n, 3): block k = x
assert np.array_equal(f.reduce_scatter(y), in_order)
assert np.allclose(c.reduce_scatter(y), in_order, rtol=1e-6, atol=1e-6)
z = np.arange(4 * n, dtype=np.int64).reshape(2, 2 * n) * (r + 1)
want = np.arange(4 * n).reshape(2, 2 * n) * sum(range(1, n + 1))
assert np.array_equal(c.reduce_scatter(z, axis=1), want[:, 2 * r:2 * r + 2])
g = c.all_gather(np.full((2, 3), r, np.int32))
assert g.shape == (2 * n, 3) and np.array_equal(g[::2, 0], np.arange(n))
assert np.array_equal(c.all_gather(x, axis=1), np.concatenate(terms, axis=1))
b = np.full(4, float(r)); c.broadcast(b, root=n - 1); assert (b == n - 1).all()
inplace = x.copy(); c.all_reduce(inplace, out=inplace); assert np.allclose(inplace, in_order)
blocks = np.zeros((2 * n, 3), np.float32); blocks[2 * r:2 * r + 2] = r + 1
assert c.all_gather_in_place(blocks) is blocks
assert np.array_equal(blocks[::2, 0], np.arange(1, n + 1))
into = np.empty((5, 3), np.float32)
assert c.reduce_scatter(y, out=into) is into and np.allclose(into, in_order, rtol=1e-6,
                                                             atol=1e-6)
assert np.array_equal(f.reduce_scatter(y, out=into), in_order)
sub = c.split(r % 2)
assert sub.size == len(range(r % 2, n, 2)) and sub.rank == r // 2
assert sub.all_reduce(np.array([r]))[0] == sum(range(r % 2, n, 2))
c.barrier()
sys.stdout.write(f"ok {r}\n")  # one write: the ranks share the pipe
"""


def test_collectives_on_three_ranks(mpiexec, tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    out = subprocess.run([mpiexec, "-n", "3", sys.executable, str(script)], env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(out.stdout.split()) == sorted("ok 0 ok 1 ok 2".split())


# --------------------------------------------------------------------------- training


def test_data_parallel_equals_one_process_and_resumes_on_one_and_two(mpiexec, cache, one,
                                                                     tmp_path):
    """2 ranks to step 3 (checkpoint), then resumed to 6: on 2 ranks (switching to
    ZeRO-1 with the fixed order) and, from a copy of the checkpoint, on 1."""
    dp = tmp_path / "dp"
    first = _train(mpiexec, 2, dp, cache, "--batch-size", "4", "--max-steps", "3",
                   "--sample-tokens", "8")  # (every rank decodes the sample)
    np.testing.assert_allclose(_losses(first), _losses(one["whole"])[:3], rtol=RTOL)
    shutil.copytree(dp, tmp_path / "dp-copy")
    both = _train(mpiexec, 2, dp, cache, "--batch-size", "4", "--max-steps", "6", "--zero", "1",
                  "--reduce-order", "fixed")
    assert len(_losses(both)) == 6  # rank 0 alone wrote the metrics, once per step
    np.testing.assert_allclose(_losses(both), _losses(one["acc"]), rtol=RTOL)
    np.testing.assert_allclose(_losses(both), _losses(one["whole"]), rtol=RTOL)
    np.testing.assert_allclose(_vals(both), _vals(one["whole"]), rtol=RTOL)
    alone = _train(mpiexec, 1, tmp_path / "dp-copy", cache, "--batch-size", "4",
                   "--max-steps", "6")
    assert _losses(alone)[:3] == _losses(first)
    np.testing.assert_allclose(_losses(alone), _losses(one["whole"]), rtol=RTOL)


def test_zero1_equals_one_process_and_resumes_on_one(mpiexec, cache, one, tmp_path):
    out = tmp_path / "zero"
    first = _train(mpiexec, 2, out, cache, "--batch-size", "4", "--max-steps", "3", "--zero",
                   "1")
    np.testing.assert_allclose(_losses(first), _losses(one["whole"])[:3], rtol=RTOL)
    _assert_same_optimizer(out, one["root"] / "whole", exact=False)  # gathered whole
    resumed = _train(mpiexec, 1, out, cache, "--batch-size", "4", "--max-steps", "6")
    np.testing.assert_allclose(_losses(resumed), _losses(one["whole"]), rtol=RTOL)


ZERO_RUN = r"""
import json, sys
from tinylm.train import TrainConfig, Trainer
config = TrainConfig.from_toml(sys.argv[1], **json.loads(sys.argv[2]))
trainer = Trainer(config)
trainer.fit()
opt = trainer.optimizer
n = sum(p.size for p in trainer.model.parameters() if p.requires_grad)
print(json.dumps({"rank": trainer.dist.rank, "bytes": opt.state_bytes(), "n": n,
                  "pieces": sum(p.size for p in opt.inner.state)}))
"""


def test_fixed_order_on_three_ranks_is_bit_identical(mpiexec, cache, tmp_path):
    """Three ranks in the fixed order, data parallel and ZeRO-1: the same bits as one
    process accumulating the three shards as micro-batches (losses, and ZeRO's
    gathered AdamW state); each ZeRO rank holds a third of AdamW's state. The head is
    untied here: one process adds a tied weight's two gradients into the running
    sum one at a time, the ranks add their partial sums, so tied weights agree only
    within rounding."""
    settings = dict(data=[str(HEAD)], cache_dir=cache, block_size=16, sampling="packed",
                    eval_every=3, eval_iters=2, log_every=1, sample_tokens=0, warmup_steps=1,
                    lr_decay_steps=6, max_steps=4)
    model = {"architecture": "gpt2", "n_layer": 1, "d_model": 32, "n_head": 2,
             "max_positions": 16, "dropout": 0.0, "bias": False, "activation": "gelu",
             "tie_embeddings": False}
    untied = ("--max-steps", "4", "-s", "model.tie_embeddings=false")
    ref = tmp_path / "ref"
    acc = _train(mpiexec, 1, ref, cache, "--batch-size", "2", "--grad-accum", "3", *untied)
    dp = _train(mpiexec, 3, tmp_path / "dp3", cache, "--batch-size", "6", "--reduce-order",
                "fixed", *untied)
    assert _losses(dp) == _losses(acc)
    script = tmp_path / "zero_run.py"
    script.write_text(ZERO_RUN)
    overrides = {**settings, "out_dir": str(tmp_path / "z3"), "batch_size": 6, "zero": 1,
                 "reduce_order": "fixed", "model": model}
    out = subprocess.run([mpiexec, "-n", "3", sys.executable, str(script), str(RECIPE),
                          json.dumps(overrides)], env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = sorted(_json_objects(out.stdout), key=lambda r: r["rank"])
    n = ranks[0]["n"]
    assert sum(r["pieces"] for r in ranks) == n  # every element owned once
    for r in ranks:  # exp_avg + exp_avg_sq, float32, for a third (rounded up) of them
        assert r["bytes"] == 8 * r["pieces"] <= 8 * -(-n // 3)
    records = [json.loads(line) for line in open(tmp_path / "z3" / "metrics.jsonl")]
    assert _losses(records) == _losses(acc)
    _assert_same_optimizer(tmp_path / "z3", ref, exact=True)
    for run in ("dp3", "z3"):
        _assert_same_weights(tmp_path / run, ref)


def _assert_same_weights(run, ref) -> None:
    from tinylm import checkpoint

    got = checkpoint.load_file(str(Path(run) / "model.safetensors"))
    want = checkpoint.load_file(str(Path(ref) / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]), k


HALF_RUN = r"""
import json, sys
from tinylm.train import TrainConfig, Trainer
config = TrainConfig.from_toml(sys.argv[1], **json.loads(sys.argv[2]))
config.half = True  # refused on the CPU for speed only (NumPy float16 GEMMs are slow)
trainer = Trainer(config).setup()
losses, norms = [], []
for scale in json.loads(sys.argv[3]):  # the loss scale to start each step from
    trainer.scaler.scale_value = scale
    loss, norm = trainer.train_step(trainer.next_batches())
    trainer.step += 1
    losses.append(loss), norms.append(norm)
if trainer.dist.is_main:
    sys.stdout.write(json.dumps({"losses": losses, "norms": norms,
                                 "scale": trainer.scaler.scale_value}) + "\n")
"""


def test_mixed_precision_on_two_ranks_as_one_process(mpiexec, cache, tmp_path):
    """``half``'s float16 products and loss scaling (run here on NumPy's float16, which
    the CPU refuses for speed alone) on 2 ranks, data parallel, ZeRO-1 and tensor
    parallel: one process's losses (rtol 1e-5; the float16 products differ in
    rounding where the ranks' rows are summed) for 3 steps, then 2 steps whose scale
    (2^40) overflows float16: skipped on every rank (no norm, the scale halved) as
    in one process, with no rank left waiting in a collective."""
    script = tmp_path / "half_run.py"
    script.write_text(HALF_RUN)
    model = {"architecture": "gpt2", "n_layer": 1, "d_model": 32, "n_head": 2,
             "max_positions": 16, "dropout": 0.0, "bias": False, "activation": "gelu"}
    settings = dict(data=[str(HEAD)], cache_dir=cache, block_size=16, sampling="packed",
                    eval_every=100, log_every=1, sample_tokens=0, warmup_steps=1,
                    lr_decay_steps=6, max_steps=5, batch_size=4, model=model)
    scales = json.dumps([2.0**16] * 3 + [2.0**40] * 2)
    runs = {}
    for name, n, extra in [("one", 1, {}), ("dp", 2, {}), ("zero", 2, {"zero": 1}),
                           ("tp", 2, {"tensor_parallel": 2})]:
        overrides = json.dumps({**settings, **extra, "out_dir": str(tmp_path / name)})
        head = [sys.executable] if n == 1 else [mpiexec, "-n", str(n), sys.executable]
        out = subprocess.run(head + [str(script), str(RECIPE), overrides, scales],
                             env=_env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        (line,) = out.stdout.splitlines()
        runs[name] = json.loads(line)
    for name in ("dp", "zero", "tp"):
        r, want = runs[name], runs["one"]
        np.testing.assert_allclose(r["losses"], want["losses"], rtol=RTOL, err_msg=name)
        np.testing.assert_allclose(r["norms"][:3], want["norms"][:3], rtol=1e-3, err_msg=name)
        assert np.isnan(r["norms"][3:]).all() and r["scale"] == want["scale"] == 2.0**39, \
            (name, r)
    assert runs["one"]["losses"][3] != runs["one"]["losses"][2]  # (other batches)


def _assert_same_optimizer(run, ref, exact: bool) -> None:
    """``run``'s checkpoint holds a whole AdamW state in one process's layout: ``ref``'s
    arrays, names and shapes (with ``exact``: bit for bit)."""
    from tinylm import checkpoint

    arrays = checkpoint.load_file(str(Path(run) / "optimizer.safetensors"))
    want = checkpoint.load_file(str(Path(ref) / "optimizer.safetensors"))
    assert {k: v.shape for k, v in arrays.items()} == {k: v.shape for k, v in want.items()}
    for k in want:
        assert not exact or np.array_equal(arrays[k], want[k]), k


# --------------------------------------------------------------------------- faults


def _start(command, env, out_dir):
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (Path(out_dir) / "metrics.jsonl").exists():  # training has begun
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    return process


def _rank_pid(folder, rank: int) -> int:
    return int((Path(folder) / f"rank-{rank}").read_text().split()[0])


def _long_run(out, cache) -> list:
    return _recipe_args(out, cache, "--batch-size", "4", "--max-steps", "1000000",
                        "--eval-every", "100000")


def test_a_rank_killed_stops_the_other_with_its_rank_named(mpiexec, cache, tmp_path):
    pids = tmp_path / "pids"
    process = _start([sys.executable, "-c", ENTRY, *_long_run(tmp_path / "run", cache),
                      "--nproc", "2"], _env(TINYLM_DIST_PIDS=str(pids)), tmp_path / "run")
    survivor = _rank_pid(pids, 0)
    os.kill(_rank_pid(pids, 1), signal.SIGKILL)
    start = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert process.returncode == 2
    assert "Error: rank 1 of 2" in err and "resume" in err
    assert not launch._alive(survivor)



def test_a_rank_killed_by_sigkill_gets_one_line_naming_it_and_the_signal(mpiexec, cache,
                                                                         tmp_path):
    """``--nproc 2``, rank 1 SIGKILLed mid-training: one ``Error:`` line on stderr, naming
    rank 1 (its pid) and SIGKILL, from mpiexec's "Killed (signal 9)", saying what to do;
    exit code 2, no Python traceback from any process."""
    pids = tmp_path / "pids"
    process = _start([sys.executable, "-c", ENTRY, *_long_run(tmp_path / "run", cache),
                      "--nproc", "2"], _env(TINYLM_DIST_PIDS=str(pids)), tmp_path / "run")
    killed = _rank_pid(pids, 1)
    os.kill(killed, signal.SIGKILL)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 2, err
    lines = [line for line in err.splitlines() if "Error" in line]
    assert len(lines) == 1, err
    # (on a loaded machine the watcher may see rank 1 and hydra's SIGKILL of rank 0 end
    # in one wake-up: both statuses are SIGKILL, and the line names both, honestly)
    assert re.fullmatch(rf"Error: rank (1 of 2 \(pid {killed}\)|0 or 1 of 2) was killed by "
                        rf"SIGKILL \(.*"
                        rf"out-of-memory killer.*\), so mpiexec stopped the others; run the "
                        rf"same command again to resume from the last checkpoint", lines[0]), err
    assert "Traceback" not in err and "Traceback" not in out
    assert not (pids / "rank-1.error").exists()


# What the mpich wheel's hydra (5.0.2) prints with -print-all-exitcodes, all on stdout,
# stderr empty: each rank's raw wait status, "[mpiexec@vm] Exit codes: [vm] 0,256" for
# rank 1's exit(1) ("0,768": exit(3)), and for rank 1's SIGSEGV (SIGKILL: "9,9", "Killed
# (signal 9)") with the other killed by hydra, naming the pid of that other:
HYDRA_SEGV = """
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID {pid} RUNNING AT vm
=   EXIT CODE: 9
=   CLEANING UP REMAINING PROCESSES
=   YOU CAN IGNORE THE BELOW CLEANUP MESSAGES
===================================================================================
{codes}YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Segmentation fault (signal 11)
This typically refers to a problem with your application.
Please see the FAQ page for debugging suggestions"""

FAKE_MPIEXEC = r"""#!{python}
import os, socket, sys
if sys.argv[1:] == ["--version"]:
    sys.exit(print("HYDRA build details:\n    Version:                                 5.0.2"))
asked = "-print-all-exitcodes" in sys.argv  # (the launcher asks hydra for them)
host = socket.gethostname()
def codes(*hosts):
    return f"[mpiexec@vm] Exit codes: " + "".join(f"[{{h}}] {{s}}\n" for h, s in hosts)
pids, mode = os.environ["TINYLM_DIST_PIDS"], os.environ["FAKE_MODE"]
line = "Error: rank 1 of 2: all_reduce failed; resume from the last checkpoint"
with open(os.path.join(pids, "rank-1"), "w") as f:
    f.write(f"999999999 {{host}}\n")
if mode in ("lost", "said"):
    with open(os.path.join(pids, "rank-1.error"), "w") as f:
        f.write(line + "\n")
if mode == "said":
    sys.stderr.write("step 3\r" + line + "\n")
if mode == "killed":  # (no statuses: hydra's text alone)
    print({segv!r}.format(pid=999999999, codes=""))
if mode == "misnamed":  # hydra naming rank 0, which it killed after rank 1
    with open(os.path.join(pids, "rank-0"), "w") as f:
        f.write(f"999999998 {{host}}\n")
    print({segv!r}.format(pid=999999998, codes=codes((host, "9,11")) if asked else ""))
if mode == "hosts":  # rank 0 on another host: a line per proxy, the statuses not used
    with open(os.path.join(pids, "rank-0"), "w") as f:
        f.write("999999998 other\n")
    print({segv!r}.format(pid=999999999, codes=codes(("other", "0"), (host, "11"))
                          if asked else ""))
if mode == "exited":  # rank 1's exit(3), its own lines with "Exit codes: " in them shown
    print("rank 1: Exit codes: [vm] 3 (its own)\n[vm] 0,768")
    sys.stdout.write("unended")
    print(codes((host, "0,768")) if asked else "", end="")
    sys.exit(3)
sys.exit(2 if mode in ("lost", "said") else 11)
"""

SEGV = ("Error: rank 1 of 2 (pid 999999999) was killed by SIGSEGV (a crash in native code), "
        "so mpiexec stopped the others; run the same command again to resume from the last "
        "checkpoint")


@pytest.mark.parametrize("mode, want", [
    ("lost", "Error: rank 1 of 2: all_reduce failed; resume from the last checkpoint"),
    ("said", "Error: rank 1 of 2: all_reduce failed; resume from the last checkpoint"),
    ("killed", SEGV), ("misnamed", SEGV), ("hosts", SEGV),
    ("exited", "Error: rank 1 of 2 (pid 999999999) exited with status 3 without an error "
               "message (its output above may say why); run the same command again to resume "
               "from the last checkpoint")])
def test_launch_prints_a_ranks_report_once_whether_or_not_it_reached_stderr(tmp_path, mode,
                                                                            want):
    """A stand-in mpiexec (no MPI) printing what hydra prints: a rank's ``rank-R.error``
    that never reached stderr is printed by the launcher, one that did is not printed
    again, and a rank that ended without a report is named with how it ended (its wait
    status in hydra's "Exit codes" when they say another rank than its "PID ... RUNNING
    AT": 11 is SIGSEGV, 768 exit status 3), those lines not shown but a rank's own
    "Exit codes: " lines are."""
    fake = tmp_path / "mpiexec"
    fake.write_text(FAKE_MPIEXEC.format(python=sys.executable, segv=HYDRA_SEGV))
    fake.chmod(0o755)
    pids = tmp_path / "pids"
    pids.mkdir()
    (pids / "rank-0.error").write_text("Error: rank 0 of 2: from an earlier job\n")  # stale
    code = ("import sys; from tinylm.dist import launch; "
            f"launch.find_mpiexec = lambda: {str(fake)!r}; sys.exit(launch.launch(2, ['x']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(TINYLM_DIST_PIDS=str(pids), FAKE_MODE=mode), timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "Error" in line]  # (\r too)
    assert lines == [want], done.stderr
    assert "Traceback" not in done.stderr and "[mpiexec@" not in done.stdout, done.stdout
    assert "Exit codes" not in done.stdout or mode == "exited"
    assert "] 11" not in done.stdout and "[other]" not in done.stdout
    if mode == "exited":
        assert done.stdout.splitlines()[-3:] == ["rank 1: Exit codes: [vm] 3 (its own)",
                                                 "[vm] 0,768", "unended"], done.stdout
    if mode in ("killed", "misnamed"):
        assert "RUNNING AT vm" in done.stdout and "signal 11" in done.stdout


RANK_ENDS = r"""
import os, signal, socket, sys, time
rank, how = int(os.environ["PMI_RANK"]), sys.argv[-1]
folder = os.environ["TINYLM_DIST_PIDS"]
with open(os.path.join(folder, f"rank-{rank}"), "w") as f:
    f.write(f"{os.getpid()} {socket.gethostname()}\n")
if rank == 1:
    print("rank 1: Exit codes: [vm] 1", flush=True)  # (its own line: shown)
    time.sleep(1)  # (the launcher has seen its pid file: it watches it end)
    if how == "exit":
        sys.exit(1)
    os.kill(os.getpid(), getattr(signal, how))
    time.sleep(60)
# rank 0: until rank 1 has ended (its pid file there and the pid gone), then a clean end
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with open(os.path.join(folder, "rank-1")) as f:
            os.kill(int(f.read().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        if os.path.exists(os.path.join(folder, "rank-1")):
            break
    time.sleep(0.05)
"""


@pytest.mark.parametrize("how, want", [
    ("exit", r"exited with status 1 without an error message \(its output above may say "
             r"why\); run the same command again to resume from the last checkpoint"),
    ("SIGKILL", r"was killed by SIGKILL \(by hand or by the out-of-memory killer: .*\), so "
                r"mpiexec stopped the others; run the same command again to resume from "
                r"the last checkpoint"),
    ("SIGSEGV", r"was killed by SIGSEGV \(a crash in native code\), so mpiexec stopped the "
                r"others; run the same command again to resume from the last checkpoint")])
def test_real_mpiexec_names_a_rank_that_ended_without_a_report(mpiexec, tmp_path, how, want):
    """The launcher under the real mpiexec (hydra's raw wait statuses: 256 is exit(1),
    9 SIGKILL, 11 SIGSEGV), rank 1 of 2 ending without a report: one ``Error:`` line
    naming rank 1, its pid and its exit status or signal; exit code 2, no traceback;
    hydra's "Exit codes" line not shown, rank 1's own line with that text shown."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_ENDS)
    pids = tmp_path / "pids"
    pids.mkdir()
    code = ("import sys; from tinylm.dist import launch; "
            "launch.ENTRY = 'import runpy, sys; runpy.run_path(sys.argv[1], "
            "run_name=\"__main__\")'; "
            f"sys.exit(launch.launch(2, [{str(script)!r}, {how!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(TINYLM_DIST_PIDS=str(pids)), timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    pid = _rank_pid(pids, 1)
    lines = [line for line in done.stderr.splitlines() if "Error" in line]
    assert len(lines) == 1, done.stderr
    named = rf"rank 1 of 2 \(pid {pid}\)"
    if how == "SIGKILL":  # mpiexec SIGKILLs rank 0 too: on a loaded machine both statuses
        # are 9 before the pid watch sees which went first, and the launcher says so
        named = rf"(?:{named}|rank 0 or 1 of 2)"
    assert re.fullmatch(rf"Error: {named} {want}", lines[0]), lines[0]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert "rank 1: Exit codes: [vm] 1" in done.stdout.splitlines(), done.stdout
    assert "[mpiexec@" not in done.stdout, done.stdout


def test_a_stopped_rank_times_out_the_other_naming_it(mpiexec, cache, tmp_path):
    pids = tmp_path / "pids"
    command = [mpiexec, "-n", "2", sys.executable, "-c", ENTRY,
               *_long_run(tmp_path / "run", cache)]
    process = _start(command, _env(TINYLM_DIST_PIDS=str(pids), TINYLM_DIST_TIMEOUT="2"),
                     tmp_path / "run")
    stopped = _rank_pid(pids, 1)
    os.kill(stopped, signal.SIGSTOP)
    start = time.monotonic()
    try:
        _, err = process.communicate(timeout=60)
    finally:
        if launch._alive(stopped):
            os.kill(stopped, signal.SIGKILL)
    assert time.monotonic() - start < 30
    assert process.returncode == 2, err
    # one line, whichever collective rank 0 waits in: the collective, the timeout, rank 1;
    # it reaches mpiexec's stderr although MPI_Abort follows at once (it used to be lost
    # now and then under load: mpi.drain_output)
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    assert re.fullmatch(r"Error: rank 0: (all_reduce|reduce_scatter|all_gather|broadcast|"
                        r"barrier) \(collective #\d+\) did not complete within 2 s: rank 1 did "
                        r"not answer \(dead, stopped or hung\); .* to resume from the last "
                        r"checkpoint", lines[0]), err
    assert (pids / "rank-0.error").read_text() == lines[0] + "\n"


DRAINS = r"""
import sys, time
from tinylm.dist.mpi import drain_output
sys.stderr.write("x" * 5000)
print("written", flush=True)
t = time.monotonic()
drain_output(float(sys.argv[1]))
print(time.monotonic() - t, flush=True)
"""


def test_before_an_abort_the_output_is_left_to_reach_its_reader():
    """drain_output waits until the reader of the pipe (mpiexec's proxy) has taken every
    byte, and no longer than its timeout when no one reads."""
    late = subprocess.Popen([sys.executable, "-c", DRAINS, "10"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert late.stdout.readline() == "written\n"
    time.sleep(1.0)  # the reader of stderr is late
    out, err = late.communicate(timeout=30)
    assert err == "x" * 5000 and 0.9 < float(out) < 8, (out, err)
    read, write = os.pipe()
    try:  # no one reads until it exits
        never = subprocess.run([sys.executable, "-c", DRAINS, "0.5"], stdout=subprocess.PIPE,
                               stderr=write, text=True, timeout=30)
        assert 0.5 <= float(never.stdout.split()[1]) < 3, never.stdout
        assert os.read(read, 10000) == b"x" * 5000
    finally:
        os.close(read)
        os.close(write)


RAISES = r"""
import os, sys
from tinylm import dist
c = dist.world()
c.barrier()
try:
    if c.rank == 1:
        raise RuntimeError("a bug on this rank")
    c.with_options(timeout=60).barrier()
except Exception as e:
    dist.report_and_abort(e)
"""


def test_a_rank_that_raises_reports_and_stops_the_others(mpiexec, tmp_path):
    script = tmp_path / "raises.py"
    script.write_text(RAISES)
    start = time.monotonic()
    out = subprocess.run([mpiexec, "-n", "3", sys.executable, str(script)], env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 20  # not rank 0's 60 s barrier
    assert out.returncode == 2
    assert "Error: RuntimeError: rank 1 of 3: a bug on this rank" in out.stderr


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("fixed", [False, True])
def test_nccl_collectives_on_one_gpu(fixed):
    """The NCCL engine (CuPy's binding) as a one-rank communicator: each collective
    really goes through NCCL and gives the one-rank results."""
    from tinylm import backend
    from tinylm.dist import nccl

    if nccl.nccl_module() is None:
        pytest.skip("this CuPy has no NCCL binding")
    xp = backend.xp_for("cuda")
    comm = dist.local_comm(nccl=True, fixed_order=fixed)
    x = xp.arange(12, dtype=xp.float32).reshape(4, 3) - 5
    assert isinstance(comm._engine(x), nccl.NcclTransport)
    assert xp.array_equal(comm.all_reduce(x), x)
    assert xp.array_equal(comm.all_reduce(x, "max"), x)
    inplace = x.copy()
    assert comm.all_reduce(inplace, out=inplace) is inplace and xp.array_equal(inplace, x)
    assert xp.array_equal(comm.reduce_scatter(x), x)
    assert xp.array_equal(comm.all_gather(x, axis=1), x)
    gathered = x.copy()
    assert comm.all_gather_in_place(gathered) is gathered and xp.array_equal(gathered, x)
    b = x.astype(xp.float64)
    assert xp.array_equal(comm.broadcast(b), x.astype(xp.float64))
    comm._engine(x).barrier("barrier", 10.0)
    assert xp.array_equal(comm.all_reduce(xp.arange(5, dtype=xp.int64)), xp.arange(5))


STAGED = r"""
import sys
import numpy as np
from tinylm import backend, dist
from tinylm.dist.nccl import StagedTransport
world = dist.world(); r, n = world.rank, world.size
comm = dist.Comm(world.transport, gpu=StagedTransport(world.transport))
xp = backend.xp_for("cuda")
x = xp.full((2 * n, 3), r + 1, dtype=xp.float32)
assert float(comm.all_reduce(x)[0, 0]) == sum(range(1, n + 1))
assert comm.reduce_scatter(x).shape == (2, 3)
assert comm.all_gather(x).shape == (2 * n * n, 3)
b = xp.full(3, r, dtype=xp.float32); comm.broadcast(b, root=1); assert float(b[0]) == 1
sys.stdout.write(f"ok {r}\n")  # one write: the ranks share the pipe
"""


@pytest.mark.gpu
def test_gpu_arrays_staged_through_mpi(mpiexec, tmp_path):
    """Without NCCL between the ranks (here: two ranks on one GPU), CuPy arrays go
    through the host engine."""
    script = tmp_path / "staged.py"
    script.write_text(STAGED)
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, str(script)], env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(out.stdout.split()) == ["0", "1", "ok", "ok"]


def test_two_sigkills_with_no_first_seen_name_both_ranks(tmp_path):
    """hydra's "9,9" (rank 1 SIGKILLed, rank 0 by hydra's cleanup) with no rank seen to
    end first: the line says "rank 0 or 1", not a guess; one seen first is named alone."""
    import socket

    from tinylm.dist import launch

    for rank, pid in ((0, 4100), (1, 4101)):
        (tmp_path / f"rank-{rank}").write_text(f"{pid} {socket.gethostname()}\n")
    named = [("codes", [(socket.gethostname(), [9, 9])])]
    culprit, how = launch._culprit(str(tmp_path), 2, named, None)
    assert culprit == ("0 or 1", None) and how == ("signal", signal.SIGKILL)
    assert launch._vanished(*culprit[:1], 2, culprit[1], how).startswith(
        "Error: rank 0 or 1 of 2 was killed by SIGKILL (")
    culprit, how = launch._culprit(str(tmp_path), 2, named, (1, 4101))
    assert culprit == (1, 4101) and how == ("signal", signal.SIGKILL)
