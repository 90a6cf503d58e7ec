"""tinylm.atomic.atomic_folder: the target is replaced only by a complete folder."""

from __future__ import annotations

import os

import pytest

from tinylm.atomic import atomic_folder


def test_a_finished_block_replaces_the_folder_and_an_error_leaves_it(tmp_path):
    target = tmp_path / "out" / "hf"
    with atomic_folder(target) as tmp:
        (open(os.path.join(tmp, "a.txt"), "w")).close()
    assert sorted(os.listdir(target)) == ["a.txt"]
    with atomic_folder(target) as tmp:  # a folder that was there is replaced whole
        (open(os.path.join(tmp, "b.txt"), "w")).close()
    assert sorted(os.listdir(target)) == ["b.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as tmp:
            (open(os.path.join(tmp, "c.txt"), "w")).close()
            raise KeyboardInterrupt
    assert sorted(os.listdir(target)) == ["b.txt"]
    assert os.listdir(tmp_path / "out") == ["hf"]  # no temporary folder left
