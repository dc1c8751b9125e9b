"""Domain adaptation: each method's maths on hand-checkable cases, the validity rules, and tiny end-to-end runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transferkit
from transferkit.adaptation.coral import coral_matrix, coral_transform, covariance, deep_coral_loss
from transferkit.adaptation.feature_augmentation import SOURCE, TARGET, augment_features, fit_augmented_head
from transferkit.adaptation.grl import GradientReversal, grl_schedule, reverse_gradient
from transferkit.adaptation.importance import density_ratio_weights, effective_sample_size
from transferkit.adaptation.selection import prediction_entropy, soft_neighbourhood_density
from transferkit.cli.main import main
from transferkit.data.framing import frame_array, frame_image

# --- gradient reversal -------------------------------------------------------------------------------------------


def test_gradient_reversal_is_identity_forward_and_flips_and_scales_gradients():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = reverse_gradient(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.allclose(x.grad, torch.tensor([-0.25, -0.5, -0.75]))

    layer = GradientReversal(2.0)
    x2 = torch.ones(2, requires_grad=True)
    layer(x2).sum().backward()
    assert torch.allclose(x2.grad, torch.full((2,), -2.0))


def test_grl_schedule_follows_ganin_lempitsky():
    assert grl_schedule(0.0) == 0.0
    assert grl_schedule(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)
    assert grl_schedule(1.0) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert grl_schedule(2.0) == grl_schedule(1.0)  # progress is clipped to [0, 1]


# --- CORAL ---------------------------------------------------------------------------------------------------------


def test_deep_coral_loss_by_hand():
    # source covariance [[2, 0], [0, 0]], target [[0, 0], [0, 2]]: ||diff||_F^2 = 8, d = 2 -> 8 / (4 * 4) = 0.5
    source = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(covariance(source), torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    assert deep_coral_loss(source, target).item() == pytest.approx(0.5)
    assert deep_coral_loss(source, source).item() == pytest.approx(0.0)


def _correlated(rng: np.random.Generator, n: int, d: int, scale: float) -> np.ndarray:
    mixing = rng.normal(size=(d, d)) * scale
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d)


def test_coral_transform_gives_source_the_target_covariance():
    rng = np.random.default_rng(0)
    source, target = _correlated(rng, 400, 5, 1.0), _correlated(rng, 300, 5, 3.0)
    assert not np.allclose(np.cov(source, rowvar=False), np.cov(target, rowvar=False), atol=0.5)
    # without regularisation the re-coloured source covariance equals the target covariance
    moved = coral_transform(source, target, regularisation=1e-10).astype(np.float64)
    np.testing.assert_allclose(np.cov(moved, rowvar=False), np.cov(target, rowvar=False), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(moved.mean(0), target.mean(0), atol=1e-3)
    # with the paper's r = 1: A^T (C_s + I) A = C_t + I exactly
    a = coral_matrix(source, target, 1.0)
    eye = np.eye(5)
    np.testing.assert_allclose(a.T @ (np.cov(source, rowvar=False) + eye) @ a, np.cov(target, rowvar=False) + eye,
                               rtol=1e-8, atol=1e-8)


def test_relative_coral_regularisation_equals_skada_shrinkage():
    """relative=True, r = 1: (C_s + tr(C_s)/d I)^-1/2 (C_t + tr(C_t)/d I)^1/2, which is SKADA's CORALAdapter(reg=0.5)
    (sklearn's shrunk covariance 0.5 C + 0.5 tr(C)/d I: the scalar 0.5 cancels between the two factors)."""
    from sklearn.covariance import shrunk_covariance

    rng = np.random.default_rng(1)
    source, target = _correlated(rng, 300, 4, 1.0), 10.0 * _correlated(rng, 300, 4, 3.0)  # different scales

    def power(m: np.ndarray, p: float) -> np.ndarray:
        values, vectors = np.linalg.eigh(m)
        return (vectors * values**p) @ vectors.T

    skada = power(shrunk_covariance(np.cov(source, rowvar=False), 0.5), -0.5) @ \
        power(shrunk_covariance(np.cov(target, rowvar=False), 0.5), 0.5)
    np.testing.assert_allclose(coral_matrix(source, target, 1.0, relative=True), skada, rtol=1e-8, atol=1e-10)
    assert not np.allclose(coral_matrix(source, target, 1.0), skada, atol=1e-3)  # absolute r differs


# --- feature augmentation ------------------------------------------------------------------------------------------


def test_feature_augmentation_shapes_and_layout():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    source, target = augment_features(x, SOURCE), augment_features(x, TARGET)
    assert source.shape == target.shape == (2, 9)
    np.testing.assert_array_equal(source, np.concatenate([x, x, np.zeros_like(x)], axis=1))
    np.testing.assert_array_equal(target, np.concatenate([x, np.zeros_like(x), x], axis=1))
    with pytest.raises(ValueError):
        augment_features(x, 2)


def test_feature_augmentation_learns_a_target_specific_rule():
    rng = np.random.default_rng(0)
    # feature 0 decides the class in both domains; feature 1 agrees with it in the source, opposes it in target
    def domain(n: int, sign: float) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        s = 2.0 * y - 1
        return np.stack([s + 0.8 * rng.normal(size=n), 3 * sign * s + 0.3 * rng.normal(size=n)], 1), y

    xs, ys = domain(400, 1.0)
    xt, yt = domain(20, -1.0)
    xtest, ytest = domain(500, -1.0)
    weight, bias = fit_augmented_head(xs, ys, xt, yt, 2, c=10.0)
    assert weight.shape == (2, 2)
    accuracy = ((torch.as_tensor(xtest, dtype=torch.float32) @ weight.T + bias).argmax(1).numpy() == ytest).mean()
    from transferkit.engine.solvers import fit_logistic_regression

    w_src, b_src = fit_logistic_regression(xs, ys, 2, c=10.0)
    test_logits = torch.as_tensor(xtest, dtype=torch.float32) @ w_src.T + b_src
    source_only = (test_logits.argmax(1).numpy() == ytest).mean()
    assert source_only < 0.3 and accuracy > 0.85


# --- importance weighting ------------------------------------------------------------------------------------------


def test_importance_weights_recover_a_known_density_ratio():
    rng = np.random.default_rng(0)
    source = rng.normal(0.0, 1.0, size=(3000, 1))
    target = rng.normal(1.0, 1.0, size=(3000, 1))
    weights = density_ratio_weights(source, target, clip=50.0)
    true_ratio = np.exp(source[:, 0] - 0.5)  # N(1,1) / N(0,1)
    assert weights.mean() == pytest.approx(1.0, abs=1e-5)
    assert np.corrcoef(np.log(weights), np.log(true_ratio))[0, 1] > 0.99
    weighted_mean = float((weights * source[:, 0]).sum() / weights.sum())
    assert weighted_mean == pytest.approx(1.0, abs=0.15)  # the re-weighted source looks like the target
    assert effective_sample_size(np.ones(10)) == pytest.approx(10.0)
    assert effective_sample_size(weights) < len(weights)


def test_weighted_logistic_regression_matches_duplication():
    from transferkit.engine.solvers import fit_logistic_regression

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 3)), rng.integers(0, 2, 30)
    w = np.ones(30)
    w[:10] = 2.0
    weighted = fit_logistic_regression(x, y, 2, c=1.0, sample_weight=w * 40 / w.sum())
    duplicated = fit_logistic_regression(np.concatenate([x, x[:10]]), np.concatenate([y, y[:10]]), 2, c=1.0)
    assert torch.allclose(weighted[0], duplicated[0], atol=1e-3)


