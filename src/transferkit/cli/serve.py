"""``transferkit serve``: a trained model behind HTTP (KServe V2, /predict, /v1/embeddings, /search, /metrics)."""

from __future__ import annotations

import argparse

from transferkit.cli.options import add_dataclass_options


def register(subparsers) -> None:
    from transferkit.serving.app import ServeConfig

    parser = subparsers.add_parser(
        "serve", help="Serve a trained model over HTTP (KServe V2, /predict, OpenAI embeddings, /search).",
        description="One process, one model copy, dynamic batching of concurrent requests. Binds 127.0.0.1 "
                    "unless --host says otherwise. Needs the 'serve' extra: pip install 'transferkit[serve]'.")
    add_dataclass_options(parser, ServeConfig, set())
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transferkit.config import build
    from transferkit.serving.app import ServeConfig, serve

    options = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose", "quiet")}
    serve(build(ServeConfig, options))
    return 0
