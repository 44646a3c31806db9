"""Frozen-feature accuracy against input size: why the default size goes above a backbone's native one.

For each size, the backbone's pooled features of one clean view (the evaluation resize, no augmentation)
of every training and held-out image, then logistic regression (``transferlab.recipe.head_init.lbfgs``) at a few
weight decays; the held-out accuracy of each. No fine-tuning: the figure isolates the input size.

    .venv/bin/python benchmarks/image_size.py ../shared/datasets/hymenoptera --sizes 224,256,288
    .venv/bin/python benchmarks/image_size.py ../shared/datasets/cats_and_dogs_filtered --sizes 224,288
    .venv/bin/python benchmarks/image_size.py ../shared/datasets/hymenoptera --sizes 224 --backbone mobilenet_v2 \
        --weights ../shared/weights/coral/mobilenet_v2_1.0_224_quant.tflite
"""

from __future__ import annotations

import argparse
import time

import torch

from transferlab.data.images import BadImage, load_rgb
from transferlab.data.index import index_folder
from transferlab.data.transforms import eval_transform
from transferlab.model.network import TransferNet, num_outputs
from transferlab.model.tflite import spec_for
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import get_spec
from transferlab.recipe.head_init import DECAYS, head_accuracy, lbfgs


def features(net: TransferNet, samples: list, transform, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of the images that decode (a bad file is left out)."""
    images, labels = [], []
    for s in samples:
        try:
            images.append(transform(load_rgb(s.path)))
            labels.append(s.label)
        except BadImage:
            continue
    with torch.no_grad():
        rows = [net.features(torch.stack(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(rows), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="Folder of class sub-folders (or train/ + val/)")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--sizes", default="224,256,288", help="Comma-separated input sizes")
    parser.add_argument("--weights", default=None, help="A weights file (.pth, .safetensors, .tflite)")
    args = parser.parse_args()
    data = index_folder(args.data, 0.2, 0)
    spec = spec_for(get_spec(args.backbone), args.weights)
    net = TransferNet(spec, create_backbone(spec, args.weights)[0], len(data.classes)).eval()
    classes = len(data.classes)
    print("| size | seconds | " + " | ".join(f"decay {d:g}" for d in DECAYS) + " |")
    print("|---" * (len(DECAYS) + 2) + "|")
    for size in (int(s) for s in args.sizes.split(",")):
        began = time.perf_counter()
        transform = eval_transform(spec, size)
        (x_train, y_train), (x_val, y_val) = (features(net, samples, transform) for samples in (data.train, data.val))
        cells = []
        for decay in DECAYS:
            w, b = lbfgs(x_train, y_train, num_outputs(classes), torch.ones(classes), decay)
            cells.append(f"{head_accuracy(w, b, x_val, y_val):.4f}")
        print(f"| {size} | {time.perf_counter() - began:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
