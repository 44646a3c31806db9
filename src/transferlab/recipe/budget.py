"""``--time-budget``: plan a run to end within a wall-clock budget, from throughput measured on this machine.

The budget counts from the start of the process (imports included: what a user's stopwatch sees).
The plan: how many augmented views to cache (the default's number, fewer while extraction would take more than
a third of the budget, down to one), then feature extraction and fine-tuning epochs for as long as the next epoch
still fits, each phase keeping its best model, aiming to end a little (``MARGIN``) before the deadline.
What was planned and done goes into report.md.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl

from transferlab.inference.unknown import BANK_IMAGES

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

    def views(self, train_images: int, val_images: int, images_per_second: float, wanted: int) -> int:
        """Augmented views to cache: as many as wanted while extraction stays within a third of what is left."""
        views = wanted
        while views > 1 and (views * train_images + val_images) / images_per_second > self.left() / 3:
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
        # the finish evaluates in float32, as predict does, after the features of the training images it keeps
        finish_images = len(s.data.val) + min(len(s.data.train), BANK_IMAGES)
        self.finish_seconds = FINISH_SECONDS + finish_images / (EVALUATION_SHARE * speed["32"])
        self.plan["finish_estimate_seconds"] = round(self.finish_seconds, 1)
        if not views:
            return s.views
        extraction = EXTRACTION_SHARE / (1 / speed["prepare"] + 1 / speed["chosen"])  # images (views) per second
        return self.views(len(s.data.train), len(s.data.val), extraction, s.views)

    def fine_tuning_fits(self, s: Setup, speed: dict[str, float]) -> bool:
        """Whether one fine-tuning epoch (forward and backward above ``fine_tune_at``) fits in what is left."""
        top = 1 - s.fine_tune_at / len(s.net.groups)
        # a training step about three forward passes, each about 1.4x the folded frozen pass measured
        epoch = (4 * len(s.data.train) + len(s.data.val)) * top / speed["32"]
        self.plan["fine_tune_epoch_estimate_seconds"] = round(epoch, 1)
        fits = self.left() > epoch
        self.plan["fine_tuned"] = fits
        return fits

    def spent(self) -> float:
        return round(self.seconds - (self.deadline - time.perf_counter()), 1)


class StopAtDeadline(pl.Callback):
    """Ends a phase after the epoch whose successor would not fit in the budget (so best.ckpt stays the best so far)."""

    def __init__(self, budget: Budget, phase: str) -> None:
        self.budget, self.phase = budget, phase
        self.started, self.longest, self.epochs = 0.0, 0.0, 0

    def on_train_epoch_start(self, trainer, module) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.longest = max(self.longest, time.perf_counter() - self.started)
        self.epochs += 1
        stop = trainer.strategy.reduce_boolean_decision(self.budget.left() < self.longest, all=False)
        trainer.should_stop = trainer.should_stop or stop  # every process stops together
        self.budget.plan[f"{self.phase}_epochs"] = self.epochs
