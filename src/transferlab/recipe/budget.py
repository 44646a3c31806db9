"""``--time-budget``: plan a run to end within a wall-clock budget, from throughput measured on this machine.

The budget counts from the start of the process (imports included: what a user's stopwatch sees).
The plan: for images upsampled twice or more, the input size (the native one, or smaller while one view's
extraction and ``FINE_TUNE_WANTED`` fine-tuning epochs would not fit: at scale, epochs of fine-tuning are worth
more than pixels that upsampling made up); how many augmented views to cache (the default's number, fewer while
extraction would take more than a third of the budget, down to one); head epochs while the next one still fits
beside the fine-tuning epochs kept for; then as many fine-tuning epochs as fit (the cosine rate planned over
them, so that its fall spans them), each phase keeping its best model, aiming to end a little (``MARGIN``)
before the deadline. What was planned and done goes into report.md.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl

from transferlab.data.index import median_side
from transferlab.inference.unknown import BANK_IMAGES
from transferlab.rundir.folder import read_checkpoint

if TYPE_CHECKING:
    from transferlab.recipe.plan import Setup

FINISH_SECONDS = 3.0  # the finish beyond its passes over images (the training images it keeps, the validation
# images it evaluates): loading, plots, report
# Whole passes run slower than their parts timed alone on a few images (loader workers and the network share the
# cores; batches are larger; entries are saved): the shares of the parts' speed that whole extraction and the
# finish's float32 evaluation reach, read off budgeted runs (docs/benchmarks.md, the time budget).
EXTRACTION_SHARE, EVALUATION_SHARE = 0.6, 0.5
# The plan aims this share of the budget early: the last epoch and the finish vary by a few percent between runs,
# and a budget is a deadline
MARGIN = 0.05
# Fine-tuning epochs a budget keeps room for (by a smaller input size, for upsampled images, and by ending the
# head's epochs early): in an hour on all of CIFAR-10, Lite0 at 224 px had room for one, 0.859; at the 192 px
# this chose, three, 0.913 (docs/benchmarks.md, the whole of CIFAR-10)
FINE_TUNE_WANTED = 3
SIZE_STEP = 32  # the input sizes a budget tries, down from the native one


def process_seconds() -> float:
    """Seconds since this process started (Linux's /proc), or 0 where that is not known."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


class Budget:
    """A deadline, and the decisions taken against it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.perf_counter() - process_seconds() + seconds
        self.plan: dict = {"budget_seconds": seconds}
        self.finish_seconds = FINISH_SECONDS  # plus the evaluation's share, once the speed is known

    def left(self) -> float:
        """Seconds left for training, keeping back what the finish needs and the margin."""
        return self.deadline - MARGIN * self.seconds - self.finish_seconds - time.perf_counter()

    def views(
        self, train_images: int, val_images: int, images_per_second: float, wanted: int, keep: float = 0.0
    ) -> int:  # fmt: skip
        """Augmented views to cache: as many as wanted while extraction stays within a third of what is left, and
        leaves ``keep`` seconds (the fine-tuning epochs kept for)."""
        views = wanted

        def extraction(n: int) -> float:
            return (n * train_images + val_images) / images_per_second

        while views > 1 and (extraction(views) > self.left() / 3 or extraction(views) + keep > self.left()):
            views -= 1
        self.plan.update(images_per_second=round(images_per_second, 1), views=views)
        once = (train_images + val_images) / images_per_second
        if once > self.left():
            self.plan["too_short"] = True
            warnings.warn(
                f"--time-budget {self.seconds:g}s is too short for these images on this machine: computing their "
                f"features once takes about {once:.0f} s, and {max(0.0, self.left()):.0f} s are left after start-up "
                f"and the {self.finish_seconds:.0f} s the finish needs; the run does the least it can (one view, one "
                "epoch, no fine-tuning) and will overrun: give a longer budget or a smaller --image-size",
                stacklevel=2,
            )
        return views

    def plan_from(self, s: Setup, speed: dict[str, float], views: bool = True) -> int:
        """The finish's share, and the cached views for this run's images (``views``; else those it has), from
        measured ``speed`` (images per second decoded and augmented, "prepare", and through the frozen backbone as
        extraction computes, "chosen", and in float32, "32": ``TransferData.frozen_speed``). Returns the views.
        """
        self.finish_from(s, speed)
        if not views:
            return s.views
        keep = self.kept(s, speed)
        return self.views(len(s.data.train), len(s.data.val), _extraction_speed(speed), s.views, keep)

    def finish_from(self, s: Setup, speed: dict[str, float]) -> None:
        """What the finish needs: it evaluates in float32, as predict does, after the features of the training
        images it keeps."""
        finish_images = len(s.data.val) + min(len(s.data.train), BANK_IMAGES)
        self.finish_seconds = FINISH_SECONDS + finish_images / (EVALUATION_SHARE * speed["32"])
        self.plan["finish_estimate_seconds"] = round(self.finish_seconds, 1)

    def image_size(self, s: Setup, speed: dict[str, float], smallest: int) -> int:
        """The largest input size from ``s.size`` down to ``smallest`` (in ``SIZE_STEP`` steps) at which extracting
        one view and ``FINE_TUNE_WANTED`` fine-tuning epochs fit in what is left (their cost as the square of the
        side); ``smallest`` where none does, ``s.size`` where it fits or nothing is to be fine-tuned."""
        wanted = _fine_tune_wanted(s)
        size = s.size
        self.finish_from(s, speed)
        passes = self.finish_seconds - FINISH_SECONDS  # the finish's passes over images scale with the size too
        once = (len(s.data.train) + len(s.data.val)) / _extraction_speed(speed)
        cost = once + wanted * self.fine_tune_epoch(s, speed) + passes
        while wanted and size - SIZE_STEP >= smallest and cost * (size / s.size) ** 2 > self.left() + passes:
            size -= SIZE_STEP
        if size != s.size:
            self.plan.update(native_image_size=s.size, image_size=size)
        return size

    def fine_tune_epoch(self, s: Setup, speed: dict[str, float]) -> float:
        """Estimated seconds of one fine-tuning epoch (forward and backward above ``fine_tune_at``, then validation)."""
        top = 1 - s.fine_tune_at / len(s.net.groups)
        # a training step about three forward passes, each about 1.4x the folded frozen pass measured
        return (4 * len(s.data.train) + len(s.data.val)) * top / speed["32"]

    def keep_for(self, s: Setup, speed: dict[str, float], phase: str) -> float:
        """Seconds the head's epochs leave for fine-tuning: ``FINE_TUNE_WANTED`` epochs (fewer if fewer asked)."""
        if phase != "feature_extraction":
            return 0.0
        keep = self.kept(s, speed)
        self.plan["kept_for_fine_tuning_seconds"] = round(keep, 1)
        return keep

    def kept(self, s: Setup, speed: dict[str, float]) -> float:
        """Estimated seconds of the fine-tuning epochs a budget keeps room for."""
        return _fine_tune_wanted(s) * self.fine_tune_epoch(s, speed)

    def fine_tuning_epochs(self, s: Setup, speed: dict[str, float], ckpt: Path | None = None) -> int:
        """How many fine-tuning epochs fit in what is left (at most ``--fine-tune-epochs``; 0 when none does), or,
        resuming fine-tuning from ``ckpt``, the epochs its cosine rate was planned over."""
        if s.cfg.fine_tune_epochs == 0:
            return 0
        if ckpt is not None:
            schedulers = read_checkpoint(ckpt).get("lr_schedulers") or [{}]
            self.plan["fine_tuned"] = True
            return int(schedulers[0].get("T_max", s.cfg.fine_tune_epochs))
        epoch = self.fine_tune_epoch(s, speed)
        epochs = max(0, min(s.cfg.fine_tune_epochs, int(self.left() / epoch)))
        self.plan.update(fine_tune_epoch_estimate_seconds=round(epoch, 1), fine_tuned=epochs > 0)
        self.plan["fine_tune_epochs_planned"] = epochs
        return epochs

    def spent(self) -> float:
        return round(self.seconds - (self.deadline - time.perf_counter()), 1)


def plan_run(budget: Budget, s: Setup, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    """Before anything is written: the input size (a fresh run on images upsampled twice or more, no
    ``--image-size``), then the views (a resumed run keeps both); returns the speed ``measure`` gives at the size."""
    speed = measure()
    if not s.resuming and not s.cfg.image_size and 2 * (side := median_side(s.data.train)) <= s.size:
        smallest = max(s.spec.min_size, 2 * side, -(-s.size // 32) * 16)  # half the native size, to 16 px
        if (size := budget.image_size(s, speed, smallest)) != s.size:
            s.size = size
            speed = measure()  # at this size (how the frozen groups run fastest is chosen again for it)
    s.views = budget.plan_from(s, speed, views=not s.resuming)
    return speed


def _fine_tune_wanted(s: Setup) -> int:
    """Fine-tuning epochs a budget keeps room for: ``FINE_TUNE_WANTED``, fewer if fewer are asked."""
    return min(s.cfg.fine_tune_epochs, FINE_TUNE_WANTED)


def _extraction_speed(speed: dict[str, float]) -> float:
    """Images (views) per second that a whole extraction pass reaches: decoding and the frozen pass in turn."""
    return EXTRACTION_SHARE / (1 / speed["prepare"] + 1 / speed["chosen"])


class StopAtDeadline(pl.Callback):
    """Ends a phase after the epoch whose successor would not fit in the budget, less ``keep`` seconds kept for what
    follows (so best.ckpt stays the best so far). With ``most`` (fine-tuning), the phase's epochs are planned
    again after each one from the time it took, up to ``most``: the cosine rate then falls over the epochs that
    fit, however far the estimate it started from was off."""

    def __init__(self, budget: Budget, phase: str, keep: float = 0.0, most: int = 0) -> None:
        self.budget, self.phase, self.keep, self.most = budget, phase, keep, most
        self.started, self.longest, self.epochs = 0.0, 0.0, 0

    def on_train_epoch_start(self, trainer, module) -> None:
        now = time.perf_counter()
        if self.started:  # from one epoch's start to the next: its checkpoint and curves (written after this) too
            self.longest = max(self.longest, now - self.started)
        self.started = now

    def on_train_epoch_end(self, trainer, module) -> None:
        self.longest = max(self.longest, time.perf_counter() - self.started)
        self.epochs += 1
        stop = trainer.strategy.reduce_boolean_decision(self.budget.left() - self.keep < self.longest, all=False)
        trainer.should_stop = trainer.should_stop or stop  # every process stops together
        self.budget.plan[f"{self.phase}_epochs"] = self.epochs
        if self.most and not trainer.should_stop:
            done = trainer.current_epoch + 1
            fit = trainer.strategy.broadcast(done + int(self.budget.left() / self.longest))  # rank 0's plan for all
            planned = min(self.most, max(done + 1, fit))  # the next epoch fits (no stop): at least it
            trainer.fit_loop.max_epochs = planned
            for config in trainer.lr_scheduler_configs:
                if hasattr(config.scheduler, "T_max"):
                    config.scheduler.T_max = planned  # cosine: the same fall, over the epochs that fit
            self.budget.plan["fine_tune_epochs_planned"] = planned
