"""Feature extraction from a random head (Adam epochs) against from the L-BFGS head, same data, cache and seed.

    .venv/bin/python benchmarks/head_init.py --out /tmp/head_init

Each dataset runs at the given size with ``--fine-tune-epochs 0`` (the phase the head start
changes) and both starts share one feature cache, so the rows differ only in the start.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transferlab import TrainConfig, train
from transferlab.files import markdown_table
from transferlab.rundir.folder import RunDir

ROOT = Path(__file__).resolve().parents[1]
SETS = {"hymenoptera": 224, "cats_and_dogs_filtered": 160, "cifar10_5k": 128}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "head_init"))
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--datasets", default=str(ROOT.parent / "shared/datasets"), help="The folder holding the sets")
    ap.add_argument("--image-size", type=int, default=None, help=f"One size for every set (default {SETS})")
    args = ap.parse_args()
    rows = []
    for name in args.sets.split(","):
        size = args.image_size or SETS[name]
        for start in ("random", "lbfgs"):
            out = Path(args.out) / name / start
            cfg = TrainConfig(data_dir=str(Path(args.datasets) / name), image_size=size,
                              epochs=args.epochs, fine_tune_epochs=0, head_init=start, out=str(out),
                              cache_dir=str(Path(args.out) / name / "cache"))  # fmt: skip
            m = train(cfg, overwrite=True)
            by_epoch = {r["epoch"]: r["val_accuracy"] for r in RunDir(out).read_history()}
            rows.append({
                "data": name, "size": size, "head_start": start, "best_val_accuracy": m["best_val_accuracy"],
                "epoch_0_val_accuracy": by_epoch.get(0),  # the L-BFGS head itself, scored before the first epoch
                "epoch_1_val_accuracy": by_epoch[1], "best_epoch": m["best_epoch"],
                "phase_seconds": m["timings"]["feature_extraction_seconds"],
                "extract_seconds": m["timings"]["extract_seconds"], "head_fit": m.get("head_fit", {}).get("decay"),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
