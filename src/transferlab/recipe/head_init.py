"""The head fitted in closed form before feature extraction trains: L-BFGS on the cached features.

Logistic regression on frozen features is convex: L-BFGS reaches its optimum in seconds, where
a few epochs of Adam with dropout stop short of it (benchmarks/head_init.py compares the two).
Its one choice, the weight decay, is made on a slice of the *training* images held out
from the fit, never on the validation set that later picks the best epoch, by the held-out log-loss: a
hundred held-out images change their accuracy in steps of one image, which can tip the choice to a decay
that overfits, where their mean loss moves smoothly. The features are standardized for the fit (each
dimension to mean 0 and variance 1 over the training rows), so that one decay means the same for every
backbone and every dimension; the fitted head is mapped back onto the raw features it will see.

Two heads are fitted when the cache holds a clean view (view 0 of every store of two views or more): on every
cached view, and on the clean view alone, which is the probe (logistic regression on one clean view of the frozen
features). The one that scores better on the validation images starts feature extraction, and the Recipe keeps
it as epoch 0 of the history: the best epoch is chosen among it and every epoch after, so that no run ends below
the probe, nor below the head its training started from. Without a cache (``--cache none``) the probe is the head,
its features computed in one pass over the training images.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from transferlab.data.cache import clean_view
from transferlab.data.datamodule import CachedDataset, ImageDataset, TransferData
from transferlab.data.index import stratified_indices
from transferlab.progress import counted
from transferlab.recipe.module import weighted_loss

DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # L2 on the weights, against the mean loss
HOLDOUT = 0.2  # fraction of each class's training images the decay is chosen on
TIE = 1e-3  # held-out losses this close (relative) count as equal, and the stronger decay of them is taken


def lbfgs(x: torch.Tensor, y: torch.Tensor, outputs: int, weights: torch.Tensor, decay: float, steps: int = 200):
    """Weights and bias of the linear head minimising the (class-weighted) loss plus ``decay``/2 |W|^2."""
    w = torch.zeros(outputs, x.shape[1], requires_grad=True)
    b = torch.zeros(outputs, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = weighted_loss(x @ w.T + b, y, weights) + decay / 2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def head_accuracy(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the linear head ``w``, ``b`` on features ``x`` (one logit: positive means the second class; with
    several labels per image, each image-class decision at probability 0.5, as the training metric counts it)."""
    logits = x @ w.T + b
    if y.ndim == 2:
        return float(((logits > 0) == (y > 0.5)).float().mean())
    predicted = (logits[:, 0] > 0).long() if w.shape[0] == 1 else logits.argmax(-1)
    return float((predicted == y).float().mean())


