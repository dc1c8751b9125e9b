"""Memory: chunking boundaries, index persistence, add/remove, metadata, encoder mismatch, approximate kinds,
the CLI (text and image search --json), and ``ask`` (extractive cites the right source; generate cites the
LM's most likely passage)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from transferkit.errors import TransferkitError
from transferkit.memory.ask import (
    CITATION_PREFIX,
    generated_answer,
    overlap_passage,
    passage_number_tokens,
    read_citations,
    sentence_windows,
    trim_echo,
)
from transferkit.memory.chunking import Document, chunk_document, read_documents
from transferkit.memory.index import SearchHit, VectorIndex, add_to_index, build_index

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "guitar", "plays", "market", "today", "reset", "device", "power"]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    """``hf:<folder>``: a tiny random BERT with a hand-written vocabulary (fast, offline)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]  # vocab_file= gives an empty vocabulary
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocabulary)}).save_pretrained(folder)
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



@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_read_documents_decodes_as_the_other_text_readers_decode(tmp_path, encoding):
    """Documents were read as UTF-8 with replacement characters: a UTF-16 note became mojibake and a .jsonl saved
    with a BOM failed on its first line; they are decoded as every text reader decodes them."""
    (tmp_path / "note.md").write_bytes("le café est ouvert".encode(encoding))
    (tmp_path / "rows.jsonl").write_bytes((json.dumps({"text": "déjà vu"}, ensure_ascii=False) + "\n").encode(encoding))
    assert [(d.source, d.text) for d in read_documents(tmp_path)] == [("note.md", "le café est ouvert"),
                                                                      ("rows.jsonl", "déjà vu")]


# --- index -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("retrieval", ["dense", "lexical", "hybrid"])
def test_search_takes_one_string_as_one_query(notes, tmp_path, tiny_encoder, retrieval):
    """``search("a string")`` ran one query per character; one str is one query (as ``as_inputs`` rules for
    predict): the result is the list of one query's hits, as for ``search(["a string"])``."""
    index = build_index(tmp_path / "idx", docs=notes, encoder=tiny_encoder, progress=False, chunk_size=40,
                        chunk_overlap=10)
    one = index.search("the dog plays guitar", k=2, retrieval=retrieval)
    listed = index.search(["the dog plays guitar"], k=2, retrieval=retrieval)
    assert len(one) == 1 and [(h.source, h.start) for h in one[0]] == [(h.source, h.start) for h in listed[0]]
    with pytest.raises(TransferkitError, match="cannot search"):
        index.search(["the dog", 3], k=2, retrieval=retrieval)


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
    assert add_to_index(out, extra, progress=False) == 1
    (notes / "a.md").write_text("the market today")  # the same file again: its source is replaced
    assert add_to_index(out, notes / "a.md", progress=False) == 1
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


def test_tied_scores_come_back_in_id_order_whatever_the_store(tiny_encoder):
    """Duplicate passages have identical vectors: their tie is broken by id, also at the k-th place, so FAISS and
    Milvus give the same `search --json` order (canonical_order)."""
    from transferkit.backbones import create_backbone
    from transferkit.memory.index import canonical_order

    scores = np.array([[0.9, 0.5, 0.5, 0.4, -3.4e38], [0.7, 0.7 + 1e-8, 0.7, 0.1, 0.0]], np.float32)
    ids = np.array([[3, 9, 2, 5, -1], [8, 1, 4, 0, 6]])
    kept_scores, kept_ids = canonical_order(scores, ids, 4)
    assert kept_ids.tolist() == [[3, 2, 9, 5], [1, 4, 8, 0]]
    assert kept_scores[0].tolist() == pytest.approx([0.9, 0.5, 0.5, 0.4])

    rng = np.random.default_rng(0)
    unique = rng.normal(size=(6, 16)).astype(np.float32)
    unique /= np.linalg.norm(unique, axis=1, keepdims=True)
    vectors = np.concatenate([unique, unique[::-1]])  # every vector twice: ids i and 11 - i hold the same vector
    index = VectorIndex.create(create_backbone(tiny_encoder))
    index.add_vectors(vectors, [{"source": f"v{i}", "text": ""} for i in range(12)])
    for q in range(6):
        hits = index.search_vectors(unique[q:q + 1], k=1)[0]  # two equal best scores: the smaller id wins
        assert [h.id for h in hits] == [min(q, 11 - q)]


