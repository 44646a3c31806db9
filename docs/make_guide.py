"""Rerun the guide's runs and rewrite docs/guide.md and docs/figures/ from them (``make docs``).

The prose lives in docs/guide.in.md; every number, table, reading and figure comes from the runs made
here, so the guide cannot drift from what the code does. ``--size tiny`` checks the pipeline in minutes;
``small`` (the default) gives the guide's numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import string
import sys
import time
from pathlib import Path

from transferlab.benchmark import LONGER, plot_comparison, run_ablation, run_recipe_ablation
from transferlab.files import atomic_write, markdown_table

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
DATASETS = ROOT.parent / "shared" / "datasets"
BACKBONE = "efficientnet_lite0"

# per size: images per class (None: all) of each dataset, and the options of each ablation
SIZES = {
    "tiny": {
        "hymenoptera": (15, 10),
        "cifar10_5k": (15, 5),
        "recipe": ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1"],
        "preprocessing": ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1"],
    },
    "small": {
        "hymenoptera": (None, None),
        "cifar10_5k": (50, 20),
        "recipe": ["--image-size", "96", "--epochs", "3", "--fine-tune-epochs", "3"],
        "preprocessing": ["--image-size", "96", "--epochs", "2", "--fine-tune-epochs", "1"],
    },
}
COMMON = ["--batch-size", "32", "--workers", "1"]
SECTIONS = {  # guide placeholder: recipe rows whose readings it shows, and the chart of their curves
    "scratch": ["default", "from_scratch", "from_scratch_longer"],
    "fine_tune": ["feature_extraction_only", "default"],
    "freeze": ["default", "all_trainable", "bn_training_mode"],
    "augment": ["default", "no_augmentation", "strong_augmentation"],
}


def slice_dataset(name: str, dest: Path, train: int | None, val: int | None) -> Path:
    """The first ``train``/``val`` images of each class, linked into ``dest`` (the whole set when None)."""
    source = DATASETS / name
    if train is None:
        return source
    held_out = next(source / s for s in ("val", "validation", "test") if (source / s).is_dir())
    for split, src, n in (("train", source / "train", train), ("val", held_out, val)):
        for class_dir in sorted(p for p in src.iterdir() if p.is_dir()):
            (dest / split / class_dir.name).mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.iterdir())[:n]:
                (dest / split / class_dir.name / image.name).symlink_to(image)
    return dest


def command(data: Path, ablation: str, args: list[str]) -> str:
    where = os.path.relpath(data, ROOT)
    return f"transferlab benchmark {where} --backbones {BACKBONE} --ablation {ablation} {' '.join(args)}"


def readings(rows: list[dict], names: list[str]) -> str:
    by_name = {r["model"]: r for r in rows}
    return "\n".join(f"- **{n}**: {by_name[n]['reading']}." for n in names if n in by_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of an earlier call")
    opts = parser.parse_args()
    size, began = SIZES[opts.size], time.perf_counter()
    work = ROOT / "runs" / f"docs-{opts.size}"
    if work.exists() and not opts.reuse:
        shutil.rmtree(work)
    figures = DOCS / "figures"
    figures.mkdir(exist_ok=True)

    hym = slice_dataset("hymenoptera", work / "data" / "hymenoptera", *size["hymenoptera"])
    recipe_args = size["recipe"] + COMMON
    recipe = run_recipe_ablation(hym, BACKBONE, work / "recipe", recipe_args)
    cifar = slice_dataset("cifar10_5k", work / "data" / "cifar10_5k", *size["cifar10_5k"])
    pre_args = size["preprocessing"] + COMMON
    pre = run_ablation(cifar, BACKBONE, work / "preprocessing", pre_args)

    shutil.copyfile(work / "recipe" / "comparison.png", figures / "recipe_comparison.png")
    shutil.copyfile(work / "recipe" / "default" / "curves.png", figures / "default_curves.png")
    shutil.copyfile(work / "recipe" / "default" / "augmentations.png", figures / "augmentations.png")
    shutil.copyfile(work / "preprocessing" / "comparison.png", figures / "preprocessing.png")
    for section, names in SECTIONS.items():
        chart = {"fine_tune": None, "freeze": "freezing", "augment": "augmentation"}.get(section, section)
        if chart:
            plot_comparison([r for r in recipe if r["model"] in names], work / "recipe", figures / f"{chart}.png")

    columns = ["model", "val_accuracy_best", "best_epoch", "train_seconds", "meaning"]
    count = len(list((hym / "train").glob("*/*"))), len(list((hym / "val").glob("*/*")))
    values = {
        "when": datetime.date.today().isoformat(),
        "size": opts.size,
        "settings": " ".join(recipe_args),
        "minutes": f"{(time.perf_counter() - began) / 60:.0f} minutes"
        + (", reusing earlier runs" if opts.reuse else ""),
        "backbone": BACKBONE,
        "recipe_data": f"hymenoptera, {count[0]} training and {count[1]} validation images",
        "recipe_command": command(hym, "recipe", recipe_args),
        "recipe_table": markdown_table(recipe, columns),
        "longer": str(LONGER),
        "preprocessing_data": f"a slice of cifar10_5k, {len(list((cifar / 'train').glob('*/*')))} training images",
        "preprocessing_command": command(cifar, "preprocessing", pre_args),
        "preprocessing_table": markdown_table(pre, columns),
        **{f"{section}_readings": readings(recipe, names) for section, names in SECTIONS.items()},
    }
    template = string.Template((DOCS / "guide.in.md").read_text())
    atomic_write(DOCS / "guide.md", template.substitute(values))
    print(f"docs/guide.md and docs/figures/ rewritten from the runs in {work} ({values['minutes']})", file=sys.stderr)


if __name__ == "__main__":
    main()
