"""The end of a run: the best checkpoint evaluated on the validation images, metrics.json, the report."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from transferlab.data.images import Preprocess
from transferlab.inference.evaluate import held_out_metrics
from transferlab.inference.predictor import from_net, judgements, pooled_features, probabilities
from transferlab.inference.unknown import BANK_IMAGES, NEIGHBOURS, spread
from transferlab.recipe.budget import process_seconds
from transferlab.recipe.calibrate import calibrate, choose_thresholds, fold_temperature
from transferlab.recipe.callbacks import best_key
from transferlab.rundir.folder import write_best
from transferlab.rundir.plots import plot_calibration
from transferlab.rundir.report import write_report

FINISH_RESERVE = 1.0  # the plots, report and metrics written after this reading

if TYPE_CHECKING:
    from transferlab.recipe.plan import Setup


def keep_training_features(s: Setup) -> int:
    """The best epoch's pooled features of up to ``BANK_IMAGES`` training images (one clean view each, as
    predict sees an image), kept in the network: its "none of these" score compares every image with them."""
    paths = spread([x.path for x in s.data.train], BANK_IMAGES)
    features = pooled_features(s.net, Preprocess.from_meta(s.config_dict()), paths, s.cfg.workers)
    s.net.set_bank(features, NEIGHBOURS)
    return len(paths)


def open_world(scores: np.ndarray, s: Setup, bank: int) -> dict:
    """The threshold on a prediction's score (its similarity to the training images) that accepts ``--accept`` of
    the validation images: below it, a prediction is "none of these" (``inference.predictor.top_k``)."""
    scores = scores.round(6)  # as predictions show them (``top_k``)
    # rounded down, so that every image at or above the quantile is accepted
    s.unknown_threshold = math.floor(float(np.quantile(scores, 1 - s.cfg.accept, method="lower")) * 1e6) / 1e6
    accepted = float((scores >= s.unknown_threshold).mean())
    k = s.net.neighbours
    nth = f"{k}{'th' if 10 <= k % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"
    return {"score": f"similarity to the {nth} nearest of {bank} training images",
            "accept": s.cfg.accept, "threshold": s.unknown_threshold,
            "accepted_validation_share": round(accepted, 4)}  # fmt: skip


def finish_run(s: Setup, val_images: int, processes: int = 1) -> dict:
    """Write evaluation.json, the plots and report.md, then metrics.json (its presence marks the run finished)."""
    history, data = s.history, s.data
    bank = keep_training_features(s)
    predictor = from_net(s.net, s.config_dict())
    if data.multi_label:  # each class's threshold, on training images kept out of training
        tune = probabilities(predictor, [x.path for x in data.tune], workers=s.cfg.workers)
        s.label_thresholds = choose_thresholds(tune, [x.label for x in data.tune])
    probs, scores = judgements(predictor, [x.path for x in data.val], workers=s.cfg.workers)
    evaluation = held_out_metrics(probs, data.val, data.classes, s.config_dict())
    calibration = (
        {"temperature": 1.0, "fitted_on_images": 0, "skipped": "several labels per image: a threshold per class"}
        if data.multi_label
        else calibrate(probs, [x.label for x in data.val], s.cfg.seed)  # changes no prediction
    )
    best = max(history, key=best_key)  # the first of equals, as the epoch that wrote best.ckpt
    phase_best = {
        p: max((r["val_accuracy"] for r in history if r["phase"] == p), default=None)
        for p in ("head", "feature_extraction", "fine_tune")
    }
    metrics = {
        "backbone": s.spec.name,
        "best_val_accuracy": best["val_accuracy"],
        "best_epoch": best["epoch"],
        "best_val_loss": min(r["val_loss"] for r in history),
        "best_train_accuracy": best["train_accuracy"],  # at the best epoch, as the classic notebook reports it
        "final_val_accuracy": history[-1]["val_accuracy"],
        "eval_accuracy": evaluation["accuracy"],
        **(
            {
                "best_val_map": best["val_map"],
                "eval_map": evaluation["map"],
                "eval_micro_f1": evaluation["micro_f1"],
                "eval_macro_f1": evaluation["macro_f1"],
                "label_thresholds": s.label_thresholds,
                "num_threshold_images": len(data.tune),
            }
            if data.multi_label
            else {}
        ),  # fmt: skip
        "head_val_accuracy": phase_best["head"],  # the closed-form head, before any epoch (epoch 0)
        "feature_extraction_best_val_accuracy": phase_best["feature_extraction"],
        "fine_tune_best_val_accuracy": phase_best["fine_tune"],
        "epochs_run": sum(r["epoch"] > 0 for r in history),
        "train_seconds": round(s.timings["train_seconds"], 2),
        "timings": {k: round(v, 2) if isinstance(v, float) else v for k, v in s.timings.items()},
        "num_train_images": len(data.train),
        "num_val_images": len(data.val),
        "val_images_counted": val_images,  # per epoch, over every process: each validation image once
        "skipped_files": len(data.skipped),
        "classes": data.classes,
        "image_size": s.size,
        "cache": s.cfg.cache,
        "processes": processes,
        **s.notes,
        "params": sum(p.numel() for p in s.net.parameters()),
        # through the whole network in float32, as predict runs it, timed on the evaluation above
        "images_per_second": round(predictor.images / max(predictor.seconds, 1e-9), 2),
    }
    if calibration["temperature"] != 1.0:
        fold_temperature(s.net, calibration["temperature"])  # predict, serve and exports give calibrated numbers
        plot_calibration(calibration, s.rd.path / "calibration.png")
    metrics["calibration"] = {k: v for k, v in calibration.items() if k != "reliability"}
    metrics["open_world"] = open_world(scores, s, bank)
    # the threshold first: read with the previous best.ckpt (no training images' features) it applies to nothing
    # (``predictor.from_net``), and a reader that loads the model after the next line has both
    s.rd.write_config(s.config_dict())
    write_best(s.rd, s.net)  # with the temperature, and the training images' features the score compares with
    s.rd.write_json("evaluation.json", evaluation)
    metrics["wall_seconds"] = round(process_seconds() + FINISH_RESERVE, 1)  # the process so far, and what follows
    write_report(s.rd, metrics)
    s.rd.write_json("metrics.json", metrics)  # last: its presence marks the run finished
    return metrics
