"""``transferkit index build|add|remove|info``, ``transferkit search`` and ``transferkit ask``."""

from __future__ import annotations

import argparse
from pathlib import Path

from transferkit.cli.options import add_dataclass_options, count, format_table, number, print_json
from transferkit.errors import TransferkitError
from transferkit.memory.retrieval import RetrievalConfig
from transferkit.memory.storage import DEFAULT_LOCK_TIMEOUT


def _add_encoder_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--encoder", "--backbone", dest="encoder", help=help_text)


def _add_lock_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lock-timeout", type=number(0), default=DEFAULT_LOCK_TIMEOUT, metavar="SECONDS",
                        help="How long to wait while another command writes the index "
                             f"(default: {DEFAULT_LOCK_TIMEOUT:g}).")


def _add_store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default="faiss", metavar="faiss|milvus:PATH_OR_URI[#COLLECTION]",
                        help="Where the vectors live: faiss (in the index folder, default); milvus:./vectors.db "
                             "(Milvus Lite, a local file) or milvus:http://host:19530 (a Milvus server / cluster; "
                             "collection: transferkit_<out folder name>_<random suffix>, recorded in the index, "
                             "unless #COLLECTION is given).")


def _retrieval_config(args: argparse.Namespace) -> RetrievalConfig:
    from dataclasses import fields

    return RetrievalConfig(**{f.name: getattr(args, f.name) for f in fields(RetrievalConfig) if hasattr(args, f.name)})


def register(subparsers) -> None:
    index = subparsers.add_parser("index", help="Build and maintain a vector index of documents or images.")
    actions = index.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    build = actions.add_parser("build", help="Chunk and embed documents (or embed images) into a new index.")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--docs", help="Folder or file of .txt/.md/.jsonl documents, or 'pydoc-topics'.")
    source.add_argument("--images", help="Folder of images (similar-image search).")
    build.add_argument("--out", required=True, help="Folder to write the index to.")
    _add_encoder_flag(build, "Backbone that embeds the items (default: minilm for text, efficientnet_lite0 "
                             "for images).")
    build.add_argument("--kind", default="flat", choices=("flat", "hnsw", "ivf"),
                       help="flat: exact search (default); hnsw / ivf: approximate, for large collections.")
    build.add_argument("--chunk-size", type=count(1), default=500, help="Chunk length (in --chunk-unit).")
    build.add_argument("--chunk-overlap", type=count(0), default=100, help="Overlap of consecutive chunks.")
    build.add_argument("--chunk-unit", default="chars", choices=("chars", "tokens"),
                       help="Count chunk size in characters or in the encoder's tokens.")
    build.add_argument("--hnsw-m", type=count(2), default=32, help="hnsw: links per node.")
    build.add_argument("--ef-search", type=count(1), default=64, help="hnsw: candidates explored per query.")
    build.add_argument("--ivf-nlist", type=count(1), default=100, help="ivf: number of k-means cells.")
    build.add_argument("--nprobe", type=count(1), default=8, help="ivf: cells scanned per query.")
    build.add_argument("--batch-size", type=count(1), default=32)
    build.add_argument("--overwrite", action="store_true", help="Replace an existing index in --out.")
    _add_store_flag(build)
    build.set_defaults(func=run_build)

    migrate = actions.add_parser("migrate", help="Copy an index into another vector store (FAISS <-> Milvus).")
    migrate.add_argument("index", help="Index folder to copy (only read).")
    _add_store_flag(migrate)
    migrate.add_argument("--out", required=True, help="Folder of the new index.")
    migrate.add_argument("--overwrite", action="store_true", help="Replace an existing index in --out.")
    migrate.set_defaults(func=run_migrate)

    add = actions.add_parser("add", help="Add (or replace) documents / images in an existing index.")
    add.add_argument("index", help="Index folder.")
    add.add_argument("path", help="Folder or file to add (sources relative to it; a source added before from the "
                                  "same folder is replaced, one from another folder refused).")
    add.add_argument("--batch-size", type=count(1), default=32)
    _add_lock_timeout(add)
    add.set_defaults(func=run_add)

    remove = actions.add_parser("remove", help="Remove every chunk of some sources from an index.")
    remove.add_argument("index", help="Index folder.")
    remove.add_argument("--source", action="append", required=True,
                        help="Source path as stored (repeatable; a folder prefix removes everything below it).")
    _add_lock_timeout(remove)
    remove.set_defaults(func=run_remove)

    info = actions.add_parser("info", help="Show an index's encoder, kind, size and sources.")
    info.add_argument("index", help="Index folder.")
    info.add_argument("--json", action="store_true", help="Print exactly one JSON document on stdout.")
    info.set_defaults(func=run_info)

    search = subparsers.add_parser("search", help="Semantic search in an index (text query or --image).")
    search.add_argument("index", help="Index folder.")
    search.add_argument("query", nargs="?", help="Text query (text indexes).")
    search.add_argument("--image", help="Query image file (image indexes).")
    search.add_argument("-k", type=count(1), default=5, help="Number of results.")
    _add_encoder_flag(search, "Encoder of the query; must equal the index's (checked). Default: the index's.")
    search.add_argument("--json", action="store_true", help="Print exactly one JSON document on stdout.")
    add_dataclass_options(search, RetrievalConfig, set(), "retrieval")
    search.set_defaults(func=run_search)

    ask = subparsers.add_parser("ask", help="Answer a question from a text index, citing the chunks used.")
    ask.add_argument("index", help="Index folder.")
    ask.add_argument("question")
    ask.add_argument("--mode", default="generate", choices=("generate", "extractive"),
                     help="generate: SmolLM2 answers from the top chunks; extractive: best-matching passage.")
    ask.add_argument("-k", type=count(1), default=3, help="Chunks retrieved into the prompt.")
    ask.add_argument("--lm", default="smollm2-135m", help="Causal LM: smollm2-135m or hf:<folder>.")
    ask.add_argument("--max-new-tokens", type=count(1), default=64)
    ask.add_argument("--json", action="store_true", help="Print exactly one JSON document on stdout.")
    add_dataclass_options(ask, RetrievalConfig, set(), "retrieval")
    ask.set_defaults(func=run_ask)


