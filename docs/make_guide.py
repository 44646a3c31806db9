"""Rerun the guide's runs and rewrite docs/guide.md, docs/guide_runs.json and docs/figures/ from them (``make docs``).

The prose lives in docs/guide.in.md; every number, table and figure comes from the runs made here, so the
guide cannot drift from what the code does. Each study trains one backbone with each change to the recipe
on one data set, once per seed; a row's accuracy is its mean over the seeds, and its difference from the
default comes with a 95 % interval over the validation images of all seeds (two proportions, each image one
draw: wider than a paired interval would be, so a difference it calls beyond the noise is one).

``--size tiny`` checks the pipeline in minutes; ``full`` (the default) gives the guide's numbers;
``--from-results`` rewrites the page from the committed docs/guide_runs.json without training.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import string
import sys
import time
from pathlib import Path

from transferlab.benchmark import ABLATION, LONGER, RECIPE, plot_comparison, run_ablation, run_recipe_ablation
from transferlab.files import atomic_write, markdown_table

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
DATASETS = ROOT.parent / "shared" / "datasets"
BACKBONE = "efficientnet_lite0"
CORAL = ROOT.parent / "shared" / "weights" / "coral" / "mobilenet_v2_1.0_224_quant.tflite"
MOBILENET = ["--backbone", "mobilenet_v2", "--weights", os.path.relpath(CORAL, ROOT)]  # the classic one, offline
RESULTS = DOCS / "guide_runs.json"
COMMON = ["--batch-size", "32", "--workers", "1"]

# per size, each study: the data (a shared set, images per class of train and held-out, None: all), the ablation
# and its rows, the options and the seeds. The large effects (transfer, freezing, BatchNorm, preprocessing) show
# on small sets; the small ones (fine-tuning, augmentation) need the thousand held-out images of a CIFAR slice.
SIZES = {
    "tiny": {
        "recipe": ("hymenoptera", 10, 10, "recipe", ["default", "from_scratch", "all_trainable", "bn_training_mode"],
                   ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1"], [0]),
        "details": ("cifar10_5k", 6, 4, "recipe", ["default", "feature_extraction_only", "no_augmentation"],
                    ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1"], [0]),
        "preprocessing": ("cifar10_5k", 6, 4, "preprocessing", list(ABLATION),
                          ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1"], [0]),
        "mobilenet": ("cifar10_5k", 6, 4, "preprocessing", list(ABLATION),
                      ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1", *MOBILENET], [0]),
    },
    "full": {
        "recipe": ("hymenoptera", None, None, "recipe",
                   ["default", "from_scratch", "all_trainable", "bn_training_mode", "from_scratch_longer"],
                   ["--image-size", "160", "--epochs", "5", "--fine-tune-epochs", "5"], [0, 1]),
        "details": ("cifar10_5k", 150, 100, "recipe",
                    ["default", "feature_extraction_only", "no_augmentation", "strong_augmentation"],
                    ["--image-size", "96", "--epochs", "5", "--fine-tune-epochs", "5"], [0, 1]),
        "preprocessing": ("cifar10_5k", 150, 100, "preprocessing", list(ABLATION),
                          ["--image-size", "96", "--epochs", "5", "--fine-tune-epochs", "3"], [0]),
        "mobilenet": ("cifar10_5k", 150, 100, "preprocessing", list(ABLATION),
                      ["--image-size", "96", "--epochs", "5", "--fine-tune-epochs", "3", *MOBILENET], [0]),
    },
}  # fmt: skip
MEANINGS = {"recipe": {k: v[1] for k, v in RECIPE.items()}, "preprocessing": {k: v[1] for k, v in ABLATION.items()}}


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
                link = dest / split / class_dir.name / image.name
                if not link.exists():
                    link.symlink_to(image)
    return dest


def run_study(name: str, study: tuple, work: Path) -> dict:
    """Every row of one study, once per seed: the rows as the benchmark wrote them, per seed. The backbone is
    ``BACKBONE`` unless the options name another (``--backbone``, then passed to the benchmark's own flag)."""
    data_name, train, val, ablation, variants, options, seeds = study
    backbone = BACKBONE
    if "--backbone" in options:
        at = options.index("--backbone")
        backbone, options = options[at + 1], options[:at] + options[at + 2 :]
    data = slice_dataset(data_name, work / "data" / f"{data_name}-{train}-{val}", train, val)
    runner = run_recipe_ablation if ablation == "recipe" else run_ablation
    args = options + COMMON
    per_seed = {}
    for seed in seeds:
        start = time.perf_counter()
        rows = runner(data, backbone, work / name / f"seed{seed}", [*args, "--seed", str(seed)], variants=variants)
        per_seed[seed] = [{k: r.get(k) for k in ("model", "val_accuracy_best", "train_seconds", "best_epoch")}
                          for r in rows]  # fmt: skip
        print(f"{name}, seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    images = {s: len(list((data / s).glob("*/*"))) for s in ("train", "val" if (data / "val").is_dir() else "test")}
    command = (
        f"transferlab benchmark {os.path.relpath(data, ROOT)} --backbones {backbone} --ablation {ablation} "
        f"{' '.join(args)} --seed SEED"
    )
    return {"data": data_name, "images": images, "ablation": ablation, "options": args, "seeds": seeds,
            "command": command, "rows": per_seed}  # fmt: skip


def summary(study: dict) -> list[dict]:
    """Per row: mean accuracy over seeds, the accuracy of each, the difference from the default with its 95 %
    interval over the validation images of all seeds, whether that interval leaves out zero, mean seconds."""
    seeds, n = list(study["rows"].values()), held_out(study)
    by_model: dict[str, list[dict]] = {}
    for rows in seeds:
        for r in rows:
            by_model.setdefault(r["model"], []).append(r)
    default = by_model.get("default")
    p0 = _mean([r["val_accuracy_best"] for r in default]) if default else None
    out = []
    for model, rows in by_model.items():
        accs = [r["val_accuracy_best"] for r in rows]
        p = _mean(accs)
        seconds = _fmt(_mean([r["train_seconds"] for r in rows]), 0)
        row = {"row": model, "meaning": _meaning(model, study), "accuracy": _fmt(p),
               "per_seed": " / ".join(_fmt(a) for a in accs), "seconds": seconds}  # fmt: skip
        if p is not None and p0 is not None and model != "default":
            draws, draws0 = n * _done(accs), n * _done([r["val_accuracy_best"] for r in default])  # finished seeds
            half = 1.96 * math.sqrt(p * (1 - p) / draws + p0 * (1 - p0) / draws0)
            row["vs_default"] = f"{p - p0:+.3f} ± {half:.3f}"
            row["beyond_noise"] = "yes" if abs(p - p0) > half else "no"
        out.append(row)
    return out


def held_out(study: dict) -> int:
    """How many validation images the study's data holds (its val or test split)."""
    return next(v for k, v in study["images"].items() if k != "train")


def _meaning(model: str, study: dict) -> str:
    opts = study["options"]
    e1 = int(opts[opts.index("--epochs") + 1]) if "--epochs" in opts else 10
    e2 = int(opts[opts.index("--fine-tune-epochs") + 1]) if "--fine-tune-epochs" in opts else 10
    values = {"e1": e1, "e2": e2, "total": e1 + e2, "longer": LONGER * (e1 + e2), "lr": 0.001, "side": 32}
    return MEANINGS[study["ablation"]].get(model, model).format(**values)


def _done(values: list) -> int:
    return sum(v is not None for v in values)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "failed" if value is None else f"{value:.{digits}f}"


def plot_study(rows: list[dict], study: dict, path: Path) -> None:
    """Mean accuracy per row with the 95 % interval of one row's accuracy over the validation images of all seeds."""
    from transferlab.rundir.plots import plt, save_figure

    n = held_out(study) * len(study["seeds"])
    done = [r for r in rows if r["accuracy"] != "failed"]
    accs = [float(r["accuracy"]) for r in done]
    errors = [1.96 * math.sqrt(a * (1 - a) / n) for a in accs]
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(done)))
    ax.barh([r["row"] for r in done][::-1], accs[::-1], xerr=errors[::-1], color="#4c78a8", capsize=3)
    ax.set(xlabel=f"validation accuracy, mean of {len(study['seeds'])} seed(s) (95 % interval)", xlim=(0, 1))
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)


def values_of(results: dict, size: str, minutes: str) -> dict:
    """The placeholders of docs/guide.in.md: each study's table, command and sizes, and each row's figures."""
    values = {"when": results["when"], "size": size, "minutes": minutes, "backbone": BACKBONE, "longer": str(LONGER)}
    columns = ["row", "meaning", "accuracy", "per_seed", "vs_default", "beyond_noise", "seconds"]
    for name, study in results["studies"].items():
        rows = summary(study)
        values[f"{name}_table"] = markdown_table(rows, columns)
        values[f"{name}_command"] = study["command"]
        train = study["images"]["train"]
        values[f"{name}_data"] = f"{study['data']}, {train} training and {held_out(study)} validation images"
        values[f"{name}_seeds"] = str(len(study["seeds"]))
        values[f"{name}_settings"] = " ".join(study["options"])
        for r in rows:
            values[f"{name}_{r['row']}"] = r["accuracy"]
            values[f"{name}_{r['row']}_vs"] = r.get("vs_default", "")
            values[f"{name}_{r['row']}_s"] = r["seconds"]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="full")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs of an earlier call")
    parser.add_argument("--from-results", action="store_true", help="rewrite the page from guide_runs.json")
    parser.add_argument("--only", default=None, help="comma-separated studies to rerun; the others from the results")
    opts = parser.parse_args()
    began = time.perf_counter()
    work = ROOT / "runs" / f"docs-{opts.size}"
    if opts.from_results:
        results = json.loads(RESULTS.read_text())
    else:
        only = opts.only.split(",") if opts.only else list(SIZES[opts.size])
        if work.exists() and not opts.reuse:
            for name in only:
                shutil.rmtree(work / name, ignore_errors=True)
        studies = {name: run_study(name, SIZES[opts.size][name], work) for name in only}
        minutes = f"{(time.perf_counter() - began) / 60:.0f} minutes" + (", reusing earlier runs" if opts.reuse else "")
        results = {"when": datetime.date.today().isoformat(), "size": opts.size, "minutes": minutes,
                   "studies": studies}  # fmt: skip
        if opts.only:  # the other studies as the committed results hold them
            kept = json.loads(RESULTS.read_text())
            rerun = f"{kept['minutes']}; {', '.join(only)} rerun {datetime.date.today()}: {minutes}"
            results = {**kept, "studies": {**kept["studies"], **studies}, "minutes": rerun}
    # the guide's own figures only from its full runs; a tiny check draws its own beside its runs
    figures = DOCS / "figures" if results["size"] == "full" else work / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    if not opts.from_results:
        default_run = work / "recipe" / "seed0" / "default"
        if default_run.is_dir():
            shutil.copyfile(default_run / "augmentations.png", figures / "augmentations.png")
        for name, study in studies.items():
            seed0 = work / name / f"seed{study['seeds'][0]}"
            rows = [{"model": r["model"], "val_accuracy_best": r["val_accuracy_best"],
                     "train_seconds": r["train_seconds"]} for r in study["rows"][study["seeds"][0]]]  # fmt: skip
            plot_comparison(rows, seed0, figures / f"{name}_curves.png")
        if opts.size == "full":
            atomic_write(RESULTS, json.dumps(results, indent=1) + "\n")
    for name, study in results["studies"].items():
        plot_study(summary(study), study, figures / f"{name}.png")
    values = values_of(results, results["size"], results["minutes"])
    template = string.Template((DOCS / "guide.in.md").read_text())
    target = DOCS / "guide.md" if results["size"] == "full" else work / "guide.md"
    atomic_write(target, template.substitute(values))
    print(f"{target} and {figures} written from the runs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