# --- ask ---------------------------------------------------------------------------------------------------------
def test_sentence_windows_are_spans():
    text = "First one. Second one!\n\nThird"
    spans = sentence_windows(text, max_sentences=2)
    assert [text[s:e] for s, e in spans] == ["First one.", "First one. Second one!", "Second one!",
                                             "Second one!\n\nThird", "Third"]


def test_extractive_answer_never_offers_a_sentence_cut_by_the_chunking(tmp_path, tiny_encoder):
    """A chunk starting inside a sentence ("an assert statement when optimization is requested." of "... emits no
    code for an assert statement when ...") or ending inside one offers only its whole sentences as answers; a
    chunk at the start of its source, or starting right after a sentence end, keeps its first sentence."""
    from transferkit.memory.ask import extractive_answer

    sentences = ["The dog plays guitar on the mat today.", "The cat never plays guitar on the mat today.",
                 "Reset the device power on the market today.", "The market sat on the device today."]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text(" ".join(sentences * 3))
    index = build_index(tmp_path / "idx", docs=docs, encoder=tiny_encoder, progress=False, chunk_size=70,
                        chunk_overlap=25)
    assert any(r["start"] and r["text"][0] != r["text"][0].upper() for r in index.records.values())  # cut chunks
    whole = set(sentences) | {f"{a} {b}" for a, b in zip(sentences, sentences[1:] + sentences[:1])}
    for question in ["the cat plays guitar", "reset the device power", "the market sat", "dog today"]:
        hits = index.search(question, k=4)[0]
        for hit in hits:  # each chunk alone: whatever it offers is whole sentences
            assert extractive_answer(index, question, [hit]).answer in whole | {hit.text.strip()}
    first = min(index.records, key=lambda i: index.records[i]["start"])
    record = index.records[first]
    hit = SearchHit(1, 1.0, record["source"], record["text"], record["start"], record["end"], first)
    assert extractive_answer(index, "the dog plays guitar", [hit]).answer.startswith("The dog plays guitar")


def test_read_citations_and_overlap_passage():
    hits = [SearchHit(1, 0.9, "a.md", "hold the reset button", 0, 5), SearchHit(2, 0.8, "b.md", "bake bread", 0, 5)]
    assert [h.source for h in read_citations("see [2], then [1] and [2] and [7]", hits)] == ["b.md", "a.md"]
    assert overlap_passage("You bake the bread.", hits).source == "b.md"
    assert overlap_passage("Hold the button to reset.", hits).source == "a.md"
    assert overlap_passage("nothing shared", hits) is None
    assert trim_echo("According to passage [1], hold it.\n\nQuestion: what else?") == "According to passage [1], hold it."
    assert trim_echo("Bake it [2].\n[1] (from a.md) hold the reset button") == "Bake it [2]."


@pytest.fixture(scope="module")
def tiny_chat_lm():
    """A tiny random Llama whose word-level tokenizer spells the passage numbers 1-3 as single tokens."""
    from types import SimpleNamespace

    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    words = ["according", "to", "passage", "[", "]", ",", "1", "2", "3", "the", "reset", "router", "question",
             "answer", "passages", "from", ":", "(", ")", "."]
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocabulary)})
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=5 + len(words), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
                                         eos_token_id=3))
    return SimpleNamespace(tokenizer=tokenizer, model=model)


def test_generated_answer_cites_the_models_most_likely_passage(tiny_chat_lm):
    from transferkit.memory.ask import build_rag_prompt, chat_prefix

    hits = [SearchHit(i, 0.9, f"doc{i}.md", f"the router {i}", 0, 6) for i in (1, 2, 3)]
    answer = generated_answer(tiny_chat_lm, "reset the router?", hits, max_new_tokens=5)
    assert answer.answer.startswith(CITATION_PREFIX) and answer.mode == "generate"
    # the cited passage is the argmax of the next-token probability over the tokens "1", "2", "3"
    tokenizer = tiny_chat_lm.tokenizer
    text = chat_prefix(tiny_chat_lm, build_rag_prompt("reset the router?", hits)) + CITATION_PREFIX
    with torch.no_grad():
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        logits = tiny_chat_lm.model(input_ids=ids).logits[0, -1]
    best = int(logits[passage_number_tokens(tokenizer, 3)].argmax())
    assert answer.citations[0] is hits[best]
    with pytest.raises(TransferkitError, match="single tokens"):
        passage_number_tokens(tokenizer, 4)  # "4" is not in the vocabulary


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
    assert [set(r) for r in document["results"]] == [{"rank", "score", "source", "text", "start", "end", "ranks", "scores"}] * 2
    assert document["results"][0]["source"] == "garden.txt" and document["results"][0]["rank"] == 1
    assert main(["search", str(root / "idx"), "x", "--encoder", "efficientnet_lite0"]) == 2
    assert "differs from the index's encoder" in capsys.readouterr().err


