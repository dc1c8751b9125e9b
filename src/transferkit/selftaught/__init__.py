"""Learning without target labels (the lecture map's unsupervised cells): self-taught clustering (``cluster``) and
self-taught learning (``pretrain``: continued self-supervised pretraining of a backbone on unlabelled data)."""
