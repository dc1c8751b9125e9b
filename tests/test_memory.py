"""Memory: chunking boundaries, index persistence, add/remove, metadata, encoder mismatch, approximate kinds,
the CLI (search --json), and ``ask`` (extractive cites the right source; generated citations are parsed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from transferkit.errors import TransferkitError
from transferkit.memory.ask import Answer, generated_answer, sentence_windows
from transferkit.memory.chunking import Document, chunk_document, read_documents
from transferkit.memory.index import SearchHit, VectorIndex, add_to_index, build_index

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "guitar", "plays", "market", "today", "reset", "device", "power"]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    """``hf:<folder>``: a tiny random BERT with a hand-written vocabulary (fast, offline)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(WORDS), max_position_embeddings=64, hidden_size=16,
                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture
def notes(tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.md").write_text("the cat sat on the mat")
    (folder / "sub" / "b.txt").write_text("the dog plays guitar today " * 4)
    (folder / "c.jsonl").write_text(json.dumps({"text": "reset the device"}) + "\n\n" +
                                    json.dumps({"content": "power the market"}) + "\n")
    (folder / "ignored.csv").write_text("x,y\n")
    return folder


# --- chunking ------------------------------------------------------------------------------------------------
def test_char_chunks_cover_text_with_overlap_and_exact_offsets():
    text = " ".join(["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx", "yz"] * 2)
    chunks = chunk_document(Document("x.txt", text), size=20, overlap=5)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for chunk in chunks:
        assert chunk.text == text[chunk.start:chunk.end]
        assert len(chunk.text) <= 20
    for before, after in zip(chunks, chunks[1:]):
        assert after.start == before.end - 5  # consecutive chunks share exactly `overlap` characters
    # windows end after a space inside their last fifth: no word is cut at a chunk's end
    assert all(c.text.endswith(" ") or c.end == len(text) for c in chunks)


def test_char_chunks_without_spaces_are_exact_windows():
    chunks = chunk_document(Document("x", "abcdefghij"), size=4, overlap=1)
    assert [(c.start, c.end) for c in chunks] == [(0, 4), (3, 7), (6, 10)]
    with pytest.raises(TransferkitError, match="overlap"):
        chunk_document(Document("x", "abc"), size=4, overlap=4)


def test_token_chunks_follow_tokenizer_offsets(tiny_encoder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder[3:])
    text = "the cat sat on the mat the dog plays guitar"  # 10 tokens
    chunks = chunk_document(Document("x", text), size=4, overlap=1, unit="tokens", tokenizer=tokenizer)
    assert [c.text for c in chunks] == ["the cat sat on", "on the mat the", "the dog plays guitar"]
    assert all(c.text == text[c.start:c.end] for c in chunks)


def test_read_documents_relative_sources_and_jsonl_records(notes):
    docs = read_documents(notes)
    assert [(d.source, d.record) for d in docs] == [("a.md", 0), ("c.jsonl", 1), ("c.jsonl", 3), ("sub/b.txt", 0)]
    assert docs[2].text == "power the market"
    topics = read_documents("pydoc-topics")
    assert len(topics) > 50 and any(d.source == "with" for d in topics)


# --- index -----------------------------------------------------------------------------------------------------
def test_index_round_trip_metadata_add_remove(notes, tmp_path, tiny_encoder):
    out = tmp_path / "idx"
    index = build_index(out, docs=notes, encoder=tiny_encoder, progress=False, chunk_size=40, chunk_overlap=10)
    assert index.sources() == ["a.md", "c.jsonl", "sub/b.txt"]
    before = index.search(["the dog plays guitar"], k=3)[0]

    loaded = VectorIndex.load(out)
    assert len(loaded) == len(index) and loaded.meta.encoder["name"] == tiny_encoder
    assert loaded.meta.preprocess_signature == index.encoder.preprocess_signature()
    after = loaded.search(["the dog plays guitar"], k=3)[0]
    assert [(h.source, h.start, h.end) for h in after] == [(h.source, h.start, h.end) for h in before]
    np.testing.assert_allclose([h.score for h in after], [h.score for h in before], atol=1e-5)
    record = next(r for r in loaded.records.values() if r["source"] == "c.jsonl" and r["record"] == 3)
    assert record["text"] == "power the market" and (record["start"], record["end"]) == (0, 16)

    extra = tmp_path / "more"
    extra.mkdir()
    (extra / "d.md").write_text("reset the power")
    (extra / "a.md").write_text("the market today")  # same source as an indexed file: replaced
    assert add_to_index(out, extra, progress=False) == 2
    grown = VectorIndex.load(out)
    assert grown.sources() == ["a.md", "c.jsonl", "d.md", "sub/b.txt"]
    assert [r["text"] for r in grown.records.values() if r["source"] == "a.md"] == ["the market today"]
    assert len(grown) == len(index) + 1

    removed = grown.remove_sources(["sub/"])
    grown.save()
    final = VectorIndex.load(out)
    assert removed >= 1 and "sub/b.txt" not in final.sources() and len(final) == len(grown)
    assert all(h.source != "sub/b.txt" for h in final.search(["the dog plays guitar"], k=10)[0])
    with pytest.raises(TransferkitError, match="no source"):
        final.remove_sources(["missing.md"])


def test_query_encoder_must_match_index(notes, tmp_path, tiny_encoder):
    from transferkit.backbones import create_backbone

    index = build_index(tmp_path / "idx", docs=notes, encoder=tiny_encoder, progress=False)
    other = create_backbone(tiny_encoder, max_length=16)  # same weights, other preprocessing
    with pytest.raises(TransferkitError, match="differs from the index's encoder"):
        index.search(["cat"], encoder=other)
    same = create_backbone(tiny_encoder)
    assert index.search(["cat"], k=1, encoder=same)[0][0].rank == 1


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_kinds_find_exact_neighbours_and_remove(kind, tiny_encoder):
    from transferkit.backbones import create_backbone

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = VectorIndex.create(create_backbone(tiny_encoder), kind=kind, ivf_nlist=4, nprobe=4)
    ids = index.add_vectors(vectors, [{"source": f"v{i}", "text": ""} for i in range(400)])
    hits = index.search_vectors(vectors[:5], k=1)
    assert [h[0].id for h in hits] == ids[:5].tolist()  # each vector finds itself
    index.remove_sources(["v0"])
    assert len(index) == 399 and index.search_vectors(vectors[:1], k=1)[0][0].id != ids[0]


# --- ask ---------------------------------------------------------------------------------------------------------
def test_sentence_windows_are_spans():
    text = "First one. Second one!\n\nThird"
    spans = sentence_windows(text, max_sentences=2)
    assert [text[s:e] for s, e in spans] == ["First one.", "First one. Second one!", "Second one!",
                                             "Second one!\n\nThird", "Third"]


def test_generated_answer_reads_citations():
    hits = [SearchHit(i, 0.9, f"doc{i}.md", f"text {i}", 0, 6) for i in (1, 2, 3)]

    class FakeLM:
        def __init__(self, reply: str) -> None:
            self.reply = reply
            self.prompt = ""

        def generate(self, prompt: str, max_new_tokens: int = 64, system: str | None = None) -> str:
            self.prompt = prompt
            return self.reply

    lm = FakeLM("Use the switch [2], see also [3] and [9].\n[1] (from doc1.md) text 1")
    answer = generated_answer(lm, "how?", hits)
    assert "[2] (from doc2.md) text 2" in lm.prompt and "Question: how?" in lm.prompt
    assert [h.source for h in answer.citations] == ["doc2.md", "doc3.md"] and answer.cited_by_model
    assert "(from doc1.md)" not in answer.answer  # an echoed passage list is cut off
    fallback = generated_answer(FakeLM("No idea."), "how?", hits)
    assert isinstance(fallback, Answer) and not fallback.cited_by_model
    assert [h.source for h in fallback.citations] == ["doc1.md"]


@pytest.fixture(scope="module")
def minilm_corpus_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = root / "docs"
    docs.mkdir()
    (docs / "router.md").write_text("Router manual. To reset the router, hold the reset button for ten seconds "
                                    "until the lights blink. The router supports WiFi 6.")
    (docs / "baking.md").write_text("Bread recipe. Mix flour, water, salt and yeast. Bake the loaf at 220 "
                                    "degrees for forty minutes.")
    (docs / "garden.txt").write_text("Tomatoes need full sun. Water the plants deeply twice a week.")
    return build_index(root / "idx", docs=docs, encoder="minilm", progress=False), root


def test_extractive_ask_cites_right_source(minilm_corpus_index):
    from transferkit.memory.ask import ask

    index, _ = minilm_corpus_index
    answer = ask(index, "How do I reset my router?", mode="extractive")
    assert answer.citations[0].source == "router.md"
    assert "hold the reset button" in answer.answer
    cited = answer.citations[0]
    text = (minilm_corpus_index[1] / "docs" / "router.md").read_text()
    assert text[cited.start:cited.end].strip() == answer.answer  # offsets point into the source file
    assert ask(index, "How long should bread bake?", mode="extractive").citations[0].source == "baking.md"


def test_cli_search_json(minilm_corpus_index, capsys):
    from transferkit.cli.main import main

    _, root = minilm_corpus_index
    assert main(["search", str(root / "idx"), "watering tomato plants", "-k", "2", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["query"] == "watering tomato plants"
    assert [set(r) for r in document["results"]] == [{"rank", "score", "source", "text", "start", "end"}] * 2
    assert document["results"][0]["source"] == "garden.txt" and document["results"][0]["rank"] == 1
    assert main(["search", str(root / "idx"), "x", "--encoder", "efficientnet_lite0"]) == 2
    assert "differs from the index's encoder" in capsys.readouterr().err


def test_image_index_finds_the_same_photo(tmp_path):
    from PIL import Image
    from skimage import data

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).resize((96, 96)).save(folder / f"{name}.png")
    index = build_index(tmp_path / "idx", images=folder, progress=False)
    query = Image.fromarray(data.coffee()).resize((80, 80))
    hits = index.search([query], k=3)[0]
    assert hits[0].source == "coffee.png" and hits[0].start is None and len(hits) == 3


def test_cli_index_build_add_remove_info(notes, tmp_path, tiny_encoder, capsys):
    from transferkit.cli.main import main

    out = str(tmp_path / "idx")
    assert main(["index", "build", "--docs", str(notes), "--backbone", tiny_encoder, "--out", out,
                 "--kind", "hnsw", "--chunk-size", "30", "--chunk-overlap", "5"]) == 0
    assert main(["index", "build", "--docs", str(notes), "--encoder", tiny_encoder, "--out", out]) == 2
    assert "already holds an index" in capsys.readouterr().err
    more = tmp_path / "more"
    more.mkdir()
    (more / "e.txt").write_text("the cat plays guitar")
    assert main(["index", "add", out, str(more)]) == 0
    assert main(["index", "remove", out, "--source", "a.md", "--source", "c.jsonl"]) == 0
    capsys.readouterr()
    assert main(["index", "info", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sources"] == ["e.txt", "sub/b.txt"] and info["kind"] == "hnsw" and info["chunk_size"] == 30
    assert main(["index", "remove", out, "--source", "nope.md"]) == 2


def test_cli_ask_extractive_json(minilm_corpus_index, capsys):
    from transferkit.cli.main import main

    _, root = minilm_corpus_index
    assert main(["ask", str(root / "idx"), "How hot should the oven be for bread?", "--mode", "extractive",
                 "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["citations"][0]["source"] == "baking.md" and "220" in document["answer"]
