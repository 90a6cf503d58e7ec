"""Every `tinylm` command given the bad inputs a new user tries (wrong paths, files where
folders go, nonsense numbers): one `Error:` line on stderr, exit code 2, no traceback,
and nothing written. `tinylm tokenize` and `tinylm plugins` have their own sweep in
test_tokenize_cli_errors.py; this one covers train, generate, info and plot."""

from __future__ import annotations

import os

import pytest

from cli_helpers import one_error_line, run
from generate_helpers import tiny_hf_gpt
from train_helpers import TINY_CLI, corpus_text

BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\xff\xfe\xfd"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_errors")
    corpus = tmp / "corpus.txt"
    corpus.write_text(corpus_text(600), encoding="utf-8")
    (tmp / "binary.bin").write_bytes(BINARY)
    (tmp / "a_file").write_text("not a folder\n")
    (tmp / "empty").mkdir()
    data = tmp / "data"
    data.mkdir()
    (data / "ok.txt").write_text(corpus_text(300), encoding="utf-8")
    os.symlink(tmp / "gone.txt", data / "broken.txt")
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    hf = tmp / "hf"
    hf.mkdir()
    tiny_hf_gpt(hf, corpus_text(300))
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text("lr = [\n")
    (tmp / "norun").mkdir()
    (tmp / "norun" / "metrics.jsonl").write_text("not json\n")
    return {name: tmp / name for name in ("binary.bin", "a_file", "empty", "data", "fifo",
                                          "hf", "bad.toml", "norun")} | {
        "corpus": corpus, "tmp": tmp, "missing": tmp / "missing"}


def train(p, *args):
    return ["train", "--data", p["corpus"], "--cache-dir", p["tmp"] / "cache",
            "--max-steps", "2", *TINY_CLI, *args]


def fresh(p, name):
    return p["tmp"] / "runs" / name


