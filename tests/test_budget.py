"""--time-budget: durations, the plan, and a real run that ends within its budget."""

import csv
import json
import re
import time

import numpy as np
import pytest
import yaml
from conftest import DATASETS, kill_and_resume, make_subset, run_cli

from transferlab.config import TrainConfig, parse_duration
from transferlab.errors import UserError
from transferlab.recipe.budget import EXTRACTION_SHARE, FINE_TUNE_WANTED, Budget, plan_run
from transferlab.recipe.plan import prepare


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


def _speed_at(size: int) -> dict[str, float]:
    """Images per second as a CPU gives them: the frozen pass's cost grows as the square of the side."""
    through = 60.0 * (224 / size) ** 2
    return {"prepare": 1000.0, "chosen": through, "32": through}


def test_a_budget_shrinks_the_input_of_upsampled_images_until_fine_tuning_fits(tmp_path):
    """All of CIFAR-10's size in an hour at 60 images/s at 224 px: the native size leaves no room for fine-tuning,
    the largest smaller size that does is chosen (and the speed measured again at it); other runs keep theirs."""
    cifar = make_subset(tmp_path / "cifar", DATASETS / "cifar10_5k", train=4, val=2)

    def setup(data, **options):
        s = prepare(TrainConfig(data_dir=str(data), out=str(tmp_path / "r"), time_budget="1h", **options))
        s.data.train, s.data.val = s.data.train * (50_000 // len(s.data.train)), s.data.val * 100  # the scale only
        return s

    s, measured = setup(cifar), []
    budget = Budget(3600)
    speed = plan_run(budget, s, lambda: measured.append(s.size) or _speed_at(s.size))
    assert measured == [224, s.size] and 112 <= s.size < 224 and s.size % 32 == 0  # measured again at its size
    assert budget.plan["native_image_size"] == 224 and budget.plan["image_size"] == s.size
    assert speed == _speed_at(s.size)

    def fits(size: int, views: int = 1) -> bool:  # the views' extraction, three fine-tuning epochs and the finish
        s.size, at = size, _speed_at(size)
        budget.finish_from(s, at)
        images = views * len(s.data.train) + len(s.data.val)
        once = images / (EXTRACTION_SHARE / (1 / at["prepare"] + 1 / at["chosen"]))
        return once + FINE_TUNE_WANTED * budget.fine_tune_epoch(s, at) <= budget.left()

    chosen, views = s.size, budget.plan["views"]
    assert fits(chosen) and not fits(chosen + 32) and fits(chosen, views)  # the views leave room for fine-tuning
    s.size = chosen
    # the epochs it then plans fit in what is left, at most the ones asked
    assert 1 <= budget.fine_tuning_epochs(s, speed) <= s.cfg.fine_tune_epochs
    assert budget.plan["fine_tune_epochs_planned"] * budget.fine_tune_epoch(s, speed) <= budget.left()

    for kept in (setup(cifar, image_size=224), setup(cifar, fine_tune_epochs=0), setup(DATASETS / "hymenoptera")):
        native = kept.size
        plan_run(Budget(3600), kept, lambda s=kept: _speed_at(s.size))
        assert kept.size == native  # a size given, nothing to fine-tune, photos that are not upsampled


def test_fine_tuning_epochs_planned_again_move_the_cosine_and_a_resume_reads_them(tmp_path):
    """After each fine-tuning epoch the epochs that fit are planned again, the cosine's length with them (at most the
    epochs asked); a resumed run's epochs are the ones its checkpoint's cosine was last planned over."""
    from types import SimpleNamespace

    import torch

    from transferlab.recipe.budget import StopAtDeadline

    strategy = SimpleNamespace(reduce_boolean_decision=lambda x, all: x, broadcast=lambda x: x)  # one process

    def epoch_ends(done: int, max_epochs: int, cosine: bool, most: int = 10) -> tuple[int, int | None]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        fall = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        trainer = SimpleNamespace(
            strategy=strategy, should_stop=False, current_epoch=done - 1,
            fit_loop=SimpleNamespace(max_epochs=max_epochs),
            lr_scheduler_configs=[SimpleNamespace(scheduler=fall)] if cosine else [],
        )  # fmt: skip
        deadline = StopAtDeadline(Budget(3600), "fine_tune", most=most)  # an hour left: every epoch asked fits
        deadline.on_train_epoch_start(trainer, None)
        deadline.on_train_epoch_end(trainer, None)
        return trainer.fit_loop.max_epochs, fall.T_max if cosine else None

    assert epoch_ends(1, 3, cosine=True) == (10, 10)  # an hour left: the ten asked, the cosine over them
    assert epoch_ends(1, 3, cosine=True, most=3) == (3, 3)  # at most the epochs asked
    assert epoch_ends(3, 3, cosine=False) == (10, None)  # a constant rate: on while epochs fit

    # an epoch counts from its start to the next one's: what is written after it (checkpoint, curves) is in the plan
    deadline = StopAtDeadline(Budget(3600), "feature_extraction")
    trainer = SimpleNamespace(strategy=strategy, should_stop=False)
    deadline.on_train_epoch_start(trainer, None)
    deadline.on_train_epoch_end(trainer, None)
    time.sleep(0.3)  # as the recorder's last.ckpt after the epoch
    deadline.on_train_epoch_start(trainer, None)
    assert deadline.longest >= 0.3

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "lr_schedulers": [{"T_max": 4, "last_epoch": 2}]}, ckpt)
    s = SimpleNamespace(cfg=SimpleNamespace(fine_tune_epochs=50))
    budget = Budget(3600)
    assert budget.fine_tuning_epochs(s, {}, ckpt) == 4 and budget.plan["fine_tuned"]


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
    # the cosine rate falls over the fine-tuning epochs planned to fit, not over the 200 asked
    assert plan["fine_tuned"] and 0 < plan["fine_tune_epochs"] <= plan["fine_tune_epochs_planned"] < 200, plan
    assert plan["kept_for_fine_tuning_seconds"] > 0
    with open(out / "history.csv") as f:
        rates = [float(r["lr"]) for r in csv.DictReader(f) if r["phase"] == "fine_tune"]
    if len(rates) >= 3:  # the cosine fell over the epochs that fitted: by half at least by their last
        assert rates[-1] <= rates[0] / 2, rates
    assert metrics["wall_seconds"] <= budget * 1.1
    assert "Time budget 40 s" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_budgeted_run_killed_mid_way_resumes_within_a_budget(small_data, tmp_path):
    """The resumed process measures its speed again (its cached views stay as planned) and finishes."""
    _, metrics = kill_and_resume(small_data, tmp_path / "killed", "--time-budget", "10m")
    plan = metrics["time_budget"]
    assert plan["budget_seconds"] == 600 and plan["finish_estimate_seconds"] > 0 and plan["fine_tuned"]
