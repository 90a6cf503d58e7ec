"""Tensor parallel (tinylm.dist.tensor_parallel, tp_model, grid): the split model equals
the whole one, trains the nanoGPT character recipe to the same losses, checkpoints
the full model (resumed on 1 and 2 ranks), composes with data parallel, and a rank
killed mid-step stops the other.

Ranks are subprocesses of ``mpiexec -n N`` (the mpich wheel's, from the dist extra),
one BLAS thread each, on loopback; those tests skip when mpi4py or mpiexec is missing.

Tolerances. The split model sums each row-parallel product and the vocab-parallel
cross-entropy's exp-sums in two halves, so its float32 results differ from one
process's in the last bits: logits within 1e-5 (absolute; they are O(1)), gradients
within 1e-5, losses within rtol 1e-5 over training steps (the first step's loss is
computed from the same weights: 1e-6). Gathered weights equal the originals exactly
(the shards are copies, the gather a concatenation).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tinylm import backend, dist
from tinylm.dist import launch
from tinylm.dist.grid import Grid
from tinylm.dist.tensor_parallel import Split, TensorParallelError
from tinylm.dist.tp_model import TensorParallelDecoder
from tinylm.errors import ConfigError, TinyLMError
from tinylm.models import build_model, config_from_dict
from tinylm.train import TrainConfig

from cli_helpers import one_error_line, run

HERE = Path(__file__).parent
WORKER = HERE / "dist_tp_worker.py"
RECIPE = HERE.parent / "examples" / "shakespeare_char.toml"
HEAD = HERE / "data" / "tinyshakespeare_head.txt"
RTOL = 1e-5


def _model(**fields):
    backend.seed(3)
    base = dict(architecture="gpt2", vocab_size=37, d_model=16, n_layer=1, n_head=4,
                max_positions=8)
    return build_model(config_from_dict({**base, **fields}))


# --------------------------------------------------------------------------- no MPI


@pytest.mark.parametrize("sections, size", [((6,), 2), ((5,), 2), ((8, 4, 4), 2),
                                            ((7, 3), 3), ((4,), 1)])
def test_split_shards_and_unshards(sections, size):
    """Shards in rank order, concatenated, give back the full array (padding dropped);
    each shard holds block r of every section; axis 1 works like axis 0."""
    full = np.arange(sum(sections) * 3, dtype=np.float32).reshape(sum(sections), 3)
    split = Split(0, sections)
    shards = [split.shard(full, r, size) for r in range(size)]
    offsets = np.cumsum((0,) + sections)
    for r, shard in enumerate(shards):  # block r of every section, zeros past its end
        want = []
        for o, n in zip(offsets, sections):
            b = -(-n // size)
            rows = full[o + min(r * b, n):o + min((r + 1) * b, n)]
            want.append(np.concatenate([rows, np.zeros((b - len(rows), 3), np.float32)]))
        np.testing.assert_array_equal(shard, np.concatenate(want))
    np.testing.assert_array_equal(split.unshard(np.concatenate(shards), size), full)
    cols = Split(1, sections)
    parts = [cols.shard(full.T, r, size) for r in range(size)]
    np.testing.assert_array_equal(cols.unshard(np.concatenate(parts, axis=1), size), full.T)


def test_qkv_split_keeps_each_ranks_heads_together():
    """The fused qkv's rows (q heads, then k, then v) cut by heads: rank 1 of 2 holds
    q heads 2-3, then k heads 1, then v head 1 (GQA: 4 q heads over 2 kv heads)."""
    hs, rows = 2, np.arange((4 + 2 + 2) * 2)
    shard = Split(0, (4 * hs, 2 * hs, 2 * hs)).shard(rows, rank=1, size=2)
    np.testing.assert_array_equal(shard, [4, 5, 6, 7, 10, 11, 14, 15])


def test_one_rank_split_is_the_model():
    model = _model(architecture="llama", n_kv_head=2, d_ff=24)
    tp = TensorParallelDecoder(model, dist.local_comm())
    ids = np.random.default_rng(0).integers(0, 37, (2, 5))
    np.testing.assert_array_equal(tp(ids).logits.data, model(ids).logits.data)
    np.testing.assert_allclose(float(tp(ids, targets=ids).loss.item()),
                               float(model(ids, targets=ids).loss.item()), rtol=1e-6)
    full = tp.full_state_dict()
    assert all(np.array_equal(full[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fields, size, fragment", [
    (dict(n_head=4), 3, "n_head = 4 cannot be split over 3"),
    (dict(architecture="llama", n_head=4, n_kv_head=1, d_ff=24), 2,
     "n_kv_head = 1 cannot be split over 2"),
    (dict(n_head=4, d_ff=30), 4, "d_ff = 30 cannot be split over 4"),
    (dict(n_experts=2), 2, "mixture-of-experts"),
    (dict(positional="t5"), 2, "T5's learned position bias"),
])
def test_models_that_cannot_be_split_say_why(fields, size, fragment):
    comm = SimpleNamespace(rank=0, size=size)  # construction needs no collective
    with pytest.raises(TensorParallelError, match=fragment.replace("(", r"\(")):
        TensorParallelDecoder(_model(**fields), comm)


def test_only_decoders_are_split():
    backend.seed(0)
    bert = build_model(config_from_dict(dict(architecture="bert", vocab_size=20, d_model=8,
                                             n_layer=1, n_head=2, max_positions=8)))
    with pytest.raises(TensorParallelError, match="decoder models"):
        TensorParallelDecoder(bert, SimpleNamespace(rank=0, size=2))


def test_grid_needs_t_to_divide_the_ranks():
    with pytest.raises(dist.DistError, match="must divide the 3 ranks"):
        Grid(SimpleNamespace(rank=0, size=3), 2)
    with pytest.raises(ConfigError, match="tensor_parallel must be >= 1"):
        TrainConfig(tensor_parallel=0)


def test_tensor_parallel_on_one_rank_says_how_to_launch(tmp_path):
    result = run("train", "--data", HEAD, "--out", tmp_path / "run", "--tensor-parallel", "2",
                 "--max-steps", "1", "--no-progress")
    one_error_line(result, "--tensor-parallel 2 needs at least 2 ranks", "mpiexec -n 2")


# --------------------------------------------------------------------------- on 2 (and 4) ranks


@pytest.fixture(scope="module")
def mpiexec():
    pytest.importorskip("mpi4py", reason="the dist extra is not installed: "
                                         "pip install -e '.[dist]'")
    try:
        return launch.find_mpiexec()
    except TinyLMError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _env() -> dict:
    launcher = ("PMI_", "OMPI_", "PMIX_", "MV2_", "MPI_LOCAL", "HYDRA_", "TINYLM_DIST")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TINYLM_LOAD_PLUGINS="")
    return env


def _run(cmd: list, timeout: int = 120):
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _train(mpiexec, n: int, out, cache, *extra, says: str = "") -> list:
    """The recipe (examples/shakespeare_char.toml, its model as it is) on tests/data's
    Shakespeare head for a few steps, on ``n`` ranks (its log must contain ``says``);
    the metrics records."""
    head = [sys.executable, "-c", launch.ENTRY]
    if n > 1:
        head = [mpiexec, "-n", str(n)] + head
    done = _run(head + ["train", "--config", str(RECIPE), "--data", str(HEAD), "--out", str(out),
                 "--cache-dir", cache, "--eval-every", "3", "--eval-iters", "2",
                 "--log-every", "1", "--sample-tokens", "0", "--warmup-steps", "2",
                 "--lr-decay-steps", "6", "--no-progress", *extra])
    assert says in done.stdout + done.stderr, (done.stdout + done.stderr)[-2000:]
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def _losses(records, key="loss") -> list:
    return [r[key] for r in records if key in r]


def test_tp2_equals_the_whole_model(mpiexec, tmp_path):
    """GPT-2 (tied head, a vocabulary padded to split), Llama with GQA and RoPE, ALiBi;
    a left-padded batch with ignored targets: logits, loss, gradients, the gathered
    weights, one clipped AdamW step and its gathered optimizer state."""
    out = tmp_path / "tp.json"
    _run([mpiexec, "-n", "2", sys.executable, str(WORKER), str(out)])
    results = json.loads(out.read_text())
    assert results.pop("size") == 2
    for name, r in results.items():
        assert r["logits_shape"] == r["ref_shape"], name
        assert r["logits"] < 1e-5 and r["loss"] < 1e-6 and r["grads"] < 1e-5, (name, r)
        assert r["weights_equal"] and r["optimizer_round_trip"], (name, r)
        assert r["norm"] < 1e-6 and r["moments"] < 1e-7 and r["stepped"] < 1e-5, (name, r)
        assert r["local_params"] < 0.6 * r["full_params"], (name, r)  # the shards: ~half


def test_tp2_trains_the_recipe_as_one_process_and_resumes_on_one_and_two(mpiexec, cache,
                                                                         tmp_path):
    """nanoGPT's char recipe (4 layers x 128) for 6 steps on one process; on 2 ranks
    with --tensor-parallel 2 to step 3, then resumed to 6 on 2 ranks and, from a copy
    of the checkpoint, on 1 (the checkpoint is the full model's)."""
    one = _train(mpiexec, 1, tmp_path / "one", cache, "--max-steps", "6")
    tp = tmp_path / "tp"
    first = _train(mpiexec, 2, tp, cache, "--max-steps", "3", "--tensor-parallel", "2")
    assert abs(_losses(first)[0] - _losses(one)[0]) < 1e-6
    np.testing.assert_allclose(_losses(first), _losses(one)[:3], rtol=RTOL)
    shutil.copytree(tp, tmp_path / "tp-copy")
    both = _train(mpiexec, 2, tp, cache, "--max-steps", "6", "--tensor-parallel", "2")
    assert len(_losses(both)) == 6  # rank 0 alone wrote the metrics, once per step
    np.testing.assert_allclose(_losses(both), _losses(one), rtol=RTOL)
    np.testing.assert_allclose(_losses(both, "val_loss"), _losses(one, "val_loss"), rtol=RTOL)
    alone = _train(mpiexec, 1, tmp_path / "tp-copy", cache, "--max-steps", "6")
    np.testing.assert_allclose(_losses(alone), _losses(one), rtol=RTOL)
    from tinylm import checkpoint

    a = checkpoint.load_file(str(tmp_path / "one" / "model.safetensors"))
    b = checkpoint.load_file(str(tp / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].shape == b[k].shape for k in a)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-4


SMALL = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--block-size", "16",
         "-s", "model.max_positions=16", "--batch-size", "4"]


