"""Domain adaptation: a model trained on a labelled source domain, adapted to a shifted target domain.

Methods (``transferkit fit --adapt METHOD``) are a registry (:mod:`.base`, ``@register_adaptation``; each says
which strategies and task kinds it supports), run by the fit extension :mod:`.extension`: ``dann``
(:mod:`.dann`, :mod:`.grl`), ``deep-coral`` and ``coral`` (:mod:`.coral`), ``feature-augmentation``
(:mod:`.feature_augmentation`), ``feature-matching`` (:mod:`.feature_matching`), ``importance-weighting``
(:mod:`.importance`). Model selection without target labels: :mod:`.selection`.
Framing digit images to one convention (part of the model's preprocessing): :mod:`transferkit.data.framing`.
Pictures: :mod:`.tsne`. ``transferkit evaluate`` compares an adapted run with its source-only baseline through
:mod:`.evaluation`.
"""
