import csv
import json

import pytest
import torch

from transferlab import TrainConfig
from transferlab.benchmark import COLUMNS, _override, _pace, member_folder, run_benchmark
from transferlab.model.network import TransferNet
from transferlab.model.weights import create_backbone
from transferlab.model.zoo import get_spec
from transferlab.recipe.plan import prepare

TINY = ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "0", "--workers", "0", "--batch-size", "16"]


def test_leaderboard_columns_sorting_failing_row_and_resume(small_data, tmp_path, monkeypatch, empty_hf):
    for k, v in {**empty_hf, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "bench"
    rows = run_benchmark(small_data, "efficientnet_lite0,resnet50,efficientnet_lite1", out, TINY)
    with open(out / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS
    assert [r["model"] for r in table][-1] == "resnet50"  # failed rows last
    failed = table[-1]
    assert failed["status"].startswith("failed: weights not available") and failed["val_accuracy_best"] == ""
    done = [r for r in table if r["status"] == "done"]
    assert len(done) == 2
    accs = [float(r["val_accuracy_best"]) for r in done]
    assert accs == sorted(accs, reverse=True)
    for r in done:
        assert int(r["image_size"]) == 64 and float(r["images_per_second"]) > 0 and float(r["peak_memory_mb"]) > 100
        assert int(r["params"]) > 3_000_000
    assert (out / "comparison.png").stat().st_size > 10_000 and (out / "leaderboard.md").is_file()
    assert rows[0]["model"] == table[0]["model"]

    # re-run: finished backbones are skipped, an unfinished one resumes from its last checkpoint
    lite1 = out / "efficientnet_lite1"
    finished_at = (out / "efficientnet_lite0" / "metrics.json").stat().st_mtime_ns
    (lite1 / "metrics.json").unlink()
    again = {r["model"]: r for r in run_benchmark(small_data, "efficientnet_lite0,efficientnet_lite1", out, TINY)}
    assert again["efficientnet_lite0"]["status"] == "done (reused)"
    assert (out / "efficientnet_lite0" / "metrics.json").stat().st_mtime_ns == finished_at
    assert again["efficientnet_lite1"]["status"] == "done"
    assert json.loads((lite1 / "metrics.json").read_text())["epochs_run"] == 1


def test_ablation_options_do_what_they_say(small_data, tmp_path):
    raw = prepare(TrainConfig(data_dir=str(small_data), out=str(tmp_path / "a"), pixels="raw255", image_size=64))
    assert raw.spec.mean == (0.0, 0.0, 0.0) and raw.spec.std[0] == pytest.approx(1 / 255)
    spec = get_spec("efficientnet_lite0")
    net = TransferNet(spec, create_backbone(spec)[0], 2)
    net.bn_always_train = True
    net.train()
    bns = [m for m in net.groups.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.training for m in bns)
    net.bn_always_train = False
    net.train()
    assert not any(m.training for m in bns)
    assert _override(["--image-size", "128", "--epochs", "3"], ["--image-size", "32"]) == [
        "--epochs",
        "3",
        "--image-size",
        "32",
    ]
    assert member_folder("../../etc") == "_.._etc" and "/" not in member_folder("a/b")


def test_override_treats_switches_as_options():
    args = ["--epochs", "3", "--no-pretrained", "--augment", "none", "--train-bn"]
    assert _override(args, ["--pretrained", "--epochs", "0"]) == [
        "--augment",
        "none",
        "--train-bn",
        "--pretrained",
        "--epochs",
        "0",
    ]
    assert [_pace(r) for r in (1.04, 1.4, 3.23, 0.3)] == [
        "in about the default's time", "40 % slower", "3.2x slower", "70 % faster",
    ]  # fmt: skip


def test_an_ablation_runs_the_rows_asked_for_in_its_own_order_and_refuses_one_it_lacks(tmp_path):
    from transferlab.benchmark import ABLATION, RECIPE, _chosen, run_recipe_ablation
    from transferlab.errors import UserError

    assert list(_chosen(RECIPE, ["no_augmentation", "default"])) == ["default", "no_augmentation"]
    assert _chosen(ABLATION, None) == ABLATION
    with pytest.raises(UserError, match="no ablation row 'no_such_row': choose among default, from_scratch"):
        run_recipe_ablation(tmp_path, "efficientnet_lite0", tmp_path / "out", [], variants=["default", "no_such_row"])


@pytest.mark.slow
def test_recipe_ablation_rows_do_what_they_say_and_read_their_numbers(tmp_path):
    import yaml
    from conftest import make_subset

    from transferlab.benchmark import RECIPE, run_recipe_ablation
    from transferlab.rundir.folder import RunDir

    data = make_subset(tmp_path / "data", train=8, val=6)
    out = tmp_path / "recipe"
    args = ["--image-size", "64", "--epochs", "1", "--fine-tune-epochs", "1", "--workers", "0", "--batch-size", "8"]
    rows = run_recipe_ablation(data, "efficientnet_lite0", out, args)
    assert [r["model"] for r in rows] == list(RECIPE) and all(r["status"] == "done" for r in rows)
    config = {r["model"]: yaml.safe_load((out / r["model"] / "config.yaml").read_text()) for r in rows}
    phases = {r["model"]: [h["phase"] for h in RunDir(out / r["model"]).read_history()] for r in rows}
    assert phases["default"] == ["head", "feature_extraction", "fine_tune"]
    for name, epochs in (("from_scratch", 2), ("from_scratch_longer", 6)):
        c = config[name]
        assert not c["pretrained"] and c["weights_source"] == "random" and c["train_bn"] and c["fine_tune_at"] == 0
        assert phases[name] == ["fine_tune"] * epochs and c["fine_tune_lr"] == c["lr"]
    assert phases["feature_extraction_only"] == ["head"] + ["feature_extraction"] * 2
    assert phases["bn_training_mode"][0] == "feature_extraction"  # no head fitted to features it never trains on
    assert phases["all_trainable"] == ["fine_tune"] * 2 and config["all_trainable"]["pretrained"]
    assert config["all_trainable"]["fine_tune_at"] == 0 and not config["all_trainable"]["train_bn"]
    assert config["bn_training_mode"]["bn_mode"] == "train"
    assert config["no_augmentation"]["augment"] == "none" and config["strong_augmentation"]["augment"] == "strong"
    default = rows[0]
    for r in rows:  # each reading is written from the row's own numbers, against the default's
        assert r["reading"].startswith(f"{r['model'].replace('_', ' ')} reached {r['val_accuracy_best']:.2f} at epoch")
        if r is not default:
            delta = r["val_accuracy_best"] - default["val_accuracy_best"]
            assert (f"{abs(delta):.2f} {'above' if delta > 0 else 'below'}" in r["reading"]) or abs(delta) < 0.005
            assert _pace(r["train_seconds"] / default["train_seconds"]) in r["reading"]
    with open(out / "leaderboard.csv") as f:
        assert [r["reading"] for r in csv.DictReader(f)] == [r["reading"] for r in rows]
    assert (out / "comparison.png").stat().st_size > 10_000
