"""Probabilities that mean what they say: temperature scaling (Guo et al. 2017), folded into the head.

One number T divides the logits; it changes no prediction, only how sure each one says it is. T is fitted by
minimizing the negative log-likelihood on the validation images (the held-out images the run has; the
training images, which the network has seen, would make it overconfident again). The expected calibration
error (ECE, 15 equal-width bins of confidence) is reported before and after on images T was *not* fitted on:
the validation images in two seeded halves, T fitted on each half and measured on the other. The T that is
folded is the one fitted on all of them. Folding divides the last layer's weights and bias by T, so predict,
the web app and every export give the calibrated numbers with no extra step.
"""

from __future__ import annotations

import numpy as np
import torch

from transferlab.data.index import stratified_indices

BINS = 15
MIN_IMAGES = 50  # fewer validation images than this fit no temperature: a few right answers would make it tiny


def logits_of(probs: np.ndarray) -> torch.Tensor:
    """Logits that give ``probs`` (up to a shift that changes no probability); one logit for a two-class head."""
    p = torch.from_numpy(np.clip(probs, 1e-7, 1.0)).double()
    return (p[:, 1].log() - p[:, 0].log()).unsqueeze(1) if probs.shape[1] == 2 else p.log()


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities ``[N, C]`` of ``logits / temperature`` (a sigmoid for one logit, else a softmax)."""
    z = logits / temperature
    return torch.cat([1 - torch.sigmoid(z), torch.sigmoid(z)], 1) if z.shape[1] == 1 else torch.softmax(z, 1)


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    z = logits / temperature
    if z.shape[1] == 1:
        return torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], labels.double())
    return torch.nn.functional.cross_entropy(z, labels)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimizing the negative log-likelihood of ``labels`` (L-BFGS on log T: convex in practice)."""
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nll(logits, labels, log_t.exp())
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(0.1, 10.0))


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """Expected calibration error: the image-weighted gap between confidence and accuracy over equal-width bins."""
    return _gap(reliability(probs, labels, bins))


def _gap(table: list[list[float]]) -> float:
    """The ECE of a reliability table (``reliability``'s rows: mean confidence, accuracy, images)."""
    return sum(n * abs(conf - acc) for conf, acc, n in table) / max(1, sum(n for *_, n in table))


def calibrate(probs: np.ndarray, labels: list[int], seed: int = 0) -> dict:
    """The temperature for these held-out predictions, the ECE before and after on images it was not fitted on,
    and the reliability diagram's bins (mean confidence, accuracy, images) of both."""
    if len(labels) < MIN_IMAGES:
        return {"temperature": 1.0, "fitted_on_images": 0, "skipped": f"fewer than {MIN_IMAGES} validation images"}
    logits, y = logits_of(probs), torch.tensor(labels)
    before = scaled(logits, 1.0)
    after = before.clone()
    for fit_on, measure_on in _halves(labels, seed):
        after[measure_on] = scaled(logits[measure_on], fit_temperature(logits[fit_on], y[fit_on]))
    tables = {"before": reliability(before, y), "after": reliability(after, y)}
    return {
        "temperature": round(fit_temperature(logits, y), 4),
        "fitted_on_images": len(labels),
        "ece_before": round(_gap(tables["before"]), 4),
        "ece_after": round(_gap(tables["after"]), 4),
        "measured_on": "each half of the validation images, with the temperature fitted on the other half",
        "bins": BINS,
        "reliability": tables,
    }


def _halves(labels: list[int], seed: int) -> list[tuple[list[int], list[int]]]:
    a, b = stratified_indices(labels, 0.5, seed)
    return [(a, b), (b, a)]


def reliability(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> list[list[float]]:
    """[mean confidence, accuracy, images] of each non-empty confidence bin."""
    confidence, predicted = probs.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi)
        if inside.any():
            out.append([round(float(confidence[inside].mean()), 4), round(float(correct[inside].mean()), 4),
                        int(inside.sum())])  # fmt: skip
    return out


def fold_temperature(net, temperature: float) -> None:
    """Divide the head's last layer by ``temperature``: the network then outputs the calibrated logits."""
    last = net.head[-1]
    with torch.no_grad():
        last.weight.div_(temperature)
        last.bias.div_(temperature)


DEFAULT_THRESHOLD = 0.5  # a class the threshold images do not show keeps the sigmoid's even odds


def choose_thresholds(probs: np.ndarray, labels: list[tuple[int, ...]]) -> list[float]:
    """Several labels per image: each class's threshold, the one that maximizes its F1 on these images (held out
    of training, never the validation images that chose the best epoch), halfway between the two probabilities
    its best cut falls between."""
    probs = np.asarray(probs, dtype=np.float64)
    out = []
    for c in range(probs.shape[1]):
        positive = np.array([c in indices for indices in labels])
        if not positive.any():
            out.append(DEFAULT_THRESHOLD)
            continue
        order = np.argsort(-probs[:, c], kind="stable")
        p, hits = probs[order, c], np.cumsum(positive[order])
        f1 = 2 * hits / (np.arange(1, len(p) + 1) + positive.sum())  # taking the k likeliest as positive
        k = int(f1.argmax())  # the first best: the highest threshold among equals
        cut = (p[k] + p[k + 1]) / 2 if k + 1 < len(p) else p[k]
        out.append(round(float(np.clip(cut, 0.01, 0.99)), 6))
    return out
