"""The head fitted in closed form before feature extraction trains: L-BFGS on the cached features.

Logistic regression on frozen features is convex: L-BFGS reaches its optimum in seconds, where
a few epochs of Adam with dropout stop short of it (benchmarks/head_init.py compares the two).
Its one choice, the weight decay, is made on a slice of the *training* images held out
from the fit, never on the validation set that later picks the best epoch, by the held-out log-loss: a
hundred held-out images change their accuracy in steps of one image, which can tip the choice to a decay
that overfits, where their mean loss moves smoothly. The features are standardized for the fit (each
dimension to mean 0 and variance 1 over the training rows), so that one decay means the same for every
backbone and every dimension; the fitted head is mapped back onto the raw features it will see.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
import numpy as np
import torch

from transferlab.data.index import stratified_indices
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
    """Accuracy of the linear head ``w``, ``b`` on features ``x`` (one logit: positive means the second class)."""
    logits = x @ w.T + b
    predicted = (logits[:, 0] > 0).long() if w.shape[0] == 1 else logits.argmax(-1)
    return float((predicted == y).float().mean())


def solve_head(feats: np.ndarray, labels: list, outputs: int, weights: torch.Tensor, seed: int) -> dict:
    """Choose the decay on held-out training images, refit on all of them; ``feats`` is [images, views, dim].

    ``labels``: class indices, or 0/1 rows for several labels per image; the fit is then one-vs-rest (a logistic
    regression per class: their losses are independent) and the decay is chosen on the held-out log-loss.
    """
    raw = torch.from_numpy(np.asarray(feats, dtype=np.float32))
    mean, std = raw.flatten(0, 1).mean(0), raw.flatten(0, 1).std(0).clamp_min(1e-6)
    x = (raw - mean) / std
    multi = isinstance(labels[0], np.ndarray)
    y = torch.from_numpy(np.stack(labels)) if multi else torch.tensor(labels)
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
    w, b = lbfgs(*rows(list(range(len(labels)))), outputs, weights, decay)
    w, b = w / std, b - (w / std) @ mean  # the same logits from the raw features
    chosen = {"holdout_log_loss": round(losses[decay], 6)}
    if not multi:
        chosen["holdout_accuracy"] = accuracies[decay]
    return {"weight": w, "bias": b, "decay": decay, **chosen, "holdout_images": len(held)}


class ClosedFormHead(pl.Callback):
    """At the start of feature extraction on cached features: the head set to its L-BFGS fit."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.report: dict = {}

    def on_fit_start(self, trainer: pl.Trainer, module) -> None:
        data = trainer.datamodule.train_set
        feats = data.preloaded if data.preloaded is not None else np.stack([data.store.read(d) for d in data.digests])
        began = time.perf_counter()
        fitted = solve_head(feats, data.labels, module.net.head[1].out_features, module.class_weights.cpu(), self.seed)
        head = module.net.head[1]
        with torch.no_grad():
            head.weight.copy_(fitted.pop("weight"))
            head.bias.copy_(fitted.pop("bias"))
        self.report = {**fitted, "seconds": round(time.perf_counter() - began, 2)}
