"""More from one frozen pass (Head2Toe, Evci et al. 2022): logistic regression on the pooled outputs of several
layer groups against the last group's alone.

One clean view (the evaluation resize, no augmentation) of every training and held-out image goes once through
the frozen backbone; each layer group's output is average-pooled over its positions. Variants: ``last`` (the
recipe's features), ``last2`` (the last two groups' pooled outputs side by side), ``all`` (every group's). Each
variant's head is ``recipe/head_init.solve_head`` (features standardized, the decay chosen on held-out training
images' log-loss), scored on the held-out images. Per variant: its width, held-out accuracy and log-loss, the
feature store it would need (float16, one view per image) and the seconds of its fit; the one pass is shared.

    .venv/bin/python benchmarks/multi_layer.py ../shared/datasets/hymenoptera
    .venv/bin/python benchmarks/multi_layer.py ../shared/datasets/cifar10_5k --size 96
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader

from transferlab.data.datamodule import ImageDataset
from transferlab.data.index import index_folder, median_side, targets
from transferlab.data.transforms import eval_transform
from transferlab.model.network import TransferNet, num_outputs
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import default_size, get_spec
from transferlab.recipe.head_init import head_accuracy, solve_head
from transferlab.recipe.module import weighted_loss


def pooled_groups(net: TransferNet, samples: list, transform, workers: int) -> list[torch.Tensor]:
    """Each layer group's output of ``samples``, averaged over its positions: one [images, channels] per group."""
    loader = DataLoader(ImageDataset(samples, transform, [0] * len(samples)), batch_size=64, num_workers=workers)
    per_group: list[list[torch.Tensor]] = [[] for _ in net.groups]
    with torch.inference_mode():
        for x, _ in loader:
            x = x.contiguous(memory_format=torch.channels_last)
            for i, group in enumerate(net.groups):
                x = group(x)
                # a feature map [N, C, H, W], tokens [N, L, C], or already pooled [N, C]
                per_group[i].append(x.mean((2, 3)) if x.ndim == 4 else x.mean(1) if x.ndim == 3 else x)
    return [torch.cat(rows).float() for rows in per_group]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="Folder of class sub-folders (or train/ + val/)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--size", type=int, default=None, help="Input size (default: the recipe's for this set)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = index_folder(args.data, 0.2, args.seed)
    spec = get_spec(args.backbone)
    size = args.size or default_size(spec, median_side(data.train))
    net = TransferNet(spec, create_backbone(spec)[0], len(data.classes)).eval()
    transform = eval_transform(spec, size)
    began = time.perf_counter()
    train, val = (pooled_groups(net, part, transform, args.workers) for part in (data.train, data.val))
    pass_seconds = time.perf_counter() - began
    y_train = targets(data.train, len(data.classes), False)
    y_val = torch.tensor(targets(data.val, len(data.classes), False))
    outputs, weights = num_outputs(len(data.classes)), torch.ones(len(data.classes))
    variants = {"last": [-1], "last2": [-2, -1], "all": list(range(len(net.groups)))}
    print(json.dumps({"data": str(args.data), "size": size, "train": len(data.train), "val": len(data.val),
                      "pass_seconds": round(pass_seconds, 1), "groups": [t.shape[1] for t in train]}))  # fmt: skip
    print("| variant | width | held-out accuracy | held-out log-loss | store (MB) | fit seconds | decay |")
    print("|---|---|---|---|---|---|---|")
    for name, groups in variants.items():
        x_train = torch.cat([train[g] for g in groups], 1)
        x_val = torch.cat([val[g] for g in groups], 1)
        start = time.perf_counter()
        fit = solve_head(x_train[:, None].numpy(), y_train, outputs, weights, args.seed)
        seconds = time.perf_counter() - start
        w, b = fit["weight"], fit["bias"]
        accuracy, loss = head_accuracy(w, b, x_val, y_val), float(weighted_loss(x_val @ w.T + b, y_val))
        store = x_train.shape[1] * 2 * (len(data.train) + len(data.val)) / 1e6
        print(f"| {name} | {x_train.shape[1]} | {accuracy:.4f} | {loss:.4f} | {store:.1f} | {seconds:.1f} | "
              f"{fit['decay']:g} |")  # fmt: skip


if __name__ == "__main__":
    main()
