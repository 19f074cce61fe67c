"""Where one class's real pixels go: the confusion row of a class, for several segmenters side by side.

For each checkpoint, on the real images of one split: the share of the class's labelled pixels predicted as
each class (recall is the diagonal entry), the class's precision (the share of pixels predicted as the
class that are it), and where the pixels wrongly predicted as the class come from (the share of its
predictions per true class). It answers "which class took the pixels this arm lost" (issue 15:
synthetic-pretrained Mask2Formers lose CamVid bicyclist pixels to pedestrian and car) and, when precision
falls instead, "which class does the arm mistake for this one" (the joint arm's car).

    python benchmarks/class_confusion.py --data camvid:../shared/datasets/camvid --class bicyclist \
        --size 96,128 --checkpoint real=runs/camvid_latent_m2f/arms/real/seed0 \
        --checkpoint pf=runs/camvid_latent_m2f/arms/pretrain-finetune-filtered-hardness/seed0 \
        --out results/camvid_bicyclist_confusion

Prints a Markdown table and writes OUT.json and OUT.md (each written to a temp name, then renamed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset spec, e.g. camvid:../shared/datasets/camvid")
    parser.add_argument("--split", default="val")
    parser.add_argument("--class", dest="class_name", required=True, help="class name whose row is shown")
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="NAME=DIR of a segmenter checkpoint (repeatable)")
    parser.add_argument("--size", default="", help="inference size H,W (default: each image's own)")
    parser.add_argument("--top", type=int, default=4, help="classes shown besides the class itself")
    parser.add_argument("--out", default="", help="write OUT.json and OUT.md")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def confusion_row(confusion: np.ndarray, index: int) -> dict:
    """Shares of class `index`'s labelled pixels per predicted class, its precision, and the shares of the
    pixels predicted as it per true class (`predicted_from`; its diagonal entry is the precision).
    `confusion[t, p]` counts pixels of true class t predicted as p (segsynth.training.evaluate)."""
    labelled, predicted = confusion[index].sum(), confusion[:, index].sum()
    return {"pixels": int(labelled),
            "predicted_as": (confusion[index] / labelled).tolist() if labelled else [],
            "precision": float(confusion[index, index] / predicted) if predicted else float("nan"),
            "predicted_from": (confusion[:, index] / predicted).tolist() if predicted else []}


def most_taken(shares: list, index: int, top: int) -> list[int]:
    """The `top` classes other than `index` with the largest shares summed over all checkpoints, so every row
    of a table shows the same columns."""
    taken = np.sum([np.asarray(row) for row in shares], axis=0)
    taken[index] = -1
    return [int(c) for c in np.argsort(-taken)[:top]]


def table_text(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body]) + "\n"


def markdown(rows: dict, classes: list[str], index: int, top: int) -> str:
    """One row per checkpoint: recall, precision, and the classes that take most of the class's pixels."""
    others = most_taken([row["predicted_as"] for row in rows.values()], index, top)
    head = ["segmenter", f"{classes[index]} kept (recall)", "precision"] + [f"to {classes[c]}" for c in others]
    body = [[name, f"{100 * row['predicted_as'][index]:.1f} %", f"{100 * row['precision']:.1f} %"]
            + [f"{100 * row['predicted_as'][c]:.1f} %" for c in others] for name, row in rows.items()]
    return table_text(head, body)


def false_positive_markdown(rows: dict, classes: list[str], index: int, top: int) -> str:
    """One row per checkpoint: of the pixels predicted as the class, the share that are it (precision) and the
    shares of the true classes it is most often mistaken for ("" when no checkpoint predicts the class)."""
    usable = [row["predicted_from"] for row in rows.values() if row["predicted_from"]]
    if not usable:
        return ""
    others = most_taken(usable, index, top)
    head = ["segmenter", f"predicted {classes[index]}: is it (precision)"] + [f"is {classes[c]}" for c in others]
    body = [[name, "nothing predicted"] + [""] * len(others) if not row["predicted_from"] else
            [name] + [f"{100 * row['predicted_from'][c]:.1f} %" for c in [index, *others]]
            for name, row in rows.items()]
    return table_text(head, body)


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import torch

    from segsynth.data import open_dataset
    from segsynth.io import SegsynthError, atomic_write_json, atomic_write_text
    from segsynth.segmenters import load_checkpoint_for
    from segsynth.training.evaluate import confusion_over_split

    # 1. The data and the class, checked before any model is loaded.
    dataset = open_dataset(args.data)
    classes = list(dataset.classes)
    if args.class_name not in classes:
        raise SegsynthError(f"--class {args.class_name}: not a class of {args.data} (its classes: {', '.join(classes)})")
    index = classes.index(args.class_name)
    named = []
    for spec in args.checkpoint:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise SegsynthError(f"--checkpoint {spec}: give NAME=DIR, e.g. real=runs/camvid_real")
        named.append((name, folder))
    size = [int(v) for v in args.size.split(",")] if args.size else None

    # 2. One confusion matrix per checkpoint on the split's real images.
    rows = {}
    for name, folder in named:
        model, _, checkpoint = load_checkpoint_for(folder, classes, f"dataset {args.data}",
                                                   "give a checkpoint trained on this dataset")
        with torch.inference_mode():
            confusion = confusion_over_split(model.to(args.device), dataset.split(args.split), len(classes),
                                             torch.device(args.device), size=size)
        rows[name] = {"checkpoint": str(checkpoint), **confusion_row(confusion, index)}

    # 3. Report.
    table = markdown(rows, classes, index, args.top)
    false_positives = false_positive_markdown(rows, classes, index, args.top)
    if false_positives:
        table += f"\nWhere the pixels predicted as `{args.class_name}` come from (true class):\n\n" + false_positives
    print(table)
    if args.out:
        report = {"data": args.data, "split": args.split, "class": args.class_name, "classes": classes,
                  "size": size, "rows": rows}
        atomic_write_json(Path(args.out + ".json"), report)
        atomic_write_text(Path(args.out + ".md"), f"# Where real `{args.class_name}` pixels go ({args.split}, "
                                                  f"size {args.size or 'native'})\n\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