# --- selection signals and framing -------------------------------------------------------------------------------------


def test_selection_signals():
    uniform = torch.full((6, 3), 1 / 3)
    assert prediction_entropy(uniform) == pytest.approx(math.log(3))
    confident = torch.eye(3).repeat(2, 1) * 0.98 + 0.01
    assert prediction_entropy(confident) < 0.2
    # identical predictions: every other item is an equally near neighbour -> entropy log(n - 1)
    assert soft_neighbourhood_density(uniform) == pytest.approx(math.log(5), abs=1e-5)
    # tight class clusters have denser neighbourhoods (higher SND) than the same clusters blurred by noise
    rng = torch.Generator().manual_seed(0)
    centres = 8 * torch.eye(5)[torch.randint(0, 5, (60,), generator=rng)]
    tight = torch.softmax(centres + 0.1 * torch.randn(60, 5, generator=rng), 1)
    loose = torch.softmax(centres + 6.0 * torch.randn(60, 5, generator=rng), 1)
    assert soft_neighbourhood_density(tight) > soft_neighbourhood_density(loose) + 0.05


def test_framing_puts_a_full_frame_digit_in_a_20px_box():
    digit = np.zeros((8, 8), dtype=np.uint8)
    digit[:, 3:5] = 255  # a '1' from top to bottom of its 8x8 grid
    framed = frame_array(digit)
    rows, cols = np.where(framed > 25)
    assert framed.shape == (28, 28)
    assert rows.max() - rows.min() + 1 == 20  # longer side scaled to MNIST's 20 px box
    assert abs((rows.min() + rows.max()) / 2 - 13.5) <= 1 and abs((cols.min() + cols.max()) / 2 - 13.5) <= 1


