"""The run's pictures: learning curves, confusion matrix, reliability diagram, a grid of augmented images."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from transferlab.data.index import label_set  # noqa: E402
from transferlab.data.transforms import denormalize, load_for, train_transform  # noqa: E402
from transferlab.files import atomic_write  # noqa: E402


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def plot_calibration(calibration: dict, path: Path) -> None:
    """calibration.png: accuracy against confidence per bin, before and after the temperature (a bar per bin)."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="calibrated")
    for key, marker in (("before", "o-"), ("after", "s-")):
        bins = calibration["reliability"][key]
        ece = calibration[f"ece_{key}"]
        ax.plot([b[0] for b in bins], [b[1] for b in bins], marker, label=f"{key} temperature: ECE {ece:.3f}")
    ax.set_xlabel("confidence (the predicted class's probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability, T = {calibration['temperature']:.2f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    save_figure(fig, path)


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """Accuracy and loss, train and val, over both phases, with a line where fine-tuning starts."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [r["epoch"] for r in history]
    ft = [r["epoch"] for r in history if r["phase"] == "fine_tune"]
    for ax, metric in zip(axes, ("accuracy", "loss")):
        ax.plot(epochs, [r[f"train_{metric}"] for r in history], "o-", label=f"training {metric}")
        ax.plot(epochs, [r[f"val_{metric}"] for r in history], "o-", label=f"validation {metric}")
        if ft:
            ax.axvline(ft[0] - 0.5, color="gray", linestyle="--", label="start fine-tuning")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_title(f"{title} accuracy".strip())
    axes[1].set_title(f"{title} loss".strip())
    save_figure(fig, path)


def plot_confusion(matrix: list[list[int]], classes: list[str], path: Path) -> None:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * n + 2), max(3.5, 0.6 * n + 1.5)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i][j] > peak / 2 else "black"
            ax.text(j, i, str(matrix[i][j]), ha="center", va="center", color=color)
    ax.set_title("confusion matrix (validation)")
    save_figure(fig, path)


def plot_augmentations(data, spec, size: int, augment: str, resize: str, path: Path, n: int = 9) -> None:
    """Nine augmented versions of the first training image, as the classic tutorial shows."""
    transform = train_transform(spec, size, augment, resize)
    image = load_for(transform, data.train[0].path)
    side = int(n**0.5)
    fig, axes = plt.subplots(side, side, figsize=(2 * side, 2 * side))
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(0)
        for ax in axes.flat:
            ax.imshow(denormalize(transform(image), spec).permute(1, 2, 0).numpy())
            ax.axis("off")
    names = ", ".join(data.classes[c] for c in label_set(data.train[0])) or "no label"
    fig.suptitle(f"augment={augment}, {size}px: {names}")
    save_figure(fig, path)
