"""The run directory: everything one training run produced, and loading it back safely.

``runs/<name>/`` holds config.yaml, checkpoints/{best,last}.ckpt, history.csv, metrics.json,
plots and report.md. Predict and evaluate need nothing else (the checkpoint carries the
backbone's fine-tuned weights, so no weights package or hub is needed to reload it).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import torch
import yaml

from transferlab.errors import UserError
from transferlab.files import atomic_write
from transferlab.model import TransferNet
from transferlab.zoo import BackboneSpec

HISTORY_COLUMNS = ["epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best = property(lambda self: self.path / "checkpoints" / "best.ckpt")
    last = property(lambda self: self.path / "checkpoints" / "last.ckpt")
    history = property(lambda self: self.path / "history.csv")
    metrics = property(lambda self: self.path / "metrics.json")

    OUTPUTS = (
        "checkpoints", "lightning_logs", "config.yaml", "history.csv", "metrics.json", "evaluation.json", "report.md",
        "curves.png", "confusion_matrix.png", "augmentations.png", "evaluation.png", "skipped_files.txt",
    )  # fmt: skip

    def clear(self) -> None:
        """Remove a previous run's outputs (never anything else that may sit in the folder)."""
        for name in self.OUTPUTS:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    def finished(self) -> bool:
        return self.metrics.is_file()

    def write_config(self, config: dict) -> None:
        atomic_write(self.config, yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        if not self.config.is_file():
            raise UserError(f"{self.path} is not a transferlab run (no config.yaml): pass a run directory from `train`")
        try:
            return yaml.safe_load(self.config.read_text())
        except yaml.YAMLError as e:
            raise UserError(
                f"cannot read {self.config} ({str(e).splitlines()[0]}): the run directory is damaged"
            ) from None

    def read_history(self) -> list[dict]:
        if not self.history.is_file():
            return []
        with open(self.history, newline="") as f:
            return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(f)]

    def write_history(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.history, buf.getvalue())

    def write_json(self, name: str, data: dict) -> None:
        atomic_write(self.path / name, json.dumps(data, indent=2) + "\n")

    def read_json(self, name: str) -> dict:
        return json.loads((self.path / name).read_text())

    def read_metrics(self) -> dict:
        return self.read_json("metrics.json")


def _num(value: str):
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True``: no code from a pickle ever runs."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}: train the run first, or pass another run directory")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or foreign files all end here
        raise UserError(
            f"cannot load checkpoint {path} ({type(e).__name__}): it is damaged or not a transferlab checkpoint; "
            "retrain or resume the run"
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path} is not a transferlab checkpoint (no state_dict): pass a run directory from `train`")
    return ckpt


def load_net(run: str | Path, which: str = "best") -> tuple[TransferNet, dict]:
    """Rebuild a trained run's network from its config and checkpoint alone (eval mode)."""
    from transferlab.weights import create_backbone

    rd = RunDir(run)
    config = rd.read_config()
    config.setdefault("resize", "squash")  # runs made before --resize existed squashed every image
    spec = BackboneSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["spec"].items()})
    ckpt = read_checkpoint(rd.best if which == "best" else rd.last)
    backbone, _ = create_backbone(spec, pretrained=False, num_classes=0)
    net = TransferNet(spec, backbone, len(config["classes"]), config["dropout"])
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {rd.best} does not match {rd.config} ({str(e).splitlines()[0][:120]}): "
            "the run directory mixes files of different runs"
        ) from None
    return net.eval(), config
