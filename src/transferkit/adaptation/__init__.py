"""Domain adaptation: a model trained on a labelled source domain, adapted to a shifted target domain.

Methods (``transferkit fit --adapt METHOD``, see :mod:`transferkit.adaptation.extension` for the valid
combinations): ``dann`` (:mod:`.dann`, :mod:`.grl`), ``deep-coral`` and ``coral`` (:mod:`.coral`),
``feature-augmentation`` (:mod:`.feature_augmentation`), ``feature-matching`` (:mod:`.feature_matching`),
``importance-weighting`` (:mod:`.importance`). Model selection without target labels: :mod:`.selection`.
Framing digit images to one convention: :mod:`.framing`. Pictures: :mod:`.tsne`. ``transferkit evaluate``
compares an adapted run with its source-only baseline through :mod:`.evaluation`.
"""
