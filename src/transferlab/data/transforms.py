"""The per-backbone pixel pipelines: resize (``images.to_square``), augmentation, normalization.

Preprocessing is never the user's job: each backbone's size, resize rule, mean and std come
from its zoo spec, so raw or wrongly normalized pixels cannot reach a backbone.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from transferlab.config import AUGMENTS
from transferlab.data.images import decode_side, load_rgb, to_square
from transferlab.model.zoo import BackboneSpec

# the random steps of every augmentation below; what a pipeline holds besides them is deterministic
AUGMENTATIONS = (v2.RandomHorizontalFlip, v2.RandomAffine, v2.RandomResizedCrop, v2.ColorJitter)


def _finish(spec: BackboneSpec) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]


class ToSquare:
    """``images.to_square`` as a transform (a class, so that loader workers can pickle it)."""

    def __init__(self, spec: BackboneSpec, size: int, resize: str) -> None:
        self.args = (size, spec.interpolation, resize, spec.crop_pct)

    def __call__(self, im):
        return to_square(im, *self.args)

    def load(self, path):
        """The picture at ``path``, decoded as large as this resize needs."""
        size, _, resize, crop_pct = self.args
        return load_rgb(path, decode_side(size, resize, crop_pct))


def load_for(transform: v2.Compose, path):
    """The picture at ``path`` for ``transform``: decoded only as large as its leading resize needs."""
    first = transform.transforms[0] if isinstance(transform, v2.Compose) and transform.transforms else None
    return first.load(path) if isinstance(first, ToSquare) else load_rgb(path)


def train_transform(spec: BackboneSpec, size: int, augment: str = "keras", resize: str = "crop") -> v2.Compose:
    """Training pipeline: ``size`` x ``size`` by the ``resize`` rule (upsampling small images), then augmentation.

    ``keras`` is the classic recipe's RandomFlip("horizontal"), RandomRotation(0.2) (a fifth of
    a full turn either way) and RandomZoom(0.2); ``strong`` adds crops and colour jitter.
    """
    fill = [round(255 * m) for m in spec.mean]  # rotated-in corners get the mean colour (0 after normalizing)
    ops: list = [ToSquare(spec, size, resize)]
    if augment == "keras":
        ops += [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=72, scale=(0.8, 1.2), fill=fill)]
    elif augment == "strong":
        ops += [
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomAffine(degrees=30, scale=(0.9, 1.1), fill=fill),
            v2.ColorJitter(0.3, 0.3, 0.3, 0.05),
        ]
    elif augment != "none":
        raise ValueError(f"augment must be one of {AUGMENTS}")
    return v2.Compose(ops + _finish(spec))


def eval_transform(spec: BackboneSpec, size: int, resize: str = "crop") -> v2.Compose:
    """Validation/prediction pipeline for a trained run: the same resize, no augmentation."""
    return train_transform(spec, size, "none", resize)


def denormalize(x: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """Back to [0, 1] pixels, for showing augmented images."""
    mean = torch.tensor(spec.mean).view(-1, 1, 1)
    std = torch.tensor(spec.std).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1)


def imagenet_transform(spec: BackboneSpec) -> v2.Compose:
    """The evaluation pipeline the backbone was published with (resize, centre crop, normalize)."""
    return eval_transform(spec, spec.input_size, "crop")