# --- validity rules (exit code 2, before any data is read) --------------------------------------------------------


@pytest.mark.parametrize("extra", [
    ["--target-data", "digits"],  # no --adapt
    ["--adapt", "dann"],  # no target data
    ["--adapt", "dann", "--target-data", "digits"],  # linear-probe keeps the backbone frozen
    ["--adapt", "coral", "--target-data", "digits", "--strategy", "finetune"],  # coral needs frozen features
    ["--adapt", "feature-augmentation", "--target-data", "digits"],  # needs --target-labelled
    ["--adapt", "feature-matching"],  # needs --pairs
    ["--adapt", "feature-matching", "--pairs", "missing.csv"],
    ["--adapt", "deep-coral", "--target-data", "digits", "--strategy", "finetune", "--pairs", "x.csv"],
    ["--adapt", "magic", "--target-data", "digits"],
    ["--adapt", "dann", "--target-data", "digits", "--strategy", "finetune", "--adapt-selection", "oracle"],
])
def test_invalid_combinations_exit_2(extra, tmp_path, capsys):
    code = main(["fit", "--data", "digits", "--backbone", "small_cnn", "--out", str(tmp_path / "run"), *extra])
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- tiny end-to-end runs ----------------------------------------------------------------------------------------


def _write_domain(root: Path, n_per_class: int, seed: int, invert: bool) -> Path:
    """Two classes of 12x12 images: a bright bar on the left vs on the right; the target domain is noisier
    and has inverted contrast (dark bars on a bright ground)."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("left", "right")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            image = rng.normal(30, 20 if invert else 10, size=(12, 12))
            cols = slice(1, 5) if label == 0 else slice(7, 11)
            image[2:10, cols] += 180
            if invert:
                image = 255 - image
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def domains(tmp_path):
    return (_write_domain(tmp_path / "source", 16, 0, False), _write_domain(tmp_path / "target", 12, 1, True),
            _write_domain(tmp_path / "target_test", 10, 2, True))


FAST = ["--backbone", "small_cnn", "--epochs", "2", "--batch-size", "16", "--threads", "1", "--no-progress",
        "--cache-dir"]


def test_fit_dann_end_to_end_writes_baseline_and_evaluate_compares(domains, tmp_path, capsys):
    source, target, target_test = domains
    out = tmp_path / "dann"
    code = main(["fit", "--data", str(source), *FAST, str(tmp_path / "cache"), "--strategy", "finetune",
                 "--head-init", "random", "--no-freeze-bn", "--adapt", "dann", "--target-data", str(target),
                 "--adapt-plot", "--out", str(out), "--json"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["adaptation"]["method"] == "dann" and metrics["adaptation"]["selection"] == "entropy"
    assert (out / "source_only" / "model" / "model.safetensors").is_file()
    assert (out / "adaptation_tsne.png").stat().st_size > 1000
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all("val_target_snd" in row and "train_domain_adversarial" in row for row in history)
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(target_test), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the source-only accuracy is the saved baseline's own accuracy on the same data
    assert report["source_only_accuracy"] == pytest.approx(
        transferkit.evaluate(str(out / "source_only" / "model"), str(target_test), progress=False)["accuracy"])
    assert report["adaptation_gain"] == pytest.approx(report["accuracy"] - report["source_only_accuracy"])
    assert main(["evaluate", "--model", str(out), "--data", str(target_test), "--json", "--no-source-only"]) == 0
    assert "source_only_accuracy" not in json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("method,flag", [("coral", "--target-data"), ("importance-weighting", "--target-data"),
                                         ("feature-augmentation", "--target-labelled")])
def test_frozen_feature_methods_end_to_end(method, flag, domains, tmp_path):
    source, target, _ = domains
    if method == "importance-weighting":  # needs overlapping supports: a target of mostly "left" source images
        target = source / "left"
    out = tmp_path / method
    code = main(["fit", "--data", str(source), *FAST, str(tmp_path / "cache"), "--adapt", method, flag,
                 str(target), "--out", str(out), "--json"])
    assert code == 0
    from safetensors.torch import load_file

    adapted = load_file(str(out / "model" / "model.safetensors"))
    baseline = load_file(str(out / "source_only" / "model" / "model.safetensors"))
    head = next(k for k in adapted if k.startswith("heads.") and k.endswith("weight"))
    assert (adapted[head] - baseline[head]).abs().max() > 1e-3 * baseline[head].abs().max()  # head changed
    backbone_key = next(k for k in adapted if k.startswith("backbone.") and k.endswith("weight"))
    assert torch.equal(adapted[backbone_key], baseline[backbone_key])  # frozen features: same backbone


def test_feature_matching_end_to_end(domains, tmp_path):
    source, target, _ = domains
    rows = ["source,target"]
    for name in ("left", "right"):
        for i in range(12):
            rows.append(f"source/{name}/{i}.png,target/{name}/{i}.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\n".join(rows) + "\n")
    out = tmp_path / "fm"
    assert main(["fit", "--data", str(source), *FAST, str(tmp_path / "cache"), "--adapt", "feature-matching",
                 "--pairs", str(pairs), "--out", str(out), "--json"]) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    matching = [row for row in history if row.get("stage") == "feature-matching"]
    assert len(matching) == 2 and matching[-1]["train_feature_matching"] < matching[0]["train_feature_matching"]


def test_extension_training_hook_defaults_and_adaptation_takes_over_only_when_adapting():
    """api.fit calls FitExtension.train first; None (the default) leaves training to the strategy."""
    from transferkit.adaptation.extension import AdaptationConfig, AdaptationExtension
    from transferkit.extensions import ExtensionConfig, FitExtension

    assert FitExtension(ExtensionConfig()).train(None, None, None) is None  # type: ignore[arg-type]
    assert AdaptationExtension(AdaptationConfig(frame="mnist")).train(None, None, None) is None  # type: ignore[arg-type]


def test_fashion_pairs_have_a_labelled_degraded_copy_of_the_source(tmp_path):
    from transferkit.adaptation.feature_matching import make_fashion_pairs, read_pairs

    out = make_fashion_pairs(tmp_path / "pairs", n_source=12, n_pairs=6, n_test=5, seed=0)
    source = sorted(p.relative_to(out / "source") for p in (out / "source").rglob("*.png"))
    degraded = sorted(p.relative_to(out / "target_train") for p in (out / "target_train").rglob("*.png"))
    assert len(source) == 12 and source == degraded  # same class folders and file names
    clean = np.asarray(Image.open(out / "source" / source[0]), dtype=np.float32)
    noisy = np.asarray(Image.open(out / "target_train" / source[0]), dtype=np.float32)
    assert clean.shape == noisy.shape == (28, 28) and noisy.std() < clean.std()  # contrast halved
    pair_source, pair_target = read_pairs(out / "pairs.csv")
    assert len(pair_source) == len(pair_target) == 6
    assert len(list((out / "target_test").rglob("*.png"))) == 5


# --- the frame travels with the model ---------------------------------------------------------------------------


def write_bar_digits(root: Path, n_per_class: int, seed: int, canvas: int, bar: tuple[int, int]) -> Path:
    """Digit-like images (ink bright on dark): a ``vertical`` or ``horizontal`` bar of ``bar`` (length, width)
    pixels at a random place of a ``canvas`` x ``canvas`` grid, so only framing puts both domains alike."""
    rng = np.random.default_rng(seed)
    for name in ("horizontal", "vertical"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            image = rng.integers(0, 20, (canvas, canvas)).astype(np.uint8)
            top, left = rng.integers(0, canvas - bar[0] + 1, 2)
            image[top:top + bar[1], left:left + bar[0]] = 255
            Image.fromarray(image if name == "horizontal" else image.T).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def framed_run(tmp_path_factory):
    """A DANN run with ``--frame mnist`` (source: bars in 16x16; target: short bars in 40x40), and the shapes of
    every image framed while it trained."""
    root = tmp_path_factory.mktemp("framed")
    source = write_bar_digits(root / "source", 12, 0, 16, (10, 3))
    target = write_bar_digits(root / "target", 8, 1, 40, (8, 2))
    target_test = write_bar_digits(root / "target_test", 6, 2, 40, (8, 2))
    import transferkit.data.framing as framing

    shapes: list[tuple[int, ...]] = []
    original = framing.frame_array

    def recording(image, *args, **kwargs):
        shapes.append(np.asarray(image).shape)
        return original(image, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(framing, "frame_array", recording)
        code = main(["fit", "--data", str(source), *FAST, str(root / "cache"), "--strategy", "finetune",
                     "--adapt", "dann", "--target-data", str(target), "--frame", "mnist", "--lr", "0.01",
                     "--epochs", "4", "--head-init", "random", "--no-freeze-bn", "--out", str(root / "run"), "--json"])
    assert code == 0
    return {"run": root / "run", "source": source, "target_test": target_test, "shapes": shapes}


def test_training_frames_every_image_exactly_once(framed_run):
    shapes = set(framed_run["shapes"])
    assert (16, 16) in shapes and (40, 40) in shapes  # source and target images were framed
    assert (28, 28) not in shapes  # never a framed image framed again


def test_a_framed_digit_framed_again_is_unchanged():
    rng = np.random.default_rng(0)
    digit = rng.integers(0, 30, (9, 13)).astype(np.uint8)
    digit[2:7, 3:11] = 200
    once = frame_array(digit)
    np.testing.assert_array_equal(frame_array(once), once)


def test_the_frame_is_part_of_the_saved_model_and_of_predict(framed_run, capsys):
    run = framed_run["run"]
    for folder in (run / "model", run / "source_only" / "model"):  # the baseline is framed the same way
        config = json.loads((folder / "config.json").read_text())
        assert config["backbone"]["options"]["frame"] == "mnist"
    files = sorted(str(p) for p in framed_run["target_test"].rglob("*.png"))[::3]
    unframed = [Image.open(f).convert("L") for f in files]
    framed = [frame_image(image) for image in unframed]
    loaded = transferkit.load(run)
    np.testing.assert_allclose(loaded.predict_proba(unframed), loaded.predict_proba(framed), atol=1e-6)
    assert main(["predict", "--model", str(run), "--json", *files]) == 0  # the CLI path frames too
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert [r["prediction"] for r in rows] == loaded.predict(framed)


def _framed_accuracy(model_path: Path, folder: Path) -> float:
    """Accuracy of the model on ``folder``'s images framed here, by hand."""
    loaded = transferkit.load(model_path)
    files = sorted(folder.rglob("*.png"))
    framed = [frame_image(Image.open(f)) for f in files]
    labels = [loaded.classes_.index(f.parent.name) for f in files]
    return float((loaded.predict_proba(framed).argmax(1) == np.asarray(labels)).mean())


