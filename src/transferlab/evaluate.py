"""Held-out evaluation of a trained network: accuracy, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import multiclass_confusion_matrix

from transferlab.data import ImageDataset, Sample, class_dirs, scan_classes, split_folder
from transferlab.errors import UserError
from transferlab.model import TransferNet, probabilities
from transferlab.transforms import eval_transform


def predict_probs(
    net: TransferNet, samples: list[Sample], size: int, resize: str, batch_size: int = 64, workers: int = 2
):
    """Class probabilities [N, C] for samples, with the run's evaluation preprocessing."""
    loader = DataLoader(
        ImageDataset(samples, eval_transform(net.spec, size, resize)), batch_size=batch_size, num_workers=workers
    )
    net.eval()
    with torch.inference_mode():
        return torch.cat([probabilities(net(x)) for x, _ in loader])


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows: true class)."""
    cm = multiclass_confusion_matrix(probs.argmax(-1), labels, num_classes=len(classes))
    tp = cm.diag().float()
    precision = tp / cm.sum(0).clamp(min=1)
    recall = tp / cm.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return {
        "accuracy": round(float(tp.sum() / cm.sum()), 6),
        "num_images": int(cm.sum()),
        "per_class": {
            c: {
                "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4),
                "f1": round(float(f1[i]), 4),
                "support": int(cm[i].sum()),
            }
            for i, c in enumerate(classes)
        },
        "classes": classes,
        "confusion_matrix": cm.tolist(),
    }


def evaluation_samples(data_dir: str | Path, classes: list[str]) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Held-out images of a folder (its val/validation/test split, else its class folders) and skipped files."""
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}: pass a folder with one sub-folder per class")
    folder = split_folder(root) or root
    found = [p.name for p in class_dirs(folder)]
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise UserError(f"class '{unknown[0]}' in {folder} is not one the run was trained on ({', '.join(classes)})")
    skipped: list[tuple[str, str]] = []
    samples = [Sample(s.path, classes.index(found[s.label])) for s in scan_classes(folder, found, skipped)]
    if not samples:
        raise UserError(f"no readable images in class folders of {folder}: pass a folder of class folders")
    return samples, skipped


def evaluate_run(run: str | Path, data_dir: str | Path) -> dict:
    """Evaluate a run's best checkpoint on a folder; writes evaluation.{json,png} into the run directory."""
    from transferlab.plots import plot_confusion
    from transferlab.run import RunDir, load_net

    net, config = load_net(run)
    classes = config["classes"]
    samples, skipped = evaluation_samples(data_dir, classes)
    probs = predict_probs(net, samples, config["image_size"], config["resize"], workers=config.get("workers", 2))
    result = classification_metrics(probs, torch.tensor([s.label for s in samples]), classes)
    result.update(data_dir=str(data_dir), skipped_files=[p for p, _ in skipped])
    rd = RunDir(run)
    rd.write_json("evaluation.json", result)
    plot_confusion(result["confusion_matrix"], classes, rd.path / "evaluation.png")
    return result
