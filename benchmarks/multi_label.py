"""Several labels per image: the default recipe's mean AP and F1 against a logistic-regression probe of the same
frozen features, on a set composed from the shared photos.

Each composed image is a 2 x 2 grid of tiles. A tile is a photo of an ant or a bee (hymenoptera) or of a cat or a
dog (cats_and_dogs_filtered) with probability ``--p``, else a CIFAR-10 vehicle (airplane, automobile, ship or
truck: none of the classes); the image's labels are the classes among its tiles, so about a fifth of the images
have none. Training images come from the sources' training splits, validation images from their validation
splits, so no photo is in both.

    .venv/bin/python benchmarks/multi_label.py --train 600 --val 300              # compose, train, probe
    .venv/bin/python benchmarks/multi_label.py --compose runs/tiles --train 60 --val 30   # the set only

The probe: one clean view of each training image through the frozen backbone, one-vs-rest logistic regression
(``recipe/head_init.solve_head``, its decay chosen on held-out training images), each class's threshold chosen
on the same training images the recipe keeps out for its thresholds.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SOURCES = {  # class: (training folder, validation folder)
    "ant": ("hymenoptera/train/ants", "hymenoptera/val/ants"),
    "bee": ("hymenoptera/train/bees", "hymenoptera/val/bees"),
    "cat": ("cats_and_dogs_filtered/train/cats", "cats_and_dogs_filtered/validation/cats"),
    "dog": ("cats_and_dogs_filtered/train/dogs", "cats_and_dogs_filtered/validation/dogs"),
}
FILLERS = ("airplane", "automobile", "ship", "truck")  # cifar10_5k: tiles of none of the classes


def _photos(split: int) -> tuple[dict[str, list[Path]], list[Path]]:
    classes = {c: sorted((DATASETS / folders[split]).glob("*.jpg")) for c, folders in SOURCES.items()}
    part = ("train", "test")[split]
    fillers = sorted(p for name in FILLERS for p in (DATASETS / "cifar10_5k" / part / name).glob("*.jpg"))
    return classes, fillers


def compose(out: Path, train: int, val: int, tile: int = 96, p: float = 0.35, seed: int = 0) -> Path:
    """Write ``train`` + ``val`` composed images under ``out/images`` and ``out/labels.csv`` (image, labels, split:
    labels separated by spaces, blank for an image with none); returns the CSV's path."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for split, count in ((0, train), (1, val)):
        classes, fillers = _photos(split)
        for i in range(count):
            grid, labels = Image.new("RGB", (2 * tile, 2 * tile)), set()
            for cell in range(4):
                if rng.random() < p:
                    name = rng.choice(sorted(classes))
                    path = rng.choice(classes[name])
                    labels.add(name)
                else:
                    path = rng.choice(fillers)
                with Image.open(path) as im:
                    grid.paste(
                        im.convert("RGB").resize((tile, tile), Image.BILINEAR), (cell % 2 * tile, cell // 2 * tile)
                    )
            name = f"{('train', 'val')[split]}_{i:05d}.jpg"
            grid.save(out / "images" / name, quality=90)
            rows.append([f"images/{name}", " ".join(sorted(labels)), ("train", "val")[split]])
    path = out / "labels.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "labels", "split"])
        writer.writerows(rows)
    return path


def probe(run: Path) -> dict:
    """The probe on the run's own split (training, threshold and validation images) and backbone."""
    import torch

    from transferlab.data.images import Preprocess
    from transferlab.data.index import targets
    from transferlab.data.labels import index_data, table_options
    from transferlab.inference.evaluate import multilabel_metrics
    from transferlab.inference.predictor import pooled_features
    from transferlab.model.network import TransferNet
    from transferlab.model.weights import create_backbone
    from transferlab.model.zoo import BackboneSpec
    from transferlab.recipe.calibrate import choose_thresholds
    from transferlab.recipe.head_init import solve_head
    from transferlab.rundir.folder import RunDir

    config = RunDir(run).read_config()
    data = index_data(config["data_dir"], config["val_split"], config["seed"], **table_options(config))
    prep, n = Preprocess.from_meta(config), len(data.classes)
    # the pretrained backbone, as the run began with it (the run's own has been fine-tuned)
    spec = BackboneSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["spec"].items()})
    net = TransferNet(spec, create_backbone(spec, config.get("weights"), num_classes=0)[0], n, multi_label=True)
    start = time.perf_counter()
    feats = {k: pooled_features(net, prep, [s.path for s in getattr(data, k)], 2) for k in ("train", "tune", "val")}
    fit = solve_head(feats["train"][:, None].numpy(), targets(data.train, n, True), n, torch.ones(n), config["seed"])

    def probs(x: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(x @ fit["weight"].T + fit["bias"]).numpy()

    thresholds = choose_thresholds(probs(feats["tune"]), [s.label for s in data.tune])
    m = multilabel_metrics(probs(feats["val"]), [s.label for s in data.val], data.classes, thresholds)
    return {"map": m["map"], "micro_f1": m["micro_f1"], "macro_f1": m["macro_f1"], "accuracy": m["accuracy"],
            "seconds": round(time.perf_counter() - start, 1), "decay": fit["decay"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=300)
    parser.add_argument("--tile", type=int, default=96, help="Side of each of the four tiles, in pixels")
    parser.add_argument("--compose", type=Path, default=None, help="Only write the composed set into this folder")
    parser.add_argument("--probe", type=Path, default=None, help="Only the probe, on this trained run's split")
    parser.add_argument("--out", type=Path, default=Path("runs/multi_label"))
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here")
    parser.add_argument("train_args", nargs="*", help="Extra `transferlab train` options (after --)")
    args = parser.parse_args()
    if args.compose:
        print(compose(args.compose, args.train, args.val, args.tile))
        return
    if args.probe:
        print(json.dumps(probe(args.probe)))
        return
    table = compose(args.out / "data", args.train, args.val, args.tile)
    run = args.out / "run"
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "transferlab", "train", str(table), "--multi-label", "--out", str(run), "--overwrite"]
    subprocess.run(cmd + args.train_args, check=True)
    seconds = round(time.perf_counter() - start, 1)
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [
        {"way": "default recipe", "map": metrics["eval_map"], "micro_f1": metrics["eval_micro_f1"],
         "macro_f1": metrics["eval_macro_f1"], "accuracy": metrics["eval_accuracy"], "seconds": seconds},
        {"way": "probe (frozen features)", **probe(run)},
    ]  # fmt: skip
    from transferlab.files import markdown_table

    print(markdown_table(rows, ["way", "map", "micro_f1", "macro_f1", "accuracy", "seconds"]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
