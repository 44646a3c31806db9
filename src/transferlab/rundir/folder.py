"""The run directory: everything one training run produced, and loading it back safely.

``runs/<name>/`` holds config.yaml, checkpoints/{best,last}.ckpt, history.csv, metrics.json,
plots and report.md. Predict and evaluate need nothing else (the checkpoint carries the
backbone's fine-tuned weights, so no weights package or hub is needed to reload it).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from transferlab.errors import UserError
from transferlab.files import atomic_path, atomic_write, user_key
from transferlab.model.network import TransferNet
from transferlab.model.zoo import BackboneSpec

PLOTS = ("curves.png", "confusion_matrix.png", "augmentations.png", "evaluation.png", "review.png", "calibration.png")
RECORDS = (
    "config.yaml", "config.sig", "history.csv", "metrics.json", "evaluation.json", "report.md", "skipped_files.txt",
    "stopped.json",  # a run the web app cancelled or that crashed under it (serve/jobs.py)
)  # fmt: skip
EXPORTS = (".onnx", ".pt", ".data")  # what `export` writes (and ONNX's external data), each with FILE.json beside
HISTORY_COLUMNS = ["epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]
MULTI_LABEL_COLUMNS = ["val_map"]  # with several labels per image: the mean average precision, which picks the best


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    signature = property(lambda self: self.path / "config.sig")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best = property(lambda self: self.path / "checkpoints" / "best.ckpt")
    last = property(lambda self: self.path / "checkpoints" / "last.ckpt")
    history = property(lambda self: self.path / "history.csv")
    metrics = property(lambda self: self.path / "metrics.json")

    OUTPUTS = ("checkpoints", "lightning_logs", *RECORDS, *PLOTS)  # what `train` writes; exports come after

    def holds_run(self) -> bool:
        """Whether any output of a run is here (whole, unfinished or partial): what ``--overwrite`` replaces."""
        return any((self.path / name).exists() or (self.path / name).is_symlink() for name in self.OUTPUTS)

    def finished(self) -> bool:
        return self.metrics.is_file()

    def write_config(self, config: dict) -> None:
        text = yaml.safe_dump(config, sort_keys=False)
        atomic_write(self.config, text)
        key = user_key()
        if key is not None:
            atomic_write(self.signature, _sign(key, text.encode()) + "\n")

    def trusted_config(self) -> dict | None:
        """config.yaml as this user's transferlab wrote it (signed with the key only this user reads), else None.

        A run received from someone else, or one whose config was edited, is not trusted: what it names outside
        itself (its data folder) is not read without the user saying so. The bytes checked are the bytes parsed.
        """
        key = user_key(create=False)
        try:
            text, signature = self.config.read_bytes(), self.signature.read_text().strip()
        except OSError:
            return None
        if key is None or not hmac.compare_digest(_sign(key, text), signature):
            return None
        return self._parse_config(text.decode())

    def data_root(self, given: str | Path | None = None, purpose: str = "its validation images") -> Path:
        """The run's data folder: ``given`` when the user names one, else the one its config names if trusted."""
        if given is not None:
            root = Path(given)
        elif (config := self.trusted_config()) is not None:
            root = Path(config["data"]["root"])
        else:
            raise UserError(
                f"{self.path} was not trained by this user here (or its config.yaml was edited), so the data folder "
                f"it names is not read: give the data for {purpose} with --data DIR"
            )
        if not root.exists():
            raise UserError(f"the run's data folder {root} is not here and {purpose} need it: pass --data DIR")
        return root

    def read_config(self) -> dict:
        if not self.config.is_file():
            raise UserError(f"{self.path} is not a transferlab run (no config.yaml): pass a run directory from `train`")
        return self._parse_config(self._read(self.config))

    def _parse_config(self, text: str) -> dict:
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(
                f"cannot read {self.config} ({str(e).splitlines()[0]}): the run directory is damaged"
            ) from None
        if not isinstance(config, dict) or not isinstance(config.get("spec"), dict) or "classes" not in config:
            raise UserError(f"{self.config} is empty or not a run's config: the run directory is damaged")
        return config

    def read_history(self) -> list[dict]:
        if not self.history.is_file():
            return []
        rows = list(csv.DictReader(io.StringIO(self._read(self.history))))
        if any(None in row.values() or None in row or not row.get("epoch", "").isdigit() for row in rows):
            raise UserError(f"{self.history} is damaged (a row is cut short): resume or retrain the run")
        return [{k: _num(v) for k, v in row.items()} for row in rows]

    def write_history(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        columns = HISTORY_COLUMNS + (MULTI_LABEL_COLUMNS if any("val_map" in r for r in rows) else [])
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.history, buf.getvalue())

    def write_json(self, name: str, data: dict) -> None:
        atomic_write(self.path / name, json.dumps(data, indent=2) + "\n")

    def read_json(self, name: str) -> dict:
        path = self.path / name
        try:
            data = json.loads(self._read(path))
        except json.JSONDecodeError as e:
            raise UserError(f"cannot read {path} ({e.msg} at line {e.lineno}): the run directory is damaged") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} is not a JSON object: the run directory is damaged")
        return data

    def read_metrics(self) -> dict:
        return self.read_json("metrics.json")

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text()
        except UnicodeDecodeError:
            raise UserError(f"{path} is not text: the run directory is damaged") from None


