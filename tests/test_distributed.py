"""Two gloo processes on this CPU (Lightning's DDP): one run directory, the cache filled once, exact validation."""

import csv
import json

import pytest
from conftest import kill_and_resume, run_cli

pytestmark = pytest.mark.slow
DDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
SMALL = ["--image-size", "96", "--batch-size", "16", "--epochs", "2", "--fine-tune-epochs", "1", "--workers", "0"]


def test_two_processes_share_extraction_count_each_image_once_and_learn_like_one(trained_run, small_data, tmp_path):
    _, single = trained_run  # the same data, options and seed in one process
    out, cache = tmp_path / "ddp", tmp_path / "cache"
    proc = run_cli("train", small_data, "--out", out, "--cache-dir", cache, *SMALL, *DDP)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("best val accuracy") == 1  # rank 1 prints nothing
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["val_images_counted"] == metrics["num_val_images"] == 32  # no padded repeats counted
    per_process = metrics["timings"]["extracted_per_process"]
    assert len(per_process) == 2 and all(n > 0 for n in per_process) and sum(per_process) == 48 + 32
    pooled = [d for d in cache.iterdir() if json.loads((d / "key.json").read_text())["output"] == "pooled"]
    assert sum(len(list(d.rglob("*.npy"))) for d in pooled) == 48 + 32  # what one process would have written
    assert not list(cache.rglob("*.tmp"))
    for name in ("config.yaml", "history.csv", "report.md", "curves.png", "checkpoints/best.ckpt"):
        assert (out / name).is_file(), name
    with open(out / "history.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [0, 1, 2, 3]
    assert abs(metrics["best_val_accuracy"] - single["best_val_accuracy"]) <= 0.16  # 32 images: a few of noise
    assert metrics["eval_accuracy"] == pytest.approx(metrics["best_val_accuracy"], abs=0.04)


def test_a_killed_ddp_run_resumes_with_an_intact_history(small_data, tmp_path):
    _, metrics = kill_and_resume(small_data, tmp_path / "killed", *DDP)
    assert metrics["epochs_run"] == 6 and metrics["processes"] == 2 and metrics["val_images_counted"] == 32
