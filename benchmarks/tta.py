"""Test-time augmentation (horizontal flip) against plain prediction: accuracy and time, per trained run.

Each run's best checkpoint classifies the held-out images of its data folder twice in one process,
through the one prediction path (``transferlab.inference.predictor``): plain, then averaged with the mirror image.

    .venv/bin/python benchmarks/tta.py runs/hym160 ../shared/datasets/hymenoptera \\
        runs/cats160 ../shared/datasets/cats_and_dogs_filtered
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from transferlab.files import markdown_table
from transferlab.inference.evaluate import classification_metrics, evaluation_samples
from transferlab.inference.predictor import from_run, probabilities


def measure(run: Path, data: Path, workers: int) -> dict:
    predictor = from_run(run)
    samples, _ = evaluation_samples(data, predictor.classes)
    paths, labels = [s.path for s in samples], [s.label for s in samples]
    row: dict = {"run": run.name, "images": len(samples)}
    probabilities(predictor, paths[:8], workers=0)  # warm-up: first-call allocations are not TTA's cost
    for tta in (False, True):
        predictor.tta = tta
        start = time.perf_counter()
        probs = probabilities(predictor, paths, workers=workers)
        seconds = time.perf_counter() - start
        m = classification_metrics(probs, labels, predictor.classes)
        tag = "tta" if tta else "plain"
        row[f"acc_{tag}"] = m["accuracy"]
        row[f"balanced_{tag}"] = round(float(np.mean([c["recall"] for c in m["per_class"].values()])), 4)
        row[f"s_{tag}"] = round(seconds, 2)
    row["time_ratio"] = round(row["s_tta"] / row["s_plain"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="RUN DATA [RUN DATA ...]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here")
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give RUN DATA pairs")
    pairs = zip(args.pairs[::2], args.pairs[1::2])
    rows = [measure(Path(run), Path(data), args.workers) for run, data in pairs]
    cols = ["run", "images", "acc_plain", "acc_tta", "balanced_plain", "balanced_tta", "s_plain", "s_tta", "time_ratio"]
    print(markdown_table(rows, cols))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