def _score(fitted: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[float, ...]:
    """How a fitted head ranks on validation features, as ``callbacks.best_key`` ranks epochs: accuracy, then
    loss (with several labels per image, the loss alone: the mean average precision is the module's)."""
    w, b = fitted["weight"], fitted["bias"]
    loss = float(weighted_loss(x @ w.T + b, y))
    return (-loss,) if y.ndim == 2 else (head_accuracy(w, b, x, y), -loss)


def solve_head(feats: np.ndarray, labels: list, outputs: int, weights: torch.Tensor, seed: int) -> dict:
    """Choose the decay on held-out training images, refit on all of them; ``feats`` is [images, views, dim].

    ``labels``: class indices, or 0/1 rows for several labels per image; the fit is then one-vs-rest (a logistic
    regression per class: their losses are independent) and the decay is chosen on the held-out log-loss.
    """
    raw = torch.from_numpy(np.asarray(feats, dtype=np.float32))
    mean, std = raw.flatten(0, 1).mean(0), raw.flatten(0, 1).std(0).clamp_min(1e-6)
    x = (raw - mean) / std
    multi = isinstance(labels[0], np.ndarray)
    y = target_tensor(labels)
    views = x.shape[1]
    keys = [int(r.argmax()) if r.any() else -1 for r in labels] if multi else labels
    fit, held = stratified_indices(keys, HOLDOUT, seed)

    def rows(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return x[idx].flatten(0, 1), y[idx].repeat_interleave(views, dim=0)

    losses, accuracies = {}, {}
    for decay in DECAYS:  # each scored on the clean-ish first view of each held-out image
        w, b = lbfgs(*rows(fit), outputs, weights, decay)
        losses[decay] = float(weighted_loss(x[held, 0] @ w.T + b, y[held], None if multi else weights))
        if not multi:
            accuracies[decay] = head_accuracy(w, b, x[held, 0], y[held])
    # the strongest decay whose held-out loss is the best one's to within TIE: nearly equal fits differ by float noise
    decay = max(d for d in DECAYS if losses[d] <= min(losses.values()) * (1 + TIE))
    everything = rows(list(range(len(labels))))
    w, b = lbfgs(*everything, outputs, weights, decay)
    train_loss = weighted_loss(everything[0] @ w.T + b, everything[1], None if multi else weights)
    train = {"train_loss": round(float(train_loss), 6), "train_accuracy": round(head_accuracy(w, b, *everything), 6)}
    w, b = w / std, b - (w / std) @ mean  # the same logits from the raw features
    chosen = {"holdout_log_loss": round(losses[decay], 6)}
    if not multi:
        chosen["holdout_accuracy"] = accuracies[decay]
    return {"weight": w, "bias": b, "decay": decay, **chosen, "holdout_images": len(held), **train}


class ClosedFormHead(pl.Callback):
    """Before feature extraction trains, at the start of the validation that scores it (``trainer.validate``, then
    ``fit``): the head set to its L-BFGS fit, the better on the validation images of the fit on every cached view
    and the fit on the clean view alone where the cache holds one."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.report: dict = {}

    def on_validation_start(self, trainer: pl.Trainer, module) -> None:
        if self.report:  # once: the validations of ``fit`` score its epochs
            return
        with torch.enable_grad():  # the validation loop runs under no_grad: L-BFGS needs grads
            self._fit(trainer.datamodule, module)

    def _fit(self, data, module) -> None:
        began = time.perf_counter()
        feats, clean = training_features(data)
        labels, outputs = data.train_set.labels, module.net.head[1].out_features
        fit = {"clean view": feats[:, :1]} if clean else {}
        if not clean or feats.shape[1] > 1:
            fit["every view"] = feats
        fits = {name: solve_head(f, labels, outputs, module.class_weights.cpu(), self.seed) for name, f in fit.items()}
        if len(fits) > 1:  # scored as the epochs will be, on the validation images' cached features
            x, y = validation_features(data)
            scores = {name: _score(fitted, x, y) for name, fitted in fits.items()}
            name = max(scores, key=lambda n: (scores[n], n == "clean view"))  # equal: the probe
        else:
            name = next(iter(fits))
        fitted = fits[name]
        head = module.net.head[1]
        with torch.no_grad():
            head.weight.copy_(fitted.pop("weight"))
            head.bias.copy_(fitted.pop("bias"))
        self.report = {"fitted_on": name, **fitted, "seconds": round(time.perf_counter() - began, 2)}
        if len(fits) > 1:
            self.report["other_fit_decay"] = next(f["decay"] for n, f in fits.items() if n != name)

    def row(self, scores: dict) -> dict:
        """The history's epoch 0: the fitted head's figures (training: on the rows it was fitted to)."""
        row = {"epoch": 0, "phase": "head", "train_loss": self.report["train_loss"]}
        row["train_accuracy"] = self.report["train_accuracy"]
        row.update({k: round(float(scores[k]), 6) for k in ("val_loss", "val_accuracy", "val_map") if k in scores})
        return {**row, "lr": 0.0, "seconds": self.report["seconds"]}


def training_features(data: TransferData) -> tuple[np.ndarray, bool]:
    """The training images' pooled features, [images, views, dim], and whether view 0 is clean: the cached ones,
    or (``--cache none``) one clean view computed now."""
    cached = data.train_set
    if not isinstance(cached, CachedDataset):
        return clean_features(data), True
    return _entries(cached), clean_view(cached.store.key)


def validation_features(data: TransferData) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation images' cached pooled features and targets (every image, in every process)."""
    cached = data.val_set
    return torch.from_numpy(np.asarray(_entries(cached)[:, 0], dtype=np.float32)), target_tensor(cached.labels)


def target_tensor(labels: list) -> torch.Tensor:
    """``index.targets`` as one tensor: class indices, or the 0/1 rows of several labels per image."""
    return torch.from_numpy(np.stack(labels)) if isinstance(labels[0], np.ndarray) else torch.tensor(labels)


def _entries(cached: CachedDataset) -> np.ndarray:
    """Every entry of a cached set, [images, views, dim]: held in memory already, or read now."""
    if cached.preloaded is not None:
        return cached.preloaded
    return np.stack([cached.store.read(d) for d in cached.digests])


def clean_features(data: TransferData) -> np.ndarray:
    """Pooled features of one clean view of every training image, [images, 1, dim], in float32 on the trainer's
    device: what the closed-form head is fitted to without a cache (every process computes all of them)."""
    _, val_tf = data.transforms()
    images = ImageDataset(data.index.train, val_tf, data.train_set.labels)
    loader = DataLoader(images, batch_size=max(data.cfg.batch_size, 64), num_workers=data.cfg.workers)
    net, device, out = data.net, data.trainer.strategy.root_device, []
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        what = f"frozen backbone, once: {len(images)} images x 1 clean view, for the closed-form head"
        for x, _ in counted(loader, len(images), what, size=lambda batch: len(batch[0])):
            out.append(net.features(x.to(device)).float().cpu())
    net.train(was_training)
    return torch.cat(out).numpy()[:, None]
