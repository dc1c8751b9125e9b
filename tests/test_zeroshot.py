"""Zero-shot (ConSE on real photos, text by label similarity, CLIP code path) and in-context prompting with a
tiny random Llama (prompt building, label log-likelihood equals the full-sequence computation, CLI)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from transferkit.errors import TransferkitError
from transferkit.zeroshot.classifiers import parse_labels
from transferkit.zeroshot.incontext import PromptBuilder, label_log_likelihoods, load_causal_lm, pick_examples

LABELS = ["cat", "cup of coffee", "rocket"]


@pytest.fixture(scope="module")
def encoders():
    from transferkit.backbones import create_backbone

    return create_backbone("efficientnet_lite0"), create_backbone("minilm")


def _photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def test_conse_labels_real_photos(encoders):
    from transferkit.zeroshot.classifiers import ConSEZeroShot

    classifier = ConSEZeroShot(LABELS, *encoders)
    probs = classifier.predict_proba([_photo("chelsea"), _photo("coffee"), _photo("rocket")])
    assert [LABELS[i] for i in probs.argmax(1)] == ["cat", "cup of coffee", "rocket"]
    assert probs[1, 1] > 0.5
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)


def test_text_zero_shot_by_label_similarity(encoders):
    from transferkit.zeroshot.classifiers import TextZeroShot

    classifier = TextZeroShot(["sports", "cooking", "politics"], encoders[1])
    probs = classifier.predict_proba(["The striker scored twice in the final.",
                                      "Chop the onions and simmer the sauce for ten minutes.",
                                      "The senate passed the budget bill after a long debate."])
    assert probs.argmax(1).tolist() == [0, 1, 2]


def test_cli_zeroshot_image_json(tmp_path, capsys):
    from transferkit.cli.main import main

    path = tmp_path / "coffee.jpg"
    _photo("coffee").save(path)
    assert main(["zeroshot", "--labels", ",".join(LABELS), str(path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["method"] == "conse" and document["predictions"][0]["prediction"] == "cup of coffee"
    assert main(["zeroshot", "--labels", "cat", str(path)]) == 2


def test_parse_labels_rejects_bad_lists():
    assert parse_labels(" cat , cup of coffee ") == ["cat", "cup of coffee"]
    for bad in ("cat", "cat,cat", ","):
        with pytest.raises(TransferkitError):
            parse_labels(bad)


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip is not installed")
def test_clip_code_path_with_random_model():
    from transferkit.zeroshot.classifiers import ClipZeroShot

    torch.manual_seed(0)
    classifier = ClipZeroShot(LABELS, "RN50", pretrained=None)
    probs = classifier.predict_proba([_photo("coffee")])
    assert probs.shape == (1, 3) and abs(probs.sum() - 1) < 1e-5


# --- in-context ------------------------------------------------------------------------------------------------
def test_prompt_builder_zero_and_few_shot():
    builder = PromptBuilder(["positive", "negative"])
    assert builder.build("great film") == (
        "Classify each text into one of these labels: positive, negative.\n\nText: great film\nLabel:")
    few = builder.build("great film", [("good movie", "positive"), ("awful film", "negative")])
    assert few.split("\n\n")[1:] == ["Text: good movie\nLabel: positive", "Text: awful film\nLabel: negative",
                                     "Text: great film\nLabel:"]


def test_pick_examples_balanced_and_interleaved():
    texts = [f"t{i}" for i in range(9)]
    labels = [0, 1, 0, 1, 0, 1, 0, 2, 2]
    examples = pick_examples(texts, labels, ["a", "b", "c"], shots=2, seed=0)
    assert [label for _, label in examples] == ["a", "b", "c", "a", "b", "c"]
    assert all(labels[int(t[1:])] == "abc".index(label) for t, label in examples)
    with pytest.raises(TransferkitError, match="fewer than"):
        pick_examples(texts, labels, ["a", "b", "c"], shots=3)


def test_label_log_likelihood_equals_full_sequence(tiny_llama_dir):
    lm = load_causal_lm(f"hf:{tiny_llama_dir}")
    prompt = "classify : the movie was great . label :"
    labels = ["positive", "negative", "good movie"]
    scores = label_log_likelihoods(lm, prompt, labels)
    tok = lm.tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    for label, score in zip(labels, scores):
        label_ids = tok(" " + label, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([prompt_ids + label_ids])).logits[0].log_softmax(-1)
        expected = sum(float(logits[len(prompt_ids) - 1 + t, i]) for t, i in enumerate(label_ids))
        assert score == pytest.approx(expected, abs=1e-4)
    normalised = label_log_likelihoods(lm, prompt, labels, length_normalise=True)
    assert normalised[2] == pytest.approx(scores[2] / 2, abs=1e-5)


def test_cli_prompt_classifies_inputs(tiny_llama_dir, tmp_path, capsys):
    from transferkit.cli.main import main

    rows = ["text,label"] + [f"good movie {i},positive" for i in range(6)] + \
        [f"awful film {i},negative" for i in range(6)]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n")
    code = main(["prompt", "--data", str(tmp_path / "reviews.csv"), "--lm", f"hf:{tiny_llama_dir}", "--shots", "0",
                 "--shots", "1", "--input", "great film", "--json"])
    assert code == 0
    document = json.loads(capsys.readouterr().out)
    assert [r["shots"] for r in document["results"]] == [0, 1]
    assert all(r["predictions"][0] in ("negative", "positive") for r in document["results"])


def test_evaluate_prompting_scores_each_shot_count_against_the_labels(tiny_llama_dir):
    """The loop behind ``transferkit prompt`` (in the library, not the CLI): accuracy is the share of the
    predictions that equal the true labels, and the prompt shown holds the drawn examples."""
    from transferkit.data.base import LabeledData
    from transferkit.zeroshot.incontext import InContextClassifier, evaluate_prompting

    lm = load_causal_lm("hf:" + tiny_llama_dir)
    names = ["negative", "positive"]
    texts = ["good movie", "awful film", "great film", "bad movie"]
    train = LabeledData(texts, np.array([1, 0, 1, 0]), names, "text", [f"t{i}" for i in range(4)])
    builder, shown = PromptBuilder(names), []
    results = evaluate_prompting(lm, builder, train, texts[:3], [0, 1], seed=0, labels=[1, 0, 1],
                                 show_prompt=shown.append)
    assert [r["shots"] for r in results] == [0, 1] and len(shown) == 2 and shown[1].count("Label:") == 3
    zero_shot = InContextClassifier(lm, builder, []).predict(texts[:3])
    assert results[0]["predictions"] == zero_shot
    assert results[0]["accuracy"] == pytest.approx(np.mean([p == names[y] for p, y in zip(zero_shot, [1, 0, 1])]))
    with pytest.raises(TransferkitError):
        evaluate_prompting(lm, builder, train, texts, [-1])


def test_zero_shot_classifier_refuses_methods_that_do_not_fit_the_inputs():
    from transferkit.zeroshot.classifiers import zero_shot_classifier

    for images, method in ((False, "conse"), (True, "text"), (False, "nearest"), (True, "clip")):
        with pytest.raises(TransferkitError):
            zero_shot_classifier(LABELS, images, method)
