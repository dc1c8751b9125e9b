"""Sequence models: the NumPy LSTM gradient check, backbone shapes and masking, encoder-decoder with attention,
greedy and beam decoding, label smoothing, checkpoint averaging and the character language model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import interrupt_seq2seq_train, interrupt_seq2seq_validation
from transferkit.backbones import create_backbone
from transferkit.backbones.base import check_layer_groups
from transferkit.errors import TransferkitError
from transferkit.sequence.numpy_lstm import lstm_step_backward, lstm_step_forward
from transferkit.sequence.seq2seq import (
    Attention,
    Seq2Seq,
    Vocabulary,
    binary_to_decimal_pairs,
    collate_pairs,
    split_pairs,
)
from transferkit.sequence.training import SequenceCrossEntropy, average_state_dicts


def test_numpy_lstm_step_gradients_match_torch_autograd() -> None:
    rng = np.random.default_rng(0)
    n, d, h = 3, 4, 5
    x, h_prev, c_prev = rng.normal(size=(n, d)), rng.normal(size=(n, h)), rng.normal(size=(n, h))
    wx, wh, b = rng.normal(size=(d, 4 * h)) * 0.5, rng.normal(size=(h, 4 * h)) * 0.5, rng.normal(size=4 * h) * 0.1
    dh_next, dc_next = rng.normal(size=(n, h)), rng.normal(size=(n, h))
    h_np, c_np, cache = lstm_step_forward(x, h_prev, c_prev, wx, wh, b)
    grads = lstm_step_backward(dh_next, dc_next, cache)

    t = {k: torch.tensor(v, requires_grad=True) for k, v in
         {"x": x, "h_prev": h_prev, "c_prev": c_prev, "Wx": wx, "Wh": wh, "b": b}.items()}
    a = t["x"] @ t["Wx"] + t["h_prev"] @ t["Wh"] + t["b"]
    i, f, o, g = torch.sigmoid(a[:, :h]), torch.sigmoid(a[:, h:2 * h]), torch.sigmoid(a[:, 2 * h:3 * h]), \
        torch.tanh(a[:, 3 * h:])
    c = f * t["c_prev"] + i * g
    h_t = o * torch.tanh(c)
    ((h_t * torch.tensor(dh_next)).sum() + (c * torch.tensor(dc_next)).sum()).backward()
    np.testing.assert_allclose(h_np, h_t.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(c_np, c.detach().numpy(), atol=1e-12)
    for name, tensor in t.items():
        np.testing.assert_allclose(grads[name], tensor.grad.numpy(), atol=1e-10, err_msg=name)

    # and the forward pass equals torch's own LSTM cell (gate order i, f, g, o; transposed weights)
    cell = torch.nn.LSTMCell(d, h).double()
    reorder = np.concatenate([np.arange(0, h), np.arange(h, 2 * h), np.arange(3 * h, 4 * h), np.arange(2 * h, 3 * h)])
    with torch.no_grad():
        cell.weight_ih.copy_(torch.tensor(wx[:, reorder].T))
        cell.weight_hh.copy_(torch.tensor(wh[:, reorder].T))
        cell.bias_ih.copy_(torch.tensor(b[reorder]))
        cell.bias_hh.zero_()
        h_torch, c_torch = cell(torch.tensor(x), (torch.tensor(h_prev), torch.tensor(c_prev)))
    np.testing.assert_allclose(h_np, h_torch.numpy(), atol=1e-12)
    np.testing.assert_allclose(c_np, c_torch.numpy(), atol=1e-12)


@pytest.mark.parametrize("cell,bidirectional,layers,expected_dim", [
    ("rnn", False, 1, 16), ("lstm", True, 2, 32), ("gru", True, 3, 32), ("transformer", False, 2, 16)])
def test_sequence_backbones_shapes_and_padding_masks(cell, bidirectional, layers, expected_dim) -> None:
    torch.manual_seed(0)
    backbone = create_backbone(cell, pretrained=False, input_type="chars", vocab="abcd", embedding_dim=8,
                               hidden_size=16, num_layers=layers, bidirectional=bidirectional, num_heads=2)
    check_layer_groups(backbone)
    backbone.eval()
    assert backbone.feature_dim == expected_dim and backbone.modality == "sequence"
    batch = backbone.collate([backbone.preprocess(s) for s in ["abcdab", "ca", "dddd"]])
    assert batch["x"].shape == (3, 6) and batch["lengths"].tolist() == [6, 2, 4]
    features = backbone.forward_features(batch)
    outputs, mask = backbone.forward_sequence(batch)
    assert features.shape == (3, expected_dim) and outputs.shape == (3, 6, expected_dim)
    assert mask.tolist()[1] == [True, True, False, False, False, False]
    alone = backbone.forward_features(backbone.collate([backbone.preprocess("ca")]))
    torch.testing.assert_close(features[1], alone[0], atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_numeric_and_token_inputs_and_learned_positions() -> None:
    series = create_backbone("gru", pretrained=False, input_type="numeric", input_dim=2, hidden_size=8)
    batch = series.collate([series.preprocess(np.zeros((5, 2))), series.preprocess(np.ones((3, 2)))])
    assert series.forward_features(batch).shape == (2, 8)
    tokens = create_backbone("transformer", pretrained=False, input_type="tokens", vocab_size=10, hidden_size=8,
                             num_heads=2, positions="learned", max_len=16)
    assert tokens.forward_features(tokens.collate([tokens.preprocess([3, 4, 5])])).shape == (1, 8)
    with pytest.raises(TransferkitError):
        create_backbone("lstm", pretrained=False, input_type="tokens")  # no vocab_size
    with pytest.raises(TransferkitError):
        create_backbone("lstm", pretrained=False, input_type="chars", vocab="ab", colour="red")


def test_transfer_model_over_a_sequence_backbone_round_trips(tmp_path) -> None:
    from transferkit.model import TaskSpec, TransferModel, load_model, save_model

    backbone = create_backbone("lstm", pretrained=False, input_type="chars", vocab="ab", hidden_size=8)
    model = TransferModel(backbone, [TaskSpec("label", "classify", ["x", "y"])]).eval()
    save_model(model, tmp_path / "m", {"name": "finetune", "options": {}})
    loaded, _ = load_model(tmp_path / "m")
    batch = backbone.collate([backbone.preprocess("abba")])
    torch.testing.assert_close(loaded(batch).logits, model(batch).logits)


@pytest.mark.parametrize("kind", ["bahdanau", "dot", "multihead"])
def test_attention_ignores_padding_and_sums_to_one(kind) -> None:
    torch.manual_seed(0)
    attention = Attention(kind, 6, 4)
    memory = torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    context, weights = attention(torch.randn(2, 6), attention.keys(memory), memory, mask)
    assert context.shape == (2, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    assert (weights[1, 2:] == 0).all()


def test_multihead_attention_concatenates_independent_heads() -> None:
    torch.manual_seed(0)
    attention = Attention("multihead", 6, 4, heads=2)
    memory, query = torch.randn(2, 5, 4), torch.randn(2, 6)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    context, weights = attention(query, attention.keys(memory), memory, mask)
    q, k, v = attention.query(query), attention.key(memory), attention.value(memory)
    for head in range(2):  # head j: softmax(q_j . k_j / sqrt(d / heads)) over valid positions, reading v_j
        part = slice(3 * head, 3 * head + 3)
        scores = torch.einsum("bd,bsd->bs", q[:, part], k[..., part]) / 3**0.5
        w = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
        torch.testing.assert_close(context[:, 2 * head:2 * head + 2],
                                   torch.einsum("bs,bsd->bd", w, v[..., 2 * head:2 * head + 2]))
    assert (weights[1, 3:] == 0).all()
    with pytest.raises(TransferkitError, match="heads"):
        Attention("multihead", 6, 4, heads=3)


def test_stacked_encoder_summarises_the_top_layer() -> None:
    torch.manual_seed(0)
    model = Seq2Seq(5, 13, embedding_dim=8, hidden_size=6, attention="multihead", dropout=0.0, encoder_layers=2,
                    attention_heads=2).eval()
    assert model.encoder.num_layers == 2
    batch = collate_pairs([([3, 4, 4, 3], [5, 6], 0), ([4, 3], [7, 8, 9], 1)])
    state, _ = model.encode(batch["src"], batch["src_lengths"])
    # top layer: the forward state after the last real symbol, the backward state at the first symbol
    torch.testing.assert_close(state.summary[1, :6], state.memory[1, 1, :6])
    torch.testing.assert_close(state.summary[:, 6:], state.memory[:, 0, 6:])
    assert model(batch["src"], batch["src_lengths"], batch["tgt_in"]).shape == (2, 4, 13)


def test_mlp_output_layer() -> None:
    torch.manual_seed(0)
    model = Seq2Seq(5, 13, embedding_dim=8, hidden_size=6, dropout=0.0, output_hidden=10).eval()
    assert isinstance(model.output, torch.nn.Sequential) and model.output[0].out_features == 10
    batch = collate_pairs([([3, 4, 4, 3], [5, 6], 0)])
    logits = model(batch["src"], batch["src_lengths"], batch["tgt_in"])
    with torch.no_grad():
        model.output[-1].weight.zero_()
    torch.testing.assert_close(model(batch["src"], batch["src_lengths"], batch["tgt_in"]),
                               model.output[-1].bias.expand_as(logits))  # logits come from the MLP's last layer
    from transferkit.sequence.seq2seq import Seq2SeqConfig

    with pytest.raises(TransferkitError):
        Seq2SeqConfig(output_hidden=-1).validate()


def _tiny_seq2seq(attention: str) -> tuple[Seq2Seq, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Seq2Seq(5, 13, embedding_dim=8, hidden_size=12, attention=attention, dropout=0.0).eval()
    batch = collate_pairs([([3, 4, 4, 3], [5, 6], 0), ([4, 3], [7, 8, 9], 1)])
    return model, batch


@pytest.mark.parametrize("attention", ["none", "bahdanau", "dot", "multihead"])
def test_seq2seq_shapes_masking_and_decoding(attention) -> None:
    model, batch = _tiny_seq2seq(attention)
    logits = model(batch["src"], batch["src_lengths"], batch["tgt_in"])
    assert logits.shape == (2, 4, 13)
    alone = collate_pairs([([4, 3], [7, 8, 9], 0)])
    torch.testing.assert_close(model(alone["src"], alone["src_lengths"], alone["tgt_in"])[0], logits[1, :4],
                               atol=1e-5, rtol=1e-5)
    greedy = model.greedy(batch["src"], batch["src_lengths"], max_len=6)
    assert greedy.shape[0] == 2 and greedy.shape[1] <= 6
    beam1 = model.beam_search(batch["src"], batch["src_lengths"], max_len=6, beam_size=1)
    for row, hypothesis in zip(greedy.tolist(), beam1):  # beam width 1 is greedy decoding
        expected = row[: row.index(Vocabulary.EOS)] if Vocabulary.EOS in row else row
        assert hypothesis == expected
    beam4 = model.beam_search(batch["src"], batch["src_lengths"], max_len=6, beam_size=4)
    assert len(beam4) == 2 and all(len(h) <= 6 for h in beam4)


def test_seq2seq_source_positions_shift_the_encoding_and_bound_the_length() -> None:
    torch.manual_seed(0)
    model = Seq2Seq(5, 13, embedding_dim=8, hidden_size=16, attention="bahdanau", dropout=0.0, max_source_len=4)
    model.eval()
    batch = collate_pairs([([3, 4, 4, 3], [5, 6], 0)])
    with_positions = model(batch["src"], batch["src_lengths"], batch["tgt_in"])
    with torch.no_grad():
        model.src_positions.weight.zero_()  # zero positions: the plain symbol embedding
    assert not torch.allclose(with_positions, model(batch["src"], batch["src_lengths"], batch["tgt_in"]))
    too_long = collate_pairs([([3, 4, 4, 3, 3], [5], 0)])
    with pytest.raises(TransferkitError, match="longer"):
        model(too_long["src"], too_long["src_lengths"], too_long["tgt_in"])


def test_vocabulary_and_binary_to_decimal_split() -> None:
    pairs = binary_to_decimal_pairs(12)
    assert len(pairs) == 4096 and ("111101001010", "3914") in pairs
    splits = split_pairs(pairs, 0.7, 0.1, seed=0)
    seen = {s for s, _ in splits["train"] + splits["val"]}
    assert len(seen) == round(0.7 * 4096) and not seen & {s for s, _ in splits["test"]}
    vocab = Vocabulary.from_texts(["3914", "15"])
    assert vocab.decode(vocab.encode("3914") + [Vocabulary.EOS, 5]) == "3914"
    with pytest.raises(TransferkitError):
        vocab.encode("3a")


def test_label_smoothed_token_cross_entropy_by_hand() -> None:
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[2, 0]])  # the second position is padding (id 0) and ignored
    log_p = torch.log_softmax(logits[0, 0], -1)
    eps = 0.1
    expected = -((1 - eps) * log_p[2] + eps / 3 * log_p.sum())
    value = SequenceCrossEntropy("t", label_smoothing=eps)(None, {"t": targets}, logits)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_checkpoint_averaging() -> None:
    states = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}, {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(2)}]
    averaged = average_state_dicts(states)
    torch.testing.assert_close(averaged["w"], torch.tensor([2.0, 4.0]))
    assert int(averaged["n"]) == 2


def _exact_match(run, pairs: list[tuple[str, str]]) -> float:
    """Share of ``pairs`` whose whole output ``translate`` gets right (the metric, recomputed independently)."""
    from transferkit.sequence.seq2seq import translate

    outputs = translate(run.model, run.source, run.target, [s for s, _ in pairs], run.max_output_len)
    return float(np.mean([out == target for out, (_, target) in zip(outputs, pairs)]))


def test_train_seq2seq_through_the_engine_and_save_load(tmp_path) -> None:
    from transferkit.engine import TrainConfig
    from transferkit.sequence.seq2seq import (
        Seq2SeqConfig,
        load_seq2seq,
        save_seq2seq,
        train_seq2seq,
        translate,
    )

    splits = split_pairs(binary_to_decimal_pairs(6), 0.8, 0.2, seed=0)
    config = Seq2SeqConfig(attention="dot", embedding_dim=8, hidden_size=24, dropout=0.0, average_last=2,
                           label_smoothing=0.05)
    train = TrainConfig(epochs=4, batch_size=8, lr=0.01, early_stopping=0, device="cpu", threads=1)
    run = train_seq2seq(splits, config, train, progress=False)
    losses = [row["train_loss"] for row in run.history]
    assert losses[-1] < losses[0] * 0.8
    assert "checkpoint_averaging" in run.metrics
    assert run.metrics["test_exact_match"] == pytest.approx(_exact_match(run, splits["test"]))
    save_seq2seq(run, tmp_path / "model")
    model, source, target, max_len = load_seq2seq(tmp_path)
    texts = [s for s, _ in splits["test"][:5]]
    assert translate(model, source, target, texts, max_len) == translate(run.model, run.source, run.target, texts,
                                                                         max_len)


def test_char_language_model_trains_with_truncated_bptt_and_samples(tmp_path) -> None:
    from transferkit.engine import TrainConfig
    from transferkit.sequence.charlm import (
        CharLMConfig,
        TruncatedBPTT,
        load_charlm,
        sample,
        save_charlm,
        train_charlm,
    )

    text = "hello world. " * 300
    config = CharLMConfig(cell="lstm", embedding_dim=8, hidden_size=32, num_layers=1, dropout=0.0, bptt=20)
    train = TrainConfig(epochs=3, batch_size=8, lr=0.02, early_stopping=0, device="cpu", threads=1,
                        schedule="constant")
    run = train_charlm(text, config, train, progress=False)
    assert run.metrics["val_bits_per_character"] < math.log2(len(run.vocab.symbols)) / 2  # far below uniform
    generated = sample(run.model, run.vocab, length=24, prime="hello", temperature=0.5, seed=1)
    assert generated.startswith("hello") and len(generated) == 29
    assert "world" in generated
    save_charlm(run, tmp_path / "model")
    model, vocab = load_charlm(tmp_path)
    assert sample(model, vocab, 24, "hello", 0.5, seed=1) == generated
    # the carried state is detached (gradients stop at the window) and reset at a new epoch
    forward = TruncatedBPTT()
    batch = {"inputs": torch.tensor([[3, 4]]), "index": torch.tensor([0])}
    forward(run.model, batch)
    assert all(not s.requires_grad for s in forward.state)


def test_cli_charlm_and_seq2seq_run_folders_and_bad_input(tmp_path, capsys) -> None:
    from transferkit.cli.main import main

    text_file = tmp_path / "text.txt"
    text_file.write_text("the cat sat on the mat. " * 80, encoding="utf-8")
    out = tmp_path / "lm"
    common = ["--epochs", "1", "--hidden-size", "16", "--embedding-dim", "8", "--batch-size", "4", "--no-progress"]
    assert main(["charlm", "train", str(text_file), "--out", str(out), "--num-layers", "1", "--bptt", "10",
                 *common]) == 0
    assert (out / "model" / "config.json").is_file() and (out / "history.jsonl").is_file()
    assert not (tmp_path / ".lm.partial").exists()
    capsys.readouterr()
    assert main(["charlm", "sample", "--model", str(out), "--length", "20", "--prime", "the "]) == 0
    assert capsys.readouterr().out.startswith("the ")
    assert main(["charlm", "sample", "--model", str(out), "--temperature", "0"]) == 2
    assert main(["charlm", "train", str(text_file), "--out", str(out), *common]) == 2  # finished run, no --overwrite
    assert main(["charlm", "train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x")]) == 2

    b2d = tmp_path / "b2d"
    assert main(["seq2seq", "train", "--task", "binary-to-decimal", "--bits", "6", "--out", str(b2d),
                 "--attention", "dot", *common]) == 0
    metrics = __import__("json").loads((b2d / "metrics.json").read_text())
    assert metrics["n_test"] == 64 - round(0.7 * 64)
    capsys.readouterr()
    assert main(["seq2seq", "predict", "--model", str(b2d), "101", "110", "--beam-size", "2"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert main(["seq2seq", "predict", "--model", str(b2d), "12"]) == 2  # '2' is not a binary symbol
    assert main(["seq2seq", "predict", "--model", str(b2d), "1010101"]) == 2  # 7 digits for a 6-bit model
    assert "6-bit" in capsys.readouterr().err
    from transferkit.cli.sequence import pad_binary

    assert pad_binary("101", 6) == "000101" and pad_binary("111101001010", 12) == "111101001010"
    assert main(["seq2seq", "train", "--pairs", str(tmp_path / "none.tsv"), "--out", str(tmp_path / "p")]) == 2


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_keep_gates_start_open(cell) -> None:
    backbone = create_backbone(cell, pretrained=False, input_type="tokens", vocab_size=5, hidden_size=4)
    layer = backbone.layers[0]  # LSTM forget gate / GRU update gate: the second chunk of the biases
    assert torch.all(layer.bias_ih_l0[4:8] + layer.bias_hh_l0[4:8] == 1.0)


def test_ensemble_averages_the_members_log_probabilities() -> None:
    from transferkit.sequence.seq2seq import Seq2SeqEnsemble

    first, batch = _tiny_seq2seq("bahdanau")
    torch.manual_seed(1)
    second = Seq2Seq(5, 13, embedding_dim=8, hidden_size=12, attention="none", dropout=0.0).eval()
    ensemble = Seq2SeqEnsemble([first, second]).eval()
    src, lengths, tgt_in = batch["src"], batch["src_lengths"], batch["tgt_in"]
    by_hand = (torch.log_softmax(first(src, lengths, tgt_in), -1) + torch.log_softmax(second(src, lengths, tgt_in), -1)) / 2
    torch.testing.assert_close(ensemble(src, lengths, tgt_in), by_hand)
    # greedy decoding by hand: each step the argmax of the mean log-probabilities, fed to both members
    (state_a, h_a), (state_b, h_b) = first.encode(src, lengths), second.encode(src, lengths)
    previous, expected = torch.full((2,), Vocabulary.BOS), []
    with torch.no_grad():
        for _ in range(5):
            logits_a, h_a, _ = first.step(previous, h_a, state_a)
            logits_b, h_b, _ = second.step(previous, h_b, state_b)
            previous = ((torch.log_softmax(logits_a, -1) + torch.log_softmax(logits_b, -1)) / 2).argmax(-1)
            expected.append(previous)
    decoded = ensemble.greedy(src, lengths, max_len=5)
    assert torch.equal(decoded, torch.stack(expected, 1)[:, : decoded.shape[1]])
    torch.testing.assert_close(Seq2SeqEnsemble([first]).greedy(src, lengths, 5), first.greedy(src, lengths, 5))
    with pytest.raises(TransferkitError, match="beam"):
        ensemble.beam_search(src, lengths, 5, 3)


def test_train_seq2seq_ensemble_and_save_load(tmp_path) -> None:
    from transferkit.engine import TrainConfig
    from transferkit.sequence.seq2seq import (
        Seq2SeqConfig,
        Seq2SeqEnsemble,
        load_seq2seq,
        save_seq2seq,
        train_seq2seq,
        translate,
    )

    splits = split_pairs(binary_to_decimal_pairs(5), 0.8, 0.2, seed=0)
    config = Seq2SeqConfig(attention="bahdanau", embedding_dim=8, hidden_size=16, dropout=0.0, ensemble=2)
    train = TrainConfig(epochs=2, batch_size=8, lr=0.01, early_stopping=0, device="cpu", threads=1, seed=3)
    run = train_seq2seq(splits, config, train, progress=False)
    assert isinstance(run.model, Seq2SeqEnsemble) and len(run.model.members) == 2
    assert [m["seed"] for m in run.metrics["members"]] == [3, 4]
    assert run.metrics["test_exact_match"] == pytest.approx(_exact_match(run, splits["test"]))
    first, second = run.model.members  # different seeds: different members
    assert not torch.equal(first.src_embedding.weight, second.src_embedding.weight)
    save_seq2seq(run, tmp_path / "model")
    model, source, target, max_len = load_seq2seq(tmp_path)
    assert isinstance(model, Seq2SeqEnsemble)
    texts = [s for s, _ in splits["test"][:5]]
    assert translate(model, source, target, texts, max_len) == translate(run.model, run.source, run.target, texts,
                                                                         max_len)
    with pytest.raises(TransferkitError, match="ensemble"):
        Seq2SeqConfig(ensemble=2, beam_size=3).validate()


def test_cli_seq2seq_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch, capsys) -> None:
    from transferkit.cli.main import main

    args = interrupt_seq2seq_train(tmp_path, monkeypatch, epochs=3)
    out = tmp_path / "b2d"
    stage = tmp_path / ".b2d.partial"
    assert (stage / "checkpoint" / "trainer.safetensors").is_file() and not out.exists()
    assert main(args) == 2  # an interrupted run is neither discarded nor silently restarted
    assert main([*args, "--resume", "--lr", "0.5"]) == 2  # other options: refused
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "resuming from the checkpoint after epoch 1" in capsys.readouterr().err
    history = (out / "history.jsonl").read_text().splitlines()
    assert len(history) == 3 and not stage.exists()


def test_python_api_writes_seq2seq_and_charlm_run_folders(tmp_path) -> None:
    from transferkit.rundir import is_output
    from transferkit.sequence.runs import fit_charlm, fit_seq2seq
    from transferkit.sequence.seq2seq import translate

    small = {"epochs": 2, "hidden_size": 8, "embedding_dim": 4, "batch_size": 8}
    run = fit_seq2seq(tmp_path / "b2d", task="binary-to-decimal", bits=5, progress=False, **small)
    assert is_output(run.path, "seq2seq") and len(run.history) == 2
    assert run.metrics["config"]["train"]["weight_decay"] == 1.0  # the command's defaults, as on the CLI
    model, source, target, max_len = run.load()
    saved = json.loads((run.path / "metrics.json").read_text())
    assert saved["test_exact_match"] == run.metrics["test_exact_match"] == run.accuracy
    assert len(translate(model, source, target, ["10101"], max_len)) == 1
    with pytest.raises(TransferkitError, match="unknown option"):
        fit_seq2seq(tmp_path / "x", task="binary-to-decimal", colour="red")
    with pytest.raises(TransferkitError, match="already holds a finished seq2seq"):
        fit_seq2seq(run.path, task="binary-to-decimal", bits=5, progress=False, **small)

    (tmp_path / "book.txt").write_text("the quick brown fox jumps over the lazy dog. " * 20)
    lm = fit_charlm(tmp_path / "lm", tmp_path / "book.txt", epochs=1, hidden_size=8, embedding_dim=4,
                    num_layers=1, bptt=16, batch_size=4, progress=False)
    lm_model, vocab = lm.load()
    assert is_output(lm.path, "charlm") and "q" in vocab.symbols and lm.accuracy == lm.metrics["val_accuracy"]
    with pytest.raises(TransferkitError, match="holds a transferkit seq2seq output, not a charlm"):
        fit_charlm(run.path, tmp_path / "book.txt", overwrite=True)


def test_resumed_seq2seq_averages_the_same_epochs_as_an_uninterrupted_run(tmp_path, monkeypatch) -> None:
    """The checkpoint-averaging snapshots are part of the engine checkpoint (a resume used to start them empty)."""
    import transferkit.sequence.seq2seq as seq2seq
    from transferkit.engine import TrainConfig
    from transferkit.sequence.seq2seq import Seq2SeqConfig, train_seq2seq

    splits = split_pairs(binary_to_decimal_pairs(5), 0.8, 0.2, seed=0)
    config = Seq2SeqConfig(attention="bahdanau", embedding_dim=4, hidden_size=8, dropout=0.0, average_last=3)
    train = TrainConfig(epochs=4, batch_size=8, lr=0.01, early_stopping=0, device="cpu", threads=1, seed=1)
    reference = train_seq2seq(splits, config, train, progress=False)

    original = interrupt_seq2seq_validation(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_seq2seq(splits, config, train, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(seq2seq, "seq2seq_metrics", original)
    resumed = train_seq2seq(splits, config, train, checkpoint_dir=tmp_path, progress=False)
    assert resumed.metrics["checkpoint_averaging"] == reference.metrics["checkpoint_averaging"]
    assert resumed.metrics["checkpoint_averaging"]["epochs"] == 3
    for a, b in zip(reference.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_of_charlm_and_seq2seq_pairs_refuses_changed_data(tmp_path, monkeypatch) -> None:
    """An interrupted charlm / seq2seq-pairs run records its data's content: resuming on an edited file (same
    path, same symbols) is refused in one line naming the file; the file as it was resumes."""
    import transferkit.sequence.charlm as charlm
    from transferkit.sequence.runs import fit_charlm, fit_seq2seq

    book = tmp_path / "book.txt"
    book.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    small = {"epochs": 1, "hidden_size": 8, "embedding_dim": 4, "num_layers": 1, "bptt": 16, "batch_size": 4,
             "progress": False}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    original = charlm.save_charlm
    monkeypatch.setattr(charlm, "save_charlm", interrupted)  # after the first epoch's checkpoint
    with pytest.raises(KeyboardInterrupt):
        fit_charlm(tmp_path / "lm", book, **small)
    monkeypatch.setattr(charlm, "save_charlm", original)
    book.write_text("the lazy dog jumps over the quick brown fox. " * 20)  # same symbols, other text
    with pytest.raises(TransferkitError, match=r"the data changed since .* \(the content of '.*book\.txt' differs"):
        fit_charlm(tmp_path / "lm", book, resume=True, **small)
    book.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    assert fit_charlm(tmp_path / "lm", book, resume=True, **small).path.is_dir()

    pairs = tmp_path / "pairs.tsv"
    rows = [f"{n:05b}\t{n}" for n in range(32)]
    pairs.write_text("\n".join(rows) + "\n")
    interrupt_seq2seq_validation(monkeypatch, 2)
    options = {"epochs": 3, "hidden_size": 8, "embedding_dim": 4, "batch_size": 8, "progress": False}
    with pytest.raises(KeyboardInterrupt):
        fit_seq2seq(tmp_path / "p", pairs=pairs, **options)
    pairs.write_text("\n".join(rows[:-1] + ["11111\t13"]) + "\n")  # one target changed
    with pytest.raises(TransferkitError, match=r"the data changed since .* \(the content of '.*pairs\.tsv' differs"):
        fit_seq2seq(tmp_path / "p", pairs=pairs, resume=True, **options)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_seq2seq_pairs_are_decoded_as_every_text_file(tmp_path, encoding) -> None:
    """read_pairs decodes like data.text.decode_text: UTF-16 with its BOM (was an internal UnicodeDecodeError)
    and UTF-8 with a BOM (the BOM became a source symbol)."""
    from transferkit.sequence.runs import read_pairs

    rows = [(f"{n:04b}", str(n)) for n in range(12)]
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{s}\t{t}\n" for s, t in rows), encoding=encoding)
    assert read_pairs(path) == rows


def test_binary_training_files_are_refused_in_one_line(tmp_path, capsys) -> None:
    """A binary file given to charlm train, seq2seq train --pairs or fit --task causal-lm is refused in one line
    (the same check for all three), not trained on as control bytes; a folder is named as a folder."""
    from transferkit.cli.main import main
    from transferkit.sequence.runs import read_pairs, read_text
    from transferkit.tasks.causal_lm import read_passages

    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 20)
    for read in (read_text, read_pairs, read_passages):
        with pytest.raises(TransferkitError, match=r"'.*blob\.txt' is not a text file \(binary content"):
            read(binary)
    with pytest.raises(TransferkitError, match="is a folder, not a text file"):
        read_pairs(tmp_path)
    assert main(["charlm", "train", str(binary), "--out", str(tmp_path / "lm")]) == 2
    assert main(["seq2seq", "train", "--pairs", str(binary), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("binary content" in line for line in err)
    assert not (tmp_path / "lm").exists() and not (tmp_path / "p").exists()
