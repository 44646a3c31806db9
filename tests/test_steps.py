import pytest
import yaml
from conftest import FAST

from transferlab import Learner, TrainConfig, train
from transferlab.errors import UserError

OPTIONS = {k: v for k, v in FAST.items() if k not in ("epochs", "fine_tune_epochs")}  # epochs come with each fit


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_each_step_changes_what_trains_and_bad_steps_are_one_line(small_data, tmp_path):
    learner = Learner(small_data, out=str(tmp_path / "steps"), **OPTIONS)
    groups = len(learner.base)
    everything = learner.summary()["trainable_params"]
    assert learner.summary()["trainable_from_group"] == 0  # as a loaded Keras base: trainable until frozen
    head = learner.freeze().summary()
    assert head["trainable_params"] == 1280 + 1 and head["frozen_params"] == everything - 1281  # dense layer only
    top = learner.unfreeze(at=groups - 1).summary()
    assert head["trainable_params"] < top["trainable_params"] < everything
    assert f"groups {groups - 1}-{groups - 1} of {groups} trainable" in repr(learner)
    assert learner.head(dropout=0.5).setup.net.head[0].p == 0.5
    for bad, message in [
        (lambda: learner.augment("heavy"), "--augment 'heavy': use one of keras, none, strong"),
        (lambda: learner.unfreeze(at=99), f"--fine-tune-at 99 is outside the backbone's {groups} layer groups"),
        (lambda: learner.finish(), "nothing trained yet"),
    ]:
        with pytest.raises(UserError, match=message) as e:
            bad()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "steps").exists()  # nothing is written before the first fit


@pytest.mark.slow
def test_steps_give_the_same_run_as_train(trained_run, small_data, tmp_path):
    """The Keras tutorial's steps, one by one, and train() with the same options and seed: the same run."""
    out, metrics = trained_run  # train(TrainConfig(**FAST)): 2 epochs frozen, then 1 fine-tuning
    learner = Learner(small_data, out=str(tmp_path / "steps"), **OPTIONS)
    learner.freeze().augment("keras").head(dropout=0.2)
    first = learner.fit(epochs=2)
    assert [r["phase"] for r in first] == ["head"] + ["feature_extraction"] * 2  # the closed-form head: epoch 0
    learner.unfreeze()
    assert learner.summary()["trainable_from_group"] == 6
    second = learner.fit(epochs=1)
    assert [r["epoch"] for r in second] == [3] and second[0]["lr"] == pytest.approx(first[1]["lr"] / 10)
    steps = learner.finish()

    from transferlab.rundir.folder import RunDir

    assert without_time(learner.history) == without_time(RunDir(out).read_history())
    for key in ("best_val_accuracy", "best_epoch", "eval_accuracy", "best_val_loss", "fine_tune_best_val_accuracy"):
        assert steps[key] == metrics[key], key
    config, expected = (yaml.safe_load((d / "config.yaml").read_text()) for d in (tmp_path / "steps", out))
    assert {k: v for k, v in config.items() if k != "out"} == {k: v for k, v in expected.items() if k != "out"}
    for name in ("report.md", "curves.png", "checkpoints/best.ckpt", "augmentations.png"):
        assert (tmp_path / "steps" / name).is_file()
    with pytest.raises(UserError, match="has finished"):
        learner.fit(epochs=1)
    with pytest.raises(UserError, match="comes before the first fit"):
        learner.augment("none")


@pytest.mark.slow
def test_fitting_without_freezing_trains_everything_as_train_does(small_data, tmp_path):
    options = {**OPTIONS, "image_size": 64}
    learner = Learner(small_data, out=str(tmp_path / "steps"), **options)
    learner.fit(epochs=1, lr=1e-3)  # never frozen: every group trains from the first epoch
    expected = train(
        TrainConfig(
            data_dir=str(small_data), out=str(tmp_path / "train"), epochs=0, fine_tune_epochs=1, fine_tune_at="0",
            fine_tune_lr=1e-3, **options,
        )
    )  # fmt: skip
    assert [r["phase"] for r in learner.history] == ["fine_tune"]
    with pytest.raises(UserError, match="fine tune after fine tune: a Learner fits once frozen, then once after"):
        learner.fit(epochs=1)
    assert learner.finish()["best_val_accuracy"] == expected["best_val_accuracy"]
    from transferlab.rundir.folder import RunDir

    assert without_time(learner.history) == without_time(RunDir(tmp_path / "train").read_history())
