"""What the feature store costs as a dataset grows: run once per size, compare the JSON lines.

For N training images of a dataset (every class, evenly): indexing time, extraction time (the frozen backbone
once, ``--views`` views each), files and bytes on disk, the time to load the store for training
(read into memory when small, else memory-mapped), one epoch of head training from it, and the
process's peak memory. One process per size, so the peak is that size's own.

    .venv/bin/python benchmarks/cache_scale.py --images 5000
    .venv/bin/python benchmarks/cache_scale.py --images 50000
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from transferlab.data.cache import CacheKey, Pass, Store, fill
from transferlab.data.datamodule import CachedDataset
from transferlab.data.index import file_digest, index_folder
from transferlab.data.transforms import train_transform
from transferlab.model.network import TransferNet
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import get_spec

ROOT = Path(__file__).resolve().parents[1]


def head_epoch(dataset: CachedDataset, classes: int, batch_size: int) -> float:
    """Seconds for one epoch of a linear head over the cached features (Adam, shuffled batches)."""
    head = torch.nn.Linear(dataset[0][0].shape[-1], classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    start = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(x), y).backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/datasets/cifar10"))
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache-dir", default=None, help="default: a temporary folder, removed afterwards")
    args = ap.parse_args()
    spec = get_spec("efficientnet_lite0")
    backbone, found = create_backbone(spec)
    began = time.perf_counter()
    index = index_folder(args.data)
    samples = index.train[:: max(1, len(index.train) // args.images)][: args.images]  # every class, evenly
    result: dict = {"images": len(samples), "image_size": args.image_size, "views": args.views}
    result["index_seconds"] = round(time.perf_counter() - began, 1)
    net = TransferNet(spec, backbone, len(index.classes)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.cache_dir or tmp)
        key = CacheKey(spec.name, found.digest(), args.image_size, spec.interpolation, f"crop{spec.crop_pct}",
                       spec.mean, spec.std, "keras", args.views, "pooled")  # fmt: skip
        store = Store(root, key)
        start = time.perf_counter()
        digests = [file_digest(s.path) for s in samples]
        transform = train_transform(spec, args.image_size, "keras", "crop")
        done = fill(net, samples, digests, {"pooled": store}, Pass(transform, args.batch_size * args.views))
        result["extract_seconds"] = round(time.perf_counter() - start, 1)
        result["extracted"] = done.computed
        files = [p for p in store.dir.rglob("*.npy")]
        result["files"] = len(files)
        result["bytes_on_disk"] = sum(p.stat().st_size for p in files)
        labels = [s.label for s in samples]
        for mode, limit in (("preloaded", None), ("memory_mapped", 0)):
            from transferlab.data import datamodule

            saved = datamodule.PRELOAD_BYTES
            datamodule.PRELOAD_BYTES = saved if limit is None else limit
            start = time.perf_counter()
            dataset = CachedDataset(store, digests, labels, random_view=True)
            result[f"{mode}_load_seconds"] = round(time.perf_counter() - start, 2)
            result[f"{mode}_in_memory"] = dataset.preloaded is not None
            result[f"{mode}_head_epoch_seconds"] = round(head_epoch(dataset, len(index.classes), args.batch_size), 2)
            datamodule.PRELOAD_BYTES = saved
    result["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
