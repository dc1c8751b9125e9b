"""The cross-validation protocol (evaluation/protocol.py): stratified folds, no leakage, choices across folds."""

from __future__ import annotations

import numpy as np
import pytest

from transferkit.data.base import LabeledData
from transferkit.errors import TransferkitError
from transferkit.evaluation.protocol import (
    FoldOutput,
    choose_from_curve,
    cross_validate,
    default_k,
    fold_ids,
    mean_curves,
    stratified_folds,
)


def _data(counts: list[int], seed: int = 0) -> LabeledData:
    """Items are 2-d points around a per-class centre; ids name the item."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    labels = labels[rng.permutation(len(labels))]
    items = [np.array([3.0 * y, 0.0]) + rng.normal(0, 1, 2) for y in labels]
    return LabeledData(items, labels, [f"c{c}" for c in range(len(counts))], "image",
                       [f"item{i:03d}" for i in range(len(labels))], name="points")


def test_folds_are_stratified_and_validate_every_item_once_per_repeat():
    labels = _data([12, 7, 5]).labels
    folds = stratified_folds(labels, k=5, repeats=3, seed=1)
    assert len(folds) == 15
    for r in range(3):
        block = folds[5 * r: 5 * r + 5]
        validated = np.concatenate([val for _, val in block])
        assert sorted(validated.tolist()) == list(range(len(labels)))  # each item exactly once per repeat
        for train, val in block:
            assert not set(train) & set(val)
            assert len(train) + len(val) == len(labels)
            per_class = np.bincount(labels[val], minlength=3)
            # stratified: class c has n_c / k items per fold, rounded either way
            assert all(int(np.floor(n / 5)) <= m <= int(np.ceil(n / 5)) for n, m in zip([12, 7, 5], per_class))
        sizes = [len(val) for _, val in block]
        assert max(sizes) - min(sizes) <= 1


def test_seeds_and_repeats_reshuffle_folds_and_a_seed_repeats_them():
    labels = _data([10, 10]).labels
    first = stratified_folds(labels, 5, seed=0)
    again = stratified_folds(labels, 5, seed=0)
    other = stratified_folds(labels, 5, seed=1)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, again))
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other))
    repeated = stratified_folds(labels, 5, repeats=2, seed=0)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(repeated[:5], repeated[5:]))


def test_default_k_is_min_of_five_and_smallest_class():
    assert default_k(_data([10, 9]).labels) == 5
    assert default_k(_data([10, 3]).labels) == 3
    assert default_k(_data([2, 40]).labels) == 2


@pytest.mark.parametrize("counts, message", [([5, 1], "single example"), ([8], "single class")])
def test_uncrossvalidatable_labels_raise_one_line(counts, message):
    data = _data(counts)
    with pytest.raises(TransferkitError) as info:
        cross_validate(lambda tr, va: np.zeros((len(va), data.num_classes)), data)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(TransferkitError):
        stratified_folds(data.labels, 2)


def test_k_above_smallest_class_is_refused():
    with pytest.raises(TransferkitError, match="smallest class has 3"):
        stratified_folds(_data([10, 3]).labels, k=4)


def test_cross_validate_never_trains_on_a_validation_item_and_collects_oof_predictions():
    data = _data([9, 8, 6])
    seen: list[tuple[set[str], set[str]]] = []

    def nearest_centre(train: LabeledData, val: LabeledData) -> np.ndarray:
        seen.append((set(train.ids), set(val.ids)))
        centres = np.stack([np.mean([x for x, y in zip(train.items, train.labels) if y == c], 0)
                            for c in range(train.num_classes)])
        distance = np.stack([np.linalg.norm(np.stack(list(val.items)) - m, axis=1) for m in centres], 1)
        scores = np.exp(-distance)
        return scores / scores.sum(1, keepdims=True)

    result = cross_validate(nearest_centre, data, repeats=2, seed=3)
    assert result.k == 5 and result.repeats == 2 and len(result.fold_accuracies) == 10
    for train_ids, val_ids in seen:
        assert not train_ids & val_ids
        assert train_ids | val_ids == set(data.ids)
    expected = fold_ids(data, stratified_folds(data.labels, 5, 2, seed=3))
    assert [v for _, v in seen] == [v for _, v in expected]
    for r in range(2):
        assert set().union(*[v for _, v in seen[5 * r: 5 * r + 5]]) == set(data.ids)
    assert result.oof_probabilities.shape == (len(data), 3)
    np.testing.assert_allclose(result.oof_probabilities.sum(1), 1.0)
    assert result.oof_accuracy > 0.8  # well separated classes
    assert result.mean == pytest.approx(np.mean(result.fold_accuracies))
    assert result.sd == pytest.approx(np.std(result.fold_accuracies, ddof=1))


def test_oof_probabilities_average_the_repeats():
    data = _data([6, 6])
    calls = iter(range(100))

    def constant(train, val):  # repeat 0 says class 0 (p=1), repeat 1 says class 1: the average is 0.5
        p = np.zeros((len(val), 2))
        p[:, 0 if next(calls) < 2 else 1] = 1.0
        return p

    result = cross_validate(constant, data, k=2, repeats=2)
    np.testing.assert_allclose(result.oof_probabilities, 0.5)


def test_each_repeat_reports_its_own_single_model_out_of_fold_accuracy():
    """The averaged probabilities are a small ensemble; each repeat alone predicts every item once by one model."""
    data = _data([6, 6])
    calls = iter(range(100))

    def one_right_repeat(train, val):  # repeat 0 is always right, repeat 1 right on class 0 only
        repeat = next(calls) // 2
        p = np.zeros((len(val), 2))
        p[np.arange(len(val)), data.labels[val.ids_positions] if repeat == 0 else 0] = 1.0
        return p

    data_positions = {i: n for n, i in enumerate(data.ids)}
    _subset = data.subset

    def subset(positions, name=None):
        part = _subset(positions, name=name)
        part.ids_positions = np.asarray([data_positions[i] for i in part.ids])
        return part

    data.subset = subset
    result = cross_validate(one_right_repeat, data, k=2, repeats=2)
    assert result.repeat_accuracies == [1.0, 0.5]
    assert result.summary()["repeat_accuracies"] == [1.0, 0.5]


def test_choices_are_made_on_the_mean_curve_across_folds():
    data = _data([6, 6])
    curves = iter([[1.0, 0.5, 0.6], [1.0, 0.7, 0.4], [0.9, 0.6, 0.55]])

    def with_curve(train, val):
        return FoldOutput(np.full((len(val), 2), 0.5), curves={"val_loss": next(curves)})

    def choose(fold_curves):
        mean = mean_curves(fold_curves)["val_loss"]
        return {"epochs": choose_from_curve(mean, "min") + 1}

    result = cross_validate(with_curve, data, k=3, choose=choose)
    # mean curve: [0.967, 0.6, 0.517]: epoch 3, although fold 1 alone would pick epoch 2
    assert result.chosen == {"epochs": 3}
    assert len(result.fold_curves) == 3


def test_mean_curves_truncate_and_choose_with_tolerance():
    assert mean_curves([{"a": [1, 2, 3]}, {"a": [3, 4]}]) == {"a": [2.0, 3.0]}
    assert choose_from_curve([0.9, 0.5, 0.49], "min", tolerance=0.02) == 1
    assert choose_from_curve([0.2, 0.8, 0.8], "max") == 1


def test_wrong_probability_shape_is_a_programming_error():
    data = _data([4, 4])
    with pytest.raises(ValueError, match="shape"):
        cross_validate(lambda tr, va: np.zeros((len(va), 3)), data, k=2)


def test_candidates_are_chosen_on_pooled_oof_predictions_and_give_the_oof_probabilities():
    data = _data([6, 6])

    def candidates(train, val):
        truth = np.eye(2)[val.labels]
        wrong = np.eye(2)[1 - val.labels]
        hedged = 0.6 * truth + 0.4 * wrong  # as accurate as `truth`, higher cross-entropy
        return FoldOutput(candidates=[wrong, hedged, truth, truth.copy()])

    result = cross_validate(candidates, data, k=3, settings=lambda i: {"epochs": i + 1})
    # candidates 1, 2, 3 are all accurate; 2 and 3 have the lower loss; ties go to the earlier: epochs 3
    assert result.chosen == {"candidate": 2, "epochs": 3}
    assert result.oof_accuracy == 1.0 and result.fold_accuracies == [1.0, 1.0, 1.0]
    assert [s["accuracy"] for s in result.candidate_scores] == [0.0, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(result.oof_probabilities, np.eye(2)[data.labels])