def test_cli_similar_image_search(tmp_path, capsys):
    from PIL import Image
    from skimage import data

    from transferkit.cli.main import main

    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for name in ("coffee", "chelsea", "rocket", "astronaut", "horse"):
        Image.fromarray(getattr(data, name)()).convert("RGB").resize((64, 64)).save(folder / f"{name}.jpg")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "more" / f"noise{i}.png")
    out = str(tmp_path / "idx")
    assert main(["index", "build", "--images", str(folder), "--encoder", "efficientnet_lite0", "--out", out]) == 0
    capsys.readouterr()
    assert main(["search", out, "--image", str(folder / "chelsea.jpg"), "-k", "6", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["query"] == str(folder / "chelsea.jpg")
    results = document["results"]
    assert [set(r) for r in results] == [{"rank", "score", "source", "text", "start", "end", "ranks", "scores"}] * 6
    assert results[0]["source"] == "chelsea.jpg" and results[0]["score"] > 0.999  # the identical image first
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5, 6]
    assert all(a["score"] >= b["score"] for a, b in zip(results, results[1:]))
    assert {r["source"] for r in results} <= {f"{n}.jpg" for n in ("coffee", "chelsea", "rocket", "astronaut",
                                                                  "horse")} | {"more/noise0.png", "more/noise1.png"}
    query = tmp_path / "coffee-small.png"
    Image.fromarray(data.coffee()).resize((40, 40)).save(query)
    assert main(["search", out, "--image", str(query), "-k", "6"]) == 0  # table output, resized query
    assert capsys.readouterr().out.splitlines()[2].split()[2] == "coffee.jpg"
    assert main(["search", out, "a text query"]) == 2  # an image index needs --image
    assert main(["search", out, "--image", str(query), "--retrieval", "hybrid"]) == 2  # no text to match


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


def test_index_add_from_another_folder_never_replaces_a_source_of_the_same_name(notes, tmp_path, tiny_encoder,
                                                                                capsys):
    """`index add IDX ./b` replaced the indexed a.md (or x.png) of ./notes with ./b's a.md, silently: sources are
    relative to the folder given. Adding a folder again still replaces its changed files; a same-named file of
    another folder is refused in one line (nothing added), naming it and the folder it came from."""
    from transferkit.cli.main import main

    out = str(tmp_path / "idx")
    assert main(["index", "build", "--docs", str(notes), "--encoder", tiny_encoder, "--out", out]) == 0
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "a.md").write_text("the market today")
    (other / "sub" / "b.txt").write_text("reset the device")
    (other / "new.md").write_text("power the mat")
    capsys.readouterr()
    assert main(["index", "add", out, str(other)]) == 2
    err = capsys.readouterr().err
    assert "a.md, sub/b.txt" in err and str(notes.resolve()) in err and "index remove" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    index = VectorIndex.load(out)
    assert index.sources() == ["a.md", "c.jsonl", "sub/b.txt"]
    assert [r["text"] for r in index.records.values() if r["source"] == "a.md"] == ["the cat sat on the mat"]
    with pytest.raises(TransferkitError, match="from another folder"):
        add_to_index(out, other / "a.md", progress=False)
    assert main(["index", "remove", out, "--source", "a.md", "--source", "sub/"]) == 0  # the documented way
    assert main(["index", "add", out, str(other)]) == 0
    assert [r["text"] for r in VectorIndex.load(out).records.values() if r["source"] == "a.md"] == ["the market today"]
    (other / "a.md").write_text("the dog sat today")  # the same folder again: its changed file is replaced
    assert main(["index", "add", out, str(other)]) == 0
    assert [r["text"] for r in VectorIndex.load(out).records.values() if r["source"] == "a.md"] == ["the dog sat today"]

    from PIL import Image  # images: the same rule
    for folder, value in (("a", 0), ("b", 255)):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (32, 32), (value, value, value)).save(tmp_path / folder / "x.png")
    images = str(tmp_path / "images-idx")
    assert main(["index", "build", "--images", str(tmp_path / "a"), "--encoder", "small_cnn", "--out", images]) == 0
    capsys.readouterr()
    assert main(["index", "add", images, str(tmp_path / "b")]) == 2
    assert "x.png" in capsys.readouterr().err and len(VectorIndex.load(images)) == 1
    assert main(["index", "add", images, str(tmp_path / "a" / "x.png")]) == 0  # the same file: replaced


