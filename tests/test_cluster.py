"""Self-taught clustering: synthetic blobs are recovered, k auto finds them, bad input exits 2 with one line."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from transferkit.cli.main import main
from transferkit.selftaught.cluster import choose_k, cluster_features


def _blobs(n_per: int = 40, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:3] * 5.0
    x = np.concatenate([c + rng.normal(0, 0.4, (n_per, dim)) for c in centres])
    return x, np.repeat(np.arange(3), n_per)


def test_kmeans_recovers_three_blobs_and_auto_k_finds_three():
    from sklearn.metrics import adjusted_rand_score

    x, truth = _blobs()
    given = cluster_features(x, k=3, seed=0)
    assert adjusted_rand_score(truth, given.labels_) == 1.0
    assert given.distances_.shape == (len(x),) and np.all(given.distances_ >= 0)
    auto = cluster_features(x, k=None, seed=0)
    assert auto.k_ == 3 and adjusted_rand_score(truth, auto.labels_) == 1.0
    assert max(auto.scores_, key=auto.scores_.get) == 3 and auto.scores_[3] > auto.scores_[2]
    assert choose_k(x, seed=1, k_max=6)[0] == 3


def test_modularity_prefers_the_true_partition_to_split_or_merged_ones():
    from transferkit.selftaught.cluster import modularity, neighbour_graph

    x, truth = _blobs()
    graph = neighbour_graph(x)
    split = np.where((truth == 0) & (np.arange(len(x)) % 2 == 0), 3, truth)  # one blob cut in two
    merged = np.minimum(truth, 1)  # two blobs as one
    assert modularity(graph, truth) > max(modularity(graph, split), modularity(graph, merged))
    assert modularity(graph, np.zeros(len(x), dtype=np.int64)) == pytest.approx(0.0)


def test_spectral_recovers_three_blobs_with_auto_k():
    from sklearn.metrics import adjusted_rand_score

    x, truth = _blobs()
    result = cluster_features(x, k=None, method="spectral", seed=0)
    assert result.k_ == 3 and adjusted_rand_score(truth, result.labels_) == 1.0
    assert result.centres_.shape == (3, x.shape[1]) and np.all(result.distances_ >= 0)


def test_hdbscan_recovers_three_blobs():
    from sklearn.metrics import adjusted_rand_score

    x, truth = _blobs(n_per=50)
    result = cluster_features(x, method="hdbscan", min_cluster_size=10)
    assert result.k_ == 3
    kept = result.labels_ >= 0
    assert kept.mean() > 0.9 and adjusted_rand_score(truth[kept], result.labels_[kept]) > 0.95


def test_smoothing_averages_each_item_with_its_neighbours_and_k_auto_reads_the_embeddings():
    from transferkit.selftaught.cluster import l2_normalise, smooth_features

    points = l2_normalise(np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]]))
    assert np.array_equal(smooth_features(points, 0), points)
    smoothed = smooth_features(points, 1)  # each point and its one nearest neighbour, re-normalised
    assert np.allclose(smoothed[0], l2_normalise((points[0] + points[1])[None])[0])
    assert np.allclose(smoothed[4], l2_normalise((points[4] + points[3])[None])[0])
    assert np.allclose(np.linalg.norm(smoothed, axis=1), 1.0)
    assert np.allclose(smooth_features(points, 50), l2_normalise(points.sum(0, keepdims=True)))  # capped at n - 1
    x, truth = _blobs()
    plain, smooth = cluster_features(x, k=None, smooth=0), cluster_features(x, k=None)
    assert plain.scores_ == smooth.scores_ and smooth.k_ == 3  # k is chosen before smoothing
    assert not np.allclose(plain.centres_, smooth.centres_)  # the clustering itself ran on smoothed embeddings


def _colour_folder(root, per: int = 8) -> list[tuple[str, str]]:
    """Tiny noisy images of three grey levels in nested folders; returns (item, colour) pairs."""
    rng = np.random.default_rng(0)
    pairs = []
    for name, level in (("dark", 30), ("mid", 128), ("light", 225)):
        for i in range(per):
            folder = root / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.clip(level + rng.normal(0, 6, (16, 16)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}{i}.png")
            pairs.append((f"{folder.name}/{name}{i}.png", name))
    return pairs


def test_cluster_command_writes_clusters_sheet_map_and_agreement(tmp_path, capsys):
    data = tmp_path / "photos"
    pairs = _colour_folder(data)
    labels = tmp_path / "labels.csv"
    labels.write_text("item,label\n" + "".join(f"{i},{c}\n" for i, c in pairs))
    out = tmp_path / "run"
    code = main(["cluster", "--data", str(data), "--out", str(out), "--backbone", "small_cnn", "--k", "3",
                 "--labels", str(labels), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["k"] == 3 and metrics["ari"] == 1.0 and metrics["nmi"] == pytest.approx(1.0)
    assert metrics["labelled_items"] == len(pairs)
    rows = list(csv.DictReader((out / "clusters.csv").open()))
    assert {r["item"] for r in rows} == {i for i, _ in pairs}  # paths relative to --data
    assert len(rows) == len(pairs) and all(float(r["distance"]) >= 0 for r in rows)
    colour = dict(pairs)
    by_cluster: dict[str, set[str]] = {}
    for r in rows:
        by_cluster.setdefault(r["cluster"], set()).add(colour[r["item"]])
    assert sorted(len(v) for v in by_cluster.values()) == [1, 1, 1]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] >= 3 * 72  # a row per cluster
    assert Image.open(out / "tsne.png").size[0] > 100
    assert json.loads((out / "transferkit-output.json").read_text())["kind"] == "cluster"


def test_cluster_python_api_on_texts_writes_examples(tmp_path, tiny_bert_dir):
    import transferkit

    texts = tmp_path / "texts.csv"
    words = ["the cat sat on the mat", "a dog plays guitar", "someone fell today", "the man is playing"]
    texts.write_text("text\n" + "".join(f"{words[i % 4]}\n" for i in range(12)))
    run = transferkit.cluster(str(texts), out=str(tmp_path / "run"), k=4, backbone=f"hf:{tiny_bert_dir}",
                              cache_dir=str(tmp_path / "cache"), progress=False, map=False)
    assert not (run.path / "tsne.png").exists()  # --no-map
    rows = list(csv.DictReader((run.path / "clusters.csv").open()))
    assert [r["item"] for r in rows] == [str(i) for i in range(12)]
    clusters = [r["cluster"] for r in rows]
    assert all(clusters[i] == clusters[i % 4] for i in range(12))  # identical texts share a cluster
    examples = json.loads((run.path / "examples.json").read_text())
    assert sum(entry["size"] for entry in examples.values()) == 12
    assert "## cluster" in (run.path / "examples.md").read_text()


@pytest.mark.parametrize("case", ["empty", "modality", "k_too_large", "label_columns", "bad_k", "empty_label",
                                  "null_label"])
def test_cluster_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    data = tmp_path / "photos"
    _colour_folder(data, per=2)
    args = ["--backbone", "small_cnn", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    if case == "empty":
        (tmp_path / "empty").mkdir()
        args += ["--data", str(tmp_path / "empty")]
    elif case == "modality":
        texts = tmp_path / "texts.csv"
        texts.write_text("text\nhello\nworld\nagain\n")
        args += ["--data", str(texts)]
    elif case == "k_too_large":
        args += ["--data", str(data), "--k", "7"]
    elif case == "label_columns":
        bad = tmp_path / "labels.csv"
        bad.write_text("path,class\nb/dark0.png,dark\n")
        args += ["--data", str(data), "--labels", str(bad)]
    elif case == "empty_label":  # an empty label is not a class of its own (NMI / ARI would count it as one)
        bad = tmp_path / "labels.csv"
        bad.write_text("item,label\nb/dark0.png,dark\nb/dark1.png,\n")
        args += ["--data", str(data), "--labels", str(bad)]
    elif case == "null_label":
        bad = tmp_path / "labels.jsonl"
        bad.write_text('{"item": "b/dark0.png", "label": null}\n')
        args += ["--data", str(data), "--labels", str(bad)]
    else:
        args += ["--data", str(data), "--k", "1"]
    out = tmp_path / "run"
    assert main(["cluster", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    if case.endswith("_label"):
        assert ("line 3 " if case == "empty_label" else "line 1 ") in err[0] and "no label" in err[0], err
    assert not out.exists() and not any(p.name.startswith(".run") for p in tmp_path.iterdir())
