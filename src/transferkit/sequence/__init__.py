"""Sequence models trained from scratch through the one engine.

* :mod:`~transferkit.sequence.backbones`: backbones ``rnn`` (Elman), ``lstm``, ``gru`` and ``transformer`` for
  tokens, characters or numeric time series (registered with the backbone registry, usable in a TransferModel).
* :mod:`~transferkit.sequence.seq2seq`: GRU encoder-decoder with no / Bahdanau / scaled dot-product attention,
  teacher forcing, greedy and beam decoding, seed ensembles decoded with averaged log-probabilities
  (``Seq2SeqEnsemble``, ``--ensemble N``); the built-in ``binary-to-decimal`` task.
* :mod:`~transferkit.sequence.charlm`: a character-level language model with truncated BPTT, and sampling.
* :mod:`~transferkit.sequence.runs`: ``fit_seq2seq`` / ``fit_charlm`` train and write a run folder (the Python
  API of the CLI commands below; resumable, published atomically).
* :mod:`~transferkit.sequence.training`: token cross-entropy with label smoothing, checkpoint averaging.
* :mod:`~transferkit.sequence.numpy_lstm`: a readable NumPy LSTM step (forward and backward) for learners.

CLI: ``transferkit seq2seq train|predict`` and ``transferkit charlm train|sample``.
"""