def run_build(args: argparse.Namespace) -> int:
    from transferkit.memory.index import build_index

    index = build_index(args.out, docs=args.docs, images=args.images, encoder=args.encoder, kind=args.kind,
                        batch_size=args.batch_size, overwrite=args.overwrite, chunk_size=args.chunk_size,
                        chunk_overlap=args.chunk_overlap, chunk_unit=args.chunk_unit, hnsw_m=args.hnsw_m,
                        ef_search=args.ef_search, ivf_nlist=args.ivf_nlist, nprobe=args.nprobe, store=args.store)
    print(f"indexed {len(index)} {'chunks' if index.meta.modality == 'text' else 'images'} from "
          f"{len(index.sources())} sources into {args.out} ({index.meta.kind}, {index.meta.encoder['name']}, "
          f"{index.store.spec if index.store else 'faiss'})")
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    from transferkit.memory.index import migrate_index

    index = migrate_index(args.index, args.out, store=args.store, overwrite=args.overwrite)
    print(f"copied {len(index)} vectors of {args.index} into {args.out} "
          f"({index.store.spec if index.store else 'faiss'})")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from transferkit.memory.index import add_to_index

    added = add_to_index(args.index, args.path, batch_size=args.batch_size, lock_timeout=args.lock_timeout)
    print(f"added {added} vectors to {args.index}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    from transferkit.memory.index import remove_from_index

    removed, left = remove_from_index(args.index, args.source, lock_timeout=args.lock_timeout)
    print(f"removed {removed} vectors from {args.index} ({left} left)")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from transferkit.memory.index import VectorIndex

    index = VectorIndex.load(args.index)
    document = {**asdict(index.meta), "vectors": len(index), "sources": index.sources()}
    if args.json:
        print_json(document)
    else:
        for key in ("encoder", "preprocess_signature", "modality", "kind", "dim", "vectors"):
            print(f"{key}: {document[key]}")
        print(f"store: {index.store.spec if index.store else 'faiss'}")
        print(f"sources ({len(document['sources'])}): {', '.join(document['sources'][:20])}"
              + (" ..." if len(document["sources"]) > 20 else ""))
    return 0


def run_search(args: argparse.Namespace) -> int:
    from transferkit.backbones import create_backbone
    from transferkit.memory.index import VectorIndex

    index = VectorIndex.load(args.index)
    if index.meta.modality == "image":
        if not args.image:
            raise TransferkitError("this index holds images", "query it with --image FILE")
        from transferkit.data.images import open_image

        query_label, query = args.image, open_image(Path(args.image))
    else:
        if not args.query or args.image:
            raise TransferkitError("this index holds text", 'give a text query, e.g. "how do I reset it?"')
        query_label = query = args.query
    encoder = None
    if args.encoder:
        encoder = create_backbone(args.encoder, pretrained=True, **_index_options(index, args.encoder))
    hits = index.search([query], args.k, encoder=encoder, retrieval=_retrieval_config(args))[0]
    if args.json:
        print_json({"query": query_label, "results": [h.to_json() for h in hits]})
        return 0
    rows = [{"rank": h.rank, "score": h.score, "source": h.source,
             "span": "" if h.start is None else f"{h.start}-{h.end}",
             "text": " ".join(h.text.split())[:80]} for h in hits]
    print(format_table(rows, ["rank", "score", "source", "span", "text"]))
    return 0


def _index_options(index, name: str) -> dict:
    """The index's encoder options when the same encoder is named (so only a real difference is an error)."""
    return dict(index.meta.encoder.get("options", {})) if name == index.meta.encoder["name"] else {}


def run_ask(args: argparse.Namespace) -> int:
    from transferkit.memory.ask import ask
    from transferkit.memory.index import VectorIndex

    answer = ask(VectorIndex.load(args.index), args.question, k=args.k, mode=args.mode, lm_name=args.lm,
                 max_new_tokens=args.max_new_tokens, retrieval=_retrieval_config(args))
    if args.json:
        print_json(answer.to_json())
        return 0
    print(answer.answer)
    print()
    print("sources:")
    for hit in answer.citations:
        span = "" if hit.start is None else f" [{hit.start}:{hit.end}]"
        print(f"  [{hit.rank}] {hit.source}{span} (score {hit.score:.3f})")
    return 0
