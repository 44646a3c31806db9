"""Everything a run needs, checked and built before anything is written: options, data, backbone, weights.

``prepare`` raises one UserError line for any problem it finds, so a failing start never touches
an existing run directory (``--overwrite`` included).
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only

from transferlab.config import FINE_TUNE_LR_DIVISOR, TrainConfig, parse_duration
from transferlab.data.index import DataIndex, median_side
from transferlab.data.labels import index_data, source_name
from transferlab.errors import UserError
from transferlab.inference.unknown import score_name
from transferlab.model.network import TransferNet, default_fine_tune_at, resolve_fine_tune_at
from transferlab.model.tflite import spec_for
from transferlab.model.weights import WeightsFile, create_backbone
from transferlab.model.zoo import BackboneSpec, default_size, get_spec
from transferlab.recipe.module import TransferModule
from transferlab.rundir.folder import RunDir

# Deliberately wrong pixel scalings, for the preprocessing ablation only.
PIXEL_SCALES = {
    "backbone": {},
    "unit": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
    "raw255": {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)},
}


def is_rank_zero() -> bool:
    """Global rank 0, known from the environment before any process group exists (Lightning, torchrun, SLURM)."""
    return rank_zero_only.rank == 0


@dataclass
class Setup:
    """Everything one run needs, checked before the run directory is touched."""

    cfg: TrainConfig
    rd: RunDir
    data: DataIndex
    spec: BackboneSpec
    size: int
    net: TransferNet
    weights: WeightsFile | None
    fine_tune_at: int
    resuming: bool = False
    views: int = 1  # augmented views cached per training image: the option's, or fewer where the budget says
    budget_seconds: float | None = None  # --time-budget, parsed once
    unknown_threshold: float | None = None  # the score under which a prediction is "none of these" (the finish's)
    label_thresholds: list[float] | None = None  # several labels per image: each class's (the finish's)
    history: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, dict] = field(default_factory=dict)  # what the recipe decided on the way (metrics.json)

    @property
    def class_weights(self) -> list[float] | None:
        return TransferModule.balance_weights(self.data, self.cfg.balance)

    @property
    def fine_tune_lr(self) -> float:
        return self.cfg.fine_tune_lr if self.cfg.fine_tune_lr is not None else self.cfg.lr / FINE_TUNE_LR_DIVISOR

    def config_dict(self) -> dict:
        """config.yaml: every option resolved, and the facts prediction and the report need."""
        return {
            **dataclasses.asdict(self.cfg),
            "data_dir": str(Path(self.cfg.data_dir).resolve()),  # absolute: a resume or review from anywhere
            # the views the cache holds (a resumed run keeps them)
            "cache_views": self.views if self.cfg.augment != "none" else self.cfg.cache_views,
            "image_size": self.size,
            "fine_tune_at": self.fine_tune_at,
            "fine_tune_lr": self.fine_tune_lr,
            "classes": self.data.classes,
            "num_layer_groups": len(self.net.groups),
            "data": self.data.summary(),
            "weights_source": str(self.weights.path) if self.weights else "random",
            "weights_origin": self.weights.origin if self.weights else "none",
            "class_weights": self.class_weights,
            "spec": self.spec.to_dict(),
            "unknown_threshold": self.unknown_threshold,
            "unknown_score": score_name(self.net),
            "label_thresholds": self.label_thresholds,
        }


def prepare(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> Setup:
    """Check options, data, backbone and weights, and build the network; writes nothing."""
    cfg.check()
    rd = RunDir(run_path(cfg))
    if not resume and is_rank_zero():
        _check_existing(rd, overwrite)
    lightning_trainer(cfg, 1, [])  # accelerator, devices, strategy: Lightning's own checks, as one line
    data = index_data(
        cfg.data_dir, cfg.val_split, cfg.seed, cfg.image_column, cfg.label_column, cfg.multi_label, cfg.label_delim
    )
    spec = dataclasses.replace(spec_for(get_spec(cfg.backbone), cfg.weights), **PIXEL_SCALES[cfg.pixels])
    side = median_side(data.train)
    size = cfg.image_size or default_size(spec, side)
    _check_size(spec, size, side)
    pl.seed_everything(cfg.seed, verbose=False)  # before building: --no-pretrained weights follow the seed
    backbone, weights = create_backbone(spec, cfg.weights, cfg.pretrained, num_classes=0)
    net = TransferNet(spec, backbone, len(data.classes), cfg.dropout, cfg.multi_label)
    net.bn_always_train = cfg.bn_mode == "train"
    fine_tune_at = resolve_fine_tune_at(cfg.fine_tune_at, len(net.groups), default_fine_tune_at(size, side))
    budget = parse_duration(cfg.time_budget) if cfg.time_budget else None
    return Setup(
        cfg, rd, data, spec, size, net, weights, fine_tune_at, resuming=resume, views=cfg.train_views(len(data.train)),
        budget_seconds=budget,
    )  # fmt: skip


def run_path(cfg: TrainConfig) -> Path:
    """The run directory a config trains into: ``out``, else runs/<data folder name>."""
    return Path(cfg.out) if cfg.out else Path("runs") / source_name(cfg.data_dir)


def _check_existing(rd: RunDir, overwrite: bool) -> None:
    if rd.finished() and not overwrite:
        raise UserError(
            f"{rd.path} already holds a finished run: pass --overwrite to replace it, or choose another --out"
        )
    if rd.last.exists() and not overwrite:
        raise UserError(
            f"{rd.path} holds an unfinished run: continue it with `transferlab train --resume {rd.path}`, "
            "or pass --overwrite to start again"
        )


def _check_size(spec: BackboneSpec, size: int, side: int) -> None:
    if size < spec.min_size:
        raise UserError(
            f"--image-size {size} is below {spec.name}'s minimum input of {spec.min_size} px: "
            f"use at least {spec.min_size} (its native size is {spec.input_size})"
        )
    if side < spec.input_size / 2 and is_rank_zero():
        warnings.warn(
            f"images are small (median side {side} px) for {spec.name}, which was trained at {spec.input_size} px: "
            f"they are upsampled to {size} px, because a backbone fed inputs far below its native size loses most of "
            "its accuracy (the classic MobileNetV2/InceptionV3 collapse)",
            stacklevel=3,
        )
    if size < spec.input_size / 2 and is_rank_zero():
        warnings.warn(
            f"--image-size {size} is far below {spec.name}'s native {spec.input_size} px: expect lower accuracy",
            stacklevel=3,
        )


def lightning_trainer(cfg: TrainConfig, epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    devices = int(cfg.devices) if cfg.devices.lstrip("-").isdigit() else cfg.devices
    try:
        return pl.Trainer(
            max_epochs=epochs, accelerator=cfg.accelerator, devices=devices, num_nodes=cfg.num_nodes,
            strategy=cfg.strategy, precision=cfg.precision, callbacks=callbacks, logger=False,
            enable_checkpointing=False, enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False,
            num_sanity_val_steps=0, use_distributed_sampler=False,
            # the validation before the first epoch (the closed-form head's) under no_grad, as fit validates: metric
            # states made in inference mode could not be updated by fit's validations after it
            inference_mode=False,
        )  # fmt: skip
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as e:
        raise UserError(
            f"--accelerator {cfg.accelerator} --devices {cfg.devices} --strategy {cfg.strategy}: "
            f"{str(e).splitlines()[0]}"
        ) from None
