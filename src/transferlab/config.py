"""Every option of a run, declared once: name, type, default, allowed values, help.

``TrainConfig`` is the Python API; the ``train`` and ``benchmark`` commands derive their
options from its fields (see ``cli.py``), so no default is typed twice and every value,
however it arrives, goes through the same one-line checks. Pure Python: the CLI imports
it at start-up.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from transferlab.errors import UserError

AUGMENTS = ("keras", "none", "strong")
RESIZES = ("crop", "squash")
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop"}  # name: torch.optim class
# Where fine-tuning unfreezes when --fine-tune-at is not given, as a fraction of the layer groups: the Keras
# tutorial unfreezes MobileNetV2 from layer 100 of 154; images upsampled 2x or more (CIFAR's 32 px) adapt more
# of the backbone (docs/benchmarks.md, the fine-tuning depths on cifar10_5k).
FINE_TUNE_AT, FINE_TUNE_AT_UPSAMPLED = 0.65, 0.45
FINE_TUNE_LR_DIVISOR = 10  # fine-tuning's rate: the head's divided by this, as in the Keras tutorial
# cached views per training image by default: this many views in all, within these bounds (benchmarks/defaults.py:
# two views left small sets of upsampled pictures 4-5 points behind the plain loop; eight caught it up)
VIEW_IMAGES, MIN_VIEWS, MAX_VIEWS = 8000, 2, 8
UPSIZE = 1.25  # default input size for photos that large: this times the native one (benchmarks/image_size.py)
PIXELS = ("backbone", "unit", "raw255")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "64-true")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def option(
    default: Any,
    help: str,  # noqa: A002 - the word every CLI library uses
    *,
    choices: tuple[str, ...] | None = None,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    cli: bool = True,
) -> Any:
    """A dataclass field carrying its help text and allowed range (``low``/``high``, inclusive unless open)."""
    meta = {
        "help": help, "choices": choices, "low": low, "high": high, "open_low": open_low, "open_high": open_high,
        "cli": cli,
    }  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run; saved resolved in config.yaml, enough to redo the run."""

    data_dir: str = option(
        "", "Folder of class sub-folders (or train/ + val/), or a CSV of image,label rows", cli=False
    )
    image_column: str | None = option(None, "CSV only: the column of image paths; default the first")
    label_column: str | None = option(None, "CSV only: the column of labels; default the second")
    multi_label: bool = option(
        False, "CSV only: several labels per image (or none), a sigmoid per class; best epoch by mean AP"
    )
    label_delim: str = option(" ", "CSV only, with --multi-label: what separates an image's labels in its cell")
    backbone: str = option("efficientnet_lite0", "Zoo name or any timm model")
    weights: str | None = option(None, "Backbone weights file (.pth/.safetensors); default: found offline first")
    pretrained: bool = option(True, "Pretrained backbone weights (--no-pretrained: random, for comparison)")
    image_size: int | None = option(
        None, f"Input size in pixels; default the backbone's native size, {UPSIZE:g}x it for photos that large", low=16
    )
    batch_size: int = option(32, "Images per training step (and per extraction batch)", low=1)
    epochs: int = option(10, "Feature-extraction epochs (frozen backbone); 0 trains from fine-tuning on", low=0)
    fine_tune_epochs: int = option(10, "Fine-tuning epochs; 0 skips fine-tuning", low=0)
    fine_tune_at: str | None = option(
        None,
        f"Unfreeze from this layer group: an index, or a fraction (default {FINE_TUNE_AT}; {FINE_TUNE_AT_UPSAMPLED} "
        "for images upsampled 2x or more)",
    )
    lr: float = option(1e-3, "Learning rate of feature extraction", low=0, open_low=True, high=10)
    fine_tune_lr: float | None = option(
        None, f"Learning rate of fine-tuning; default lr/{FINE_TUNE_LR_DIVISOR}", low=0, open_low=True, high=10
    )
    fine_tune_schedule: str = option(
        "cosine",
        "Fine-tuning's learning rate over its epochs: cosine (from --fine-tune-lr down a half cosine) or constant",
        choices=("cosine", "constant"),
    )
    optimizer: str = option("adam", "Optimizer", choices=tuple(OPTIMIZERS))
    dropout: float = option(0.2, "Dropout before the dense head", low=0, high=1, open_high=True)
    augment: str = option(
        "keras", "Training augmentation: keras (flip, rotation, zoom), none or strong", choices=AUGMENTS
    )
    accept: float = option(
        0.95,
        "Share of the validation images to accept; images less like the training images say 'none of these'",
        low=0,
        high=1,
        open_low=True,
    )
    label_smoothing: float = option(
        0.0,
        "Label smoothing of the training loss: this much of each target spread over the classes",
        low=0,
        high=1,
        open_high=True,
    )
    mixup: float = option(
        0.4,
        "Mixup while fine-tuning: each input blended with another by a Beta(a, a) weight, the loss likewise; 0: off",
        low=0,
    )
    balance: bool = option(True, "Weigh the training loss by 1/class size when class sizes differ")
    resize: str = option(
        "crop", "crop: keep the aspect ratio and centre-crop, as ImageNet evaluation; squash", choices=RESIZES
    )
    train_bn: bool = option(False, "Let BatchNorm statistics update while fine-tuning")
    val_split: float = option(
        0.2, "Validation fraction when the folder has no val/ split", low=0, high=1, open_low=True, open_high=True
    )
    seed: int = option(0, "Random seed (split, head, augmentation, order)", low=0)
    out: str | None = option(None, "Run directory; default runs/<data folder name>")
    time_budget: str | None = option(
        None, "Wall-clock budget of the whole run, e.g. 90s, 2m, 1h: views and epochs are planned to end within it"
    )
    head_init: str = option(
        "lbfgs",
        "Feature extraction starts from a head fitted by L-BFGS on the frozen features, kept as epoch 0 (lbfgs), or "
        "from random (random)",
        choices=("lbfgs", "random"),
    )
    patience: int | None = option(
        3,
        "Stop a phase after this many epochs without better val accuracy, and the run at its head when that gets "
        "every val image right; 0: run every epoch",
        low=0,
    )
    precision: str = option("32-true", "Lightning precision of training", choices=PRECISIONS)
    workers: int = option(min(4, os.cpu_count() or 1), "Image-decoding worker processes", low=0)
    cache: str = option("disk", "disk: compute the frozen backbone once; none: every epoch", choices=("disk", "none"))
    cache_views: int | None = option(
        None,
        f"Cached augmented views per training image; default by the set's size: {VIEW_IMAGES} training views in all, "
        f"{MIN_VIEWS} to {MAX_VIEWS} per image",
        low=1,
    )
    cache_dir: str | None = option(None, "Feature cache folder, shareable between runs; default <out>/cache")
    extract_precision: str = option(
        "auto",
        "Frozen pass that fills the cache: auto (bf16 where the device has it, if faster and agreeing with float32 on "
        "the first batch), 32 or bf16",
        choices=("auto", "32", "bf16"),
    )
    pixels: str = option("backbone", "Ablation only: backbone, unit or raw255 pixel scaling", choices=PIXELS)
    bn_mode: str = option(
        "frozen", "Ablation only: frozen, or train (BatchNorm always in training mode)", choices=("frozen", "train")
    )
    accelerator: str = option("auto", "Lightning accelerator", choices=ACCELERATORS)
    devices: str = option("1", "Lightning devices: a count, a list such as 0,1, or auto")
    num_nodes: int = option(1, "Machines taking part (Lightning num_nodes)", low=1)
    strategy: str = option("auto", "Lightning strategy: auto, ddp, ddp_spawn, ...")

    def train_views(self, images: int) -> int:
        """Augmented views cached per training image of a set of ``images``: one when nothing is augmented, the
        option's when given, else ``VIEW_IMAGES`` views in all (``MIN_VIEWS`` to ``MAX_VIEWS`` per image): a small
        set gets more of the fresh views the plain loop draws every epoch, at a cost it can afford."""
        if self.augment == "none":
            return 1
        if self.cache_views is not None:
            return self.cache_views
        return max(MIN_VIEWS, min(MAX_VIEWS, round(VIEW_IMAGES / max(1, images))))

    def check(self) -> None:
        """Every value against its declaration, then the rules that tie options together; one line each."""
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            _check_value(f, hints[f.name], getattr(self, f.name))
        if not self.data_dir:
            raise UserError("no data folder given: pass DATA_DIR, a folder with one sub-folder per class")
        if self.epochs + self.fine_tune_epochs == 0:
            raise UserError("--epochs 0 and --fine-tune-epochs 0: nothing to train; give one of them at least 1")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        if self.bn_mode == "train" and self.cache != "none":
            raise UserError("--bn-mode train makes frozen features depend on the batch: add --cache none")

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from saved values (config.yaml), ignoring the resolved extras saved beside them."""
        hints = typing.get_type_hints(cls)
        kept = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                value = values[f.name]
                # resolved values saved as numbers (fine_tune_at: 6) go back to the declared text type
                if str in typing.get_args(hints[f.name]) + (hints[f.name],) and isinstance(value, (int, float)):
                    value = str(value)
                kept[f.name] = value
        return cls(**kept)


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``2m``, ``1.5h`` or ``45``; one line for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--time-budget {text!r}: give a duration such as 90s, 2m or 1h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "": 1}[m.group(2)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_value(f: dataclasses.Field, hint: Any, value: Any) -> None:
    m, name = f.metadata, flag(f.name)
    allowed = tuple(t for t in typing.get_args(hint) if t is not type(None)) or (hint,)
    if value is None and type(None) in typing.get_args(hint):
        return
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        kind = " or ".join(t.__name__ for t in allowed)
        raise UserError(f"{name} {value!r}: expected {kind}")
    if m["choices"] and value not in m["choices"]:
        raise UserError(f"{name} {value!r}: use one of {', '.join(m['choices'])}")
    low, high = m["low"], m["high"]
    if low is not None and (value < low or (m["open_low"] and value == low)):
        raise UserError(
            f"{name} {value}: must be {'above' if m['open_low'] else 'at least'} {low} (default {f.default})"
        )
    if high is not None and (value > high or (m["open_high"] and value == high)):
        raise UserError(
            f"{name} {value}: must be {'below' if m['open_high'] else 'at most'} {high} (default {f.default})"
        )


def cli_fields(exclude: tuple[str, ...] = ()) -> list[tuple[dataclasses.Field, Any]]:
    """The options a command line offers, with their resolved type hints."""
    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig) if f.metadata["cli"] and f.name not in exclude]


def to_cli_args(values: dict) -> list[str]:
    """Command-line arguments that reproduce the options in ``values`` that differ from their defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    args: list[str] = []
    for name, value in values.items():
        if name not in defaults or value == defaults[name] or value is None:
            continue
        if isinstance(value, bool):
            args.append(flag(name) if value else "--no-" + flag(name)[2:])
        else:
            args += [flag(name), str(value)]
    return args
