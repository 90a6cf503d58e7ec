"""`tinylm plugins new NAME`: the skeleton it writes installs with pip and passes its tests.

The install is real but kept out of the dev environment: ``pip install --no-deps
--no-build-isolation --target DIR`` builds each package's wheel with setuptools (PEP
517, the same path `pip install ./NAME` takes) and unpacks it, ``*.dist-info/
entry_points.txt`` included, into a throwaway DIR; the skeletons' tests then run in a
fresh pytest process with DIR on PYTHONPATH, from a folder outside the sources, so the
installed copy is what they import and its entry point is what tinylm finds. No network,
no new venv (seconds, not a minute), and nothing left in .venv.
"""

import os
import subprocess
import sys
import tomllib

import pytest
from click.testing import CliRunner

from tinylm.cli import cli
from tinylm.errors import PluginError
from tinylm.plugin_skeleton import KINDS, names_for, write_skeleton


def run(*args):
    return CliRunner().invoke(cli, list(args), prog_name="tinylm")


def test_new_writes_the_package(tmp_path):
    result = run("plugins", "new", "demo", "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    root = tmp_path / "demo"
    assert str(root) in result.output
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["README.md", "pyproject.toml", "tests/test_tinylm_demo.py",
                     "tinylm_demo/__init__.py"]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "tinylm-demo"
    assert project["project"]["entry-points"]["tinylm"] == {"demo": "tinylm_demo"}
    source = (root / "tinylm_demo" / "__init__.py").read_text()
    assert "def register_tokenizers(register):" in source and "${" not in source


def test_new_refuses_an_existing_folder_and_bad_names(tmp_path):
    assert run("plugins", "new", "demo", "-o", str(tmp_path)).exit_code == 0
    again = run("plugins", "new", "demo", "-o", str(tmp_path))
    assert again.exit_code == 2 and again.stderr.startswith("Error: ")
    assert "exists already" in again.stderr and again.stderr.count("\n") == 1
    bad = run("plugins", "new", "9lives", "-o", str(tmp_path))
    assert bad.exit_code == 2 and "is not a package name" in bad.stderr
    kind = run("plugins", "new", "x", "--kind", "widget", "-o", str(tmp_path))
    assert kind.exit_code == 2 and "'widget' is not one of" in kind.stderr


@pytest.mark.parametrize("name, expected", [
    ("demo", ("demo", "tinylm-demo", "tinylm_demo", "demo", "Demo")),
    ("tinylm-rope-xl", ("tinylm-rope-xl", "tinylm-rope-xl", "tinylm_rope_xl", "rope-xl", "RopeXl")),
    ("My_Thing", ("My_Thing", "tinylm-my-thing", "tinylm_my_thing", "my-thing", "MyThing")),
])
def test_names(name, expected):
    n = names_for(name)
    assert (n["folder"], n["dist"], n["module"], n["short"], n["cls"]) == expected


@pytest.mark.parametrize("name", ["tinylm", "tinylm-", "a--b", "", "x y"])
def test_names_refused(name):
    with pytest.raises(PluginError):
        names_for(name)


def test_every_kind_installs_with_pip_and_passes_its_tests(tmp_path):
    """One skeleton per kind: pip builds and installs each, then all their tests pass,
    the entry-point test included (none is skipped: the packages are installed)."""
    pytest.importorskip("setuptools", reason="the offline build (--no-build-isolation) "
                        "needs setuptools in this environment: pip install setuptools")
    roots = [write_skeleton(f"demo-{kind}", kind, tmp_path / "src") for kind in KINDS]
    site = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--target", str(site), *map(str, roots)],
        capture_output=True, text=True, cwd=tmp_path)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    for kind in KINDS:
        eps = (site / f"tinylm_demo_{kind}-0.1.0.dist-info" / "entry_points.txt").read_text()
        assert f"demo-{kind} = tinylm_demo_{kind}" in eps
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    env.pop("TINYLM_LOAD_PLUGINS", None)
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         *[str(root / "tests") for root in roots]],
        capture_output=True, text=True, cwd=elsewhere, env=env)
    summary = tests.stdout.strip().splitlines()[-1]
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert summary.startswith(f"{2 * len(KINDS)} passed") and "skipped" not in summary, summary
