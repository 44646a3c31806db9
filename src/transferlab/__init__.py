"""transferlab: transfer learning on images from ImageNet-pretrained backbones.

No module of the package is named like a public name below, so importing one never shadows another.
"""

from transferlab.config import TrainConfig
from transferlab.errors import UserError
from transferlab.model.weights import create_backbone, find_weights
from transferlab.model.zoo import ZOO, BackboneSpec, get_spec

__all__ = [
    "ZOO", "BackboneSpec", "Learner", "TrainConfig", "UserError", "create_backbone", "evaluate_run", "export_run",
    "find_weights", "get_spec", "load_net", "open_predictor", "predict", "run_benchmark", "train",
]  # fmt: skip

_HOMES = {
    "train": "recipe.training", "evaluate_run": "inference.evaluate", "export_run": "inference.export",
    "load_net": "rundir.folder", "open_predictor": "inference.predictor", "predict": "inference.predictor",
    "run_benchmark": "benchmark", "Learner": "recipe.learner",
}  # fmt: skip


def __getattr__(name: str):
    """The training API loads torch, timm and Lightning: only when first used, so the CLI starts fast."""
    import importlib

    if name in _HOMES:
        return getattr(importlib.import_module(f"transferlab.{_HOMES[name]}"), name)
    raise AttributeError(name)
