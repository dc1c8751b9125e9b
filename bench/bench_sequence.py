"""Sequence-model benchmark (issue 6).

1. binary-to-decimal ("111101001010" -> "3914"): a GRU encoder-decoder trained on 70% of the 4,096 12-bit
   numbers (60% train + 10% validation), tested on the other 30% (numbers never seen); exact-match accuracy
   with Bahdanau attention and without attention (``--with-dot``: also scaled dot-product), same budget.
2. Long-range dependency: classify a sequence by its *first* token (one of 4 signal tokens, chance 25%), followed
   by ``T - 1`` random distractor tokens (4 other symbols).
   The label's only evidence is ``T - 1`` steps before the end: the Elman RNN's gradient vanishes on the way back,
   LSTM / GRU carry it. Per-time-step gradient norms ``||dL/dx_t||`` at initialisation and after training are
   plotted to ``bench/results/sequence_gradients.png``.

    .venv/bin/python -m bench.bench_sequence [--quick] [--epochs 100] [--encoders bi] [--length 40] [--batch-size 128]
        [--lr 0.01] [--dropout 0.1] [--weight-decay 0] [--threads 1] [--attention bahdanau|dot|multihead]
        [--encoder-layers 1] [--attention-heads 4] [--output-hidden 0] [--ensemble 1]

``--ensemble N`` trains N members per model with attention (seeds 0..N-1, each cached with its weights under
``bench/cache/sequence/models/``), ranks them by validation exact match, picks the ensemble of the k best with the
best validation exact match and scores only that ensemble on the test split; its train time is the sum of all N
members' (trained one after the other; ``--parallel P``: P at once, wall time measured).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bench.common import bench_command, cached, write_section

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "sequence"
RESULTS = ROOT / "results"


def _cell(name: str, compute):
    return cached(CACHE, name, compute)


# --- 1. binary-to-decimal ------------------------------------------------------------------------------------


B2D_DEFAULTS = {"batch_size": 128, "lr": 1e-2, "dropout": 0.1, "weight_decay": 0.0, "average_last": 3, "threads": 1,
                "encoder_layers": 1, "attention_heads": 4, "output_hidden": 0, "ensemble": 1, "parallel": 1}


#: Single runs of the same ``train_seq2seq`` (bidirectional GRU, Bahdanau, 60 epochs, batch 128, lr 0.01, seed 0,
#: 1 thread) with one change each, made while tuning (not re-run by this script; numbers are test exact match).
B2D_EXPLORATION = (
    "Tuning (single runs, one change each from the 60-epoch, 128-unit Bahdanau row's settings; test exact match): decimal digits "
    "emitted least significant first 0.122; learned source "
    "positions 0.933; dropout 0 0.869; dropout 0.3 0.830; weight decay 0.1 0.871; 256 units + 64-d embeddings "
    "0.526 (680 s); earlier default (batch 32, lr 5e-3, 80 epochs) 0.950 in 852 s. Most test errors are off by "
    "4-20 in the tens digit (e.g. 1381 -> 1373): the network's value of the number is slightly wrong, the same "
    "numbers fail across settings, and the run-to-run spread of single changes (0.83-0.955) is larger than any "
    "gain found. 64 units (60 epochs): 0.313 with Bahdanau attention, 0.409 without. Second session (same settings, one or two changes, 60 epochs, seed 0): 2-layer encoder + "
    "4-head scaled dot-product attention (--encoder-layers 2 --attention multihead) 0.653 (354 s, still improving "
    "at epoch 57); 4-head attention, 1 layer 0.453; 2-layer encoder with Bahdanau attention 0.411; MLP output "
    "layer of 256 units (--output-hidden 256) 0.240; learning rate 0.005 0.516. Every change that makes the "
    "model bigger or the steps smaller lands far below the default's 0.955: at this budget (about 1,200 "
    "optimiser steps) training is fragile, and the default is a good run of that fragile process rather than a "
    "stable optimum (re-run with this session's code it reproduces bit for bit: 0.9552, 105 s under lighter "
    "load; train times in the table vary with the shared machine's load). 100 instead of 60 epochs (the longer cosine schedule; selected because validation exact "
    "match rose from 0.956 to 0.963) is the current default (its Bahdanau cell was trained by the same binary_to_decimal_cell in a tuning "
    "run and cached)."
)

#: Third session's conclusions from the ``--ensemble 5`` cells (members' numbers are printed from the cache).
B2D_ENSEMBLE_NOTES = (
    "Third session (seed ensembles, checkpoint averaging; `--ensemble 5`): the default configuration trained with "
    "seeds 0-4 reaches validation exact match 0.963 / 0.763 / 0.651 / 0.605 / 0.549 (an extra seed 10: "
    "0.641, 139 s), so seed 0's 0.96 is an unusually good run, not what the recipe typically gives. Decoding with the "
    "members' mean log-probabilities lifts the weaker members (ensemble of all 5: 0.871 on validation, above 4 of "
    "its 5 members) but every ensemble stays below the best member alone, so validation selects k = 1 and the test "
    "split, scored once for that choice, gives seed 0's 0.9601 again. Checkpoint averaging of the last 3 epochs "
    "(on since the first session) lowered validation exact match for every seed (by 0.005-0.014) and was never "
    "kept. Neither closes the gap to 0.99 in 10 minutes; the seed-to-seed spread (0.55-0.96 with identical "
    "settings) is the problem to solve next, e.g. by making the optimisation itself stable."
)


def binary_to_decimal_cell(attention: str, epochs: int, hidden: int, bidirectional: bool,
                           options: dict | None = None) -> dict:
    from transferkit.sequence.seq2seq import train_seq2seq

    splits, config, train = b2d_setup(attention, epochs, hidden, bidirectional, {**B2D_DEFAULTS, **(options or {})})
    start = time.perf_counter()
    run = train_seq2seq(splits, config, train, progress=False)
    m = run.metrics
    return {"test_exact_match": m["test_exact_match"], "test_token_accuracy": m["test_token_accuracy"],
            "val_exact_match": m["val_exact_match"], "n_train": m["n_train"], "n_val": m["n_val"],
            "n_test": m["n_test"], "seconds": time.perf_counter() - start, "parameters": m["parameters"],
            "averaging": m.get("checkpoint_averaging"), "best_epoch": m["best_epoch"]}


def b2d_setup(attention: str, epochs: int, hidden: int, bidirectional: bool, options: dict, seed: int = 0):
    """The binary-to-decimal split (seed 0) and the model / engine configs of one cell."""
    from transferkit.engine import TrainConfig
    from transferkit.sequence.seq2seq import Seq2SeqConfig, binary_to_decimal_pairs, split_pairs

    splits = split_pairs(binary_to_decimal_pairs(12), 0.7, 0.1, seed=0)
    config = Seq2SeqConfig(attention=attention, hidden_size=hidden, embedding_dim=32, dropout=options["dropout"],
                           bidirectional=bidirectional, average_last=options["average_last"], beam_size=1,
                           encoder_layers=options["encoder_layers"], attention_heads=options["attention_heads"],
                           output_hidden=options["output_hidden"])
    train = TrainConfig(epochs=epochs, batch_size=options["batch_size"], lr=options["lr"],
                        weight_decay=options["weight_decay"], warmup_steps=100, early_stopping=0, grad_clip=1.0,
                        threads=options["threads"], device="cpu", seed=seed)
    return splits, config, train


def b2d_member_cell(folder: Path, attention: str, epochs: int, hidden: int, bidirectional: bool, options: dict,
                    seed: int) -> dict:
    """Train one ensemble member on train + validation only (the test split is not touched) and save it."""
    from transferkit.sequence.seq2seq import save_seq2seq, train_seq2seq

    splits, config, train = b2d_setup(attention, epochs, hidden, bidirectional, options, seed)
    start = time.perf_counter()
    run = train_seq2seq({k: v for k, v in splits.items() if k != "test"}, config, train, progress=False)
    seconds = time.perf_counter() - start
    save_seq2seq(run, folder)
    return {"seed": seed, "val_exact_match": run.metrics["val_exact_match"], "seconds": seconds,
            "best_epoch": run.metrics["best_epoch"], "averaging": run.metrics.get("checkpoint_averaging")}


def _member_job(job: tuple) -> dict:
    tag, attention, epochs, hidden, bidirectional, options, seed = job
    folder = CACHE / "models" / f"{tag}-{attention}-s{seed}"
    return _cell(f"b2d-member-{tag}-{attention}-s{seed}", lambda: b2d_member_cell(
        folder, attention, epochs, hidden, bidirectional, options, seed))


def b2d_ensemble(tag: str, attention: str, epochs: int, hidden: int, bidirectional: bool, options: dict,
                 members: int) -> dict:
    """Members with seeds 0..members-1 (each cached), ranked by their validation exact match; the ensemble of the
    k best (k <= members) with the best validation exact match (ties: the smaller k) is chosen, then scored once
    on the test split."""
    from transferkit.sequence.seq2seq import Seq2SeqEnsemble, evaluate_splits, load_seq2seq

    jobs = [(tag, attention, epochs, hidden, bidirectional, options, seed) for seed in range(members)]
    trained_now = not any((CACHE / f"b2d-member-{tag}-{attention}-s{seed}.json").is_file() for seed in range(members))
    start = time.perf_counter()
    if options.get("parallel", 1) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(options["parallel"], mp_context=multiprocessing.get_context("spawn")) as pool:
            cells = list(pool.map(_member_job, jobs))
    else:
        cells = [_member_job(job) for job in jobs]
    members_wall = time.perf_counter() - start if trained_now else None
    ranked = sorted(range(members), key=lambda seed: -cells[seed]["val_exact_match"])  # stable: ties by seed
    loaded = [load_seq2seq(CACHE / "models" / f"{tag}-{attention}-s{seed}") for seed in ranked]
    _, source, target, max_len = loaded[0]
    splits, _, _ = b2d_setup(attention, epochs, hidden, bidirectional, options)
    val = {k: evaluate_splits(Seq2SeqEnsemble([m for m, *_ in loaded[:k]]), splits, source, target, max_len,
                              names=("val",))["val_exact_match"] for k in range(1, members + 1)}
    chosen = max(val, key=lambda k: (val[k], -k))
    test = evaluate_splits(Seq2SeqEnsemble([m for m, *_ in loaded[:chosen]]), splits, source, target, max_len,
                           names=("test",))
    return {"members": cells, "val_exact_match_by_size": {str(k): v for k, v in val.items()}, "chosen": chosen,
            "chosen_seeds": ranked[:chosen],
            "test_exact_match": test["test_exact_match"], "test_token_accuracy": test["test_token_accuracy"],
            "val_exact_match": val[chosen], "seconds": sum(c["seconds"] for c in cells),
            "members_wall_seconds": members_wall, "n_train": len(splits["train"]), "n_val": len(splits["val"]), "n_test": len(splits["test"]),
            "parameters": chosen * sum(p.numel() for p in loaded[0][0].parameters())}


# --- 2. long-range dependency ------------------------------------------------------------------------------


def first_token_data(n: int, length: int, seed: int):
    """Sequences whose class is the first token (ids 1..4), followed by distractor tokens (ids 5..8)."""
    from transferkit.data.base import LabeledData

    rng = np.random.default_rng(seed)
    sequences = rng.integers(5, 9, size=(n, length))
    sequences[:, 0] = rng.integers(1, 5, size=n)
    labels = sequences[:, 0] - 1
    return LabeledData(list(sequences), labels, ["1", "2", "3", "4"], "sequence", [f"seq/{i}" for i in range(n)])


def _model(cell: str, seed: int):
    import torch

    from transferkit.backbones import create_backbone
    from transferkit.model import TaskSpec, TransferModel

    torch.manual_seed(seed)
    backbone = create_backbone(cell, pretrained=False, input_type="tokens", vocab_size=9, embedding_dim=16,
                               hidden_size=64)
    return TransferModel(backbone, [TaskSpec("label", "classify", ["1", "2", "3", "4"])])


def gradient_norms_per_step(model, data) -> list[float]:
    """Mean over items of ``||dL/de_t||`` for the embedded input ``e_t`` at every time step ``t``."""
    import torch
    import torch.nn.functional as F

    model.eval()
    batch = model.backbone.collate([model.backbone.preprocess(x) for x in data.items])
    embedded = model.backbone.embedding(batch["x"]).detach().requires_grad_(True)
    _, features = model.backbone.encode(embedded, batch["lengths"])
    loss = F.cross_entropy(model.forward_head(features).logits, torch.as_tensor(data.labels))
    (grad,) = torch.autograd.grad(loss, embedded)
    return grad.norm(dim=-1).mean(0).tolist()


def long_range_cell(cell: str, length: int, epochs: int, n_train: int) -> dict:
    from transferkit.data.loader import make_loader
    from transferkit.engine import CrossEntropyObjective, TrainConfig, Trainer

    train_data, val_data = first_token_data(n_train, length, 1), first_token_data(500, length, 2)
    test_data = first_token_data(1000, length, 3)
    model = _model(cell, seed=0)
    probe = test_data.subset(np.arange(256))
    at_init = gradient_norms_per_step(model, probe)
    config = TrainConfig(epochs=epochs, batch_size=32, lr=3e-3, weight_decay=0.0, early_stopping=0, grad_clip=1.0,
                         threads=1, device="cpu")
    start = time.perf_counter()
    result = Trainer(model, [CrossEntropyObjective()], config, progress=False).fit(
        make_loader(train_data, model.backbone, 32, train=True, seed=0),
        make_loader(val_data, model.backbone, 256, train=False))
    seconds = time.perf_counter() - start
    from transferkit.api import evaluate_model

    report = evaluate_model(model, test_data, batch_size=256)
    return {"test_accuracy": report["accuracy"], "best_epoch": result.best_epoch, "seconds": seconds,
            "grad_norms_init": at_init, "grad_norms_trained": gradient_norms_per_step(model, probe)}


def plot_gradients(cells: dict[str, dict], length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    steps = np.arange(1, length + 1)
    for ax, key, title in ((axes[0], "grad_norms_init", "at initialisation"),
                           (axes[1], "grad_norms_trained", "after training")):
        for cell, r in cells.items():
            ax.semilogy(steps, np.maximum(np.asarray(r[key]), 1e-30), label=f"{cell} (test acc {r['test_accuracy']:.2f})")
        ax.set_title(f"||dL/dx_t|| {title}")
        ax.set_xlabel("time step t (the label is the token at t = 1)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean gradient norm (log scale)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_benchmark(epochs: tuple[int, ...], hidden: tuple[int, ...], encoders: tuple[bool, ...], length: int,
                  lr_epochs: int, n_train: int, quick: bool, target: Path,
                  attentions: tuple[str, ...] = ("bahdanau", "none"), b2d_options: dict | None = None) -> str:
    o = {**B2D_DEFAULTS, **(b2d_options or {})}
    seq = {}
    for n_epochs in epochs:
        for units in hidden:
            for bidirectional in encoders:
                tag = (f"q{int(quick)}-e{n_epochs}-h{units}-b{int(bidirectional)}-bs{o['batch_size']}"
                       f"-lr{o['lr']:g}-d{o['dropout']:g}-wd{o['weight_decay']:g}-avg{o['average_last']}"
                       f"-t{o['threads']}" + (f"-l{o['encoder_layers']}" if o["encoder_layers"] > 1 else "")
                       + (f"-heads{o['attention_heads']}" if "multihead" in attentions else "")
                       + (f"-mlp{o['output_hidden']}" if o["output_hidden"] > 0 else "")
                       + (f"-p{o['parallel']}" if o["parallel"] > 1 else ""))
                encoder = "bidirectional" if bidirectional else "left-to-right"
                for att in attentions:
                    if o["ensemble"] > 1 and att != "none":  # the model without attention stays single
                        seq[(n_epochs, units, encoder, att)] = _cell(
                            f"b2d-ensemble{o['ensemble']}-{tag}-{att}", lambda a=att, b=bidirectional, e=n_epochs,
                            h=units, t=tag: b2d_ensemble(t, a, e, h, b, o, o["ensemble"]))
                        continue
                    seq[(n_epochs, units, encoder, att)] = _cell(
                        f"b2d-{tag}-{att}", lambda a=att, b=bidirectional, e=n_epochs, h=units:
                        binary_to_decimal_cell(a, e, h, b, o))
    first = next(iter(seq.values()))
    heads = f", {o['attention_heads']} attention heads" if "multihead" in attentions else ""
    mlp = f", MLP output layer of {o['output_hidden']} units" if o["output_hidden"] > 0 else ""
    lines = [f"### binary-to-decimal\n\n{first['n_train']} train + {first['n_val']} validation numbers (70% of "
             f"4,096), {first['n_test']} unseen test numbers; {o['encoder_layers']}-layer GRU encoder (units per "
             f"direction below) + GRU decoder{heads}{mlp}, symbol embeddings 32, batch {o['batch_size']}, AdamW {o['lr']:g} (weight decay "
             f"{o['weight_decay']:g}) with 100 warm-up steps and cosine decay, gradient clipping 1.0, teacher "
             f"forcing, dropout {o['dropout']:g}, last-{o['average_last']} checkpoint averaging (kept when it "
             "validates at least as well), model of the best validation epoch otherwise, greedy decoding"
             + (f" with the mean log-probabilities of an ensemble of the k <= {o['ensemble']} best of "
                f"{o['ensemble']} such models (seeds 0..{o['ensemble'] - 1}, ranked by validation exact match; k "
                "chosen on validation exact match, the test split scored once)" if o["ensemble"] > 1 else "")
             + ", "
             f"{o['threads']} thread(s) (OMP_NUM_THREADS={o['threads']}); train time includes the per-epoch "
             "validation decoding.", "",
             "| epochs | hidden | encoder | attention | test exact match | test token accuracy | parameters | "
             "train time (s) |", "|---|---|---|---|---|---|---|---|"]
    for (n_epochs, units, encoder, att), r in seq.items():
        label = f"{att} (ensemble of {r['chosen']})" if "chosen" in r else att
        lines.append(f"| {n_epochs} | {units} | {encoder} | {label} | {r['test_exact_match']:.4f} | "
                     f"{r['test_token_accuracy']:.4f} | {r['parameters']:,} | {r['seconds']:.0f} |")
    best = max((r for key, r in seq.items() if key[-1] != "none"), key=lambda r: r["test_exact_match"])
    best_seconds = best.get("members_wall_seconds") or best["seconds"]  # measured wall time if run in parallel
    reached = best["test_exact_match"] >= 0.99 and best_seconds <= 600
    kind = attentions[0]
    pairs = [f"{e} epochs, {h} units, {enc}: {seq[(e, h, enc, kind)]['test_exact_match']:.4f} vs "
             f"{seq[(e, h, enc, 'none')]['test_exact_match']:.4f}"
             for e, h, enc in dict.fromkeys(key[:3] for key in seq)
             if (e, h, enc, kind) in seq and (e, h, enc, "none") in seq]
    lines += ["", f"Exact match with {kind} attention vs none: {'; '.join(pairs)}. Target of issue 6 (>= 0.99 "
              f"exact match with attention, <= 10 minutes on 2 cores): {'reached' if reached else 'NOT reached'} "
              f"(best with attention: {best['test_exact_match']:.4f} in {best_seconds:.0f} s).", ""]

    if o["ensemble"] > 1:
        lines.append("The model without attention is a single model (seed 0), not an ensemble.")
        for (n_epochs, units, _encoder, att), r in seq.items():
            if "chosen" not in r:
                continue
            members = ", ".join(f"seed {c['seed']} {c['val_exact_match']:.3f} (best epoch {c['best_epoch']}, "
                                f"{c['seconds']:.0f} s)" for c in r["members"])
            averaged = ", ".join(f"{c['averaging']['val_exact_match_best']:.3f} -> "
                                 f"{c['averaging']['val_exact_match_averaged']:.3f}"
                                 for c in r["members"] if c.get("averaging"))
            by_size = ", ".join(f"{k}: {v:.4f}" for k, v in r["val_exact_match_by_size"].items())
            lines.append(f"Ensemble, {att}, {n_epochs} epochs, {units} units: members' validation exact match "
                         f"{members}; checkpoint averaging of the last {o['average_last']} epochs, validation exact "
                         f"match best epoch -> averaged, per member: {averaged or 'off'}; validation exact match of "
                         f"the ensemble of the k best members {by_size}; "
                         f"chosen k = {r['chosen']} (seeds {', '.join(map(str, r['chosen_seeds']))}; train time "
                         f"above = all {len(r['members'])} members' sum (all are needed for the choice), trained one "
                         f"after the other on {o['threads']} thread(s)"
                         + (f"; wall time of training all {len(r['members'])} in {o['parallel']} processes at once: "
                            f"{r['members_wall_seconds']:.0f} s" if o["parallel"] > 1 and r["members_wall_seconds"]
                            else "") + ").")
        lines.append("")
    lines += [B2D_EXPLORATION, "", *([B2D_ENSEMBLE_NOTES, ""] if o["ensemble"] > 1 and not quick else [])]

    cells = {cell: _cell(f"longrange-q{int(quick)}-T{length}-e{lr_epochs}-n{n_train}-{cell}",
                         lambda c=cell: long_range_cell(c, length, lr_epochs, n_train))
             for cell in ("rnn", "lstm", "gru")}
    image = target / "sequence_gradients.png"
    plot_gradients(cells, length, image)
    lines += [f"### Long-range dependency\n\nClass = the first token (4 signal symbols, chance 0.25), then {length - 1} "
              "random distractors (4 other symbols); "
              f"{n_train} training sequences, 1,000 test; 1 layer, 64 units, {lr_epochs} epochs, AdamW 3e-3, "
              "gradient clipping 1.0.", "",
              "| cell | test accuracy | gradient norm at t=1 / t=T (init) | gradient norm at t=1 / t=T (trained) | "
              "train time (s) |", "|---|---|---|---|---|"]
    for cell, r in cells.items():
        ratio_init = r["grad_norms_init"][0] / max(r["grad_norms_init"][-1], 1e-30)
        ratio_trained = r["grad_norms_trained"][0] / max(r["grad_norms_trained"][-1], 1e-30)
        lines.append(f"| {cell} | {r['test_accuracy']:.4f} | {ratio_init:.2e} | {ratio_trained:.2e} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "LSTM forget-gate and GRU update-gate biases start at 1 (keep the state); with PyTorch's default "
              "initialisation (gate bias about 0) the GRU stayed at chance (0.24) with the same budget in an earlier "
              "run.", "", f"![gradient norms per time step]({image.name})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 epochs, short sequences")
    parser.add_argument("--epochs", default="100", help="binary-to-decimal epochs (comma-separated settings)")
    parser.add_argument("--hidden", default="128", help="GRU units per direction (comma-separated settings)")
    parser.add_argument("--encoders", default="bi", help="encoders to train: bi and/or uni (left to right), e.g. bi,uni")
    parser.add_argument("--length", type=int, default=40, help="long-range task: sequence length")
    parser.add_argument("--long-range-epochs", type=int, default=15)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--attention", default="bahdanau", choices=("bahdanau", "dot", "multihead"),
                        help="binary-to-decimal attention compared with none")
    parser.add_argument("--with-dot", action="store_true", help="also train the scaled dot-product attention model")
    parser.add_argument("--encoder-layers", type=int, default=B2D_DEFAULTS["encoder_layers"])
    parser.add_argument("--attention-heads", type=int, default=B2D_DEFAULTS["attention_heads"])
    parser.add_argument("--output-hidden", type=int, default=B2D_DEFAULTS["output_hidden"],
                        help="MLP output layer units (0: linear)")
    parser.add_argument("--batch-size", type=int, default=B2D_DEFAULTS["batch_size"], help="binary-to-decimal batch")
    parser.add_argument("--lr", type=float, default=B2D_DEFAULTS["lr"], help="binary-to-decimal peak learning rate")
    parser.add_argument("--dropout", type=float, default=B2D_DEFAULTS["dropout"])
    parser.add_argument("--weight-decay", type=float, default=B2D_DEFAULTS["weight_decay"])
    parser.add_argument("--average-last", type=int, default=B2D_DEFAULTS["average_last"])
    parser.add_argument("--threads", type=int, default=B2D_DEFAULTS["threads"], help="torch threads per cell")
    parser.add_argument("--ensemble", type=int, default=B2D_DEFAULTS["ensemble"],
                        help="binary-to-decimal: N members (seeds 0..N-1) per model with attention; the ensemble of "
                             "the k best (by validation) decoded with their mean log-probabilities, k chosen on "
                             "validation exact match")
    parser.add_argument("--parallel", type=int, default=B2D_DEFAULTS["parallel"],
                        help="train the ensemble members in P processes at once (each with --threads threads); the "
                             "members' wall time is measured")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFERKIT_PROGRESS", "0")
    target = RESULTS / "quick" if args.quick else RESULTS
    if args.quick:
        settings = dict(epochs=(2,), hidden=(32,), encoders=(False,), length=12, lr_epochs=2, n_train=300)
    else:
        encoders = tuple(dict.fromkeys(e.strip() == "bi" for e in args.encoders.split(",") if e.strip()))
        epochs = tuple(int(e) for e in args.epochs.split(",") if e.strip())
        hidden = tuple(int(h) for h in args.hidden.split(",") if h.strip())
        settings = dict(epochs=epochs, hidden=hidden, encoders=encoders, length=args.length,
                        lr_epochs=args.long_range_epochs, n_train=args.n_train)
    start = time.perf_counter()
    attentions = tuple(dict.fromkeys((args.attention, *(("dot",) if args.with_dot or args.quick else ()), "none")))
    b2d_options = {"batch_size": args.batch_size, "lr": args.lr, "dropout": args.dropout,
                   "weight_decay": args.weight_decay, "average_last": args.average_last, "threads": args.threads,
                   "encoder_layers": args.encoder_layers, "attention_heads": args.attention_heads,
                   "output_hidden": args.output_hidden, "ensemble": args.ensemble, "parallel": args.parallel}
    body = run_benchmark(**settings, quick=args.quick, target=target, attentions=attentions, b2d_options=b2d_options)
    write_section(target / "sequence.md", "Sequence models (issue 6)", bench_command("bench.bench_sequence", argv),
                  start, body)


if __name__ == "__main__":
    main()
