"""Sharded inference under ``torchrun`` (issue 17, item 3): the linear probe's feature extraction and ``predict``
on a folder split their items across 2 processes and give what one process gives, written once."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
FIT = ["fit", "--data", "digits", "--backbone", "small_cnn", "--strategy", "linear-probe", "--seed", "0"]


def _env(cache: Path) -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "TRANSFERKIT_CACHE": str(cache), "TRANSFERKIT_PROGRESS": "0", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def _run(cmd: list[str], cache: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(cache), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


@pytest.mark.slow
def test_torchrun_probe_features_and_folder_predict_equal_one_process(tmp_path):
    from PIL import Image

    one = _run([sys.executable, "-m", "transferkit", *FIT, "--out", str(tmp_path / "one")], tmp_path / "cache1")
    two = _run([*TORCHRUN, "-m", "transferkit", *FIT, "--out", str(tmp_path / "two")], tmp_path / "cache2")
    assert "process 1 of 2 embedded items" in two.stderr and "process 1 of 2" not in one.stderr
    cached = {p.name: np.load(p) for p in (tmp_path / "cache1" / "features").glob("*.npy")}
    sharded = {p.name: np.load(p) for p in (tmp_path / "cache2" / "features").glob("*.npy")}
    assert len(cached) >= 2 and set(sharded) == set(cached)  # the same splits, each written once
    assert not [p for p in (tmp_path / "cache2" / "features").iterdir() if ".tmp" in p.name]
    for name, features in cached.items():
        assert sharded[name].shape == features.shape and np.abs(sharded[name] - features).max() <= 1e-5

    # predict on a folder: 2 processes, merged rows in input order, written once by the main process
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i in range(7):  # an odd count: the slices are 3 and 4 items
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            folder / ("sub" if i % 2 else "") / f"im{i}.png")
    split = _run([*TORCHRUN, "-m", "transferkit", "predict", "--model", str(tmp_path / "one"), str(folder),
                  "--csv", str(tmp_path / "two.csv")], tmp_path / "cache2")
    assert "process 0 of 2 embedded inputs 0-3 of 7" in split.stderr
    assert "process 1 of 2 embedded inputs 3-7 of 7" in split.stderr
    assert split.stdout.count("predictions written to") == 1  # printed once
    _run([sys.executable, "-m", "transferkit", "predict", "--model", str(tmp_path / "one"), str(folder),
          "--csv", str(tmp_path / "one.csv")], tmp_path / "cache1")
    rows, expected = _read_csv(tmp_path / "two.csv"), _read_csv(tmp_path / "one.csv")
    assert len(rows) == len(expected) == 8 and len({r[0] for r in rows[1:]}) == 7  # header + 7, no duplicate
    assert [r[:2] for r in rows] == [r[:2] for r in expected]  # same inputs in the same order, same classes
    assert np.abs(np.asarray([r[2:] for r in rows[1:]], float) - np.asarray([r[2:] for r in expected[1:]],
                                                                          float)).max() <= 1e-5
