"""Cached vs plain transfer training, and extraction throughput vs a bare inference loop.

Runs, in one process, on the same data, weights and settings:
1. extraction throughput: transferlab's cache extraction (decode, augment, backbone, write) against a
   bare ``model.forward_features(x)`` loop over the same images already decoded into batches;
2. the full recipe (feature extraction + fine-tuning, augmentation on) with ``cache="disk"`` (fresh
   cache folder) and with ``cache="none"`` (backbone recomputed every epoch), wall time and accuracy.

    .venv/bin/python benchmarks/speed.py                     # cats_and_dogs_filtered, 160 px, 10 + 10
    .venv/bin/python benchmarks/speed.py --data ../shared/datasets/hymenoptera --epochs 2 --fine-tune-epochs 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from transferlab import TrainConfig, train
from transferlab.data.cache import CacheKey, Pass, Store, fill
from transferlab.data.images import load_rgb
from transferlab.data.index import file_digest, index_folder
from transferlab.data.transforms import eval_transform
from transferlab.model.network import TransferNet
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import get_spec

ROOT = Path(__file__).resolve().parents[1]


def extraction_throughput(backbone: str, data: Path, size: int, n: int, batch: int, workers: int) -> dict:
    spec = get_spec(backbone)
    model, found = create_backbone(spec)
    samples = index_folder(data).train[:n]
    tf = eval_transform(spec, size, "crop")
    batches = [torch.stack([tf(load_rgb(s.path)) for s in samples[i : i + batch]]) for i in range(0, n, batch)]
    model.eval()
    with torch.inference_mode():
        model.forward_features(batches[0][:4])
        start = time.perf_counter()
        for x in batches:
            model.forward_features(x)
        bare = time.perf_counter() - start
    net = TransferNet(spec, model, 2).eval()
    with tempfile.TemporaryDirectory() as tmp:
        resize = f"crop{spec.crop_pct}"
        key = CacheKey(
            spec.name, found.digest(), size, spec.interpolation, resize, spec.mean, spec.std, "none", 1, "pooled"
        )
        start = time.perf_counter()
        digests = [file_digest(s.path) for s in samples]
        done = fill(net, samples, digests, {"pooled": Store(Path(tmp), key)}, Pass(tf, batch, workers))
        computed, ours = done.computed, time.perf_counter() - start
    assert computed == n
    return {
        "images": n,
        "bare_loop_images_per_second": round(n / bare, 2),
        "extraction_images_per_second": round(n / ours, 2),
        "ratio": round(bare / ours, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/datasets/cats_and_dogs_filtered"))
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--fine-tune-epochs", type=int, default=10)
    ap.add_argument("--throughput-images", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "runs" / "speed"))
    ap.add_argument("--skip-plain", action="store_true", help="only the cached path (accuracy runs)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = TrainConfig(data_dir=args.data).workers

    report: dict = {"settings": vars(args), "torch_threads": torch.get_num_threads()}
    report["extraction"] = extraction_throughput(
        args.backbone, Path(args.data), args.image_size, args.throughput_images, 64, workers
    )
    print("extraction:", json.dumps(report["extraction"]), flush=True)

    common = dict(
        data_dir=args.data,
        backbone=args.backbone,
        image_size=args.image_size,
        epochs=args.epochs,
        fine_tune_epochs=args.fine_tune_epochs,
    )
    paths = ["disk"] if args.skip_plain else ["disk", "none"]
    for cache in paths:
        with tempfile.TemporaryDirectory() as tmp:  # a cold cache: extraction is part of the cost
            start = time.perf_counter()
            m = train(TrainConfig(out=str(out / cache), cache=cache, cache_dir=tmp, **common), overwrite=True)
            wall = time.perf_counter() - start
        t = m["timings"]
        phase1 = t.get("extract_seconds", 0.0) + t["feature_extraction_seconds"]
        report[cache] = {
            "wall_seconds": round(wall, 1),
            "phase1_seconds": round(phase1, 1),
            "phase2_seconds": round(t.get("fine_tune_seconds", 0.0), 1),
            "best_val_accuracy": m["best_val_accuracy"],
            "feature_extraction_best_val_accuracy": m["feature_extraction_best_val_accuracy"],
            "best_epoch": m["best_epoch"],
        }
        print(cache, json.dumps(report[cache]), flush=True)
    if "none" in report:
        d, p = report["disk"], report["none"]
        report["speedup_end_to_end"] = round(p["wall_seconds"] / d["wall_seconds"], 2)
        report["speedup_phase1"] = round(p["phase1_seconds"] / d["phase1_seconds"], 2)
        report["val_accuracy_difference_points"] = round(100 * (d["best_val_accuracy"] - p["best_val_accuracy"]), 2)
        print(
            f"end to end {report['speedup_end_to_end']}x, feature-extraction phase {report['speedup_phase1']}x, "
            f"val accuracy cached - plain = {report['val_accuracy_difference_points']} points"
        )
    (out / "speed.json").write_text(json.dumps(report, indent=2))
    print(f"written to {out / 'speed.json'}")


if __name__ == "__main__":
    main()
