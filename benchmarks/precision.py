"""bf16 against float32 extraction on this machine: images per second, and what it does to accuracy.

Fills a float32 and a bf16 store for the same images (one clean view each), alternating
``--rounds`` times so that both see the same machine load, then fits the same L-BFGS linear
probe (transferlab.recipe.head_init, its decay chosen on held-out training images) on each and scores it
on the validation images.

    .venv/bin/python benchmarks/precision.py --data ../shared/datasets/hymenoptera --image-size 224
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from transferlab.data.cache import CacheKey, Pass, Store, fill
from transferlab.data.index import file_digest, index_folder
from transferlab.data.transforms import eval_transform
from transferlab.model.network import TransferNet
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import get_spec
from transferlab.recipe.head_init import head_accuracy, solve_head

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared/datasets/hymenoptera"))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    spec = get_spec("efficientnet_lite0")
    backbone, found = create_backbone(spec)
    index = index_folder(args.data)
    net = TransferNet(spec, backbone, len(index.classes)).eval()
    tf = eval_transform(spec, args.image_size, "crop")
    splits = {"train": index.train, "val": index.val}
    digests = {k: [file_digest(s.path) for s in v] for k, v in splits.items()}
    result: dict = {"images": sum(len(v) for v in splits.values()), "image_size": args.image_size}
    seconds = {"32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for precision in ("32", "bf16"):
                root = Path(tmp) / precision
                shutil.rmtree(root, ignore_errors=True)  # every round computes everything again
                key = CacheKey(spec.name, found.digest(), args.image_size, spec.interpolation, f"crop{spec.crop_pct}",
                               spec.mean, spec.std, "none", 1, "pooled", precision)  # fmt: skip
                start = time.perf_counter()
                stores = {"pooled": Store(root, key)}
                how = Pass(tf, workers=args.workers)
                used = {fill(net, splits[k], digests[k], stores, how).precision for k in splits}
                seconds[precision].append(time.perf_counter() - start)
                result[f"used_{precision}"] = sorted(used)
                if r == args.rounds - 1:
                    feats = {k: np.stack([Store(root, key).read(d) for d in digests[k]]) for k in splits}
                    labels = {k: [s.label for s in v] for k, v in splits.items()}
                    outputs = 1 if len(index.classes) == 2 else len(index.classes)
                    fitted = solve_head(feats["train"], labels["train"], outputs, torch.ones(len(index.classes)), 0)
                    x_val = torch.from_numpy(feats["val"][:, 0].astype(np.float32))
                    accuracy = head_accuracy(fitted["weight"], fitted["bias"], x_val, torch.tensor(labels["val"]))
                    result[f"probe_val_accuracy_{precision}"] = round(accuracy, 4)
    for precision, times in seconds.items():
        result[f"images_per_second_{precision}"] = round(result["images"] / min(times), 1)
    result["speedup_bf16"] = round(min(seconds["32"]) / min(seconds["bf16"]), 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
