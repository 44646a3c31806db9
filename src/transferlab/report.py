"""The end of a run: final evaluation, metrics.json, plots and the Markdown report."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from transferlab.evaluate import classification_metrics, predict_probs
from transferlab.files import atomic_write
from transferlab.plots import plot_confusion, plot_curves

if TYPE_CHECKING:
    from transferlab.train import Trainer


def finish_run(t: Trainer) -> dict:
    """Evaluate the best checkpoint on the validation images and write the run's summary files."""
    rd, history = t.rd, t.history
    probs = predict_probs(t.net, t.data.val, t.size, t.cfg.resize, workers=t.cfg.workers)
    evaluation = classification_metrics(probs, torch.tensor([s.label for s in t.data.val]), t.data.classes)
    best = max(history, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    fine_tune = [r for r in history if r["phase"] == "fine_tune"]
    metrics = {
        "backbone": t.spec.name,
        "best_val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "best_val_loss": min(r["val_loss"] for r in history),
        "best_train_accuracy": max(r["train_accuracy"] for r in history),
        "final_val_accuracy": history[-1]["val_accuracy"],
        "eval_accuracy": evaluation["accuracy"],
        "feature_extraction_best_val_accuracy": max(
            r["val_accuracy"] for r in history if r["phase"] == "feature_extraction"
        ),
        "fine_tune_best_val_accuracy": max((r["val_accuracy"] for r in fine_tune), default=None),
        "epochs_run": len(history),
        "train_seconds": round(t.timings["train_seconds"], 2),
        "timings": {k: round(v, 2) for k, v in t.timings.items()},
        "num_train_images": len(t.data.train),
        "num_val_images": len(t.data.val),
        "skipped_files": len(t.data.skipped),
        "classes": t.data.classes,
        "image_size": t.size,
        "cache": t.cfg.cache,
        "params": sum(p.numel() for p in t.net.parameters()),
        "images_per_second": round(images_per_second(t.net, t.size), 2),
    }
    rd.write_json("evaluation.json", evaluation)
    plot_curves(history, rd.path / "curves.png", t.spec.name)
    plot_confusion(evaluation["confusion_matrix"], t.data.classes, rd.path / "confusion_matrix.png")
    atomic_write(rd.path / "report.md", render_report(t, metrics, evaluation))
    rd.write_json("metrics.json", metrics)  # last: its presence marks the run finished
    return metrics


def images_per_second(net, size: int, batch: int = 16, repeats: int = 3) -> float:
    """Measured inference throughput of the whole network (best of a few timed batches)."""
    x = torch.randn(batch, 3, size, size)
    net.eval()
    best = float("inf")
    with torch.inference_mode():
        net(x[:2])
        for _ in range(repeats):
            start = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - start)
    return batch / best


def render_report(t: Trainer, metrics: dict, evaluation: dict) -> str:
    cfg = t.cfg
    rows = "\n".join(
        f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for c, m in evaluation["per_class"].items()
    )
    return f"""# transferlab run: {t.spec.name} on {t.data.root.name}

| | |
|---|---|
| backbone | {t.spec.name} ({t.spec.arch}), weights: {t.weights.origin if t.weights else "random"} |
| images | {metrics["num_train_images"]} train, {metrics["num_val_images"]} validation ({t.data.layout}), \
{metrics["skipped_files"]} unreadable files skipped |
| input | {t.size} px, mean {list(t.spec.mean)}, std {list(t.spec.std)}, \
resize `{cfg.resize}`, augment `{cfg.augment}` |
| recipe | {cfg.epochs} epochs frozen backbone at lr {cfg.lr}, then {cfg.fine_tune_epochs} fine-tuning epochs from \
layer group {t.fine_tune_at} of {t.n_groups} at lr {t.ft_lr} ({cfg.optimizer}) |
| best val accuracy | **{metrics["best_val_accuracy"]:.4f}** at epoch {metrics["best_epoch"]} \
(after feature extraction: {metrics["feature_extraction_best_val_accuracy"]:.4f}) |
| best val loss | {metrics["best_val_loss"]:.4f} |
| train time | {metrics["train_seconds"]:.1f} s (cache: {cfg.cache}) |

## Learning curves

![curves](curves.png)

## Validation, best checkpoint

Accuracy {evaluation["accuracy"]:.4f} on {evaluation["num_images"]} images.

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

![confusion matrix](confusion_matrix.png)

## Augmented training images

![augmentations](augmentations.png)

Files: `config.yaml` (every option, resolved), `history.csv` (one row per epoch),
`metrics.json`, `evaluation.json`, `checkpoints/best.ckpt` and `checkpoints/last.ckpt`.
"""
