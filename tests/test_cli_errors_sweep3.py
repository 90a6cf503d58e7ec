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

from dist_helpers import _env

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


# --------------------------------------------------------------------------- info: weights


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A run folder (`tinylm train`), a Hugging Face folder and a sharded one."""
    import json

    from cli_helpers import run_ok
    from tinylm.models import LlamaConfig, build_model

    tmp = tmp_path_factory.mktemp("sweep3")
    run_ok("train", "--data", HEAD, "--out", tmp / "run", "--cache-dir", tmp / "cache",
           "--no-progress", "--max-steps", "1", "--n-layer", "1", "--d-model", "16",
           "--n-head", "2", "--block-size", "8", "--batch-size", "2", "--eval-every", "1",
           "--eval-iters", "1", "--sample-tokens", "0")
    model = build_model(LlamaConfig(vocab_size=61, d_model=32, n_layer=2, n_head=4, d_ff=48,
                                    max_positions=24))
    model.save_pretrained(tmp / "hf")
    model.save_pretrained(tmp / "sharded", max_shard_size="20KB")
    shards = set(json.loads((tmp / "sharded" / "model.safetensors.index.json").read_text())
                 ["weight_map"].values())
    assert len(shards) > 2
    return {"run": tmp / "run", "hf": tmp / "hf", "sharded": tmp / "sharded",
            "shard": sorted(shards)[1]}


def _copy(folders, kind, tmp_path):
    import shutil

    return Path(shutil.copytree(folders[kind], tmp_path / kind))


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _one_line(result, *fragments):
    from cli_helpers import one_error_line

    line = one_error_line(result, *fragments)
    assert "download" in line and "save the model again" in line, line
    return line


@pytest.mark.parametrize("kind", ["run", "hf"])
def test_info_of_a_folder_whose_weights_are_cut_short_is_one_error_line(folders, kind,
                                                                        tmp_path):
    from cli_helpers import run, run_ok

    run_ok("info", folders[kind])
    run_ok("info", folders[kind], "--json")
    folder = _copy(folders, kind, tmp_path)
    weights = folder / "model.safetensors"
    _truncate(weights, weights.stat().st_size - 4)
    _one_line(run("info", folder), str(weights), "truncated")
    _one_line(run("info", folder, "--json"), str(weights), "truncated")
    _truncate(weights, 5)  # not even the header's length
    _one_line(run("info", folder), str(weights), "shorter than the 8-byte header length")


def test_info_of_a_folder_whose_header_is_garbled_is_one_error_line(folders, tmp_path):
    import json

    from cli_helpers import run

    folder = _copy(folders, "hf", tmp_path)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    n = int.from_bytes(good[:8], "little")
    header, data = json.loads(good[8:8 + n]), good[8 + n:]
    weights.write_bytes(good[:8] + b"\xff\xfe" + good[10:])  # the JSON's first bytes
    _one_line(run("info", folder), str(weights), "not valid UTF-8 JSON")
    # the last tensor's data_offsets moved past the end of the file: valid JSON, the
    # file's size unchanged
    name = max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1])
    header[name]["data_offsets"] = [o + 4 for o in header[name]["data_offsets"]]
    text = json.dumps(header).encode()
    weights.write_bytes(len(text).to_bytes(8, "little") + text + data)
    _one_line(run("info", folder), str(weights), repr(name))


def test_info_of_a_sharded_folder_checks_every_shard(folders, tmp_path):
    from cli_helpers import run, run_ok

    run_ok("info", folders["sharded"])
    folder = _copy(folders, "sharded", tmp_path)
    shard = folder / folders["shard"]
    _truncate(shard, shard.stat().st_size - 1)
    _one_line(run("info", folder), str(shard), "truncated")
    shard.unlink()
    _one_line(run("info", folder), str(shard), "not found")


def test_info_of_a_folder_with_a_config_alone_still_reports(folders, tmp_path):
    """No weights file at all: info reads the config as before (nothing to check)."""
    from cli_helpers import run_ok

    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_bytes((folders["run"] / "config.json").read_bytes())
    assert "parameters" in run_ok("info", folder).output