@pytest.fixture(scope="module")
def small_one(mpiexec, cache, tmp_path_factory):
    """The shrunk recipe (1 layer x 32) for 4 steps on one process: (run folder, records)."""
    out = tmp_path_factory.mktemp("small") / "one"
    return out, _train(mpiexec, 1, out, cache, *SMALL, "--max-steps", "4")


def test_data_times_tensor_parallel_on_four_ranks(mpiexec, cache, small_one, tmp_path):
    """N = 4 = D 2 x T 2 (oversubscribed on this machine's cores): a shrunk recipe
    (1 layer x 32) gives one process's losses; the data ranks split the batch."""
    small = [*SMALL, "--max-steps", "4"]
    one = small_one[1]
    grid = _train(mpiexec, 4, tmp_path / "grid", cache, *small, "--tensor-parallel", "2")
    np.testing.assert_allclose(_losses(grid), _losses(one), rtol=RTOL)
    np.testing.assert_allclose(_losses(grid, "val_loss"), _losses(one, "val_loss"), rtol=RTOL)


def test_zero1_over_the_data_ranks_of_a_grid(mpiexec, cache, small_one, tmp_path):
    """D 2 x T 2 with --zero 1 (each tensor shard's AdamW state split over its 2 data
    ranks: a quarter of the model's moments per rank): one process's losses to step
    2, then resumed to 4 on the same grid and, from a copy of the checkpoint (the
    full model's optimizer state), on one process."""
    small, zero = SMALL, ["--tensor-parallel", "2", "--zero", "1"]
    one_dir, one = small_one
    grid = tmp_path / "grid"
    first = _train(mpiexec, 4, grid, cache, *small, *zero, "--max-steps", "2",
                   says="data parallel over 2 (ZeRO-1: AdamW's state sharded over it)")
    np.testing.assert_allclose(_losses(first), _losses(one)[:2], rtol=RTOL)
    shutil.copytree(grid, tmp_path / "grid-copy")
    both = _train(mpiexec, 4, grid, cache, *small, *zero, "--max-steps", "4")
    np.testing.assert_allclose(_losses(both), _losses(one), rtol=RTOL)
    alone = _train(mpiexec, 1, tmp_path / "grid-copy", cache, *small, "--max-steps", "4")
    np.testing.assert_allclose(_losses(alone), _losses(one), rtol=RTOL)
    from tinylm import checkpoint

    want = checkpoint.load_file(str(one_dir / "optimizer.safetensors"))
    got = checkpoint.load_file(str(grid / "optimizer.safetensors"))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert max(float(np.abs(got[k] - want[k]).max()) for k in want) < 1e-5


def test_a_tensor_parallel_rank_killed_stops_the_other_naming_it(mpiexec, cache, tmp_path):
    """SIGKILL one of the two ranks that hold halves of one model: the other, waiting in
    a layer's all-reduce, is stopped within 30 s and the error names the dead rank."""
    out, pids = tmp_path / "run", tmp_path / "pids"
    cmd = [sys.executable, "-c", launch.ENTRY, "train", "--config", str(RECIPE), "--data",
           str(HEAD), "--out", str(out), "--cache-dir", cache, "--max-steps", "1000000",
           "--eval-every", "100000", "--log-every", "1", "--sample-tokens", "0",
           "--no-progress", "--nproc", "2", "--tensor-parallel", "2"]
    process = subprocess.Popen(cmd, env={**_env(), "TINYLM_DIST_PIDS": str(pids)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists():  # training has begun
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)
    os.kill(int((pids / "rank-1").read_text().split()[0]), signal.SIGKILL)
    start = time.monotonic()
    _, err = process.communicate(timeout=60)
    assert time.monotonic() - start < 30
    assert process.returncode == 2 and "Error: rank 1 of 2" in err, err[-2000:]