def _sign(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


class Replacement:
    """``--overwrite`` as a swap: the new run is built beside the old one and takes its place at its first checkpoint.

    Until then the old run stays whole where it was; an interruption at any moment leaves one whole run
    (``recover`` puts back what a kill between the two renames of the swap left). The old run's feature
    cache and any files of the user's in the folder move into the new one; its outputs and exports go.
    """

    def __init__(self, rd: RunDir) -> None:
        self.rd, self.target = rd, rd.path
        self.staging = _sibling(self.target, f"new-{os.getpid()}")
        self.pending = False

    def begin(self) -> None:
        self.staging.mkdir(parents=True)
        self.rd.path, self.pending = self.staging, True

    def complete(self) -> None:
        """The swap: old run aside, new run in its place, the old run's cache and the user's files carried over."""
        old = _sibling(self.target, f"old-{os.getpid()}")
        os.replace(self.target, old)
        os.replace(self.staging, self.target)
        self.rd.path, self.pending = self.target, False
        for entry in old.iterdir():
            if entry.name not in RunDir.OUTPUTS and not _is_export(entry) and not (self.target / entry.name).exists():
                os.replace(entry, self.target / entry.name)
        shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        """The new run failed or was stopped before its first checkpoint: the old one stays, untouched."""
        if self.pending:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.rd.path, self.pending = self.target, False


def _sibling(target: Path, what: str) -> Path:
    return target.parent / f".{target.name}.{what}"


def _is_export(path: Path) -> bool:
    name = path.name.removesuffix(".json")
    return name.endswith(EXPORTS) or name.startswith(".export.")


def recover(target: Path) -> None:
    """Tidy what a killed ``Replacement`` left beside ``target`` (called with its lock held, so nothing is live)."""
    for leftover in sorted(target.parent.glob(f".{target.name}.old-*")):
        if target.exists():
            shutil.rmtree(leftover, ignore_errors=True)  # killed after the swap, while deleting the old run
        else:
            os.replace(leftover, target)  # killed between the two renames: the old run goes back
    for leftover in target.parent.glob(f".{target.name}.new-*"):
        shutil.rmtree(leftover, ignore_errors=True)  # a new run killed before its first checkpoint


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


def write_best(rd: RunDir, net: TransferNet) -> None:
    """best.ckpt with its network replaced by ``net`` (the same weights with the temperature folded in, and the
    training images' features its "none of these" score compares with)."""
    ckpt = read_checkpoint(rd.best)
    ckpt["state_dict"].update({f"net.{k}": v for k, v in net.state_dict().items()})
    with atomic_path(rd.best) as tmp:
        torch.save(ckpt, tmp)


def net_state(ckpt: dict) -> dict:
    """The network's weights in a checkpoint of the LightningModule (whose ``net`` it is)."""
    return {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}


def load_net(run: str | Path, which: str = "best") -> tuple[TransferNet, dict]:
    """Rebuild a trained run's network from its config and checkpoint alone (eval mode)."""
    from transferlab.model.weights import create_backbone

    rd = RunDir(run)
    config = rd.read_config()
    config.setdefault("resize", "squash")  # runs made before --resize existed squashed every image
    spec = BackboneSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["spec"].items()})
    ckpt = read_checkpoint(rd.best if which == "best" else rd.last)
    backbone, _ = create_backbone(spec, pretrained=False, num_classes=0)
    net = TransferNet(spec, backbone, len(config["classes"]), config["dropout"], bool(config.get("multi_label")))
    state = net_state(ckpt)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {rd.best} does not match {rd.config} ({str(e).splitlines()[0][:120]}): "
            "the run directory mixes files of different runs"
        ) from None
    return net.eval(), config
