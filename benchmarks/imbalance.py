"""Class-weighted loss (the default) against the plain loss on an imbalanced slice of a real data set.

One class of the training split is cut to a fraction (first files by name, symlinks in a temporary
folder); the validation split stays whole, so balanced accuracy (the mean of per-class recalls) and the
small class's recall show what the imbalance costs. Both runs share the seed and the feature cache.

    .venv/bin/python benchmarks/imbalance.py                # cats_and_dogs_filtered, dogs cut to a tenth, 128 px
    .venv/bin/python benchmarks/imbalance.py --epochs 5 --fine-tune-epochs 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from transferlab import TrainConfig, train
from transferlab.data.index import class_dirs, split_folder
from transferlab.files import expand_images, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def skewed_copy(source: Path, dest: Path, cut: str, fraction: float) -> int:
    """``source``'s train/ and validation split as symlinks, class ``cut`` of train/ kept to ``fraction``."""
    kept = 0
    for split, target in ((source / "train", dest / "train"), (split_folder(source), dest / "val")):
        for folder in class_dirs(split):
            images = expand_images([folder])
            if split.name == "train" and folder.name == cut:
                images = images[: max(1, round(len(images) * fraction))]
                kept = len(images)
            (target / folder.name).mkdir(parents=True)
            for image in images:
                (target / folder.name / image.name).symlink_to(image.resolve())
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/cats_and_dogs_filtered")
    parser.add_argument("--cut", default=None, help="Class to cut; default the last")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--fine-tune-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here")
    args = parser.parse_args()
    cut = args.cut or class_dirs(args.data / "train")[-1].name
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        kept = skewed_copy(args.data, data, cut, args.fraction)
        for balance in (False, True):
            cfg = TrainConfig(
                data_dir=str(data), out=f"{tmp}/run-{balance}", image_size=args.image_size, epochs=args.epochs,
                fine_tune_epochs=args.fine_tune_epochs, seed=args.seed, workers=args.workers,
                cache_dir=f"{tmp}/cache", balance=balance,
            )  # fmt: skip
            start = time.perf_counter()
            train(cfg)
            seconds = time.perf_counter() - start
            ev = json.loads(Path(cfg.out, "evaluation.json").read_text())
            recalls = {c: m["recall"] for c, m in ev["per_class"].items()}
            rows.append({
                "balance": balance, "accuracy": ev["accuracy"],
                "balanced_accuracy": round(float(np.mean(list(recalls.values()))), 4),
                f"recall_{cut}": recalls[cut], "min_recall": min(recalls.values()), "wall_s": round(seconds, 1),
            })  # fmt: skip
    print(f"{args.data.name}: train/{cut} cut to {kept} images, {args.image_size} px, seed {args.seed}, "
          f"{args.epochs} + {args.fine_tune_epochs} epochs (second run reuses the first's feature cache)")  # fmt: skip
    print(markdown_table(rows, list(rows[0])))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
