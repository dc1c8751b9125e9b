"""Zero-shot classifiers: candidate labels given as names, no labelled example.

* Text (``TextZeroShot``): each label becomes the mean of the L2-normalised embeddings of prompt templates
  filled with its name ("This text is about {}.", ...; template ensembling as in Radford et al. 2021), and an
  input is scored by ``cos(e(x), e(label)) / T``.
* Images, ConSE (``ConSEZeroShot``; Norouzi et al. 2014, "Zero-Shot Learning by Convex Combination of
  Semantic Embeddings"): the ImageNet classifier's top ``T`` probabilities ``p_t`` weight the sentence
  embeddings of those ImageNet class names, ``f(x) = sum_t p_t e(name_t) / sum_t p_t``, and the nearest
  candidate-label embedding (cosine) wins. Works offline with EfficientNet-Lite + MiniLM.
* Images, CLIP (``ClipZeroShot``; Radford et al. 2021) through ``open_clip`` when it and its weights are
  available: cosine between the image embedding and the templated label embeddings.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transferkit.engine.placement import inference, module_device, place, predict_batches, to_device
from transferkit.errors import TransferkitError
from transferkit.rundir import atomic_path

logger = logging.getLogger(__name__)

TEXT_TEMPLATES = ("{}", "This text is about {}.", "This is {}.")
IMAGE_TEMPLATES = ("{}", "a photo of {}.", "a picture of {}.")


def parse_labels(labels: str | Sequence[str]) -> list[str]:
    """Labels from a comma-separated string (or a list), stripped; at least two, no duplicates."""
    names = [s.strip() for s in (labels.split(",") if isinstance(labels, str) else labels) if s.strip()]
    if len(names) < 2 or len(set(names)) != len(names):
        raise TransferkitError(f"need at least two distinct labels, got {names}",
                               'pass them comma-separated, e.g. --labels "cat,cup of coffee,rocket"')
    return names


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def label_embeddings(encoder: Any, labels: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """``(len(labels), d)``: unit mean of the embeddings of every template filled with each label."""
    from transferkit.memory.index import embed

    for template in templates:
        if "{}" not in template:
            raise TransferkitError(f"template '{template}' has no {{}} for the label", 'write e.g. "a photo of {}."')
    filled = [t.format(label) for label in labels for t in templates]
    vectors = embed(encoder, filled).reshape(len(labels), len(templates), -1).mean(1)
    return _normalise(vectors)


def cached_label_embeddings(encoder: Any, labels: Sequence[str], cache_dir: Path | None = None) -> np.ndarray:
    """``label_embeddings(encoder, labels, ("{}",))`` kept on disk, keyed by the encoder's weights,
    preprocessing and the labels (the 1,000 ImageNet names take a while to embed on a CPU)."""
    from transferkit.engine.features import default_cache_dir, weights_digest

    key = hashlib.sha1("\n".join([encoder.preprocess_signature(), weights_digest(encoder), *labels]).encode())
    path = (cache_dir or default_cache_dir()) / "zeroshot" / f"labels-{key.hexdigest()[:20]}.npy"
    if path.is_file():
        return np.load(path)
    vectors = label_embeddings(encoder, labels, ("{}",))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.save(tmp, vectors)
    return vectors


def _softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    from transferkit.evaluation.calibration import softmax

    return softmax(scores, temperature).astype(np.float32)


class TextZeroShot:
    """Text -> label by cosine similarity of sentence embeddings to templated label descriptions."""

    def __init__(self, labels: Sequence[str], encoder: Any = None, templates: Sequence[str] = TEXT_TEMPLATES,
                 temperature: float = 0.05) -> None:
        from transferkit.backbones import create_backbone

        self.labels = list(labels)
        self.encoder = encoder if encoder is not None else create_backbone("minilm")
        self.temperature = temperature
        self.label_vectors = label_embeddings(self.encoder, self.labels, templates)

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        from transferkit.memory.index import embed

        return _softmax(embed(self.encoder, list(texts)) @ self.label_vectors.T, self.temperature)


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet class descriptions ("tabby, tabby cat", ...) shipped with timm."""
    import timm

    return list(timm.data.ImageNetInfo().label_descriptions())


class ConSEZeroShot:
    """Image -> label through ImageNet probabilities mapped into the sentence-embedding space (ConSE)."""

    def __init__(self, labels: Sequence[str], image_backbone: Any = None, text_encoder: Any = None,
                 top: int = 10, templates: Sequence[str] = ("{}",), temperature: float = 0.05) -> None:
        from transferkit.backbones import create_backbone

        self.labels = list(labels)
        self.image_backbone = image_backbone if image_backbone is not None else create_backbone("efficientnet_lite0")
        if self.image_backbone.pretrained_head() is None:
            raise TransferkitError(f"backbone '{self.image_backbone.spec.name}' has no ImageNet classifier",
                                   "use a pretrained efficientnet_lite0/1/2")
        self.text_encoder = text_encoder if text_encoder is not None else create_backbone("minilm")
        self.top = top
        self.temperature = temperature
        names = self.image_backbone.pretrained_class_names() or imagenet_class_names()
        self.class_vectors = cached_label_embeddings(self.text_encoder, names)
        self.label_vectors = label_embeddings(self.text_encoder, self.labels, templates)

    def imagenet_probabilities(self, images: Sequence[Any], batch_size: int = 16) -> np.ndarray:
        backbone, head = self.image_backbone, self.image_backbone.pretrained_head()
        place(head, module_device(backbone))
        batches = (backbone.collate([backbone.preprocess(im) for im in images[start:start + batch_size]])
                   for start in range(0, len(images), batch_size))
        rows = predict_batches(backbone, batches, lambda batch: head(backbone(batch)).softmax(-1))
        return rows if rows is not None else np.zeros((0, len(self.class_vectors)))

    def semantic_embeddings(self, images: Sequence[Any]) -> np.ndarray:
        """ConSE: the probability-weighted mean of the top-``top`` ImageNet class-name embeddings."""
        probs = self.imagenet_probabilities(images)
        top = np.argsort(-probs, axis=1)[:, : self.top]
        weights = np.take_along_axis(probs, top, axis=1)
        mixed = np.einsum("nt,ntd->nd", weights, self.class_vectors[top]) / weights.sum(1, keepdims=True)
        return _normalise(mixed)

    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        return _softmax(self.semantic_embeddings(images) @ self.label_vectors.T, self.temperature)


