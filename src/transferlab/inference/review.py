"""Error review: the validation images a run gets most wrong, and those whose label it most doubts.

Two lists, each image with a Grad-CAM heat map (the ``grad-cam`` package) of what drove the
prediction, so a user can tell a model's mistake from a wrong label or a misleading background:

- highest loss: cross-entropy of the given label, ``-log p(label)``, the worst first;
- label doubts: confident learning (Northcutt et al., the method behind cleanlab). A class's
  threshold is the mean probability the model gives it on images labelled with it; an image is
  doubted when another class reaches that class's own threshold, ranked by how far that class's
  probability is above the given label's. These come first: an image in this list is left out of
  the other, so the loss list shows the model's own mistakes.

``transferlab review RUN`` writes both as review.png and a "Review" section of report.md; the
web app shows the same cases.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transferlab.errors import UserError
from transferlab.files import atomic_write
from transferlab.rundir.folder import RunDir
from transferlab.rundir.locks import hold


def rank(probs: np.ndarray, labels: np.ndarray, n: int) -> tuple[list[int], list[int]]:
    """Indices of the ``n`` highest losses and of the ``n`` most doubted labels (disjoint), worst first."""
    rows = np.arange(len(labels))
    p_label = probs[rows, labels]
    thresholds = np.array(
        [probs[labels == c, c].mean() if (labels == c).any() else np.inf for c in range(probs.shape[1])]
    )
    other = probs.copy()
    other[rows, labels] = -np.inf
    margin = np.where(other >= thresholds, other, -np.inf).max(axis=1) - p_label
    doubted = [int(i) for i in np.argsort(-margin, kind="stable")[:n] if np.isfinite(margin[i])]
    loss = -np.log(np.clip(p_label, 1e-12, 1.0))
    worst = [int(i) for i in np.argsort(-loss, kind="stable") if i not in doubted][:n]
    return worst, doubted


def heat_maps(net, images: np.ndarray, targets: list[int]) -> np.ndarray:
    """Grad-CAM maps ``[N, H, W]`` in [0, 1] for normalized ``images``, each for its target class.

    The target layer is the backbone's last layer group, the last one with a spatial map.
    A two-class head has one logit: class 1 is that logit, class 0 its negative.
    """
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget, ClassifierOutputTarget

    binary = net.head[-1].out_features == 1
    target = BinaryClassifierOutputTarget if binary else ClassifierOutputTarget
    net.requires_grad_(True)  # loaded frozen; Grad-CAM needs the gradient at the target layer
    with GradCAM(model=net, target_layers=[net.feature_map_layer]) as cam:
        return cam(input_tensor=torch.from_numpy(images), targets=[target(t) for t in targets])


def overlay(picture: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """A uint8 RGB picture with its heat map laid over it (the grad-cam package's own colouring)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(picture.astype(np.float32) / 255.0, heat, use_rgb=True, image_weight=0.55)


def review_run(
    run: str | Path, n: int = 6, data: str | Path | None = None, step: Callable[[str], None] = lambda what: None
) -> dict:
    """The review of a run's best checkpoint on its validation images (see the module docstring).

    The images come from ``data`` when given, else from the data folder the run's config names, and that
    only when this user trained the run here (``RunDir.trusted``): a run received from someone else never
    makes its reviewer decode and show pictures from a folder of its choosing. ``step`` hears what it does
    now (the web app shows it while the review computes).
    """
    from transferlab.data.labels import index_data, table_options
    from transferlab.inference.predictor import from_net, probabilities
    from transferlab.rundir.folder import load_net

    root = RunDir(run).data_root(data, "its review")
    step("loading the best checkpoint")
    net, config = load_net(run)
    if config.get("multi_label"):
        raise UserError(
            f"{run} has several labels per image: the review ranks images of one label; see report.md's per-class AP"
        )
    predictor = from_net(net, config)
    val = index_data(root, config["val_split"], config["seed"], **table_options(config)).val
    paths = [s.path for s in val]
    labels = np.array([s.label for s in val], dtype=np.int64)
    step(f"predicting {len(paths)} validation images")
    probs = probabilities(predictor, paths)
    worst, doubted = rank(probs, labels, n) if len(val) else ([], [])
    chosen = worst + doubted
    predicted = [int(probs[i].argmax()) for i in chosen]
    step(f"heat maps of {len(chosen)} images")
    maps = heat_maps(net, np.stack([predictor.load(paths[i]) for i in chosen]), predicted) if chosen else []
    classes = list(config["classes"])
    cases = []
    for j, i in enumerate(chosen):
        picture = np.asarray(predictor.prep.to_square(predictor.prep.load(paths[i])))
        cases.append({
            "image": _relative(paths[i], root),
            "label": classes[labels[i]],
            "predicted": classes[predicted[j]],
            "prob_label": round(float(probs[i, labels[i]]), 4),
            "prob_predicted": round(float(probs[i, predicted[j]]), 4),
            "loss": round(float(-np.log(max(probs[i, labels[i]], 1e-12))), 4),
            "picture": picture,
            "heat_map": overlay(picture, maps[j]),
        })  # fmt: skip
    return {"num_images": len(val), "highest_loss": cases[: len(worst)], "label_doubts": cases[len(worst) :]}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def plot_review(review: dict, path: Path) -> None:
    """review.png: one row per list, each case its picture with the heat map and what the model said."""
    from transferlab.rundir.plots import plt, save_figure

    rows = [(title, review[key]) for key, title in TITLES.items() if review[key]]
    cols = max((len(cases) for _, cases in rows), default=1)
    fig, axes = plt.subplots(max(len(rows), 1), cols, figsize=(2.4 * cols, 2.9 * max(len(rows), 1)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, (title, cases) in enumerate(rows):
        for c, case in enumerate(cases):
            ax = axes[r, c]
            ax.imshow(case["heat_map"])
            ax.set_title(
                f"{case['label']} -> {case['predicted']} {case['prob_predicted']:.2f}\nloss {case['loss']:.2f}",
                fontsize=8,
            )
        axes[r, 0].text(-0.08, 0.5, title, transform=axes[r, 0].transAxes, rotation=90, ha="right", va="center")
    if not rows:
        axes[0, 0].text(0.5, 0.5, "no validation images", ha="center", va="center")
    save_figure(fig, path)


TITLES = {"highest_loss": "highest loss", "label_doubts": "label doubts"}


def review_section(review: dict) -> str:
    """The Markdown "Review" section of report.md."""
    parts = [
        "## Review\n",
        f"The best checkpoint on {review['num_images']} validation images: those with the highest loss, and those "
        "whose given label it most doubts (confident learning: another class reaches its own mean confidence), "
        "each with a Grad-CAM heat map for the predicted class.\n",
        "![review](review.png)\n",
    ]
    for key, title in TITLES.items():
        rows = "\n".join(
            f"| {c['image']} | {c['label']} | {c['predicted']} | {c['prob_label']:.3f} | {c['loss']:.3f} |"
            for c in review[key]
        )
        table = f"| image | label | predicted | p(label) | loss |\n|---|---|---|---|---|\n{rows}" if rows else "none"
        parts.append(f"### {title.capitalize()}\n\n{table}\n")
    return "\n".join(parts)


def with_section(report: str, section: str) -> str:
    """``report`` with its "## Review" section replaced by ``section`` (appended when it has none)."""
    match = re.search(r"^## Review\n.*?(?=^## |\Z)", report, flags=re.S | re.M)
    if match:
        rest = report[match.end() :].lstrip("\n")
        return report[: match.start()] + section.rstrip("\n") + ("\n\n" + rest if rest else "\n")
    return report.rstrip("\n") + "\n\n" + section


def write_review(run: str | Path, n: int = 6, data: str | Path | None = None) -> dict:
    """Review a run; write review.png and the report's "Review" section atomically; return the review."""
    rd = RunDir(run)
    with hold(rd.path, "review"):
        review = review_run(rd.path, n, data)
        plot_review(review, rd.path / "review.png")
        report = rd.path / "report.md"
        atomic_write(report, with_section(report.read_text() if report.is_file() else "", review_section(review)))
    return review