def test_cli_ask_extractive_json(minilm_corpus_index, capsys):
    from transferkit.cli.main import main

    _, root = minilm_corpus_index
    assert main(["ask", str(root / "idx"), "How hot should the oven be for bread?", "--mode", "extractive",
                 "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["citations"][0]["source"] == "baking.md" and "220" in document["answer"]


# --- hybrid retrieval ----------------------------------------------------------------------------------------------
def test_fusion_arithmetic():
    from transferkit.memory.retrieval import min_max, reciprocal_rank_fusion, weighted_fusion

    rankings = {"dense": {1: (1, 0.9), 2: (2, 0.5), 3: (3, 0.1)}, "lexical": {3: (1, 8.0), 4: (2, 2.0)}}
    rrf = reciprocal_rank_fusion(rankings)
    assert rrf == pytest.approx({1: 1 / 61, 2: 1 / 62, 3: 1 / 63 + 1 / 61, 4: 1 / 62})
    assert min_max(rankings["dense"]) == pytest.approx({1: 1.0, 2: 0.5, 3: 0.0})
    weighted = weighted_fusion(rankings, {"dense": 0.5, "lexical": 0.5})
    assert weighted == pytest.approx({1: 0.5, 2: 0.25, 3: 0.5, 4: 0.0})


@pytest.fixture
def disagreeing_index(tiny_encoder, monkeypatch):
    """Four chunks whose dense order (hand-made vectors, query = e0) is a, b, c, d while only c shares a word with
    the query "zeta": dense and lexical disagree."""
    from transferkit.backbones import create_backbone
    from transferkit.memory import index as index_module

    index = VectorIndex.create(create_backbone(tiny_encoder))
    cosines = {"a.md": 0.9, "b.md": 0.8, "c.md": 0.1, "d.md": 0.0}
    texts = {"a.md": "alpha beta", "b.md": "gamma delta", "c.md": "zeta epsilon", "d.md": "omega"}
    vectors = []
    for i, cosine in enumerate(cosines.values()):
        v = np.zeros(16, np.float32)
        v[0], v[1 + i] = cosine, np.sqrt(1 - cosine ** 2)
        vectors.append(v)
    index.add_vectors(np.stack(vectors), [{"source": s, "text": texts[s], "start": 0, "end": len(texts[s])}
                                          for s in cosines])
    query = np.zeros((1, 16), np.float32)
    query[0, 0] = 1.0
    monkeypatch.setattr(index_module, "embed", lambda encoder, items, *a, **k: np.repeat(query, len(items), 0))
    return index


def test_hybrid_fusion_where_dense_and_lexical_disagree(disagreeing_index):
    from transferkit.memory.retrieval import RetrievalConfig

    index = disagreeing_index

    def order(**settings):
        return [h.source for h in index.search(["zeta"], k=4, retrieval=RetrievalConfig(**settings))[0]]

    assert order(retrieval="dense") == ["a.md", "b.md", "c.md", "d.md"]
    assert order(retrieval="lexical") == ["c.md"]  # chunks sharing no word are not lexical hits
    assert order(retrieval="hybrid", fusion="rrf") == ["c.md", "a.md", "b.md", "d.md"]  # 1/63 + 1/61 > 1/61
    # weighted: c = 0.5 * 0.1 / 0.9 + 0.5 * 1 = 0.556 > a = 0.5 > b = 0.444 > d = 0
    assert order(retrieval="hybrid", fusion="weighted") == ["c.md", "a.md", "b.md", "d.md"]
    assert order(retrieval="hybrid", fusion="weighted", dense_weight=0.9)[0] == "a.md"  # 0.9 > 0.1 + 0.9 * 0.111
    hits = index.search(["zeta"], k=2, retrieval=RetrievalConfig("hybrid", fusion="weighted"))[0]
    first = hits[0].to_json()
    assert first["ranks"] == {"dense": 3, "lexical": 1}
    assert first["scores"]["dense"] == pytest.approx(0.1, abs=1e-5) and first["scores"]["lexical"] > 0
    assert first["score"] == pytest.approx(0.5 * 0.1 / 0.9 + 0.5, abs=1e-5)
    assert hits[1].to_json()["ranks"] == {"dense": 1, "lexical": None}


def test_rerank_with_a_tiny_random_cross_encoder(disagreeing_index, tmp_path):
    from sentence_transformers import CrossEncoder
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from transferkit.memory.retrieval import RetrievalConfig

    words = ["alpha", "beta", "gamma", "delta", "zeta", "epsilon", "omega"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
                      ).save_pretrained(tmp_path / "ce")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=32, num_labels=1)
                                  ).save_pretrained(tmp_path / "ce")
    texts = {h.source: h.text for h in disagreeing_index.search(["zeta"], k=4, retrieval="dense")[0]}
    expected = CrossEncoder(str(tmp_path / "ce")).predict([("zeta", t) for t in texts.values()])
    config = RetrievalConfig("hybrid", rerank=f"hf:{tmp_path / 'ce'}")
    hits = disagreeing_index.search(["zeta"], k=4, retrieval=config)[0]
    assert [h.source for h in hits] == [list(texts)[i] for i in np.argsort(-expected, kind="stable")]
    np.testing.assert_allclose([h.score for h in hits], np.sort(expected)[::-1], rtol=1e-5, atol=1e-6)
    assert [h.ranks["rerank"] for h in hits] == [1, 2, 3, 4] and {"dense", "lexical"} <= set(hits[0].ranks)
    with pytest.raises(TransferkitError, match="cannot load the cross-encoder"):
        disagreeing_index.search(["zeta"], retrieval=RetrievalConfig("hybrid", rerank=f"hf:{tmp_path / 'none'}"))


