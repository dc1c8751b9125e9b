"""``transferkit zeroshot`` (labels by name: text similarity, ConSE or CLIP for images) and
``transferkit prompt`` (in-context zero-/one-/few-shot classification with a causal LM)."""

from __future__ import annotations

import argparse
from pathlib import Path

from transferkit.cli.options import count, format_table, print_json
from transferkit.errors import TransferkitError


def register(subparsers) -> None:
    zs = subparsers.add_parser("zeroshot", help="Classify images or texts into labels given only by name.")
    zs.add_argument("inputs", nargs="+", help="Image files, or texts.")
    zs.add_argument("--labels", required=True, help='Comma-separated candidate labels, e.g. "cat,cup of coffee".')
    zs.add_argument("--method", default="auto",
                    help="auto, text, conse or clip. auto: conse for images, text similarity for texts; clip needs "
                         "open_clip + weights.")
    zs.add_argument("--template", action="append",
                    help='Prompt template with {} for the label (repeatable; e.g. "a photo of {}.").')
    zs.add_argument("--backbone", default="efficientnet_lite0", help="conse: ImageNet classifier backbone.")
    zs.add_argument("--encoder", default="minilm", help="Sentence encoder for labels (text, conse).")
    zs.add_argument("--conse-top", type=count(1), default=10, help="conse: ImageNet classes mixed per image.")
    zs.add_argument("--clip-model", default="ViT-B-32", help="clip: open_clip architecture name.")
    zs.add_argument("--clip-pretrained", help="clip: open_clip weights tag or local checkpoint file.")
    zs.add_argument("--json", action="store_true", help="Print exactly one JSON document on stdout.")
    zs.set_defaults(func=run_zeroshot)

    prompt = subparsers.add_parser("prompt", help="In-context classification with a causal LM: zero-, one- "
                                                  "or few-shot prompts built from labelled examples.")
    prompt.add_argument("--data", required=True, help="Labelled text data (examples come from its train split).")
    prompt.add_argument("--input", action="append", help="Text to classify (repeatable). Without it, the test "
                                                         "split is classified and accuracy reported.")
    prompt.add_argument("--shots", type=count(0), action="append",
                        help="Examples per class in the prompt (repeatable, e.g. --shots 0 --shots 1; default 0).")
    prompt.add_argument("--labels", help="Comma-separated words replacing the class names in the prompt "
                                         "(same order as the data's classes).")
    prompt.add_argument("--instruction", default="Classify each text into one of these labels: {labels}.")
    prompt.add_argument("--lm", default="smollm2-135m", help="smollm2-135m or hf:<folder of a causal LM>.")
    prompt.add_argument("--limit", type=count(1), default=50, help="Test texts classified (without --input).")
    prompt.add_argument("--seed", type=count(0, 2**32 - 1), default=0)
    prompt.add_argument("--text-column")
    prompt.add_argument("--label-column")
    prompt.add_argument("--show-prompt", action="store_true", help="Print the prompt of the first text.")
    prompt.add_argument("--json", action="store_true", help="Print exactly one JSON document on stdout.")
    prompt.set_defaults(func=run_prompt)


def _is_image_input(inputs: list[str]) -> bool:
    from transferkit.data.images import IMAGE_EXTENSIONS

    images = [Path(i).suffix.lower() in IMAGE_EXTENSIONS for i in inputs]
    if any(images) and not all(images):
        raise TransferkitError("the inputs mix image files and texts", "classify images and texts separately")
    for item in inputs:
        if any(images) and not Path(item).is_file():
            raise TransferkitError(f"image file '{item}' does not exist", "check the path")
    return all(images)


def run_zeroshot(args: argparse.Namespace) -> int:
    from transferkit.zeroshot.classifiers import parse_labels, zero_shot_classifier, zero_shot_rows

    labels = parse_labels(args.labels)
    images = _is_image_input(args.inputs)
    if images:
        from transferkit.data.images import open_image

        items = [open_image(Path(p)) for p in args.inputs]
    else:
        items = list(args.inputs)
    method, classifier = zero_shot_classifier(labels, images, args.method, backbone=args.backbone,
                                              encoder=args.encoder, conse_top=args.conse_top,
                                              clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                                              templates=args.template)
    rows = zero_shot_rows(classifier, items, args.inputs)
    if args.json:
        print_json({"method": method, "labels": labels, "predictions": rows})
        return 0
    table = [{"input": r["input"][:60], "prediction": r["prediction"],
              "top labels": ", ".join(f"{k} {v:.3f}" for k, v in
                                      sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:3])}
             for r in rows]
    print(format_table(table, ["input", "prediction", "top labels"]))
    return 0


def run_prompt(args: argparse.Namespace) -> int:
    from transferkit.data import load_data
    from transferkit.zeroshot.classifiers import parse_labels
    from transferkit.zeroshot.incontext import PromptBuilder, evaluate_prompting, load_causal_lm

    splits = load_data(args.data, text_column=args.text_column, label_column=args.label_column, seed=args.seed,
                       test_limit=None if args.input else args.limit)
    if splits.modality != "text":
        raise TransferkitError(f"'{args.data}' is {splits.modality} data", "in-context prompting needs texts")
    names = parse_labels(args.labels) if args.labels else list(splits.class_names)
    if len(names) != len(splits.class_names):
        raise TransferkitError(f"--labels gives {len(names)} names for {len(splits.class_names)} classes",
                               f"give one per class, in this order: {', '.join(splits.class_names)}")
    lm = load_causal_lm(args.lm)
    test = splits.scoring_split()[1]
    texts = list(args.input) if args.input else [test.items[i] for i in range(len(test))]
    results = evaluate_prompting(lm, PromptBuilder(names, args.instruction), splits.train, texts, args.shots or [0],
                                 args.seed, labels=None if args.input else test.labels,
                                 show_prompt=(lambda prompt: print(prompt + "\n")) if args.show_prompt else None)
    if args.json:
        print_json({"lm": args.lm, "labels": names, "inputs": texts if args.input else None, "results": results})
        return 0
    if args.input:
        rows = [{"shots": e["shots"], "input": t[:60], "prediction": p}
                for e in results for t, p in zip(texts, e["predictions"])]
        print(format_table(rows, ["shots", "input", "prediction"]))
    else:
        print(format_table([{k: e[k] for k in ("shots", "accuracy", "n")} for e in results],
                           ["shots", "accuracy", "n"]))
    return 0
