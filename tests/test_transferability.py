"""LogME (checked against direct numerical evidence maximisation), LEEP and H-score on hand-checked cases,
Kendall tau, and rank_backbones end to end on tiny data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize

from transferkit.errors import TransferkitError
from transferkit.evaluation.transferability import (
    Candidate,
    evidence_fixed_point,
    h_score,
    kendall_tau,
    leep,
    log_evidence,
    logme,
    rank_backbones,
)


@pytest.mark.parametrize("n,d", [(40, 5), (15, 30)])  # more items than dimensions, and fewer
def test_logme_fixed_point_is_the_maximum_of_the_exact_evidence(n, d):
    rng = np.random.default_rng(0)
    f = rng.normal(size=(n, d))
    y = (f[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(float)
    value, alpha, beta = evidence_fixed_point(f, y)
    # the closed form at the returned (alpha, beta) equals the exact Gaussian marginal likelihood
    assert value == pytest.approx(log_evidence(f, y, alpha, beta), abs=1e-9)
    # and no (alpha, beta) found by a generic optimiser does better
    best = minimize(lambda p: -log_evidence(f, y, math.exp(p[0]), math.exp(p[1])), x0=[0.0, 0.0],
                    method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 4000})
    assert value == pytest.approx(-best.fun, abs=1e-7)
    assert math.log(alpha) == pytest.approx(best.x[0], abs=1e-3)
    assert math.log(beta) == pytest.approx(best.x[1], abs=1e-3)


def test_logme_prefers_informative_features():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 20)
    informative = np.eye(3)[labels] * 3 + rng.normal(scale=0.5, size=(60, 3))
    noise = rng.normal(size=(60, 3))
    assert logme(informative, labels) > logme(noise, labels)
    # LogME of one class column is the mean over classes
    per_class = [evidence_fixed_point(informative, (labels == k).astype(float))[0] for k in range(3)]
    assert logme(informative, labels) == pytest.approx(np.mean(per_class))


def test_leep_hand_computed():
    # two items, two source classes, two target classes
    theta = np.array([[0.8, 0.2], [0.3, 0.7]])
    labels = np.array([0, 1])
    # P(y, z) = 1/2 [[0.8, 0.2], [0.3, 0.7]]; P(z) = [0.55, 0.45]; P(y|z) = [[0.8/1.1, 0.2/0.9], [0.3/1.1, 0.7/0.9]]
    p_y_given_z = np.array([[0.8 / 1.1, 0.2 / 0.9], [0.3 / 1.1, 0.7 / 0.9]])
    expected = 0.5 * (math.log(0.8 * p_y_given_z[0, 0] + 0.2 * p_y_given_z[0, 1])
                      + math.log(0.3 * p_y_given_z[1, 0] + 0.7 * p_y_given_z[1, 1]))
    assert leep(theta, labels) == pytest.approx(expected, abs=1e-12)
    # a source whose classes map one-to-one onto the targets scores the maximum 0
    assert leep(np.eye(2)[labels], labels) == pytest.approx(0.0, abs=1e-12)


def test_h_score_hand_computed():
    # 1-d features: H = var(class means) / var(f)
    f = np.array([[0.0], [2.0], [4.0], [6.0]])
    labels = np.array([0, 0, 1, 1])
    # class means 1 and 5 -> between-class variance 4; total variance 5
    assert h_score(f, labels) == pytest.approx(4 / 5)
    # a feature that carries no label information scores 0
    assert h_score(np.array([[0.0], [1.0], [0.0], [1.0]]), labels) == pytest.approx(0.0, abs=1e-12)


def test_h_score_shrinkage_avoids_saturation_with_fewer_items_than_dimensions():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    noise = rng.normal(size=(40, 200))
    informative = noise.copy()
    informative[:, :4] += 3 * np.eye(4)[labels]
    # the plain score saturates at classes - 1 = 3 for any features when n < d
    assert h_score(noise, labels, shrinkage=False) == pytest.approx(3.0)
    assert h_score(informative, labels, shrinkage=False) == pytest.approx(3.0)
    assert h_score(informative, labels) > h_score(noise, labels)


def test_kendall_tau_and_bad_input():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(TransferkitError):
        logme(np.zeros((3, 2)), np.array([0, 1]))
    assert Candidate.parse("efficientnet_lite0@96").options == {"image_size": 96}
    depth = Candidate.parse("efficientnet_lite0@64#3")
    assert depth.options == {"image_size": 64, "feature_stage": 3} and depth.label == "efficientnet_lite0@64#3"
    with pytest.raises(TransferkitError):
        Candidate.parse("efficientnet_lite0#last")
    with pytest.raises(TransferkitError):
        Candidate.parse("efficientnet_lite0@big")


def test_rank_backbones_on_tiny_images(tmp_path):
    from transferkit.data.base import LabeledData

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 12)
    images = [np.full((16, 16), 40 + 160 * y, dtype=np.uint8) + rng.integers(0, 20, (16, 16), dtype=np.uint8)
              for y in labels]
    data = LabeledData(images, labels, ["dark", "light"], "image", [f"i{i}" for i in range(24)])
    rows = rank_backbones(data, ["small_cnn@16", "small_cnn@24"], cache_dir=tmp_path)
    assert [r["rank"] for r in rows] == [1, 2]
    assert {r["backbone"] for r in rows} == {"small_cnn@16", "small_cnn@24"}
    assert rows[0]["logme"] >= rows[1]["logme"]
    assert all(r["leep"] is None and np.isfinite(r["h_score"]) for r in rows)  # small_cnn has no source head