def test_evaluate_scores_a_framed_run_on_framed_data(framed_run):
    run, target_test = framed_run["run"], framed_run["target_test"]
    report = transferkit.evaluate(run, str(target_test), progress=False)
    assert report["accuracy"] == pytest.approx(_framed_accuracy(run, target_test))
    assert report["adapted_accuracy"] == report["accuracy"] and report["frame"] == "mnist"
    assert sum(map(sum, report["confusion_matrix"])) == 12
    baseline = run / "source_only" / "model"  # learned the framed bars (the adapted net did not, in 4 epochs)
    assert report["source_only_accuracy"] == pytest.approx(_framed_accuracy(baseline, target_test)) == 1.0
    assert transferkit.evaluate(baseline, str(target_test), progress=False)["accuracy"] == 1.0  # unframed: 0.5


def test_a_run_written_before_the_frame_was_saved_takes_it_from_its_metrics(framed_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(framed_run["run"], old)
    for folder in (old / "model", old / "source_only" / "model"):  # as fit wrote them before: no frame option
        path = folder / "config.json"
        config = json.loads(path.read_text())
        del config["backbone"]["options"]["frame"]
        path.write_text(json.dumps(config))
    files = sorted(str(p) for p in framed_run["target_test"].rglob("*.png"))[::3]
    for sub in ("", "source_only/model"):
        np.testing.assert_allclose(transferkit.load(old / sub).predict_proba(files),
                                   transferkit.load(framed_run["run"] / sub).predict_proba(files), atol=1e-6)
    report = transferkit.evaluate(old, str(framed_run["target_test"]), progress=False)
    assert report["accuracy"] == pytest.approx(_framed_accuracy(framed_run["run"], framed_run["target_test"]))
    metrics = json.loads((old / "metrics.json").read_text())
    metrics["adaptation"]["frame"] = "none"  # an unframed old run stays unframed
    (old / "metrics.json").write_text(json.dumps(metrics))
    unframed = [Image.open(f).convert("L") for f in files]
    framed = [frame_image(image) for image in unframed]
    loaded = transferkit.load(old)
    assert not np.allclose(loaded.predict_proba(unframed), loaded.predict_proba(framed), atol=1e-6)
