"""Several labels per image (issue 23, item 2): a CSV of label lists, a sigmoid per class, mAP and F1, a threshold
per class, and predict, evaluate, export, the web app, the Learner and resume on a set composed from the shared
photos (benchmarks/multi_label.py: 2 x 2 grids of ant, bee, cat and dog photos and CIFAR vehicles, none of the
classes, so that some images have no label)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, kill_and_resume, run_cli
from test_labels import write_csv

from transferlab.data.index import targets
from transferlab.data.labels import index_data, index_table
from transferlab.errors import UserError
from transferlab.inference.evaluate import multilabel_metrics
from transferlab.recipe.calibrate import choose_thresholds
from transferlab.recipe.head_init import solve_head
from transferlab.recipe.module import weighted_loss

TINY = ["--image-size", "64", "--epochs", "2", "--fine-tune-epochs", "1", "--workers", "0", "--batch-size", "16"]
HYM = ROOT.parent / "shared" / "datasets" / "hymenoptera"


def compose(folder: Path, train: int, val: int) -> Path:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "multi_label.py"), "--compose", str(folder), "--train", str(train),
         "--val", str(val), "--tile", "32"], capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


def rows_of(table: Path) -> list[dict]:
    with open(table, newline="") as f:
        return list(csv.DictReader(f))


# --- reading label lists -------------------------------------------------------------------------------------


def test_label_lists_split_by_the_delimiter_and_a_blank_cell_is_no_label(tmp_path: Path) -> None:
    ants, bees = sorted((HYM / "train" / "ants").glob("*.jpg")), sorted((HYM / "train" / "bees").glob("*.jpg"))
    rows = [[str(p), "ant;insect", "train"] for p in ants[:8]] + [[str(p), "bee;insect", "train"] for p in bees[:8]]
    rows += [[str(ants[9]), "", "train"], [str(ants[10]), "ant", "val"], [str(bees[10]), "", "val"]]
    table = write_csv(tmp_path / "tags.csv", ["image", "tags", "split"], rows)
    index = index_table(table, multi_label=True, label_delim=";")
    assert index.classes == ["ant", "bee", "insect"] and index.multi_label
    everything = {s.path: s.label for s in index.train + index.tune + index.val}
    assert everything[ants[0]] == (0, 2) and everything[bees[0]] == (1, 2) and everything[ants[9]] == ()
    assert [s.label for s in index.val] == [(0,), ()]
    # the threshold images come out of the training rows, disjoint from them, and never from the validation rows
    assert index.tune and not {s.path for s in index.tune} & {s.path for s in index.train}
    assert len(index.train) + len(index.tune) == 17
    assert targets(index.val, 3, True)[0].tolist() == [1, 0, 0] and not targets(index.val, 3, True)[1].any()
    # one label per image, the same table: the delimiter is part of the label, and a blank is refused
    with pytest.raises(UserError, match=r"row 18 of .* has a blank label.*--multi-label"):
        index_table(table)


def test_multi_label_needs_a_csv(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--multi-label reads several labels per image from a CSV"):
        index_data(HYM, multi_label=True)


# --- the pieces: loss, closed-form head, thresholds, metrics -------------------------------------------------------


def test_binary_cross_entropy_per_class_and_a_one_vs_rest_closed_form_head() -> None:
    logits, y = torch.tensor([[2.0, -1.0, 0.0]]), torch.tensor([[1.0, 0.0, 1.0]])
    by_hand = -(np.log(1 / (1 + np.exp(-2))) + np.log(1 - 1 / (1 + np.exp(1))) + np.log(0.5)) / 3
    assert float(weighted_loss(logits, y)) == pytest.approx(by_hand, rel=1e-6)
    # features where class c is present exactly when feature c is positive: the fitted head finds all three
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 1, 8)).astype(np.float32)
    labels = list((x[:, 0, :3] > 0).astype(np.float32))
    fit = solve_head(x, labels, 3, torch.ones(3), seed=0)
    predicted = (torch.from_numpy(x[:, 0]) @ fit["weight"].T + fit["bias"] > 0).numpy()
    assert (predicted == np.stack(labels).astype(bool)).mean() > 0.97 and "holdout_log_loss" in fit


def test_each_class_threshold_maximizes_its_f1_and_the_metrics_are_the_textbooks() -> None:
    probs = np.array([[0.9, 0.2], [0.7, 0.1], [0.4, 0.3], [0.2, 0.05]])
    labels = [(0,), (0,), (), (1,)]
    # class 0: the two likeliest are its two positives, so the cut falls between 0.7 and 0.4; class 1: its one
    # positive is the least likely, so every image is called positive (F1 2/5) rather than none (0)
    assert choose_thresholds(probs, labels) == [0.55, 0.05]
    m = multilabel_metrics(probs, labels, ["a", "b"], [0.55, 0.05])
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "ap": 1.0, "support": 2,
                                   "threshold": 0.55}  # fmt: skip
    # class b: ranked last of four, its AP is 1/4; called positive everywhere: precision 1/4, recall 1
    assert m["per_class"]["b"]["ap"] == 0.25 and m["per_class"]["b"]["precision"] == 0.25
    assert m["map"] == pytest.approx((1 + 0.25) / 2) and m["macro_f1"] == pytest.approx((1 + 0.4) / 2, abs=1e-4)
    # micro F1: 3 right of 2 + 4 called and 3 true: 2 * 3 / (6 + 3)
    assert m["micro_f1"] == pytest.approx(2 / 3, abs=1e-6) and m["images_without_labels"] == 1
    assert m["accuracy"] == 0.25  # only the last image has every label right
    # a class no image has stays out of the means (its AP is undefined), and keeps the even-odds threshold
    assert choose_thresholds(probs, [(0,), (0,), (), ()])[1] == 0.5
    assert multilabel_metrics(probs, [(0,), (0,), (), ()], ["a", "b"], [0.55, 0.5])["map"] == 1.0


# --- end to end -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    return compose(tmp_path_factory.mktemp("tiles") / "data", train=60, val=30)


@pytest.fixture(scope="module")
def trained(tiles: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiles"
    proc = run_cli("train", tiles, "--multi-label", "--out", out, *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "best val mAP" in proc.stdout
    return out


@pytest.mark.slow
def test_a_multi_label_run_picks_by_map_and_reports_it(trained: Path, tiles: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    evaluation = json.loads((trained / "evaluation.json").read_text())
    history = list(csv.DictReader((trained / "history.csv").read_text().splitlines()))
    val = [r for r in rows_of(tiles) if r["split"] == "val"]
    assert metrics["num_val_images"] == len(val) == evaluation["num_images"]
    assert evaluation["images_without_labels"] == sum(not r["labels"] for r in val) > 0
    # the best epoch is the one of highest mAP, and the best checkpoint's evaluation is that epoch's
    best = max(history, key=lambda r: (float(r["val_map"]), -float(r["val_loss"])))
    assert metrics["best_epoch"] == int(best["epoch"]) and metrics["best_val_map"] == float(best["val_map"])
    assert evaluation["map"] == pytest.approx(metrics["best_val_map"], abs=1e-4)
    thresholds = [evaluation["per_class"][c]["threshold"] for c in ["ant", "bee", "cat", "dog"]]
    assert metrics["label_thresholds"] == thresholds and metrics["num_threshold_images"] > 0
    assert "mean average precision" in (trained / "report.md").read_text()
    assert metrics["calibration"]["temperature"] == 1.0  # a threshold per class instead


@pytest.mark.slow
def test_predict_evaluate_and_export_give_the_labels_above_each_threshold(trained: Path, tiles: Path) -> None:
    metrics = json.loads((trained / "metrics.json").read_text())
    evaluated = run_cli("evaluate", trained, tiles, "--format", "json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["map"] == json.loads((trained / "evaluation.json").read_text())["map"]
    images = sorted((tiles.parent / "images").glob("val_*.jpg"))[:8]
    predicted = run_cli("predict", "--run", trained, *images, "--format", "json", "--top-k", "4")
    assert predicted.returncode == 0, predicted.stderr
    results = json.loads(predicted.stdout)
    thresholds = dict(zip(metrics["classes"], metrics["label_thresholds"]))
    for r in results:  # every class's sigmoid, and the labels those at or above their own threshold
        above = {t["label"] for t in r["top"] if t["prob"] >= thresholds[t["label"]]}
        assert {t["label"] for t in r["labels"]} == above
        assert len(r["top"]) == 4 and not np.isclose(sum(t["prob"] for t in r["top"]), 1.0)
    exported = run_cli("export", trained)
    assert exported.returncode == 0, exported.stderr
    onnx = run_cli("predict", "--model", trained / "model.onnx", *images, "--format", "json", "--top-k", "4")
    assert onnx.returncode == 0, onnx.stderr
    for a, b in zip(results, json.loads(onnx.stdout)):
        assert [t["label"] for t in a["labels"]] == [t["label"] for t in b["labels"]]
        assert max(abs(x["prob"] - y["prob"]) for x, y in zip(a["top"], b["top"])) < 1e-4


@pytest.mark.slow
def test_the_web_app_shows_the_labels_and_the_map(trained: Path, tiles: Path) -> None:
    from fastapi.testclient import TestClient

    from transferlab.serve.app import create_app

    image = sorted((tiles.parent / "images").glob("val_*.jpg"))[0]
    with TestClient(create_app(trained.parent), base_url="http://127.0.0.1") as client:
        answer = client.post(f"/api/runs/{trained.name}/predict", files=[("images", (image.name, image.read_bytes()))])
        assert answer.status_code == 200, answer.text
        page = client.get(f"/runs/{trained.name}")
    expected = json.loads(run_cli("predict", "--run", trained, image, "--format", "json").stdout)[0]
    assert answer.json()[0]["labels"] == expected["labels"]
    assert page.status_code == 200 and "mean average precision" in page.text and "threshold" in page.text


@pytest.mark.slow
def test_the_learner_and_resume_train_several_labels(tiles: Path, tmp_path: Path) -> None:
    from transferlab import Learner

    learner = Learner(tiles, multi_label=True, out=str(tmp_path / "learner"), image_size=64, workers=0)
    rows = learner.freeze().fit(1)
    assert "val_map" in rows[-1] and learner.finish()["best_val_map"] == rows[-1]["val_map"]
    history, metrics = kill_and_resume(tiles, tmp_path / "resumed", "--multi-label")
    # epochs 0 (the head) to 6 once each (kill_and_resume checks), each with its mAP, the best the highest of them
    assert metrics["best_val_map"] == max(float(r["val_map"]) for r in history)


def test_a_label_seen_once_trains_rather_than_setting_a_threshold(tmp_path: Path) -> None:
    ants = sorted((HYM / "train" / "ants").glob("*.jpg"))
    rows = [[str(p), "ant", "train"] for p in ants[:20]] + [[str(ants[20]), "ant rare", "train"]]
    rows += [[str(ants[21]), "ant", "val"]]
    table = write_csv(tmp_path / "rare.csv", ["image", "labels", "split"], rows)
    for seed in range(4):  # seeds 1 and 2 draw the rare image into the threshold images, which must give it back
        index = index_table(table, seed=seed, multi_label=True)
        assert ants[20] in {s.path for s in index.train} and 2 <= len(index.tune) <= 3


@pytest.mark.slow
def test_two_ddp_processes_train_several_labels_and_count_every_image_once(tiles: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = run_cli("train", tiles, "--multi-label", "--out", out, *TINY, "--accelerator", "cpu", "--devices", "2",
                   "--strategy", "ddp")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["val_images_counted"] == metrics["num_val_images"]
    # the mAP both processes agreed on per epoch is the one of all the validation images (rank 0's finish)
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["map"] == pytest.approx(metrics["best_val_map"], abs=1e-4)
