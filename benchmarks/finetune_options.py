"""What helps fine-tuning: the default recipe against one change at a time, on one data set.

Every variant is ``transferlab train`` with the defaults plus one change (run in its own process, all
sharing one feature cache, so a variant pays only for the views it adds): a lower fine-tuning rate,
fewer unfrozen groups, more unfrozen groups, the tutorial's depth, label smoothing, no mixup, a constant
rate instead of the cosine schedule, more cached views. The table gives the best validation accuracy of
each phase, the epoch it came from and the wall time.

    .venv/bin/python benchmarks/finetune_options.py ../shared/datasets/hymenoptera
    .venv/bin/python benchmarks/finetune_options.py ../shared/datasets/cifar10_5k --image-size 128 \\
        --variants default,label_smoothing,more_views
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transferlab.files import markdown_table

VARIANTS = {
    "default": [],
    "lower_lr": ["--fine-tune-lr", "3e-5"],
    "fewer_groups": ["--fine-tune-at", "0.85"],
    "more_groups": ["--fine-tune-at", "0.35"],
    "tutorial_depth": ["--fine-tune-at", "0.65"],  # the default for photos; small upsampled images go deeper
    "no_mixup": ["--mixup", "0"],
    "constant_rate": ["--fine-tune-schedule", "constant"],
    "label_smoothing": ["--label-smoothing", "0.1"],
    "more_views": ["--cache-views", "4"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--epochs", type=int, default=None, help="Feature-extraction epochs (default: the recipe's)")
    parser.add_argument("--fine-tune-epochs", type=int, default=None, help="Fine-tuning epochs (default: the recipe's)")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here")
    args = parser.parse_args()
    given = {"--epochs": args.epochs, "--fine-tune-epochs": args.fine_tune_epochs}
    epochs = [f"{flag}={n}" for flag, n in given.items() if n is not None]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for name in args.variants.split(","):
            out = Path(tmp) / name
            size = ["--image-size", str(args.image_size)] if args.image_size else []
            command = [sys.executable, "-m", "transferlab", "train", args.data, "--out", str(out),
                       "--cache-dir", str(cache), *size, *epochs, *VARIANTS[name]]  # fmt: skip
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            m = json.loads((out / "metrics.json").read_text())
            rows.append({
                "variant": name,
                "change": " ".join(VARIANTS[name]) or "-",
                "best_val_accuracy": m["best_val_accuracy"],
                "best_epoch": f"{m['best_epoch']} of {m['epochs_run']}",  # 0: the closed-form head
                "head": m["head_val_accuracy"],
                "feature_extraction_best": m["feature_extraction_best_val_accuracy"],
                "fine_tune_best": m["fine_tune_best_val_accuracy"],
                "wall_s": round(time.perf_counter() - start, 1),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print(markdown_table(rows, list(rows[0])))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
