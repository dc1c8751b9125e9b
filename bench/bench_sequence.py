"""Sequence-model benchmark (issue 6).

1. binary-to-decimal ("111101001010" -> "3914"): a GRU encoder-decoder trained on 70% of the 4,096 12-bit
   numbers (60% train + 10% validation), tested on the other 30% (numbers never seen); exact-match accuracy
   with Bahdanau attention and without attention (``--with-dot``: also scaled dot-product), same budget.
2. Long-range dependency: classify a sequence by its *first* token (one of 4 signal tokens, chance 25%), followed
   by ``T - 1`` random distractor tokens (4 other symbols).
   The label's only evidence is ``T - 1`` steps before the end: the Elman RNN's gradient vanishes on the way back,
   LSTM / GRU carry it. Per-time-step gradient norms ``||dL/dx_t||`` at initialisation and after training are
   plotted to ``bench/results/sequence_gradients.png``.

    .venv/bin/python -m bench.bench_sequence [--quick] [--epochs 120] [--encoders bi] [--length 40]
        [--batch-size 128] [--lr 0.01] [--dropout 0.1] [--weight-decay 1[,0.5,0,...]] [--seeds 5] [--parallel 2]
        [--threads 1] [--attention bahdanau|dot|multihead] [--encoder-layers 1] [--attention-heads 4]
        [--output-hidden 0] [--ensemble 1]

``--seeds N`` trains every binary-to-decimal row with seeds 0..N-1 and reports each seed's test exact match (the
target must hold for the worst seed, not a lucky one); ``--weight-decay 1,0.5,0`` adds rows with other weight decays
beside the recipe (the first value). ``--ensemble N`` instead trains N members per model with attention (seeds
0..N-1, each cached with its weights under ``bench/cache/sequence/models/``), ranks them by validation exact match,
picks the ensemble of the k best with the best validation exact match and scores only that ensemble on the test
split. ``--parallel P`` trains P models at once (each with ``--threads`` threads).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bench.common import bench_command, cached, run_jobs, write_section

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "sequence"
RESULTS = ROOT / "results"


def _cell(name: str, compute):
    return cached(CACHE, name, compute)


# --- 1. binary-to-decimal ------------------------------------------------------------------------------------


B2D_DEFAULTS = {"batch_size": 128, "lr": 1e-2, "dropout": 0.1, "weight_decay": 1.0, "average_last": 0, "threads": 1,
                "encoder_layers": 1, "attention_heads": 4, "output_hidden": 0, "ensemble": 1, "parallel": 2}


#: How the recipe was found (earlier sessions' single runs of the same ``train_seq2seq``; test exact match).
B2D_HISTORY = (
    "How the recipe was found: with weight decay 0 (the first three sessions) this model reached 0.96 with "
    "Bahdanau attention for seed 0 but validation exact match 0.96 / 0.76 / 0.65 / 0.61 / 0.55 for seeds 0-4 "
    "(100 epochs), while its training loss fell to about 0.004: it memorised the 2,457 training numbers and "
    "generalised by luck (test errors were off by 4-20 in the tens digit, an imprecise value of the number). "
    "Wider (256 units), deeper (2-layer encoder), multi-head attention, an MLP output layer, learned source "
    "positions, other dropout, lower learning rates, reversed output digits, seed ensembles and last-k checkpoint "
    "averaging did not fix that (single-seed comparisons, each below the lucky 0.96). Strong decoupled weight "
    "decay did: AdamW weight decay on the weight matrices (not on biases) pulls the network towards a small-norm "
    "solution that computes the conversion instead of storing the examples, as in the grokking experiments on "
    "algorithmic tasks (Power et al. 2022); a weight decay of 0.1 (0.871 at 60 epochs, one seed) had been too "
    "weak to show it. The rows above compare weight decays with everything else equal. With weight decay the "
    "model without attention converts 12-bit numbers as well as the one with it (12 bits fit the decoder's "
    "initial state); without weight decay attention is what lifts exact match from about 0.5 (every seed "
    "without attention) to 0.56-0.96. 1.0 was chosen over 0.5 "
    "because at 0.5 two of five seeds with attention stayed below 0.99 on validation (0.900, 0.985; 1.0 was "
    "tried on those two seeds first, then trained for all five). The validation numbers alone motivate the change "
    "(the test numbers of those runs were seen too: 0.881, 0.973)."
)

#: Third session's conclusions from the ``--ensemble 5`` cells (members' numbers are printed from the cache).
B2D_ENSEMBLE_NOTES = (
    "Seed ensembles (`--ensemble N`): decoding with the members' mean log-probabilities lifts weak members, but "
    "with weight decay 0 no ensemble of the five seeds beat the best member alone on validation."
)


def binary_to_decimal_cell(attention: str, epochs: int, hidden: int, bidirectional: bool,
                           options: dict | None = None, seed: int = 0) -> dict:
    from transferkit.sequence.seq2seq import train_seq2seq

    splits, config, train = b2d_setup(attention, epochs, hidden, bidirectional, {**B2D_DEFAULTS, **(options or {})},
                                      seed)
    start = time.perf_counter()
    run = train_seq2seq(splits, config, train, progress=False)
    m = run.metrics
    return {"seed": seed, "test_exact_match": m["test_exact_match"], "test_token_accuracy": m["test_token_accuracy"],
            "val_exact_match": m["val_exact_match"], "n_train": m["n_train"], "n_val": m["n_val"],
            "n_test": m["n_test"], "seconds": time.perf_counter() - start, "parameters": m["parameters"],
            "averaging": m.get("checkpoint_averaging"), "best_epoch": m["best_epoch"]}


def _seed_job(job: tuple) -> dict:
    tag, attention, epochs, hidden, bidirectional, options, seed = job
    suffix = f"-s{seed}" if seed else ""  # seed 0 keeps the name of the earlier single-seed cells
    return _cell(f"b2d-{tag}-{attention}{suffix}", lambda: binary_to_decimal_cell(
        attention, epochs, hidden, bidirectional, options, seed))


def b2d_seeds(tag: str, attention: str, epochs: int, hidden: int, bidirectional: bool, options: dict,
              seeds: int) -> dict:
    """One model per seed ``0..seeds-1`` (same split), each scored on the test split: the recipe's spread."""
    cells = run_jobs(_seed_job, [(tag, attention, epochs, hidden, bidirectional, options, seed)
                                  for seed in range(seeds)], options.get("parallel", 1))
    exact = [c["test_exact_match"] for c in cells]
    return {"runs": cells, "test_exact_match": exact[0], "mean": float(np.mean(exact)), "min": min(exact),
            "max": max(exact), "token_accuracy": float(np.mean([c["test_token_accuracy"] for c in cells])),
            "seconds": cells[0]["seconds"], "max_seconds": max(c["seconds"] for c in cells),
            "parameters": cells[0]["parameters"], "n_train": cells[0]["n_train"], "n_val": cells[0]["n_val"],
            "n_test": cells[0]["n_test"]}


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
    cells = run_jobs(_member_job, jobs, options.get("parallel", 1))
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
                  attentions: tuple[str, ...] = ("bahdanau", "none"), b2d_options: dict | None = None,
                  weight_decays: tuple[float, ...] = (B2D_DEFAULTS["weight_decay"],), seeds: int = 1) -> str:
    base = {**B2D_DEFAULTS, **(b2d_options or {})}
    seq = {}
    for wd in weight_decays:
        o = {**base, "weight_decay": wd}
        for n_epochs in epochs:
            for units in hidden:
                for bidirectional in encoders:
                    tag = (f"q{int(quick)}-e{n_epochs}-h{units}-b{int(bidirectional)}-bs{o['batch_size']}"
                           f"-lr{o['lr']:g}-d{o['dropout']:g}-wd{o['weight_decay']:g}-avg{o['average_last']}"
                           f"-t{o['threads']}" + (f"-l{o['encoder_layers']}" if o["encoder_layers"] > 1 else "")
                           + (f"-heads{o['attention_heads']}" if "multihead" in attentions else "")
                           + (f"-mlp{o['output_hidden']}" if o["output_hidden"] > 0 else "")
                           + (f"-p{o['parallel']}" if o["parallel"] > 1 and o["ensemble"] > 1 else ""))
                    encoder = "bidirectional" if bidirectional else "left-to-right"
                    for att in attentions:
                        if att == "dot" != attentions[0] and wd != weight_decays[0]:
                            continue  # --with-dot: the extra attention is trained with the recipe only
                        key = (wd, n_epochs, units, encoder, att)
                        if o["ensemble"] > 1 and att != "none":  # the model without attention stays single
                            seq[key] = _cell(
                                f"b2d-ensemble{o['ensemble']}-{tag}-{att}", lambda a=att, b=bidirectional,
                                e=n_epochs, h=units, t=tag, o=o: b2d_ensemble(t, a, e, h, b, o, o["ensemble"]))
                        else:
                            seq[key] = b2d_seeds(tag, att, n_epochs, units, bidirectional, o, seeds)
    first = next(iter(seq.values()))
    o = base
    heads = f", {o['attention_heads']} attention heads" if "multihead" in attentions else ""
    mlp = f", MLP output layer of {o['output_hidden']} units" if o["output_hidden"] > 0 else ""
    averaging = (f"last-{o['average_last']} checkpoint averaging (kept when it validates at least as well), "
                 "model of the best validation epoch otherwise" if o["average_last"] > 1
                 else "model of the best validation epoch")
    lines = [f"### binary-to-decimal\n\n{first['n_train']} train + {first['n_val']} validation numbers (70% of "
             f"4,096), {first['n_test']} unseen test numbers; {o['encoder_layers']}-layer GRU encoder (units per "
             f"direction below) + GRU decoder{heads}{mlp}, symbol embeddings 32, batch {o['batch_size']}, AdamW "
             f"{o['lr']:g} (decoupled weight decay as below, on weight matrices only) with 100 warm-up steps and "
             f"cosine decay, gradient clipping 1.0, teacher forcing, dropout {o['dropout']:g}, {averaging} (selected "
             "on validation exact match), greedy decoding"
             + (f" with the mean log-probabilities of an ensemble of the k <= {o['ensemble']} best of "
                f"{o['ensemble']} such models (seeds 0..{o['ensemble'] - 1}, ranked by validation exact match; k "
                "chosen on validation exact match, the test split scored once)" if o["ensemble"] > 1 else "")
             + f"; {seeds} seed(s) per row (seeds 0..{seeds - 1}: initialisation and batch order; the split is "
             f"fixed), each trained on {o['threads']} thread(s) (OMP_NUM_THREADS={o['threads']}), "
             f"{o['parallel']} model(s) at once on the shared cores; train time per model includes the per-epoch "
             "validation decoding and grows with the machine's load.", "",
             "| weight decay | epochs | hidden | encoder | attention | test exact match, seed 0 | per seed | mean | "
             "min | test token accuracy (mean) | parameters | train time per model (s, seed 0 / max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (wd, n_epochs, units, encoder, att), r in seq.items():
        if "chosen" in r:
            lines.append(f"| {wd:g} | {n_epochs} | {units} | {encoder} | {att} (ensemble of {r['chosen']}) | "
                         f"{r['test_exact_match']:.4f} | | | | {r['test_token_accuracy']:.4f} | "
                         f"{r['parameters']:,} | {r['seconds']:.0f} (all members) |")
            continue
        per_seed = " / ".join(f"{c['test_exact_match']:.3f}" for c in r["runs"])
        lines.append(f"| {wd:g} | {n_epochs} | {units} | {encoder} | {att} | {r['test_exact_match']:.4f} | "
                     f"{per_seed} | {r['mean']:.4f} | {r['min']:.4f} | {r['token_accuracy']:.4f} | "
                     f"{r['parameters']:,} | {r['seconds']:.0f} / {r['max_seconds']:.0f} |")
    main_wd = weight_decays[0]
    attended = [(key, r) for key, r in seq.items() if key[0] == main_wd and key[-1] == attentions[0]]
    key, best = max(attended, key=lambda kr: kr[1]["test_exact_match"])
    best_seconds = best.get("members_wall_seconds") or best.get("max_seconds") or best["seconds"]
    worst = best.get("min", best["test_exact_match"])
    reached = worst >= 0.99 and best_seconds <= 600
    kind = attentions[0]
    def typical(r: dict) -> float:  # the mean over seeds (ensembles: their one test score)
        return r.get("mean", r["test_exact_match"])

    pairs = [f"weight decay {wd:g}, {e} epochs, {h} units, {enc}: {typical(seq[(wd, e, h, enc, kind)]):.4f}"
             f" vs {typical(seq[(wd, e, h, enc, 'none')]):.4f}"
             for wd, e, h, enc in dict.fromkeys(k[:4] for k in seq)
             if (wd, e, h, enc, kind) in seq and (wd, e, h, enc, "none") in seq]
    spread = (f"; over seeds 0..{seeds - 1} its lowest test exact match is {worst:.4f} and the slowest model "
              f"trained in {best_seconds:.0f} s" if seeds > 1 and "runs" in best else "")
    lines += ["", f"Test exact match{' (mean over the seeds)' if seeds > 1 else ''} with {kind} attention vs none: "
              f"{'; '.join(pairs)}. Target of issue 6 "
              f"(>= 0.99 exact match with attention, <= 10 minutes on 2 cores): "
              f"{'reached' if reached else 'NOT reached'} (weight decay {main_wd:g}, {key[1]} epochs, {key[2]} "
              f"units: {best['test_exact_match']:.4f} for seed 0{spread}).", ""]
    for (wd, n_epochs, units, _encoder, att), r in seq.items():
        if att == "dot" != kind and "runs" in r:
            below = sum(c["test_exact_match"] < 0.99 for c in r["runs"])
            lines += [f"Scaled dot-product attention with the same recipe (weight decay {wd:g}, {n_epochs} epochs, "
                      f"{units} units): mean {r['mean']:.4f}, lowest {r['min']:.4f}; {below} of {len(r['runs'])} "
                      "seeds below 0.99.", ""]
    if o["ensemble"] > 1:
        lines.append("The model without attention is a single model per seed, not an ensemble.")
        for (wd, n_epochs, units, _encoder, att), r in seq.items():
            if "chosen" not in r:
                continue
            members = ", ".join(f"seed {c['seed']} {c['val_exact_match']:.3f} (best epoch {c['best_epoch']}, "
                                f"{c['seconds']:.0f} s)" for c in r["members"])
            by_size = ", ".join(f"{k}: {v:.4f}" for k, v in r["val_exact_match_by_size"].items())
            lines.append(f"Ensemble, weight decay {wd:g}, {att}, {n_epochs} epochs, {units} units: members' "
                         f"validation exact match {members}; validation exact match of the ensemble of the k best "
                         f"members {by_size}; chosen k = {r['chosen']} (seeds "
                         f"{', '.join(map(str, r['chosen_seeds']))}; train time above = all {len(r['members'])} "
                         "members' sum, all are needed for the choice"
                         + (f"; wall time of training all {len(r['members'])} in {o['parallel']} processes at "
                            f"once: {r['members_wall_seconds']:.0f} s" if o["parallel"] > 1
                            and r["members_wall_seconds"] else "") + ").")
        lines.append("")
    lines += [*([B2D_HISTORY, ""] if not quick else []), *([B2D_ENSEMBLE_NOTES, ""] if o["ensemble"] > 1 else [])]

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
    parser.add_argument("--epochs", default="120", help="binary-to-decimal epochs (comma-separated settings)")
    parser.add_argument("--hidden", default="128", help="GRU units per direction (comma-separated settings)")
    parser.add_argument("--encoders", default="bi", help="encoders to train: bi and/or uni (left to right), e.g. bi,uni")
    parser.add_argument("--length", type=int, default=40, help="long-range task: sequence length")
    parser.add_argument("--long-range-epochs", type=int, default=15)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--attention", default="bahdanau", choices=("bahdanau", "dot", "multihead"),
                        help="binary-to-decimal attention compared with none")
    parser.add_argument("--with-dot", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the scaled dot-product attention model (with the first weight decay)")
    parser.add_argument("--encoder-layers", type=int, default=B2D_DEFAULTS["encoder_layers"])
    parser.add_argument("--attention-heads", type=int, default=B2D_DEFAULTS["attention_heads"])
    parser.add_argument("--output-hidden", type=int, default=B2D_DEFAULTS["output_hidden"],
                        help="MLP output layer units (0: linear)")
    parser.add_argument("--batch-size", type=int, default=B2D_DEFAULTS["batch_size"], help="binary-to-decimal batch")
    parser.add_argument("--lr", type=float, default=B2D_DEFAULTS["lr"], help="binary-to-decimal peak learning rate")
    parser.add_argument("--dropout", type=float, default=B2D_DEFAULTS["dropout"])
    parser.add_argument("--weight-decay", default=f"{B2D_DEFAULTS['weight_decay']:g},0.5,0",
                        help="binary-to-decimal AdamW weight decay (comma-separated settings; the first is the "
                             "recipe checked against the target, the others are shown beside it)")
    parser.add_argument("--seeds", type=int, default=5, help="binary-to-decimal: models per row (seeds 0..N-1)")
    parser.add_argument("--average-last", type=int, default=B2D_DEFAULTS["average_last"])
    parser.add_argument("--threads", type=int, default=B2D_DEFAULTS["threads"], help="torch threads per cell")
    parser.add_argument("--ensemble", type=int, default=B2D_DEFAULTS["ensemble"],
                        help="binary-to-decimal: N members (seeds 0..N-1) per model with attention; the ensemble of "
                             "the k best (by validation) decoded with their mean log-probabilities, k chosen on "
                             "validation exact match")
    parser.add_argument("--parallel", type=int, default=B2D_DEFAULTS["parallel"],
                        help="train the seeds' models (or ensemble members) in P processes at once, each with "
                             "--threads threads")
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
                   "average_last": args.average_last, "threads": args.threads,
                   "encoder_layers": args.encoder_layers, "attention_heads": args.attention_heads,
                   "output_hidden": args.output_hidden, "ensemble": args.ensemble, "parallel": args.parallel}
    weight_decays = tuple(float(w) for w in args.weight_decay.split(",") if w.strip())
    weight_decays = weight_decays[:1] if args.quick else weight_decays  # smoke run: the recipe only
    body = run_benchmark(**settings, quick=args.quick, target=target, attentions=attentions, b2d_options=b2d_options,
                         weight_decays=weight_decays, seeds=1 if args.quick else args.seeds)
    write_section(target / "sequence.md", "Sequence models (issue 6)", bench_command("bench.bench_sequence", argv),
                  start, body)


if __name__ == "__main__":
    main()