def test_add_and_remove_keep_lexical_and_vector_sides_in_step(notes, tmp_path, tiny_encoder, capsys):
    from transferkit.cli.main import main
    from transferkit.memory import storage

    out = tmp_path / "idx"
    assert main(["index", "build", "--docs", str(notes), "--encoder", tiny_encoder, "--out", str(out)]) == 0
    more = tmp_path / "more"
    more.mkdir()
    (more / "e.txt").write_text("the market plays guitar today")

    def sides() -> tuple[VectorIndex, set[int]]:
        index = VectorIndex.load(out)
        assert index._lexical is not None  # stored with the vectors, not rebuilt
        assert any(name.startswith("lexical/") for name in storage.read_pointer(out)["sha256"])
        return index, set(index.lexical.ids.tolist())

    assert main(["index", "add", str(out), str(more)]) == 0
    index, lexical_ids = sides()
    assert lexical_ids == set(index.records)
    capsys.readouterr()
    assert main(["search", str(out), "market", "--retrieval", "lexical", "--json"]) == 0
    assert {r["source"] for r in json.loads(capsys.readouterr().out)["results"]} == {"c.jsonl", "e.txt"}
    assert main(["index", "remove", str(out), "--source", "e.txt"]) == 0
    index, lexical_ids = sides()
    assert lexical_ids == set(index.records) and "e.txt" not in index.sources()
    capsys.readouterr()
    assert main(["search", str(out), "market", "--retrieval", "lexical", "--json"]) == 0
    assert [r["source"] for r in json.loads(capsys.readouterr().out)["results"]] == ["c.jsonl"]


def test_unknown_retrieval_or_fusion_exits_2(minilm_corpus_index, capsys):
    from transferkit.cli.main import main

    _, root = minilm_corpus_index
    for flags, message in ((["--retrieval", "sparse"], "unknown retrieval 'sparse'"),
                           (["--fusion", "max"], "unknown fusion 'max'"),
                           (["--dense-weight", "2"], "invalid dense weight"),
                           (["--rerank", "cohere"], "unknown re-ranker")):
        assert main(["search", str(root / "idx"), "bread", *flags]) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in line]
        assert len(err) == 1 and message in err[0]
    assert main(["ask", str(root / "idx"), "bread?", "--mode", "extractive", "--retrieval", "sparse"]) == 2
    assert main(["ask", str(root / "idx"), "How hot should the oven be for bread?", "--mode", "extractive",
                 "--retrieval", "lexical", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["citations"][0]["source"] == "baking.md"
