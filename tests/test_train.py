import csv
import json
import shutil

import pytest
import torch
import yaml
from conftest import DATASETS, FAST, kill_and_resume, make_subset, run_cli
from PIL import Image

from transferlab import TrainConfig, train
from transferlab.errors import UserError
from transferlab.model.network import TransferNet
from transferlab.model.weights import create_backbone
from transferlab.recipe.plan import prepare
from transferlab.recipe.training import Recipe
from transferlab.rundir.folder import HISTORY_COLUMNS, load_net

pytestmark = pytest.mark.slow


def test_run_learns_and_writes_a_complete_run_directory(trained_run):
    out, metrics = trained_run
    # learning: 32 held-out images, chance is 0.5
    assert metrics["best_val_accuracy"] >= 0.75
    assert metrics["eval_accuracy"] == pytest.approx(metrics["best_val_accuracy"], abs=1e-6)
    assert metrics["num_train_images"] == 48 and metrics["num_val_images"] == 32
    assert metrics["classes"] == ["ants", "bees"]
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == HISTORY_COLUMNS
    # the summary is the history's: best = highest val accuracy, then lowest val loss, then the earliest epoch
    acc, loss = ([float(r[k]) for r in rows] for k in ("val_accuracy", "val_loss"))
    best = min(range(len(rows)), key=lambda i: (-acc[i], loss[i], i))
    assert metrics["best_val_accuracy"] == pytest.approx(max(acc), abs=1e-6)
    assert metrics["best_epoch"] == int(rows[best]["epoch"])
    assert metrics["best_val_loss"] == pytest.approx(min(loss), abs=1e-6)
    assert metrics["best_train_accuracy"] == pytest.approx(float(rows[best]["train_accuracy"]), abs=1e-6)  # at best
    assert metrics["final_val_accuracy"] == pytest.approx(acc[-1], abs=1e-6)
    for phase, key in (("head", "head_val_accuracy"), ("feature_extraction", None), ("fine_tune", None)):
        phase_acc = max(a for a, r in zip(acc, rows) if r["phase"] == phase)
        assert metrics[key or f"{phase}_best_val_accuracy"] == pytest.approx(phase_acc, abs=1e-6)
    assert metrics["train_seconds"] >= sum(float(r["seconds"]) for r in rows) - 0.01  # the epochs are part of it
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]  # the closed-form head, then fine-tuning continues the count
    assert [r["phase"] for r in rows] == ["head"] + ["feature_extraction"] * 2 + ["fine_tune"]
    assert float(rows[3]["lr"]) == pytest.approx(float(rows[1]["lr"]) / 10)
    assert metrics["epochs_run"] == 3
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["image_size"] == 96 and config["backbone"] == "efficientnet_lite0"
    assert config["fine_tune_at"] == 6 and config["classes"] == ["ants", "bees"]
    for png in ("curves.png", "confusion_matrix.png", "augmentations.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.width > 300
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    report = (out / "report.md").read_text()
    assert "![curves](curves.png)" in report and f"{metrics['best_val_accuracy']:.4f}" in report


def _backbone_state(net):
    return {k: v.clone() for k, v in net.groups.state_dict().items()}


def test_phase1_leaves_backbone_weights_and_batchnorm_statistics_unchanged(small_data, tmp_path):
    """Plain path, so the backbone really runs in training mode for every batch."""
    t = prepare(
        TrainConfig(data_dir=str(small_data), out=str(tmp_path / "r"), cache="none", **{**FAST, "fine_tune_epochs": 0})
    )
    before = _backbone_state(t.net)
    head_before = t.net.head[1].weight.clone()
    Recipe(t).train()
    after = _backbone_state(t.net)
    assert all(torch.equal(before[k], after[k]) for k in before), "frozen backbone changed in phase 1"
    assert not torch.equal(head_before, t.net.head[1].weight)


@pytest.mark.parametrize("train_bn", [False, True])
def test_phase2_changes_only_the_unfrozen_groups(small_data, tmp_path, train_bn):
    cfg = TrainConfig(data_dir=str(small_data), out=str(tmp_path / "r"), cache="none", train_bn=train_bn, **FAST)
    t = prepare(cfg)
    before = _backbone_state(t.net)
    Recipe(t).train()
    after = load_net(tmp_path / "r", "last")[0].groups.state_dict()  # the run ends on its best checkpoint
    k = t.fine_tune_at
    changed = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(int(g) >= k for g in changed)
    stats = [n for n in before if "running_mean" in n and int(n.split(".")[0]) >= k]
    stats_changed = any(not torch.equal(before[n], after[n]) for n in stats)
    assert stats_changed == train_bn


def test_predict_and_evaluate_a_saved_run(trained_run, small_data):
    out, metrics = trained_run
    proc = run_cli("predict", small_data / "val" / "bees", "--run", out, "--format", "json", "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    preds = json.loads(proc.stdout)
    assert len(preds) == 16 and all(len(p["top"]) == 2 for p in preds)
    assert all(abs(sum(t["prob"] for t in p["top"]) - 1) < 1e-4 for p in preds)
    proc = run_cli("evaluate", out, small_data, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["accuracy"] == pytest.approx(metrics["eval_accuracy"], abs=1e-6)
    assert sum(map(sum, result["confusion_matrix"])) == 32
    assert set(result["per_class"]) == {"ants", "bees"}
    assert (out / "evaluation.png").is_file()


def test_the_reloaded_run_computes_what_the_trained_network_computed(small_data, tmp_path):
    """The network in memory at the end of training against the one rebuilt from the run directory alone."""
    t = prepare(TrainConfig(data_dir=str(small_data), out=str(tmp_path / "r"), **FAST))
    Recipe(t).train()  # ends with the best checkpoint loaded into t.net
    loaded, config = load_net(tmp_path / "r")
    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        trained, reloaded = t.net.eval()(x), loaded(x)
    assert torch.allclose(trained, reloaded, atol=1e-6) and config["image_size"] == 96
    assert not torch.allclose(trained, TransferNet(t.spec, create_backbone(t.spec)[0], 2).eval()(x), atol=1e-3)


def test_three_classes_train_a_softmax_head_end_to_end(tmp_path):
    """cifar10_5k, three classes: the softmax branch of the loss, metrics, report and predict."""
    data = tmp_path / "cifar3"
    for split, n in (("train", 30), ("test", 15)):
        for name in ("airplane", "automobile", "frog"):
            src = sorted((DATASETS / "cifar10_5k" / split / name).iterdir())[:n]
            (data / split / name).mkdir(parents=True)
            for p in src:
                (data / split / name / p.name).symlink_to(p)
    out = tmp_path / "run"
    metrics = train(TrainConfig(data_dir=str(data), out=str(out), **{**FAST, "image_size": 64}))
    assert metrics["classes"] == ["airplane", "automobile", "frog"] and metrics["num_val_images"] == 45
    assert metrics["best_val_accuracy"] >= 0.6  # chance is 0.33
    net, _ = load_net(out)
    assert net.head[1].out_features == 3
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert len(evaluation["confusion_matrix"]) == 3 and sum(map(sum, evaluation["confusion_matrix"])) == 45
    proc = run_cli("predict", data / "test" / "frog", "--run", out, "--format", "json", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    assert all(len(p["top"]) == 3 for p in json.loads(proc.stdout))


def test_a_finished_run_is_not_overwritten(trained_run, small_data):
    out, _ = trained_run
    with pytest.raises(UserError, match="already holds a finished run"):
        train(TrainConfig(data_dir=str(small_data), out=str(out), **FAST))


def test_resume_after_sigkill_mid_epoch(small_data, tmp_path):
    _, metrics = kill_and_resume(small_data, tmp_path / "killed")
    assert yaml.safe_load((tmp_path / "killed" / "config.yaml").read_text())["epochs"] == 3
    assert metrics["epochs_run"] == 6


def test_the_default_size_follows_the_photos(small_data, tmp_path):
    """Hymenoptera photos (shorter side ~370 px) get 1.25x Lite0's 224; an explicit size always wins."""
    assert prepare(TrainConfig(data_dir=str(small_data), out=str(tmp_path / "a"))).size == 288
    assert prepare(TrainConfig(data_dir=str(small_data), out=str(tmp_path / "b"), image_size=96)).size == 96
    assert not (tmp_path / "a").exists()  # prepare writes nothing


def test_unfreezing_goes_deeper_by_default_for_images_upsampled_twice_or_more(small_data, tmp_path):
    """Lite0's 9 groups: from group 6 (0.65) for photos, from group 4 (0.45) for CIFAR's 32 px; given, as given."""
    cifar = tmp_path / "cifar"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (cifar / split / name).mkdir(parents=True)
            for p in sorted((DATASETS / "cifar10_5k" / split / name).iterdir())[:3]:
                (cifar / split / name / p.name).symlink_to(p)
    assert prepare(TrainConfig(data_dir=str(small_data), out=str(tmp_path / "a"))).fine_tune_at == 6
    assert prepare(TrainConfig(data_dir=str(cifar), out=str(tmp_path / "b"), image_size=128)).fine_tune_at == 4
    assert prepare(TrainConfig(data_dir=str(cifar), out=str(tmp_path / "c"), image_size=63)).fine_tune_at == 6
    given = TrainConfig(data_dir=str(cifar), out=str(tmp_path / "d"), image_size=128, fine_tune_at="0.65")
    assert prepare(given).fine_tune_at == 6


@pytest.mark.parametrize("cache", ["none", "disk"])
def test_no_run_ends_below_the_probe_nor_below_the_head_it_started_from(small_data, tmp_path, cache):
    """Training that can only do harm (rates a thousand times too high): the closed-form head, scored before the
    first epoch (epoch 0), stays the run's best and is what the saved model gives. Its accuracy is the probe's,
    logistic regression on one clean view of the pretrained features, computed here on its own: exactly on the
    plain path, whose head is fitted to those very features; within an image on the cached path, whose features
    are stored in float16 (and which keeps the better of that fit and the one on every view)."""
    from transferlab.data.index import index_folder
    from transferlab.data.transforms import eval_transform, load_for
    from transferlab.model.zoo import get_spec
    from transferlab.recipe.head_init import head_accuracy, solve_head
    from transferlab.rundir.folder import RunDir

    out = tmp_path / cache
    metrics = train(TrainConfig(data_dir=str(small_data), out=str(out), **FAST, cache=cache, lr=1.0, fine_tune_lr=1.0))
    rows = RunDir(out).read_history()
    spec = get_spec("efficientnet_lite0")
    net, tf, index = (
        TransferNet(spec, create_backbone(spec)[0], 2).eval(),
        eval_transform(spec, 96),
        index_folder(small_data),
    )
    with torch.no_grad():
        train_x, val_x = (
            net.features(torch.stack([tf(load_for(tf, s.path)) for s in part])) for part in (index.train, index.val)
        )
    fit = solve_head(train_x[:, None].numpy(), [s.label for s in index.train], 1, torch.ones(2), seed=0)
    probe = head_accuracy(fit["weight"], fit["bias"], val_x, torch.tensor([s.label for s in index.val]))
    assert [(r["epoch"], r["phase"]) for r in rows][:2] == [(0, "head"), (1, "feature_extraction")]
    assert all(r["val_accuracy"] < rows[0]["val_accuracy"] for r in rows[1:]), rows  # the harm was done
    assert metrics["best_epoch"] == 0 and metrics["best_val_accuracy"] == rows[0]["val_accuracy"]
    assert metrics["eval_accuracy"] == pytest.approx(rows[0]["val_accuracy"], abs=1e-6)  # the head was saved
    assert metrics["head_val_accuracy"] == rows[0]["val_accuracy"]
    if cache == "none":
        assert metrics["head_fit"]["fitted_on"] == "clean view"
        assert rows[0]["val_accuracy"] == pytest.approx(probe, abs=1e-6)
    else:
        assert metrics["head_fit"]["fitted_on"] in ("clean view", "every view")
        assert rows[0]["val_accuracy"] >= probe - 1 / 32 - 1e-6


def _ants_and_dogs(dest, per_class_train: int, per_class_val: int):
    """Two classes nothing in ImageNet confuses: ants (hymenoptera) and dogs (cats_and_dogs_filtered)."""
    for source, other in (("hymenoptera", "bees"), ("cats_and_dogs_filtered", "cats")):
        make_subset(dest, DATASETS / source, per_class_train, per_class_val)
        for split in ("train", "val"):
            shutil.rmtree(dest / split / other)
    return dest


def test_a_head_that_gets_every_validation_image_right_ends_the_run(tmp_path):
    """Nothing can beat a head that gets every validation image right: with patience the run ends at epoch 0,
    no epoch trained, and says so; with --patience 0 (run every epoch) the same set trains its epochs."""
    from transferlab.rundir.folder import RunDir

    data = _ants_and_dogs(tmp_path / "data", 12, 8)
    stopped = train(TrainConfig(data_dir=str(data), out=str(tmp_path / "stop"), **FAST))
    rows = RunDir(tmp_path / "stop").read_history()
    assert [(r["epoch"], r["phase"], r["val_accuracy"]) for r in rows] == [(0, "head", 1.0)]
    assert stopped["stopped_at_head"] and stopped["epochs_run"] == 0 and stopped["eval_accuracy"] == 1.0
    assert stopped["val_images_counted"] == 16 and "timings" in stopped
    assert "stopped at that head" in (tmp_path / "stop" / "report.md").read_text()
    assert RunDir(tmp_path / "stop").best.is_file()
    budgeted = train(TrainConfig(data_dir=str(data), out=str(tmp_path / "budget"), **FAST, time_budget="5m"))
    assert budgeted["stopped_at_head"] and budgeted["epochs_run"] == 0
    assert "fine_tuned" not in budgeted["time_budget"] and "fine_tune_epochs_planned" not in budgeted["time_budget"]
    every = train(TrainConfig(data_dir=str(data), out=str(tmp_path / "every"), **FAST, patience=0))
    assert every["epochs_run"] == FAST["epochs"] + FAST["fine_tune_epochs"] and "stopped_at_head" not in every
