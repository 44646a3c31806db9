"""Backbone + new head, split into layer groups, with the freeze and BatchNorm policy.

The network is ``groups[0] -> ... -> groups[-1] -> pool -> head``. Splitting at a group index
``k`` gives a frozen *prefix* (``groups[:k]``), whose output can be computed once and cached,
and a trainable *top* (``groups[k:]``, pool, head).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from transferlab.config import FINE_TUNE_AT, FINE_TUNE_AT_UPSAMPLED
from transferlab.errors import UserError
from transferlab.model.groups import Delegate, Pooling, layer_groups
from transferlab.model.zoo import BackboneSpec


def pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling of a feature map (already pooled features pass through)."""
    return x.mean(dim=(2, 3)) if x.ndim == 4 else x


def num_outputs(num_classes: int, multi_label: bool = False) -> int:
    """One logit (sigmoid, binary cross-entropy) for two classes, as in the Keras recipe; else softmax. With
    several labels per image, a logit (sigmoid) per class, whatever their number."""
    return 1 if num_classes == 2 and not multi_label else num_classes


def logits_to_probabilities(logits: torch.Tensor, multi_label: bool = False) -> torch.Tensor:
    """Class probabilities for either head shape: [N, C] (each its own sigmoid when an image has several labels)."""
    if multi_label:
        return torch.sigmoid(logits)
    if logits.shape[-1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=-1)
    return logits.softmax(-1)


def kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's ``k``-th largest value (as ``topk``'s last), by ``k`` maxima, each masking one position: ops
    every exporter has (TFLite has no sort)."""
    positions = torch.arange(x.shape[1], device=x.device)
    for _ in range(k - 1):
        x = x.masked_fill(positions == x.argmax(1, keepdim=True), float("-inf"))
    return x.max(1).values


class TransferNet(nn.Module):
    """The classifier: a pretrained backbone's layer groups, global average pooling, dropout, dense."""

    def __init__(
        self, spec: BackboneSpec, backbone: nn.Module, num_classes: int, dropout: float = 0.2, multi_label: bool = False
    ) -> None:  # fmt: skip
        super().__init__()
        self.spec, self.multi_label = spec, multi_label
        self.groups = nn.ModuleList(layer_groups(backbone, spec.family, spec.min_size))
        object.__setattr__(self, "backbone", backbone)  # timm's model, whose modules the groups hold (not twice)
        outputs = num_outputs(num_classes, multi_label)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(spec.feature_dim, outputs))
        # the "none of these" score's reference, saved with the weights (``set_bank``): the training images'
        # normalized pooled features, and which nearest of them the score reads
        self.register_buffer("bank", None)
        self.register_buffer("bank_k", None)
        self.frozen_upto = len(self.groups)  # groups below this index are frozen
        self.train_bn = False
        self.bn_always_train = False  # ablation only: BatchNorm in training mode even while frozen
        self.freeze(len(self.groups))
        # NHWC convolutions run faster on CPUs (benchmarks/speed.py; figures in docs/benchmarks.md)
        self.to(memory_format=torch.channels_last)

    @property
    def feature_map_layer(self) -> nn.Module:
        """The last module whose output is the backbone's feature map (Grad-CAM's target): before timm's pooling."""
        last = self.groups[-1]
        return last[-2] if len(last) > 1 and isinstance(last[-1], Pooling) else last

    def forward_groups(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Groups ``[start, stop)`` applied to ``x`` (the input of group ``start``)."""
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in self.groups[start:stop]:
            x = group(x)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of images."""
        return pool(self.forward_groups(x))

    def set_bank(self, features: torch.Tensor, neighbours: int) -> None:
        """Keep the training images' pooled ``features`` for ``similarity``, which reads the ``neighbours``-th
        nearest, or a nearer one for a small set (one in twenty of its images: a tenth neighbour of a class of
        sixteen is half a class away; ``benchmarks/open_world.py``)."""
        self.bank = nn.functional.normalize(features.float(), dim=1)
        self.bank_k = torch.tensor(max(1, min(neighbours, len(features) // 20)))

    @property
    def neighbours(self) -> int:
        """Which nearest training image the score reads (0: the network keeps none)."""
        return 0 if self.bank_k is None else int(self.bank_k)

    def similarity(self, features: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Each image's "none of these" score: the cosine similarity of its pooled ``features`` to the k-th most
        similar training image's (k nearest neighbours, Sun et al. 2022; ``inference/unknown.py``); ``k``: the
        network's ``neighbours``, read once by a caller that traces it (an export)."""
        return kth_largest(nn.functional.normalize(features, dim=1) @ self.bank.T, k or self.neighbours)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A checkpoint with training images' features brings them (any number), one without leaves none: a run's
        best.ckpt after its finish, and the weights of a training epoch or an older run, both load."""
        for name in ("bank", "bank_k"):
            value = state_dict.get(prefix + name)
            setattr(self, name, None if value is None else torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def top(self, z: torch.Tensor, start: int) -> torch.Tensor:
        """Logits from group ``start``'s input: the part that trains when groups below are frozen."""
        return self.head(pool(self.forward_groups(z, start)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(x, 0)

    def freeze(self, upto: int, train_bn: bool = False) -> None:
        """Freeze groups ``[0, upto)``, unfreeze the rest; BatchNorm stays in inference mode unless ``train_bn``."""
        self.frozen_upto, self.train_bn = upto, train_bn
        for i, group in enumerate(self.groups):
            group.requires_grad_(i >= upto)
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if self.bn_always_train:
            return self
        for i, group in enumerate(self.groups):
            if i < self.frozen_upto:
                group.eval()  # Keras' base(x, training=False): frozen layers never update statistics
            elif not self.train_bn:
                for m in group.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self


class Judged(nn.Module):
    """Images in; class probabilities and each image's "none of these" score out: its ``similarity`` to the
    training images when the network keeps them, else its top probability. ``normalize``: the input is RGB in
    [0, 1] and the backbone's normalization runs inside; ``uint8`` (the exports): the input is 8-bit RGB as
    images decode, N x S x S x 3, brought to [0, 1] N x 3 x S x S inside too."""

    def __init__(self, net: TransferNet, normalize: bool = False, uint8: bool = False) -> None:
        super().__init__()
        self.net, self.normalize, self.uint8 = net, normalize or uint8, uint8
        self.k = net.neighbours  # a constant of the graph, as exporters need
        self.register_buffer("mean", torch.tensor(net.spec.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(net.spec.std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.uint8:
            x = x.permute(0, 3, 1, 2).float() / 255
        if self.normalize:
            x = (x - self.mean) / self.std
        features = self.net.features(x)
        probs = logits_to_probabilities(self.net.head(features), self.net.multi_label)
        score = probs.max(1).values if self.net.bank is None else self.net.similarity(features, self.k)
        return probs, score


class Softmaxed(nn.Module):
    """A classifier's logits as ``Judged``'s outputs: probabilities and the top probability (a backbone's own
    ImageNet head, which has no training images to compare with)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.model(x).softmax(-1)
        return probs, probs.max(1).values


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An inference-only copy of ``module`` with each BatchNorm that follows a convolution folded into it.

    A frozen BatchNorm in inference mode is a per-channel affine map, so it can be folded into
    the convolution before it (timm's BatchNormAct2d keeps its activation). Pairs are found by
    module order; ``extract`` and the predictors (``inference``) check the folded copy against the
    original on real images and fall back to the original if they ever disagree.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    module = copy.deepcopy(module).eval().requires_grad_(False)
    for parent in list(module.modules()):
        if isinstance(parent, Delegate):
            continue  # its modules run inside timm's own code, which reads them from the backbone
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or bn.num_features != conv.out_channels:
                continue
            conv.weight, conv.bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
            )
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            parent._modules[b] = nn.Sequential(*rest)  # empty: identity
    return module.to(memory_format=torch.channels_last)


def outputs_agree(output: torch.Tensor, reference: torch.Tensor) -> bool:
    """Whether a faster way's ``output`` is ``reference`` to float tolerance (a folded copy's check)."""
    return torch.allclose(output, reference, rtol=1e-3, atol=1e-3 * float(reference.abs().max()))


def default_fine_tune_at(size: int, median_side: int) -> float:
    """Where unfreezing starts when not given: deeper for images upsampled to twice their size or more."""
    return FINE_TUNE_AT_UPSAMPLED if 2 * median_side <= size else FINE_TUNE_AT


def resolve_fine_tune_at(value: str | float | int | None, num_groups: int, default: float = FINE_TUNE_AT) -> int:
    """Where unfreezing starts: a group index (``6``, ``-1``) or a fraction (``0.65``); else ``default``.

    A fraction in [0, 1) maps onto any number of groups (rounded, and never past the top group), so the default
    depth holds for every backbone; an index or fraction outside the backbone is refused in one line.
    """
    if value is None or value == "":
        value = default
    text = str(value)
    try:
        fraction = None if text.lstrip("-").isdigit() else float(text)
        index = int(text) if fraction is None else min(round(fraction * num_groups), num_groups - 1)
    except ValueError:
        raise UserError(f"--fine-tune-at {value!r}: give a layer-group index or a fraction such as 0.65") from None
    if fraction is not None and not 0 <= fraction < 1:
        raise UserError(f"--fine-tune-at {value!r}: a fraction of the backbone is at least 0 and below 1, such as 0.65")
    if index < 0:
        index += num_groups
    if not 0 <= index < num_groups:
        raise UserError(
            f"--fine-tune-at {value!r} is outside the backbone's {num_groups} layer groups: use 0..{num_groups - 1}"
        )
    return index
