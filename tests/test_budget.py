"""--time-budget: durations, the plan, and a real run that ends within its budget."""

import json
import re
import time

import numpy as np
import pytest
import yaml
from conftest import kill_and_resume, run_cli

from transferlab.config import parse_duration
from transferlab.errors import UserError
from transferlab.recipe.budget import Budget


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("2m", 120), ("1.5h", 5400), ("45", 45)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "fast", "2 weeks", "-3m"])
def test_bad_durations_are_one_line(text):
    with pytest.raises(UserError, match="give a duration such as 90s, 2m or 1h"):
        parse_duration(text)


def test_views_shrink_until_extraction_fits_a_third_of_what_is_left():
    budget = Budget(3600)
    assert budget.views(1000, 200, images_per_second=1000, wanted=2) == 2  # 2.2 s of extraction
    assert "too_short" not in budget.plan
    tight = Budget(30)
    left = tight.left()
    assert tight.views(1000, 200, images_per_second=100, wanted=3) == 1  # 12 s even at one view
    assert left < 30 and tight.plan["views"] == 1
    with pytest.warns(UserWarning, match="--time-budget 10s is too short .* about 12 s"):
        assert Budget(10).views(1000, 200, images_per_second=100, wanted=2) == 1


@pytest.mark.slow
def test_a_budgeted_run_ends_within_its_budget_and_says_what_it_did(small_data, tmp_path):
    out = tmp_path / "budget"
    budget = 40
    began = time.monotonic()
    proc = run_cli("train", small_data, "--out", out, "--image-size", "64", "--epochs", "200",
                   "--fine-tune-epochs", "200", "--patience", "0", "--workers", "0",
                   "--time-budget", f"{budget}s")  # fmt: skip
    wall = time.monotonic() - began
    assert proc.returncode == 0, proc.stderr
    assert wall <= budget * 1.1, wall
    # a line per epoch in the log, its time left the budget's end rather than 199 more epochs
    said = re.findall(r"feature extraction: epoch \d+ of 200, train accuracy [\d.]+, val accuracy [\d.]+ in \d+ s; "
                      r"about (\d+) s left", proc.stderr)  # fmt: skip
    assert said and all(int(left) <= budget for left in said), proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    plan = metrics["time_budget"]
    assert plan["budget_seconds"] == budget
    # the planned views are the ones the run cached for each training image (one for each validation image)
    views: dict[str, list[int]] = {}
    for entry in (out / "cache").rglob("*.npy"):
        views.setdefault(entry.relative_to(out / "cache").parts[0], []).append(np.load(entry, mmap_mode="r").shape[0])
    per_store = {(len(v), *set(v)) for v in views.values()}
    assert per_store <= {(metrics["num_train_images"], plan["views"]), (metrics["num_val_images"], 1)}, per_store
    assert (metrics["num_train_images"], plan["views"]) in per_store
    assert yaml.safe_load((out / "config.yaml").read_text())["cache_views"] == plan["views"]
    assert metrics["epochs_run"] < 400 and metrics["epochs_run"] == plan["feature_extraction_epochs"] + plan.get(
        "fine_tune_epochs", 0
    )
    assert metrics["wall_seconds"] <= budget * 1.1
    assert "Time budget 40 s" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_budgeted_run_killed_mid_way_resumes_within_a_budget(small_data, tmp_path):
    """The resumed process measures its speed again (its cached views stay as planned) and finishes."""
    _, metrics = kill_and_resume(small_data, tmp_path / "killed", "--time-budget", "10m")
    plan = metrics["time_budget"]
    assert plan["budget_seconds"] == 600 and plan["finish_estimate_seconds"] > 0 and plan["fine_tuned"]
