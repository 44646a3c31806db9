"""The defaults on sets nobody tuned them on: the default recipe, the plain path (``--cache none``) and a probe of
the same backbone's frozen features, on sets composed from the shared data (other classes, other sizes, fewer
images per class) beside the shared ones.

Each set is linked (never copied) into ``OUT/data/NAME/{train,val}/class/``. Per set: ``transferlab train`` with
the defaults (plus ``--image-size`` where the set's pictures are small), the same with ``--cache none``, and the
probe: logistic regression on one clean view of every training image's pooled features
(``recipe/head_init.solve_head``, its decay chosen on held-out training images), scored on the validation images.
Wall seconds are each process's whole run, start-up included; the probe's its feature pass and fit.

    .venv/bin/python benchmarks/defaults.py --out runs/defaults --json runs/defaults/rows.json
    .venv/bin/python benchmarks/defaults.py --sets hym_small --ways default,probe -- --epochs 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
CIFAR = DATASETS / "cifar10_5k"
# name: (source, classes (None: all), training and validation images per class (None: all), image size or None)
SETS = {
    "hymenoptera": ("hymenoptera", None, None, None, None),
    "cats_dogs_100": ("cats_and_dogs_filtered", None, 100, 100, 160),
    "cifar_animals_60": ("cifar10_5k", ["bird", "cat", "deer", "dog", "frog"], 60, 40, 96),
    "cifar_vehicles_30": ("cifar10_5k", ["airplane", "automobile", "ship", "truck"], 30, 50, 96),
    "cifar10_100": ("cifar10_5k", None, 100, 50, 96),
    "four_animals_20": ("mixed", None, 20, 50, 160),  # ants, bees (hymenoptera), cats, dogs: 20 to train on each
    "cats_and_dogs": ("cats_and_dogs_filtered", None, None, None, None),  # the other two shared sets, whole
    "cifar10_5k": ("cifar10_5k", None, None, None, None),
    "hym_small": ("hymenoptera", None, 8, 8, 96),  # for a smoke run
}
# each way of training: its extra `transferlab train` options ("probe" is the logistic regression, no training)
WAYS = {
    "default": [], "plain": ["--cache", "none"], "probe": None,
    **{f"views{n}": ["--cache-views", str(n)] for n in (2, 4, 8)},
}  # fmt: skip


def _held_out(source: Path) -> Path:
    return next(source / s for s in ("val", "validation", "test") if (source / s).is_dir())


def _link(images: list[Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for image in images:
        link = dest / image.name
        if not link.exists():
            link.symlink_to(image.resolve())


def compose(name: str, out: Path) -> Path:
    """The set ``name`` of SETS as a folder of links (the shared folder itself for a whole shared set)."""
    source, classes, train, val, _ = SETS[name]
    if train is None:
        return DATASETS / source
    dest = out / name
    hym, pets = DATASETS / "hymenoptera", DATASETS / "cats_and_dogs_filtered"
    sources = (
        {"ants": hym, "bees": hym, "cats": pets, "dogs": pets}
        if source == "mixed"
        else {c: DATASETS / source for c in classes or sorted(p.name for p in (DATASETS / source / "train").iterdir())}
    )
    for c, root in sources.items():
        for split, folder, n in (("train", root / "train", train), ("val", _held_out(root), val)):
            _link(sorted((folder / c).iterdir())[:n], dest / split / c)
    return dest


def _train(data: Path, run: Path, size: int | None, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "transferlab", "train", str(data), "--out", str(run), "--overwrite", "--seed", "0"]
    cmd += (["--image-size", str(size)] if size else []) + extra
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    m = json.loads((run / "metrics.json").read_text())
    return {"accuracy": m["best_val_accuracy"], "seconds": round(time.perf_counter() - start, 1),
            "head": m.get("head_val_accuracy"), "best_epoch": m["best_epoch"]}  # fmt: skip


def probe(data: Path, size: int | None, backbone: str = "efficientnet_lite0", seed: int = 0) -> dict:
    """Logistic regression on one clean view of the pretrained backbone's pooled features."""
    import numpy as np
    import torch

    from transferlab.data.images import Preprocess
    from transferlab.data.index import index_folder, median_side
    from transferlab.inference.predictor import pooled_features
    from transferlab.model.network import TransferNet, num_outputs
    from transferlab.model.weights import create_backbone
    from transferlab.model.zoo import default_size, get_spec
    from transferlab.recipe.head_init import head_accuracy, solve_head

    start = time.perf_counter()
    index = index_folder(data, 0.2, seed)
    spec = get_spec(backbone)
    size = size or default_size(spec, median_side(index.train))
    net = TransferNet(spec, create_backbone(spec)[0], len(index.classes))
    prep = Preprocess(size, spec.interpolation, "crop", spec.crop_pct, spec.mean, spec.std)
    train, val = (pooled_features(net, prep, [s.path for s in part], 1) for part in (index.train, index.val))
    n = len(index.classes)
    fit = solve_head(train[:, None].numpy(), [s.label for s in index.train], num_outputs(n), torch.ones(n), seed)
    accuracy = head_accuracy(fit["weight"], fit["bias"], val, torch.tensor([s.label for s in index.val]))
    return {"accuracy": round(float(np.float32(accuracy)), 4), "seconds": round(time.perf_counter() - start, 1),
            "decay": fit["decay"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(list(SETS)[:6]), help=f"Comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--ways", default="default,plain,probe", help=f"Comma-separated, of {', '.join(WAYS)}")
    parser.add_argument("--out", type=Path, default=Path("runs/defaults"))
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here")
    parser.add_argument("train_args", nargs="*", help="Extra `transferlab train` options (after --)")
    args = parser.parse_args()
    rows = []
    for name in args.sets.split(","):
        data = compose(name, args.out / "data")
        size = SETS[name][4]
        row = {"set": name, "classes": len(list((data / "train").iterdir())),
               "train_images": len(list((data / "train").glob("*/*")))}  # fmt: skip
        for way in args.ways.split(","):
            if way == "probe":
                result = probe(data, size)
            else:
                result = _train(data, args.out / "runs" / name / way, size, WAYS[way] + args.train_args)
            row[way], row[f"{way}_s"] = result["accuracy"], result["seconds"]
            if result.get("head") is not None:  # the closed-form head before any epoch (epoch 0 of the history)
                row[f"{way}_head"] = result["head"]
            print(json.dumps({"set": name, "way": way, **result}), file=sys.stderr, flush=True)
        rows.append(row)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=2))
    from transferlab.files import markdown_table

    ways = args.ways.split(",")
    print(markdown_table(rows, ["set", "classes", "train_images"] + [c for w in ways for c in (w, f"{w}_s")]))


if __name__ == "__main__":
    main()
