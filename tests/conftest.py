"""Fixtures shared by several test files: tiny random Hugging Face models saved to local folders."""

from __future__ import annotations

import pytest
import torch

LM_WORDS = ["good", "bad", "movie", "great", "awful", "film", "text", "label", ":", "positive", "negative", "the",
            "was", "classify", "into", "one", "of", "these", "labels", ",", ".", "cat", "sat", "on", "mat", "dog"]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny random Llama (2 layers, width 32) with a word-level BERT tokenizer and a one-line chat template."""
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama-shared")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LM_WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=5 + len(LM_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)
