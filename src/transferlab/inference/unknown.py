"""Scores that tell images of the run's classes from images of none of them ("none of these"), and how well.

Each score is higher for an image that looks like the known classes:

- ``top_probability``: the maximum softmax probability (Hendrycks and Gimpel 2017), of the calibrated head;
- ``energy``: the log-sum-exp of the logits (Liu et al. 2020), the softmax's normalizer before it divides;
- ``ClassMeans``: minus the Mahalanobis distance of the pooled features to the nearest class mean under one
  covariance shared by the classes (Lee et al. 2018);
- ``Neighbours``: minus the distance of the L2-normalized pooled features to the k-th nearest training image's
  (Sun et al. 2022).

``benchmarks/open_world.py`` measures them against each other (docs/benchmarks.md, "None of these"): the nearest
neighbours separate best, and are what a run judges by (``model.network.TransferNet.similarity``, the cosine
similarity to the k-th nearest of up to ``BANK_IMAGES`` training images, kept with the weights).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BANK_IMAGES = 2000  # training images a run keeps to compare with, spread evenly over its (class-sorted) list
# the score's names, in a run's config and an export's metadata
SIMILARITY, TOP_PROBABILITY = "similarity to the training images", "top probability"
NEIGHBOURS = 10  # k of the k-th nearest; Sun et al. 2022 find the choice matters little (benchmarks/open_world.py)


def score_name(net) -> str:
    """What ``net`` judges an image by (``model.network.Judged``): the similarity to the training images it keeps,
    else (an older run, or weights from before the finish) its top probability."""
    return TOP_PROBABILITY if net.bank is None else SIMILARITY


def spread(paths: list[Path], limit: int) -> list[Path]:
    """At most ``limit`` of ``paths``, evenly spaced (every class of a class-sorted list keeps its share)."""
    if len(paths) <= limit:
        return list(paths)
    return [paths[i] for i in np.linspace(0, len(paths) - 1, limit).round().astype(int)]


def class_logits(logits: np.ndarray) -> np.ndarray:
    """Logits ``[N, C]`` of either head shape: a two-class head's one logit ``z`` is the pair ``(0, z)``."""
    logits = np.asarray(logits, dtype=np.float64)
    return np.concatenate([np.zeros_like(logits), logits], 1) if logits.shape[1] == 1 else logits


def top_probability(logits: np.ndarray) -> np.ndarray:
    z = class_logits(logits)
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).max(1)


def energy(logits: np.ndarray) -> np.ndarray:
    z = class_logits(logits)
    top = z.max(1)
    return top + np.log(np.exp(z - top[:, None]).sum(1))


class ClassMeans:
    """Minus the Mahalanobis distance to the nearest class mean, one covariance for all classes (shrunk towards
    its diagonal's mean by ``shrinkage``, so that it inverts when there are fewer images than feature dimensions)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, shrinkage: float = 0.1) -> None:
        x, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
        self.means = np.stack([x[labels == c].mean(0) for c in np.unique(labels)])
        centred = x - self.means[np.searchsorted(np.unique(labels), labels)]
        cov = centred.T @ centred / max(1, len(x) - 1)
        cov = (1 - shrinkage) * cov + shrinkage * np.trace(cov) / len(cov) * np.eye(len(cov))
        self.precision = np.linalg.inv(cov)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float64)
        pm = self.means @ self.precision  # [C, D]
        # (x - m)^T P (x - m) for every image and class mean, without forming the differences
        d = ((x @ self.precision) * x).sum(1)[:, None] - 2 * x @ pm.T + (pm * self.means).sum(1)[None, :]
        return -np.sqrt(np.maximum(d.min(1), 0.0))


class Neighbours:
    """Minus the Euclidean distance of normalized features to the ``k``-th nearest normalized training feature."""

    def __init__(self, features: np.ndarray, k: int = 10) -> None:
        self.bank = _normalized(features)
        self.k = max(1, min(k, len(self.bank)))

    def __call__(self, features: np.ndarray, chunk: int = 1024) -> np.ndarray:
        x = _normalized(features)
        out = np.empty(len(x))
        for i in range(0, len(x), chunk):
            similarity = x[i : i + chunk] @ self.bank.T  # unit vectors: distance^2 = 2 - 2 cos
            kth = -np.partition(-similarity, self.k - 1, axis=1)[:, self.k - 1]
            out[i : i + chunk] = -np.sqrt(np.maximum(2 - 2 * kth, 0.0))
        return out


def _normalized(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def separation(known: np.ndarray, outside: np.ndarray, accept: float = 0.95) -> dict:
    """How a score tells ``known`` images from ``outside`` ones: AUROC (ties count half), and the share of outside
    images accepted at the threshold that accepts ``accept`` of the known ones (FPR at 95 % TPR, the usual figure)."""
    known, outside = np.asarray(known, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    ranked = np.sort(outside)
    below, at_or_below = np.searchsorted(ranked, known, "left"), np.searchsorted(ranked, known, "right")
    auroc = (below + (at_or_below - below) / 2).sum() / (len(known) * len(outside))  # Mann-Whitney U
    threshold = np.quantile(known, 1 - accept, method="lower")
    return {
        "auroc": round(float(auroc), 4),
        "known_accepted": round(float((known >= threshold).mean()), 4),
        "outside_accepted": round(float((outside >= threshold).mean()), 4),
    }
