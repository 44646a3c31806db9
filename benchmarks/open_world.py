"""Which score says "none of these" best: each of ``transferlab.inference.unknown``'s, on a trained run.

The run's validation images are the known side; each ``--outside`` folder (images of none of the run's classes)
the other. The distance scores are fitted on the run's training images' pooled features (one clean view, as
predict sees an image). For each score: AUROC, and the share of outside images accepted at the threshold that
accepts 95 % of the validation images. One pass through the network gives the logits and the features.

    .venv/bin/python benchmarks/open_world.py runs/demo ../shared/datasets/hymenoptera \\
        --outside cats_and_dogs=../shared/datasets/cats_and_dogs_filtered/validation \\
        --outside cifar10=../shared/datasets/cifar10_5k/test --limit 500
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from transferlab.data.images import Preprocess
from transferlab.data.index import check_image
from transferlab.data.labels import index_data, table_options
from transferlab.files import expand_images, markdown_table
from transferlab.inference.predictor import pooled_features
from transferlab.inference.unknown import ClassMeans, Neighbours, energy, separation, spread, top_probability
from transferlab.rundir.folder import load_net


def features_and_logits(net, prep: Preprocess, paths: list[Path], workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features ``[N, D]`` and logits of images, through the network as predict runs it (float32, eval)."""
    features = pooled_features(net, prep, paths, workers)
    with torch.inference_mode():
        return features.numpy(), net.head(features).numpy()


def measure(run: Path, data: Path, outside: dict[str, Path], limit: int, k: int, workers: int) -> list[dict]:
    net, config = load_net(run)
    net.eval()
    prep = Preprocess.from_meta(config)
    index = index_data(data, config["val_split"], config["seed"], **table_options(config))
    start = time.perf_counter()
    train_f, _ = features_and_logits(net, prep, [s.path for s in index.train], workers)
    known_f, known_l = features_and_logits(net, prep, [s.path for s in index.val], workers)
    seconds = time.perf_counter() - start
    means = ClassMeans(train_f, np.array([s.label for s in index.train]))
    neighbours = Neighbours(train_f, k)
    scores = {
        "top probability": top_probability,
        "energy": energy,
        "class means (Mahalanobis)": means,
        f"{neighbours.k} nearest neighbours": neighbours,
    }
    rows = []
    for name, folder in outside.items():
        readable = [p for p in expand_images([folder]) if check_image(p) is None]  # as predict skips the others
        out_f, out_l = features_and_logits(net, prep, spread(readable, limit), workers)
        for score, fn in scores.items():
            on_logits = score in ("top probability", "energy")
            known, other = (fn(known_l), fn(out_l)) if on_logits else (fn(known_f), fn(out_f))
            rows.append({
                "run": run.name, "outside": name, "images": f"{len(known_l)} / {len(out_l)}", "score": score,
                **separation(known, other),
            })  # fmt: skip
    print(f"{run.name}: {len(index.train)} training and {len(index.val)} validation images through the network in "
          f"{seconds:.1f} s")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("data", type=Path, help="The run's data folder or CSV (its training and validation images)")
    parser.add_argument("--outside", action="append", required=True, help="NAME=FOLDER of images of no run class")
    parser.add_argument("--limit", type=int, default=500, help="At most this many images of each outside folder")
    parser.add_argument("--k", type=int, default=10, help="The neighbour whose distance is the score")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here")
    args = parser.parse_args()
    outside = dict(item.split("=", 1) for item in args.outside)
    rows = measure(args.run, args.data, {n: Path(f) for n, f in outside.items()}, args.limit, args.k, args.workers)
    print(markdown_table(rows, list(rows[0])))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