# name -> (argument builder, fragments the error line must hold)
CASES = {
    # train: where the run goes
    "train --out a file": (lambda p: train(p, "--out", p["a_file"]), ["a_file"]),
    "train --out under a file": (lambda p: train(p, "--out", p["a_file"] / "run"), ["a_file"]),
    "train --out a Hugging Face folder": (lambda p: train(p, "--out", p["hf"]),
                                          ["config.json"]),
    "train --cache-dir a file": (lambda p: ["train", "--data", p["corpus"], "--out",
                                            fresh(p, "c"), "--cache-dir", p["a_file"]],
                                 ["a_file"]),
    "train --data X --out X": (lambda p: train(p, "--out", p["data"], "--data", p["data"],
                                               "--overwrite"), ["data"]),
    # train: data
    "train --data with a broken link": (lambda p: ["train", "--data", p["data"], "--out",
                                                   fresh(p, "d"), *TINY_CLI], ["broken.txt"]),
    "train --data a FIFO": (lambda p: ["train", "--data", p["fifo"], "--out", fresh(p, "f")],
                            ["fifo", "not a regular file"]),
    "train --data /dev/null": (lambda p: ["train", "--data", "/dev/null", "--out",
                                          fresh(p, "n")], ["/dev/null"]),
    "train --data binary": (lambda p: ["train", "--data", p["binary.bin"], "--out",
                                       fresh(p, "b"), *TINY_CLI], ["binary.bin"]),
    "train --config unparsable": (lambda p: ["train", "--config", p["bad.toml"], "--out",
                                             fresh(p, "t")], ["bad.toml"]),
    # train: settings, all refused before the first step
    "train temperature < 0": (lambda p: train(p, "--out", fresh(p, "1"), "-s",
                                              "temperature=-0.5"), ["temperature"]),
    "train temperature nan": (lambda p: train(p, "--out", fresh(p, "2"), "-s",
                                              "temperature=nan"), ["temperature"]),
    "train --lr nan": (lambda p: train(p, "--out", fresh(p, "3"), "--lr", "nan"), ["lr"]),
    "train --lr inf": (lambda p: train(p, "--out", fresh(p, "3i"), "--lr", "inf"), ["lr"]),
    "train eps nan": (lambda p: train(p, "--out", fresh(p, "4"), "-s", "eps=nan"), ["eps"]),
    "train --min-lr above --lr": (lambda p: train(p, "--out", fresh(p, "5"), "--lr", "1e-3",
                                                  "--min-lr", "1e-2"), ["min_lr"]),
    "train seed -1": (lambda p: train(p, "--out", fresh(p, "6"), "-s", "seed=-1"), ["seed"]),
    "train init_std -1": (lambda p: train(p, "--out", fresh(p, "7"), "-s",
                                          "model.init_std=-1"), ["init_std"]),
    "train norm_eps -1": (lambda p: train(p, "--out", fresh(p, "8"), "-s",
                                          "model.norm_eps=-1"), ["norm_eps"]),
    "train an unknown setting": (lambda p: train(p, "--out", fresh(p, "9"), "-s",
                                                 "learning_rate=1"), ["learning_rate"]),
    "train a model too large": (lambda p: train(p, "--out", fresh(p, "10"), "--d-model",
                                                "100000", "--n-layer", "100"), ["needs about"]),
    "train --half on the cpu": (lambda p: train(p, "--out", fresh(p, "11"), "--half"),
                                ["--half"]),
    # generate
    "generate --model missing": (lambda p: ["generate", "--model", p["missing"], "-p", "a"],
                                 ["missing"]),
    "generate --model a file": (lambda p: ["generate", "--model", p["a_file"], "-p", "a"],
                                ["a_file"]),
    "generate --model an empty folder": (lambda p: ["generate", "--model", p["empty"]],
                                         ["empty"]),
    "generate binary --prompt-file": (lambda p: ["generate", "--model", p["hf"],
                                                 "--prompt-file", p["binary.bin"]],
                                      ["binary.bin"]),
    "generate --stop ''": (lambda p: ["generate", "--model", p["hf"], "-p", "a", "--stop", ""],
                           ["--stop"]),
    "generate -t nan": (lambda p: ["generate", "--model", p["hf"], "-p", "a", "-t", "nan"],
                        ["nan"]),
    "generate --top-p nan": (lambda p: ["generate", "--model", p["hf"], "-p", "a", "--top-p",
                                        "nan"], ["nan"]),
    "generate --presence-penalty inf": (lambda p: ["generate", "--model", p["hf"], "-p", "a",
                                                   "--presence-penalty", "inf"], ["inf"]),
    "generate --length-penalty nan": (lambda p: ["generate", "--model", p["hf"], "-p", "a",
                                                 "--num-beams", "2", "--length-penalty",
                                                 "nan"], ["nan"]),
    "generate --half on the cpu": (lambda p: ["generate", "--model", p["hf"], "-p", "a",
                                              "--half"], ["--half"]),
    "generate a special token in the prompt": (lambda p: ["generate", "--model", p["hf"], "-p",
                                                          "<|endoftext|>"],
                                               ["--allow-special"]),
    # info
    "info a missing path": (lambda p: ["info", p["missing"]], ["missing"]),
    "info a binary file": (lambda p: ["info", p["binary.bin"]], ["binary.bin"]),
    "info unparsable toml": (lambda p: ["info", p["bad.toml"]], ["bad.toml"]),
    "info an empty folder": (lambda p: ["info", p["empty"]], ["empty"]),
    # plot
    "plot a missing run": (lambda p: ["plot", p["missing"]], ["missing"]),
    "plot a folder without metrics": (lambda p: ["plot", p["empty"]], ["empty"]),
    "plot -o into a missing folder": (lambda p: ["plot", p["norun"], "-o",
                                                 p["missing"] / "x.png"], ["missing"]),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_error_line(paths, name):
    build, fragments = CASES[name]
    before = sorted(os.listdir(paths["hf"]))
    one_error_line(run(*build(paths)), *fragments)
    assert sorted(os.listdir(paths["hf"])) == before  # the Hugging Face folder untouched
    runs = paths["tmp"] / "runs"
    assert not runs.exists() or not os.listdir(runs)  # no run folder left behind


def test_no_cli_test_expects_a_traceback():
    """`Traceback` appears in the tests only as something that must not be printed."""
    here = os.path.dirname(__file__)
    for name in sorted(os.listdir(here)):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        with open(os.path.join(here, name), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if "Traceback" in line and name != "test_cli_errors.py":
                    assert '"Traceback" not in' in line, f"{name}:{number}: {line.strip()}"
