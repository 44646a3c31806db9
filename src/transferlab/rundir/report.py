"""A run's Markdown report and plots, as a function of what its run directory holds."""

from __future__ import annotations

from transferlab.files import atomic_write
from transferlab.rundir.folder import RunDir
from transferlab.rundir.plots import plot_confusion, plot_curves


def write_report(rd: RunDir, metrics: dict | None = None) -> None:
    """curves.png, confusion_matrix.png and report.md from config.yaml, history.csv and evaluation.json.

    ``metrics`` defaults to metrics.json (a finished run); the finish passes it before writing that file.
    """
    config, history, evaluation = rd.read_config(), rd.read_history(), rd.read_json("evaluation.json")
    metrics = metrics or rd.read_metrics()
    plot_curves(history, rd.path / "curves.png", config["spec"]["name"])
    if "confusion_matrix" in evaluation:  # one label per image
        plot_confusion(evaluation["confusion_matrix"], evaluation["classes"], rd.path / "confusion_matrix.png")
    atomic_write(rd.path / "report.md", render_report(config, metrics, evaluation))


def _evaluation(evaluation: dict) -> str:
    """The validation section's figures and table: per class, and with several labels per image its AP and
    threshold beside the mean AP and F1."""
    if not evaluation.get("multi_label"):
        rows = "\n".join(
            f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
            for c, m in evaluation["per_class"].items()
        )
        return f"""Accuracy {evaluation["accuracy"]:.4f} on {evaluation["num_images"]} images.

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{rows}

![confusion matrix](confusion_matrix.png)"""
    rows = "\n".join(
        f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
        f"{'-' if m['ap'] is None else format(m['ap'], '.3f')} | {m['threshold']:.3f} | {m['support']} |"
        for c, m in evaluation["per_class"].items()
    )
    return f"""Several labels per image: mean average precision {evaluation["map"]:.4f}, micro F1 \
{evaluation["micro_f1"]:.4f}, macro F1 {evaluation["macro_f1"]:.4f}, every label of the image right \
{evaluation["accuracy"]:.4f}, on {evaluation["num_images"]} images ({evaluation["images_without_labels"]} with no \
label). Each class's threshold was chosen for its F1 on training images kept out of training.

| class | precision | recall | F1 | AP | threshold | support |
|---|---|---|---|---|---|---|
{rows}"""


def render_report(config: dict, metrics: dict, evaluation: dict) -> str:
    spec, data = config["spec"], config["data"]
    fe = metrics["feature_extraction_best_val_accuracy"]
    fe = "no frozen phase" if fe is None else f"after feature extraction: val accuracy {fe:.4f}"
    if metrics.get("head_val_accuracy") is not None:  # epoch 0, before any epoch trained
        fe = f"the closed-form head, epoch 0: {metrics['head_val_accuracy']:.4f}; {fe}"
    best = (
        f"best val mAP | **{metrics['best_val_map']:.4f}**"
        if "best_val_map" in metrics
        else f"best val accuracy | **{metrics['best_val_accuracy']:.4f}**"
    )
    return f"""# transferlab run: {spec["name"]} on {data["root"].rstrip("/").rsplit("/", 1)[-1]}

| | |
|---|---|
| backbone | {spec["name"]} ({spec["arch"]}), weights: {config["weights_origin"]} |
| images | {metrics["num_train_images"]} train, {metrics["num_val_images"]} validation ({data["layout"]}), \
{metrics["skipped_files"]} unreadable files skipped |
| input | {config["image_size"]} px, mean {list(spec["mean"])}, std {list(spec["std"])}, \
resize `{config["resize"]}`, augment `{config["augment"]}` |
| recipe | {config["epochs"]} epochs frozen backbone at lr {config["lr"]}, \
then {config["fine_tune_epochs"]} fine-tuning epochs from layer group {config["fine_tune_at"]} \
of {config["num_layer_groups"]} at lr {config["fine_tune_lr"]} ({config["optimizer"]}) |
| {best} at epoch {metrics["best_epoch"]} ({fe}) |
| best val loss | {metrics["best_val_loss"]:.4f} |
| train time | {metrics["train_seconds"]:.1f} s (cache: {config["cache"]}, processes: {metrics.get("processes", 1)}) |

{_recipe_notes(metrics)}## Learning curves

![curves](curves.png)

## Validation, best checkpoint

{_evaluation(evaluation)}

## Augmented training images

![augmentations](augmentations.png)

Files: `config.yaml` (every option, resolved), `history.csv` (one row per epoch),
`metrics.json`, `evaluation.json`, `checkpoints/best.ckpt` and `checkpoints/last.ckpt`.
"""


def _recipe_notes(metrics: dict) -> str:
    """What the recipe decided on the way: the closed-form head, and the time budget's plan against what was done."""
    lines = []
    if fit := metrics.get("head_fit"):
        there = f"log-loss {fit['holdout_log_loss']:.3f}" if "holdout_log_loss" in fit else ""
        if "holdout_accuracy" in fit:  # runs before the log-loss chose the decay have the accuracy alone
            there += f"{', ' if there else ''}accuracy {fit['holdout_accuracy']:.3f}"
        lines.append(
            f"Feature extraction started from a head fitted by L-BFGS on the cached features in {fit['seconds']} s "
            f"(weight decay {fit['decay']}, chosen on {fit['holdout_images']} held-out training images: "
            f"{there} there; the validation images played no part).\n"
        )
    if why := metrics.get("stopped_at_head"):
        lines.append(f"The run stopped at that head, its epoch 0: {why}, which no epoch can beat.\n")
    if (cal := metrics.get("calibration")) and "ece_before" in cal:
        lines.append(
            f"Probabilities calibrated by a temperature of {cal['temperature']} folded into the head, fitted on the "
            f"{cal['fitted_on_images']} validation images: expected calibration error ({cal['bins']} bins) "
            f"{cal['ece_before']:.3f} before and {cal['ece_after']:.3f} after, measured on {cal['measured_on']}. "
            "![calibration](calibration.png)\n"
        )
    if (world := metrics.get("open_world")) and world.get("threshold") is not None:
        lines.append(
            f"None of these: an image whose {world['score']} is under {world['threshold']} is none of the classes; "
            f"that accepts {world['accepted_validation_share']:.1%} of the validation images (asked: "
            f"{world['accept']:.0%}).\n"
        )
    if plan := metrics.get("time_budget"):
        done = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in plan.items() if k != "budget_seconds")
        lines.append(
            f"Time budget {plan['budget_seconds']:.0f} s (from the start of the process). Planned and done: {done}; "
            f"the whole run took {metrics['wall_seconds']:.1f} s.\n"
        )
    return "".join(f"{line}\n" for line in lines)
