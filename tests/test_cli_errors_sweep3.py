"""CLI errors found before work starts: a bad model config under ``tinylm train --nproc
2`` (one line from the launching process, no rank started) and a damaged weights file
under ``tinylm info`` (one line naming the file, exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinylm import dist
from tinylm.dist import launch

HERE = Path(__file__).parent
HEAD = HERE / "data" / "tinyshakespeare_head.txt"


# --------------------------------------------------------------------------- train --nproc


def _mpiexec():
    pytest.importorskip("mpi4py", reason="the dist extra is not installed")
    try:
        return launch.find_mpiexec()
    except dist.DistError as e:
        pytest.skip(str(e))


def _env(**extra) -> dict:
    launcher = ("PMI_", "OMPI_", "PMIX_", "MV2_", "MPI_LOCAL", "HYDRA_", "TINYLM_DIST")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               TINYLM_LOAD_PLUGINS="", **extra)
    return env


BAD_MODELS = {
    "n_head does not divide d_model": ("[model]\nd_model = 32\nn_head = 3\nn_layer = 1\n",
                                      "not divisible by n_head=3"),
    "negative size": ("[model]\nd_model = -32\nn_layer = 1\n", "d_model must be positive"),
    "unknown architecture": ('[model]\narchitecture = "nope"\nn_layer = 1\n',
                             "unknown architecture 'nope'"),
    "unknown model field": ("[model]\nn_layers = 2\n", "n_layers"),
    "max_positions below block_size": ("block_size = 16\n[model]\nmax_positions = 8\n",
                                       "max_positions = 8 is below block_size = 16"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_bad_model_config_under_nproc_is_one_line_and_no_rank_starts(case, tmp_path):
    mpiexec = _mpiexec()
    assert os.path.exists(mpiexec)
    table, says = BAD_MODELS[case]
    config = tmp_path / "run.toml"
    config.write_text(f'data = ["{HEAD}"]\nmax_steps = 2\n' + table)
    pids = tmp_path / "pids"
    pids.mkdir()
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", launch.ENTRY, "train", "--config", str(config),
         "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
         "--no-progress", "--nproc", "2"],
        env=_env(TINYLM_DIST_PIDS=str(pids)), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    lines = [line for line in output.splitlines() if "Error" in line]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    assert says in lines[0] and "rank" not in lines[0], output
    assert "Traceback" not in output and "Abort" not in output, output
    assert not any(p.name.startswith("rank-") for p in pids.iterdir()), "a rank started"
    assert not (tmp_path / "cache").exists(), "a tokenizer was trained"
    assert elapsed < 30, elapsed


def test_a_good_model_config_passes_the_launch_check(tmp_path):
    from tinylm.commands.train import check_model_settings
    from tinylm.train import TrainConfig

    for family in ("gpt", "llama", "bert", "t5"):
        check_model_settings(TrainConfig(family=family, out_dir=str(tmp_path / "r")))
    recipe = HERE.parent / "examples" / "shakespeare_char.toml"
    check_model_settings(TrainConfig.from_toml(recipe, out_dir=str(tmp_path / "r")))
