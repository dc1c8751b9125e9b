"""Fixtures shared by several test files: tiny random Hugging Face models saved to local folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
TINY_LLAMA = {**TINY_BERT, "num_key_value_heads": 1, "head_dim": 16}
BERT_WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "man", "plays", "guitar", "someone", "market", "fell",
              "today", "is", "playing"]
LM_WORDS = ["good", "bad", "movie", "great", "awful", "film", "text", "label", ":", "positive", "negative", "the",
            "was", "classify", "into", "one", "of", "these", "labels", ",", ".", "cat", "sat", "on", "mat", "dog"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama (2 layers, width 32) with a word-level BERT tokenizer and a one-line chat template."""
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-shared")
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LM_WORDS]
    # a vocab dict, not vocab_file=: transformers 5's fast BERT tokenizer ignores the file (every word -> [UNK])
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocabulary)})
    assert tokenizer("the cat")["input_ids"][1:-1] == [vocabulary.index("the"), vocabulary.index("cat")]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=5 + len(LM_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A local hf folder: tiny BERT config + random weights + a BertTokenizer with a hand-written vocab."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]) + "\n")
    BertTokenizer(vocab=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(BERT_WORDS), max_position_embeddings=64, **TINY_BERT)).save_pretrained(folder)
    return str(folder)


def stripes(direction: str, seed: int) -> Image.Image:
    """A 28x28 grey image of noise with bright horizontal ("h") or vertical ("v") stripes: two easy classes."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (28, 28)).astype(np.uint8)
    period = 4 + seed % 3
    if direction == "h":
        image[::period, :] = 255
    else:
        image[:, ::period] = 255
    return Image.fromarray(image)


ANIMALS = ["cat", "dog", "mat", "sat", "fell"]
MUSIC = ["guitar", "plays", "market", "today", "playing"]


@pytest.fixture
def isolated_cache(tmp_path_factory, monkeypatch):
    """A feature cache of this test session's own (not ~/.cache) and no progress bars."""
    monkeypatch.setenv("TRANSFERKIT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("TRANSFERKIT_PROGRESS", "0")


@pytest.fixture
def opened_images(monkeypatch) -> list[str]:
    """Every file PIL opens during the test, in order: how many images were decoded by a given moment."""
    original = Image.open
    opened: list[str] = []

    def counting(fp, *args, **kwargs):
        opened.append(str(fp))
        return original(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return opened


def interrupt_seq2seq_validation(monkeypatch, at: int):
    """Make seq2seq training raise KeyboardInterrupt (Ctrl-C) at its ``at``-th validation; returns the original
    ``seq2seq_metrics`` so the caller can restore it before resuming."""
    import transferkit.sequence.seq2seq as seq2seq

    original, calls = seq2seq.seq2seq_metrics, []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(seq2seq, "seq2seq_metrics", interrupting)
    return original


def interrupt_seq2seq_train(tmp_path: Path, monkeypatch, epochs: int) -> list[str]:
    """Run a tiny ``seq2seq train`` into ``tmp_path/b2d`` that is interrupted (Ctrl-C) at its second validation,
    leaving a staging folder with a checkpoint; returns the command's arguments for a second run."""
    import transferkit.sequence.seq2seq as seq2seq
    from transferkit.cli.main import main

    original = interrupt_seq2seq_validation(monkeypatch, 2)
    args = ["seq2seq", "train", "--task", "binary-to-decimal", "--bits", "5", "--out", str(tmp_path / "b2d"),
            "--epochs", str(epochs), "--hidden-size", "8", "--embedding-dim", "4", "--batch-size", "8", "--no-progress"]
    assert main(args) == 130
    monkeypatch.setattr(seq2seq, "seq2seq_metrics", original)
    return args