class ClipZeroShot:
    """Real CLIP through ``open_clip``: ``open_clip.create_model_and_transforms(model_name, pretrained=...)``.

    ``pretrained=None`` builds the architecture with random weights (what the tests use); a tag or a local
    checkpoint path loads weights (a hub tag needs a network).
    """

    def __init__(self, labels: Sequence[str], model_name: str = "ViT-B-32", pretrained: str | None = None,
                 templates: Sequence[str] = IMAGE_TEMPLATES, model: Any = None, preprocess: Any = None,
                 tokenizer: Any = None) -> None:
        try:
            import open_clip
        except ModuleNotFoundError as exc:
            raise TransferkitError("CLIP zero-shot needs the open_clip package (pip install open_clip_torch) "
                                   "and CLIP weights", "use --method conse, which works offline") from exc
        if model is None:
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
            except Exception as exc:  # open_clip: unknown tag, no network for a hub tag, damaged checkpoint
                raise TransferkitError(f"cannot load CLIP model '{model_name}' with weights '{pretrained}' "
                                       f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                                       "pass --clip-pretrained with a local open_clip checkpoint file that fits "
                                       "--clip-model (hub tags need a network)") from None
        self.model, self.preprocess = model.eval(), preprocess
        self.tokenizer = tokenizer if tokenizer is not None else open_clip.get_tokenizer(model_name)
        self.labels = list(labels)
        with inference(self.model) as device:
            filled = [t.format(label) for label in self.labels for t in templates]
            text = self.model.encode_text(to_device(self.tokenizer(filled), device)).float()
            text = torch.nn.functional.normalize(text, dim=-1).reshape(len(self.labels), len(templates), -1)
            self.label_vectors = torch.nn.functional.normalize(text.mean(1), dim=-1)

    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images])

        def probabilities(x: torch.Tensor) -> torch.Tensor:
            scale = float(self.model.logit_scale.exp()) if hasattr(self.model, "logit_scale") else 100.0
            image = torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)
            return (scale * image @ self.label_vectors.T).softmax(-1)

        return predict_batches(self.model, [pixels], probabilities)


ZERO_SHOT_METHODS = ("auto", "text", "conse", "clip")


def zero_shot_classifier(labels: Sequence[str], images: bool, method: str = "auto", *,
                         backbone: str = "efficientnet_lite0", encoder: str = "minilm", conse_top: int = 10,
                         clip_model: str = "ViT-B-32", clip_pretrained: str | None = None,
                         templates: Sequence[str] | None = None) -> tuple[str, Any]:
    """``(method, classifier)`` for image or text inputs: ``auto`` is ConSE for images and text similarity for
    texts; ``backbone`` is ConSE's ImageNet classifier, ``encoder`` the sentence encoder of the labels."""
    from transferkit.backbones import create_backbone

    if method not in ZERO_SHOT_METHODS:
        raise TransferkitError(f"invalid --method '{method}'", f"choose one of {', '.join(ZERO_SHOT_METHODS)}")
    method = method if method != "auto" else ("conse" if images else "text")
    if images != (method in ("conse", "clip")):
        raise TransferkitError(f"method '{method}' does not take {'images' if images else 'texts'}",
                               "use --method conse/clip for images and text for texts (or auto)")
    if method == "clip" and not clip_pretrained:  # random weights: a different answer on every run
        raise TransferkitError("--method clip needs CLIP weights: without --clip-pretrained it would classify "
                               "with random weights", "pass --clip-pretrained with a local open_clip checkpoint "
                               "file, or use --method conse (works offline)")
    if method == "clip":
        return method, ClipZeroShot(labels, clip_model, clip_pretrained, tuple(templates or IMAGE_TEMPLATES))
    if method == "conse":
        return method, ConSEZeroShot(labels, create_backbone(backbone), create_backbone(encoder), top=conse_top,
                                     templates=tuple(templates or ("{}",)))
    return method, TextZeroShot(labels, create_backbone(encoder), tuple(templates or TEXT_TEMPLATES))


def zero_shot_rows(classifier: Any, items: Sequence[Any], names: Sequence[str]) -> list[dict[str, Any]]:
    """One row per input: ``{"input": name, "prediction", "probabilities": {label: p}}``."""
    labels = list(classifier.labels)
    return [{"input": name, "prediction": labels[int(p.argmax())],
             "probabilities": {label: float(v) for label, v in zip(labels, p)}}
            for name, p in zip(names, classifier.predict_proba(items))]
