"""The LightningModule of one phase: the loss, the metrics (torchmetrics) and the optimizer.

It trains ``net.top(x, start)``: the network from layer group ``start`` on. On the plain path
``x`` is an image batch and ``start`` is 0; on the cached path ``x`` is what the frozen groups
below ``start`` output, read from the feature cache.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, Metric, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MultilabelAccuracy, MultilabelAveragePrecision

from transferlab.config import OPTIMIZERS
from transferlab.model.network import TransferNet, logits_to_probabilities

if TYPE_CHECKING:
    from transferlab.data.index import DataIndex


def weighted_loss(
    logits: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor | None = None, smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy (binary for a one-logit head), a mean over images weighted by their class's weight. Targets of
    several labels per image (a 0/1 row each): binary cross-entropy per class, its mean over classes and images.

    ``smoothing`` moves that much of each target's probability evenly over all the classes (both for the
    one-logit head: a target of 1 becomes 1 - smoothing / 2; for each class of several labels likewise).
    """
    if y.ndim == 2:
        target = y.to(logits.dtype) * (1 - smoothing) + smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, target)
    w = class_weights[y] if class_weights is not None else torch.ones_like(y, dtype=logits.dtype)
    if logits.shape[-1] == 1:
        target = y.float() * (1 - smoothing) + smoothing / 2
        per_image = F.binary_cross_entropy_with_logits(logits[:, 0], target, reduction="none")
    else:
        per_image = F.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing)
    return (per_image * w).sum() / w.sum()


def mix(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al., 2018): each input blended with another of the batch, by a weight from Beta(alpha, alpha).

    Returns the blended batch, each row's partner (an index into the batch) and the weight of the row itself.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = torch.randperm(len(x), device=x.device)
    return lam * x + (1 - lam) * x[partner], partner, lam


class Positives(Metric):
    """Images labelled with each class so far (of several labels per image), summed over every process."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.add_state("counts", torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, y: torch.Tensor) -> None:
        self.counts += y.float().sum(0)

    def compute(self) -> torch.Tensor:
        return self.counts


class TransferModule(pl.LightningModule):
    """Cross-entropy (binary for a one-logit head), accuracy and mean loss per epoch, over every process.

    ``class_weights``, ``smoothing`` and ``mixup`` shape the training loss only (weights: a weighted mean, as
    ``F.cross_entropy`` takes its ``weight``); the validation loss stays the plain mean, comparable between runs.
    With ``mixup`` (a Beta alpha), each training batch is blended with itself shuffled (``mix``), the loss is
    the same blend of the two labels' losses, and training accuracy counts the label with the larger share.

    With ``multi_label`` (several labels per image): a sigmoid per class, binary cross-entropy, the accuracy of
    each image-class decision at 0.5 (fastai's ``accuracy_multi``), and the validation images' mean average
    precision over classes (``val_map``), which picks the best epoch.
    """

    def __init__(
        self, net: TransferNet, start: int, lr: float, optimizer: str, num_classes: int,
        class_weights: Sequence[float] | None = None, smoothing: float = 0.0, mixup: float = 0.0,
        schedule: str = "constant", multi_label: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.net, self.start, self.lr, self.optimizer_name = net, start, lr, optimizer
        self.smoothing, self.mixup, self.schedule, self.multi_label = smoothing, mixup, schedule, multi_label
        weights = torch.ones(num_classes) if class_weights is None else torch.tensor(class_weights).float()
        self.register_buffer("class_weights", weights, persistent=False)  # not in checkpoints: from the data
        n = max(2, num_classes)
        # exact epoch figures: weighted by batch size, summed across processes before they are read
        self.train_accuracy, self.val_accuracy = (
            (MultilabelAccuracy(num_classes, average="micro"), MultilabelAccuracy(num_classes, average="micro"))
            if multi_label
            else (MulticlassAccuracy(n, average="micro"), MulticlassAccuracy(n, average="micro"))
        )
        # per class, and the classes with positives: a class no validation image has would add a zero to the mean
        self.val_ap = MultilabelAveragePrecision(num_classes, average="none") if multi_label else None
        self.val_positives = Positives(num_classes) if multi_label else None
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.val_images = SumMetric()

    @staticmethod
    def balance_weights(data: DataIndex, balance: bool = True) -> list[float] | None:
        """Loss weight per class, inversely proportional to its training images, of mean 1; None when sizes agree.

        Without them the loss rewards the prior: on a 10:1 split, never naming the small class scores 0.91.
        """
        counts = Counter(s.label for s in data.train)
        sizes = [counts[c] for c in range(len(data.classes))]
        if not balance or data.multi_label or len(set(sizes)) == 1:  # every class has images: checked when indexing
            return None
        inverse = [1 / n for n in sizes]
        return [round(w * len(inverse) / sum(inverse), 6) for w in inverse]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.top(x, self.start)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, training: bool = False) -> torch.Tensor:
        """Mean cross-entropy of the batch; ``training``: class weights and label smoothing applied."""
        if not training:
            return weighted_loss(logits, y)
        return weighted_loss(logits, y, self.class_weights, self.smoothing)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        training = stage == "train"
        if training and self.mixup:
            x, partner, lam = mix(x, self.mixup)
            logits = self(x)
            loss = lam * self.loss(logits, y, training) + (1 - lam) * self.loss(logits, y[partner], training)
            y = y if lam >= 0.5 else y[partner]  # the label with the larger share, for the accuracy
        else:
            logits = self(x)
            loss = self.loss(logits, y, training)
        accuracy, mean_loss = getattr(self, f"{stage}_accuracy"), getattr(self, f"{stage}_loss")
        probs = logits_to_probabilities(logits.detach(), self.multi_label)
        accuracy(probs if self.multi_label else probs.argmax(-1), y.round().int() if self.multi_label else y)
        mean_loss(loss.detach(), weight=len(y))
        kw = {"on_step": False, "on_epoch": True, "batch_size": len(y)}
        self.log(f"{stage}_loss", mean_loss, prog_bar=True, **kw)
        self.log(f"{stage}_accuracy", accuracy, prog_bar=True, **kw)
        if stage == "val" and self.multi_label:
            self.val_ap.update(probs, y.int())
            self.val_positives.update(y.sum(0))
        if stage == "val":
            self.val_images(torch.tensor(float(len(y)), device=y.device))
            self.log("val_images", self.val_images, **kw)
        return loss

    def training_step(self, batch, _):
        return self._step(batch, "train")

    def validation_step(self, batch, _):
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.multi_label:  # both computed over every process's images
            with warnings.catch_warnings():  # a class without positives: its AP is left out of the mean below
                warnings.simplefilter("ignore", UserWarning)
                ap = self.val_ap.compute()
            present = self.val_positives.compute() > 0
            self.log("val_map", ap[present].mean() if present.any() else ap.new_zeros(()))
            self.val_ap.reset()
            self.val_positives.reset()

    def configure_optimizers(self):
        """The optimizer over the trainable parameters; with ``schedule="cosine"``, its rate falls from ``lr``
        along a half cosine over the phase's epochs (to 2.4 % of it in the last of ten)."""
        params = [p for p in self.net.parameters() if p.requires_grad]
        optimizer = getattr(torch.optim, OPTIMIZERS[self.optimizer_name])(params, lr=self.lr)
        if self.schedule == "constant":
            return optimizer
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "epoch"}}
