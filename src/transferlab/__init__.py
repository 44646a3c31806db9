"""transferlab: transfer learning on images from ImageNet-pretrained backbones."""

from transferlab.errors import UserError
from transferlab.weights import create_backbone, find_weights
from transferlab.zoo import ZOO, BackboneSpec, get_spec

__all__ = [
    "ZOO", "BackboneSpec", "TrainConfig", "UserError", "create_backbone", "evaluate_run", "find_weights", "get_spec",
    "imagenet_top5", "load_net", "predict_run", "train",
]  # fmt: skip


def __getattr__(name: str):
    """The training API loads torch, timm and Lightning: only when first used, so the CLI starts fast."""
    import importlib

    homes = {
        "TrainConfig": "train", "train": "train", "evaluate_run": "evaluate", "imagenet_top5": "imagenet",
        "load_net": "run", "predict_run": "predict",
    }  # fmt: skip
    if name in homes:
        return getattr(importlib.import_module(f"transferlab.{homes[name]}"), name)
    raise AttributeError(name)
