"""The transfer recipe on the Lightning Trainer: phase 1 (frozen backbone), then phase 2 (fine-tuning).

Both phases train ``net.top(x, start)``: the network from layer group ``start`` on. On the
plain path ``x`` is an image batch and ``start`` is 0; on the cached path ``x`` is what the
frozen groups below ``start`` output, read from the feature cache (see cache.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from transferlab.cache import CachedDataset, CacheKey, Store, extract
from transferlab.data import DataIndex, ImageDataset, index_folder, median_side
from transferlab.errors import UserError
from transferlab.files import atomic_write
from transferlab.images import RESIZES
from transferlab.model import TransferNet, probabilities, resolve_fine_tune_at
from transferlab.run import RunDir, read_checkpoint
from transferlab.transforms import AUGMENTS, eval_transform, train_transform
from transferlab.weights import create_backbone
from transferlab.zoo import get_spec

log = logging.getLogger("transferlab")
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no GPU/TPU banners or tips
for _pattern in (".*module\\(s\\) in eval mode.*", ".*LeafSpec.*", ".*smaller than the logging interval.*"):
    warnings.filterwarnings("ignore", _pattern)  # frozen groups are in eval mode on purpose
# Deliberately wrong pixel scalings, for the preprocessing ablation only.
PIXELS = {
    "backbone": {},
    "unit": {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)},
    "raw255": {"mean": (0.0, 0.0, 0.0), "std": (1 / 255, 1 / 255, 1 / 255)},
}
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
}


@dataclass
class TrainConfig:
    """Every option of a run; saved resolved in config.yaml, enough to redo the run."""

    data_dir: str
    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    pretrained: bool = True
    image_size: int | None = None  # default: the backbone's native size
    batch_size: int = 32
    epochs: int = 10
    fine_tune_epochs: int = 10
    fine_tune_at: str | None = None  # layer-group index or fraction; default 0.65
    lr: float = 1e-3
    fine_tune_lr: float | None = None  # default lr / 10
    optimizer: str = "adam"
    dropout: float = 0.2
    augment: str = "keras"
    resize: str = "crop"  # images.fit: "crop" (aspect kept, centre crop, as ImageNet eval) or "squash"
    train_bn: bool = False
    val_split: float = 0.2
    seed: int = 0
    out: str | None = None
    patience: int | None = None
    precision: str = "32-true"
    workers: int = min(4, os.cpu_count() or 1)
    cache: str = "disk"  # "disk" (compute the frozen part once) or "none" (recompute every epoch)
    cache_views: int = 2
    cache_dir: str | None = None  # default: <out>/cache
    pixels: str = "backbone"  # ablation only: "raw255" feeds 0-255 pixels, "unit" [0, 1] pixels
    bn_mode: str = "frozen"  # ablation only: "train" leaves every BatchNorm in training mode (Keras' classic bug)

    def check(self) -> None:
        if self.augment not in AUGMENTS:
            raise UserError(f"--augment {self.augment!r}: use one of {', '.join(AUGMENTS)}")
        if self.resize not in RESIZES:
            raise UserError(f"--resize {self.resize!r}: use one of {', '.join(RESIZES)}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.cache not in ("disk", "none"):
            raise UserError(f"--cache {self.cache!r}: use disk or none")
        if self.pixels not in PIXELS:
            raise UserError(f"--pixels {self.pixels!r}: use one of {', '.join(PIXELS)}")
        if self.bn_mode not in ("frozen", "train"):
            raise UserError(f"--bn-mode {self.bn_mode!r}: use frozen or train")
        if self.bn_mode == "train" and self.cache != "none":
            raise UserError("--bn-mode train makes frozen features depend on the batch: add --cache none")
        if self.epochs < 1 or self.fine_tune_epochs < 0 or self.batch_size < 1 or self.cache_views < 1:
            raise UserError("--epochs and --batch-size must be at least 1, --fine-tune-epochs at least 0")


class TransferModule(pl.LightningModule):
    """One phase of training: loss, accuracy and optimizer over the trainable part of ``net``."""

    def __init__(self, net: TransferNet, start: int, lr: float, optimizer: str, num_classes: int) -> None:
        super().__init__()
        self.net, self.start, self.lr, self.optimizer_name = net, start, lr, optimizer
        self.binary = num_classes == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.top(x, self.start)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.binary:
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.float())
        else:
            loss = F.cross_entropy(logits, y)
        acc = (probabilities(logits.detach()).argmax(-1) == y).float().mean()
        n = len(y)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log(f"{stage}_accuracy", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def training_step(self, batch, _):
        return self._step(batch, "train")

    def validation_step(self, batch, _):
        self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.net.parameters() if p.requires_grad]
        return OPTIMIZERS[self.optimizer_name](params, lr=self.lr)


class RunRecorder(pl.Callback):
    """After each epoch: one history row, then last.ckpt, and best.ckpt when val accuracy improved.

    Written by hand rather than with ModelCheckpoint because the best model spans both phases
    (two Trainers) and every file must be replaced atomically.
    """

    def __init__(self, rd: RunDir, phase: str, offset: int, history: list[dict]) -> None:
        self.rd, self.phase, self.offset, self.history = rd, phase, offset, history
        self.started = 0.0

    def on_train_epoch_start(self, trainer, module) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {
            "epoch": self.offset + trainer.current_epoch + 1,
            "phase": self.phase,
            "train_loss": round(m["train_loss"], 6),
            "train_accuracy": round(m["train_accuracy"], 6),
            "val_loss": round(m["val_loss"], 6),
            "val_accuracy": round(m["val_accuracy"], 6),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - self.started, 3),
        }
        improved = not self.history or (row["val_accuracy"], -row["val_loss"]) > max(
            (r["val_accuracy"], -r["val_loss"]) for r in self.history
        )
        self.history.append(row)
        self.rd.write_history(self.history)
        tmp = self.rd.checkpoints / ".last.ckpt.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)  # with optimizer state, for --resume
        if improved:
            shutil.copyfile(tmp, self.rd.checkpoints / ".best.ckpt.tmp")
            os.replace(self.rd.checkpoints / ".best.ckpt.tmp", self.rd.best)
        os.replace(tmp, self.rd.last)

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        checkpoint["transferlab"] = {"phase": self.phase, "offset": self.offset}


def _out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    text = str(e).lower()
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or "can't allocate" in text


def _loader(dataset, batch_size: int, shuffle: bool, workers: int, seed: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


class Trainer:
    """Runs the two-phase recipe for one TrainConfig into one run directory."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> None:
        cfg.check()
        self.cfg = cfg
        self.rd = RunDir(cfg.out or Path("runs") / Path(cfg.data_dir).resolve().name)
        self._prepare_dir(resume, overwrite)
        self.data: DataIndex = index_folder(cfg.data_dir, cfg.val_split, cfg.seed)
        self._report_skipped()
        self.spec = get_spec(cfg.backbone)
        if cfg.pixels != "backbone":
            self.spec = dataclasses.replace(self.spec, **PIXELS[cfg.pixels])
        self.size = cfg.image_size or self.spec.input_size
        self._check_size()
        pl.seed_everything(cfg.seed, verbose=False)  # before building: --no-pretrained weights follow the seed
        backbone, self.weights = create_backbone(self.spec, cfg.weights, cfg.pretrained, num_classes=0)
        self.weights_digest = self.weights.digest() if self.weights else f"random:{cfg.seed}"
        self.net = TransferNet(self.spec, backbone, len(self.data.classes), cfg.dropout)
        self.net.bn_always_train = cfg.bn_mode == "train"
        self.n_groups = len(self.net.groups)
        self.fine_tune_at = resolve_fine_tune_at(cfg.fine_tune_at, self.n_groups)
        self.history: list[dict] = []
        self.timings: dict[str, float] = {}
        self._previous_seconds = 0.0  # epochs timed before a resume

    def _prepare_dir(self, resume: bool, overwrite: bool) -> None:
        if resume:
            return
        if self.rd.finished() and not overwrite:
            raise UserError(
                f"{self.rd.path} already holds a finished run: pass --overwrite to replace it, or choose another --out"
            )
        if self.rd.last.exists() and not overwrite:
            raise UserError(
                f"{self.rd.path} holds an unfinished run: continue it with "
                f"`transferlab train --resume {self.rd.path}`, or pass --overwrite to start again"
            )
        self.rd.clear()  # the feature cache under it stays: it is keyed by content and still valid
        self.rd.checkpoints.mkdir(parents=True, exist_ok=True)

    def _report_skipped(self) -> None:
        skipped = self.data.skipped
        if not skipped:
            return
        listing = self.rd.path / "skipped_files.txt"
        atomic_write(listing, "".join(f"{path}\t{why}\n" for path, why in skipped))
        first = "; ".join(f"{path} ({why})" for path, why in skipped[:3])
        warnings.warn(
            f"{len(skipped)} file(s) are not readable images and were skipped: {first}"
            f"{' ...' if len(skipped) > 3 else ''}; full list in {listing}",
            stacklevel=2,
        )

    def _check_size(self) -> None:
        if self.size < self.spec.min_size:
            raise UserError(
                f"--image-size {self.size} is below {self.spec.name}'s minimum input of {self.spec.min_size} px: "
                f"use at least {self.spec.min_size} (its native size is {self.spec.input_size})"
            )
        side = median_side(self.data.train)
        if side < self.spec.input_size / 2:
            warnings.warn(
                f"images are small (median side {side} px) for {self.spec.name}, which was trained at "
                f"{self.spec.input_size} px: they are upsampled to {self.size} px, because a backbone fed inputs far "
                "below its native size loses most of its accuracy (the classic MobileNetV2/InceptionV3 collapse)",
                stacklevel=2,
            )
        if self.size < self.spec.input_size / 2:
            warnings.warn(
                f"--image-size {self.size} is far below {self.spec.name}'s native {self.spec.input_size} px: "
                "expect lower accuracy",
                stacklevel=2,
            )

    # ----- configuration recorded in the run directory

    def config_dict(self) -> dict:
        return {
            **dataclasses.asdict(self.cfg),
            "image_size": self.size,
            "fine_tune_at": self.fine_tune_at,
            "fine_tune_lr": self.ft_lr,
            "classes": self.data.classes,
            "num_layer_groups": self.n_groups,
            "data": self.data.summary(),
            "weights_source": str(self.weights.path) if self.weights else "random",
            "weights_origin": self.weights.origin if self.weights else "none",
            "spec": self.spec.to_dict(),
        }

    @property
    def ft_lr(self) -> float:
        return self.cfg.fine_tune_lr if self.cfg.fine_tune_lr is not None else self.cfg.lr / 10

    # ----- data for each phase

    def _stores(self, augment: str, views: int, outputs: list[str]) -> dict[str, Store]:
        root = Path(self.cfg.cache_dir) if self.cfg.cache_dir else self.rd.path / "cache"
        s = self.spec
        resize = f"crop{s.crop_pct}" if self.cfg.resize == "crop" else self.cfg.resize
        key = CacheKey(
            s.name, self.weights_digest, self.size, s.interpolation, resize, s.mean, s.std, augment, views, ""
        )
        return {o: Store(root, dataclasses.replace(key, output=o)) for o in outputs}

    def _cached_sets(self, output: str) -> tuple[CachedDataset, CachedDataset]:
        """Train (random view per visit) and val datasets of cached ``output`` tensors, computed if missing."""
        outputs = ["pooled"] + ([f"prefix{self.fine_tune_at}"] if self.cfg.fine_tune_epochs > 0 else [])
        views = self.cfg.cache_views if self.cfg.augment != "none" else 1
        sets = []
        cfg = self.cfg
        for samples, augment, n_views, tf in (
            (self.data.train, cfg.augment, views, train_transform(self.spec, self.size, cfg.augment, cfg.resize)),
            (self.data.val, "none", 1, eval_transform(self.spec, self.size, cfg.resize)),
        ):
            stores = self._stores(augment, n_views, outputs)
            start = time.perf_counter()
            digests, computed = extract(self.net, samples, tf, stores, workers=self.cfg.workers)
            self.timings["extract_seconds"] = self.timings.get("extract_seconds", 0.0) + time.perf_counter() - start
            self.timings["extracted_images"] = self.timings.get("extracted_images", 0) + computed
            sets.append(
                CachedDataset(stores[output], digests, [s.label for s in samples], random_view=augment != "none")
            )
        return sets[0], sets[1]

    def _phase_data(self, phase: str) -> tuple[DataLoader, DataLoader, int]:
        """Loaders and the group index their tensors enter the network at."""
        cfg = self.cfg
        if cfg.cache == "disk":
            start = self.n_groups if phase == "feature_extraction" else self.fine_tune_at
            output = "pooled" if phase == "feature_extraction" else f"prefix{self.fine_tune_at}"
            train_set, val_set = self._cached_sets(output)
            workers = 0  # reading a memory-mapped row is cheaper than a worker round trip
        else:
            start = 0
            train_set = ImageDataset(self.data.train, train_transform(self.spec, self.size, cfg.augment, cfg.resize))
            val_set = ImageDataset(self.data.val, eval_transform(self.spec, self.size, cfg.resize))
            workers = cfg.workers
        return (
            _loader(train_set, cfg.batch_size, True, workers, cfg.seed),
            _loader(val_set, max(cfg.batch_size, 64), False, workers, cfg.seed),
            start,
        )

    # ----- the two phases

    def _fit(self, phase: str, epochs: int, offset: int, lr: float, ckpt: Path | None) -> int:
        """Train one phase; returns the number of epochs it ran (early stopping may cut it)."""
        train_loader, val_loader, start = self._phase_data(phase)
        # dropout and view draws start from the seed, whether the cache was just filled or hit
        pl.seed_everything(self.cfg.seed + (phase == "fine_tune"), verbose=False)
        module = TransferModule(self.net, start, lr, self.cfg.optimizer, len(self.data.classes))
        callbacks: list[pl.Callback] = [RunRecorder(self.rd, phase, offset, self.history)]
        if self.cfg.patience:
            callbacks.append(pl.callbacks.EarlyStopping("val_loss", patience=self.cfg.patience))
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="auto",
            devices=1,
            precision=self.cfg.precision,
            callbacks=callbacks,
            logger=pl.loggers.CSVLogger(self.rd.path, name="lightning_logs", version=phase),
            enable_checkpointing=False,
            enable_progress_bar=sys.stderr.isatty(),
            enable_model_summary=False,
            num_sanity_val_steps=0,
            deterministic=False,
        )
        began = time.perf_counter()
        try:
            trainer.fit(module, train_loader, val_loader, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            raise UserError(
                f"out of memory with --batch-size {self.cfg.batch_size} ({phase}): retry with a smaller --batch-size "
                f"(e.g. {max(1, self.cfg.batch_size // 2)}) or a smaller --image-size"
            ) from None
        self.timings[f"{phase}_seconds"] = time.perf_counter() - began
        return trainer.current_epoch

    def _load_best(self) -> None:
        state = read_checkpoint(self.rd.best)["state_dict"]
        self.net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})

    def run(self) -> dict:
        """Phase 1 then phase 2, resuming from last.ckpt when there is one; returns metrics.json."""
        from transferlab.report import finish_run

        cfg = self.cfg
        began = time.perf_counter()
        self.rd.write_config(self.config_dict())
        resume = self._resume_point()
        if not resume:
            from transferlab.plots import plot_augmentations

            path = self.rd.path / "augmentations.png"
            plot_augmentations(self.data, self.spec, self.size, cfg.augment, cfg.resize, path)
        phase, ckpt = resume or ("feature_extraction", None)
        if phase == "feature_extraction":
            self.net.freeze(self.n_groups)
            self._fit("feature_extraction", cfg.epochs, 0, cfg.lr, ckpt)
            ckpt = None
        p1_epochs = sum(r["phase"] == "feature_extraction" for r in self.history)
        if cfg.fine_tune_epochs > 0:
            if ckpt is None:
                self._load_best()  # fine-tuning starts from the best head
            self.net.freeze(self.fine_tune_at, cfg.train_bn)
            self._fit("fine_tune", cfg.fine_tune_epochs, p1_epochs, self.ft_lr, ckpt)
        self._load_best()
        self.timings["train_seconds"] = time.perf_counter() - began + self._previous_seconds
        return finish_run(self)

    def _resume_point(self) -> tuple[str, Path] | None:
        """Phase and checkpoint to continue from; trims history rows past the checkpoint."""
        if not self.rd.last.is_file():
            return None
        ckpt = read_checkpoint(self.rd.last)
        info = ckpt.get("transferlab", {})
        done = info.get("offset", 0) + int(ckpt.get("epoch", 0)) + 1
        self.history[:] = [r for r in self.rd.read_history() if r["epoch"] <= done]
        self._previous_seconds = sum(r["seconds"] for r in self.history)
        log.info("resuming %s from epoch %d", self.rd.path, done)
        return info.get("phase", "feature_extraction"), self.rd.last


def train(cfg: TrainConfig | None = None, *, resume: str | Path | None = None, overwrite: bool = False, **kw) -> dict:
    """Train on a folder (``train(TrainConfig(data_dir=...))`` or ``train(data_dir=...)``), or resume a run."""
    if resume is not None:
        rd = RunDir(resume)
        if rd.finished():
            raise UserError(f"{rd.path} is already finished: nothing to resume (see {rd.metrics})")
        saved = rd.read_config()
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
        cfg.fine_tune_at = str(saved["fine_tune_at"])
        cfg.out = str(rd.path)
        return Trainer(cfg, resume=True).run()
    cfg = cfg or TrainConfig(**kw)
    return Trainer(cfg, overwrite=overwrite).run()
