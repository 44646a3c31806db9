"""Temperature scaling (recipe/calibrate.py): the fit finds a known temperature, ECE is what its definition says,
and a real run's calibrated head is what predict and the ONNX export give."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import DATASETS, make_subset, run_cli

from transferlab.recipe.calibrate import MIN_IMAGES, calibrate, ece, fit_temperature, logits_of, nll, scaled


def test_the_fit_recovers_the_temperature_that_made_the_labels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 5, generator=g, dtype=torch.float64) * 3
    labels = torch.multinomial(torch.softmax(logits / 2.0, 1), 1, generator=g)[:, 0]  # drawn at T = 2
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.05)
    one = logits[:, :1]
    binary = (torch.rand(len(one), generator=g, dtype=torch.float64) < torch.sigmoid(one[:, 0] / 0.5)).long()
    assert fit_temperature(one, binary) == pytest.approx(0.5, rel=0.05)


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy() -> None:
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    # bin (0.8667, 0.9333]: confidence 0.9, accuracy 0.5; bin (0.6, 0.6667]: 0.6 against 1.0
    assert ece(probs, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert ece(torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([0])) == 0


def test_too_few_images_fit_no_temperature() -> None:
    probs = np.tile([[0.8, 0.2]], (MIN_IMAGES - 1, 1))
    assert calibrate(probs, [0] * (MIN_IMAGES - 1))["temperature"] == 1.0


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple:
    """A real hymenoptera run with 80 validation images (enough to fit a temperature), and those images."""
    tmp = tmp_path_factory.mktemp("calibrated")
    data = make_subset(tmp / "data", DATASETS / "hymenoptera", train=16, val=40)
    out = tmp / "run"
    args = ["--image-size", "64", "--epochs", "2", "--fine-tune-epochs", "0", "--workers", "0"]
    proc = run_cli("train", data, "--out", out, *args)
    assert proc.returncode == 0, proc.stderr
    return out, sorted((data / "val").glob("*/*.jpg"))


@pytest.mark.slow
def test_a_run_folds_its_temperature_into_the_head_and_the_export_gives_it(run) -> None:
    from transferlab.inference.export import export_run
    from transferlab.inference.predictor import from_export, open_predictor, probabilities

    out, val = run
    cal = json.loads((out / "metrics.json").read_text())["calibration"]
    assert cal["fitted_on_images"] == 80 and cal["temperature"] != 1.0 and (out / "calibration.png").is_file()
    assert "expected calibration error" in (out / "report.md").read_text()
    labels = torch.tensor([["ants", "bees"].index(p.parent.name) for p in val])
    calibrated = probabilities(open_predictor(run=out), val)
    raw = logits_of(calibrated) * cal["temperature"]  # the logits before the fold
    t = cal["temperature"]
    assert nll(raw, labels, t) < min(nll(raw, labels, t * 1.25), nll(raw, labels, t / 1.25))  # T is the optimum
    np.testing.assert_allclose(scaled(raw, t).numpy(), calibrated, atol=1e-5)
    export_run(out, "onnx", None, True, False)
    np.testing.assert_allclose(probabilities(from_export(out / "model.onnx"), val), calibrated, atol=1e-4)


@pytest.mark.slow
def test_images_of_another_dataset_are_none_of_these_while_the_validation_images_are_accepted(run) -> None:
    from transferlab.inference.predictor import from_export, open_predictor, predict

    out, val = run
    world = json.loads((out / "metrics.json").read_text())["open_world"]
    assert world["accept"] == 0.95 and world["accepted_validation_share"] >= 0.95
    outside = sorted((DATASETS / "cats_and_dogs_filtered" / "validation" / "cats").glob("*.jpg"))[:30]
    assert world["score"] == "similarity to the 1st nearest of 32 training images"  # a tenth of 16 a class: too far
    assert f"is under {world['threshold']} is none of the classes" in (out / "report.md").read_text()
    verdicts = []
    for predictor in (open_predictor(run=out), from_export(out / "model.onnx")):  # the export carries the verdict
        known = predict(predictor, val, k=1)
        assert sum(not r["unknown"] for r in known) / len(known) >= 0.95
        assert all(r["unknown"] == (r["score"] < world["threshold"]) for r in known)
        strangers = predict(predictor, outside, k=1)
        assert any(r["unknown"] for r in strangers), [r["score"] for r in strangers]
        assert all(r["unknown"] == (r["score"] < world["threshold"]) for r in strangers)
        verdicts.append([r["score"] for r in known + strangers])
    np.testing.assert_allclose(*verdicts, atol=1e-4)  # the same scores inside the exported graph
    evaluated = run_cli("evaluate", out, out.parent / "data", "--unknown", outside[0].parent, "--format", "json")
    assert evaluated.returncode == 0, evaluated.stderr
    u = json.loads(evaluated.stdout)["unknown"]
    # 64 px and 16 images a class: the top probability's AUROC was 0.71 on 100 of these cats, the similarity's 0.86
    assert u["images"] == 500 and u["score"] == "similarity to the training images" and u["auroc"] > 0.8
    assert u["outside_accepted_share"] < 0.95 <= u["known_accepted_share"]
