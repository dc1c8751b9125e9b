"""``transferkit cluster`` (self-taught clustering) and ``transferkit pretrain`` (self-taught learning)."""

from __future__ import annotations

import argparse

from transferkit.cli.options import add_dataclass_options, print_json


def register(subparsers) -> None:
    from transferkit.selftaught.cluster import ClusterConfig
    from transferkit.selftaught.pretrain import PretrainConfig

    commands = [
        ("cluster", ClusterConfig, run_cluster_command, "metrics.json",
         "Group unlabelled images or texts with a pretrained (or self-taught) backbone.",
         "Embeds every item (cached features), L2-normalises, clusters with k-means (or HDBSCAN) and writes --out: "
         "clusters.csv (item, cluster, distance to its centre; -1 = noise), contact_sheet.png (images) or "
         "examples.md/.json (texts) with each cluster's most central items, tsne.png and metrics.json (k, the "
         "criterion's scores, and NMI/ARI with --labels)."),
        ("pretrain", PretrainConfig, run_pretrain_command, "the summary",
         "Continue self-supervised pretraining of a backbone on unlabelled in-domain data.",
         "Images: a SimCLR-style two-view contrastive objective (NT-Xent) on the backbone's own training "
         "augmentations (the default: a better backbone for fit), or with --objective scan SCAN's "
         "neighbour-consistency clustering objective (a better backbone for cluster); text: masked-language "
         "modelling through transformers. --out is a backbone folder "
         "(weights.safetensors + backbone.json with provenance) that --backbone of fit and cluster accept like a "
         "registry name."),
    ]
    for name, config_class, func, printed, help_text, description in commands:
        parser = subparsers.add_parser(name, help=help_text, description=description)
        add_dataclass_options(parser, config_class, set())
        parser.add_argument("--json", action="store_true", help=f"Print {printed} on stdout.")
        parser.set_defaults(func=func)


def _options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in {"func", "command", "verbose", "quiet", "json"}}


def run_cluster_command(args: argparse.Namespace) -> int:
    from transferkit.selftaught.cluster import cluster

    data = _options(args).pop("data", "")
    run = cluster(data, **{k: v for k, v in _options(args).items() if k != "data"})
    if args.json:
        print_json(run.metrics)
    else:
        extra = f", NMI {run.metrics['nmi']:.4f}, ARI {run.metrics['ari']:.4f}" if "nmi" in run.metrics else ""
        print(f"{run.metrics['items']} items in {run.metrics['k']} clusters ({run.metrics['method']}{extra}); "
              f"written to {run.path}")
    return 0


def run_pretrain_command(args: argparse.Namespace) -> int:
    from transferkit.selftaught.pretrain import pretrain

    result = pretrain(**_options(args))
    if args.json:
        print_json(result.summary)
    else:
        print(f"self-taught backbone written to {result.path} ({result.summary['objective']}, "
              f"{result.summary['epochs']} epochs, final loss {result.summary['final_loss']:.4f}); "
              f"use it with --backbone {result.path}")
    return 0
