"""Data check (class balance, train/test near-duplicates) and the CLI commands of cli/compare.py
(check, rank-backbones, compare) on tiny data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from transferkit.data.base import DataSplits, LabeledData
from transferkit.evaluation.datacheck import check_data, format_check, nearest_neighbours


def _data(vectors: np.ndarray, labels: list[int], prefix: str) -> LabeledData:
    return LabeledData(list(vectors), np.array(labels), ["a", "b", "c"], "image",
                       [f"{prefix}{i}" for i in range(len(labels))], name=prefix)


def test_nearest_neighbours_cosine():
    base = np.array([[1.0, 0.0], [0.0, 2.0]])
    sims, idx = nearest_neighbours(np.array([[0.0, 5.0], [1.0, 1.0]]), base)
    assert idx.tolist() == [1, 0]
    assert sims == pytest.approx([1.0, 1 / np.sqrt(2)], abs=1e-6)


def test_check_finds_planted_duplicates_and_imbalance():
    rng = np.random.default_rng(0)
    train_vectors = rng.normal(size=(20, 16))
    test_vectors = rng.normal(size=(6, 16))
    test_vectors[2] = train_vectors[5] * 3 + 1e-4  # a rescaled copy: cosine ~ 1
    train = _data(train_vectors, [0] * 14 + [1] * 4 + [2] * 2, "train/")  # 7:1 imbalance
    val = _data(rng.normal(size=(3, 16)), [0, 1, 2], "val/")
    test = _data(test_vectors, [0, 1, 0, 1, 2, 2], "test/")
    result = check_data(DataSplits(train, val, test), embed=lambda d: np.stack(list(d.items)))
    dup = result["duplicates"]
    assert dup["near_duplicates"] == 1 and dup["examples"][0] == {"test": "test/2", "train": "train/5",
                                                                  "similarity": pytest.approx(1.0, abs=1e-3)}
    assert dup["same_label"] == 1  # test/2 has label 0 like train/5
    assert result["balance"]["train"]["imbalance_ratio"] == pytest.approx(7.0)
    assert any("imbalanced" in w for w in result["warnings"])
    assert any("near-duplicate" in w for w in result["warnings"])
    assert "test/2 ~ train/5" in format_check(result)


def _tiny_image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, base in (("dark", 60), ("light", 190)):
        (root / label).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(base + rng.normal(0, 30, (10, 10)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def test_cli_check_rank_and_compare(tmp_path, monkeypatch, capsys):
    from transferkit.cli.main import main

    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path / "cache"))
    data = str(_tiny_image_folder(tmp_path / "data"))

    assert main(["check", "--data", data, "--backbone", "small_cnn", "--image-size", "8", "--json"]) == 0
    checked = json.loads(capsys.readouterr().out)
    assert set(checked["balance"]) == {"train", "val", "test"} and checked["duplicates"]["test_items"] > 0

    assert main(["rank-backbones", "--data", data, "--backbones", "small_cnn@8,small_cnn@12", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["n"] < 24  # train + val only, never the test
    assert main(["rank-backbones", "--data", data, "--backbones", "small_cnn@x"]) == 2

    out = tmp_path / "cmp"
    assert main(["compare", "--data", data, "--backbones", "small_cnn", "--strategies", "linear-probe",
                 "--seeds", "1", "--out", str(out), "--image-size", "8", "--no-isolate", "--probe-c", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "needs at least two configurations" in printed and "recommendation: linear-probe on small_cnn" in printed
    saved = json.loads((out / "leaderboard.json").read_text())
    assert saved["fit_options"]["probe_c"] == 0.5 and saved["fit_options"]["image_size"] == 8
    assert main(["compare", "--data", data, "--backbones", "small_cnn", "--strategies", "nope",
                 "--out", str(out)]) == 2
