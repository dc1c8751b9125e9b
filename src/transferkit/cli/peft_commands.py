"""``transferkit inspect BACKBONE``, ``transferkit export --model RUN --out DIR [--merge]`` and
``transferkit generate --model RUN "prompt"``.

* inspect: the backbone's module tree as a table (name, type, weight shape, parameters including children), the
  modules LoRA adapts by default marked ``*`` (names relative to the network peft adapts, as ``--lora-targets``
  expects them). Built without pretrained weights (architecture only), so it is fast and offline.
* export: a LoRA run as a small peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors`` +
  the head; loads on the pretrained backbone), or with ``--merge`` as an ordinary transferkit model whose weights
  include the LoRA update (no peft needed to predict). Both load with ``transferkit.load`` (so ``predict``,
  ``evaluate``, ``serve``) and ``transferkit.strategies.lora.load_lora_export``. Other runs and ``auto`` ensembles are written as
  plain model folders (LoRA members merged; ``transferkit.export.safetensors``); ``--format onnx`` writes an ONNX
  graph, one graph for an ensemble (``transferkit.export.onnx``).
* generate: a continuation (or, with ``--chat``, a chat answer) from a causal-LM run or backbone.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from torch import nn

from transferkit.cli.options import count, format_table, number, print_json
from transferkit.errors import TransferkitError


def register(subparsers: Any) -> None:
    inspect = subparsers.add_parser("inspect", help="Show a backbone's module tree and its LoRA targets.",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("backbone", help="Registry name, e.g. efficientnet_lite0, minilm, smollm2-135m.")
    inspect.add_argument("--depth", type=count(0), default=0, help="Show modules down to this depth (0: all).")
    inspect.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                         help="Backbone option, e.g. image_size=112 (repeatable).")
    inspect.add_argument("--targets-only", action="store_true", help="List only the suggested LoRA targets.")
    inspect.add_argument("--json", action="store_true", help="One JSON document on stdout.")
    inspect.set_defaults(func=run_inspect)

    export = subparsers.add_parser("export", help="Export a run (or an auto ensemble) as ONNX (--format onnx) or as a "
                                                  "plain model folder; a LoRA run as its adapter or merged (--merge).")
    export.add_argument("--model", required=True, help="Run folder (or its model/ subfolder).")
    export.add_argument("--out", required=True, help="New folder to write.")
    export.add_argument("--format", default="safetensors", choices=("safetensors", "onnx"),
                        help="safetensors: a plain transferkit model folder (a LoRA run: its adapter, or the merged "
                             "model with --merge; an auto ensemble: its members, LoRA ones merged); onnx: the "
                             "classifier as an ONNX graph with its preprocessing, one graph averaging the members' "
                             "probabilities for an auto ensemble, checked against PyTorch (needs the 'onnx' extra).")
    export.add_argument("--merge", action="store_true",
                        help="Fold the LoRA update into the base weights and write a plain transferkit model.")
    export.add_argument("--overwrite", action="store_true", help="Replace an earlier export in --out.")
    export.set_defaults(func=run_export)

    generate = subparsers.add_parser("generate", help="Generate text with a causal-LM run (or backbone).")
    generate.add_argument("prompt", help="Text to continue (or, with --chat, a user message).")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Run folder of a causal-LM run (e.g. fitted with --task causal-lm).")
    source.add_argument("--backbone", help="A causal-LM backbone without fine-tuning, e.g. smollm2-135m.")
    generate.add_argument("--max-new-tokens", type=count(1), default=64, help="Tokens to generate.")
    generate.add_argument("--temperature", type=number(0), default=0.0, help="0: greedy; above 0: sampling.")
    generate.add_argument("--seed", type=count(0, 2**32 - 1), default=0, help="Seed for sampling.")
    generate.add_argument("--chat", action="store_true", help="Wrap the prompt in the model's chat template.")
    generate.set_defaults(func=run_generate)


# --- inspect ---------------------------------------------------------------------------------------------------


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise TransferkitError(f"invalid --option '{text}'", "write it as KEY=VALUE, e.g. image_size=112")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def module_rows(module: nn.Module, targets: set[str], depth: int = 0) -> list[dict[str, Any]]:
    """One row per submodule: name, type, weight shape, parameters (with children), LoRA target mark."""
    rows = []
    for name, child in module.named_modules():
        if not name:
            continue
        level = name.count(".") + 1
        if depth and level > depth:
            continue
        weight = getattr(child, "weight", None)
        shape = "x".join(str(s) for s in weight.shape) if isinstance(weight, nn.Parameter) else ""
        rows.append({"name": "  " * (level - 1) + name.rsplit(".", 1)[-1], "path": name, "type": type(child).__name__,
                     "shape": shape, "params": sum(p.numel() for p in child.parameters()),
                     "lora": "*" if name in targets else ""})
    return rows


def run_inspect(args: argparse.Namespace) -> int:
    from transferkit.backbones import create_backbone
    from transferkit.strategies.lora import inner_network, matched_modules

    options = dict(_parse_option(o) for o in args.option)
    backbone = create_backbone(args.backbone, pretrained=False, **options)
    inner = inner_network(backbone)
    suggested = backbone.suggested_lora_targets()
    targets = set(matched_modules(inner, suggested)) if suggested else set()
    rows = module_rows(inner, targets, args.depth)
    if args.targets_only:
        rows = [{**r, "name": r["path"]} for r in rows if r["lora"]]
    total = sum(p.numel() for p in inner.parameters())
    if args.json:
        print_json({"backbone": args.backbone, "parameters": total, "suggested_lora_targets": suggested,
                    "modules": [{k: v for k, v in r.items() if k != "name"} for r in rows]})
        return 0
    print(format_table(rows, ["name", "type", "shape", "params", "lora"]))
    print(f"\n{args.backbone}: {total:,} parameters; * = default LoRA target "
          f"({len(targets)} modules matching {suggested or 'nothing: pass --lora-targets'})")
    return 0


# --- export ----------------------------------------------------------------------------------------------------


def run_export(args: argparse.Namespace) -> int:
    from transferkit.export.safetensors import export_safetensors

    if args.format == "onnx":
        from transferkit.export.onnx import PARITY_FILE, export_onnx

        out = export_onnx(args.model, args.out, overwrite=args.overwrite)
        parity = json.loads((out / PARITY_FILE).read_text())
        ensemble = parity.get("ensemble")
        print(f"ONNX export written to {out}: max |logit difference| to PyTorch {parity['max_abs_logit_diff']:.2e}, "
              f"predicted-class agreement {parity['agreement']:.4f}"
              + (f"; ensemble probabilities vs PyTorch: max difference {ensemble['max_abs_probability_diff']:.2e}, "
                 f"agreement {ensemble['agreement']:.4f}" if ensemble else ""))
        return 0

    out = export_safetensors(args.model, args.out, merge=args.merge, overwrite=args.overwrite)
    from transferkit.rundir import MARKER

    files = sorted(f.name for f in out.iterdir() if f.name != MARKER)
    size = sum(f.stat().st_size for f in out.iterdir())
    kind = "LoRA adapter" if (out / "adapter_config.json").is_file() else "merged model" if args.merge else "model"
    print(f"{kind} written to {out} ({size / 2**20:.2f} MB: "
          f"{', '.join(files)})")
    return 0


# --- generate --------------------------------------------------------------------------------------------------


def run_generate(args: argparse.Namespace) -> int:
    import transferkit.tasks.causal_lm as causal_lm  # registers hf-causal: before a saved run is rebuilt

    if args.max_new_tokens < 1 or args.temperature < 0:
        raise TransferkitError("--max-new-tokens must be >= 1 and --temperature >= 0", "pass e.g. 64 and 0.7")
    causal_lm.check_prompt(args.prompt)  # before the model loads
    if args.model:
        from transferkit.strategies.lora import load_lora_export

        model, _ = load_lora_export(args.model)
        backbone = model.backbone
    else:
        from transferkit.backbones import create_backbone

        backbone = create_backbone(args.backbone)
    if not hasattr(backbone, "generate") or not hasattr(getattr(backbone, "model", None), "lm_head"):
        raise TransferkitError(f"'{args.model or args.backbone}' is not a causal language model",
                               "use a run fitted with --task causal-lm, or --backbone smollm2-135m")
    print(causal_lm.generate_text(backbone, args.prompt, args.max_new_tokens, args.chat, args.temperature,
                                  args.seed))
    return 0
