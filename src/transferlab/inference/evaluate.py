"""Held-out evaluation of a trained network: accuracy, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferlab.data.index import Sample, class_dirs, scan_classes, split_folder
from transferlab.errors import UserError
from transferlab.files import expand_images


def classification_metrics(probs: np.ndarray, labels: list[int], classes: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (rows: true class), by torchmetrics."""
    import torch
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    n = len(classes)
    preds, target = torch.as_tensor(np.asarray(probs)).argmax(-1), torch.as_tensor(labels)
    per_class = {
        name: fn(preds, target, num_classes=n, average="none", zero_division=0)
        for name, fn in (
            ("precision", multiclass_precision),
            ("recall", multiclass_recall),
            ("f1", multiclass_f1_score),
        )
    }
    cm = multiclass_confusion_matrix(preds, target, num_classes=n)
    return {
        "accuracy": round(float(multiclass_accuracy(preds, target, num_classes=n, average="micro")), 6),
        "num_images": len(labels),
        "per_class": {
            c: {**{k: round(float(v[i]), 4) for k, v in per_class.items()}, "support": int(cm[i].sum())}
            for i, c in enumerate(classes)
        },
        "classes": classes,
        "confusion_matrix": cm.tolist(),
    }


def multilabel_metrics(probs: np.ndarray, labels: list, classes: list[str], thresholds: list[float]) -> dict:
    """Several labels per image: the mean average precision over classes (macro mAP), micro and macro F1 with each
    class's ``thresholds``, and per class its precision, recall, F1, AP, support and threshold. ``labels``: each
    image's class indices. A class no image has is left out of the means (its AP and recall are undefined)."""
    import warnings

    import torch
    from torchmetrics.functional.classification import (
        multilabel_average_precision,
        multilabel_f1_score,
        multilabel_precision,
        multilabel_recall,
    )

    n = len(classes)
    p = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    target = torch.zeros(len(labels), n, dtype=torch.long)
    for i, indices in enumerate(labels):
        target[i, list(indices)] = 1
    chosen = (p >= torch.tensor(thresholds, dtype=p.dtype)).float()  # each class at its own threshold
    with warnings.catch_warnings():  # a class without positives: undefined, and left out below
        warnings.simplefilter("ignore", UserWarning)
        ap = multilabel_average_precision(p, target, num_labels=n, average="none")
    per = {
        name: fn(chosen, target, num_labels=n, average="none", zero_division=0)
        for name, fn in (
            ("precision", multilabel_precision), ("recall", multilabel_recall), ("f1", multilabel_f1_score)
        )
    }  # fmt: skip
    support = target.sum(0)
    present = support > 0
    return {
        "multi_label": True,
        "map": round(float(ap[present].mean()), 6) if present.any() else None,
        "micro_f1": round(float(multilabel_f1_score(chosen, target, num_labels=n, average="micro")), 6),
        "macro_f1": round(float(per["f1"][present].mean()), 6) if present.any() else None,
        # every class of the image right: the strictest reading, as scikit-learn's accuracy_score of label sets
        "accuracy": round(float((chosen == target).all(1).float().mean()), 6),
        "num_images": len(labels),
        "images_without_labels": int((target.sum(1) == 0).sum()),
        "per_class": {
            c: {
                **{k: round(float(v[i]), 4) for k, v in per.items()},
                "ap": round(float(ap[i]), 4) if present[i] else None,
                "support": int(support[i]),
                "threshold": round(float(thresholds[i]), 6),
            }
            for i, c in enumerate(classes)
        },  # fmt: skip
        "classes": classes,
    }


def evaluation_samples(
    data_dir: str | Path, classes: list[str], table: dict | None = None
) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Held-out images of a folder (its val/validation/test split, else its class folders) or of a CSV (its val/test
    rows, else all; ``table``: how the run read its CSV, ``labels.table_options``), and the files skipped."""
    table = table or {}
    from transferlab.data.labels import held_out, is_table

    root = Path(data_dir)
    if is_table(root):
        return held_out(root, classes, **table)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}: pass a folder with one sub-folder per class")
    if table.get("multi_label"):
        raise UserError(f"the run has several labels per image, which come from a CSV: pass its CSV, not {root}")
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


def open_world_metrics(known: np.ndarray, outside: np.ndarray, threshold: float | None, folder, score: str) -> dict:
    """How the run's "none of these" ``score`` tells the known classes' images from ``outside`` ones: AUROC, and
    the share of each side accepted at the run's threshold."""
    from transferlab.inference.unknown import separation

    known, outside = known.round(6), outside.round(6)  # as predictions show them, and judge them
    return {
        "folder": str(folder),
        "images": len(outside),
        "score": score,
        "auroc": separation(known, outside)["auroc"],
        "threshold": threshold,
        "known_accepted_share": None if threshold is None else round(float((known >= threshold).mean()), 4),
        "outside_accepted_share": None if threshold is None else round(float((outside >= threshold).mean()), 4),
    }


def held_out_metrics(probs: np.ndarray, samples: list[Sample], classes: list[str], config: dict) -> dict:
    """The run's evaluation of these probabilities: accuracy and the rest for one label per image, mAP and F1 at
    the run's thresholds for several."""
    if config.get("multi_label"):
        thresholds = config.get("label_thresholds") or [0.5] * len(classes)
        return multilabel_metrics(probs, [s.label for s in samples], classes, thresholds)
    return classification_metrics(probs, [s.label for s in samples], classes)


def evaluate_run(run: str | Path, data_dir: str | Path, tta: bool = False, unknown: str | Path | None = None) -> dict:
    """Evaluate a run's best checkpoint on a folder; writes evaluation.{json,png} into the run directory.

    ``tta``: each image's probabilities averaged with its horizontal flip's (see ``Predictor``). ``unknown``: a
    folder of images of none of the run's classes, to measure how well its "none of these" verdict finds them.
    """
    from transferlab.data.labels import table_options
    from transferlab.inference.predictor import from_run, judgements
    from transferlab.rundir.folder import RunDir
    from transferlab.rundir.locks import hold
    from transferlab.rundir.plots import plot_confusion

    rd = RunDir(run)
    with hold(rd.path, "evaluate"):
        predictor = from_run(run)
        predictor.tta = tta
        classes, config = predictor.classes, rd.read_config()
        samples, skipped = evaluation_samples(data_dir, classes, table_options(config))
        probs, scores = judgements(predictor, [s.path for s in samples], workers=config.get("workers", 0))
        result = held_out_metrics(probs, samples, classes, config)
        result.update(data_dir=str(data_dir), tta=tta, skipped_files=[p for p, _ in skipped])
        if unknown is not None:
            _, outside = judgements(predictor, expand_images([Path(unknown)]), workers=config.get("workers", 0))
            result["unknown"] = open_world_metrics(scores, outside, predictor.threshold, unknown, predictor.score)
        rd.write_json("evaluation.json", result)
        if "confusion_matrix" in result:
            plot_confusion(result["confusion_matrix"], classes, rd.path / "evaluation.png")
    return result
