"""Every option is declared once: the checks, the CLI and the Python API all come from that declaration."""

import dataclasses
import importlib.util
import typing

import pytest
from conftest import run_cli

import transferlab
from transferlab import TrainConfig
from transferlab.config import OPTIMIZERS, cli_fields, to_cli_args
from transferlab.errors import UserError


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": -1.0}, r"^--lr -1.0: must be above 0 \(default 0.001\)$"),
        ({"lr": 0}, "--lr 0.0: must be above 0"),
        ({"epochs": -1}, "--epochs -1: must be at least 0"),
        ({"epochs": 0, "fine_tune_epochs": 0}, "nothing to train"),
        ({"fine_tune_epochs": -1}, "--fine-tune-epochs -1: must be at least 0"),
        ({"batch_size": 0}, "--batch-size 0: must be at least 1"),
        ({"dropout": 1.0}, "--dropout 1.0: must be below 1"),
        ({"val_split": 0.0}, "--val-split 0.0: must be above 0"),
        ({"val_split": 1.5}, "--val-split 1.5: must be below 1"),
        ({"optimizer": "lbfgs"}, "--optimizer 'lbfgs': use one of adam, adamw, sgd, rmsprop"),
        ({"augment": "heavy"}, "--augment 'heavy': use one of keras, none, strong"),
        ({"resize": "pad"}, "--resize 'pad': use one of crop, squash"),
        ({"precision": "8"}, "--precision '8': use one of"),
        ({"epochs": "3"}, "--epochs '3': expected int"),
        ({"epochs": 2.5}, "--epochs 2.5: expected int"),
        ({"train_bn": 1}, "--train-bn 1: expected bool"),
        ({"image_size": 8}, "--image-size 8: must be at least 16"),
        ({"patience": -1}, "--patience -1: must be at least 0"),
        ({"bn_mode": "train"}, "--bn-mode train makes frozen features depend on the batch"),
        ({"data_dir": ""}, "no data folder given"),
    ],
)
def test_every_bad_value_gets_one_line(change, message):
    cfg = TrainConfig(**{"data_dir": "photos", **change})
    with pytest.raises(UserError, match=message) as e:
        cfg.check()
    assert "\n" not in str(e.value)


def test_good_values_pass_and_ints_are_accepted_for_floats():
    TrainConfig(data_dir="photos", lr=1, dropout=0, fine_tune_lr=None, image_size=None).check()
    with pytest.raises(UserError, match="--lr '1': expected float"):
        TrainConfig(data_dir="photos", lr="1").check()  # what an int passes as, a string does not


def test_each_declared_bound_is_where_the_check_starts_refusing():
    """Against the declaration itself: an inclusive bound passes and one step beyond fails; an open one fails
    and one step inside passes (so a check that let everything through, or refused too much, fails here)."""
    hints = typing.get_type_hints(TrainConfig)
    bounded = 0
    for f in dataclasses.fields(TrainConfig):
        step = 1 if int in (hints[f.name], *typing.get_args(hints[f.name])) else 1e-6
        for side, outward in (("low", -1), ("high", 1)):
            bound = f.metadata[side]
            if bound is None:
                continue
            bounded += 1
            inside, outside = (
                (bound - outward * step, bound) if f.metadata[f"open_{side}"] else (bound, bound + outward * step)
            )
            TrainConfig(data_dir="photos", **{f.name: inside}).check()
            expected = f"^--{f.name.replace('_', '-')} \\S+: must be (above|at least|below|at most) {bound} "
            with pytest.raises(UserError, match=expected):
                TrainConfig(data_dir="photos", **{f.name: outside}).check()
    assert bounded >= 15  # image size, batch size, both epoch counts, both rates, dropout, val split, ...


def test_cli_options_are_derived_from_the_declaration():
    names = {f.name for f, _ in cli_fields()}
    declared = {f.name for f in dataclasses.fields(TrainConfig)}
    assert names == declared - {"data_dir"}
    proc = run_cli("train", "--help")
    for name in names:
        assert "--" + name.replace("_", "-") in proc.stdout, name
    bench = run_cli("benchmark", "--help").stdout
    assert "--lr" in bench and "--accelerator" in bench and "--backbone " not in bench


def test_cli_gives_the_declarations_one_line_errors_before_touching_anything(tmp_path):
    proc = run_cli("train", tmp_path, "--lr", "-1")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --lr -1.0: must be above 0 (default 0.001)"
    proc = run_cli("benchmark", tmp_path, "--optimizer", "lbfgs", "--out", tmp_path / "b")
    assert proc.returncode == 2 and "use one of adam" in proc.stderr and not (tmp_path / "b").exists()


def test_benchmark_passes_only_changed_options_to_each_run():
    assert to_cli_args({"lr": 0.001, "epochs": 3, "pretrained": False, "weights": None, "train_bn": True}) == [
        "--epochs", "3", "--no-pretrained", "--train-bn",
    ]  # fmt: skip


def test_resume_reads_saved_resolved_values_back_into_the_declared_types():
    cfg = TrainConfig.from_dict({"data_dir": "d", "fine_tune_at": 6, "devices": 2, "classes": ["a"], "spec": {}})
    assert cfg.fine_tune_at == "6" and cfg.devices == "2"
    cfg.check()


def test_every_optimizer_choice_names_a_torch_optimizer():
    import torch

    for name, cls in OPTIMIZERS.items():
        optimizer = getattr(torch.optim, cls)
        assert issubclass(optimizer, torch.optim.Optimizer) and optimizer.__name__.lower() == name


def test_no_public_name_is_shadowed_by_a_module():
    for name in transferlab.__all__:
        assert importlib.util.find_spec(f"transferlab.{name}") is None, name
    from transferlab import TrainConfig as _  # noqa: F401 - the import that used to shadow `train`
    from transferlab import train

    assert callable(train) and callable(transferlab.train)
    for name in transferlab.__all__:
        assert getattr(transferlab, name) is not None
