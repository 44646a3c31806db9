"""How long the default recipe would take on a whole dataset here: measured throughput, projected wall time.

For each backbone: the cache-filling pass (decode, resize, BatchNorm-folded frozen groups, bf16
where it is faster, writes) timed on ``--sample`` images, and one timed training step of the
fine-tuned top on the cached prefix; the projection multiplies them out for the default recipe
(two cached views, 10 head epochs on pooled features, 10 fine-tuning epochs).

    .venv/bin/python benchmarks/projection.py --data ../shared/datasets/cifar10 --backbones lite --image-size 224
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from transferlab.data.cache import CacheKey, Pass, Store, bf16_available, fill
from transferlab.data.index import file_digest, index_folder
from transferlab.data.transforms import train_transform
from transferlab.files import markdown_table
from transferlab.model.network import TransferNet, resolve_fine_tune_at
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import expand_names, get_spec

ROOT = Path(__file__).resolve().parents[1]


def measure(name: str, samples: list, size: int, classes: int, batch: int) -> dict:
    spec = get_spec(name)
    backbone, found = create_backbone(spec)
    net = TransferNet(spec, backbone, classes).eval()
    at = resolve_fine_tune_at(None, len(net.groups))
    precision = "bf16" if bf16_available(torch.device("cpu")) else "32"
    with tempfile.TemporaryDirectory() as tmp:
        key = CacheKey(spec.name, found.digest(), size, spec.interpolation, f"crop{spec.crop_pct}", spec.mean,
                       spec.std, "keras", 1, "pooled", precision)  # fmt: skip
        stores = {o: Store(Path(tmp), dataclasses.replace(key, output=o)) for o in ("pooled", f"prefix{at}")}
        digests = [file_digest(s.path) for s in samples]
        start = time.perf_counter()
        done = fill(net, samples, digests, stores, Pass(train_transform(spec, size, "keras", "crop"), batch))
        extract = len(samples) / (time.perf_counter() - start)
        prefix = torch.from_numpy(stores[f"prefix{at}"].read(digests[0])[:1].astype("float32")).repeat(batch, 1, 1, 1)
    net.freeze(at)
    net.train()
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    y = torch.zeros(batch, dtype=torch.long)
    steps = []
    for _ in range(3):  # a warm-up step, then the best of two
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net.top(prefix, at), y).backward()
        optimizer.step()
        steps.append(time.perf_counter() - start)
    step = min(steps[1:])
    return {"backbone": name, "precision": done.precision, "extract_images_per_second": round(extract, 1),
            "fine_tune_images_per_second": round(batch / step, 1)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/datasets/cifar10"))
    ap.add_argument("--backbones", default="lite")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--sample", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    index = index_folder(args.data)
    sample = index.train[:: max(1, len(index.train) // args.sample)][: args.sample]
    n_train, n_val = len(index.train), len(index.val)
    rows = []
    for name in expand_names(args.backbones):
        r = measure(name, sample, args.image_size, len(index.classes), args.batch_size)
        extraction = (2 * n_train + n_val) / r["extract_images_per_second"]
        fine_tune = 10 * (n_train + n_val / 3) / r["fine_tune_images_per_second"]  # val: forward only
        hours = {"extraction": extraction / 3600, "fine_tune": fine_tune / 3600}
        hours["total"] = hours["extraction"] + hours["fine_tune"]
        r.update({f"projected_{k}_hours": round(v, 2) for k, v in hours.items()})
        rows.append(r)
        print(json.dumps(r), flush=True)
    print(f"{n_train} training and {n_val} validation images, {args.image_size} px")
    print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
